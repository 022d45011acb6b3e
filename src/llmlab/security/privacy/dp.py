"""DP-SGD (Abadi et al. 2016) through Opacus, as hooks on the one training loop (llmlab.train.loop.train)."""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmlab.checkpoint import read_run_config
from llmlab.errors import LlmlabError
from llmlab.security.privacy.common import Callback, PrivacyError
from llmlab.train.config import RunConfig
from llmlab.train.loop import train
from llmlab.train.objective import LoopHooks, Objective


@dataclass
class DPConfig:
    """DP-SGD settings. target_epsilon > 0 picks the noise multiplier that spends exactly that budget over
    the run's max_iters steps; otherwise noise_multiplier is used and the epsilon spent is reported."""

    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0
    delta: float = 1e-5
    target_epsilon: float = 0.0
    accountant: str = "rdp"


@dataclass
class DPResult:
    run: Path
    step: int
    train_loss: float
    val_loss: float
    best_val_loss: float
    elapsed: float
    epsilon: float
    delta: float
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    examples: int


class _Positions(torch.nn.Module):
    """Calls the GPT with explicit (B, T) position ids, so every module input has the batch first (Opacus
    computes per-example gradients from the first dimension)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(x.size(1), device=x.device).expand(x.size(0), -1)  # (B, T)
        return self.model(x, position_ids=pos)


@contextlib.contextmanager
def _quiet_opacus() -> Iterator[None]:
    """Without Opacus' notes that secure RNG is off (fine for experiments) and on backward hooks."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


class DPHooks(LoopHooks):
    """DP-SGD on the loop: each example is one non-overlapping window of block_size + 1 tokens of the
    train split; each step's batch is a Poisson sample of them (Opacus' sampler, rate q = 1 / ceil(N / B));
    every example's gradient g_i is clipped to g_i / max(1, ||g_i|| / C) and the update uses
    (sum_i clipped g_i + N(0, sigma^2 C^2 I)) / floor(q N) (Opacus' GradSampleModule and DPOptimizer, made
    by PrivacyEngine.make_private). The accountant counts every step, an empty batch's too, at that q; the
    "sample_rate" recorded is B / N, the rate a target epsilon's noise multiplier is resolved for.

    The accountant's history and the sampler's generator are saved in every checkpoint, so a resumed run
    spends the same epsilon, and takes the same steps, as one never stopped. config.json gets a "dp"
    section: the noise multiplier (resolved from target_epsilon once, when the run starts; a resumed run
    keeps it), clipping norm, delta, sample rate, examples, and at the end (or on an interruption) the
    epsilon spent and the steps taken."""

    label = " (DP-SGD)"
    clip_grad = False  # Opacus clips every example's gradient instead

    def __init__(self, dp: DPConfig):
        self.dp = dp
        self.info: dict[str, Any] = {}
        self.engine: Any = None
        self.examples = torch.empty(0, dtype=torch.long)
        self.batch_size = 1
        self.generator = torch.Generator()
        self._sampler: Any = None
        self._batches: Any = iter(())

    @classmethod
    def from_run(cls, run: str | Path) -> DPHooks:
        """The hooks of a DP run folder (its config.json's "dp" section), to resume it."""
        d = read_run_config(run).get("dp")
        if not d:
            raise PrivacyError(f"{run} was not trained with DP-SGD (no 'dp' section in its config.json)")
        return cls(dp_config_of(d))

    def prepare(self, objective: Objective, run: Path, resume: bool) -> dict[str, Any]:
        from opacus.accountants.utils import get_noise_multiplier

        cfg, dp = objective.cfg, self.dp
        t = cfg.train
        if objective.name != "lm" or cfg.model.arch != "gpt":
            raise PrivacyError("DP-SGD here trains decoder-only GPT runs (arch gpt, task lm)")
        if dp.max_grad_norm <= 0 or dp.delta <= 0 or dp.delta >= 1:
            raise PrivacyError("DP-SGD needs --max-grad-norm > 0 and 0 < --delta < 1")
        if objective.dist.world > 1:
            raise PrivacyError("DP-SGD here runs in one process; start it without torchrun")
        if t.grad_accum != 1:
            raise PrivacyError("DP-SGD draws one Poisson batch per step; set --grad-accum 1")
        if t.dtype == "bfloat16" or t.compile:
            raise PrivacyError("DP-SGD here trains in float32 without torch.compile; drop --dtype bfloat16 / --compile")
        corpus, block = objective.corpus, cfg.model.block_size
        ids = np.asarray(corpus.train, dtype=np.int64)
        n_ex = (len(ids) - 1) // block
        if n_ex < 2:
            raise PrivacyError(f"the train split has {len(ids)} tokens, too few for DP examples of {block + 1} "
                               "tokens; give more text or a smaller --block-size")
        self.examples = torch.from_numpy(np.stack([ids[i * block:i * block + block + 1] for i in range(n_ex)]))
        self.batch_size = t.batch_size
        self.generator.manual_seed(t.seed + 11)
        sample_rate = min(1.0, t.batch_size / n_ex)
        if resume:  # the noise chosen when the run started, whatever max_iters is now
            saved = read_run_config(run).get("dp") or {}
            sigma = float(saved.get("noise_multiplier", dp.noise_multiplier))
            target = float(saved.get("target_epsilon", dp.target_epsilon))
        else:
            sigma, target = dp.noise_multiplier, dp.target_epsilon
            if target > 0:
                with _quiet_opacus():
                    sigma = get_noise_multiplier(target_epsilon=target, target_delta=dp.delta,
                                                 sample_rate=sample_rate, steps=t.max_iters, accountant=dp.accountant)
        if sigma <= 0:
            raise PrivacyError("--noise-multiplier must be positive (0 gives no privacy); or set --target-epsilon")
        self.dp = dataclasses.replace(dp, noise_multiplier=sigma, target_epsilon=target)
        self.info = {"epsilon": 0.0, "delta": dp.delta, "noise_multiplier": sigma, "max_grad_norm": dp.max_grad_norm,
                     "sample_rate": sample_rate, "examples": n_ex, "steps": 0, "accountant": dp.accountant,
                     "target_epsilon": target, "unit": f"one window of {block + 1} tokens"}
        return {"dp": self.info}

    def wrap(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer
             ) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        from opacus import PrivacyEngine

        dp = self.dp
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(self.examples),
                                             batch_size=self.batch_size)
        with _quiet_opacus():
            self.engine = PrivacyEngine(accountant=dp.accountant)
            gsm, dp_opt, dp_loader = self.engine.make_private(
                module=_Positions(model), optimizer=optimizer, data_loader=loader, noise_multiplier=dp.noise_multiplier,
                max_grad_norm=dp.max_grad_norm, poisson_sampling=True)
        # Opacus' Poisson sampler, drawing from a generator of its own (saved in checkpoints) rather than
        # torch's global one; batches are taken from it directly, without a DataLoader iterator (which would
        # draw a seed from the global generator at every pass)
        self._sampler = dp_loader.batch_sampler
        self._sampler.generator = self.generator
        self._batches = iter(self._sampler)
        return gsm, dp_opt

    def load_state(self, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        acc = state.get("accountant")
        if acc is None or "sampler" not in tensors:
            raise PrivacyError("the checkpoint holds no DP accountant state (it was not written by a DP-SGD run); "
                               "resume it without DP-SGD")
        history = [tuple(h) for h in acc["history"]]
        self.engine.accountant.load_state_dict({"history": history, "mechanism": acc["mechanism"]})
        self.generator.set_state(tensors["sampler"])

    def next_batch(self, objective: Objective) -> tuple[torch.Tensor, torch.Tensor]:
        idx = next(self._batches, None)
        if idx is None:  # the sampler yields 1/q batches per pass; every batch is an independent draw
            self._batches = iter(self._sampler)
            idx = next(self._batches)
        batch = self.examples[torch.tensor(idx, dtype=torch.long)]  # (b, T+1); b = 0 happens, and still steps
        return batch[:, :-1], batch[:, 1:]

    def step_context(self) -> contextlib.AbstractContextManager[Any]:
        return _quiet_opacus()

    @property
    def epsilon(self) -> float:
        """Epsilon spent so far (at the run's delta)."""
        if self.engine is None or not self.engine.accountant.history:
            return 0.0
        with _quiet_opacus():  # its note that the best RDP order is the largest one it tries
            return float(self.engine.get_epsilon(self.dp.delta))

    @property
    def steps(self) -> int:
        return sum(int(h[2]) for h in self.engine.accountant.history) if self.engine is not None else 0

    def metrics(self) -> dict[str, float]:
        return {"epsilon": self.epsilon}

    def state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        acc = self.engine.accountant.state_dict()
        return ({"accountant": {"history": [list(h) for h in acc["history"]], "mechanism": acc["mechanism"]}},
                {"sampler": self.generator.get_state()})

    def config_update(self, step: int) -> dict[str, Any]:
        self.info = {**self.info, "epsilon": self.epsilon, "steps": step}
        return {"dp": self.info}


def dp_config_of(d: dict[str, Any]) -> DPConfig:
    """The DPConfig recorded in a run's "dp" section (its resolved noise multiplier)."""
    return DPConfig(noise_multiplier=float(d["noise_multiplier"]), max_grad_norm=float(d["max_grad_norm"]),
                    delta=float(d["delta"]), target_epsilon=float(d.get("target_epsilon", 0.0)),
                    accountant=d.get("accountant", "rdp"))


def is_dp_run(run: str | Path) -> bool:
    """Whether a run folder was trained with DP-SGD (its config.json has a "dp" section)."""
    try:
        return bool(read_run_config(run).get("dp"))
    except LlmlabError:  # not a run folder: not a DP run
        return False


def train_dp(cfg: RunConfig, run: str | Path, dp: DPConfig | None = None, callback: Callback | None = None,
             resume: bool = False) -> DPResult:
    """Train the run's GPT on its language-modelling data with DP-SGD (Abadi et al. 2016) via Opacus, through
    the one training loop (see DPHooks): the run folder is every run's (config.json with its "data" section,
    model.safetensors with the best weights by validation loss, tokenizer/, checkpoints/, metrics.jsonl with
    epsilon on every evaluation row, loss.png), plus a "dp" section; it can be resumed (resume=True, or
    `llmlab train --resume RUN`) with the DP settings it started with (then `dp` is not needed, and cfg is
    the run's own, from load_run_for_resume, with any of the changes resuming allows). Dropout is turned off
    and training runs in float32, as before."""
    run = Path(run)
    if resume:
        hooks = DPHooks.from_run(run)
    elif dp is None:
        raise PrivacyError("give the DP-SGD settings (a DPConfig) for a new DP run")
    else:
        hooks = DPHooks(dp)
    if cfg.model.dropout:
        cfg = dataclasses.replace(cfg, model=cfg.model.replace(dropout=0.0))
    if cfg.train.dtype != "float32":
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, dtype="float32"))
    r = train(cfg, run, resume=resume, callback=callback, hooks=hooks)
    return DPResult(run, r.step, r.train_loss, r.val_loss, r.best_val_loss, r.elapsed, hooks.epsilon,
                    hooks.dp.delta, hooks.dp.noise_multiplier, hooks.dp.max_grad_norm, hooks.info["sample_rate"],
                    hooks.info["examples"])
