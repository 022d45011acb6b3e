"""Verbs of the encoder and encoder-decoder families: `llmlab finetune classify`, `llmlab classify`,
`llmlab dataset`. (`llmlab train --arch bert|seq2seq` is in cli/train.py, `llmlab generate` on a seq2seq run in
cli/models.py.)"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from llmlab.cli.common import ProgressRenderer, console, resume_overrides, verb
from llmlab.datasets import GENERATORS, make_dataset, write_dataset
from llmlab.errors import LlmlabError
from llmlab.train.classify import classify, make_finetune_config
from llmlab.train.loop import load_run_for_resume, train

# ----------------------------------------------------------------------------- finetune


def _finetune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("kind", choices=["classify"], help="what to fine-tune for (classify: sequence classification)")
    p.add_argument("--base", help="the encoder to start from: an llmlab run trained with `llmlab train --arch bert`, "
                                  "or minilm")
    p.add_argument("--data", help="CSV (with a header) or JSONL of examples with a text and a label")
    p.add_argument("--out", help="the run folder (default runs/classify-<timestamp>)")
    p.add_argument("--resume", metavar="RUN", help="continue a fine-tune from its last checkpoint")
    p.add_argument("--text-field", default=None, help="column / field of the text (default text)")
    p.add_argument("--label-field", default=None, help="column / field of the label (default label)")
    p.add_argument("--val-fraction", type=float, default=None, help="held-out fraction per class (default 0.2)")
    p.add_argument("--max-iters", type=int, default=None, help="optimizer steps (default 300)")
    p.add_argument("--max-time", type=float, default=None, help="seconds of training (default: no limit)")
    p.add_argument("--batch-size", type=int, default=None, help="examples per step (default 16)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 1e-4)")
    p.add_argument("--max-len", type=int, default=None, help="tokens kept per text (default 128)")
    p.add_argument("--label-smoothing", type=float, default=None)
    p.add_argument("--eval-interval", type=int, default=None, help="steps between evaluations (default 50)")
    p.add_argument("--log-interval", type=int, default=None, help="steps between loss lines (default 10)")
    p.add_argument("--checkpoint-every", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")


@verb("finetune", "fine-tune an encoder (an llmlab encoder run or minilm) as a text classifier", _finetune_args)
def cmd_finetune(a: argparse.Namespace) -> int:
    names = ("text_field", "label_field", "val_fraction", "max_iters", "max_time", "batch_size", "lr", "max_len",
             "label_smoothing", "eval_interval", "log_interval", "checkpoint_every", "seed", "threads")
    overrides = {k: getattr(a, k) for k in names if getattr(a, k) is not None}
    if a.resume:
        cfg = load_run_for_resume(a.resume)
        if cfg.train.task != "classify":
            raise LlmlabError(f"{a.resume} is not a classification fine-tune; resume it with "
                              f"`llmlab train --resume {a.resume}`")
        cfg = resume_overrides(cfg, {**overrides, "base": a.base, "data": a.data})
        run = Path(a.resume)
    else:
        if not a.base:
            raise LlmlabError("give the encoder to fine-tune with --base (an llmlab run trained with "
                              "`llmlab train --arch bert`, or minilm)")
        if not a.data:
            raise LlmlabError("give the labelled examples with --data FILE (CSV or JSONL with text and label; "
                              "`llmlab dataset pydoc-topics --out topics.csv` makes one)")
        cfg = make_finetune_config(a.base, a.data, overrides)
        run = Path(a.out) if a.out else Path("runs") / f"classify-{time.strftime('%Y%m%d-%H%M%S')}"
        if run.exists() and any(run.iterdir()):
            raise LlmlabError(f"{run} already exists and is not empty; resume it with --resume {run} or choose "
                              "another --out")
    with ProgressRenderer() as progress:
        result = train(cfg, run, resume=bool(a.resume), callback=progress)
    c = console()
    ev_path = run / "eval.json"
    if ev_path.is_file():
        ev = json.loads(ev_path.read_text())
        c.print(f"[bold]done[/] after {result.step} steps, {result.elapsed:.0f} s: held-out accuracy "
                f"{ev['accuracy']:.3f}, macro-F1 {ev['macro_f1']:.3f} on {ev['n_val']} examples "
                f"(majority class {ev['chance_accuracy']:.3f})")
        c.print(f"confusion matrix: {run / 'confusion.png'}   figures: {ev_path}")
    c.print(f"run folder: {run}  (use it: llmlab classify {run} \"some text\")")
    return 0


# ----------------------------------------------------------------------------- classify


def _classify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a run folder made by `llmlab finetune classify`")
    p.add_argument("text", nargs="+", help="the text(s) to classify")
    p.add_argument("--top", type=int, default=5, help="how many classes to list per text (default 5)")
    p.add_argument("--json", action="store_true", help='print [{"text", "label", "probabilities"}]')


@verb("classify", "label a text with a fine-tuned classifier and show the class probabilities", _classify_args)
def cmd_classify(a: argparse.Namespace) -> int:

    results = classify(a.run, a.text)
    if a.json:
        print(json.dumps([{"text": t, **r} for t, r in zip(a.text, results)]))
        return 0
    c = console()
    for t, r in zip(a.text, results):
        c.print(f"[bold]{r['label']}[/]  ({r['probabilities'][r['label']]:.3f})  <- {t[:80]!r}", markup=True)
        ranked = sorted(r["probabilities"].items(), key=lambda kv: -kv[1])[: a.top]
        for label, p in ranked:
            c.print(f"  {p:6.3f}  {'#' * int(round(p * 30)):<30s}  {label}", markup=False)
    return 0


# ----------------------------------------------------------------------------- dataset


def _dataset_args(p: argparse.ArgumentParser) -> None:

    p.add_argument("name", choices=sorted(GENERATORS), help="which data set to write")
    p.add_argument("--out", required=True, help="the file to write (.csv or .jsonl)")
    p.add_argument("--seed", type=int, default=0, help="shuffling / sampling seed (default 0)")
    p.add_argument("--sections", type=int, help="pydoc-*: keep the N largest sections (default 8 / 20)")
    p.add_argument("--level", choices=["topic", "subsection"], help="pydoc-*: label by page title or nearest heading")
    p.add_argument("--max-chars", type=int, help="pydoc-*: cut paragraphs to this many characters")
    p.add_argument("-n", type=int, help="reverse-words / sort-words: number of examples (default 2000)")
    p.add_argument("--min-len", type=int, help="reverse-words / sort-words: fewest words per list (default 3)")
    p.add_argument("--max-len", type=int, help="reverse-words / sort-words: most words per list (default 8)")
    p.add_argument("--vocab", type=int, help="reverse-words / sort-words: distinct words (default 20)")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")


@verb("dataset", "write a built-in offline data set (pydoc topics or titles, reverse / sort words)", _dataset_args)
def cmd_dataset(a: argparse.Namespace) -> int:
    from collections import Counter


    out = Path(a.out)
    if out.suffix.lower() not in (".csv", ".jsonl"):
        raise LlmlabError(f"--out {out}: name the file .csv or .jsonl")
    if out.exists() and not a.force:
        raise LlmlabError(f"{out} already exists; choose another --out or pass --force")
    kw: dict = {"seed": a.seed}
    if a.name.startswith("pydoc"):
        for k in ("sections", "level", "max_chars"):
            v = getattr(a, k)
            if v is not None:
                kw["n_sections" if k == "sections" else k] = v
    else:
        for k, name in (("n", "n"), ("min_len", "min_len"), ("max_len", "max_len"), ("vocab", "vocab")):
            v = getattr(a, k)
            if v is not None:
                kw[name] = v
    rows = make_dataset(a.name, **kw)
    write_dataset(rows, out)
    c = console()
    c.print(f"wrote {len(rows)} examples to {out}")
    key = "label" if "label" in rows[0] else "target"
    if a.name.startswith("pydoc"):
        counts = Counter(r[key] for r in rows)
        c.print(f"{len(counts)} {'labels' if key == 'label' else 'distinct targets'}: "
                + ", ".join(f"{k} ({n})" for k, n in counts.most_common(8)), markup=False)
    else:
        c.print(f"example: {rows[0]['source']!r} -> {rows[0]['target']!r}", markup=False)
    return 0
