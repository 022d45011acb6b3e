"""Preference tuning's pieces, written from the papers: the Bradley-Terry reward-model loss, the DPO family
(DPO, cDPO label smoothing, IPO, hinge) with the implicit rewards TRL logs, per-token log-probabilities of
responses, reward-model scores, and the preference data (JSONL in TRL's shape: prompt, chosen, rejected).

Every trainer objective of alignment (sft, reward, dpo, reinforce) and the Goodhart lab use these."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from llmlab.config import ModelConfig
from llmlab.data import read_jsonl
from llmlab.errors import ConfigError, DataError, ModelLoadError
from llmlab.runtime import unwrap
from llmlab.tokenizers import load_tokenizer
from llmlab.train.objective import Objective

DPO_LOSSES = ("sigmoid", "robust", "ipo", "hinge")

# the role a run plays, stored in its config.json under model.extra.align.role
ROLES = ("policy", "reward")

RewardFn = Callable[[Sequence[str], Sequence[str]], torch.Tensor]  # (prompts, responses) -> rewards (N,)


# ----------------------------------------------------------------------------- losses


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor,
                       margin: torch.Tensor | float | None = None) -> torch.Tensor:
    """The reward-model loss: mean of -log sigmoid(r_chosen - r_rejected - m).

    Bradley & Terry (1952)'s model P(chosen > rejected) = sigmoid(r_c - r_r), fitted by maximum likelihood
    as in Ziegler et al. (2019) and Ouyang et al. (2022); the optional margin m (Touvron et al. 2023, Llama 2)
    asks the chosen to win by at least m. TRL's RewardTrainer computes the same."""
    d = r_chosen - r_rejected
    if margin is not None:
        d = d - margin
    return -F.logsigmoid(d).mean()


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float = 0.1,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair losses (B,), chosen rewards (B,), rejected rewards (B,)) of the direct preference losses.

    With h = [log pi(y_c) - log pi(y_r)] - [log pi_ref(y_c) - log pi_ref(y_r)] (the log-ratio difference):

        sigmoid  DPO (Rafailov et al. 2023):      -log sigmoid(beta h)
                 with label smoothing eps (cDPO, Mitchell 2023: the label is wrong with probability eps):
                                                  -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
        robust   rDPO (Chowdhury et al. 2024), an unbiased loss under label flips with probability eps:
                 [-(1 - eps) log sigmoid(beta h) + eps log sigmoid(-beta h)] / (1 - 2 eps)
        ipo      IPO (Azar et al. 2023):          (h - 1 / (2 beta))^2
        hinge    SLiC-style hinge (Zhao et al. 2023): max(0, 1 - beta h)

    The implicit rewards are beta (log pi(y) - log pi_ref(y)) (DPO's reparameterisation), detached, as TRL
    logs them (rewards/chosen, rewards/rejected; accuracies and margins come from preference_metrics). TRL 1.16
    computes sigmoid, robust, IPO (on length-averaged log-probabilities) and hinge alike (tested); its sigmoid
    loss no longer takes cDPO's label smoothing, which is checked against the formula."""
    if beta <= 0:
        raise ConfigError(f"beta must be > 0, got {beta}")
    if loss_type not in DPO_LOSSES:
        raise ConfigError(f"loss_type {loss_type!r} is not one of {', '.join(DPO_LOSSES)}")
    h = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        losses = (-(1 - label_smoothing) * F.logsigmoid(beta * h) + label_smoothing * F.logsigmoid(-beta * h)) \
            / (1 - 2 * label_smoothing)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        losses = torch.relu(1 - beta * h)
    chosen = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen, rejected


def preference_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, prefix: str = "rewards/"
                       ) -> dict[str, float]:
    """What TRL logs of (implicit or reward-model) rewards: means of the chosen and rejected rewards, the
    share of pairs where the chosen one is higher (accuracies) and the mean margin."""
    c, r = chosen_rewards.detach().float(), rejected_rewards.detach().float()
    return {f"{prefix}chosen": c.mean().item(), f"{prefix}rejected": r.mean().item(),
            f"{prefix}accuracies": (c > r).float().mean().item(), f"{prefix}margins": (c - r).mean().item()}


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) (B, T) by generalised advantage estimation (Schulman et al. 2016):
    delta_t = r_t + gamma V_{t+1} - V_t, A_t = sum_k (gamma lam)^k delta_{t+k}, returns = A + V;
    positions where mask is 0 (after the end of a response) count as terminal."""
    B, T = rewards.shape
    adv = torch.zeros_like(rewards)
    last = torch.zeros(B, dtype=rewards.dtype)
    m = mask.to(rewards.dtype)
    for t in reversed(range(T)):
        nxt = values[:, t + 1] * m[:, t + 1] if t + 1 < T else torch.zeros(B, dtype=rewards.dtype)
        delta = rewards[:, t] + gamma * nxt - values[:, t]
        last = (delta + gamma * lam * last * (m[:, t + 1] if t + 1 < T else 0)) * m[:, t]
        adv[:, t] = last
    return adv, adv + values


def ppo_losses(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, values: torch.Tensor,
               old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float = 0.2,
               clip_value: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """(policy loss, value loss) of PPO (Schulman et al. 2017) over the masked tokens:
    policy  mean max(-A ratio, -A clip(ratio, 1 - clip, 1 + clip)), ratio = exp(logp - old_logp);
    value   mean 0.5 max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2) (the clipped value loss of
    Ziegler et al. 2019's implementation)."""
    m = mask.to(logp.dtype)
    n = m.sum().clamp(min=1)
    ratio = torch.exp(logp - old_logp)
    pg = torch.max(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip))
    vc = old_values + (values - old_values).clamp(-clip_value, clip_value)
    vl = 0.5 * torch.max((values - returns) ** 2, (vc - returns) ** 2)
    return (pg * m).sum() / n, (vl * m).sum() / n


# ----------------------------------------------------------------------------- token log-probabilities


def response_batch(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, T), response mask (B, T)) of prompt + response, right-padded; the mask is 1 on response
    tokens (the targets whose log-probability counts)."""
    seqs = [list(p) + list(r) for p, r in zip(prompts, responses)]
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, (p, s) in enumerate(zip(prompts, seqs)):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, len(p):len(s)] = 1
    return ids, mask


def token_logps(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log p(token_t | tokens before t) (B, T-1) of each target token ids[:, 1:], zero where mask[:, 1:] is 0."""
    logits = model(ids[:, :-1]).float()  # (B, T-1, V)
    lp = torch.gather(logits.log_softmax(-1), 2, ids[:, 1:, None]).squeeze(2)
    return lp * mask[:, 1:].to(lp.dtype)


def sequence_logps(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, average: bool = False
                   ) -> torch.Tensor:
    """Sum (or mean, with average) over the response tokens of their log-probabilities (B,)."""
    lp = token_logps(model, ids, mask).sum(-1)
    if average:
        lp = lp / mask[:, 1:].sum(-1).clamp(min=1)
    return lp


# ----------------------------------------------------------------------------- reward models


def head_token(tok: Any) -> int:
    """The output-layer row a reward model reads its score from: the end-of-text token (else padding, else 0)."""
    for t in (tok.eos_id, tok.pad_id):
        if t is not None:
            return int(t)
    return 0


def encode_pair_text(tok: Any, prompt: str, response: str, block: int) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids + end-of-text) for a text pair, the prompt cut from the left to fit block."""
    p = tok.encode(prompt)
    r = tok.encode(response) + ([tok.eos_id] if tok.eos_id is not None else [])
    r = r[:max(1, block // 2)]
    p = p[-(block - len(r)):] if len(p) + len(r) > block else p
    return p, r


def reward_scores(model: torch.nn.Module, seqs: Sequence[Sequence[int]], token: int, pad_id: int = 0
                  ) -> torch.Tensor:
    """Scalar scores (N,) of a reward model for token sequences: the output layer's row `token` at each
    sequence's last position, r = w . h_T (the scalar head on the final token of Ziegler et al. 2019 and
    Ouyang et al. 2022; here the head's weight vector w is one row of the decoder's output layer). Left-
    padded, so the last position is every row's own last token."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    am = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, T - len(s):] = torch.tensor(list(s), dtype=torch.long)
        am[i, T - len(s):] = 1
    padded = bool((am == 0).any())
    out = model(ids, attention_mask=am if padded else None, last_only=True)  # (N, 1, V)
    return out[:, 0, token].float()


class RewardModel:
    """A trained reward-model run as a reward function: rm(prompts, responses) -> scores (N,), batched."""

    def __init__(self, model: torch.nn.Module, batch_size: int = 512):
        self.model, self.tok = model, model.tokenizer
        self.token = int(model.config.extra.get("align", {}).get("head_token", head_token(self.tok)))
        self.batch_size = batch_size
        self.block = model.config.block_size

    @torch.inference_mode()
    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        out = []
        pad = self.tok.pad_id if self.tok.pad_id is not None else 0
        for i in range(0, len(prompts), self.batch_size):
            seqs = []
            for p, r in zip(prompts[i:i + self.batch_size], responses[i:i + self.batch_size]):
                a, b = encode_pair_text(self.tok, p, r, self.block)
                seqs.append(a + b)
            out.append(reward_scores(self.model, seqs, self.token, pad))
        return torch.cat(out) if out else torch.zeros(0)


def role_of(model_or_cfg: Any) -> str:
    """'reward' for a reward-model run, else 'policy'."""
    cfg = getattr(model_or_cfg, "config", model_or_cfg)
    return str(cfg.extra.get("align", {}).get("role", "policy"))


def load_reward_model(path: str | Path) -> RewardModel:
    """A reward-model run folder as a reward function (anything else is refused with one line)."""
    from llmlab.interop import load

    m = load(path)
    if role_of(m) != "reward":
        raise ModelLoadError(f"{path} is not a reward model (train one with `llmlab align rm`)")
    return RewardModel(m)


def load_policy(path: str | Path, what: str = "--policy") -> torch.nn.Module:
    """A decoder to sample from or tune: refuses a reward-model run and non-decoder models (one line each)."""
    from llmlab.interop import load

    m = load(path)
    if role_of(m) == "reward":
        raise ModelLoadError(f"{what} {path} is a reward model, not a policy: its output layer was trained to "
                             "score, not to write; give the SFT (or base) model it was trained from")
    if m.config.arch != "gpt":
        raise ModelLoadError(f"{what} {path} is a {m.config.arch} model; preference tuning needs a decoder (gpt)")
    if m.tokenizer is None:
        raise ModelLoadError(f"{what} {path} has no tokenizer; give a run folder made by llmlab train")
    return m


def tokenizer_fingerprint(tok: Any) -> tuple[Any, ...]:
    """What must agree for two models to share token ids: the vocabulary size, the special ids, and the ids of a
    probe text."""
    probe = "The quick brown fox! 0123 colour? <|endoftext|>"
    return (tok.vocab_size, tok.eos_id, tok.pad_id, tuple(tok.encode(probe)))


def check_same_tokenizer(a: Any, b: Any, what_a: str, what_b: str) -> None:
    """ConfigError when two tokenizers give different ids (a reference model must share the policy's)."""
    if tokenizer_fingerprint(a) != tokenizer_fingerprint(b):
        raise ConfigError(f"{what_b} has a different tokenizer from {what_a} (vocabularies of {b.vocab_size} and "
                          f"{a.vocab_size} tokens, or other ids): their log-probabilities cannot be compared; give "
                          f"a reference made from the same base as the policy")


# ----------------------------------------------------------------------------- data


PAIR_EXAMPLE = '{"prompt": ..., "chosen": ..., "rejected": ...}'
SFT_EXAMPLE = '{"prompt": ..., "completion": ...}'


def read_pairs(path: str | Path) -> list[dict[str, str]]:
    """Preference pairs from a JSONL file in TRL's shape: one {"prompt", "chosen", "rejected"} per line (strings;
    an optional number "margin")."""
    rows = []
    for n, obj in read_jsonl(path, ("prompt", "chosen", "rejected"), PAIR_EXAMPLE):
        if not all(isinstance(obj[k], str) for k in ("prompt", "chosen", "rejected")):
            raise DataError(f"{path}:{n}: prompt, chosen and rejected must be strings (TRL's conversational "
                            "format is not read yet); write the texts")
        row = {k: obj[k] for k in ("prompt", "chosen", "rejected")}
        if "margin" in obj:
            row["margin"] = float(obj["margin"])
        rows.append(row)
    if len(rows) < 4:
        raise DataError(f"{path} has {len(rows)} preference pairs; give at least 4 (2 or more held out)")
    return rows


def read_prompt_completions(path: str | Path) -> list[dict[str, str]]:
    """Demonstrations from a JSONL file in TRL's prompt-completion shape: {"prompt", "completion"} per line."""
    rows = []
    for n, obj in read_jsonl(path, ("prompt", "completion"), SFT_EXAMPLE):
        if not isinstance(obj["prompt"], str) or not isinstance(obj["completion"], str):
            raise DataError(f"{path}:{n}: prompt and completion must be strings")
        rows.append({"prompt": obj["prompt"], "completion": obj["completion"]})
    if len(rows) < 4:
        raise DataError(f"{path} has {len(rows)} demonstrations; give at least 4")
    return rows


def split_rows(rows: list[Any], val_fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """A seeded i.i.d. split (train, val) with at least one row in each."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(rows), generator=g).tolist()
    k = min(len(rows) - 1, max(1, int(round(len(rows) * val_fraction))))
    return [rows[i] for i in perm[k:]], [rows[i] for i in perm[:k]]


def align_settings(cfg_model: Any) -> dict[str, Any]:
    """The alignment settings of a run (model.extra.align), set by the Python calls and the CLI."""
    return dict(cfg_model.extra.get("align", {}))


def model_forward_for(model: torch.nn.Module) -> torch.nn.Module:
    """The module to call for generation (the plain model inside DDP / compile wrappers)."""
    return unwrap(model)


# ----------------------------------------------------------------------------- objectives' common part

SPECIALS = ("<pad>", "<|endoftext|>")


class TunedObjective(Objective):
    """An objective that starts from a decoder run (TrainConfig.base: its tokenizer and weights, copied in
    before the first step, as the classify objective does) or, without a base, from a fresh decoder of the
    run's shape with a char (or BPE) tokenizer trained on the data. Its settings live in model.extra.align
    (written into config.json); `role` is what the finished run is (a policy, or a reward model)."""

    arch = "gpt"
    role = "policy"

    def setup_model(self, run: Path, resume: bool, texts: Sequence[str]) -> ModelConfig:
        t, m = self.cfg.train, self.cfg.model
        self.settings = align_settings(m)
        self._base_state: dict[str, torch.Tensor] | None = None
        self.base_model: torch.nn.Module | None = None
        if resume:
            self.tokenizer = load_tokenizer(run / "tokenizer")
            mcfg = m
        elif t.base:
            base = load_policy(t.base, "--base")
            self.tokenizer = base.tokenizer
            self._base_state = {k: v.clone() for k, v in base.state_dict().items()}
            self.base_model = base
            mcfg = base.config
        else:
            self.tokenizer = self.tokenizer_for(run, resume, list(texts), SPECIALS)
            pad = self.tokenizer.pad_id
            mcfg = m.replace(vocab_size=self.tokenizer.vocab_size, **({"pad_token_id": pad} if pad is not None else {}))
        self.pad_id = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0
        self.block = mcfg.block_size
        settings = {**self.settings, "role": self.role, "objective": self.name, "base": t.base}
        if self.role == "reward":
            settings["head_token"] = head_token(self.tokenizer)
        self.settings = settings
        extra = {k: v for k, v in mcfg.extra.items() if k != "align"}
        return mcfg.replace(extra={**extra, "align": settings})

    def init_from_base(self, model: torch.nn.Module) -> None:
        """Copy the base weights in (once, before the first step of a new run)."""
        if self._base_state is None:
            return
        unwrap(model).load_state_dict(self._base_state, strict=True)
        self._base_state = None

    def encode(self, prompt: str, response: str) -> tuple[list[int], list[int]]:
        return encode_pair_text(self.tokenizer, prompt, response, self.block)

    def rng_state(self) -> torch.Tensor:
        return self.gen.get_state()

    def set_rng_state(self, s: torch.Tensor) -> None:
        self.gen.set_state(s)

    def pick(self, n: int) -> list[int]:
        t = self.cfg.train
        micro = t.batch_size // t.grad_accum
        idx = torch.randint(n, (micro,), generator=self.gen)
        per = micro // self.dist.world
        return idx[self.dist.rank * per:(self.dist.rank + 1) * per].tolist()


# ----------------------------------------------------------------------------- sampling


def prompt_ids_for(tok: Any, prompts: Sequence[str], block: int, max_new_tokens: int) -> list[list[int]]:
    """Token ids of each prompt, cut from the left so that prompt + max_new_tokens fits the context."""
    keep = max(1, block - max_new_tokens)
    out = []
    for p in prompts:
        ids = tok.encode(p) or ([tok.eos_id] if tok.eos_id is not None else [0])
        out.append(ids[-keep:])
    return out


def sample_ids(model: torch.nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int,
               temperature: float = 1.0, seed: int | None = 0, batch_size: int = 4096, tokenizer: Any = None
               ) -> list[list[int]]:
    """Sampled response ids for each prompt (the end-of-text token kept when reached), in batches of
    batch_size rows decoded together with a KV cache. The tokenizer (for its end-of-text and padding ids)
    defaults to the model's."""
    from llmlab.generate.causal import GenerationConfig, generate_ids

    tok = tokenizer if tokenizer is not None else model.tokenizer
    pad = tok.pad_id if tok.pad_id is not None else (tok.eos_id if tok.eos_id is not None else 0)
    out: list[list[int]] = []
    for k, i in enumerate(range(0, len(prompts), batch_size)):
        cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature,
                               seed=None if seed is None else seed + k)
        out += generate_ids(model, prompts[i:i + batch_size], cfg, eos_id=tok.eos_id, pad_id=pad)
    return out


def response_text(tok: Any, ids: Sequence[int]) -> str:
    """The text of response ids, without its end-of-text token."""
    ids = [i for i in ids if i != tok.eos_id and i != tok.pad_id]
    return tok.decode(ids)


def sample_responses(model: torch.nn.Module, prompts: Sequence[str], n: int, max_new_tokens: int = 32,
                     temperature: float = 1.0, seed: int | None = 0, batch_size: int = 4096) -> list[list[str]]:
    """n sampled responses (text) for each prompt, all rows decoded in batches."""
    tok = model.tokenizer
    ids = prompt_ids_for(tok, prompts, model.config.block_size, max_new_tokens)
    rep = [p for p in ids for _ in range(n)]
    outs = sample_ids(model, rep, max_new_tokens, temperature, seed, batch_size)
    texts = [response_text(tok, o) for o in outs]
    return [texts[i * n:(i + 1) * n] for i in range(len(prompts))]
