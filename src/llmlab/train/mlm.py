"""Masked-language-model pretraining for encoder-only (BERT) models: BERT's 80/10/10 masking."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from llmlab.checkpoint import atomic_write_bytes, atomic_write_json
from llmlab.config import ModelConfig
from llmlab.data import DEFAULT_SOURCE, BatchSampler, load_corpus, split_corpus
from llmlab.errors import ConfigError
from llmlab.runtime import autocast, unwrap
from llmlab.train.objective import IGNORE, Objective, _gen

MLM_SPECIALS = ["<|pad|>", "<|mask|>", "<|cls|>", "<|sep|>"]


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
        train_docs, val_docs = split_corpus(docs, t.val_fraction, t.split, t.split_seed)
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
                "split": t.split, "split_seed": t.split_seed, "train_docs": self.n_docs[0],
                "val_docs": self.n_docs[1], "train_tokens": int(len(self.train_ids)),
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
            with autocast(t.dtype):
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
