"""Encoder-decoder objectives: span-corruption denoising (T5) and supervised source -> target pairs."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from llmlab.checkpoint import atomic_write_bytes, atomic_write_json
from llmlab.config import ModelConfig
from llmlab.data import DEFAULT_SOURCE, load_corpus, pad_batch, read_jsonl, split_corpus
from llmlab.errors import ConfigError, DataError
from llmlab.generate.causal import GenerationConfig
from llmlab.generate.seq2seq import decode_target, generate_seq2seq_ids, seq2seq_roles
from llmlab.metrics import chrf, exact_match
from llmlab.runtime import autocast
from llmlab.train.objective import IGNORE, Objective

N_SENTINELS = 32


SENTINELS = [f"<|extra_{i}|>" for i in range(N_SENTINELS)]


SEQ2SEQ_SPECIALS = ["<|pad|>", "<|bos|>", "<|eos|>", *SENTINELS]


EVAL_GENERATE = 64  # held-out examples generated at each evaluation (all of them, up to 1000, at the end)


def _segments(n: int, k: int, gen: torch.Generator) -> list[int]:
    """A uniformly random split of n items into k non-empty consecutive segments (their lengths)."""
    if k <= 1:
        return [n]
    cuts = sorted((torch.randperm(n - 1, generator=gen)[: k - 1] + 1).tolist())
    return [b - a for a, b in zip([0, *cuts], [*cuts, n])]


def span_noise(length: int, density: float, mean_span: float, gen: torch.Generator,
               max_spans: int = N_SENTINELS) -> list[tuple[int, int]]:
    """Noise spans [(start, end)] of T5's span corruption (Raffel et al. 2020, sec. 3.1.4): round(density *
    length) tokens are corrupted, in round(noise / mean_span) spans; the noise and the kept tokens are each
    split at random into that many non-empty runs, and the runs alternate (kept first)."""
    n_noise = min(max(1, round(length * density)), length - 1)
    n_spans = max(1, min(round(n_noise / mean_span), n_noise, length - n_noise, max_spans))
    noise = _segments(n_noise, n_spans, gen)
    keep = _segments(length - n_noise, n_spans, gen)
    spans, pos = [], 0
    for k, m in zip(keep, noise):
        pos += k
        spans.append((pos, pos + m))
        pos += m
    return spans


def corrupt(ids: Sequence[int], spans: list[tuple[int, int]], sentinels: Sequence[int], eos: int
            ) -> tuple[list[int], list[int]]:
    """(source, target): each span replaced by a sentinel in the source; the target lists each sentinel
    followed by the tokens it hides, then eos."""
    src, tgt, last = [], [], 0
    for i, (a, b) in enumerate(spans):
        src += list(ids[last:a]) + [sentinels[i]]
        tgt += [sentinels[i]] + list(ids[a:b])
        last = b
    src += list(ids[last:])
    return src, tgt + [eos]


def read_pairs(path: str | Path) -> list[tuple[str, str]]:
    """(source, target) pairs of a JSONL file of {"source": str, "target": str} objects."""
    p = Path(path)
    pairs = []
    example = '{"source": ..., "target": ...} object (or {"text": ...} lines to train by denoising)'
    for n, obj in read_jsonl(p, ("source", "target"), example):
        for f in ("source", "target"):
            if not isinstance(obj[f], str):
                raise DataError(f'{p}:{n}: "{f}" is not a string; give source and target as text')
        pairs.append((obj["source"], obj["target"]))
    if len(pairs) < 2:
        raise DataError(f"{p} has {len(pairs)} source/target pair(s); give at least 2 (one is held out)")
    return pairs


def is_pairs_file(data: str | None, text_field: str = "text") -> bool:
    """Whether --data is a JSONL file of source/target pairs (not a corpus of `text_field` documents)."""
    if not data or not data.lower().endswith(".jsonl") or not Path(data).is_file():
        return False
    with open(data, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    return True  # read_pairs names the line
                return not (isinstance(obj, dict) and text_field in obj and "source" not in obj)
    return False



def _split_pairs(n: int, val_fraction: float) -> tuple[list[int], list[int]]:
    """Deterministic (train, val) indices: a fixed permutation, the last ceil(fraction * n) held out."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    perm = np.random.default_rng(0).permutation(n).tolist()
    k = min(n - 1, max(1, math.ceil(n * val_fraction)))
    return sorted(perm[:-k]), sorted(perm[-k:])


@dataclass
class Batch:
    src: torch.Tensor  # (B, S)
    src_mask: torch.Tensor  # (B, S)
    dec_in: torch.Tensor  # (B, T): bos + target[:-1]
    labels: torch.Tensor  # (B, T): target, -100 at padding
    n_global: int = 0  # target tokens in the global batch (all ranks); 0 = this batch's own


def make_batch(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], bos: int, pad: int) -> Batch:
    """Right-padded tensors for teacher forcing: the decoder reads bos + target[:-1] and predicts target."""
    src, smask = pad_batch([s for s, _ in pairs], pad)
    dec, _ = pad_batch([[bos, *t[:-1]] for _, t in pairs], pad)
    lab, lmask = pad_batch([t for _, t in pairs], pad)
    return Batch(src, smask, dec, lab.masked_fill(lmask == 0, IGNORE))


def seq2seq_loss(model: torch.nn.Module, b: Batch, label_smoothing: float = 0.0, world: int = 1) -> torch.Tensor:
    """Cross-entropy of the target tokens under teacher forcing (optionally label-smoothed, Szegedy et al.
    2016: the target distribution puts 1 - eps on the right token and eps / V on every token), averaged over
    the target tokens of the global batch (b.n_global; x world since DDP averages the ranks' gradients)."""
    logits = model(b.src, b.dec_in, b.src_mask)  # (B, T, V)
    total = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), b.labels.reshape(-1),
                            ignore_index=IGNORE, label_smoothing=label_smoothing, reduction="sum")
    n = b.n_global or int((b.labels != IGNORE).sum())
    return total * (world / max(n, 1))


class Seq2SeqObjective(Objective):
    """Encoder-decoder training: supervised on JSONL source/target pairs, else span-corruption denoising."""

    name = "seq2seq"
    arch = "seq2seq"

    def setup(self, run: Path, resume: bool) -> ModelConfig:
        t, m = self.cfg.train, self.cfg.model
        self.block = m.block_size
        self.supervised = is_pairs_file(t.data, t.text_field)
        if self.supervised:
            pairs = read_pairs(t.data)
            tr, va = _split_pairs(len(pairs), t.val_fraction)
            self.train_pairs, self.val_pairs = [pairs[i] for i in tr], [pairs[i] for i in va]
            tok_docs = [x for s, tg in self.train_pairs for x in (s, tg)]
        else:
            docs = load_corpus(t.data, t.text_field, t.encoding_errors)
            train_docs, val_docs = split_corpus(docs, t.val_fraction, t.split, t.split_seed)
            self.n_docs = (len(train_docs), len(val_docs))
            tok_docs = train_docs
        self.tokenizer = self.tokenizer_for(run, resume, tok_docs, SEQ2SEQ_SPECIALS)
        tok = self.tokenizer
        self.bos, self.eos, self.pad = seq2seq_roles(tok)
        self.sentinels = [tok.token_to_id(s) for s in SENTINELS]
        if self.supervised:
            self.train_enc = self._encode_pairs(self.train_pairs)
            self.val_enc = self._encode_pairs(self.val_pairs)
        else:
            if any(s is None for s in self.sentinels):
                raise ConfigError("the tokenizer has no sentinel tokens; denoising needs them")
            self.train_ids = self._stream(train_docs)
            self.val_ids = self._stream(val_docs)
            for name, ids in (("train", self.train_ids), ("val", self.val_ids)):
                if len(ids) < 8:
                    raise DataError(f"the {name} split has only {len(ids)} tokens; give more text")
        self.global_batch = t.batch_size // t.grad_accum
        self.gen = torch.Generator().manual_seed(t.seed + 1)
        pad_kw = {"pad_token_id": self.pad}
        return m.replace(vocab_size=tok.vocab_size, **pad_kw)

    # ---- data
    def _encode_pairs(self, pairs: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
        tok = self.tokenizer
        srcs = tok.encode_batch([s for s, _ in pairs])
        tgts = tok.encode_batch([t for _, t in pairs])
        return [((s[: self.block] or [self.eos]), t[: self.block - 1] + [self.eos]) for s, t in zip(srcs, tgts)]

    def _stream(self, docs: list[str]) -> np.ndarray:
        parts = []
        for ids in self.tokenizer.encode_batch(docs):
            parts += [np.asarray(ids, dtype=np.int64), np.asarray([self.eos], dtype=np.int64)]
        return np.concatenate(parts)

    def _window_len(self, ids: np.ndarray) -> int:
        return min(self.block, len(ids) - 1)

    def _denoise_examples(self, ids: np.ndarray, n: int, gen: torch.Generator
                          ) -> list[tuple[list[int], list[int]]]:
        """n corrupted windows of the id stream: (source with sentinels, target spans)."""
        t, L = self.cfg.train, self._window_len(ids)
        starts = torch.randint(len(ids) - L, (n,), generator=gen).tolist()
        out = []
        for s in starts:
            spans = span_noise(L, t.mask_prob, t.span_len, gen)
            out.append(corrupt(ids[s:s + L].tolist(), spans, self.sentinels, self.eos))
        return out

    def _draw(self, gen: torch.Generator, n: int, split: str = "train") -> list[tuple[list[int], list[int]]]:
        if self.supervised:
            enc = self.train_enc if split == "train" else self.val_enc
            return [enc[i] for i in torch.randint(len(enc), (n,), generator=gen).tolist()]
        return self._denoise_examples(self.train_ids if split == "train" else self.val_ids, n, gen)

    def data_info(self) -> dict[str, Any]:
        t = self.cfg.train
        info: dict[str, Any] = {"source": t.data or DEFAULT_SOURCE, "task": "seq2seq",
                                "mode": "supervised" if self.supervised else "denoising",
                                "val_fraction": t.val_fraction, "split": t.split, "split_seed": t.split_seed}
        if self.supervised:
            info |= {"train_pairs": len(self.train_enc), "val_pairs": len(self.val_enc),
                     "train_tokens": int(sum(len(s) + len(g) for s, g in self.train_enc))}
        else:
            info |= {"train_docs": self.n_docs[0], "val_docs": self.n_docs[1], "train_tokens": int(len(self.train_ids)),
                     "val_tokens": int(len(self.val_ids)), "mask_prob": t.mask_prob, "span_len": t.span_len}
        return info

    def next_batch(self) -> Batch:
        """This rank's slice of a global batch (every rank draws the same one)."""
        ex = self._draw(self.gen, self.global_batch)
        per = self.global_batch // self.dist.world
        b = make_batch(ex[self.dist.rank * per:(self.dist.rank + 1) * per], self.bos, self.pad)
        b.n_global = sum(len(t) for _, t in ex)
        return b

    def batch_tokens(self, batch: Batch) -> int:
        return int(batch.src_mask.sum()) + int((batch.labels != IGNORE).sum())

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        smoothing = self.cfg.train.label_smoothing if self.supervised else 0.0
        return seq2seq_loss(model, batch, smoothing, self.dist.world)

    # ---- evaluation
    def _eval_examples(self, split: str, n: int) -> list[tuple[list[int], list[int]]]:
        """A fixed set of examples of a split (the same at every evaluation)."""
        if self.supervised:
            enc = self.train_enc if split == "train" else self.val_enc
            return enc[:n]
        gen = torch.Generator().manual_seed(self.cfg.train.seed + (7 if split == "train" else 8))
        return self._denoise_examples(self.train_ids if split == "train" else self.val_ids, n, gen)

    def _loss_and_accuracy(self, model: torch.nn.Module, ex: list[tuple[list[int], list[int]]]
                           ) -> tuple[float, float]:
        """Mean target-token loss (no smoothing) and teacher-forced next-token accuracy."""
        total, correct, count = 0.0, 0, 0
        bs = max(1, self.global_batch)
        for i in range(0, len(ex), bs):
            b = make_batch(ex[i:i + bs], self.bos, self.pad)
            with autocast(self.cfg.train.dtype):
                logits = model(b.src, b.dec_in, b.src_mask).float()
            sel = b.labels != IGNORE
            total += F.cross_entropy(logits[sel], b.labels[sel], reduction="sum").item()
            correct += int((logits[sel].argmax(-1) == b.labels[sel]).sum())
            count += int(sel.sum())
        return total / max(count, 1), correct / max(count, 1)

    def _texts(self, ids: Sequence[int]) -> str:
        return decode_target(self.tokenizer, ids)

    def _generation_scores(self, model: torch.nn.Module, ex: list[tuple[list[int], list[int]]]
                           ) -> tuple[float, float, list[str], list[str]]:
        cfg = GenerationConfig(max_new_tokens=max(len(t) for _, t in ex) + 8, temperature=0.0)
        hyp_ids = generate_seq2seq_ids(model, [s for s, _ in ex], cfg, self.bos, self.eos, self.pad,
                               batch_size=max(1, self.global_batch))
        hyps = [self._texts(h) for h in hyp_ids]
        refs = [self._texts(t[:-1]) for _, t in ex]
        return exact_match(hyps, refs), chrf(hyps, refs), hyps, refs

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        n = self.cfg.train.eval_iters * max(1, self.global_batch)
        tr, _ = self._loss_and_accuracy(model, self._eval_examples("train", n))
        val_ex = self._eval_examples("val", n)
        va, acc = self._loss_and_accuracy(model, val_ex)
        em, cf, _, _ = self._generation_scores(model, val_ex[:EVAL_GENERATE])
        return {"train": tr, "val": va, "val_token_accuracy": acc, "val_exact_match": em, "val_chrf": cf}

    def rng_state(self) -> torch.Tensor:
        return self.gen.get_state()

    def set_rng_state(self, s: torch.Tensor) -> None:
        self.gen.set_state(s)

    def finish(self, run: Path, best: torch.nn.Module) -> list[str]:
        """eval.json (val loss, exact match, chrF on the held-out examples) and samples.txt."""
        n = 1000 if self.supervised else max(EVAL_GENERATE, self.cfg.train.eval_iters * self.global_batch)
        ex = self._eval_examples("val", min(n, len(self.val_enc)) if self.supervised else n)
        with torch.no_grad():
            va, acc = self._loss_and_accuracy(best, ex)
            em, cf, hyps, refs = self._generation_scores(best, ex)
        srcs = [self._texts(s) for s, _ in ex]
        result = {"task": "seq2seq", "mode": "supervised" if self.supervised else "denoising", "val_loss": va,
                  "exact_match": em, "chrf": cf, "token_accuracy": acc, "n_val": len(ex), "decoding": "greedy",
                  "examples": [{"source": s, "reference": r, "prediction": h}
                               for s, r, h in list(zip(srcs, refs, hyps))[:10]]}
        atomic_write_json(run / "eval.json", result)
        k = self.cfg.train.num_samples
        samples = [f"source:     {s}\nreference:  {r}\nprediction: {h}" for s, r, h in list(zip(srcs, refs, hyps))[:k]]
        text = "".join(f"--- sample {i + 1} ---\n{s}\n" for i, s in enumerate(samples))
        atomic_write_bytes(run / "samples.txt", text.encode())
        return samples + [f"held-out: exact match {em:.3f}, chrF {cf:.1f}, val loss {va:.4f} ({len(ex)} examples)"]
