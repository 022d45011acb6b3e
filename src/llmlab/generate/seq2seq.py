"""Decoding for encoder-decoder models: sampling and beam search with a GNMT length penalty."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from llmlab.data import pad_batch
from llmlab.errors import ConfigError, LlmlabError
from llmlab.generate.causal import GenerationConfig, pick, process_logits
from llmlab.runtime import unwrap


def seq2seq_roles(tok: Any) -> tuple[int, int, int]:
    """(bos, eos, pad) ids of a seq2seq tokenizer ([CLS]/[SEP] stand in for bos/eos when missing)."""
    bos = tok.bos_id if tok.bos_id is not None else tok.cls_id
    eos = tok.eos_id if tok.eos_id is not None else tok.sep_id
    pad = tok.pad_id if tok.pad_id is not None else eos
    if bos is None or eos is None:
        raise ConfigError(f"the {tok.kind} tokenizer has no begin/end tokens; seq2seq needs both")
    return bos, eos, pad



def decode_target(tok: Any, ids: Sequence[int]) -> str:
    """Text of generated ids without pad/bos/eos; sentinels stay visible."""
    bos, eos, pad = seq2seq_roles(tok)
    drop = {bos, eos, pad}
    return tok.decode([i for i in ids if i not in drop], skip_special_tokens=False).strip()


def length_penalty(length: int, alpha: float) -> float:
    """GNMT length normalisation (Wu et al. 2016, eq. 14): lp(Y) = ((5 + |Y|) / 6)^alpha; beam scores are
    log P(Y|X) / lp(Y), so alpha > 0 favours longer outputs and alpha = 0 is the raw log-probability."""
    return ((5.0 + length) / 6.0) ** alpha


@torch.inference_mode()
def _sample(model: torch.nn.Module, src: torch.Tensor, smask: torch.Tensor, cfg: GenerationConfig,
            bos: int, eos: int, pad: int, gen: torch.Generator | None) -> list[list[int]]:
    """Greedy or sampled decoding of one padded batch of sources (B, S)."""
    B = src.size(0)
    memory = model.encode(src, smask)  # (B, S, C): encoded once
    caches = model.new_caches() if cfg.use_cache else None  # cross K/V computed at the first step, then reused
    y = torch.full((B, 1), bos, dtype=torch.long)  # (B, t)
    done = torch.zeros(B, dtype=torch.bool)
    out: list[list[int]] = [[] for _ in range(B)]
    steps = min(cfg.max_new_tokens, model.config.block_size - 1)
    for _ in range(steps):
        if caches is not None:
            logits = model.decode(y[:, -1:], memory, smask, caches=caches)[:, -1]  # (B, V)
        else:
            logits = model.decode(y, memory, smask)[:, -1]
        nxt = pick(process_logits(logits, y if cfg.repetition_penalty != 1.0 else None, cfg), cfg, gen)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        for i in range(B):
            if not done[i] and int(nxt[i]) != eos:
                out[i].append(int(nxt[i]))
        done |= nxt == eos
        y = torch.cat([y, nxt[:, None]], 1)
        if bool(done.all()):
            break
    return out


@torch.inference_mode()
def _beam(model: torch.nn.Module, src: torch.Tensor, smask: torch.Tensor, beams: int, max_new: int,
          alpha: float, bos: int, eos: int) -> list[list[int]]:
    """Beam search over one padded batch of sources: `beams` hypotheses per source ranked by
    log P / lp(length) (see length_penalty). A source is done when it holds `beams` finished hypotheses
    and none of its live ones can still rank above them at the current length; with one beam this is
    exactly greedy decoding. Self-attention caches follow their hypotheses (KVCache.reorder); the
    cross-attention keys/values are computed once per source and shared by all its beams."""
    B, K = src.size(0), beams
    memory = model.encode(src, smask).repeat_interleave(K, 0)  # (B*K, S, C)
    smask = smask.repeat_interleave(K, 0)
    self_caches, cross_caches = model.new_caches()
    y = torch.full((B * K, 1), bos, dtype=torch.long)  # (B*K, t)
    scores = torch.full((B, K), float("-inf"))
    scores[:, 0] = 0.0  # all beams start identical: only the first is live at step 0
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
    done = [False] * B
    steps = min(max_new, model.config.block_size - 1)
    for step in range(steps):
        logits = model.decode(y[:, -1:], memory, smask, caches=(self_caches, cross_caches))[:, -1]  # (B*K, V)
        V = logits.size(-1)
        cand = (scores.view(-1, 1) + logits.float().log_softmax(-1)).view(B, K * V)  # (B, K*V)
        top_s, top_i = cand.topk(min(2 * K, K * V), dim=1)
        new_scores = torch.full((B, K), float("-inf"))
        src_row = torch.arange(B * K).view(B, K).clone()
        new_tok = torch.full((B, K), eos, dtype=torch.long)
        lp = length_penalty(step + 1, alpha)
        for b in range(B):
            if done[b]:
                continue
            j = 0
            for rank, (s, i) in enumerate(zip(top_s[b].tolist(), top_i[b].tolist())):
                beam, tok = divmod(i, V)
                if s == float("-inf"):
                    break
                if tok == eos:
                    if rank < K:
                        finished[b].append((s / lp, y[b * K + beam, 1:].tolist()))
                    continue
                new_scores[b, j], src_row[b, j], new_tok[b, j] = s, b * K + beam, tok
                j += 1
                if j == K:
                    break
            if len(finished[b]) >= K:
                kth = sorted((f[0] for f in finished[b]), reverse=True)[K - 1]
                if kth >= float(new_scores[b].max()) / lp:
                    done[b] = True
        if all(done):
            break
        index = src_row.view(-1)
        for c in self_caches:
            c.reorder(index)
        y = torch.cat([y[index], new_tok.view(-1, 1)], 1)
        scores = new_scores
    for b in range(B):
        if not done[b]:
            lp = length_penalty(y.size(1) - 1, alpha)
            finished[b] += [(float(scores[b, k]) / lp, y[b * K + k, 1:].tolist()) for k in range(K)
                            if scores[b, k] > float("-inf")]
    return [max(f, key=lambda t: t[0])[1] if f else [] for f in finished]


def generate_seq2seq_ids(model: torch.nn.Module, sources: Sequence[Sequence[int]], cfg: GenerationConfig, bos: int,
                 eos: int, pad: int, beams: int = 1, alpha: float = 0.6, batch_size: int = 16) -> list[list[int]]:
    """Target ids for each source (eos not included): greedy (temperature 0), sampling, or beam search
    when beams > 1. Sources longer than the context are cut."""
    cfg.validate()
    if beams < 1:
        raise LlmlabError(f"--beams must be at least 1, got {beams}")
    if alpha < 0:
        raise LlmlabError(f"--length-penalty must be >= 0, got {alpha}")
    block = model.config.block_size
    gen = torch.Generator().manual_seed(cfg.seed) if cfg.seed is not None else None
    out: list[list[int]] = []
    for i in range(0, len(sources), batch_size):
        chunk = [list(s[:block]) or [eos] for s in sources[i:i + batch_size]]
        src, smask = pad_batch(chunk, pad)
        if beams > 1:
            out += _beam(model, src, smask, beams, cfg.max_new_tokens, alpha, bos, eos)
        else:
            out += _sample(model, src, smask, cfg, bos, eos, pad, gen)
    return out


def generate_seq2seq(model: torch.nn.Module, texts: Sequence[str], cfg: GenerationConfig, beams: int = 1,
                     alpha: float = 0.6) -> list[str]:
    """Output text for each source text of an encoder-decoder model (see generate_seq2seq_ids)."""
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise LlmlabError("this model has no tokenizer; generate from a run folder")
    if model.config.arch != "seq2seq":
        raise LlmlabError(f"this is a {model.config.arch} model, not an encoder-decoder (seq2seq) one")
    bos, eos, pad = seq2seq_roles(tok)
    model = unwrap(model).eval()
    ids = generate_seq2seq_ids(model, [tok.encode(t) for t in texts], cfg, bos, eos, pad, beams, alpha)
    return [decode_target(tok, i) for i in ids]


def greedy_target(model: torch.nn.Module, text: str, max_new_tokens: int = 64) -> str:
    """The model's greedy output for one source text (what `llmlab attention` shows when no --target)."""
    return generate_seq2seq(model, [text], GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0))[0]
