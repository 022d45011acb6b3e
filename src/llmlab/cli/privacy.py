"""`llmlab privacy canary|extract|mia|compare|dedup`: the privacy lab from the shell. Each sub-command
parses its flags, runs the experiment and writes its report with llmlab.security.privacy.report
(report.json, report.html and report.md in --out), then prints a summary."""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any

from llmlab.cli.common import (
    ProgressRenderer,
    add_config_overrides,
    config_overrides,
    console,
    number_list,
    set_pairs,
    verb,
)
from llmlab.data import load_corpus
from llmlab.errors import LlmlabError
from llmlab.progress import message
from llmlab.security.privacy.canary import (
    DEFAULT_FORMAT,
    CanaryConfig,
    CanaryFormat,
    find_canaries,
    load_canaries,
    measure_exposure,
    resume_canary_experiment,
    run_canary_experiment,
)
from llmlab.security.privacy.common import run_splits
from llmlab.security.privacy.compare import compare_runs, train_equal_steps_baseline
from llmlab.security.privacy.dedup import dedup_docs
from llmlab.security.privacy.extract import ExtractConfig, run_extract
from llmlab.security.privacy.mia import ATTACKS, MIAConfig, blind_warning, overlap_fraction, run_mia
from llmlab.security.privacy.report import (
    canary_summary,
    compare_summary,
    dedup_summary,
    extract_summary,
    write_canary_report,
    write_compare_report,
    write_dedup_report,
    write_extract_report,
    write_mia_report,
)
from llmlab.security.targets import WhiteBox

DEFENCES = ("none", "dedup", "dp")


def _out(a: argparse.Namespace, kind: str) -> Path:
    return Path(a.out) if a.out else Path("runs") / "privacy" / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"






def _file_args(p: argparse.ArgumentParser) -> None:
    """How the document files given on the command line are read."""
    p.add_argument("--text-field", default="text", help="the field holding the text in JSONL files (default text)")
    p.add_argument("--encoding-errors", default="strict", choices=["strict", "replace", "ignore"],
                   help="what to do with bytes that are not UTF-8 (default strict: refuse the file)")


def _read_docs(path: str, flag: str, a: argparse.Namespace) -> list[str]:
    if not Path(path).exists():
        raise LlmlabError(f"{flag} {path}: no such file or folder")
    return load_corpus(path, a.text_field, a.encoding_errors, flag=flag)


def _done(out: Path, seconds: float) -> None:
    console().print(f"report: {out / 'report.html'}  ({seconds:.0f} s; list with: llmlab report {out})")


class _Timer:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0


# ----------------------------------------------------------------------------- canary

# the training settings the canary experiment chooses itself (the corpus, its split, a character
# tokenizer, the seed) or that belong to other objectives; every other model/training field is a flag
CANARY_FIXED = ("data", "text_field", "encoding_errors", "val_fraction", "split", "split_seed", "tokenizer",
                "vocab_size", "seed", "task",
                "max_iters", "arch", "mask_prob", "span_len", "label_smoothing", "base", "label_field", "max_len",
                "n_dec_layer", "scale_embeddings", "type_vocab_size", "n_classes", "mlm_head", "pooler")


def _canary_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", default=DEFAULT_FORMAT,
                   help="canary format; slots {d} digit, {l} lowercase letter, {L} uppercase letter "
                        f"(default {DEFAULT_FORMAT!r})")
    p.add_argument("--repeats", default="1,4,16,64", help="insertions of each canary (default 1,4,16,64)")
    p.add_argument("--per-count", type=int, default=3,
                   help="canaries per repetition count, so the curve shows a mean and a spread (default 3)")
    p.add_argument("--controls", type=int, default=3, help="never-inserted control canaries (default 3)")
    p.add_argument("--split", default="chunks", choices=["chunks", "random", "end"],
                   help="train/val split of the corpus: chunks (i.i.d. pieces of characters, default), random "
                        "(i.i.d. documents) or end (the corpus's tail, a shifted sample)")
    p.add_argument("--text-field", default="text", help="the field of a JSONL --data holding the text")
    p.add_argument("--encoding-errors", default="strict", choices=["strict", "replace", "ignore"],
                   help="what to do with bytes of --data that are not UTF-8")
    p.add_argument("--data", help="corpus to insert into (default: the built-in Python reference)")
    p.add_argument("--max-chars", type=int, default=100_000, help="use the first N characters (0 = all; "
                   "default 100000)")
    p.add_argument("--preset", default="tiny", help="model/training preset (default tiny)")
    p.add_argument("--max-iters", type=int, help="training steps (default 800)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any model or training field, e.g. --set n_layer=2 --set lr=3e-3 (the flags below "
                        "set them too)")
    p.add_argument("--run", help="measure this run (already trained on a canaried corpus) instead of training")
    p.add_argument("--resume", metavar="OUT", help="finish the experiment in this --out folder whose training was "
                   "stopped (Ctrl-C, SIGTERM, a kill): continue from its last checkpoint, then measure")
    p.add_argument("--canaries", help="canaries.json of the run given with --run (default: found next to it)")
    p.add_argument("--estimate", action="store_true", help="estimate exposure from a sample (skew-normal fit) "
                   "instead of scoring every candidate")
    p.add_argument("--samples", type=int, default=10000, help="sampled candidates for --estimate")
    p.add_argument("--beam", type=int, default=16, help="beam width of the extraction attack")
    p.add_argument("--defence", default="none", choices=DEFENCES,
                   help="train with a defence: dedup (exact + near duplicates) or dp (DP-SGD)")
    p.add_argument("--defense", dest="defence", choices=DEFENCES, default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)  # the older spelling
    _dp_args(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="experiment folder (default runs/privacy/canary-<time>)")
    add_config_overrides(p, skip=CANARY_FIXED)


def _dp_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("DP-SGD (with --defence dp)")
    g.add_argument("--noise-multiplier", type=float, default=1.0)
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="per-example clipping norm C")
    g.add_argument("--delta", type=float, default=1e-5)
    g.add_argument("--target-epsilon", type=float, default=0.0, help="pick the noise to spend this epsilon")


def _dp_config(a: argparse.Namespace) -> dict[str, Any]:
    return {"noise_multiplier": a.noise_multiplier, "max_grad_norm": a.max_grad_norm, "delta": a.delta,
            "target_epsilon": a.target_epsilon}


def cmd_canary(a: argparse.Namespace) -> int:
    timer = _Timer()
    out = _out(a, "canary")
    repeats = number_list(a.repeats, "--repeats", int, "1,4,16,64")
    CanaryFormat.parse(a.format)  # a bad format fails before anything else
    cfg = CanaryConfig(format=a.format, repeats=repeats, per_count=a.per_count, controls=a.controls, seed=a.seed,
                       data=a.data, split=a.split, text_field=a.text_field, encoding_errors=a.encoding_errors,
                       max_chars=a.max_chars, preset=a.preset, estimate=a.estimate, samples=a.samples, beam=a.beam,
                       defence=a.defence, dp=_dp_config(a))
    cfg.train.update({**({"max_iters": a.max_iters} if a.max_iters else {}), **config_overrides(a), **set_pairs(a.set)})
    if a.resume and a.run:
        raise LlmlabError("--resume finishes an experiment and --run measures a finished run; give one of them")
    with ProgressRenderer() as progress:
        if a.resume:
            out = Path(a.resume)
            exp = resume_canary_experiment(out, callback=progress)
            res = exp.exposure
            write_canary_report(exp, out, seconds=timer())
        elif a.run:
            cfile = a.canaries or find_canaries(a.run)
            if cfile is None:
                raise LlmlabError(f"no canaries.json next to {a.run}; give the canaries it was trained with, "
                                  "--canaries FILE")
            fmt, canaries = load_canaries(cfile)
            wb = WhiteBox.load(a.run)
            res = measure_exposure(wb, fmt, canaries, estimate=a.estimate, samples=a.samples, beam=a.beam,
                                   seed=a.seed, callback=progress)
            config = {"run": a.run, "canaries": str(cfile), "estimate": a.estimate, "samples": a.samples,
                      "beam": a.beam}
            write_canary_report(res, out, run=a.run, config=config, seconds=timer())
        else:
            exp = run_canary_experiment(cfg, out, callback=progress)
            res = exp.exposure
            write_canary_report(exp, out, seconds=timer())
    c = console()
    for e in sorted(res.canaries, key=lambda c: -c["repeats"]):
        c.print(f"  canary x{e['repeats']:<3d} {e['secret']}  exposure {e['exposure']:6.2f} / {res.max_exposure:.2f}"
                f"  greedy {'EXTRACTED' if e['greedy_extracted'] else '-'}  beam rank {e['beam_rank'] or '-'}",
                markup=False)
    c.print(canary_summary(res), markup=False)
    _done(out, timer())
    return 0


# ----------------------------------------------------------------------------- mia


def _mia_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="an llmlab run folder (members = its train split, non-members = its val split) "
                   "or a Hugging Face GPT-2 folder with --members/--nonmembers")
    p.add_argument("--members", help="a file/folder of member documents (default: the run's train split)")
    p.add_argument("--nonmembers", help="a file/folder of non-member documents (default: the run's val split)")
    _file_args(p)
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


def cmd_mia(a: argparse.Namespace) -> int:
    timer = _Timer()
    out = _out(a, "mia")
    attacks = tuple(x.strip() for x in a.attacks.split(",") if x.strip())
    cfg = MIAConfig(max_docs=a.max_docs, max_tokens=a.max_tokens, k=a.k, neighbours=a.neighbours,
                    bootstrap=a.bootstrap, seed=a.seed, attacks=attacks)
    if a.members and a.nonmembers:
        members, nonmembers, train = (_read_docs(a.members, "--members", a),
                                      _read_docs(a.nonmembers, "--nonmembers", a), None)
    else:
        splits = run_splits(a.run, fix="give --members FILE and --nonmembers FILE")
        train = splits.train
        members = _read_docs(a.members, "--members", a) if a.members else splits.train
        nonmembers = _read_docs(a.nonmembers, "--nonmembers", a) if a.nonmembers else splits.val
    wb = WhiteBox.load(a.run)
    ref = WhiteBox.load(a.reference) if a.reference else None
    overlap = None
    with ProgressRenderer() as progress:
        if a.nonmembers:
            overlap = overlap_fraction(nonmembers, train if train is not None else members, wb)
            if overlap > 0:
                msg = (f"{overlap:.1%} of the non-member documents in {a.nonmembers} overlap the training set; "
                       "remove them from the file, or pass --allow-overlap to score them anyway")
                if not a.allow_overlap:
                    raise LlmlabError(msg)
                message(progress, msg.split(";")[0], "warning")
        res = run_mia(wb, members, nonmembers, cfg, reference=ref, callback=progress)
    config = {**dataclasses.asdict(cfg), "members": a.members or "run train split",
              "nonmembers": a.nonmembers or "run val split", "reference": a.reference}
    write_mia_report(res, out, run=a.run, config=config, overlap=overlap, seconds=timer())
    c = console()
    for name, r in res.attacks.items():
        lo, hi = r["auc_ci"].get("low", float("nan")), r["auc_ci"].get("high", float("nan"))
        low = r.get("tpr_at_resolvable") or {}
        tprs = "  ".join(f"TPR@{label} {r[key]:.3f}" for key, label in (("tpr_at_1pct", "1%"),
                                                                        ("tpr_at_0.1pct", "0.1%"))
                         if r.get(key) is not None)
        if not tprs and low:
            tprs = f"TPR {low['tpr']:.3f} at {low['fpr']:.1%} FPR (the lowest FPR the non-members resolve)"
        c.print(f"  {name:<14s} AUC {r['auc']:.3f} [{lo:.3f}, {hi:.3f}]  {tprs}", markup=False)
    for k, v in res.skipped.items():
        c.print(f"  {k:<14s} not run: {v}", markup=False)
    warning = blind_warning(res)
    if warning:
        console(stderr=True).print(f"warning: {warning}", markup=False, soft_wrap=True)
    _done(out, timer())
    return 0


# ----------------------------------------------------------------------------- extract


def _extract_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="an llmlab run folder (or a HF GPT-2 folder with --train-data)")
    p.add_argument("--train-data", help="the training text to check against (default: the run's train split)")
    _file_args(p)
    p.add_argument("--reference", help="a reference model (run or HF folder) for the reference-ratio metric")
    p.add_argument("--samples", type=int, default=200, help="samples to generate (default 200)")
    p.add_argument("--length", type=int, default=128, help="new tokens per sample (default 128)")
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--prefixes", default="empty", help="empty (default), train, val, or a text file of prefixes")
    p.add_argument("--prefix-tokens", type=int, default=16)
    p.add_argument("--k-chars", type=int, default=50, help="verbatim training characters that count as memorised "
                   "(default 50; in tokens: scaled by the tokenizer's characters per token)")
    p.add_argument("-k", type=int, default=0, help="the same in tokens, instead of --k-chars (default 0: use "
                   "--k-chars)")
    p.add_argument("--canaries", help="canaries.json of a `llmlab privacy canary` experiment: a sample holding one of "
                   "its secrets is a leak (default: the one next to the run, if any)")
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
                        prefixes=a.prefixes, prefix_tokens=a.prefix_tokens, k_chars=a.k_chars, k=a.k,
                        min_distinct=a.min_distinct,
                        window=a.window, top=a.top, seed=a.seed)
    fix = "give the training text with --train-data FILE"
    splits = None
    if a.train_data:
        train = _read_docs(a.train_data, "--train-data", a)
    else:
        splits = run_splits(a.run, fix=fix)
        train = splits.train
    prefix_docs: list[str] = []
    if a.prefixes in ("train", "val"):
        splits = splits or run_splits(a.run, fix="give a file of prefixes with --prefixes FILE")
        prefix_docs = splits.train if a.prefixes == "train" else splits.val
    elif a.prefixes != "empty":
        prefix_docs = _read_docs(a.prefixes, "--prefixes", a)
    cfile = a.canaries or find_canaries(a.run)
    secrets = [c.secret for c in load_canaries(cfile)[1]] if cfile else []
    wb = WhiteBox.load(a.run)
    ref = WhiteBox.load(a.reference) if a.reference else None
    with ProgressRenderer() as progress:
        res = run_extract(wb, train, cfg, reference=ref, prefix_docs=prefix_docs, callback=progress,
                          canaries=secrets)
    write_extract_report(res, out, run=a.run, seconds=timer(),
                         config={**dataclasses.asdict(cfg), "reference": a.reference, "train_data": a.train_data,
                                 "canaries": str(cfile) if cfile else None})
    c = console()
    c.print(extract_summary(res), markup=False)
    for m in res.memorised[:5]:
        c.print(f"  [{m['verbatim_tokens']} tokens] {m['verbatim_text'][:100]!r}", markup=False)
    if res.note:
        c.print(f"note: {res.note}", markup=False)
    _done(out, timer())
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
    p.add_argument("--equal-steps", metavar="DIR",
                   help="first train, into DIR, a baseline without the defence for exactly as many steps as the "
                        "defended run, and compare against it instead of BASELINE's run")


def cmd_compare(a: argparse.Namespace) -> int:
    timer = _Timer()
    out = _out(a, "compare")
    for p in (a.baseline, a.defended):
        if not Path(p).is_dir():
            raise LlmlabError(f"{p} is not a folder; give a run folder or the folder of a "
                              "`llmlab privacy canary --out DIR` experiment")
    mcfg = MIAConfig(max_docs=a.max_docs, neighbours=a.neighbours, bootstrap=a.bootstrap, seed=a.seed)
    baseline = a.baseline
    canaries = a.canaries or find_canaries(Path(a.baseline)) or find_canaries(Path(a.baseline) / "run")
    with ProgressRenderer() as progress:
        if a.equal_steps:
            if Path(a.equal_steps).exists() and any(Path(a.equal_steps).iterdir()):
                raise LlmlabError(f"--equal-steps {a.equal_steps} exists and is not empty; name a new folder")
            baseline = str(train_equal_steps_baseline(a.defended, a.equal_steps, callback=progress))
        res = compare_runs(baseline, a.defended, canaries, mcfg, estimate=a.estimate, callback=progress)
    write_compare_report(res, out, seconds=timer(),
                         config={"baseline": a.baseline, "defended": a.defended, **dataclasses.asdict(mcfg)})
    console().print(compare_summary(res), markup=False)
    _done(out, timer())
    return 0


# ----------------------------------------------------------------------------- dedup


def _dedup_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="the corpus (file, folder, glob or JSONL; default: the built-in one)")
    _file_args(p)
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
    docs = load_corpus(a.data, a.text_field, a.encoding_errors)
    with ProgressRenderer() as progress:
        kept, info = dedup_docs(docs, a.mode, a.min_line_chars, a.threshold, a.ngram, a.num_perm, callback=progress)
    config = {k: v for k, v in vars(a).items() if k not in ("func", "verb", "privacy_cmd") and not callable(v)}
    write_dedup_report(kept, info, out, config=config, seconds=timer())
    console().print(dedup_summary(info), markup=False)
    _done(out, timer())
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
