"""Reinforcement learning from a reward: REINFORCE with a per-token KL penalty to the reference model and the
reward-model score at the last token (the objective of Ziegler et al. 2019; the leave-one-out baseline of
Ahmadian et al. 2024, RLOO, instead of PPO's value function and clipping, which do not fit a 2-core budget).

For k sampled responses y_1..y_k of a prompt x, with per-token KL estimates kl_t = log pi(y_t) - log pi_ref(y_t):

    R_i = r(x, y_i) - kl_coef * sum_t kl_t            (penalised return, no discount)
    A_i = R_i - mean_{j != i} R_j                       (leave-one-out baseline)
    loss = -mean_i A_i * sum_t log pi(y_i,t)            (REINFORCE, Williams 1992)

Responses are sampled inside the loss from the current policy (the trainer's loop sees an ordinary
objective). Data: a JSONL file of {"prompt": ...} lines (or any file with a "prompt" field). Settings in
model.extra.align: reward ("fn:NAME" of a registered reward function, or a reward-model run folder),
kl_coef (default 0.05), samples (k, default 4), max_new_tokens (default 24), temperature (default 1), ref
(default the base)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from llmlab.config import ModelConfig
from llmlab.data import read_jsonl
from llmlab.errors import ConfigError, DataError
from llmlab.runtime import unwrap
from llmlab.train.preference import (
    RewardFn,
    TunedObjective,
    check_same_tokenizer,
    load_policy,
    load_reward_model,
    prompt_ids_for,
    response_batch,
    response_text,
    sample_ids,
    split_rows,
    token_logps,
)

REWARD_FUNCTIONS: dict[str, RewardFn] = {}


def register_reward(name: str, fn: RewardFn) -> None:
    """Make a Python reward function (prompts, responses) -> rewards (N,) usable as reward "fn:NAME"."""
    REWARD_FUNCTIONS[name] = fn


def resolve_reward(spec: str) -> RewardFn:
    """A reward function from "fn:NAME" (registered) or a reward-model run folder."""
    if spec.startswith("fn:"):
        name = spec[3:]
        if name not in REWARD_FUNCTIONS:
            known = ", ".join(REWARD_FUNCTIONS) or "none"
            raise ConfigError(f"no reward function {name!r} is registered (known: {known})")
        return REWARD_FUNCTIONS[name]
    return load_reward_model(spec)


def read_prompts(path: str | Path) -> list[str]:
    rows = [obj["prompt"] for _, obj in read_jsonl(path, ("prompt",), '{"prompt": ...}')]
    if len(rows) < 2 or not all(isinstance(p, str) for p in rows):
        raise DataError(f"{path}: give at least 2 lines with a string \"prompt\"")
    return rows


class ReinforceObjective(TunedObjective):
    """REINFORCE + per-token KL penalty against a reward function, policy from --base."""

    name = "reinforce"

    def setup(self, run: Path, resume: bool) -> ModelConfig:
        t = self.cfg.train
        if not t.data:
            raise ConfigError("give the prompts with --data FILE.jsonl ({\"prompt\": ...} per line)")
        if not t.base and not resume:
            raise ConfigError("reinforce tunes an existing policy: give it with --base RUN (an SFT run)")
        prompts = read_prompts(t.data)
        s = self.cfg.model.extra.get("align", {})
        if not s.get("reward"):
            raise ConfigError("give the reward: a reward-model run folder, or fn:NAME of a registered function")
        self.kl_coef = float(s.get("kl_coef", 0.05))
        self.k = int(s.get("samples", 4))
        self.max_new = int(s.get("max_new_tokens", 24))
        self.temperature = float(s.get("temperature", 1.0))
        if self.kl_coef < 0 or self.k < 2 or self.max_new < 1 or self.temperature <= 0:
            raise ConfigError("kl_coef must be >= 0, samples >= 2, max_new_tokens >= 1 and temperature > 0")
        self.reward = resolve_reward(str(s["reward"]))
        self.train_prompts, self.val_prompts = split_rows(prompts, t.val_fraction, t.seed)
        mcfg = self.setup_model(run, resume, [])
        ref_path = self.settings.get("ref") or t.base
        self.settings.update(ref=ref_path, kl_coef=self.kl_coef, samples=self.k, max_new_tokens=self.max_new,
                             temperature=self.temperature, reward=str(s["reward"]))
        mcfg = mcfg.replace(extra={**mcfg.extra, "align": self.settings})
        if self.base_model is not None and ref_path == t.base:
            self.ref = self.base_model
        else:
            self.ref = load_policy(ref_path, "ref")
            check_same_tokenizer(self.tokenizer, self.ref.tokenizer, "the policy", f"the reference {ref_path}")
        self.ref.eval()
        self.base_model = None
        self.train_enc = prompt_ids_for(self.tokenizer, self.train_prompts, self.block, self.max_new)
        self.val_enc = prompt_ids_for(self.tokenizer, self.val_prompts, self.block, self.max_new)
        self.gen = torch.Generator().manual_seed(t.seed + 1)
        self.stats: dict[str, float] = {}
        return mcfg

    def data_info(self) -> dict[str, Any]:
        return {"source": self.cfg.train.data, "task": "reinforce", "train_prompts": len(self.train_enc),
                "val_prompts": len(self.val_enc), "kl_coef": self.kl_coef, "samples": self.k}

    def next_batch(self) -> list[int]:
        return self.pick(len(self.train_enc))

    def batch_tokens(self, batch: list[int]) -> int:
        return sum(len(self.train_enc[i]) + self.max_new for i in batch) * self.k

    def rollout(self, model: torch.nn.Module, enc: list[list[int]], idx: list[int], k: int, seed: int | None
                ) -> dict[str, Any]:
        """Sample k responses per prompt from the policy; their rewards, per-token KL to the reference and
        the batch needed for the policy gradient."""
        m = unwrap(model)
        was = m.training
        m.eval()
        prompts = [enc[i] for i in idx for _ in range(k)]
        resp = sample_ids(m, prompts, self.max_new, self.temperature, seed, tokenizer=self.tokenizer)
        m.train(was)
        eos = self.tokenizer.eos_id
        resp = [r or [eos if eos is not None else self.pad_id] for r in resp]
        ids, mask = response_batch(prompts, resp, self.pad_id)
        with torch.no_grad():
            ref_lp = token_logps(self.ref, ids, mask)
        tok = self.tokenizer
        texts = [response_text(tok, r) for r in resp]
        ptexts = [tok.decode(p) for p in prompts]
        r = self.reward(ptexts, texts).float().clone()  # a normal tensor (reward models score in inference mode)
        return {"ids": ids, "mask": mask, "ref_lp": ref_lp, "reward": r, "texts": texts}

    def loss(self, model: torch.nn.Module, batch: list[int]) -> torch.Tensor:
        self.init_from_base(model)
        ro = self.rollout(model, self.train_enc, batch, self.k, None)
        lp = token_logps(model, ro["ids"], ro["mask"])  # (B, T-1)
        kl = (lp.detach() - ro["ref_lp"]).sum(-1)
        R = (ro["reward"] - self.kl_coef * kl).view(-1, self.k)
        baseline = (R.sum(1, keepdim=True) - R) / (self.k - 1)
        adv = (R - baseline).reshape(-1)
        self.stats = {"reward": ro["reward"].mean().item(), "kl": kl.mean().item()}
        return -(adv * lp.sum(-1)).mean()

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        self.init_from_base(model)
        out = {}
        for split, enc in (("train", self.train_enc[:32]), ("val", self.val_enc[:32])):
            ro = self.rollout(model, enc, list(range(len(enc))), 2, self.cfg.train.seed + 7)
            kl = (token_logps(model, ro["ids"], ro["mask"]) - ro["ref_lp"]).sum(-1)
            out[split] = -(ro["reward"] - self.kl_coef * kl).mean().item()  # minus the penalised return
            out[f"{split}_reward"] = ro["reward"].mean().item()
            out[f"{split}_kl"] = kl.mean().item()
        return out
