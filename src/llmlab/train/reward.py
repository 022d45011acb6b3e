"""Reward models: a scalar head on a decoder, trained on preference pairs with the Bradley-Terry loss
(Ziegler et al. 2019, Ouyang et al. 2022), reported as accuracy on held-out pairs. Data: TRL's JSONL
({"prompt", "chosen", "rejected"}, an optional "margin"). The run's config records role "reward": it scores,
it is never used as a policy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from llmlab.checkpoint import atomic_write_json
from llmlab.config import ModelConfig
from llmlab.errors import ConfigError
from llmlab.runtime import autocast
from llmlab.train.preference import (
    TunedObjective,
    bradley_terry_loss,
    preference_metrics,
    read_pairs,
    reward_scores,
    split_rows,
)


class RewardObjective(TunedObjective):
    """Bradley-Terry loss -log sigmoid(r(x, y_c) - r(x, y_r) - margin) on preference pairs; the score is the
    output layer's end-of-text row at the last token (see preference.reward_scores). Settings in
    model.extra.align: margin (a constant added to every pair's, default 0; a pair's own "margin" field too)."""

    name = "reward"
    role = "reward"

    def setup(self, run: Path, resume: bool) -> ModelConfig:
        t = self.cfg.train
        if not t.data:
            raise ConfigError("give the preference pairs with --data FILE.jsonl "
                              "({\"prompt\": ..., \"chosen\": ..., \"rejected\": ...} per line)")
        rows = read_pairs(t.data)
        self.train_rows, self.val_rows = split_rows(rows, t.val_fraction, t.seed)
        texts = [r["prompt"] + r["chosen"] + r["rejected"] for r in self.train_rows]
        mcfg = self.setup_model(run, resume, texts)
        self.margin = float(self.settings.get("margin", 0.0))
        self.token = int(self.settings["head_token"])
        self.train_enc = [self._enc(r) for r in self.train_rows]
        self.val_enc = [self._enc(r) for r in self.val_rows]
        self.gen = torch.Generator().manual_seed(t.seed + 1)
        return mcfg

    def _enc(self, r: dict[str, Any]) -> tuple[list[int], list[int], float]:
        pc, c = self.encode(r["prompt"], r["chosen"])
        pr, rj = self.encode(r["prompt"], r["rejected"])
        return pc + c, pr + rj, self.margin + float(r.get("margin", 0.0))

    def data_info(self) -> dict[str, Any]:
        return {"source": self.cfg.train.data, "task": "reward", "train_pairs": len(self.train_enc),
                "val_pairs": len(self.val_enc)}

    def _batch(self, enc: list[tuple[list[int], list[int], float]], idx: list[int]
               ) -> tuple[list[list[int]], torch.Tensor]:
        seqs = [enc[i][0] for i in idx] + [enc[i][1] for i in idx]
        return seqs, torch.tensor([enc[i][2] for i in idx])

    def next_batch(self) -> tuple[list[list[int]], torch.Tensor]:
        return self._batch(self.train_enc, self.pick(len(self.train_enc)))

    def batch_tokens(self, batch: Any) -> int:
        return sum(len(s) for s in batch[0])

    def scores(self, model: torch.nn.Module, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        r = reward_scores(model, seqs, self.token, self.pad_id)
        n = len(seqs) // 2
        return r[:n], r[n:]

    def loss(self, model: torch.nn.Module, batch: tuple[list[list[int]], torch.Tensor]) -> torch.Tensor:
        self.init_from_base(model)
        rc, rr = self.scores(model, batch[0])
        m = batch[1]
        return bradley_terry_loss(rc, rr, m if bool((m != 0).any()) else None)

    def measure(self, model: torch.nn.Module, enc: list[tuple[list[int], list[int], float]]) -> dict[str, float]:
        """Loss, accuracy (chosen scored above rejected), mean chosen / rejected scores and margin."""
        bs = max(1, self.cfg.train.batch_size)
        cs, rs, ms = [], [], []
        for i in range(0, len(enc), bs):
            seqs, m = self._batch(enc, list(range(i, min(len(enc), i + bs))))
            with autocast(self.cfg.train.dtype):
                c, r = self.scores(model, seqs)
            cs.append(c.float())
            rs.append(r.float())
            ms.append(m)
        c, r, m = torch.cat(cs), torch.cat(rs), torch.cat(ms)
        return {"loss": bradley_terry_loss(c, r, m).item(), **preference_metrics(c, r)}

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        self.init_from_base(model)
        tr = self.measure(model, self.train_enc[:max(len(self.val_enc), 64)])
        va = self.measure(model, self.val_enc)
        return {"train": tr["loss"], "val": va["loss"], "val_accuracy": va["rewards/accuracies"],
                "train_accuracy": tr["rewards/accuracies"], "val_margin": va["rewards/margins"]}

    def finish(self, run: Path, best: torch.nn.Module) -> list[str]:
        with torch.no_grad():
            va = self.measure(best, self.val_enc)
        res = {"task": "reward", "val_pairs": len(self.val_enc), "val_accuracy": va["rewards/accuracies"],
               "val_loss": va["loss"], "val_margin": va["rewards/margins"], "head_token": self.token}
        atomic_write_json(run / "eval.json", res)
        return [f"reward model: accuracy {res['val_accuracy']:.3f} on {len(self.val_enc)} held-out pairs "
                f"(chance 0.5), Bradley-Terry loss {res['val_loss']:.4f}"]
