"""`llmlab privacy canary|extract|mia|compare|dedup`: the privacy lab from the shell. Each sub-command
writes report.json, report.html and report.md into --out."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from llmlab.checkpoint import atomic_write_bytes
from llmlab.cli.common import console, verb
from llmlab.data import load_corpus
from llmlab.errors import LlmlabError
from llmlab.security.privacy.canary import (
    DEFAULT_FORMAT,
    CanaryConfig,
    CanaryFormat,
    find_canaries,
    load_canaries,
    measure_exposure,
    plot_exposure,
    plot_histogram,
    run_canary_experiment,
)
from llmlab.security.privacy.common import run_splits
from llmlab.security.privacy.compare import compare_runs
from llmlab.security.privacy.dedup import dedup_docs
from llmlab.security.privacy.extract import ExtractConfig, run_extract
from llmlab.security.privacy.mia import ATTACKS, MIAConfig, overlap_fraction, plot_roc, run_mia
from llmlab.security.report import Section, figure_png, write_report
from llmlab.security.targets import WhiteBox

# ----------------------------------------------------------------------------- progress


class PrivacyProgress:
    """Renders the library's callbacks: stage/advance/done as rich progress bars, warnings as lines, and
    the trainer's events (start, log, eval, end) as a training bar."""

    def __init__(self) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=console(stderr=True), transient=False)
        self.tasks: dict[str, Any] = {}
        self.totals: dict[str, int | None] = {}

    def __enter__(self) -> PrivacyProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)

    def __call__(self, event: str, info: dict[str, Any]) -> None:
        p = self.progress
        if event == "stage":
            self.tasks[info["name"]] = p.add_task(info["name"], total=info.get("total"), info="")
            self.totals[info["name"]] = info.get("total")
        elif event == "advance" and info["name"] in self.tasks:
            p.advance(self.tasks[info["name"]], info.get("n", 1))
        elif event == "done" and info["name"] in self.tasks:
            t = self.tasks.pop(info["name"])
            total = self.totals.pop(info["name"], None)
            if total is not None:
                p.update(t, completed=total)
        elif event == "warning":
            p.console.print(info["text"], markup=False)
        elif event == "start":
            p.console.print(f"training {info['run']} ({info['task']}): {info['params']:,} parameters")
            self.tasks["train"] = p.add_task("train", total=info["max_iters"], completed=info["step"], info="")
        elif event == "log" and "train" in self.tasks:
            p.update(self.tasks["train"], completed=info["step"],
                     info=f"loss {info['loss']:.4f}  {info['tokens_per_s']:,.0f} tok/s")
        elif event == "eval":
            eps = f"  epsilon {info['epsilon']:.2f}" if "epsilon" in info else ""
            p.console.print(f"step {info['step']}: train {info['train_loss']:.4f}  val {info['val_loss']:.4f}{eps}")
        elif event == "end" and "train" in self.tasks:
            self.tasks.pop("train")


def _out(a: argparse.Namespace, kind: str) -> Path:
    return Path(a.out) if a.out else Path("runs") / "privacy" / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"


def _ints(spec: str, flag: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(x) for x in spec.split(",") if x.strip())
    except ValueError:
        raise LlmlabError(f"{flag} {spec!r} is not a comma-separated list of integers, e.g. 1,4,16,64") from None
    if not vals:
        raise LlmlabError(f"{flag} is empty; give counts such as 1,4,16,64")
    return vals


def _sets(items: list[str]) -> dict[str, Any]:
    """--set KEY=VALUE pairs (values parsed as JSON when they can be, else strings)."""
    out: dict[str, Any] = {}
    for it in items:
        if "=" not in it:
            raise LlmlabError(f"--set {it!r} is not KEY=VALUE (e.g. --set n_layer=2)")
        k, v = it.split("=", 1)
        try:
            out[k.strip().replace("-", "_")] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip().replace("-", "_")] = v
    return out


def _load_wb(path: str):  # noqa: ANN202

    return WhiteBox.load(path)


def _read_docs(path: str, flag: str) -> list[str]:

    if not Path(path).exists():
        raise LlmlabError(f"{flag} {path}: no such file or folder")
    return load_corpus(path)


def _done(out: Path, seconds: float) -> None:
    c = console()
    c.print(f"report: {out / 'report.html'}  ({seconds:.0f} s; list with: llmlab report {out})")


# ----------------------------------------------------------------------------- canary


def _canary_args(p: argparse.ArgumentParser) -> None:

    p.add_argument("--format", default=DEFAULT_FORMAT,
                   help="canary format; slots {d} digit, {l} lowercase letter, {L} uppercase letter "
                        f"(default {DEFAULT_FORMAT!r})")
    p.add_argument("--repeats", default="1,4,16,64", help="insertions of each canary (default 1,4,16,64)")
    p.add_argument("--controls", type=int, default=1, help="never-inserted control canaries (default 1)")
    p.add_argument("--data", help="corpus to insert into (default: the built-in Python reference)")
    p.add_argument("--max-chars", type=int, default=100_000, help="use the first N characters (0 = all; "
                   "default 100000)")
    p.add_argument("--preset", default="tiny", help="model/training preset (default tiny)")
    p.add_argument("--max-iters", type=int, help="training steps (default 800)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any model or training field, e.g. --set n_layer=2 --set lr=3e-3")
    p.add_argument("--run", help="measure this run (already trained on a canaried corpus) instead of training")
    p.add_argument("--canaries", help="canaries.json of the run given with --run (default: found next to it)")
    p.add_argument("--estimate", action="store_true", help="estimate exposure from a sample (skew-normal fit) "
                   "instead of scoring every candidate")
    p.add_argument("--samples", type=int, default=10000, help="sampled candidates for --estimate")
    p.add_argument("--beam", type=int, default=16, help="beam width of the extraction attack")
    p.add_argument("--defense", default="none", choices=["none", "dedup", "dp"],
                   help="train with a defence: dedup (exact + near duplicates) or dp (DP-SGD)")
    _dp_args(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="experiment folder (default runs/privacy/canary-<time>)")


def _dp_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("DP-SGD (with --defense dp)")
    g.add_argument("--noise-multiplier", type=float, default=1.0)
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="per-example clipping norm C")
    g.add_argument("--delta", type=float, default=1e-5)
    g.add_argument("--target-epsilon", type=float, default=0.0, help="pick the noise to spend this epsilon")


def _dp_config(a: argparse.Namespace) -> dict[str, Any]:
    return {"noise_multiplier": a.noise_multiplier, "max_grad_norm": a.max_grad_norm, "delta": a.delta,
            "target_epsilon": a.target_epsilon}


def canary_sections(res: Any, title: str = "Canaries") -> list[Section]:

    rows = []
    for c in res.canaries:
        rank = c.get("rank", c.get("rank_estimate"))
        rows.append([c["secret"], c["repeats"], round(c["px_bits"], 2), rank, round(c["exposure"], 2),
                     "yes" if c["greedy_extracted"] else "no", c["beam_rank"] or "-"])
    figs = {"exposure vs repetitions": figure_png(plot_exposure({"model": res}))}
    if res.histogram:
        figs["Px of all candidates"] = figure_png(plot_histogram(res))
    how = "exact, every candidate scored" if res.method == "exact" else f"estimated from {res.samples:,} samples"
    text = (f"{res.space_size:,} candidate secrets (max exposure {res.max_exposure:.2f} bits); rank {how}."
            f" Greedy decoding from the prefix gives {res.greedy_secret!r}; unconstrained greedy continues "
            f"{res.free_greedy_text!r}."
            + (f" The characters {res.oov!r} are not in the model's vocabulary: candidates differing only in them "
               "read the same and tie." if res.oov else ""))
    return [Section(title, text, ["secret", "repeats", "Px (bits)", "rank", "exposure", "greedy", "beam rank"],
                    rows, figs)]


@dataclasses.dataclass
class _Timer:
    t0: float = dataclasses.field(default_factory=time.perf_counter)

    def __call__(self) -> float:
        return time.perf_counter() - self.t0


def cmd_canary(a: argparse.Namespace) -> int:

    timer = _Timer()
    out = _out(a, "canary")
    repeats = _ints(a.repeats, "--repeats")
    CanaryFormat.parse(a.format)  # a bad format fails before anything else
    cfg = CanaryConfig(format=a.format, repeats=repeats, controls=a.controls, seed=a.seed, data=a.data,
                       max_chars=a.max_chars, preset=a.preset, estimate=a.estimate, samples=a.samples, beam=a.beam,
                       defense=a.defense, dp=_dp_config(a))
    cfg.train.update({**({"max_iters": a.max_iters} if a.max_iters else {}), **_sets(a.set)})
    with PrivacyProgress() as progress:
        if a.run:
            cfile = a.canaries or find_canaries(a.run)
            if cfile is None:
                raise LlmlabError(f"no canaries.json next to {a.run}; give the canaries it was trained with, "
                                  "--canaries FILE")
            fmt, canaries = load_canaries(cfile)
            wb = _load_wb(a.run)
            res = measure_exposure(wb, fmt, canaries, estimate=a.estimate, samples=a.samples, beam=a.beam,
                                   seed=a.seed, callback=progress)
            run, training, dedup = a.run, {}, {}
            config = {"run": a.run, "canaries": str(cfile), "estimate": a.estimate, "samples": a.samples,
                      "beam": a.beam}
        else:
            exp = run_canary_experiment(cfg, out, callback=progress)
            res, run, training, dedup = exp.exposure, exp.run, exp.training, exp.dedup
            config = dataclasses.asdict(cfg)
    seconds = timer()
    data = {"run": run, "format": res.format, "space_size": res.space_size, "method": res.method,
            "max_exposure": res.max_exposure, "canaries": res.canaries, "greedy_secret": res.greedy_secret,
            "free_greedy_text": res.free_greedy_text, "beam": res.beam, "fit": res.fit, "samples": res.samples,
            "histogram": res.histogram, "training": training, "dedup": dedup, "seconds": seconds}
    by_r = sorted(res.canaries, key=lambda c: -c["repeats"])
    summary = "; ".join(f"x{c['repeats']}: exposure {c['exposure']:.1f}" for c in by_r) + \
        f" (max {res.max_exposure:.1f} bits, {res.method})"
    sections = canary_sections(res)
    if training:
        sections.append(Section("Training", rows=[[k, v] for k, v in training.items()], header=["", "value"]))
    if dedup:
        sections.append(Section("Deduplication", rows=[[k, v] for k, v in dedup.items()
                                                       if k != "most_repeated_lines"], header=["", "value"]))
    write_report(out, "privacy canary", data, sections, summary, config, model=run)
    c = console()
    for e in by_r:
        c.print(f"  canary x{e['repeats']:<3d} {e['secret']}  exposure {e['exposure']:6.2f} / {res.max_exposure:.2f}"
                f"  greedy {'EXTRACTED' if e['greedy_extracted'] else '-'}  beam rank {e['beam_rank'] or '-'}")
    _done(out, seconds)
    return 0


# ----------------------------------------------------------------------------- mia


def _mia_args(p: argparse.ArgumentParser) -> None:

    p.add_argument("run", help="an llmlab run folder (members = its train split, non-members = its val split) "
                   "or a Hugging Face GPT-2 folder with --members/--nonmembers")
    p.add_argument("--members", help="a file/folder of member documents (default: the run's train split)")
    p.add_argument("--nonmembers", help="a file/folder of non-member documents (default: the run's val split)")
    p.add_argument("--allow-overlap", action="store_true", help="score non-members that overlap the training "
                   "set anyway (a warning instead of an error)")
    p.add_argument("--reference", help="a reference model (run or HF folder) for the reference attack")
    p.add_argument("--attacks", default=",".join(ATTACKS), help=f"comma list (default all: {','.join(ATTACKS)})")
    p.add_argument("--max-docs", type=int, default=200, help="sequences per side (default 200)")
    p.add_argument("--max-tokens", type=int, default=0, help="tokens per sequence (default: the context)")
    p.add_argument("-k", type=float, default=0.2, help="Min-K%% fraction (default 0.2)")
    p.add_argument("--neighbours", type=int, default=8, help="perturbed neighbours per document (default 8)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the AUC (default 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="report folder (default runs/privacy/mia-<time>)")


def mia_sections(res: Any, title: str = "Membership inference") -> list[Section]:

    rows = []
    for name, r in res.attacks.items():
        ci = r["auc_ci"]
        lo, hi = ci.get("low", float("nan")), ci.get("high", float("nan"))
        rows.append([name, round(r["auc"], 4), f"[{lo:.3f}, {hi:.3f}]",
                     round(r["tpr_at_1pct"], 4), round(r["tpr_at_0.1pct"], 4)])
    text = (f"{res.n_members} member vs {res.n_nonmembers} non-member sequences; higher score = member. "
            f"Scored at {res.sequences_per_s:.1f} sequences/s (all attacks)."
            + "".join(f" {k} not run: {v}." for k, v in res.skipped.items()))
    return [Section(title, text, ["attack", "ROC AUC", "95% CI", "TPR@1%FPR", "TPR@0.1%FPR"], rows,
                    {"ROC (log scale)": figure_png(plot_roc(res))})]


def cmd_mia(a: argparse.Namespace) -> int:

    timer = _Timer()
    out = _out(a, "mia")
    attacks = tuple(x.strip() for x in a.attacks.split(",") if x.strip())
    cfg = MIAConfig(max_docs=a.max_docs, max_tokens=a.max_tokens, k=a.k, neighbours=a.neighbours,
                    bootstrap=a.bootstrap, seed=a.seed, attacks=attacks)
    if a.members and a.nonmembers:
        members, nonmembers, train = _read_docs(a.members, "--members"), _read_docs(a.nonmembers, "--nonmembers"), None
    else:
        splits = run_splits(a.run)
        train = splits.train
        members = _read_docs(a.members, "--members") if a.members else splits.train
        nonmembers = _read_docs(a.nonmembers, "--nonmembers") if a.nonmembers else splits.val
    wb = _load_wb(a.run)
    ref = _load_wb(a.reference) if a.reference else None
    overlap = None
    with PrivacyProgress() as progress:
        if a.nonmembers:
            overlap = overlap_fraction(nonmembers, train if train is not None else members, wb)
            if overlap > 0:
                msg = (f"{overlap:.1%} of the non-member documents in {a.nonmembers} overlap the training set; "
                       "remove them from the file, or pass --allow-overlap to score them anyway")
                if not a.allow_overlap:
                    raise LlmlabError(msg)
                progress("warning", {"text": f"warning: {msg.split(';')[0]}"})
        res = run_mia(wb, members, nonmembers, cfg, reference=ref, callback=progress)
    seconds = timer()
    data = {"run": a.run, "n_members": res.n_members, "n_nonmembers": res.n_nonmembers, "attacks": res.attacks,
            "skipped": res.skipped, "scoring_seconds": res.seconds, "sequences_per_s": res.sequences_per_s,
            "nonmember_overlap": overlap, "scores": res.scores, "labels": res.labels, "seconds": seconds}
    best = max(res.attacks.items(), key=lambda kv: kv[1]["auc"])
    summary = (f"best attack {best[0]}: AUC {best[1]['auc']:.3f}, TPR@1%FPR {best[1]['tpr_at_1pct']:.3f} "
               f"({res.n_members} member, {res.n_nonmembers} non-member sequences)")
    config = {**dataclasses.asdict(cfg), "members": a.members or "run train split",
              "nonmembers": a.nonmembers or "run val split", "reference": a.reference}
    write_report(out, "privacy mia", data, mia_sections(res), summary, config, model=a.run)
    c = console()
    for name, r in res.attacks.items():
        lo, hi = r["auc_ci"].get("low", float("nan")), r["auc_ci"].get("high", float("nan"))
        c.print(f"  {name:<14s} AUC {r['auc']:.3f} [{lo:.3f}, {hi:.3f}]  "
                f"TPR@1% {r['tpr_at_1pct']:.3f}  TPR@0.1% {r['tpr_at_0.1pct']:.3f}")
    for k, v in res.skipped.items():
        c.print(f"  {k:<14s} not run: {v}")
    _done(out, seconds)
    return 0


# ----------------------------------------------------------------------------- extract


def _extract_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="an llmlab run folder (or a HF GPT-2 folder with --train-data)")
    p.add_argument("--train-data", help="the training text to check against (default: the run's train split)")
    p.add_argument("--reference", help="a reference model (run or HF folder) for the reference-ratio metric")
    p.add_argument("--samples", type=int, default=200, help="samples to generate (default 200)")
    p.add_argument("--length", type=int, default=128, help="new tokens per sample (default 128)")
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--prefixes", default="empty", help="empty (default), train, val, or a text file of prefixes")
    p.add_argument("--prefix-tokens", type=int, default=16)
    p.add_argument("-k", type=int, default=32, help="verbatim training tokens that count as memorised (default 32)")
    p.add_argument("--min-distinct", type=int, default=5, help="a verbatim span needs this many distinct tokens "
                   "to count (leaves out runs like '=====')")
    p.add_argument("--window", type=int, default=32, help="window of the sliding-window metric (default 32)")
    p.add_argument("--top", type=int, default=100, help="precision is measured on each metric's top N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="report folder (default runs/privacy/extract-<time>)")


def cmd_extract(a: argparse.Namespace) -> int:

    timer = _Timer()
    out = _out(a, "extract")
    cfg = ExtractConfig(samples=a.samples, length=a.length, top_k=a.top_k, temperature=a.temperature,
                        prefixes=a.prefixes, prefix_tokens=a.prefix_tokens, k=a.k, min_distinct=a.min_distinct,
                        window=a.window, top=a.top,
                        seed=a.seed)
    splits = None
    if a.train_data:
        train = _read_docs(a.train_data, "--train-data")
    else:
        splits = run_splits(a.run)
        train = splits.train
    prefix_docs: list[str] = []
    if a.prefixes in ("train", "val"):
        splits = splits or run_splits(a.run)
        prefix_docs = splits.train if a.prefixes == "train" else splits.val
    elif a.prefixes != "empty":
        prefix_docs = _read_docs(a.prefixes, "--prefixes")
    wb = _load_wb(a.run)
    ref = _load_wb(a.reference) if a.reference else None
    with PrivacyProgress() as progress:
        res = run_extract(wb, train, cfg, reference=ref, prefix_docs=prefix_docs, callback=progress)
    seconds = timer()
    rows = [[m, round(p, 3)] for m, p in res.precision.items()]
    top = min(cfg.top, res.n_unique)
    sections = [Section(f"Precision of the top {top} per metric",
                        f"{res.n_unique} unique samples of {res.n_samples}; {res.memorised_fraction:.1%} contain "
                        f">= {cfg.k} verbatim training tokens (n-gram index of {res.index_ngrams:,} windows).",
                        ["metric", "precision"], rows)]
    mem_rows = [[i + 1, m["verbatim_tokens"], min(m["rank"].values()), m["verbatim_text"][:200]]
                for i, m in enumerate(res.memorised[:50])]
    sections.append(Section("Memorised samples", "The verbatim training text inside each memorised sample.",
                            ["#", "verbatim tokens", "best rank", "verbatim text"], mem_rows))
    best_ppl = sorted(res.samples, key=lambda r: r["rank"]["perplexity"])[:10]
    sections.append(Section("Lowest-perplexity samples", "", ["rank", "memorised", "sample"],
                            [[r["rank"]["perplexity"], r["memorised"], r["text"][:200]] for r in best_ppl],
                            raw_html=""))
    data = {"run": a.run, "n_samples": res.n_samples, "n_unique": res.n_unique, "index_ngrams": res.index_ngrams,
            "memorised_fraction": res.memorised_fraction, "precision": res.precision, "memorised": res.memorised,
            "samples": res.samples, "seconds": seconds}
    summary = (f"{len(res.memorised)} memorised samples of {res.n_unique}; top-{top} precision: "
               + ", ".join(f"{m} {p:.2f}" for m, p in res.precision.items()))
    write_report(out, "privacy extract", data, sections, summary, {**dataclasses.asdict(cfg),
                 "reference": a.reference, "train_data": a.train_data}, model=a.run)
    c = console()
    c.print(summary, markup=False)
    for m in res.memorised[:5]:
        c.print(f"  [{m['verbatim_tokens']} tokens] {m['verbatim_text'][:100]!r}", markup=False)
    _done(out, seconds)
    return 0


# ----------------------------------------------------------------------------- compare


def _compare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("baseline", help="the undefended run or canary experiment folder")
    p.add_argument("defended", help="the defended run or canary experiment folder")
    p.add_argument("--canaries", help="canaries.json (default: the one next to the baseline)")
    p.add_argument("--estimate", action="store_true", help="estimate exposure instead of exact ranks")
    p.add_argument("--max-docs", type=int, default=200)
    p.add_argument("--neighbours", type=int, default=8)
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="report folder (default runs/privacy/compare-<time>)")


def cmd_compare(a: argparse.Namespace) -> int:

    timer = _Timer()
    out = _out(a, "compare")
    for p in (a.baseline, a.defended):
        if not Path(p).is_dir():
            raise LlmlabError(f"{p} is not a folder; give a run folder or a `llmlab privacy canary` --out folder")
    mcfg = MIAConfig(max_docs=a.max_docs, neighbours=a.neighbours, bootstrap=a.bootstrap, seed=a.seed)
    with PrivacyProgress() as progress:
        res = compare_runs(a.baseline, a.defended, a.canaries, mcfg, estimate=a.estimate, callback=progress)
    seconds = timer()
    sections = []
    if res.exposure:
        figs = {"exposure before and after": figure_png(plot_exposure(
            {"baseline": res.exposures["baseline"], "defended": res.exposures["defended"]}))}
        sections.append(Section("Canary exposure", "Exposure of the same canaries in both models (bits).",
                                ["secret", "repeats", "before", "after", "change"],
                                [[e["secret"], e["repeats"], round(e["before"], 2), round(e["after"], 2),
                                  round(e["change"], 2)] for e in res.exposure], figs))
    sections.append(Section("Membership inference", "ROC AUC and TPR at 1% FPR of each attack.",
                            ["attack", "AUC before", "AUC after", "TPR@1% before", "TPR@1% after"],
                            [[m["attack"], round(m["auc_before"], 4), round(m["auc_after"], 4),
                              round(m["tpr@1%_before"], 4), round(m["tpr@1%_after"], 4)] for m in res.mia]))
    eps = (res.defended.get("dp") or {}).get("epsilon")
    sections.append(Section("Utility cost", "Mean token loss on the baseline's validation split.",
                            ["", "value"], [["val loss before", round(res.val_loss["before"], 4)],
                                            ["val loss after", round(res.val_loss["after"], 4)],
                                            ["cost (nats/token)", round(res.val_loss["cost"], 4)],
                                            ["perplexity ratio", round(res.val_loss["cost_ppl_ratio"], 4)],
                                            ["epsilon (defended)", eps if eps is not None else "-"]]))

    for label in ("baseline", "defended"):
        sections[-1].figures[f"ROC {label}"] = figure_png(plot_roc(res.attacks[label], label))
    top = max(res.exposure, key=lambda e: e["repeats"]) if res.exposure else None
    loss_auc = {m["attack"]: m for m in res.mia}.get("loss")
    summary = ", ".join(filter(None, [
        f"x{top['repeats']} canary exposure {top['before']:.1f} -> {top['after']:.1f}" if top else "",
        f"loss-attack AUC {loss_auc['auc_before']:.3f} -> {loss_auc['auc_after']:.3f}" if loss_auc else "",
        f"val loss {res.val_loss['before']:.3f} -> {res.val_loss['after']:.3f}",
        f"epsilon {eps:.2f}" if eps is not None else ""]))
    data = {"baseline": res.baseline, "defended": res.defended, "exposure": res.exposure, "mia": res.mia,
            "val_loss": res.val_loss, "exposures": res.exposures,
            "attacks": {k: {"n_members": v.n_members, "n_nonmembers": v.n_nonmembers, "attacks": v.attacks}
                        for k, v in res.attacks.items()}, "seconds": seconds}
    write_report(out, "privacy compare", data, sections, summary,
                 {"baseline": a.baseline, "defended": a.defended, **dataclasses.asdict(mcfg)},
                 model=res.defended["run"])
    console().print(summary, markup=False)
    _done(out, seconds)
    return 0


# ----------------------------------------------------------------------------- dedup


def _dedup_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="the corpus (file, folder, glob or JSONL; default: the built-in one)")
    p.add_argument("--text-field", default="text")
    p.add_argument("--mode", default="both", choices=["exact", "near", "both"])
    p.add_argument("--min-line-chars", type=int, default=8, help="shortest line that counts as a duplicate")
    p.add_argument("--threshold", type=float, default=0.8, help="near-duplicate Jaccard threshold (default 0.8)")
    p.add_argument("--ngram", type=int, default=5, help="word n-gram shingles for MinHash (default 5)")
    p.add_argument("--num-perm", type=int, default=128, help="MinHash permutations (default 128)")
    p.add_argument("--out", help="folder for corpus.jsonl and the report (default runs/privacy/dedup-<time>)")


def cmd_dedup(a: argparse.Namespace) -> int:

    timer = _Timer()
    out = _out(a, "dedup")
    if not 0 < a.threshold <= 1:
        raise LlmlabError(f"--threshold must be in (0, 1], got {a.threshold}")
    docs = load_corpus(a.data, a.text_field)
    with PrivacyProgress() as progress:
        kept, info = dedup_docs(docs, a.mode, a.min_line_chars, a.threshold, a.ngram, a.num_perm, callback=progress)
    kept = [d for d in kept if d.strip()]
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "corpus.jsonl", "".join(json.dumps({"text": d}) + "\n" for d in kept).encode())
    info["docs_out"] = len(kept)
    seconds = timer()
    rows = [[k, v] for k, v in info.items() if k != "most_repeated_lines"]
    reps = info.get("most_repeated_lines", [])
    sections = [Section("Deduplication", f"wrote {out / 'corpus.jsonl'}; train on it with "
                        f"`llmlab train --data {out / 'corpus.jsonl'}`", ["", "value"], rows)]
    if reps:
        sections.append(Section("Most repeated lines", "", ["copies", "line"],
                                [[r["copies"], r["line"][:160]] for r in reps]))
    summary = (f"{info['docs_in']} -> {len(kept)} documents, {info['chars_removed_fraction']:.1%} of the characters "
               "removed")
    write_report(out, "privacy dedup", {**info, "seconds": seconds}, sections, summary,
                 {k: v for k, v in vars(a).items() if k != "func" and not callable(v)})
    console().print(summary, markup=False)
    _done(out, seconds)
    return 0


# ----------------------------------------------------------------------------- the verb


COMMANDS = {
    "canary": (_canary_args, cmd_canary, "insert canaries, train, and measure their exposure (Carlini et al. 2019)"),
    "extract": (_extract_args, cmd_extract, "generate samples and find memorised training text (Carlini et al. 2021)"),
    "mia": (_mia_args, cmd_mia, "membership-inference attacks with ROC AUC and TPR at low FPR (MIMIR)"),
    "compare": (_compare_args, cmd_compare, "exposure, MIA AUC and val loss of a baseline vs a defended run"),
    "dedup": (_dedup_args, cmd_dedup, "deduplicate a corpus (exact lines/documents + MinHash near duplicates)"),
}


def _args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="privacy_cmd", metavar="COMMAND", required=True)
    for name, (add, _fn, help_) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        add(sp)


@verb("privacy", "privacy lab: canaries, extraction, membership inference, defences", _args)
def cmd_privacy(a: argparse.Namespace) -> int:
    return COMMANDS[a.privacy_cmd][1](a)
