"""Encoder-decoder, the 2017 Transformer: the encoder reads the source bidirectionally; the decoder
writes the target causally, attending to the encoder output through cross-attention."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from llmlab.attention import KVCache, padding_mask
from llmlab.blocks import Block, make_norm, sinusoidal_positions
from llmlab.config import ModelConfig
from llmlab.models.gpt import init_weights, padding_attention_mask


class Seq2Seq(nn.Module):
    """model(src (B, S), tgt (B, T)) -> logits (B, T, V) of the next target token."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        C = cfg.n_embd
        self.tok_emb = nn.Embedding(cfg.vocab_size, C)  # shared by source and target
        if cfg.position == "learned":
            self.pos_emb = nn.Embedding(cfg.block_size, C)
        else:  # sinusoidal; config.positions_for("seq2seq") refuses anything else
            self.pos_emb = None
            self.register_buffer("pe", sinusoidal_positions(cfg.block_size, C), persistent=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.encoder = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.decoder = nn.ModuleList(Block(cfg, cross=True) for _ in range(cfg.n_dec_layer))
        # nn.Transformer adds a norm after each stack; pre-LN needs them, the paper's post-LN does not
        self.enc_norm = make_norm(cfg) if cfg.final_norm else nn.Identity()
        self.dec_norm = make_norm(cfg) if cfg.final_norm else nn.Identity()
        self.lm_head = nn.Linear(C, cfg.vocab_size, bias=False)
        init_weights(self, cfg.n_layer + cfg.n_dec_layer)
        self.tie_weights()
        self.tokenizer = None

    def tie_weights(self) -> None:
        """Share the token embedding with the output head when the config ties them."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    @property
    def token_embedding(self) -> nn.Embedding:
        """The token embedding table (V, C) — the same attribute name in all three families."""
        return self.tok_emb

    def embed(self, idx: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """Token embeddings (scaled by sqrt(C) when configured) plus positions offset..offset+T."""
        T = idx.size(1)
        if offset + T > self.config.block_size:
            raise ValueError(f"sequence of {offset + T} tokens is longer than the context ({self.config.block_size})")
        x = self.tok_emb(idx)
        if self.config.scale_embeddings:
            x = x * math.sqrt(self.config.n_embd)
        pos = torch.arange(offset, offset + T, device=idx.device)
        x = x + (self.pos_emb(pos) if self.pos_emb is not None else self.pe[pos])
        return self.drop(x)

    def encoder_stack(self, x: torch.Tensor, src_mask: torch.Tensor | None = None,
                      weights: dict[str, list[torch.Tensor]] | None = None) -> torch.Tensor:
        """Encoder layers (+ final norm) over embedded source x (B, S, C); src_mask (B, S) 1 = token."""
        mask = padding_mask(src_mask) if src_mask is not None else None
        for block in self.encoder:
            x = block(x, mask=mask, weights=weights)
        return self.enc_norm(x)

    def decoder_stack(self, y: torch.Tensor, memory: torch.Tensor, src_mask: torch.Tensor | None = None,
                      tgt_mask: torch.Tensor | None = None, caches: list[KVCache] | None = None,
                      cross_caches: list[KVCache] | None = None,
                      weights: dict[str, list[torch.Tensor]] | None = None) -> torch.Tensor:
        """Decoder layers (+ final norm) over embedded target y (B, T, C) attending to memory (B, S, C)."""
        mem_mask = padding_mask(src_mask) if src_mask is not None else None
        self_mask = padding_attention_mask(tgt_mask, y.size(1)) if tgt_mask is not None else None
        for i, block in enumerate(self.decoder):
            y = block(y, mask=self_mask, is_causal=True, cache=caches[i] if caches else None,
                      memory=memory, memory_mask=mem_mask,
                      cross_cache=cross_caches[i] if cross_caches else None, weights=weights)
        return self.dec_norm(y)

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor | None = None,
               weights: dict[str, list[torch.Tensor]] | None = None) -> torch.Tensor:
        """Encoder output (B, S, C) for source ids (B, S)."""
        return self.encoder_stack(self.embed(src), src_mask, weights)

    def new_caches(self) -> tuple[list[KVCache], list[KVCache]]:
        """Empty (self-attention, cross-attention) caches for incremental decoding."""
        return [KVCache() for _ in self.decoder], [KVCache(static=True) for _ in self.decoder]

    def decode(self, tgt: torch.Tensor, memory: torch.Tensor, src_mask: torch.Tensor | None = None,
               tgt_mask: torch.Tensor | None = None,
               caches: tuple[list[KVCache], list[KVCache]] | None = None,
               weights: dict[str, list[torch.Tensor]] | None = None) -> torch.Tensor:
        """Next-token logits (B, T, V) for target ids (B, T) given the encoder output."""
        past = caches[0][0].length if caches else 0
        y = self.embed(tgt, offset=past)
        y = self.decoder_stack(y, memory, src_mask, tgt_mask, caches[0] if caches else None,
                               caches[1] if caches else None, weights)
        return self.lm_head(y)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor, src_mask: torch.Tensor | None = None,
                tgt_mask: torch.Tensor | None = None,
                weights: dict[str, list[torch.Tensor]] | None = None) -> torch.Tensor:
        """Logits (B, T, V): teacher-forced decoding of tgt given src."""
        return self.decode(tgt, self.encode(src, src_mask, weights), src_mask, tgt_mask, weights=weights)
