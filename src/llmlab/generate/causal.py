"""Text generation from a causal LM: greedy, temperature, top-k, top-p, repetition-penalty, presence- and
frequency-penalty and logit-bias sampling (one sampler, shared by `llmlab generate` and `llmlab serve`),
batched prompts with left padding, KV-cache decoding, stop strings, and streaming."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from llmlab.errors import LlmlabError


@dataclass
class GenerationConfig:
    """How to pick each next token. temperature 0 = greedy."""

    max_new_tokens: int = 100
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off; >1 discourages tokens already in the sequence (CTRL)
    presence_penalty: float = 0.0  # OpenAI: subtract once from the logit of every token already generated
    frequency_penalty: float = 0.0  # OpenAI: subtract per occurrence of the token in the generated text
    logit_bias: Mapping[int, float] | None = None  # token id -> added to its logit (-100..100) before sampling
    stop: Sequence[str] = field(default_factory=tuple)
    seed: int | None = None
    use_cache: bool = True
    stop_at_eos: bool = True

    def validate(self) -> None:
        if self.max_new_tokens < 0:
            raise LlmlabError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise LlmlabError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise LlmlabError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise LlmlabError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise LlmlabError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise LlmlabError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        for t, b in (self.logit_bias or {}).items():
            if not -100.0 <= b <= 100.0:
                raise LlmlabError(f"logit_bias of token {t} must be in [-100, 100], got {b}")

    @property
    def counts_tokens(self) -> bool:
        """Whether the sampler needs the counts of the generated tokens (presence/frequency penalties)."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def apply_logit_bias(logits: torch.Tensor, bias: Mapping[int, float] | None) -> torch.Tensor:
    """logits (B, V) + bias[token] on the listed tokens (OpenAI logit_bias). Ids outside the vocabulary are
    an LlmlabError (the server checks them first and answers 400)."""
    if not bias:
        return logits
    V = logits.size(-1)
    ids = torch.tensor([int(t) for t in bias], dtype=torch.long)
    if bool(((ids < 0) | (ids >= V)).any()):
        raise LlmlabError(f"logit_bias names a token outside the vocabulary of {V}")
    vals = torch.tensor([float(b) for b in bias.values()], dtype=logits.dtype)
    return logits.index_add(1, ids, vals[None].expand(logits.size(0), -1).contiguous())


def process_logits(logits: torch.Tensor, seqs: torch.Tensor | None, cfg: GenerationConfig,
                   mask: torch.Tensor | None = None, counts: torch.Tensor | None = None) -> torch.Tensor:
    """Apply logit bias, repetition penalty, presence/frequency penalties, temperature, top-k and top-p to
    next-token logits (B, V). seqs (B, T) are the tokens so far; mask (B, T) marks the real ones (padding is
    not penalised); counts (B, V) how often each token was generated so far (for the OpenAI penalties:
    logit[j] -= frequency_penalty * c[j] + presence_penalty * (c[j] > 0))."""
    logits = apply_logit_bias(logits.float(), cfg.logit_bias)
    if cfg.repetition_penalty != 1.0 and seqs is not None and seqs.numel():
        # CTRL (Keskar et al. 2019): divide positive logits of seen tokens by p, multiply negative ones by p
        real = torch.ones_like(seqs, dtype=logits.dtype) if mask is None else mask.to(logits.dtype)
        seen = torch.zeros_like(logits).scatter_add_(1, seqs, real) > 0  # (B, V)
        penalised = torch.where(logits > 0, logits / cfg.repetition_penalty, logits * cfg.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if counts is not None and cfg.counts_tokens:
        c = counts.to(logits.dtype)
        logits = logits - cfg.frequency_penalty * c - cfg.presence_penalty * (c > 0).to(logits.dtype)
    if cfg.temperature == 0:
        return logits
    logits = logits / cfg.temperature
    if cfg.top_k and cfg.top_k < logits.size(-1):
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:  # nucleus (Holtzman et al. 2020): the smallest set whose probability reaches top_p
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= cfg.top_p  # keep the token that crosses top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, idx, sorted_logits)
    return logits


def pick(logits: torch.Tensor, cfg: GenerationConfig, gen: torch.Generator | None) -> torch.Tensor:
    """Next token ids (B,) from processed logits: argmax when greedy, else a sample."""
    if cfg.temperature == 0:
        return logits.argmax(-1)
    return torch.multinomial(logits.softmax(-1), 1, generator=gen).squeeze(1)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, T), attention_mask (B, T)) with prompts aligned to the right."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for i, p in enumerate(prompts):
        if p:
            ids[i, T - len(p):] = torch.tensor(list(p), dtype=torch.long)
            mask[i, T - len(p):] = 1
    return ids, mask


DECODE_LAYOUT_MIN = 1 << 18  # weights with at least this many elements get the (in, out) copy


def _linear_in_out(lin: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    w = lin.weight
    key = (w.data_ptr(), w._version)
    cached = getattr(lin, "_llmlab_w_in_out", None)
    if cached is None or cached[0] != key:
        cached = (key, w.detach().t().contiguous())  # (in, out)
        lin._llmlab_w_in_out = cached
    x2 = x.reshape(-1, x.size(-1))
    y = torch.addmm(lin.bias, x2, cached[1]) if lin.bias is not None else x2 @ cached[1]
    return y.view(*x.shape[:-1], y.size(-1))


class decode_layout:  # noqa: N801 - used as a context manager
    """Inside generation, large nn.Linear layers multiply by a cached (in, out) copy of their weight.
    Decoding multiplies one row by each weight matrix, which is memory-bound on a CPU; with the weight laid
    out (in, out) the product streams memory in order (about 2x faster for GPT-2's 50k-token head). The
    copy is made once and reused while the weight is unchanged."""

    def __init__(self, model: torch.nn.Module):
        self.layers = [m for m in model.modules()
                       if isinstance(m, torch.nn.Linear) and m.weight.numel() >= DECODE_LAYOUT_MIN
                       and m.weight.dtype == torch.float32]  # bf16 weights: torch's gemv kernels read them faster

    def __enter__(self) -> decode_layout:
        for lin in self.layers:
            lin.forward = lambda x, lin=lin: _linear_in_out(lin, x)
        return self

    def __exit__(self, *exc: object) -> None:
        for lin in self.layers:
            del lin.forward


def pack_rows(keep: torch.Tensor, caches: Sequence[Any] | None, *rows: torch.Tensor | None
              ) -> tuple[torch.Tensor | None, ...]:
    """Keep batch rows `keep` of each tensor (None stays None) and of every KV cache: the rows still decoded,
    packed together once others have ended."""
    for c in caches or ():
        c.reorder(keep)
    return tuple(None if t is None else t[keep] for t in rows)


@torch.inference_mode()
def generate_ids(model: torch.nn.Module, prompts: Sequence[Sequence[int]], cfg: GenerationConfig,
                 eos_id: int | None = None, pad_id: int = 0,
                 on_step: Callable[[torch.Tensor, torch.Tensor], bool] | None = None,
                 ended: Callable[[], Sequence[bool]] | None = None) -> list[list[int]]:
    """New token ids for each prompt. Prompts must fit the context (see generate_text). on_step receives
    the new tokens (B,) and which rows were still active after each step, and returns True to stop
    early; ended() (optional) says which rows the caller has ended (e.g. at a stop string). Rows that
    reached eos or were ended get pad and leave the batch: once a quarter of the rows still decoded have
    ended, the rest are packed together (their KV caches too), so a batch costs what its unfinished
    rows cost, not what its longest row costs."""
    with decode_layout(model):
        return _generate_ids(model, prompts, cfg, eos_id, pad_id, on_step, ended)


def _generate_ids(model: torch.nn.Module, prompts: Sequence[Sequence[int]], cfg: GenerationConfig,
                  eos_id: int | None, pad_id: int,
                  on_step: Callable[[torch.Tensor, torch.Tensor], bool] | None,
                  ended: Callable[[], Sequence[bool]] | None = None) -> list[list[int]]:
    cfg.validate()
    block = model.config.block_size
    if any(len(p) == 0 for p in prompts):
        raise LlmlabError("a prompt is empty; give at least one token")
    gen = torch.Generator().manual_seed(cfg.seed) if cfg.seed is not None else None
    ids, mask = left_pad(prompts, pad_id)
    B = ids.size(0)
    padded = bool((mask == 0).any())
    out: list[list[int]] = [[] for _ in range(B)]
    rows = torch.arange(B)  # the prompt each row still decoded belongs to
    done = torch.zeros(B, dtype=torch.bool)  # per row still decoded
    caches = model.new_caches() if cfg.use_cache else None
    counts = torch.zeros(B, model.config.vocab_size) if cfg.counts_tokens else None
    seqs, amask = ids, mask
    logits = None
    for step in range(cfg.max_new_tokens):
        if caches is not None and seqs.size(1) <= block:
            if step == 0:
                logits = model(seqs, attention_mask=amask if padded else None, caches=caches)[:, -1]
            else:
                logits = model(seqs[:, -1:], attention_mask=amask if padded else None, caches=caches)[:, -1]
        else:  # full recompute over the last `block` tokens (also once the context is full)
            w_ids, w_mask = seqs[:, -block:], amask[:, -block:]
            logits = model(w_ids, attention_mask=w_mask if bool((w_mask == 0).any()) else None)[:, -1]
        nxt = pick(process_logits(logits, seqs if cfg.repetition_penalty != 1.0 else None, cfg, amask, counts), cfg,
                   gen)
        active = ~done
        nxt = torch.where(active, nxt, torch.full_like(nxt, pad_id))
        if counts is not None:
            counts[torch.arange(len(rows)), nxt] += active.float()
        for j, i in enumerate(rows.tolist()):
            if active[j]:
                out[i].append(int(nxt[j]))
        if eos_id is not None and cfg.stop_at_eos:
            done = done | (nxt == eos_id)
        seqs = torch.cat([seqs, nxt[:, None]], dim=1)
        amask = torch.cat([amask, active.long()[:, None]], dim=1)
        padded = padded or not bool(active.all())
        if on_step is not None:
            full_nxt = torch.full((B,), pad_id, dtype=nxt.dtype)
            full_active = torch.zeros(B, dtype=torch.bool)
            full_nxt[rows], full_active[rows] = nxt, active
            if on_step(full_nxt, full_active):
                break
        if ended is not None:
            flags = ended()
            done = done | torch.tensor([bool(flags[i]) for i in rows.tolist()], dtype=torch.bool)
        if bool(done.all()):
            break
        n_done = int(done.sum())
        if n_done and 4 * n_done >= len(rows):  # pack the unfinished rows together
            seqs, amask, rows, done, counts = pack_rows((~done).nonzero().squeeze(1), caches, seqs, amask, rows,
                                                        done, counts)
            padded = bool((amask == 0).any())
    return out


class TextStream:
    """Decodes each row's new tokens as they arrive, ends a row at its end-of-text token or just before a
    stop string, and reports new text as soon as it is certain (a partial stop string or an incomplete
    UTF-8 character is held back). Records why each row ended ("stop" | "length") and its token count."""

    def __init__(self, tok: Any, n: int, stop: Sequence[str], eos_id: int | None = None,
                 on_text: Callable[[int, str], None] | None = None, cancelled: Callable[[], bool] | None = None):
        self.tok, self.stop, self.eos_id, self.on_text = tok, [s for s in stop if s], eos_id, on_text
        self.cancelled = cancelled
        self.ids: list[list[int]] = [[] for _ in range(n)]
        self.text = [""] * n
        self.emitted = [0] * n
        self.finish = ["length"] * n
        self.done = [False] * n
        self.count = [0] * n  # tokens generated, the end-of-text token included

    def step(self, nxt: torch.Tensor, active: torch.Tensor) -> bool:
        """on_step for generate_ids: take the step's tokens; True when every row has ended."""
        for i, t in enumerate(nxt.tolist()):
            if self.done[i]:
                continue
            self.count[i] += 1
            if not bool(active[i]) or (self.eos_id is not None and t == self.eos_id):
                self.done[i], self.finish[i] = True, "stop"
                continue
            self.ids[i].append(t)
            text = self.tok.decode(self.ids[i])
            for s in self.stop:
                j = text.find(s)
                if j >= 0:
                    text, self.done[i], self.finish[i] = text[:j], True, "stop"
            self.text[i] = text
            self._emit(i, len(text) if self.done[i] else len(text) - self._held(text))
        if self.cancelled is not None and self.cancelled():
            return True
        return all(self.done)

    def _held(self, text: str) -> int:
        hold = 1 if text.endswith("\ufffd") else 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        return hold

    def _emit(self, i: int, upto: int) -> None:
        if self.on_text is not None and upto > self.emitted[i]:
            self.on_text(i, self.text[i][self.emitted[i]:upto])
            self.emitted[i] = upto

    def flush(self) -> None:
        """Show what was held back once generation has ended."""
        for i in range(len(self.text)):
            self._emit(i, len(self.text[i]))


def generate_text(model: torch.nn.Module, prompts: Sequence[str], cfg: GenerationConfig,
                  on_text: Callable[[int, str], None] | None = None,
                  warn: Callable[[str], None] | None = None) -> list[str]:
    """Continuations of text prompts (prompt not included). Prompts longer than the context are cut from
    the left (with a warning); stop strings end a row's text just before the stop string."""
    tok = model.tokenizer
    if tok is None:
        raise LlmlabError("this model has no tokenizer; generate from a run folder")
    if model.config.arch != "gpt":
        raise LlmlabError(f"generate needs a decoder-only (gpt) model, this one is {model.config.arch}")
    block = model.config.block_size
    enc = []
    for i, p in enumerate(prompts):
        ids = tok.encode(p)
        if not ids:
            ids = [tok.eos_id] if tok.eos_id is not None else tok.encode("\n")
        if len(ids) > block - 1:
            if warn:
                warn(f"prompt {i + 1} is {len(ids)} tokens, longer than the context of {block}; "
                     f"keeping its last {block - 1}")
            ids = ids[-(block - 1):]
        enc.append(ids)
    stream = TextStream(tok, len(enc), cfg.stop, tok.eos_id, on_text)
    pad = tok.pad_id if tok.pad_id is not None else (tok.eos_id if tok.eos_id is not None else 0)
    generate_ids(model, enc, cfg, eos_id=tok.eos_id, pad_id=pad, on_step=stream.step, ended=lambda: stream.done)
    stream.flush()
    return stream.text
