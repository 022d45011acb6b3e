"""Supervised fine-tuning on demonstrations (the first stage of InstructGPT, Ouyang et al. 2022): next-token
loss on the completion tokens only, from TRL's prompt-completion JSONL ({"prompt", "completion"} per line).
Starts from a decoder run (--base) or from a fresh decoder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from llmlab.checkpoint import atomic_write_bytes
from llmlab.config import ModelConfig
from llmlab.errors import ConfigError, DataError
from llmlab.runtime import autocast
from llmlab.train.objective import IGNORE
from llmlab.train.preference import (
    TunedObjective,
    read_prompt_completions,
    response_batch,
    sample_responses,
    split_rows,
)


class SFTObjective(TunedObjective):
    """Next-token loss on the completion (and its end-of-text token) of each demonstration."""

    name = "sft"

    def setup(self, run: Path, resume: bool) -> ModelConfig:
        t = self.cfg.train
        if not t.data:
            raise ConfigError("give the demonstrations with --data FILE.jsonl ({\"prompt\": ..., \"completion\": ...} "
                              "per line)")
        rows = read_prompt_completions(t.data)
        self.train_rows, self.val_rows = split_rows(rows, t.val_fraction, t.seed)
        mcfg = self.setup_model(run, resume, [r["prompt"] + r["completion"] for r in self.train_rows])
        self.train_enc = [self.encode(r["prompt"], r["completion"]) for r in self.train_rows]
        self.val_enc = [self.encode(r["prompt"], r["completion"]) for r in self.val_rows]
        if not self.train_enc:
            raise DataError(f"{t.data}: no demonstration left for training")
        self.gen = torch.Generator().manual_seed(t.seed + 1)
        return mcfg

    def data_info(self) -> dict[str, Any]:
        return {"source": self.cfg.train.data, "task": "sft", "train_examples": len(self.train_enc),
                "val_examples": len(self.val_enc)}

    def _batch(self, enc: list[tuple[list[int], list[int]]], idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = response_batch([enc[i][0] for i in idx], [enc[i][1] for i in idx], self.pad_id)
        y = torch.where(mask[:, 1:] == 1, ids[:, 1:], torch.full_like(ids[:, 1:], IGNORE))
        return ids[:, :-1], y

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._batch(self.train_enc, self.pick(len(self.train_enc)))

    def batch_tokens(self, batch: tuple[torch.Tensor, torch.Tensor]) -> int:
        return int((batch[1] != IGNORE).sum())

    def loss(self, model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        self.init_from_base(model)
        x, y = batch
        logits = model(x)
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), ignore_index=IGNORE)

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        self.init_from_base(model)
        out = {}
        bs = max(1, self.cfg.train.batch_size)
        for split, enc in (("train", self.train_enc[:len(self.val_enc) or 1]), ("val", self.val_enc)):
            losses, n = 0.0, 0
            for i in range(0, len(enc), bs):
                idx = list(range(i, min(len(enc), i + bs)))
                with autocast(self.cfg.train.dtype):
                    losses += self.loss(model, self._batch(enc, idx)).item() * len(idx)
                n += len(idx)
            out[split] = losses / max(1, n)
        return out

    def finish(self, run: Path, best: torch.nn.Module) -> list[str]:
        rows = self.val_rows[:8]
        if not rows:
            return []
        outs = sample_responses(best, [r["prompt"] for r in rows], 1, temperature=0.0, seed=self.cfg.train.seed,
                                max_new_tokens=min(64, self.cfg.train.sample_tokens))
        lines = [f"{r['prompt']!r} -> {o[0]!r} (demonstration {r['completion']!r})" for r, o in zip(rows, outs)]
        atomic_write_bytes(run / "samples.txt", ("\n".join(lines) + "\n").encode())
        return lines[:3]
