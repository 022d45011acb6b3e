"""Decoder-only GPT: token (+ position) embeddings, a stack of causal blocks, a language-model head.

The same class is GPT-2 (learned positions, LayerNorm, GELU, biases) and Llama (rotary positions, RMSNorm,
SwiGLU, grouped-query attention, no biases): see config.gpt2_config and config.llama_config."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
import torch.nn as nn

from llmlab.attention import KVCache, RotaryEmbedding
from llmlab.blocks import Block, make_norm, sinusoidal_positions
from llmlab.config import ModelConfig


def init_weights(model: nn.Module, n_layer: int) -> None:
    """GPT-2 initialisation: N(0, 0.02) weights, zero biases, residual projections scaled by 1/sqrt(2L)."""
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("proj.weight") else 0.02
            nn.init.normal_(p, mean=0.0, std=std)
        elif name.endswith("bias"):
            nn.init.zeros_(p)


def padding_attention_mask(attention_mask: torch.Tensor, t_q: int) -> torch.Tensor:
    """Additive mask (B, 1, Tq, Tk) hiding padded keys; a padded query still sees itself, so no row is
    empty (its output is ignored anyway). attention_mask: (B, Tk), 1 = token, 0 = padding."""
    t_k = attention_mask.size(1)
    real = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, Tk)
    own = torch.arange(t_k, device=attention_mask.device)[None, :] == \
        torch.arange(t_k - t_q, t_k, device=attention_mask.device)[:, None]  # (Tq, Tk)
    allowed = real | own[None, None]
    return torch.zeros(allowed.shape, device=allowed.device).masked_fill(~allowed, float("-inf"))


@contextmanager
def bf16_gemv() -> Iterator[None]:
    """Multiply by bf16 weights with torch's own CPU kernels instead of oneDNN's, for one token at a time.

    Decoding one token multiplies a single row by every weight matrix, which is bound by reading the weights
    from memory. For bf16 weights in nn.Linear's (out, in) layout torch's matrix-vector kernel reads them
    about twice as fast as oneDNN's matmul (SmolLM2's 30 layers: 6.2 vs 11.6 ms per token, 29.6 vs 14.5 GB/s;
    torch 2.13, AVX512-BF16); from two rows up oneDNN is as fast or faster. oneDNN is switched off for the
    duration (a process-wide setting), every other mkldnn flag kept."""
    m = torch.backends.mkldnn
    with m.flags(enabled=False, deterministic=m.deterministic, allow_tf32=m.allow_tf32,
                 fp32_precision=m.fp32_precision):
        yield


class GPT(nn.Module):
    """Decoder-only transformer language model. model(ids (B, T)) -> logits (B, T, V)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        # positions (config.positions_for): learned vectors, fixed sinusoids (both added to the tokens), or RoPE
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.position == "learned" else None
        if cfg.position == "sinusoidal":
            self.register_buffer("pe", sinusoidal_positions(cfg.block_size, cfg.n_embd), persistent=False)
        else:
            self.pe = None
        rotary = RotaryEmbedding(cfg.head_dim, cfg.block_size, cfg.rope_theta, cfg.rope_layout) \
            if cfg.position == "rope" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(Block(cfg, rotary=rotary) for _ in range(cfg.n_layer))
        self.ln_f = make_norm(cfg) if cfg.final_norm else nn.Identity()
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        init_weights(self, cfg.n_layer)
        self.tie_weights()
        self.tokenizer = None  # set by llmlab.load

    def tie_weights(self) -> None:
        """Share the token embedding with the output head when the config ties them (GPT-2, SmolLM2)."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.wte.weight

    def new_caches(self) -> list[KVCache]:
        """Empty per-layer KV caches for incremental decoding (float32 for a bf16/fp16 model on a CPU, where
        attention is computed in float32: the cache is then not converted again at every step)."""
        w = self.wte.weight
        low = w.device.type == "cpu" and w.dtype in (torch.bfloat16, torch.float16)
        return [KVCache(dtype=torch.float32 if low else None) for _ in self.h]

    @property
    def token_embedding(self) -> nn.Embedding:
        """The token embedding table (V, C) — the same attribute name in all three families."""
        return self.wte

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """Token embeddings (B, T, C) of ids — what `inputs_embeds` replaces for gradient-based attacks."""
        return self.wte(idx)

    def forward(
        self,
        idx: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        caches: list[KVCache] | None = None,
        weights: dict[str, list[torch.Tensor]] | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits (B, T, V) for token ids (B, T) or input embeddings (B, T, C); with last_only, of the last
        position only (B, 1, V) — all that generation needs, and for a long prompt and a large vocabulary
        the output head is a good part of the work (SmolLM2: a fifth of a 512-token prefill).

        attention_mask (B, T_past + T): 1 = real token, 0 = padding (left padding for batched
        generation); positions then count real tokens only. caches: from new_caches(), extended in
        place. weights: a dict that receives the attention maps (see Block.forward).
        """
        x = self.embed(idx) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        B, T, _ = x.shape
        past = caches[0].length if caches else 0
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:past + T]
            else:
                position_ids = torch.arange(past, past + T, device=x.device)
        if past + T > self.config.block_size:
            raise ValueError(f"sequence of {past + T} tokens is longer than the context ({self.config.block_size})")
        if self.wpe is not None:
            x = x + self.wpe(position_ids)
        elif self.pe is not None:
            x = x + self.pe[position_ids].to(x.dtype)
        if self.training and self.drop.p > 0:
            x = self.drop(x)
        mask = padding_attention_mask(attention_mask, T) if attention_mask is not None else None
        # one bf16 row on a CPU: torch's matrix-vector kernels (see bf16_gemv) — unless the layers multiply by
        # (in, out) copies of their weights (generate's decode_layout), which those kernels read slowly
        gemv = x.dtype == torch.bfloat16 and x.device.type == "cpu" and B * T == 1 and \
            "forward" not in vars(self.lm_head)
        with bf16_gemv() if gemv else nullcontext():
            for i, block in enumerate(self.h):
                x = block(x, mask=mask, is_causal=True, positions=position_ids,
                          cache=caches[i] if caches else None, weights=weights)
            if last_only:
                x = x[:, -1:]
            return self.lm_head(self.ln_f(x))
