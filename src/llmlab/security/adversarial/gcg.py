"""Greedy Coordinate Gradient (GCG) adversarial suffixes, written from the paper.

Zou, Wang, Carlini, Nasr, Kolter, Fredrikson 2023, "Universal and Transferable Adversarial Attacks on
Aligned Language Models" (Algorithms 1 and 2). The prompt is

    before (system + user template + goal)  ⊕  suffix s_1..s_L  ⊕  after (assistant template)  ⊕  target y*

and the attack minimises the loss of the target given the rest,

    L(s) = -(1/H) sum_h log p(y*_h | before ⊕ s ⊕ after ⊕ y*_<h)

(the sum over the H target tokens divided by H, as both reference implementations compute it; the argmin
is the same). Each step:

1. the gradient of L with respect to the one-hot suffix matrix E (L, V), through the input embeddings
   E W (W: the (V, C) token-embedding table): g_i = dL/dE_i, one entry per vocabulary token;
2. for every position i the top-k tokens of -g_i (special and non-ASCII tokens excluded unless allowed):
   the substitutions a first-order Taylor expansion says lower the loss most;
3. B candidates, each the current suffix with `n_replace` positions (uniform) replaced by a random one of
   their top-k tokens; candidates whose decode-then-encode changes the tokens are dropped (a suffix must
   survive being sent as text);
4. the exact loss of every candidate in batches (the fixed `before` part's keys and values are computed
   once and shared by every candidate and step); the best one is kept.

Options from the reference code and nanoGCG: a buffer of the best suffixes (the next step starts from the
best of them), the mellowmax loss mm_a(t) = (1/a)(log sum_h exp(a t_h) - log H) over t = -logit(y*_h)
(Asadi and Littman 2017; the TDC-2023 trick nanoGCG adopted), early stop on an exact teacher-forced match
(argmax of every target position is the target token), and an adaptive term w * NLL(suffix) that keeps the
suffix's own perplexity low against perplexity filters (Jain et al. 2023).

Universal and transfer (the paper's Algorithm 2): one suffix over m goals, added progressively (the next
goal joins when every current one matches), and over several white-box models that share a tokenizer:
losses summed; gradients normalised per model (and per position) before they are summed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from llmlab.errors import LlmlabError
from llmlab.progress import Progress, Stage
from llmlab.security.targets import WhiteBox


@dataclass
class GCGConfig:
    """Hyper-parameters of one GCG optimisation. Defaults fit a 2-core CPU (the paper: B=512, k=256, 500 steps,
    a 20-token suffix of "!", on an A100)."""

    steps: int = 250
    search_width: int = 128  # B: candidates per step
    topk: int = 64  # k: tokens kept per position
    n_replace: int = 1  # positions replaced per candidate
    suffix_length: int = 20  # L (ignored when init is given: its own token count)
    init: str | None = None  # initial suffix text; None = " !" repeated L times
    buffer_size: int = 0  # best suffixes kept (0 or 1: only the best)
    mellowmax: bool = False
    mellowmax_alpha: float = 1.0
    early_stop: bool = False  # stop at the first exact teacher-forced match of every goal
    allow_non_ascii: bool = False
    allow_special: bool = False
    filter_retokenize: bool = True  # drop candidates that do not survive decode -> encode
    batch_size: int | None = None  # candidates per forward pass (None: all at once)
    ppl_weight: float = 0.0  # adaptive attack: weight of the suffix's own mean NLL in the loss
    progressive: bool = True  # universal: add goals one at a time
    system: str | None = None  # system prompt of the chat template
    template: bool = True  # place the suffix in the model's chat template (else plain completion)
    assistant_prefix: str = ""  # text written at the start of the assistant's turn, before the target
    seed: int = 0

    def check(self) -> None:
        """LlmlabError naming the first bad field."""
        for name in ("steps", "search_width", "topk", "n_replace", "suffix_length"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if name == "steps" else 1):
                floor = "0 or more" if name == "steps" else "at least 1"
                raise LlmlabError(f"{name.replace('_', '-')} must be an integer, {floor} (got {v!r})")
        if self.init is not None and not self.init.strip():
            raise LlmlabError("the initial suffix is empty; give text such as ' ! ! ! !' or leave it unset")
        if self.batch_size is not None and self.batch_size < 1:
            raise LlmlabError(f"batch-size must be at least 1 (got {self.batch_size})")
        if self.mellowmax_alpha <= 0:
            raise LlmlabError(f"mellowmax alpha must be positive (got {self.mellowmax_alpha})")
        if self.ppl_weight < 0:
            raise LlmlabError(f"ppl-weight must be 0 or more (got {self.ppl_weight})")


@dataclass
class Goal:
    """A request and the reply the attack wants to force ("Sure, here is ...")."""

    goal: str
    target: str


@dataclass
class GCGResult:
    """The best suffix found, and every step: the step's best candidate loss, the best loss so far, the suffix
    then kept, how many candidates were sampled/kept after the retokenisation filter, how many goals were
    active, whether all active goals matched exactly, and the step's wall time."""

    suffix: str
    ids: list[int]
    loss: float
    steps: list[dict[str, Any]] = field(default_factory=list)
    matched_step: int | None = None  # first step at which every goal matched (teacher-forced)
    stopped_early: bool = False
    seconds: float = 0.0
    init_loss: float = float("nan")
    models: list[str] = field(default_factory=list)
    goals: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------- losses


def mellowmax(t: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """mm_a(t) = (1/a) (log sum_i exp(a t_i) - log n) over the last dimension (Asadi and Littman 2017, "An
    Alternative Softmax Operator for Reinforcement Learning"): between the mean (a -> 0) and the max."""
    n = t.size(-1)
    return (torch.logsumexp(alpha * t, dim=-1) - math.log(n)) / alpha


def target_loss(logits: torch.Tensor, target: torch.Tensor, use_mellowmax: bool = False,
                alpha: float = 1.0) -> torch.Tensor:
    """(B, H, V) logits at the positions that predict the H target tokens -> (B,) loss: the mean cross-entropy
    -(1/H) sum_h log p(y*_h | ...), or mellowmax over -logit(y*_h)."""
    B, H, _ = logits.shape
    tgt = target.expand(B, H)
    if use_mellowmax:
        lab = logits.gather(-1, tgt[..., None]).squeeze(-1)  # (B, H)
        return mellowmax(-lab, alpha)
    return F.cross_entropy(logits.transpose(1, 2), tgt, reduction="none").mean(-1)


# ----------------------------------------------------------------------------- one goal on one model


def _f32(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 logits in float32 (the loss needs the precision); float32 and float64 as they are."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


class Task:
    """One goal on one white-box model: the prefix caches and the fixed ids around the suffix."""

    def __init__(self, wb: WhiteBox, goal: Goal, cfg: GCGConfig):
        self.wb, self.goal, self.cfg = wb, goal, cfg
        before, after = wb.place(goal.goal, cfg.system, cfg.template, cfg.assistant_prefix)
        target = wb.encode(goal.target)
        if not target:
            raise LlmlabError(f"the target of goal {goal.goal[:40]!r} is empty; give the reply to force, "
                              "e.g. 'Sure, here is'")
        self.before, self.after, self.target_ids = before, after, target
        self.caches = wb.prefix_caches(before)
        self.after_t = torch.tensor(after, dtype=torch.long)
        self.target = torch.tensor(target, dtype=torch.long)
        self.rest = torch.cat([self.after_t, self.target[:-1]])  # what follows the suffix as input
        self.A, self.H = len(after), len(target)

    def prompt_ids(self, suffix: Sequence[int]) -> list[int]:
        """The whole prompt (without the target) for a suffix: what generation continues."""
        return self.before + list(suffix) + self.after

    def _objective(self, h: torch.Tensor, suffix: torch.Tensor, onehot: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states (B, L + A + H - 1, C) of suffix ⊕ after ⊕ target[:-1] -> ((B,) loss, (B,) exact match)."""
        L = suffix.size(1)
        logits = _f32(self.wb.head(h[:, L + self.A - 1:]))  # (B, H, V): the positions predicting y*
        loss = target_loss(logits, self.target, self.cfg.mellowmax, self.cfg.mellowmax_alpha)
        match = (logits.argmax(-1) == self.target).all(-1)
        if self.cfg.ppl_weight and L > 1:
            logp = F.log_softmax(_f32(self.wb.head(h[:, : L - 1])), -1)  # (B, L-1, V) predicting s_2..s_L
            if onehot is not None:  # differentiable in the one-hot labels too
                nll = -(logp * onehot[None, 1:].to(logp.dtype)).sum(-1).mean(-1)
            else:
                nll = -logp.gather(-1, suffix[:, 1:, None]).squeeze(-1).mean(-1)
            loss = loss + self.cfg.ppl_weight * nll
        return loss, match

    def gradient(self, suffix: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(L, V) gradient of the loss with respect to the one-hot suffix, and the loss itself."""
        wb = self.wb
        W = wb.embedding_matrix()
        L = suffix.numel()
        onehot = torch.zeros(L, W.size(0), dtype=W.dtype)
        onehot.scatter_(1, suffix[:, None], 1.0)
        onehot.requires_grad_(True)
        with torch.enable_grad():
            x = torch.cat([onehot @ W, wb.model.wte(self.rest)], 0)[None]  # (1, L + A + H - 1, C)
            h = wb.hidden(x, wb.expand_caches(self.caches, 1))
            loss, _ = self._objective(h, suffix[None], onehot)
            loss.sum().backward()
        return onehot.grad.float(), float(loss.detach().sum())

    @torch.no_grad()
    def losses(self, cands: torch.Tensor, batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact loss and exact-match flag of every candidate suffix (B, L), in batches."""
        B = cands.size(0)
        bs = batch_size or B
        out_l, out_m = [], []
        for i in range(0, B, bs):
            c = cands[i:i + bs]
            ids = torch.cat([c, self.rest.expand(c.size(0), -1)], 1)
            h = self.wb.hidden(self.wb.model.wte(ids), self.wb.expand_caches(self.caches, c.size(0)))
            loss, match = self._objective(h, c)
            out_l.append(loss)
            out_m.append(match)
        return torch.cat(out_l), torch.cat(out_m)


# ----------------------------------------------------------------------------- sampling and filtering


def sample_candidates(suffix: torch.Tensor, grad: torch.Tensor, forbidden: torch.Tensor, width: int, topk: int,
                      n_replace: int, gen: torch.Generator) -> torch.Tensor:
    """B = width candidates (B, L): each the suffix with n_replace positions (uniform, distinct) replaced by a
    token drawn uniformly from that position's top-k of -grad (forbidden tokens never drawn)."""
    L = suffix.numel()
    g = grad.clone()
    g[:, forbidden] = float("inf")
    k = min(topk, int((~forbidden).sum()))
    top = (-g).topk(k, dim=1).indices  # (L, k)
    n = min(n_replace, L)
    pos = torch.rand(width, L, generator=gen).argsort(dim=1)[:, :n]  # (B, n) distinct positions
    pick = torch.randint(0, k, (width, n), generator=gen)
    vals = top[pos, pick]  # (B, n)
    return suffix.repeat(width, 1).scatter_(1, pos, vals)


def retokenize_filter(wb: WhiteBox, cands: torch.Tensor) -> torch.Tensor:
    """The candidates (deduplicated, order kept) whose text encodes back to the same tokens: a suffix is sent
    as text, and one that re-tokenises differently is not the suffix that was optimised."""
    rows = cands.tolist()
    texts = wb.tokenizer.decode_batch(rows, skip_special_tokens=False)
    try:
        again = wb.tokenizer.encode_batch(texts)
    except LlmlabError:
        again = [None] * len(rows)
    keep, seen = [], set()
    for i, (r, a) in enumerate(zip(rows, again)):
        t = tuple(r)
        if a == r and t not in seen:
            seen.add(t)
            keep.append(i)
    return cands[keep]


def dedup(cands: torch.Tensor) -> torch.Tensor:
    seen, keep = set(), []
    for i, r in enumerate(cands.tolist()):
        if tuple(r) not in seen:
            seen.add(tuple(r))
            keep.append(i)
    return cands[keep]


def initial_suffix(wb: WhiteBox, cfg: GCGConfig, forbidden: torch.Tensor) -> list[int]:
    """The starting suffix: cfg.init's tokens, or " !" repeated suffix_length times (the paper's "! ! ! !")."""
    if cfg.init is not None:
        ids = wb.encode(cfg.init)
        if not ids:
            raise LlmlabError("the initial suffix encodes to no tokens; give visible text")
        return ids
    L = cfg.suffix_length
    try:
        ids = wb.encode(" !" * L)
    except LlmlabError:
        ids = []
    if len(ids) >= L and not any(bool(forbidden[i]) for i in ids[:L]):
        return ids[:L]
    allowed = (~forbidden).nonzero().flatten()
    if allowed.numel() == 0:
        raise LlmlabError(f"{wb.name}: every token is excluded; allow non-ASCII or special tokens")
    return [int(allowed[0])] * L


# ----------------------------------------------------------------------------- the attack


def _check_models(models: Sequence[WhiteBox]) -> None:
    if not models:
        raise LlmlabError("no white-box model to optimise the suffix on; give a run folder, a Hugging Face "
                          "folder, a .gguf file or smollm2")
    ref = models[0]
    for wb in models[1:]:
        same = wb.vocab_size == ref.vocab_size and wb.tokenizer.vocab_size == ref.tokenizer.vocab_size
        probe = "Sure, here is how to do it! 123"
        if same:
            try:
                same = wb.encode(probe) == ref.encode(probe)
            except LlmlabError:
                same = False
        if not same:
            raise LlmlabError(f"{wb.name} and {ref.name} do not share a tokenizer, so one suffix cannot be "
                              "optimised on both; optimise on each alone and transfer the suffixes instead")


def gcg(models: WhiteBox | Sequence[WhiteBox], goals: Goal | Sequence[Goal], cfg: GCGConfig | None = None,
        progress: Progress | None = None) -> GCGResult:
    """Optimise one adversarial suffix for every goal on every model (one goal, one model: the individual
    attack; several: the universal / multi-model attack of Zou et al. 2023, Algorithm 2)."""
    cfg = cfg or GCGConfig()
    cfg.check()
    models = [models] if isinstance(models, WhiteBox) else list(models)
    goals = [goals] if isinstance(goals, Goal) else list(goals)
    if not goals:
        raise LlmlabError("no goals to attack; give a goal and a target")
    _check_models(models)
    for wb in models:
        for p in wb.model.parameters():
            p.requires_grad_(False)  # gradients flow to the one-hot suffix only
    forbidden = models[0].forbidden_tokens(cfg.allow_non_ascii, cfg.allow_special).clone()
    for wb in models[1:]:
        forbidden |= wb.forbidden_tokens(cfg.allow_non_ascii, cfg.allow_special)
    tasks = [[Task(wb, g, cfg) for g in goals] for wb in models]  # tasks[model][goal]
    gen = torch.Generator().manual_seed(cfg.seed)
    suffix = torch.tensor(initial_suffix(models[0], cfg, forbidden), dtype=torch.long)
    n_goals = len(goals)
    active = 1 if cfg.progressive and n_goals > 1 else n_goals

    def evaluate(cands: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loss = torch.zeros(cands.size(0))
        match = torch.ones(cands.size(0), dtype=torch.bool)
        for per_model in tasks:
            for t in per_model[:active]:
                lo, m = t.losses(cands, cfg.batch_size)
                loss += lo
                match &= m
        return loss, match

    t_start = time.perf_counter()
    l0, m0 = evaluate(suffix[None])
    size = max(1, cfg.buffer_size)
    buffer: list[tuple[float, list[int], bool]] = [(float(l0[0]), suffix.tolist(), bool(m0[0]))]
    result = GCGResult(suffix=models[0].decode(suffix.tolist()), ids=suffix.tolist(), loss=float(l0[0]),
                       init_loss=float(l0[0]), models=[wb.name for wb in models],
                       goals=[{"goal": g.goal, "target": g.target} for g in goals])
    if buffer[0][2] and active == n_goals:
        result.matched_step = 0
    with Stage(progress, "GCG steps", cfg.steps) as stage:
        for step in range(1, cfg.steps + 1):
            if result.matched_step is not None and cfg.early_stop:
                result.stopped_early = True
                break
            t0 = time.perf_counter()
            cur = torch.tensor(buffer[0][1], dtype=torch.long)
            grad = torch.zeros(cur.numel(), models[0].vocab_size)
            for per_model in tasks:
                g = sum(t.gradient(cur)[0] for t in per_model[:active])
                grad += g / g.norm(dim=-1, keepdim=True).clamp(min=1e-12)  # normalised per model (Algorithm 2)
            cands = sample_candidates(cur, grad, forbidden, cfg.search_width, cfg.topk, cfg.n_replace, gen)
            sampled = cands.size(0)
            cands = retokenize_filter(models[0], cands) if cfg.filter_retokenize else dedup(cands)
            rec: dict[str, Any] = {"step": step, "sampled": sampled, "kept": int(cands.size(0)), "active": active}
            if cands.size(0):
                loss, match = evaluate(cands)
                i = int(loss.argmin())
                cand = (float(loss[i]), cands[i].tolist(), bool(match[i]))
                rec["candidate_loss"] = cand[0]
                if len(buffer) < size:
                    buffer.append(cand)
                elif cand[0] < buffer[-1][0]:
                    buffer[-1] = cand
                buffer.sort(key=lambda b: b[0])
            best = buffer[0]
            if best[2] and active < n_goals:  # every current goal is met: the next one joins
                active += 1
                cur_b = torch.tensor([b[1] for b in buffer], dtype=torch.long)
                bl, bm = evaluate(cur_b)
                buffer = sorted(((float(bl[j]), buffer[j][1], bool(bm[j])) for j in range(len(buffer))),
                                key=lambda b: b[0])
                best = buffer[0]
            elif best[2] and result.matched_step is None:
                result.matched_step = step
            text = models[0].decode(best[1])
            rec.update(loss=best[0], suffix=text, ids=best[1], matched=best[2], seconds=time.perf_counter() - t0)
            result.steps.append(rec)
            stage.advance()
    best = buffer[0]
    result.suffix, result.ids, result.loss = models[0].decode(best[1]), best[1], best[0]
    result.seconds = time.perf_counter() - t_start
    return result
