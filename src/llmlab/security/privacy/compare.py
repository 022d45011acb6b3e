"""Compare a baseline run with a defended one: canary exposure, MIA AUC and utility side by side."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmlab.checkpoint import read_run_config
from llmlab.evaluate import perplexity
from llmlab.security.privacy.canary import find_canaries, load_canaries, measure_exposure
from llmlab.security.privacy.common import Callback, PrivacyError, Stage, quiet, run_splits
from llmlab.security.privacy.mia import MIAConfig, run_mia
from llmlab.security.targets import WhiteBox
from llmlab.train.loop import last_checkpoint, load_run_for_resume, train


@dataclass
class CompareResult:
    baseline: dict[str, Any]
    defended: dict[str, Any]
    exposure: list[dict[str, Any]] = field(default_factory=list)
    mia: list[dict[str, Any]] = field(default_factory=list)
    val_loss: dict[str, float] = field(default_factory=dict)
    exposures: dict[str, Any] = field(default_factory=dict)
    attacks: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


EPSILON_MEANING = ("(epsilon, delta)-DP: for any one training sequence, every outcome of training is at most e^epsilon "
                   "times as likely with it as without it, except with probability delta; a smaller epsilon "
                   "bounds how much any attack can learn about that sequence")


def _run_facts(path: Path) -> dict[str, Any]:
    """What makes two runs comparable: steps trained, data, model shape and size."""


    cfg = read_run_config(path)
    ck = last_checkpoint(path)
    steps = json.loads((ck / "state.json").read_text())["step"] if ck is not None else None
    m = cfg.get("model", {})
    data = cfg.get("data", {})
    return {"steps": steps, "data_hash": data.get("hash"), "source": data.get("source"),
            "shape": {k: m.get(k) for k in ("arch", "n_layer", "n_head", "n_embd", "block_size", "vocab_size")},
            "batch_size": cfg.get("train", {}).get("batch_size")}


def comparability_warnings(baseline: Path, defended: Path) -> list[str]:
    """Differences that make a before/after comparison unfair: steps, data, model size, batch size."""
    b, d = _run_facts(baseline), _run_facts(defended)
    out = []
    if b["steps"] != d["steps"]:
        out.append(f"the runs trained for different numbers of steps (baseline {b['steps']}, defended {d['steps']}): "
                   "part of any difference is training length, not the defence; train an equal-steps baseline "
                   "(train_equal_steps_baseline(defended, DIR), or `llmlab privacy compare --equal-steps DIR`)")
    if b["data_hash"] != d["data_hash"]:
        out.append("the runs trained on different data (corpus hashes differ): expected for dedup, which changes the "
                   "corpus; otherwise the comparison mixes data and defence")
    if b["shape"] != d["shape"]:
        diff = ", ".join(f"{k} {b['shape'][k]} vs {d['shape'][k]}" for k in b["shape"]
                         if b["shape"][k] != d["shape"][k])
        out.append(f"the models differ in size or shape ({diff}): compare models of one shape")
    if b["batch_size"] != d["batch_size"]:
        out.append(f"the runs used different batch sizes ({b['batch_size']} vs {d['batch_size']})")
    return out


def val_loss_of(wb: Any, docs: Sequence[str]) -> float:
    """Mean token loss (nats) of a model on documents (scored in windows of its context)."""

    return float(perplexity(wb.model, list(docs))["loss"])


def train_equal_steps_baseline(defended: str | Path, out: str | Path, callback: Callback | None = None) -> Path:
    """Train the non-DP baseline a DP run should be compared with: the defended run's own config (model, data,
    batch, schedule, seed) for exactly as many steps as it trained, without DP-SGD, into `out`."""
    import dataclasses

    defended = Path(defended)
    if (defended / "run" / "config.json").is_file():
        defended = defended / "run"
    steps = _run_facts(defended)["steps"]
    if not steps:
        raise PrivacyError(f"{defended} has no checkpoint saying how many steps it trained; give a finished run")
    cfg = load_run_for_resume(defended)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_iters=int(steps), max_time=0.0))
    train(cfg, out, callback=callback)
    return Path(out)


def compare_runs(baseline: str | Path, defended: str | Path, canaries_file: str | Path | None = None,
                 mia_config: Any = None, estimate: bool = False, callback: Callback | None = None) -> CompareResult:
    """Re-run the canary exposure and the membership-inference attacks on a baseline and a defended run;
    report exposure before/after per canary, AUC before/after per attack, and the validation-loss cost
    (both measured on the baseline's validation split)."""

    cb = callback or quiet
    runs = {"baseline": Path(baseline), "defended": Path(defended)}
    for k, p in runs.items():  # an experiment folder stands for its run
        if (p / "run" / "config.json").is_file():
            runs[k] = p / "run"
    cfile = Path(canaries_file) if canaries_file else (find_canaries(runs["baseline"])
                                                       or find_canaries(runs["defended"]))
    canaries = load_canaries(cfile) if cfile else None
    base_splits = run_splits(runs["baseline"])
    res = CompareResult({}, {})
    res.warnings = comparability_warnings(runs["baseline"], runs["defended"])
    for w in res.warnings:
        cb("message", {"text": w, "level": "warning"})
    mcfg = mia_config or MIAConfig()
    for label, path in runs.items():
        wb = WhiteBox.load(path)
        splits = run_splits(path)
        info: dict[str, Any] = {"run": str(path), "dp": read_run_config(path).get("dp"), **_run_facts(path)}
        if canaries is not None:
            cb("message", {"text": f"{label}: canary exposure", "level": "info"})
            exp = measure_exposure(wb, canaries[0], canaries[1], estimate=estimate, callback=cb)
            res.exposures[label] = exp
        cb("message", {"text": f"{label}: membership inference", "level": "info"})
        mr = run_mia(wb, splits.train, splits.val, mcfg, callback=cb)
        res.attacks[label] = mr
        with Stage(cb, f"{label}: val loss", 1) as st:
            info["val_loss"] = val_loss_of(wb, base_splits.val)
            st.advance()
        info["train_docs"] = len([d for d in splits.train if d])
        (res.baseline if label == "baseline" else res.defended).update(info)
    if canaries is not None:
        b, d = res.exposures["baseline"].canaries, res.exposures["defended"].canaries
        for cb_, cd in zip(b, d):
            res.exposure.append({"secret": cb_["secret"], "repeats": cb_["repeats"], "before": cb_["exposure"],
                                 "after": cd["exposure"], "change": cd["exposure"] - cb_["exposure"]})
    for name in res.attacks["baseline"].attacks:
        before = res.attacks["baseline"].attacks[name]
        after = res.attacks["defended"].attacks.get(name)
        if after is None:
            continue
        res.mia.append({"attack": name, "auc_before": before["auc"], "auc_after": after["auc"],
                        "tpr@1%_before": before["tpr_at_1pct"], "tpr@1%_after": after["tpr_at_1pct"]})
    vb, vd = res.baseline["val_loss"], res.defended["val_loss"]
    res.val_loss = {"before": vb, "after": vd, "cost": vd - vb, "cost_ppl_ratio": math.exp(vd - vb)}
    return res
