"""Compare a baseline run with a defended one: canary exposure, MIA AUC and utility side by side."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmlab.checkpoint import read_run_config
from llmlab.evaluate import perplexity
from llmlab.security.privacy.canary import find_canaries, load_canaries, measure_exposure
from llmlab.security.privacy.common import Callback, Stage, quiet, run_splits
from llmlab.security.privacy.mia import MIAConfig, run_mia
from llmlab.security.targets import WhiteBox


@dataclass
class CompareResult:
    baseline: dict[str, Any]
    defended: dict[str, Any]
    exposure: list[dict[str, Any]] = field(default_factory=list)
    mia: list[dict[str, Any]] = field(default_factory=list)
    val_loss: dict[str, float] = field(default_factory=dict)
    exposures: dict[str, Any] = field(default_factory=dict)
    attacks: dict[str, Any] = field(default_factory=dict)


def val_loss_of(wb: Any, docs: Sequence[str]) -> float:
    """Mean token loss (nats) of a model on documents (scored in windows of its context)."""

    return float(perplexity(wb.model, list(docs))["loss"])


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
    mcfg = mia_config or MIAConfig()
    for label, path in runs.items():
        wb = WhiteBox.load(path)
        splits = run_splits(path)
        info: dict[str, Any] = {"run": str(path), "dp": read_run_config(path).get("dp")}
        if canaries is not None:
            cb("warning", {"text": f"{label}: canary exposure"})
            exp = measure_exposure(wb, canaries[0], canaries[1], estimate=estimate, callback=cb)
            res.exposures[label] = exp
        cb("warning", {"text": f"{label}: membership inference"})
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
