"""`llmlab align goodhart|sft|rm|dpo|bon`: how LLMs are tuned, and how optimising a proxy goes wrong.

    llmlab align goodhart --quick                        the Goodhart lab at toy size (one seed, a few minutes)
    llmlab align sft --data demos.jsonl --out runs/sft   supervised fine-tuning ({"prompt", "completion"})
    llmlab align rm --data pairs.jsonl --base runs/sft --out runs/rm     a reward model (Bradley-Terry)
    llmlab align dpo --data pairs.jsonl --base runs/sft --beta 0.1 --loss ipo --out runs/dpo
    llmlab align bon --policy runs/sft --reward runs/rm --prompts prompts.jsonl --n 1,4,16,64

Preference pairs are TRL's JSONL ({"prompt", "chosen", "rejected"} per line)."""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any

from llmlab.cli.common import ProgressRenderer, console, name_list, number_list, set_pairs, verb
from llmlab.errors import LlmlabError

OPTIMISERS = ("bon", "dpo", "rl")
REWARDS = ("proxy", "control")
LOSSES = ("sigmoid", "robust", "ipo", "hinge")


def _train_flags(p: argparse.ArgumentParser, iters: int) -> None:
    p.add_argument("--out", required=True, help="the new run folder (must not exist or be empty)")
    p.add_argument("--max-iters", type=int, default=iters, help=f"training steps (default {iters})")
    p.add_argument("--lr", type=float, help="learning rate (default 5e-4)")
    p.add_argument("--batch-size", type=int, help="pairs or examples per step (default 16)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any model or training field, e.g. --set val_fraction=0.2")


def _add_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="align_cmd", metavar="COMMAND")
    g = sub.add_parser("goodhart", help="optimise against a flawed proxy reward with the gold reward in view",
                       description="Train a small policy (SFT) and a proxy reward model on gold-labelled pairs with "
                                   "label noise and a planted \"!\", then optimise against the proxy (and, as the "
                                   "control, against the gold reward) with best-of-n, DPO and REINFORCE + KL, "
                                   "measuring proxy and gold reward against KL with Gao et al.'s fits.")
    g.add_argument("--quick", action="store_true", help="the toy size: one seed, a few minutes on 2 cores")
    g.add_argument("--out", help="experiment folder (default runs/align/goodhart-<time>); run again to reuse its "
                                 "finished runs")
    g.add_argument("--seeds", help="seeds, comma-separated (default 0,1,2; quick 0)")
    g.add_argument("--optimisers", help=f"comma-separated from {', '.join(OPTIMISERS)} (default all)")
    g.add_argument("--rewards", help=f"comma-separated from {', '.join(REWARDS)} (default both; control = the gold "
                                     "reward itself)")
    g.add_argument("--ns", help="best-of-n sizes, comma-separated, with 1 (default 1,2,4,...,256; quick up to 64)")
    g.add_argument("--betas", help="DPO betas, comma-separated, each > 0 (default 0.1,0.5; quick 0.1)")
    g.add_argument("--kl-coefs", help="RL KL coefficients, comma-separated, each >= 0 (default 0,0.1)")
    g.add_argument("--label-noise", type=float, help="share of the proxy's training pairs flipped (default 0.2)")
    g.add_argument("--spurious-rate", type=float, help="share of pairs whose preferred answer is made to end "
                                                       "with \"!\" (default 0.7)")
    s = sub.add_parser("sft", help="supervised fine-tuning on demonstrations ({\"prompt\", \"completion\"} JSONL)")
    s.add_argument("--data", required=True, help="JSONL of {\"prompt\": ..., \"completion\": ...}")
    s.add_argument("--base", help="a decoder run to start from (default: a fresh tiny decoder, char tokenizer)")
    _train_flags(s, 500)
    r = sub.add_parser("rm", help="train a reward model (scalar head, Bradley-Terry loss) on preference pairs")
    r.add_argument("--data", required=True, help="JSONL of {\"prompt\": ..., \"chosen\": ..., \"rejected\": ...}")
    r.add_argument("--base", help="the decoder run to start from (usually the SFT run; default: a fresh decoder)")
    r.add_argument("--margin", type=float, default=0.0, help="Bradley-Terry margin added to every pair (default 0)")
    _train_flags(r, 300)
    d = sub.add_parser("dpo", help="DPO / cDPO / IPO / hinge on preference pairs against a frozen reference")
    d.add_argument("--data", required=True, help="JSONL of {\"prompt\": ..., \"chosen\": ..., \"rejected\": ...}")
    d.add_argument("--base", required=True, help="the policy to tune (an SFT run)")
    d.add_argument("--ref", help="the reference model (default: the base); must share the base's tokenizer")
    d.add_argument("--beta", type=float, default=0.1, help="KL strength beta > 0 (default 0.1)")
    d.add_argument("--loss", choices=LOSSES, default="sigmoid", help="sigmoid (DPO), robust (rDPO), ipo or hinge")
    d.add_argument("--label-smoothing", type=float, default=0.0,
                   help="the label-noise rate of cDPO (sigmoid) or rDPO (robust)")
    _train_flags(d, 300)
    b = sub.add_parser("bon", help="best-of-n sampling against a reward model: reward and KL for each n")
    b.add_argument("--policy", required=True, help="the policy run to sample from")
    b.add_argument("--reward", required=True, help="the reward-model run that picks the best")
    b.add_argument("--prompts", required=True, help="JSONL with a \"prompt\" field per line")
    b.add_argument("--n", default="1,2,4,8,16", help="sizes, comma-separated (default 1,2,4,8,16)")
    b.add_argument("--max-new-tokens", type=int, default=32)
    b.add_argument("--limit", type=int, help="use the first N prompts")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--batch-size", type=int, default=4096, help="rows decoded together (1 = one at a time)")


def _out(a: argparse.Namespace) -> Path:
    return Path(a.out) if a.out else Path("runs") / "align" / f"goodhart-{time.strftime('%Y%m%d-%H%M%S')}"


def _goodhart(a: argparse.Namespace) -> int:
    from llmlab.labs.align.lab import LabConfig, run
    from llmlab.labs.align.report import lab_summary, write_lab_report

    base = LabConfig.quick_config() if a.quick else LabConfig()
    kw: dict[str, Any] = {}
    if a.seeds:
        kw["seeds"] = number_list(a.seeds, "--seeds")
    if a.optimisers:
        kw["optimisers"] = name_list(a.optimisers, "--optimisers", OPTIMISERS)
    if a.rewards:
        kw["rewards"] = name_list(a.rewards, "--rewards", REWARDS)
    if a.ns:
        kw["bon_ns"] = number_list(a.ns, "--ns", example="1,4,16")
    if a.betas:
        kw["dpo_betas"] = number_list(a.betas, "--betas", float, "0.1,0.5")
    if a.kl_coefs:
        kw["rl_kl"] = number_list(a.kl_coefs, "--kl-coefs", float, "0,0.1")
    task = base.task
    for flag, name in (("label_noise", "label_noise"), ("spurious_rate", "spurious_rate")):
        v = getattr(a, flag)
        if v is not None:
            if not 0.0 <= v <= 1.0:
                raise LlmlabError(f"--{flag.replace('_', '-')} must be between 0 and 1, got {v}")
            task = dataclasses.replace(task, **{name: v})
    cfg = dataclasses.replace(base, task=task, **kw)
    cfg.validate()
    out = _out(a)
    with ProgressRenderer() as pr:
        result = run(cfg, None, pr, out)
    write_lab_report(result, out)
    c = console()
    c.print(lab_summary(result), markup=False)
    c.print(f"report: {out / 'report.html'}  ({result.seconds:.0f} s; list with: llmlab report {out})")
    return 0


def _overrides(a: argparse.Namespace) -> dict[str, Any]:
    ov = {**set_pairs(a.set), "max_iters": a.max_iters}
    if a.lr is not None:
        ov["lr"] = a.lr
        ov.setdefault("min_lr", a.lr / 10)
    if a.batch_size is not None:
        ov["batch_size"] = a.batch_size
    if a.max_iters < 1:
        raise LlmlabError(f"--max-iters must be at least 1, got {a.max_iters}")
    return ov


def _train_cmd(a: argparse.Namespace) -> int:
    from llmlab.labs.align import tune

    with ProgressRenderer() as pr:
        if a.align_cmd == "sft":
            res = tune.train_sft(a.data, a.out, a.base, _overrides(a), pr)
        elif a.align_cmd == "rm":
            res = tune.train_reward_model(a.data, a.out, a.base, a.margin, _overrides(a), pr)
        else:
            if not a.beta > 0:
                raise LlmlabError(f"--beta must be > 0 (the strength of the KL penalty), got {a.beta}")
            res = tune.train_dpo(a.data, a.out, a.base, a.ref, a.beta, a.loss, a.label_smoothing, _overrides(a), pr)
    c = console()
    for s in res.samples[:3]:
        c.print(s, markup=False)
    c.print(f"run: {res.run}  (val loss {res.val_loss:.4f}, {res.elapsed:.0f} s)", markup=False)
    return 0


def _bon(a: argparse.Namespace) -> int:
    from rich.table import Table

    from llmlab.labs.align.tune import best_of_n
    from llmlab.train.preference import load_policy, load_reward_model
    from llmlab.train.reinforce import read_prompts

    ns = number_list(a.n, "--n", example="1,4,16")
    if any(n < 1 for n in ns) or max(ns) > 4096:
        raise LlmlabError(f"--n {a.n!r}: sizes must be between 1 and 4096")
    if a.batch_size < 1:
        raise LlmlabError(f"--batch-size must be at least 1, got {a.batch_size}")
    prompts = read_prompts(a.prompts)[:a.limit] if a.limit else read_prompts(a.prompts)
    policy = load_policy(a.policy, "--policy")
    rm = load_reward_model(a.reward)
    res = best_of_n(policy, rm, prompts, ns, a.max_new_tokens, seed=a.seed, batch_size=a.batch_size)
    t = Table(title=f"best-of-n on {len(prompts)} prompts ({res.samples_per_s:.0f} samples/s, "
                    f"{res.scores_per_s:.0f} scores/s)")
    for col in ("n", "reward (mean)", "KL exact on the pool", "log n - (n-1)/n", "best answer (first prompt)"):
        t.add_column(col)
    for i, n in enumerate(res.ns):
        t.add_row(str(n), f"{res.reward[i]:.4f}", f"{res.kl[i]:.3f}", f"{res.kl_analytic[i]:.3f}",
                  repr(res.best[i][0]))
    console().print(t)
    return 0


def _run(a: argparse.Namespace) -> int:
    cmd = getattr(a, "align_cmd", None)
    if cmd == "goodhart":
        return _goodhart(a)
    if cmd in ("sft", "rm", "dpo"):
        return _train_cmd(a)
    if cmd == "bon":
        return _bon(a)
    raise LlmlabError("give a command: goodhart (the lab; start with its quick size), sft, rm, dpo or bon; see "
                      "`llmlab align --help`")


cmd_align = verb("align", "tuning and its failure: reward models, best-of-n, DPO, RL and the Goodhart lab",
                 _add_args)(_run)
