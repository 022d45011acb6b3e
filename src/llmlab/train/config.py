"""Training configuration: the TrainConfig and RunConfig dataclasses, presets, TOML files and overrides."""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmlab.config import ModelConfig
from llmlab.data import SPLITS
from llmlab.errors import ConfigError


@dataclass
class TrainConfig:
    """How to train. Every default runs on a 2-core CPU."""

    data: str | None = None  # None = the built-in Python language reference
    text_field: str = "text"
    task: str = ""  # what to learn; "" = the default of the arch (gpt: lm, bert: mlm, seq2seq: seq2seq)
    tokenizer: str = "char"  # char | bpe | wordpiece
    vocab_size: int = 1024  # BPE vocabulary (char vocabularies come from the text)
    val_fraction: float = 0.1
    split: str = "end"  # end (the corpus's tail, as nanoGPT) | random (i.i.d. documents) | chunks (i.i.d. pieces)
    split_seed: int = 0  # the permutation of the random and chunks splits
    encoding_errors: str = "strict"  # strict | replace | ignore
    batch_size: int = 16  # sequences per optimizer step (global, across processes)
    grad_accum: int = 1  # micro-batches per step (batch_size is split into them)
    max_iters: int = 1000
    max_time: float = 0.0  # seconds of training; 0 = no limit
    schedule: str = "iters"  # iters: the cosine decays over lr_decay_iters steps | time: over max_time seconds
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 50
    lr_decay_iters: int = 0  # 0 = max_iters
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # 0 = off
    eval_interval: int = 250
    eval_iters: int = 20
    log_interval: int = 10
    seed: int = 1337
    dtype: str = "float32"  # float32 | bfloat16 (autocast) | auto (bf16 for GPT LM training on CPUs with native bf16)
    compile: bool = False
    checkpoint_every: int = 0  # steps; 0 = at the end, and every 10 minutes
    keep_checkpoints: int = 2
    eval_every_checkpoint: str = ""  # evaluations run on every checkpoint, e.g. induction,attention_entropy
    threads: int = 0  # torch threads; 0 = auto: the cores other processes leave free (runtime.ThreadGovernor)
    num_samples: int = 3
    sample_tokens: int = 200
    # encoder (mlm, classify) and encoder-decoder (seq2seq) objectives
    mask_prob: float = 0.15  # mlm: fraction of tokens chosen; seq2seq denoising: fraction corrupted
    span_len: float = 3.0  # seq2seq denoising: mean length of a corrupted span
    label_smoothing: float = 0.0  # classify and supervised seq2seq: cross-entropy label smoothing
    base: str = ""  # classify: the encoder to fine-tune (an llmlab encoder run folder or "minilm")
    init_from: str = ""  # lm, assistant: start from this model's weights and tokenizer (a run folder, HF folder,
    # .gguf file or smollm2): fine-tuning; the model config comes from it (see llmlab.train.init)
    label_field: str = "label"  # classify: the column / JSON field holding the label
    max_len: int = 128  # classify: tokens kept per text


PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {"model": dict(n_layer=4, n_head=4, n_embd=128, block_size=128, dropout=0.0),
             "train": dict(batch_size=32, max_iters=1200, lr=2e-3, min_lr=2e-4, warmup_iters=50,
                           eval_interval=200, eval_iters=20, dtype="auto")},
    "small": {"model": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2),
              "train": dict(batch_size=64, max_iters=5000, lr=1e-3, min_lr=1e-4, warmup_iters=100,
                            eval_interval=250, eval_iters=50, dtype="auto")},
    "gpt2-small": {"model": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, activation="gelu_tanh",
                                 dropout=0.0),
                   "train": dict(tokenizer="bpe", vocab_size=50257, batch_size=8, lr=6e-4, min_lr=6e-5,
                                 warmup_iters=200, max_iters=5000, weight_decay=0.1, beta2=0.95, dtype="auto")},
    # nanoGPT's CPU shape (4x4x128, context 64) with a bigger batch and learning rate: tuned to beat its
    # recipe's val loss in the same wall time on a 2-core CPU (see benchmarks/bench_shakespeare.py). It trains
    # for its whole 110 s budget whatever the machine's speed: the cosine decays over the time, not a step count
    "shakespeare": {"model": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0),
                    "train": dict(batch_size=32, max_iters=1_000_000, max_time=110.0, schedule="time", lr=4e-3,
                                  min_lr=4e-4, warmup_iters=50, lr_decay_iters=2000, eval_interval=500, eval_iters=20,
                                  beta2=0.99, weight_decay=0.1, dtype="auto")},
    # llmlab's assistant as a fair injection target (issue 14): BPE (a word is a few tokens: 5x faster steps and
    # far easier copying than characters), RoPE (copying by relative position), the generated instruction set
    # (weighted to the hard tasks: copying a word, picking one colour of several); the target is >= 80% of
    # held-out benign tasks exact (train/chat.py, eval.json) within 20 minutes on 2 cores; measured 82% [77%, 85%]
    # in 11.7 min with 20,000 steps (quiet machine, 2 threads; 10,000 steps: 79%): picking the asked item's
    # colour among several is still at chance. max_time stops it earlier on a loaded machine (fewer steps)
    "assistant": {"model": dict(n_layer=3, n_head=4, n_embd=96, block_size=512, position="rope", dropout=0.0),
                  "train": dict(task="assistant", tokenizer="bpe", vocab_size=1024, batch_size=16, max_iters=20000,
                                lr=3e-3, min_lr=3e-4, warmup_iters=50, eval_interval=1000, eval_iters=10,
                                max_time=1150.0, dtype="auto")},
}


DEFAULT_PRESET = "tiny"


MODEL_CLI_SKIP = {"vocab_size", "extra"}  # vocab comes from the tokenizer


@dataclass
class RunConfig:
    """Everything a run needs: the model, the training, and the run's name/folder."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    preset: str = DEFAULT_PRESET

    def to_dict(self) -> dict[str, Any]:
        return {"preset": self.preset, "model": self.model.to_dict(), "train": dataclasses.asdict(self.train)}


def _field_owner(key: str) -> str | None:
    if key in {f.name for f in dataclasses.fields(TrainConfig)}:
        return "train"
    if key in {f.name for f in dataclasses.fields(ModelConfig)} - MODEL_CLI_SKIP:
        return "model"
    return None


def valid_keys() -> list[str]:
    return sorted({f.name for f in dataclasses.fields(TrainConfig)}
                  | ({f.name for f in dataclasses.fields(ModelConfig)} - MODEL_CLI_SKIP))


def resolve_config(preset: str | None = None, toml_path: str | None = None,
                   overrides: dict[str, Any] | None = None) -> RunConfig:
    """Preset, then TOML file ([model] and [train] tables, or flat keys), then overrides."""
    preset = preset or DEFAULT_PRESET
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    model_kw = dict(PRESETS[preset]["model"])
    train_kw = dict(PRESETS[preset]["train"])
    layers: list[dict[str, Any]] = []
    if toml_path:
        try:
            doc = tomllib.loads(Path(toml_path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {toml_path} does not exist") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{toml_path} is not valid TOML: {e}") from None
        flat = {k: v for k, v in doc.items() if not isinstance(v, dict)}
        for section in ("model", "train"):
            for k, v in doc.get(section, {}).items():
                flat[k] = v
        unknown_sections = [k for k, v in doc.items() if isinstance(v, dict) and k not in ("model", "train")]
        if unknown_sections:
            raise ConfigError(f"{toml_path}: unknown table(s) {', '.join(unknown_sections)}; use [model] and [train]")
        if "preset" in flat:
            raise ConfigError(f"{toml_path}: give the preset with --preset, not in the file")
        layers.append(flat)
    layers.append(overrides or {})
    for layer in layers:
        for k, v in layer.items():
            owner = _field_owner(k)
            if owner is None:
                raise ConfigError(f"unknown config key {k!r}; valid keys: {', '.join(valid_keys())}")
            (model_kw if owner == "model" else train_kw)[k] = v
    try:
        tcfg = TrainConfig(**train_kw)
    except TypeError as e:
        raise ConfigError(f"bad training config: {e}") from None
    mcfg = ModelConfig.from_dict({**ModelConfig().to_dict(), **model_kw})
    validate_train(tcfg)
    return RunConfig(model=mcfg, train=tcfg, preset=preset)


def validate_train(t: TrainConfig) -> None:
    """Raise ConfigError for values the trainer cannot use."""
    checks = [
        (t.tokenizer in ("char", "bpe", "wordpiece"), f"tokenizer={t.tokenizer!r} is not one of char, bpe, wordpiece"),
        (t.split in SPLITS, f"split={t.split!r} is not one of {', '.join(SPLITS)}"),
        (t.schedule in ("iters", "time"), f"schedule={t.schedule!r} is not one of iters, time"),
        (t.schedule != "time" or t.max_time > 0, "schedule=time decays the learning rate over max_time; set max_time"),
        (0.0 < t.mask_prob < 1.0, f"mask_prob must be between 0 and 1, got {t.mask_prob}"),
        (t.span_len >= 1.0, f"span_len must be at least 1, got {t.span_len}"),
        (0.0 <= t.label_smoothing < 1.0, f"label_smoothing must be in [0, 1), got {t.label_smoothing}"),
        (t.max_len > 1, f"max_len must be at least 2, got {t.max_len}"),
        (t.dtype in ("float32", "bfloat16", "auto"), f"dtype={t.dtype!r} is not one of float32, bfloat16, auto"),
        (t.batch_size > 0 and t.grad_accum > 0, "batch_size and grad_accum must be positive"),
        (t.batch_size % t.grad_accum == 0, f"batch_size {t.batch_size} is not divisible by grad_accum {t.grad_accum}"),
        (t.max_iters > 0, "max_iters must be positive"),
        (t.lr > 0, "lr must be positive"),
        (t.eval_interval > 0 and t.eval_iters > 0 and t.log_interval > 0,
         "eval_interval, eval_iters and log_interval must be positive"),
        (t.keep_checkpoints >= 1, "keep_checkpoints must be at least 1"),
        (t.vocab_size >= 260 or t.tokenizer == "char", "a BPE vocab_size must be at least 260"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)
