"""The Python calls behind `llmlab align sft|rm|dpo|bon`: each training call is a run of the one training loop
(objectives sft, reward, dpo, reinforce) into a new run folder; best_of_n samples and scores in batches.

    train_sft("demos.jsonl", "runs/sft")                                  {"prompt", "completion"} lines
    train_reward_model("pairs.jsonl", "runs/rm", base="runs/sft")         {"prompt", "chosen", "rejected"}
    train_dpo("pairs.jsonl", "runs/dpo", base="runs/sft", beta=0.1, loss_type="ipo")
    best_of_n("runs/sft", "runs/rm", prompts, ns=(1, 4, 16))

Bad input (a file without chosen/rejected, beta <= 0, a reference with another tokenizer, a reward model
given as a policy, an output folder already in use) is an LlmlabError with one line, before anything is
written."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmlab.errors import ConfigError, LlmlabError
from llmlab.labs.align.fit import bon_distribution, bon_kl_analytic
from llmlab.progress import Progress
from llmlab.train.config import RunConfig, resolve_config
from llmlab.train.dpo import check_dpo_settings
from llmlab.train.loop import TrainResult, existing_run_message, train
from llmlab.train.preference import (
    RewardFn,
    load_policy,
    load_reward_model,
    read_pairs,
    read_prompt_completions,
    role_of,
    sample_responses,
)

TUNE_DEFAULTS: dict[str, Any] = dict(batch_size=16, lr=5e-4, min_lr=5e-5, warmup_iters=20, max_iters=300,
                                     eval_interval=100, eval_iters=4, weight_decay=0.0, num_samples=0)


def _fresh(out: str | Path) -> Path:
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LlmlabError(existing_run_message(out))
    return out


def tune_config(task: str, data: str | Path, base: str | Path | None, align: dict[str, Any],
                overrides: dict[str, Any] | None = None) -> RunConfig:
    """The RunConfig of a tuning run: the tiny preset's shape (used only without a base), TUNE_DEFAULTS,
    then the overrides; alignment settings in model.extra.align."""
    ov = {**TUNE_DEFAULTS, "task": task, "data": str(data), "base": str(base or ""), **(overrides or {})}
    cfg = resolve_config("tiny", None, ov)
    return dataclasses.replace(cfg, model=cfg.model.replace(extra={"align": align}))


def _check_base(base: str | Path | None, what: str = "--base") -> None:
    if base:
        load_policy(base, what)  # refuses a reward model and non-decoders with one line


def train_sft(data: str | Path, out: str | Path, base: str | Path | None = None,
              overrides: dict[str, Any] | None = None, progress: Progress | None = None) -> TrainResult:
    """Supervised fine-tuning on {"prompt", "completion"} demonstrations (from `base`, or a fresh decoder)."""
    read_prompt_completions(data)
    _check_base(base)
    return train(tune_config("sft", data, base, {}, overrides), _fresh(out), callback=progress)


def train_reward_model(data: str | Path, out: str | Path, base: str | Path | None = None, margin: float = 0.0,
                       overrides: dict[str, Any] | None = None, progress: Progress | None = None) -> TrainResult:
    """A reward model (scalar head, Bradley-Terry loss) on {"prompt", "chosen", "rejected"} pairs; held-out
    accuracy in the run's eval.json."""
    read_pairs(data)
    _check_base(base)
    return train(tune_config("reward", data, base, {"margin": margin}, overrides), _fresh(out), callback=progress)


def train_dpo(data: str | Path, out: str | Path, base: str | Path, ref: str | Path | None = None, beta: float = 0.1,
              loss_type: str = "sigmoid", label_smoothing: float = 0.0, overrides: dict[str, Any] | None = None,
              progress: Progress | None = None) -> TrainResult:
    """DPO / cDPO / IPO / hinge on preference pairs: policy from `base`, frozen reference `ref` (default base)."""
    check_dpo_settings(beta, loss_type, label_smoothing)
    read_pairs(data)
    if not base:
        raise ConfigError("DPO tunes an existing policy: give it with --base RUN (an SFT run)")
    _check_base(base)
    if ref:
        _check_base(ref, "--ref")
    align = {"beta": beta, "loss_type": loss_type, **({"ref": str(ref)} if ref else {})}
    ov = {**(overrides or {}), "label_smoothing": label_smoothing}
    return train(tune_config("dpo", data, base, align, ov), _fresh(out), callback=progress)


def train_reinforce(prompts: str | Path, out: str | Path, base: str | Path, reward: str, kl_coef: float = 0.05,
                    samples: int = 4, max_new_tokens: int = 24, overrides: dict[str, Any] | None = None,
                    progress: Progress | None = None) -> TrainResult:
    """REINFORCE with a per-token KL penalty against `reward` (a reward-model run, or fn:NAME)."""
    if kl_coef < 0:
        raise ConfigError(f"kl_coef must be >= 0, got {kl_coef}")
    _check_base(base)
    align = {"reward": str(reward), "kl_coef": kl_coef, "samples": samples, "max_new_tokens": max_new_tokens}
    return train(tune_config("reinforce", prompts, base, align, overrides), _fresh(out), callback=progress)


@dataclass
class BoNResult:
    """Best-of-n on a pool of N samples per prompt (N = the largest n), exact on the pool."""

    ns: list[int]
    reward: list[float]  # mean over prompts of the expected reward of best-of-n
    kl: list[float]  # exact KL(best-of-n || pool) on the pool (ties counted)
    kl_analytic: list[float]  # log n - (n-1)/n
    best: list[list[str]]  # per prompt: the best of the first n samples, for each n
    prompts: list[str]
    samples_per_s: float
    scores_per_s: float
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


def best_of_n(policy: torch.nn.Module | str | Path, reward: RewardFn | str | Path, prompts: Sequence[str],
              ns: Sequence[int] = (1, 2, 4, 8, 16), max_new_tokens: int = 32, temperature: float = 1.0, seed: int = 0,
              batch_size: int = 4096) -> BoNResult:
    """Sample max(ns) responses per prompt (batched), score them all (batched), and report best-of-n for each n."""
    if not prompts:
        raise LlmlabError("give at least one prompt")
    if any(n < 1 for n in ns):
        raise LlmlabError("--n values must be >= 1")
    if not isinstance(policy, torch.nn.Module):
        policy = load_policy(policy, "--policy")
    elif role_of(policy) == "reward":
        raise LlmlabError("the policy is a reward model, not a policy; give the SFT (or base) model")
    if not callable(reward) or isinstance(reward, (str, Path)):
        reward = load_reward_model(reward)
    N = max(ns)
    t0 = time.perf_counter()
    texts = sample_responses(policy, list(prompts), N, max_new_tokens, temperature, seed, batch_size)
    t1 = time.perf_counter()
    flat_p = [p for p in prompts for _ in range(N)]
    scores = reward(flat_p, [t for ts in texts for t in ts]).float().numpy().reshape(len(prompts), N)
    t2 = time.perf_counter()
    rew, kls, best = [], [], []
    for n in ns:
        r, k = [], []
        for i in range(len(prompts)):
            q, kl = bon_distribution(scores[i], n)
            r.append(float(q @ scores[i]))
            k.append(kl)
        rew.append(float(np.mean(r)))
        kls.append(float(np.mean(k)))
        best.append([texts[i][int(np.argmax(scores[i][:n]))] for i in range(len(prompts))])
    total = len(prompts) * N
    return BoNResult(ns=list(ns), reward=rew, kl=kls, kl_analytic=[bon_kl_analytic(n) for n in ns], best=best,
                     prompts=list(prompts), samples_per_s=total / max(1e-9, t1 - t0),
                     scores_per_s=total / max(1e-9, t2 - t1), seconds=time.perf_counter() - t0)
