"""Encoder-only BERT: bidirectional blocks over token + position + token-type embeddings, with a
masked-LM head, a sequence-classification head and mean pooling for sentence embeddings."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmlab.attention import padding_mask
from llmlab.blocks import Block, activate, make_norm
from llmlab.config import ModelConfig
from llmlab.models.gpt import init_weights


class Bert(nn.Module):
    """Bidirectional encoder. model(ids (B, T), attention_mask) -> hidden states (B, T, C)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        C = cfg.n_embd
        self.word_embeddings = nn.Embedding(cfg.vocab_size, C)
        self.position_embeddings = nn.Embedding(cfg.block_size, C)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, C) if cfg.type_vocab_size else None
        self.emb_norm = make_norm(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.final_norm = make_norm(cfg) if cfg.final_norm else nn.Identity()
        if cfg.mlm_head:  # transform (dense, GELU, norm) then the tied decoder
            self.mlm_dense = nn.Linear(C, C)
            self.mlm_norm = make_norm(cfg)
            self.mlm_decoder = nn.Linear(C, cfg.vocab_size)
        self.pooler = nn.Linear(C, C) if cfg.pooler else None
        self.classifier = nn.Linear(C, cfg.n_classes) if cfg.n_classes else None
        init_weights(self, cfg.n_layer)
        self.tie_weights()
        self.tokenizer = None

    def tie_weights(self) -> None:
        """Share the token embedding with the masked-LM decoder when the config ties them."""
        if self.config.mlm_head and self.config.tie_embeddings:
            self.mlm_decoder.weight = self.word_embeddings.weight

    @property
    def token_embedding(self) -> nn.Embedding:
        """The token embedding table (V, C) — the same attribute name in all three families."""
        return self.word_embeddings

    def forward(
        self,
        idx: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        weights: dict[str, list[torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """Last hidden states (B, T, C). attention_mask (B, T): 1 = token, 0 = padding."""
        x = self.word_embeddings(idx) if inputs_embeds is None else inputs_embeds
        T = x.size(1)
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than the model's {self.config.block_size} positions")
        x = x + self.position_embeddings(torch.arange(T, device=x.device))
        if self.token_type_embeddings is not None:
            tt = token_type_ids if token_type_ids is not None else torch.zeros(x.shape[:2], dtype=torch.long,
                                                                               device=x.device)
            x = x + self.token_type_embeddings(tt)
        x = self.drop(self.emb_norm(x))
        mask = padding_mask(attention_mask) if attention_mask is not None else None  # (B, 1, 1, T)
        for block in self.layers:
            x = block(x, mask=mask, weights=weights)
        return self.final_norm(x)

    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits (B, T, V) from hidden states, for masked-language modelling."""
        if not self.config.mlm_head:
            raise ValueError("this encoder has no masked-LM head (mlm_head=False)")
        return self.mlm_decoder(self.mlm_norm(activate(self.mlm_dense(hidden), self.config.activation)))

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mean of the hidden states over real tokens: (B, T, C) -> (B, C)."""
        if attention_mask is None:
            return hidden.mean(1)
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)

    def sentence_embedding(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None,
                           normalize: bool = True) -> torch.Tensor:
        """Mean-pooled sentence embeddings (B, C), L2-normalised by default (sentence-transformers style)."""
        e = self.pool(self(idx, attention_mask), attention_mask)
        return F.normalize(e, dim=-1) if normalize else e

    def classify(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Class logits (B, n_classes): the tanh pooler over [CLS] when present, else mean pooling."""
        return self.class_head(self(idx, attention_mask), attention_mask)

    def class_head(self, h: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Class logits (B, n_classes) of hidden states h (B, T, C) — classify() without the encoder, for
        callers that run the encoder through a wrapper (DDP, torch.compile)."""
        if self.classifier is None:
            raise ValueError("this encoder has no classification head (n_classes=0)")
        pooled = torch.tanh(self.pooler(h[:, 0])) if self.pooler is not None else self.pool(h, attention_mask)
        return self.classifier(self.drop(pooled))
