"""Sequence classification: fine-tune an encoder (an llmlab BERT run or MiniLM) on labelled text, and classify."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from llmlab.checkpoint import atomic_write_json, is_run_folder, read_run_config
from llmlab.config import ModelConfig
from llmlab.data import pad_batch, read_jsonl
from llmlab.errors import ConfigError, DataError, LlmlabError, ModelLoadError
from llmlab.inspect.viz import confusion_png
from llmlab.interop import load
from llmlab.metrics import accuracy, confusion_matrix, macro_f1, per_class_scores
from llmlab.runtime import autocast, unwrap
from llmlab.tokenizers import load_tokenizer
from llmlab.train.config import RunConfig, resolve_config
from llmlab.train.objective import Objective, _gen


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
        example = (f'{{"{text_field}": ..., "{label_field}": ...}} object (name the fields with --text-field / '
                   "--label-field)")
        for n, obj in read_jsonl(p, (text_field, label_field), example):
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


def class_logits(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Class logits (B, K) of an encoder with a classification head: its forward (through any DDP wrapper),
    then the head over the mean-pooled (or [CLS]-pooled) hidden states."""
    return unwrap(model).class_head(model(ids, mask), mask)  # the encoder through the wrapper, then the head


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

    if not base:
        raise ConfigError("give the encoder to fine-tune with --base: an llmlab run trained with "
                          "`llmlab train --arch bert`, or minilm")
    model = load(base)
    arch = model.config.arch
    if arch != "bert":
        kind = {"gpt": "decoder-only", "seq2seq": "encoder-decoder"}.get(arch, arch)
        raise ModelLoadError(f"--base {base} is a {kind} ({arch}) model; classification fine-tunes an encoder: "
                             "give a run trained with `llmlab train --arch bert`, or minilm")
    if model.tokenizer is None:
        raise ModelLoadError(f"--base {base} has no tokenizer folder; give a run folder made by llmlab train")
    return model


class ClassifyObjective(Objective):
    """Sequence classification: fine-tune an encoder (an llmlab encoder run or MiniLM) on (text, label)."""

    name = "classify"

    def setup(self, run: Path, resume: bool) -> ModelConfig:

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
            with autocast(self.cfg.train.dtype):
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

    defaults = dict(task="classify", arch="bert", base=base, data=data, lr=1e-4, min_lr=1e-5, warmup_iters=30,
                    max_iters=300, batch_size=16, eval_interval=50, eval_iters=4, val_fraction=0.2,
                    weight_decay=0.01, num_samples=0)
    return resolve_config(overrides={**defaults, **(overrides or {})})
