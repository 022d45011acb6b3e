"""What a run learns (an Objective: its data, batches, loss, evaluation and end-of-run files), and its process group."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmlab.config import ModelConfig
from llmlab.data import train_tokenizer
from llmlab.tokenizers import load_tokenizer
from llmlab.train.config import RunConfig


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Dist:
    """Join the torchrun process group (gloo on CPU, nccl on GPU) when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


Callback = Callable[[str, dict[str, Any]], None]


class Objective:
    """What a run learns: its data and tokenizer, its batches, its loss, its evaluation, and what it leaves
    in the run folder at the end. The trainer's loop (optimizer, schedule, checkpoints, DDP) is shared."""

    name = "base"
    arch: str | None = None  # the model family it trains (checked before anything is written); None = any
    # whether dtype "auto" may pick bf16 autocast for this objective: only where a bf16 run has been measured
    # to end at float32's loss (the others keep float32 until they are)
    auto_bf16 = False

    def __init__(self, cfg: RunConfig, dist: Dist):
        self.cfg, self.dist = cfg, dist
        self.tokenizer: Any = None

    def setup(self, run: Path, resume: bool) -> ModelConfig:
        """Read the data, make the tokenizer; return the model config to build (vocab size set)."""
        raise NotImplementedError

    def data_info(self) -> dict[str, Any]:
        """What the run was trained on (written into config.json under "data")."""
        return {}

    def tokenizer_for(self, run: Path, resume: bool, train_docs: list[str], specials: Sequence[str] = ()) -> Any:
        """The run's saved tokenizer when resuming, else one of --tokenizer trained on the train split."""

        if resume and (run / "tokenizer").is_dir():
            return load_tokenizer(run / "tokenizer")
        t = self.cfg.train
        return train_tokenizer(t.tokenizer, train_docs, t.vocab_size, specials)

    def next_batch(self) -> Any:
        """This rank's next training micro-batch."""
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        raise NotImplementedError

    def batch_tokens(self, batch: Any) -> int:
        """Tokens in a micro-batch on this rank (for tokens/s)."""
        return int(batch[0].numel())

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Held-out figures; must contain "train" and "val" losses (model in eval mode, no grad)."""
        raise NotImplementedError

    def rng_state(self) -> torch.Tensor:
        raise NotImplementedError

    def set_rng_state(self, s: torch.Tensor) -> None:
        raise NotImplementedError

    def finish(self, run: Path, best: torch.nn.Module) -> list[str]:
        """Write end-of-run files (samples, eval.json) from the best model; return samples to print."""
        return []



class LoopHooks:
    """How a step is taken, where a training method changes it without changing what is learned (DP-SGD:
    Poisson batches, per-example clipping, noise, a privacy accountant). train(..., hooks=...) calls them in
    this order; the defaults leave the loop as it is, so LoopHooks() is the plain loop.

        prepare      after the objective's setup, before anything is written: check the run can use the
                     hooks; return extra top-level sections for config.json (e.g. {"dp": {...}})
        wrap         after a checkpoint (if resuming) is loaded into model and optimizer: return the module
                     the loss is computed through and the optimizer that steps (the loop keeps the plain
                     model for evaluation and checkpoints, and the plain optimizer for the learning rate)
        load_state   when resuming, after wrap: what state() saved in the checkpoint
        next_batch   each micro-batch
        step_context around each step (forward, backward, optimizer step)
        metrics      extra figures for each evaluation row of metrics.jsonl (e.g. epsilon)
        state        JSON state and tensors saved in every checkpoint
        config_update sections merged into config.json at the end of the run or when it is interrupted"""

    label = ""  # appended to the objective's name in the start event and the loss plot, e.g. " (DP-SGD)"
    clip_grad = True  # whether the loop clips the summed gradient to TrainConfig.grad_clip

    def prepare(self, objective: Objective, run: Path, resume: bool) -> dict[str, Any]:
        return {}

    def wrap(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer
             ) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        return model, optimizer

    def load_state(self, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        pass

    def next_batch(self, objective: Objective) -> Any:
        return objective.next_batch()

    def step_context(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def metrics(self) -> dict[str, float]:
        return {}

    def state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return {}, {}

    def config_update(self, step: int) -> dict[str, Any]:
        return {}


IGNORE = -100


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
