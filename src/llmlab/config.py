"""Model configuration: one dataclass for the three families, with presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from llmlab.errors import ConfigError

ARCHS = ("gpt", "bert", "seq2seq")
NORMS = ("layernorm", "rmsnorm")
ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "swiglu")
POSITIONS = ("learned", "rope", "sinusoidal")
ROPE_LAYOUTS = ("interleaved", "halves")  # which channels RoPE rotates together: (2i, 2i+1) or (i, i + hs/2)

# Which positional schemes each family implements: the one place that decides it (issue 10). A decoder
# adds learned or sinusoidal vectors to its token embeddings, or rotates queries and keys (RoPE). BERT
# has learned absolute positions only (its checkpoints and token types assume them); the 2017
# encoder-decoder adds learned or sinusoidal ones (its cross-attention has no notion of rotation).
_POSITIONS_BY_ARCH: dict[str, tuple[str, ...]] = {
    "gpt": ("learned", "rope", "sinusoidal"),
    "bert": ("learned",),
    "seq2seq": ("learned", "sinusoidal"),
}


def positions_for(arch: str) -> tuple[str, ...]:
    """The `position` settings the family `arch` honours (first = default)."""
    try:
        return _POSITIONS_BY_ARCH[arch]
    except KeyError:
        raise ConfigError(f"arch={arch!r} is not one of {', '.join(ARCHS)}") from None


@dataclass
class ModelConfig:
    """Shape and options of a transformer. Every default runs on a 2-core CPU."""

    arch: str = "gpt"  # gpt (decoder-only) | bert (encoder-only) | seq2seq (encoder-decoder)
    vocab_size: int = 65
    block_size: int = 256  # longest sequence (positions)
    n_layer: int = 4  # decoder layers for gpt, encoder layers for bert and seq2seq
    n_dec_layer: int = 4  # decoder layers of seq2seq
    n_head: int = 4
    n_kv_head: int | None = None  # key/value heads (grouped-query attention); None = n_head (multi-head)
    n_embd: int = 128
    n_inner: int | None = None  # feed-forward width; None = 4 * n_embd
    dropout: float = 0.0
    bias: bool = True
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    activation: str = "gelu"
    position: str = "learned"
    rope_theta: float = 10000.0  # RoPE base: channel pair i turns by pos * rope_theta^(-2i/head_dim)
    rope_layout: str = "interleaved"  # RoPE pairs: "interleaved" (2i, 2i+1) or "halves" (i, i + hs/2, as HF's Llama)
    prenorm: bool = True  # pre-LN (GPT-2) or post-LN (BERT, the 2017 paper)
    final_norm: bool = True  # a norm after the last block (pre-LN needs it; nn.Transformer adds it)
    tie_embeddings: bool = True
    type_vocab_size: int = 0  # BERT token types (segments)
    n_classes: int = 0  # BERT: >0 adds a sequence-classification head
    mlm_head: bool = False  # BERT: masked-language-model head
    pooler: bool = False  # BERT: tanh pooler over [CLS]
    pad_token_id: int = 0
    scale_embeddings: bool = False  # seq2seq: multiply embeddings by sqrt(n_embd), as in the paper
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes (e.g. where it was imported from)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        """Key/value heads: n_head for multi-head attention, fewer for grouped-query, 1 for multi-query."""
        return self.n_kv_head if self.n_kv_head else self.n_head

    @property
    def inner(self) -> int:
        return self.n_inner if self.n_inner else 4 * self.n_embd

    def validate(self) -> None:
        """Raise ConfigError naming the first invalid field and how to fix it."""
        for name, allowed in (("arch", ARCHS), ("norm", NORMS), ("activation", ACTIVATIONS),
                              ("rope_layout", ROPE_LAYOUTS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}")
        for name in ("vocab_size", "block_size", "n_layer", "n_dec_layer", "n_head", "n_embd"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                f"choose a width that is a multiple of the head count "
                f"(e.g. {self.n_head * max(1, self.n_embd // self.n_head)})")
        valid = positions_for(self.arch)
        if self.position not in valid:
            raise ConfigError(f"position={self.position!r} is not available for arch={self.arch!r}; "
                              f"choose {' or '.join(repr(v) for v in valid)}")
        kv = self.n_kv_head
        if kv is not None:
            if not isinstance(kv, int) or isinstance(kv, bool) or kv <= 0 or self.n_head % kv:
                raise ConfigError(f"n_kv_head={kv!r} must be a positive divisor of n_head={self.n_head} "
                                  "(query heads share key/value heads in equal groups), or null for n_head")
        if self.position == "rope" and self.head_dim % 2:
            raise ConfigError(f"rotary positions need an even head size, got {self.head_dim}; change n_embd or n_head")
        if not (isinstance(self.rope_theta, (int, float)) and self.rope_theta > 0):
            raise ConfigError(f"rope_theta must be a positive number, got {self.rope_theta!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from a dict, rejecting unknown keys with the list of valid ones."""
        if not isinstance(d, dict):
            raise ConfigError(f"a model config must be a JSON object, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown model config key(s) {', '.join(unknown)}; "
                              f"valid keys: {', '.join(sorted(names))}")
        try:
            return cls(**d)
        except TypeError as e:
            raise ConfigError(f"bad model config: {e}") from None

    def replace(self, **kw: Any) -> ModelConfig:
        return ModelConfig.from_dict({**self.to_dict(), **kw})


def gpt2_config(**kw: Any) -> ModelConfig:
    """GPT-2 (Radford et al. 2019): pre-LN, learned positions, tanh-GELU, tied embeddings, biases."""
    base = dict(arch="gpt", vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768,
                norm="layernorm", norm_eps=1e-5, activation="gelu_tanh", position="learned", prenorm=True,
                final_norm=True, tie_embeddings=True, bias=True)
    return ModelConfig(**{**base, **kw})


def llama_config(**kw: Any) -> ModelConfig:
    """Llama (Touvron et al. 2023) as a configuration of the one decoder: pre-norm RMSNorm, rotary positions,
    SwiGLU feed-forward, no biases, grouped-query attention (n_kv_head < n_head, Llama 2/3). RoPE pairs channel
    i with i + hs/2, the layout of Hugging Face checkpoints. Defaults are SmolLM2-135M's shape (30 layers,
    9 query heads sharing 3 key/value heads, width 576, tied embeddings)."""
    base = dict(arch="gpt", vocab_size=49152, block_size=8192, n_layer=30, n_head=9, n_kv_head=3, n_embd=576,
                n_inner=1536, norm="rmsnorm", norm_eps=1e-5, activation="swiglu", position="rope",
                rope_theta=100000.0, rope_layout="halves", prenorm=True, final_norm=True, tie_embeddings=True,
                bias=False)
    return ModelConfig(**{**base, **kw})


def bert_config(**kw: Any) -> ModelConfig:
    """BERT (Devlin et al. 2019): post-LN encoder, learned positions, token types, erf-GELU, eps 1e-12."""
    base = dict(arch="bert", vocab_size=30522, block_size=512, n_layer=12, n_head=12, n_embd=768,
                norm="layernorm", norm_eps=1e-12, activation="gelu", position="learned", prenorm=False,
                final_norm=False, type_vocab_size=2, bias=True, pad_token_id=0)
    return ModelConfig(**{**base, **kw})


def transformer2017_config(**kw: Any) -> ModelConfig:
    """The 2017 Transformer: post-LN encoder-decoder, sinusoidal positions, ReLU, scaled embeddings."""
    base = dict(arch="seq2seq", vocab_size=1000, block_size=512, n_layer=6, n_dec_layer=6, n_head=8,
                n_embd=512, n_inner=2048, norm="layernorm", norm_eps=1e-5, activation="relu",
                position="sinusoidal", prenorm=False, final_norm=False, tie_embeddings=True,
                scale_embeddings=True, bias=True)
    return ModelConfig(**{**base, **kw})
