"""Encoder-only models trained for what they are good at: masked-language-model pretraining
(`llmlab train --arch bert`), sequence-classification fine-tuning (`llmlab finetune classify`), the
classification metrics (accuracy, macro-F1, confusion matrix) and `classify()`.

Both are trainer Objectives, so they get the GPT trainer's progress, metrics.jsonl, loss.png,
checkpoints, resume and DDP; each run also writes eval.json with its held-out figures."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import atomic_write_json
from .config import ModelConfig
from .data import DEFAULT_SOURCE, BatchSampler, load_corpus, split_corpus
from .errors import ConfigError, DataError, LlmlabError, ModelLoadError
from .train import Objective, RunConfig

MLM_SPECIALS = ["<|pad|>", "<|mask|>", "<|cls|>", "<|sep|>"]
IGNORE = -100


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model inside DDP and torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- masking


def mask_tokens(ids: torch.Tensor, mask_id: int, candidates: torch.Tensor, gen: torch.Generator,
                prob: float = 0.15, maskable: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masked-LM corruption (Devlin et al. 2019, sec. 3.1): each maskable token is chosen with
    probability `prob`; a chosen token is replaced by [MASK] 80% of the time, by a random token 10% of the
    time and kept 10% of the time. The model must predict the original at every chosen position.

    ids (B, T); candidates (V',): the ids a random replacement is drawn from (no special tokens); maskable
    (B, T) bool, default all. Returns (inputs (B, T), labels (B, T) = original id where chosen, else -100).
    All randomness comes from `gen` (three draws of shape (B, T), so a slice of a batch is reproducible)."""
    chosen = torch.rand(ids.shape, generator=gen) < prob  # (B, T)
    if maskable is not None:
        chosen &= maskable
    r = torch.rand(ids.shape, generator=gen)
    rand_ids = candidates[torch.randint(len(candidates), ids.shape, generator=gen)]
    inputs = torch.where(chosen & (r < 0.8), torch.full_like(ids, mask_id), ids)
    inputs = torch.where(chosen & (r >= 0.8) & (r < 0.9), rand_ids, inputs)
    labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE))
    return inputs, labels


def _special_ids(tok: Any) -> list[int]:
    return sorted(set(tok.special_tokens.values()))


def _encode_stream(tok: Any, docs: list[str], sep: int | None) -> np.ndarray:
    """All documents as one id array, separated by `sep` when given."""
    parts: list[np.ndarray] = []
    for ids in tok.encode_batch(docs):
        parts.append(np.asarray(ids, dtype=np.int64))
        if sep is not None:
            parts.append(np.asarray([sep], dtype=np.int64))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


class MLMObjective(Objective):
    """Masked-language modelling for encoder-only models on any corpus the GPT trainer accepts."""

    name = "mlm"
    arch = "bert"

    def setup(self, run: Path, resume: bool) -> ModelConfig:
        t, m = self.cfg.train, self.cfg.model
        docs = load_corpus(t.data, t.text_field, t.encoding_errors)
        train_docs, val_docs = split_corpus(docs, t.val_fraction)
        self.n_docs = (len(train_docs), len(val_docs))
        self.tokenizer = self.tokenizer_for(run, resume, train_docs, MLM_SPECIALS)
        tok = self.tokenizer
        if tok.mask_id is None or tok.pad_id is None:
            raise ConfigError(f"the {tok.kind} tokenizer has no mask or pad token; masked-LM training needs both")
        sep = tok.sep_id if tok.sep_id is not None else tok.eos_id
        self.train_ids = _encode_stream(tok, train_docs, sep)
        self.val_ids = _encode_stream(tok, val_docs, sep)
        specials = _special_ids(tok)
        self.specials = torch.tensor(specials)
        self.candidates = torch.tensor([i for i in range(tok.vocab_size) if i not in set(specials)])
        self.global_batch = t.batch_size // t.grad_accum
        # every rank draws and masks the whole global batch and keeps its rows, so the loss can be normalised by
        # the global count of masked tokens (DDP then gives the single-process gradient)
        self.sampler = BatchSampler(self.train_ids, m.block_size, self.global_batch, t.seed + 1)
        self.mask_gen = _gen(t.seed + 2)
        return m.replace(vocab_size=tok.vocab_size, pad_token_id=tok.pad_id, mlm_head=True)

    def data_info(self) -> dict[str, Any]:
        t = self.cfg.train
        return {"source": t.data or DEFAULT_SOURCE, "task": "mlm", "val_fraction": t.val_fraction,
                "train_docs": self.n_docs[0], "val_docs": self.n_docs[1], "train_tokens": int(len(self.train_ids)),
                "val_tokens": int(len(self.val_ids)), "mask_prob": t.mask_prob}

    def _mask(self, x: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        tok = self.tokenizer
        return mask_tokens(x, tok.mask_id, self.candidates, gen, self.cfg.train.mask_prob,
                           ~torch.isin(x, self.specials))

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(inputs, labels) of this rank's rows, and the number of masked tokens in the global batch."""
        x, _ = self.sampler.next()  # (global batch, T)
        inp, lab = self._mask(x, self.mask_gen)
        per = x.size(0) // self.dist.world
        rows = slice(self.dist.rank * per, (self.dist.rank + 1) * per)
        return inp[rows], lab[rows], int((lab != IGNORE).sum())

    @staticmethod
    def _logits(model: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Vocabulary logits (N, V) at the N chosen positions, and their targets (N,)."""
        h = model(inputs)  # (B, T, C), through the DDP wrapper when there is one
        sel = labels != IGNORE  # (B, T)
        return unwrap(model).mlm_logits(h[sel]), labels[sel]

    def loss(self, model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor, int]) -> torch.Tensor:
        """Cross-entropy summed over this rank's masked tokens / the global count (x world, as DDP averages
        the ranks' gradients): the mean over every masked token of the global batch."""
        inputs, labels, n_global = batch
        logits, target = self._logits(model, inputs, labels)
        if target.numel() == 0:  # nothing chosen in these rows: a zero loss that still has a graph
            return unwrap(model).mlm_logits(model(inputs)).sum() * 0.0
        return F.cross_entropy(logits.float(), target, reduction="sum") * (self.dist.world / max(n_global, 1))

    def _eval_split(self, model: torch.nn.Module, ids: np.ndarray) -> tuple[float, float, int]:
        """(mean loss, accuracy, count) over the masked tokens of eval_iters fixed batches of one split."""
        t, block = self.cfg.train, self.cfg.model.block_size
        if len(ids) <= block + 1:
            return float("nan"), float("nan"), 0
        sampler = BatchSampler(ids, block, self.global_batch, t.seed + 7)
        gen = _gen(t.seed + 8)
        total, correct, n = 0.0, 0, 0
        for _ in range(t.eval_iters):
            x, _ = sampler.next()
            inp, lab = self._mask(x, gen)  # (B, T)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=t.dtype == "bfloat16"):
                logits, target = self._logits(model, inp, lab)
            total += F.cross_entropy(logits.float(), target, reduction="sum").item()
            correct += int((logits.argmax(-1) == target).sum())
            n += target.numel()
        return total / max(n, 1), correct / max(n, 1), n

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        tr, _, _ = self._eval_split(model, self.train_ids)
        va, acc, _ = self._eval_split(model, self.val_ids)
        return {"train": tr, "val": va, "val_masked_accuracy": acc}

    def rng_state(self) -> torch.Tensor:
        return torch.cat([self.sampler.state(), self.mask_gen.get_state()])

    def set_rng_state(self, s: torch.Tensor) -> None:
        half = s.numel() // 2
        self.sampler.set_state(s[:half].clone())
        self.mask_gen.set_state(s[half:].clone())

    def finish(self, run: Path, best: torch.nn.Module) -> list[str]:
        """eval.json (val loss, masked-token accuracy) and a few filled-in val windows as samples."""
        from .checkpoint import atomic_write_bytes

        with torch.no_grad():
            va, acc, n = self._eval_split(best, self.val_ids)
        atomic_write_json(run / "eval.json", {"task": "mlm", "val_loss": va, "masked_accuracy": acc,
                                              "masked_tokens": n, "mask_prob": self.cfg.train.mask_prob})
        samples = []
        block = self.cfg.model.block_size
        if len(self.val_ids) > block + 1 and self.cfg.train.num_samples:
            x, _ = BatchSampler(self.val_ids, block, self.cfg.train.num_samples, self.cfg.train.seed + 9).next()
            inp, lab = self._mask(x, _gen(self.cfg.train.seed + 10))
            with torch.no_grad():
                pred = best.mlm_logits(best(inp)).argmax(-1)
            filled = torch.where(lab != IGNORE, pred, inp)
            tok = self.tokenizer
            for i in range(x.size(0)):
                samples.append(f"masked: {tok.decode(inp[i].tolist(), skip_special_tokens=False)}\n"
                               f"filled: {tok.decode(filled[i].tolist(), skip_special_tokens=False)}")
        text = "".join(f"--- sample {i + 1} ---\n{s}\n" for i, s in enumerate(samples))
        atomic_write_bytes(run / "samples.txt", text.encode())
        return samples


# ----------------------------------------------------------------------------- classification metrics


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], n_classes: int) -> np.ndarray:
    """(n_classes, n_classes) counts: row = true class, column = predicted class."""
    m = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(m, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return m


def accuracy(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Fraction of predictions equal to the truth."""
    yt, yp = np.asarray(y_true), np.asarray(y_pred)
    return float((yt == yp).mean()) if len(yt) else float("nan")


def per_class_scores(y_true: Sequence[int], y_pred: Sequence[int], n_classes: int) -> dict[str, np.ndarray]:
    """Precision TP/(TP+FP), recall TP/(TP+FN), F1 = 2TP/(2TP+FP+FN) and support per class (0 where a
    denominator is 0, as scikit-learn's zero_division=0)."""
    m = confusion_matrix(y_true, y_pred, n_classes)
    tp = np.diag(m).astype(float)
    fp, fn = m.sum(0) - tp, m.sum(1) - tp

    def div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.divide(a, b, out=np.zeros_like(a), where=b > 0)

    return {"precision": div(tp, tp + fp), "recall": div(tp, tp + fn), "f1": div(2 * tp, 2 * tp + fp + fn),
            "support": m.sum(1), "predicted": m.sum(0)}


def macro_f1(y_true: Sequence[int], y_pred: Sequence[int], n_classes: int) -> float:
    """Unweighted mean of the per-class F1 over the classes that occur in the truth or the predictions
    (scikit-learn's f1_score(average="macro"))."""
    s = per_class_scores(y_true, y_pred, n_classes)
    present = (s["support"] + s["predicted"]) > 0
    return float(s["f1"][present].mean()) if present.any() else float("nan")


def confusion_png(matrix: np.ndarray, labels: Sequence[str], path: str | Path, title: str = "") -> Path:
    """The confusion matrix as a heat map with counts (rows: true label, columns: predicted)."""
    from .viz import _save, plt

    n = len(labels)
    short = [lab if len(lab) <= 28 else lab[:26] + "…" for lab in labels]
    fig, ax = plt.subplots(figsize=(0.7 * n + 3.5, 0.6 * n + 2.5))
    norm = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(n), short, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), short, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center", fontsize=7,
                    color="white" if norm[i, j] > 0.5 else "black")
    ax.set_title(title or "confusion matrix (held-out split)")
    return _save(fig, path)


# ----------------------------------------------------------------------------- labelled data


def read_labelled(path: str | Path, text_field: str = "text", label_field: str = "label"
                  ) -> tuple[list[str], list[str]]:
    """(texts, labels) from a CSV file with a header or a JSONL file of objects; labels as strings."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"--data {p}: no such file; give a CSV or JSONL file with {text_field!r} and "
                        f"{label_field!r} fields (make one with `llmlab dataset pydoc-topics --out FILE.csv`)")
    try:
        raw = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{p} is not UTF-8 text; convert it to UTF-8") from None
    texts, labels = [], []
    if p.suffix.lower() == ".jsonl":
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{p}:{n} is not valid JSON ({e.msg}); fix that line") from None
            if not isinstance(obj, dict):
                raise DataError(f"{p}:{n} is not a JSON object; write one {{\"{text_field}\": ..., "
                                f"\"{label_field}\": ...}} object per line")
            missing = [f for f in (text_field, label_field) if f not in obj]
            if missing:
                raise DataError(f"{p}:{n} has no field {missing[0]!r}; name the fields with --text-field / "
                                "--label-field")
            if not isinstance(obj[text_field], str) or isinstance(obj[label_field], (dict, list)):
                raise DataError(f"{p}:{n}: {text_field!r} must be a string and {label_field!r} a string or number")
            texts.append(obj[text_field])
            labels.append(str(obj[label_field]))
    else:
        reader = csv.DictReader(raw.splitlines())
        cols = reader.fieldnames or []
        missing = [f for f in (text_field, label_field) if f not in cols]
        if missing:
            raise DataError(f"{p} has no column {missing[0]!r} (columns: {', '.join(cols) or 'none'}); name the "
                            "columns with --text-field / --label-field")
        for n, row in enumerate(reader, 2):
            if row[text_field] is None or row[label_field] is None:
                raise DataError(f"{p}:{n} has fewer fields than the header; fix that row")
            texts.append(row[text_field])
            labels.append(row[label_field])
    if not texts:
        raise DataError(f"{p} holds no examples; give rows of {text_field!r} and {label_field!r}")
    for i, t in enumerate(texts):
        if not t.strip():
            raise DataError(f"{p}: example {i + 1} has an empty {text_field!r}; remove it or give it text")
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise DataError(f"{p}: every example has the label {classes[0]!r}; a classifier needs at least two "
                        "classes — add examples of another class")
    return texts, labels


def split_examples(labels: Sequence[str], val_fraction: float = 0.2, seed: int = 0) -> tuple[list[int], list[int]]:
    """Stratified, deterministic (train indices, val indices): each class's examples are shuffled with
    `seed` and ceil(val_fraction * n) of them (none for a class with one example) are held out."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    rng = np.random.default_rng(seed)
    by_class: dict[str, list[int]] = {}
    for i, lab in enumerate(labels):
        by_class.setdefault(lab, []).append(i)
    train, val = [], []
    for lab in sorted(by_class):
        idx = by_class[lab]
        idx = [idx[j] for j in rng.permutation(len(idx))]
        k = min(len(idx) - 1, math.ceil(val_fraction * len(idx)))
        val += idx[:k]
        train += idx[k:]
    if not val:
        raise DataError("the held-out split is empty; give more examples or a larger --val-fraction")
    return sorted(train), sorted(val)


# ----------------------------------------------------------------------------- fine-tuning


def class_logits(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Class logits (B, K) of an encoder with a classification head: its forward (through any DDP wrapper),
    then the head over the mean-pooled (or [CLS]-pooled) hidden states."""
    raw = unwrap(model)
    h = model(ids, mask)  # (B, T, C)
    pooled = torch.tanh(raw.pooler(h[:, 0])) if raw.pooler is not None else raw.pool(h, mask)  # (B, C)
    return raw.classifier(raw.drop(pooled))


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, T), mask (B, T)) right-padded to the longest sequence."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def encode_texts(tok: Any, texts: Sequence[str], max_len: int) -> list[list[int]]:
    """Token ids of each text ([CLS] ... [SEP] for WordPiece), cut to max_len (the last token kept)."""
    out = []
    for ids in tok.encode_batch(list(texts), add_special_tokens=True):
        if len(ids) > max_len:
            ids = ids[: max_len - 1] + ids[-1:] if tok.kind == "wordpiece" else ids[:max_len]
        out.append(ids or [tok.unk_id if tok.unk_id is not None else 0])
    return out


def load_base_encoder(base: str) -> torch.nn.Module:
    """The encoder to fine-tune: an llmlab encoder run folder or `minilm`; anything else is refused."""
    from .interop import load

    if not base:
        raise ConfigError("give the encoder to fine-tune with --base: an llmlab run trained with --arch bert, "
                          "or minilm")
    model = load(base)
    arch = model.config.arch
    if arch != "bert":
        kind = {"gpt": "decoder-only", "seq2seq": "encoder-decoder"}.get(arch, arch)
        raise ModelLoadError(f"--base {base} is a {kind} ({arch}) model; classification fine-tunes an encoder: "
                             "give a run trained with --arch bert, or minilm")
    if model.tokenizer is None:
        raise ModelLoadError(f"--base {base} has no tokenizer folder; give a run folder made by llmlab train")
    return model


class ClassifyObjective(Objective):
    """Sequence classification: fine-tune an encoder (an llmlab encoder run or MiniLM) on (text, label)."""

    name = "classify"

    def setup(self, run: Path, resume: bool) -> ModelConfig:
        from .tokenizers import load_tokenizer

        t = self.cfg.train
        if t.data is None:
            raise ConfigError("give the labelled examples with --data FILE (CSV or JSONL with text and label)")
        texts, labels = read_labelled(t.data, t.text_field, t.label_field)
        tr, va = split_examples(labels, t.val_fraction)
        self._base_state: dict[str, torch.Tensor] | None = None
        if resume:
            mcfg = self.cfg.model
            self.labels = list(mcfg.extra["labels"])
            self.tokenizer = load_tokenizer(run / "tokenizer")
        else:
            self.labels = sorted(set(labels))
            base = load_base_encoder(t.base)
            self.tokenizer = base.tokenizer
            extra = {**base.config.extra, "labels": self.labels, "base": t.base, "task": "classify"}
            mcfg = base.config.replace(n_classes=len(self.labels), mlm_head=False, pooler=False, extra=extra)
            self._base_state = {k: v for k, v in base.state_dict().items()
                                if not k.startswith(("classifier.", "pooler.", "mlm_"))}
        unknown = sorted(set(labels) - set(self.labels))
        if unknown:
            raise DataError(f"{t.data} has labels {unknown[:3]} that the run was not trained on; resume with its "
                            "original data")
        index = {lab: i for i, lab in enumerate(self.labels)}
        y = [index[lab] for lab in labels]
        self.max_len = min(t.max_len, mcfg.block_size)
        enc = encode_texts(self.tokenizer, texts, self.max_len)
        self.pad_id = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0
        self.train_x, self.train_y = [enc[i] for i in tr], torch.tensor([y[i] for i in tr])
        self.val_x, self.val_y = [enc[i] for i in va], torch.tensor([y[i] for i in va])
        self.val_texts = [texts[i] for i in va]
        self.global_batch = t.batch_size // t.grad_accum
        self.gen = _gen(t.seed + 1)
        return mcfg

    def _init_from_base(self, model: torch.nn.Module) -> None:
        """Copy the base encoder's weights in (once, before the first step of a new run)."""
        if self._base_state is None:
            return
        missing, unexpected = unwrap(model).load_state_dict(self._base_state, strict=False)
        bad = [k for k in missing if not k.startswith(("classifier.", "pooler."))]
        if bad or unexpected:
            raise ModelLoadError(f"the base weights do not fit the classifier (missing {bad[:3]}, unexpected "
                                 f"{unexpected[:3]})")
        self._base_state = None

    def data_info(self) -> dict[str, Any]:
        t = self.cfg.train
        return {"source": t.data, "task": "classify", "base": t.base, "labels": self.labels,
                "text_field": t.text_field, "label_field": t.label_field, "val_fraction": t.val_fraction,
                "train_examples": len(self.train_x), "val_examples": len(self.val_x),
                "train_tokens": int(sum(len(x) for x in self.train_x))}

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = torch.randint(len(self.train_x), (self.global_batch,), generator=self.gen)
        per = self.global_batch // self.dist.world
        idx = idx[self.dist.rank * per:(self.dist.rank + 1) * per].tolist()
        ids, mask = pad_batch([self.train_x[i] for i in idx], self.pad_id)
        return ids, mask, self.train_y[idx]

    def batch_tokens(self, batch: Any) -> int:
        return int(batch[1].sum())

    def loss(self, model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        self._init_from_base(model)
        ids, mask, y = batch
        return F.cross_entropy(class_logits(model, ids, mask).float(), y,
                               label_smoothing=self.cfg.train.label_smoothing)

    def predict(self, model: torch.nn.Module, xs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (N, K), predicted classes (N,)) in batches, model in eval mode."""
        outs = []
        bs = max(1, self.global_batch)
        for i in range(0, len(xs), bs):
            ids, mask = pad_batch(xs[i:i + bs], self.pad_id)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.cfg.train.dtype == "bfloat16"):
                outs.append(class_logits(model, ids, mask).float())
        logits = torch.cat(outs)
        return logits, logits.argmax(-1)

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Loss, accuracy and macro-F1 on the whole held-out split; loss on a fixed slice of train."""
        self._init_from_base(model)
        n_tr = min(len(self.train_x), self.cfg.train.eval_iters * max(1, self.global_batch))
        tr_logits, _ = self.predict(model, self.train_x[:n_tr])
        va_logits, pred = self.predict(model, self.val_x)
        K = len(self.labels)
        return {"train": F.cross_entropy(tr_logits, self.train_y[:n_tr]).item(),
                "val": F.cross_entropy(va_logits, self.val_y).item(),
                "val_accuracy": accuracy(self.val_y.tolist(), pred.tolist()),
                "val_macro_f1": macro_f1(self.val_y.tolist(), pred.tolist(), K)}

    def rng_state(self) -> torch.Tensor:
        return self.gen.get_state()

    def set_rng_state(self, s: torch.Tensor) -> None:
        self.gen.set_state(s)

    def finish(self, run: Path, best: torch.nn.Module) -> list[str]:
        """eval.json (accuracy, macro-F1, confusion matrix, per-class scores) and confusion.png."""
        with torch.no_grad():
            logits, pred = self.predict(best, self.val_x)
        yt, yp, K = self.val_y.tolist(), pred.tolist(), len(self.labels)
        m = confusion_matrix(yt, yp, K)
        s = per_class_scores(yt, yp, K)
        result = {"task": "classify", "accuracy": accuracy(yt, yp), "macro_f1": macro_f1(yt, yp, K),
                  "val_loss": F.cross_entropy(logits, self.val_y).item(), "n_val": len(yt),
                  "n_train": len(self.train_x), "labels": self.labels, "confusion": m.tolist(),
                  "per_class": {lab: {"precision": float(s["precision"][i]), "recall": float(s["recall"][i]),
                                      "f1": float(s["f1"][i]), "support": int(s["support"][i])}
                                for i, lab in enumerate(self.labels)},
                  "chance_accuracy": float(np.bincount(yt, minlength=K).max() / len(yt))}
        confusion_png(m, self.labels, run / "confusion.png",
                      title=f"{run.name}: accuracy {result['accuracy']:.3f}, macro-F1 {result['macro_f1']:.3f}")
        atomic_write_json(run / "eval.json", result)
        samples = [f"accuracy {result['accuracy']:.3f}  macro-F1 {result['macro_f1']:.3f}  on {len(yt)} held-out "
                   f"examples (majority class: {result['chance_accuracy']:.3f}); confusion matrix: "
                   f"{run / 'confusion.png'}"]
        return samples


# ----------------------------------------------------------------------------- using a classifier


def classifier_labels(model: torch.nn.Module) -> list[str]:
    """The label names of a fine-tuned classifier (stored in its config)."""
    labels = model.config.extra.get("labels") if model.config.n_classes else None
    if model.config.arch != "bert" or not labels:
        raise LlmlabError("this model is not a fine-tuned classifier; make one with `llmlab finetune classify`")
    return list(labels)


@torch.no_grad()
def classify(model: torch.nn.Module | str | Path, texts: Sequence[str], max_len: int | None = None
             ) -> list[dict[str, Any]]:
    """Label and class probabilities of each text: [{"label": str, "probabilities": {label: p}}], for a
    classifier model or the run folder of one (texts cut to the run's max_len unless one is given)."""
    if not isinstance(model, torch.nn.Module):
        from .checkpoint import is_run_folder, read_run_config
        from .interop import load

        if max_len is None and is_run_folder(model):
            max_len = read_run_config(model).get("train", {}).get("max_len")
        model = load(model)
    max_len = max_len or model.config.block_size
    labels = classifier_labels(model)
    tok = model.tokenizer
    if isinstance(texts, str):
        texts = [texts]
    if any(not t.strip() for t in texts):
        raise LlmlabError("a text to classify is empty; give some text")
    model.eval()
    enc = encode_texts(tok, texts, min(max_len, model.config.block_size))  # max_len >= 2 (validated in training)
    ids, mask = pad_batch(enc, tok.pad_id if tok.pad_id is not None else 0)
    probs = class_logits(model, ids, mask).float().softmax(-1)  # (B, K)
    out = []
    for row in probs.tolist():
        best = int(np.argmax(row))
        out.append({"label": labels[best], "probabilities": dict(zip(labels, row))})
    return out


def make_finetune_config(base: str, data: str, overrides: dict[str, Any] | None = None) -> RunConfig:
    """The RunConfig of a classification fine-tune with defaults that suit a pretrained encoder on a CPU
    (lr 1e-4, 300 steps of 16, evaluation every 50), then the given overrides."""
    from .train import resolve_config

    defaults = dict(task="classify", arch="bert", base=base, data=data, lr=1e-4, min_lr=1e-5, warmup_iters=30,
                    max_iters=300, batch_size=16, eval_interval=50, eval_iters=4, val_fraction=0.2,
                    weight_decay=0.01, num_samples=0)
    return resolve_config(overrides={**defaults, **(overrides or {})})


__all__ = ["MLMObjective", "ClassifyObjective", "mask_tokens", "confusion_matrix", "accuracy", "macro_f1",
           "per_class_scores", "confusion_png", "read_labelled", "split_examples", "classify",
           "classifier_labels", "make_finetune_config", "load_base_encoder"]
