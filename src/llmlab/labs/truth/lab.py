"""The truthfulness lab: for each seed, draw a world (world.py), write its corpus, optionally deduplicate it
with the privacy lab's defence (llmlab.security.privacy.dedup), train a small GPT on each version, and measure
every model against the fact table (measure.py) and by free generation:

    hallucination rate = false statements / statements the model writes when it continues a line break
                         freely (temperature 1), a statement being false when its person is not in the world,
                         or its value is not the person's (a planted myth counts as false)

Kalai & Vempala (2024) show a calibrated model's hallucination rate is at least about the monofact rate of its
training data (minus its miscalibration and small terms); deduplication makes repeated facts singletons, so it
raises the monofact rate: the lab measures whether it raises hallucination too (Miao & Kearns 2025, arXiv
2502.08666, found that repeating a few examples lowers it). Both versions of a seed share one world, so the
dedup effect is a paired difference; the mean over seeds has a Student-t interval, every rate an exact one.

The negative controls: the unseen people (the model never saw them, so its accuracy on them is chance), and
the random detector (its AUROC is 0.5 up to noise).

    result = run(LabConfig.quick_config(), progress=print_events, out="runs/truth")
    write_lab_report(result, "runs/truth")"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llmlab.checkpoint import atomic_write_bytes, atomic_write_json
from llmlab.errors import ConfigError, LlmlabError
from llmlab.labs.truth import measure
from llmlab.labs.truth.ask import AskConfig, sample_shared
from llmlab.labs.truth.measure import MeasureConfig, Measurement, bucket_label, count_bucket
from llmlab.labs.truth.questions import question_from_dict
from llmlab.labs.truth.world import (
    World,
    WorldConfig,
    count_statements,
    generate_world,
    monofact_rate,
    parse_statement,
    write_world,
)
from llmlab.progress import Progress, Stage, message
from llmlab.security.privacy.dedup import dedup_docs
from llmlab.stats import mean_ci, rate_ci

CONDITIONS = ("none", "dedup")
LAB_FILE = "lab.json"

QUICK_TRAIN: dict[str, Any] = dict(n_layer=2, n_head=4, n_embd=128, block_size=64, batch_size=24, max_iters=300,
                                   lr=3e-3, min_lr=3e-4, warmup_iters=30, eval_interval=300, eval_iters=5,
                                   num_samples=0, dropout=0.0)
FULL_TRAIN: dict[str, Any] = {**QUICK_TRAIN, "batch_size": 32, "max_iters": 1200, "eval_interval": 600,
                              "eval_iters": 10}
FIXED = ("data", "val_fraction", "tokenizer", "seed", "task", "arch", "split")  # the lab chooses these itself


def _measure_defaults() -> MeasureConfig:
    return MeasureConfig(ask=AskConfig(mode="cloze", max_new_tokens=12, samples=10, batch_size=320), bootstrap=500)


@dataclass
class LabConfig:
    """The lab's experiment. The defaults are the full run (under 10 minutes on 2 cores); LabConfig.quick() is
    the toy size (about a minute) with every stage exercised."""

    world: WorldConfig = field(default_factory=WorldConfig)
    seeds: tuple[int, ...] = (0, 1, 2)
    conditions: tuple[str, ...] = CONDITIONS  # none (the corpus as written) and/or dedup
    dedup_mode: str = "exact"  # the privacy lab's dedup: exact | near | both
    preset: str = "tiny"
    train: dict[str, Any] = field(default_factory=lambda: dict(FULL_TRAIN))  # model and training overrides
    measure: MeasureConfig = field(default_factory=_measure_defaults)
    free_samples: int = 400  # free generations per model for the hallucination rate
    free_tokens: int = 80  # tokens per free generation (one statement is at most ~75 characters)
    quick: bool = False

    @classmethod
    def quick_config(cls) -> LabConfig:
        """The toy size: 40 people, two templates, two seeds, 300 training steps."""
        return cls(world=WorldConfig(people=40, unseen=15, val_people=8, max_count=32, myths=6, templates=2),
                   seeds=(0, 1), train=dict(QUICK_TRAIN), free_samples=200, quick=True)

    def validate(self) -> None:
        self.world.validate()
        self.measure.validate()
        if not self.seeds:
            raise ConfigError("give at least one seed")
        bad = [c for c in self.conditions if c not in CONDITIONS]
        if bad or not self.conditions:
            raise ConfigError(f"condition {bad[0] if bad else '(none)'!r} is not one of {', '.join(CONDITIONS)}")
        if self.dedup_mode not in ("exact", "near", "both"):
            raise ConfigError(f"dedup_mode {self.dedup_mode!r} is not one of exact, near, both")
        fixed = [k for k in self.train if k in FIXED]
        if fixed:
            raise ConfigError(f"the lab sets {fixed[0]!r} itself; change the world instead")
        if self.free_samples < 0 or self.free_tokens < 1:
            raise ConfigError("free_samples must be >= 0 and free_tokens >= 1")


@dataclass
class RunSummary:
    """One trained model: its seed and condition, the corpus it saw, the measurement and the free generation."""

    seed: int
    condition: str
    run: str
    corpus: dict[str, Any]
    training: dict[str, Any]
    hallucination: dict[str, Any]
    measurement: Measurement
    metrics: dict[str, float]
    counts: dict[str, list[int]] = field(default_factory=dict)  # [k, n] of the metrics that are rates


@dataclass
class LabResult:
    """Every run, the per-condition means over seeds (with intervals), the paired dedup - none differences, and
    accuracy by training frequency pooled over seeds."""

    out: str
    config: dict[str, Any]
    runs: list[RunSummary]
    conditions: dict[str, dict[str, dict[str, Any]]]
    differences: dict[str, dict[str, Any]]
    by_count: dict[str, list[dict[str, Any]]]
    by_original_count: dict[str, list[dict[str, Any]]]
    seconds: float


# ----------------------------------------------------------------------------- corpus and training


def write_corpus(path: Path, train: Sequence[str], val: Sequence[str]) -> float:
    """train + val documents as JSONL ({"text": ...}); the val_fraction that makes split_corpus give back
    exactly this split (empty documents, e.g. emptied by dedup, are dropped first, as split_corpus does)."""
    train = [d for d in train if d]
    atomic_write_bytes(path, "".join(json.dumps({"text": d}) + "\n" for d in [*train, *val]).encode())
    return (len(val) - 0.5) / (len(train) + len(val))


def corpus_for(world: World, condition: str, mode: str, progress: Progress | None = None
               ) -> tuple[list[str], dict[str, Any]]:
    """The training documents of a condition and what dedup removed."""
    if condition == "none":
        return list(world.train_docs), {}
    docs, info = dedup_docs(world.train_docs, mode=mode, callback=progress)
    return docs, {k: v for k, v in info.items() if k != "most_repeated_lines"}


def _train(cfg: LabConfig, folder: Path, docs: Sequence[str], world: World, seed: int, progress: Progress | None,
           out: Path) -> dict[str, Any]:
    from llmlab.train import resolve_config, train
    from llmlab.train.loop import TrainingInterrupted, last_checkpoint, run_finished

    run = folder / "run"
    done = folder / "training.json"
    if run_finished(run) and done.is_file():
        return json.loads(done.read_text())
    vf = write_corpus(folder / "corpus.jsonl", docs, world.val_docs)
    overrides = {**cfg.train, "data": str(folder / "corpus.jsonl"), "val_fraction": vf, "tokenizer": "char",
                 "seed": 1337 + seed}
    rcfg = resolve_config(cfg.preset, None, overrides)
    resume = last_checkpoint(run) is not None
    if run.exists() and not resume:
        shutil.rmtree(run)  # a run that never reached its first checkpoint starts again
    try:
        r = train(rcfg, run, resume=resume, callback=progress)
    except TrainingInterrupted as e:
        raise e.with_command(f"`llmlab truth lab` again with --out {out}" + (" --quick" if cfg.quick else "")) from None
    info = {"steps": r.step, "val_loss": r.val_loss, "best_val_loss": r.best_val_loss, "seconds": r.elapsed,
            "tokens_per_s": r.tokens_per_s, "params": None}
    atomic_write_json(done, info)
    return info


# ----------------------------------------------------------------------------- free generation


def free_generation(model: Any, world: World, counts: Counter, n: int, max_tokens: int = 80, seed: int = 0,
                    batch_size: int = 400, progress: Progress | None = None) -> dict[str, Any]:
    """Sample n lines from the model after a line break and read each as a statement: true, wrong (a person of
    the world with another value), myth (the planted false value), fabricated (a person not in the world), or
    unparsed (not a statement). Hallucination rate = (wrong + myth + fabricated) / parsed, exact interval."""
    if n == 0:
        return {"n": 0, "parsed": 0, "rate": rate_ci(0, 0).to_dict()}
    tok = model.tokenizer
    cfg = AskConfig(max_new_tokens=min(max_tokens, model.config.block_size - 2), samples=n, batch_size=batch_size)
    with Stage(progress, "free generation", n) as st:
        texts = sample_shared(model, [tok.encode("\n")], n, ("\n",), cfg, 1.0, seed, st)[0]
    table = world.table()
    kinds: Counter = Counter()
    copied = 0
    examples: dict[str, list[str]] = {}
    for t in texts:
        s = parse_statement(t)
        if s is None:
            kind = "unparsed"
        else:
            person, rel, value = s
            f = table.get((person, rel))
            kind = ("fabricated" if f is None else "true" if value == f.value else
                    "myth" if value == f.myth else "wrong")
            copied += counts.get(s, 0) > 0
        kinds[kind] += 1
        if len(examples.setdefault(kind, [])) < 3:
            examples[kind].append(t.strip())
    parsed = n - kinds["unparsed"]
    false = kinds["wrong"] + kinds["myth"] + kinds["fabricated"]
    return {"n": n, "parsed": parsed, **{k: kinds[k] for k in ("true", "wrong", "myth", "fabricated", "unparsed")},
            "in_training": copied, "rate": rate_ci(false, parsed).to_dict(), "examples": examples}


# ----------------------------------------------------------------------------- the experiment


def _metrics(meas: Measurement, mf: float, hall: dict[str, Any]) -> tuple[dict[str, float], dict[str, list[int]]]:
    """The numbers compared across seeds and conditions, and for the rates among them their [k, n]."""
    items = meas.items
    counts: dict[str, list[int]] = {}

    def acc(key: str, pred: Any) -> None:
        sel = [it["outcome"] == "correct" for it in items if pred(it)]
        counts[key] = [sum(sel), len(sel)]

    acc("accuracy_frequent", lambda it: it["group"] == "seen" and (it.get("count_original") or 0) >= 16)
    acc("accuracy_once", lambda it: it["group"] == "seen" and it.get("count_original") == 1)
    acc("accuracy_seen", lambda it: it["group"] == "seen")
    acc("accuracy_unseen", lambda it: it["group"] == "unseen")
    counts["hallucination_rate"] = [hall["rate"]["k"], hall["rate"]["n"]]
    if meas.myths:
        counts["myth_said"] = [meas.myths["said_myth"]["k"], meas.myths["said_myth"]["n"]]
    for key, group in (("mc1_myth", "myth"), ("mc1_seen", "seen")):
        if meas.choice.get(group):
            counts[key] = [meas.choice[group]["mc1"]["k"], meas.choice[group]["mc1"]["n"]]
    out = {"monofact_rate": mf, **{k: (v[0] / v[1] if v[1] else float("nan")) for k, v in counts.items()}}
    cal = meas.calibration.get("answer probability", {})
    out["ece"] = cal.get("ece", float("nan"))
    out["brier"] = cal.get("brier", float("nan"))
    for name, d in meas.detectors.items():
        if d.get("measured"):
            out[f"auroc_{name}"] = d["auroc"]
    return out, counts


def _summarise(values: Sequence[float], counts: Sequence[Sequence[int]] | None = None) -> dict[str, Any]:
    """Mean over seeds with a Student-t interval (None with fewer than 3 seeds: two values give an interval
    too wide to mean anything), the values, and for a rate the pooled k/n with its exact interval."""
    v = [x for x in values if x == x]
    m, lo, hi = mean_ci(v)
    out: dict[str, Any] = {"mean": m, "lo": lo if len(v) >= 3 else None, "hi": hi if len(v) >= 3 else None,
                           "n": len(v), "values": list(values)}
    if counts:
        out["pooled"] = rate_ci(sum(c[0] for c in counts), sum(c[1] for c in counts)).to_dict()
    return out


def _pool(runs: Sequence[RunSummary], key: str) -> list[dict[str, Any]]:
    buckets: dict[tuple[int, int], list[int]] = {}
    for r in runs:
        for it in r.measurement.items:
            c = it.get(key)
            if c is None or it["group"] == "myth":
                continue
            b = buckets.setdefault(count_bucket(c), [0, 0])
            b[0] += it["outcome"] == "correct"
            b[1] += 1
    return [{"bucket": bucket_label(*b), "lo": b[0], "hi": b[1], "n": kn[1], "accuracy": rate_ci(*kn).to_dict()}
            for b, kn in sorted(buckets.items())]


def _check_out(out: Path, cfg: LabConfig) -> None:
    """A lab folder records what its models were trained from (the world, dedup, preset and training settings):
    the same folder takes more seeds or conditions, or other measurement settings, but not other training."""
    f = out / LAB_FILE
    mine = json.loads(json.dumps({"world": asdict(cfg.world), "dedup_mode": cfg.dedup_mode, "preset": cfg.preset,
                                  "train": cfg.train}))
    if f.is_file():
        try:
            saved = json.loads(f.read_text())
        except json.JSONDecodeError:
            saved = None
        if saved != mine:
            raise LlmlabError(f"{out} holds a truth lab trained with other settings; choose another --out (or delete "
                              "it)")
    elif out.exists() and any(out.iterdir()):
        raise LlmlabError(f"{out} exists and is not a truth lab folder; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(f, mine)


def run(config: LabConfig | None = None, model: Mapping[str, Any] | None = None, progress: Progress | None = None,
        out: str | Path | None = None) -> LabResult:
    """Run the lab into `out` (default: a new temporary folder). `model` overrides the model and training
    settings of config.train (n_layer, n_embd, max_iters, ...). Running it again on the same folder with the
    same world and training settings reuses the finished runs (measuring them again, with the measurement
    settings given) and resumes an interrupted one."""
    cfg = config or LabConfig()
    if model:
        cfg = dataclasses.replace(cfg, train={**cfg.train, **dict(model)})
    cfg.validate()
    t0 = time.perf_counter()
    out = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="llmlab-truth-"))
    _check_out(out, cfg)
    from llmlab.interop import load

    runs: list[RunSummary] = []
    for seed in cfg.seeds:
        world = generate_world(dataclasses.replace(cfg.world, seed=seed))
        sfolder = out / f"seed{seed}"
        write_world(world, sfolder)
        original = count_statements(world.train_docs)
        for cond in cfg.conditions:
            message(progress, f"seed {seed}, {'deduplicated corpus' if cond == 'dedup' else 'corpus as written'}")
            folder = sfolder / cond
            folder.mkdir(parents=True, exist_ok=True)
            docs, dedup_info = corpus_for(world, cond, cfg.dedup_mode, progress)
            counts = count_statements(docs)
            mf = monofact_rate(counts)
            table = [{**asdict(f), "count": counts[(f.person, f.relation, f.value)],
                      "myth_count": counts[(f.person, f.relation, f.myth)] if f.myth else 0} for f in world.facts]
            atomic_write_bytes(folder / "facts.jsonl", "".join(json.dumps(t) + "\n" for t in table).encode())
            training = _train(cfg, folder, docs, world, seed, progress, out)
            model_ = load(folder / "run")
            training["params"] = sum(p.numel() for p in model_.parameters())
            qdicts = world.questions(counts)
            for q in qdicts:
                q["count_original"] = original[(q["person"], q["relation"], q["answer"])]
            qs = [question_from_dict(q, "world", q["id"]) for q in qdicts]
            mcfg = dataclasses.replace(cfg.measure, seed=seed)
            meas = measure.run(mcfg, model_, progress, qs, name=str(folder / "run"))
            for it, q in zip(meas.items, qs):
                it["count_original"] = q.meta.get("count_original")
            hall = free_generation(model_, world, counts, cfg.free_samples, cfg.free_tokens, seed, progress=progress)
            corpus = {**mf, "chars": sum(map(len, docs)), "documents": sum(1 for d in docs if d), "dedup": dedup_info}
            metrics, rates = _metrics(meas, mf["monofact_rate"], hall)
            runs.append(RunSummary(seed, cond, str(folder / "run"), corpus, training, hall, meas, metrics, rates))
    conditions, differences, by_count, by_orig = aggregate(runs, cfg.conditions)
    return LabResult(str(out), json.loads(json.dumps(asdict(cfg))), runs, conditions, differences, by_count, by_orig,
                     time.perf_counter() - t0)


def aggregate(runs: Sequence[RunSummary], conds: Sequence[str]) -> tuple[dict, dict, dict, dict]:
    """Per condition: every metric summarised over seeds; the paired dedup - none differences; accuracy by
    training count (as trained, and as written before dedup) pooled over seeds."""
    conditions = {c: {} for c in conds}
    for c in conds:
        rs = [r for r in runs if r.condition == c]
        for k in dict.fromkeys(k for r in rs for k in r.metrics):
            pooled = [r.counts[k] for r in rs] if all(k in r.counts for r in rs) else None
            conditions[c][k] = _summarise([r.metrics.get(k, float("nan")) for r in rs], pooled)
    differences: dict[str, dict[str, Any]] = {}
    if set(CONDITIONS) <= set(conds):
        pairs = [(a, b) for a in runs for b in runs if a.seed == b.seed and a.condition == "none"
                 and b.condition == "dedup"]
        for k in dict.fromkeys(k for a, _ in pairs for k in a.metrics):
            differences[k] = _summarise([b.metrics.get(k, float("nan")) - a.metrics.get(k, float("nan"))
                                         for a, b in pairs])
    by_count = {c: _pool([r for r in runs if r.condition == c], "count") for c in conds}
    by_orig = {c: _pool([r for r in runs if r.condition == c], "count_original") for c in conds}
    return conditions, differences, by_count, by_orig

