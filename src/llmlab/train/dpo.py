"""Direct preference optimisation (Rafailov et al. 2023) and its variants (cDPO label smoothing, IPO, hinge):
tune a policy (--base, an SFT run) on preference pairs against a frozen reference (the base, or another run
with the same tokenizer), logging the implicit rewards, margins and accuracies as TRL does. The reference's
log-probabilities are computed once before training (they never change).

Settings in model.extra.align: beta (> 0, default 0.1), loss_type (sigmoid | robust | ipo | hinge), ref (a run folder;
default the base). TrainConfig.label_smoothing is cDPO's epsilon."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from llmlab.checkpoint import atomic_write_json
from llmlab.config import ModelConfig
from llmlab.errors import ConfigError
from llmlab.runtime import autocast
from llmlab.train.preference import (
    DPO_LOSSES,
    TunedObjective,
    check_same_tokenizer,
    dpo_loss,
    load_policy,
    preference_metrics,
    read_pairs,
    response_batch,
    sequence_logps,
    split_rows,
)

Enc = tuple[list[int], list[int], list[int]]  # prompt, chosen, rejected ids


def check_dpo_settings(beta: float, loss_type: str, label_smoothing: float = 0.0) -> None:
    """ConfigError for settings DPO cannot use (one line naming the setting)."""
    if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not beta > 0:
        raise ConfigError(f"beta must be > 0 (the strength of the KL penalty), got {beta}")
    if loss_type not in DPO_LOSSES:
        raise ConfigError(f"DPO loss {loss_type!r} is not one of {', '.join(DPO_LOSSES)}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ConfigError(f"label smoothing (cDPO) must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing and loss_type not in ("sigmoid", "robust"):
        raise ConfigError("label smoothing applies to the sigmoid (cDPO) and robust (rDPO) losses only")


class DPOObjective(TunedObjective):
    """The DPO family's loss on (prompt, chosen, rejected) pairs, policy from --base, reference frozen."""

    name = "dpo"

    def setup(self, run: Path, resume: bool) -> ModelConfig:
        t = self.cfg.train
        if not t.data:
            raise ConfigError("give the preference pairs with --data FILE.jsonl "
                              "({\"prompt\": ..., \"chosen\": ..., \"rejected\": ...} per line)")
        if not t.base and not resume:
            raise ConfigError("DPO tunes an existing policy: give it with --base RUN (an SFT run)")
        rows = read_pairs(t.data)
        s = self.cfg.model.extra.get("align", {})
        self.beta = float(s.get("beta", 0.1))
        self.loss_type = str(s.get("loss_type", "sigmoid"))
        check_dpo_settings(self.beta, self.loss_type, t.label_smoothing)
        self.train_rows, self.val_rows = split_rows(rows, t.val_fraction, t.seed)
        mcfg = self.setup_model(run, resume, [])
        ref_path = self.settings.get("ref") or t.base
        self.settings.update(beta=self.beta, loss_type=self.loss_type, ref=ref_path,
                             label_smoothing=t.label_smoothing)
        mcfg = mcfg.replace(extra={**mcfg.extra, "align": self.settings})
        if self.base_model is not None and ref_path == t.base:
            ref = self.base_model
        else:
            ref = load_policy(ref_path, "ref")
            check_same_tokenizer(self.tokenizer, ref.tokenizer, "the policy", f"the reference {ref_path}")
        ref.eval()
        self.average = self.loss_type == "ipo"  # IPO on mean token log-probabilities, as TRL computes it
        self.train_enc = [self._enc(r) for r in self.train_rows]
        self.val_enc = [self._enc(r) for r in self.val_rows]
        with torch.no_grad():
            self.train_ref = self._logps(ref, self.train_enc)
            self.val_ref = self._logps(ref, self.val_enc)
        self.base_model = None
        self.gen = torch.Generator().manual_seed(t.seed + 1)
        return mcfg

    def _enc(self, r: dict[str, Any]) -> Enc:
        p, c = self.encode(r["prompt"], r["chosen"])
        p2, rj = self.encode(r["prompt"], r["rejected"])
        p = p if len(p) <= len(p2) else p2  # the shorter cut fits both
        return p, c, rj

    def _pair_logps(self, model: torch.nn.Module, enc: list[Enc], idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        prompts = [enc[i][0] for i in idx] * 2
        resps = [enc[i][1] for i in idx] + [enc[i][2] for i in idx]
        ids, mask = response_batch(prompts, resps, self.pad_id)
        lp = sequence_logps(model, ids, mask, average=self.average)
        return lp[:len(idx)], lp[len(idx):]

    def _logps(self, model: torch.nn.Module, enc: list[Enc]) -> torch.Tensor:
        out = []
        bs = 64
        for i in range(0, len(enc), bs):
            c, r = self._pair_logps(model, enc, list(range(i, min(len(enc), i + bs))))
            out.append(torch.stack([c, r], 1))
        return torch.cat(out) if out else torch.zeros(0, 2)

    def data_info(self) -> dict[str, Any]:
        return {"source": self.cfg.train.data, "task": "dpo", "train_pairs": len(self.train_enc),
                "val_pairs": len(self.val_enc), "beta": self.beta, "loss_type": self.loss_type}

    def next_batch(self) -> list[int]:
        return self.pick(len(self.train_enc))

    def batch_tokens(self, batch: list[int]) -> int:
        return sum(len(self.train_enc[i][0]) * 2 + len(self.train_enc[i][1]) + len(self.train_enc[i][2]) for i in batch)

    def _losses(self, model: torch.nn.Module, enc: list[Enc], ref: torch.Tensor, idx: list[int]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        c, r = self._pair_logps(model, enc, idx)
        losses, rc, rr = dpo_loss(c, r, ref[idx, 0], ref[idx, 1], self.beta, self.loss_type,
                                  self.cfg.train.label_smoothing)
        return losses, rc, rr, c, r

    def loss(self, model: torch.nn.Module, batch: list[int]) -> torch.Tensor:
        self.init_from_base(model)
        return self._losses(model, self.train_enc, self.train_ref, batch)[0].mean()

    def measure(self, model: torch.nn.Module, enc: list[Enc], ref: torch.Tensor) -> dict[str, float]:
        """The loss and what TRL logs: rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins,
        logps/chosen, logps/rejected (means over the pairs)."""
        parts: list[list[torch.Tensor]] = [[], [], [], [], []]
        for i in range(0, len(enc), 64):
            with autocast(self.cfg.train.dtype):
                out = self._losses(model, enc, ref, list(range(i, min(len(enc), i + 64))))
            for p, o in zip(parts, out):
                p.append(o.detach().float())
        losses, rc, rr, c, r = (torch.cat(p) for p in parts)
        return {"loss": losses.mean().item(), **preference_metrics(rc, rr), "logps/chosen": c.mean().item(),
                "logps/rejected": r.mean().item()}

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        self.init_from_base(model)
        n = min(len(self.train_enc), max(64, len(self.val_enc)))
        tr = self.measure(model, self.train_enc[:n], self.train_ref[:n])
        va = self.measure(model, self.val_enc, self.val_ref)
        return {"train": tr["loss"], "val": va["loss"], "train_rewards_accuracies": tr["rewards/accuracies"],
                "train_rewards_margins": tr["rewards/margins"], "val_rewards_accuracies": va["rewards/accuracies"],
                "val_rewards_margins": va["rewards/margins"], "val_rewards_chosen": va["rewards/chosen"],
                "val_rewards_rejected": va["rewards/rejected"]}

    def finish(self, run: Path, best: torch.nn.Module) -> list[str]:
        with torch.no_grad():
            va = self.measure(best, self.val_enc, self.val_ref)
            n = min(len(self.train_enc), 256)
            tr = self.measure(best, self.train_enc[:n], self.train_ref[:n])
        atomic_write_json(run / "eval.json", {"task": "dpo", "beta": self.beta, "loss_type": self.loss_type,
                                              "val": va, "train": tr, "val_pairs": len(self.val_enc)})
        return [f"DPO ({self.loss_type}, beta {self.beta}): implicit-reward accuracy {va['rewards/accuracies']:.3f} "
                f"on {len(self.val_enc)} held-out pairs (train {tr['rewards/accuracies']:.3f}), margin "
                f"{va['rewards/margins']:.3f}"]
