"""Training: configs and presets, the loop (AdamW, warmup + cosine, clipping, accumulation, bf16,
compile, evaluation), resumable checkpoints, and DistributedDataParallel under torchrun."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from .checkpoint import (
    CONFIG_FILE,
    FORMAT_VERSION,
    WEIGHTS_FILE,
    atomic_save_tensors,
    atomic_write_bytes,
    atomic_write_json,
    load_weights_into,
    read_run_config,
    unique_state_dict,
    write_manifest,
)
from .config import ModelConfig
from .data import DEFAULT_SOURCE, BatchSampler, prepare, train_tokenizer
from .errors import ConfigError, ModelLoadError
from .models import build_model
from .runtime import keep_freed_memory, resolve_dtype


@dataclass
class TrainConfig:
    """How to train. Every default runs on a 2-core CPU."""

    data: str | None = None  # None = the built-in Python language reference
    text_field: str = "text"
    task: str = ""  # what to learn; "" = the default of the arch (gpt: lm, bert: mlm, seq2seq: seq2seq)
    tokenizer: str = "char"  # char | bpe | wordpiece
    vocab_size: int = 1024  # BPE vocabulary (char vocabularies come from the text)
    val_fraction: float = 0.1
    encoding_errors: str = "strict"  # strict | replace | ignore
    batch_size: int = 16  # sequences per optimizer step (global, across processes)
    grad_accum: int = 1  # micro-batches per step (batch_size is split into them)
    max_iters: int = 1000
    max_time: float = 0.0  # seconds of training; 0 = no limit
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
    checkpoint_every: int = 0  # steps; 0 = only at the end
    keep_checkpoints: int = 2
    threads: int = 0  # torch threads; 0 = torch's default
    num_samples: int = 3
    sample_tokens: int = 200
    # encoder (mlm, classify) and encoder-decoder (seq2seq) objectives
    mask_prob: float = 0.15  # mlm: fraction of tokens chosen; seq2seq denoising: fraction corrupted
    span_len: float = 3.0  # seq2seq denoising: mean length of a corrupted span
    label_smoothing: float = 0.0  # classify and supervised seq2seq: cross-entropy label smoothing
    base: str = ""  # classify: the encoder to fine-tune (an llmlab encoder run folder or "minilm")
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
    # recipe's val loss in the same wall time on a 2-core CPU (see benchmarks/bench_shakespeare.py). bf16
    # autocast where the CPU has it: 1,450 steps fit 110 s here (float32: about 1,100, then --max-time stops it)
    "shakespeare": {"model": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0),
                    "train": dict(batch_size=32, max_iters=1450, lr=4e-3, min_lr=4e-4, warmup_iters=50,
                                  eval_interval=725, eval_iters=20, beta2=0.99, weight_decay=0.1, dtype="auto")},
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


def lr_at(step: int, t: TrainConfig) -> float:
    """Linear warmup to lr over warmup_iters, then cosine decay to min_lr at lr_decay_iters."""
    decay = t.lr_decay_iters or t.max_iters
    if step < t.warmup_iters:
        return t.lr * (step + 1) / (t.warmup_iters + 1)
    if step >= decay:
        return t.min_lr
    ratio = (step - t.warmup_iters) / max(1, decay - t.warmup_iters)
    return t.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (t.lr - t.min_lr)


def make_optimizer(model: torch.nn.Module, t: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (dim >= 2) only; biases, norms and gains are not decayed."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    try:  # the fused kernel is several times faster than the per-tensor loop, on CPU too
        return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), foreach=True)


# ----------------------------------------------------------------------------- checkpoints


def _ckpt_dirs(run: Path) -> list[Path]:
    d = run / "checkpoints"
    if not d.is_dir():
        return []
    return sorted((p for p in d.iterdir() if p.name.startswith("step-") and (p / "state.json").is_file()),
                  key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(run: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any],
                    rng: dict[str, torch.Tensor], keep: int) -> Path:
    """Write checkpoints/step-N/ (weights, optimizer, RNG, JSON state) atomically; keep the last `keep`."""
    final = run / "checkpoints" / f"step-{state['step']:07d}"
    tmp = run / "checkpoints" / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    atomic_save_tensors(unique_state_dict(model), tmp / WEIGHTS_FILE)
    sd = opt.state_dict()
    tensors = {f"state.{i}.{k}": v for i, s in sd["state"].items() for k, v in s.items()}
    tensors.update({f"rng.{k}": v for k, v in rng.items()})
    atomic_save_tensors(tensors, tmp / "optimizer.safetensors")
    atomic_write_json(tmp / "state.json", {**state, "param_groups": sd["param_groups"]})
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in _ckpt_dirs(run)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(ckpt: Path, model: torch.nn.Module, opt: torch.optim.Optimizer
                    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Restore weights and optimizer from a checkpoint folder; return its JSON state and RNG tensors."""
    load_weights_into(model, ckpt / WEIGHTS_FILE)
    try:
        state = json.loads((ckpt / "state.json").read_text())
        tensors = load_file(str(ckpt / "optimizer.safetensors"))
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"checkpoint {ckpt} is truncated or corrupt ({type(e).__name__}); delete it to "
                             "resume from the one before") from None
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    rng = {}
    for k, v in tensors.items():
        if k.startswith("rng."):
            rng[k[4:]] = v
        else:
            _, i, name = k.split(".", 2)
            opt_state.setdefault(int(i), {})[name] = v
    opt.load_state_dict({"state": opt_state, "param_groups": state.pop("param_groups")})
    return state, rng


# ----------------------------------------------------------------------------- distributed


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Dist:
    """Join the torchrun process group (gloo on CPU, nccl on GPU) when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


# ----------------------------------------------------------------------------- the loop


@dataclass
class TrainResult:
    run: Path
    step: int
    train_loss: float
    val_loss: float
    best_val_loss: float
    elapsed: float
    tokens_per_s: float
    stopped_by: str  # max_iters | max_time
    samples: list[str] = field(default_factory=list)


Callback = Callable[[str, dict[str, Any]], None]


def lm_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of a causal LM on inputs x and targets y (B, T)."""
    logits = model(x)
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))


class Objective:
    """What a run learns: its data and tokenizer, its batches, its loss, its evaluation, and what it leaves
    in the run folder at the end. The trainer's loop (optimizer, schedule, checkpoints, DDP) is shared."""

    name = "base"
    arch: str | None = None  # the model family it trains (checked before anything is written); None = any
    # whether dtype "auto" may pick bf16 autocast for this objective: only where a bf16 run has been measured
    # to end at float32's loss (the others keep float32 until they are)
    auto_bf16 = False

    def __init__(self, cfg: RunConfig, dist: Dist):
        self.cfg, self.dist = cfg, dist
        self.tokenizer: Any = None

    def setup(self, run: Path, resume: bool) -> ModelConfig:
        """Read the data, make the tokenizer; return the model config to build (vocab size set)."""
        raise NotImplementedError

    def data_info(self) -> dict[str, Any]:
        """What the run was trained on (written into config.json under "data")."""
        return {}

    def tokenizer_for(self, run: Path, resume: bool, train_docs: list[str], specials: Sequence[str] = ()) -> Any:
        """The run's saved tokenizer when resuming, else one of --tokenizer trained on the train split."""
        from .tokenizers import load_tokenizer

        if resume and (run / "tokenizer").is_dir():
            return load_tokenizer(run / "tokenizer")
        t = self.cfg.train
        return train_tokenizer(t.tokenizer, train_docs, t.vocab_size, specials)

    def next_batch(self) -> Any:
        """This rank's next training micro-batch."""
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        raise NotImplementedError

    def batch_tokens(self, batch: Any) -> int:
        """Tokens in a micro-batch on this rank (for tokens/s)."""
        return int(batch[0].numel())

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Held-out figures; must contain "train" and "val" losses (model in eval mode, no grad)."""
        raise NotImplementedError

    def rng_state(self) -> torch.Tensor:
        raise NotImplementedError

    def set_rng_state(self, s: torch.Tensor) -> None:
        raise NotImplementedError

    def finish(self, run: Path, best: torch.nn.Module) -> list[str]:
        """Write end-of-run files (samples, eval.json) from the best model; return samples to print."""
        return []


class LMObjective(Objective):
    """Next-token prediction for decoder-only GPTs on a text corpus."""

    name = "lm"
    arch = "gpt"
    auto_bf16 = True  # tinyshakespeare, 2,000 steps: bf16 1.8903 vs float32 1.8905 (bench_shakespeare.py)

    def setup(self, run: Path, resume: bool) -> ModelConfig:
        t, m = self.cfg.train, self.cfg.model
        self.corpus = prepare(t.data, t.tokenizer, t.vocab_size, t.val_fraction, t.text_field, t.encoding_errors)
        self.tokenizer = self.corpus.tokenizer
        micro = t.batch_size // t.grad_accum
        self.sampler = BatchSampler(self.corpus.train, m.block_size, micro, t.seed + 1, self.dist.rank,
                                    self.dist.world)
        pad = self.tokenizer.pad_id
        return m.replace(vocab_size=self.tokenizer.vocab_size, **({"pad_token_id": pad} if pad is not None else {}))

    def data_info(self) -> dict[str, Any]:
        t, c = self.cfg.train, self.corpus
        return {"source": t.data or DEFAULT_SOURCE, "hash": c.data_hash, "val_fraction": t.val_fraction,
                "train_docs": c.n_train_docs, "val_docs": c.n_val_docs, "train_tokens": int(len(c.train)),
                "val_tokens": int(len(c.val))}

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.sampler.next()

    def loss(self, model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return lm_loss(model, *batch)

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Mean loss on eval_iters fixed batches of each split (its own generator: training RNG untouched)."""
        t, block = self.cfg.train, self.cfg.model.block_size
        out = {}
        for split, ids in (("train", self.corpus.train), ("val", self.corpus.val)):
            if len(ids) <= block + 1:
                out[split] = float("nan")
                continue
            sampler = BatchSampler(ids, block, t.batch_size // t.grad_accum, t.seed + 7)
            losses = []
            for _ in range(t.eval_iters):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=t.dtype == "bfloat16"):
                    losses.append(lm_loss(model, *sampler.next()).item())
            out[split] = sum(losses) / len(losses)
        return out

    def rng_state(self) -> torch.Tensor:
        return self.sampler.state()

    def set_rng_state(self, s: torch.Tensor) -> None:
        self.sampler.set_state(s)

    def finish(self, run: Path, best: torch.nn.Module) -> list[str]:
        from .checkpoint import atomic_write_bytes
        from .generate import GenerationConfig, generate_text

        t = self.cfg.train
        gcfg = GenerationConfig(max_new_tokens=t.sample_tokens, temperature=0.8, top_k=50, seed=t.seed)
        samples = generate_text(best, ["\n"] * t.num_samples, gcfg) if t.num_samples else []
        text = "".join(f"--- sample {i + 1} ---\n{s}\n" for i, s in enumerate(samples))
        atomic_write_bytes(run / "samples.txt", text.encode())
        return samples


# objectives of other families live in their own modules, imported when a run needs them
OBJECTIVES: dict[str, str] = {
    "lm": "llmlab.train:LMObjective",
    "mlm": "llmlab.encoder:MLMObjective",
    "classify": "llmlab.encoder:ClassifyObjective",
    "seq2seq": "llmlab.seq2seq_train:Seq2SeqObjective",
    "assistant": "llmlab.assistant:AssistantObjective",
}
ARCH_OBJECTIVE = {"gpt": "lm", "bert": "mlm", "seq2seq": "seq2seq"}
ARCH_KIND = {"gpt": "decoder-only", "bert": "encoder-only", "seq2seq": "encoder-decoder"}


def make_objective(cfg: RunConfig, dist: Dist) -> Objective:
    """The objective a run trains with: its --task, or the default of its --arch."""
    import importlib

    name = cfg.train.task or ARCH_OBJECTIVE[cfg.model.arch]
    if name not in OBJECTIVES:
        raise ConfigError(f"unknown task {name!r}; valid tasks: {', '.join(OBJECTIVES)}")
    module, cls = OBJECTIVES[name].split(":")
    try:
        objective_cls = getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError):
        raise ConfigError(f"task {name!r} is not available in this llmlab yet") from None
    want, got = objective_cls.arch, cfg.model.arch
    if want is not None and got != want:
        raise ConfigError(f"task {name!r} trains {ARCH_KIND[want]} ({want}) models; use --arch {want} "
                          f"(got --arch {got})")
    return objective_cls(cfg, dist)


def _truncate_metrics(path: Path, step: int) -> None:
    if path.is_file():
        keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        atomic_write_bytes(path, "".join(line + "\n" for line in keep).encode())


def _metrics_append(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def train(cfg: RunConfig, run: str | Path, resume: bool = False, callback: Callback | None = None) -> TrainResult:
    """Train cfg.model with its objective into the run folder; resume from its last checkpoint if asked.
    Progress is reported through callback(event, info) with events start, log, eval, checkpoint, end."""
    t = cfg.train
    run = Path(run)
    keep_freed_memory()
    dist = setup_distributed()
    emit = callback if (callback and dist.main) else (lambda e, i: None)
    if t.threads:
        torch.set_num_threads(t.threads)
    torch.manual_seed(t.seed)
    if (t.batch_size // t.grad_accum) % dist.world:
        raise ConfigError(f"micro-batch {t.batch_size // t.grad_accum} (batch_size / grad_accum) is not divisible "
                          f"by {dist.world} processes")
    objective = make_objective(cfg, dist)
    if t.dtype == "auto":  # resolved here, so config.json records what the run used
        t = dataclasses.replace(t, dtype=resolve_dtype("auto") if objective.auto_bf16 else "float32")
        cfg = objective.cfg = dataclasses.replace(cfg, train=t)
    mcfg = objective.setup(run, resume)
    cfg = dataclasses.replace(cfg, model=mcfg)
    objective.cfg = cfg
    model = build_model(mcfg)
    opt = make_optimizer(model, t)
    step, elapsed, best_val, tokens_seen = 0, 0.0, float("inf"), 0
    if resume:
        ckpts = _ckpt_dirs(run)
        if not ckpts:
            raise ModelLoadError(f"{run} has no complete checkpoint to resume from; start a new run")
        state, rng = load_checkpoint(ckpts[-1], model, opt)
        step, elapsed, best_val = state["step"], state["elapsed"], state["best_val_loss"]
        tokens_seen = state["tokens_seen"]
        if state.get("world_size", 1) != dist.world:
            raise ConfigError(f"{run} was trained with {state.get('world_size', 1)} processes; resume it with the same")
        torch.set_rng_state(rng["torch"])
        objective.set_rng_state(rng["data"])
        if dist.main:  # rows logged after that checkpoint will be logged again
            _truncate_metrics(run / "metrics.jsonl", step)
    elif dist.main:
        run.mkdir(parents=True, exist_ok=True)
        if objective.tokenizer is not None:
            objective.tokenizer.save(run / "tokenizer")
        atomic_write_json(run / CONFIG_FILE, {"llmlab": {"format_version": FORMAT_VERSION, "kind": "run"},
                                              **cfg.to_dict(), "data": objective.data_info()})
    train_model = model
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(model)
    if t.compile:
        train_model = torch.compile(train_model)
    autocast = t.dtype == "bfloat16"
    metrics = run / "metrics.jsonl"
    emit("start", {"run": str(run), "step": step, "max_iters": t.max_iters, "task": objective.name,
                   "params": sum(p.numel() for p in model.parameters()), "data": objective.data_info(),
                   "config": cfg.to_dict()})

    def checkpoint() -> None:
        if dist.main:
            save_checkpoint(run, model, opt, {"step": step, "elapsed": elapsed, "best_val_loss": best_val,
                                              "tokens_seen": tokens_seen, "world_size": dist.world},
                            {"torch": torch.get_rng_state(), "data": objective.rng_state()}, t.keep_checkpoints)
            emit("checkpoint", {"step": step})

    def do_eval() -> dict[str, float]:
        nonlocal best_val
        model.eval()
        with torch.no_grad():
            ev = objective.evaluate(model)
        model.train()
        row = {"kind": "eval", "step": step, "train_loss": ev["train"], "val_loss": ev["val"],
               **{k: v for k, v in ev.items() if k not in ("train", "val")}, "elapsed": round(elapsed, 3)}
        if dist.main:
            _metrics_append(metrics, row)
            if ev["val"] < best_val:  # keep the best model at the top of the run folder
                best_val = ev["val"]
                atomic_save_tensors(unique_state_dict(model), run / WEIGHTS_FILE, metadata={"format": "llmlab"})
                write_manifest(run)
        emit("eval", {**row, "best_val_loss": best_val})
        return {**ev, "step": step}

    model.train()
    stopped_by = "max_iters"
    window_t, window_tokens = time.perf_counter(), 0
    wall0 = time.perf_counter() - elapsed  # elapsed is wall time, evaluation included, across resumes
    ev: dict[str, float] = {}
    while step < t.max_iters:
        if t.max_time and elapsed >= t.max_time:
            stopped_by = "max_time"
            break
        lr = lr_at(step, t)
        for g in opt.param_groups:
            g["lr"] = lr
        loss_sum = 0.0
        for m in range(t.grad_accum):
            batch = objective.next_batch()
            sync = m == t.grad_accum - 1
            ctx = train_model.no_sync() if not sync and hasattr(train_model, "no_sync") else contextlib.nullcontext()
            with ctx, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = objective.loss(train_model, batch) / t.grad_accum
            loss.backward()
            loss_sum += loss.item()
            n_tok = objective.batch_tokens(batch) * dist.world
            tokens_seen += n_tok
            window_tokens += n_tok
        if t.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        elapsed = time.perf_counter() - wall0
        if step % t.log_interval == 0 or step == t.max_iters:
            if dist.world > 1:  # log the loss of the global batch, not rank 0's share
                import torch.distributed as tdist

                lt = torch.tensor(loss_sum)
                tdist.all_reduce(lt)
                loss_sum = lt.item() / dist.world
            now = time.perf_counter()
            tps = window_tokens / max(1e-9, now - window_t)
            window_t, window_tokens = now, 0
            row = {"kind": "train", "step": step, "loss": round(loss_sum, 5), "lr": lr,
                   "tokens_per_s": round(tps, 1), "elapsed": round(elapsed, 3)}
            if dist.main:
                _metrics_append(metrics, row)
            emit("log", {**row, "max_iters": t.max_iters})
        if step % t.eval_interval == 0:
            ev = do_eval()
            elapsed = time.perf_counter() - wall0
        if t.checkpoint_every and step % t.checkpoint_every == 0 and step < t.max_iters:
            checkpoint()
    if not ev or ev.get("step") != step:
        ev = do_eval()
    checkpoint()
    result = TrainResult(run=run, step=step, train_loss=ev.get("train", float("nan")),
                         val_loss=ev.get("val", float("nan")), best_val_loss=best_val, elapsed=elapsed,
                         tokens_per_s=tokens_seen / max(elapsed, 1e-9), stopped_by=stopped_by)
    if dist.main:
        result.samples = finish_run(run, model, objective)
    emit("end", dataclasses.asdict(result) | {"run": str(run)})
    if dist.world > 1:
        import torch.distributed as tdist

        tdist.barrier()
        tdist.destroy_process_group()
    return result


def finish_run(run: Path, model: torch.nn.Module, objective: Objective) -> list[str]:
    """loss.png, the objective's end-of-run files from the best weights, and the manifest."""
    from .viz import loss_curves

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train_pts = [(r["step"], r["loss"]) for r in rows if r.get("kind") == "train"]
    val_pts = [(r["step"], r["val_loss"]) for r in rows if r.get("kind") == "eval"]
    loss_curves(train_pts, val_pts, run / "loss.png", title=f"{run.name}: loss")
    if not (run / WEIGHTS_FILE).is_file():
        atomic_save_tensors(unique_state_dict(model), run / WEIGHTS_FILE, metadata={"format": "llmlab"})
    best = build_model(model.config)
    load_weights_into(best, run / WEIGHTS_FILE)
    best.tokenizer = objective.tokenizer
    best.eval()
    samples = objective.finish(run, best)
    write_manifest(run)
    return samples


def load_run_for_resume(run: str | Path) -> RunConfig:
    """The RunConfig saved in a run folder (for --resume)."""
    run = Path(run)
    if not run.is_dir():
        raise ModelLoadError(f"--resume {run}: no such run folder")
    d = read_run_config(run)
    try:
        mcfg = ModelConfig.from_dict(d["model"])
        tcfg = TrainConfig(**d["train"])
    except (KeyError, TypeError) as e:
        raise ModelLoadError(f"{run / CONFIG_FILE} is incomplete or from another version ({e})") from None
    return RunConfig(model=mcfg, train=tcfg, preset=d.get("preset", DEFAULT_PRESET))
