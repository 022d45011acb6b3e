"""Encoder-decoder models trained for what they are good at: T5-style span-corruption denoising on plain
text, supervised sequence-to-sequence on JSONL {"source", "target"} pairs (teacher forcing, label
smoothing), the chrF metric, and generation (greedy, sampling, beam search) with the cross-attention
keys/values computed once per source and cached."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import atomic_write_bytes, atomic_write_json
from .config import ModelConfig
from .data import DEFAULT_SOURCE, load_corpus, split_corpus
from .encoder import pad_batch, unwrap
from .errors import ConfigError, DataError, LlmlabError
from .generate import GenerationConfig, pick, process_logits
from .train import Objective

N_SENTINELS = 32
SENTINELS = [f"<|extra_{i}|>" for i in range(N_SENTINELS)]
SEQ2SEQ_SPECIALS = ["<|pad|>", "<|bos|>", "<|eos|>", *SENTINELS]
IGNORE = -100
EVAL_GENERATE = 64  # held-out examples generated at each evaluation (all of them, up to 1000, at the end)


# ----------------------------------------------------------------------------- chrF


def _char_ngrams(text: str, n: int) -> Counter:
    s = "".join(text.split())  # chrF ignores whitespace
    return Counter(s[i:i + n] for i in range(len(s) - n + 1))


def chrf(hypotheses: Sequence[str], references: Sequence[str], n: int = 6, beta: float = 2.0) -> float:
    """Corpus chrF (Popović 2015, "chrF: character n-gram F-score for automatic MT evaluation"), 0-100.

    For each order k = 1..n, character k-gram counts (whitespace removed) are matched between hypothesis and
    reference and summed over the corpus: chrP_k = matches / hypothesis k-grams, chrR_k = matches /
    reference k-grams. chrP and chrR are their arithmetic means over the orders that occur, and
        chrF_beta = (1 + beta^2) chrP chrR / (beta^2 chrP + chrR),
    beta = 2 weighting recall twice as much as precision."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    precs, recs = [], []
    for k in range(1, n + 1):
        match = hyp_total = ref_total = 0
        for h, r in zip(hypotheses, references):
            hc, rc = _char_ngrams(h, k), _char_ngrams(r, k)
            match += sum((hc & rc).values())
            hyp_total += sum(hc.values())
            ref_total += sum(rc.values())
        if hyp_total == 0 and ref_total == 0:
            continue
        precs.append(match / hyp_total if hyp_total else 0.0)
        recs.append(match / ref_total if ref_total else 0.0)
    if not precs:
        return 100.0  # empty hypotheses for empty references
    p, r = sum(precs) / len(precs), sum(recs) / len(recs)
    b2 = beta * beta
    return 100.0 * (1 + b2) * p * r / (b2 * p + r) if (p + r) > 0 else 0.0


def exact_match(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of hypotheses equal to their reference (surrounding whitespace ignored)."""
    if not references:
        return float("nan")
    return sum(h.strip() == r.strip() for h, r in zip(hypotheses, references)) / len(references)


# ----------------------------------------------------------------------------- span corruption


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


# ----------------------------------------------------------------------------- data


def read_pairs(path: str | Path) -> list[tuple[str, str]]:
    """(source, target) pairs of a JSONL file of {"source": str, "target": str} objects."""
    p = Path(path)
    pairs = []
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DataError(f"{p} is not UTF-8 text; convert it to UTF-8") from None
    except OSError as e:
        raise DataError(f"cannot read {p}: {e.strerror}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{n} is not valid JSON ({e.msg}); fix that line") from None
        if not isinstance(obj, dict):
            raise DataError(f'{p}:{n} is not a JSON object; write one {{"source": ..., "target": ...}} per line')
        for f in ("source", "target"):
            if f not in obj:
                raise DataError(f'{p}:{n} has no "{f}" field; write one {{"source": ..., "target": ...}} per line '
                                '(or {"text": ...} lines to train by denoising)')
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


def _roles(tok: Any) -> tuple[int, int, int]:
    """(bos, eos, pad) ids of a seq2seq tokenizer ([CLS]/[SEP] stand in for bos/eos when missing)."""
    bos = tok.bos_id if tok.bos_id is not None else tok.cls_id
    eos = tok.eos_id if tok.eos_id is not None else tok.sep_id
    pad = tok.pad_id if tok.pad_id is not None else eos
    if bos is None or eos is None:
        raise ConfigError(f"the {tok.kind} tokenizer has no begin/end tokens; seq2seq needs both")
    return bos, eos, pad


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
            train_docs, val_docs = split_corpus(docs, t.val_fraction)
            self.n_docs = (len(train_docs), len(val_docs))
            tok_docs = train_docs
        self.tokenizer = self.tokenizer_for(run, resume, tok_docs, SEQ2SEQ_SPECIALS)
        tok = self.tokenizer
        self.bos, self.eos, self.pad = _roles(tok)
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
                                "val_fraction": t.val_fraction}
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
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.cfg.train.dtype == "bfloat16"):
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
        hyp_ids = generate_ids(model, [s for s, _ in ex], cfg, self.bos, self.eos, self.pad,
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


# ----------------------------------------------------------------------------- generation


def decode_target(tok: Any, ids: Sequence[int]) -> str:
    """Text of generated ids without pad/bos/eos; sentinels stay visible."""
    bos, eos, pad = _roles(tok)
    drop = {bos, eos, pad}
    return tok.decode([i for i in ids if i not in drop], skip_special_tokens=False).strip()


def length_penalty(length: int, alpha: float) -> float:
    """GNMT length normalisation (Wu et al. 2016, eq. 14): lp(Y) = ((5 + |Y|) / 6)^alpha; beam scores are
    log P(Y|X) / lp(Y), so alpha > 0 favours longer outputs and alpha = 0 is the raw log-probability."""
    return ((5.0 + length) / 6.0) ** alpha


@torch.inference_mode()
def _sample(model: torch.nn.Module, src: torch.Tensor, smask: torch.Tensor, cfg: GenerationConfig,
            bos: int, eos: int, pad: int, gen: torch.Generator | None) -> list[list[int]]:
    """Greedy or sampled decoding of one padded batch of sources (B, S)."""
    B = src.size(0)
    memory = model.encode(src, smask)  # (B, S, C): encoded once
    caches = model.new_caches() if cfg.use_cache else None  # cross K/V computed at the first step, then reused
    y = torch.full((B, 1), bos, dtype=torch.long)  # (B, t)
    done = torch.zeros(B, dtype=torch.bool)
    out: list[list[int]] = [[] for _ in range(B)]
    steps = min(cfg.max_new_tokens, model.config.block_size - 1)
    for _ in range(steps):
        if caches is not None:
            logits = model.decode(y[:, -1:], memory, smask, caches=caches)[:, -1]  # (B, V)
        else:
            logits = model.decode(y, memory, smask)[:, -1]
        nxt = pick(process_logits(logits, y if cfg.repetition_penalty != 1.0 else None, cfg), cfg, gen)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        for i in range(B):
            if not done[i] and int(nxt[i]) != eos:
                out[i].append(int(nxt[i]))
        done |= nxt == eos
        y = torch.cat([y, nxt[:, None]], 1)
        if bool(done.all()):
            break
    return out


@torch.inference_mode()
def _beam(model: torch.nn.Module, src: torch.Tensor, smask: torch.Tensor, beams: int, max_new: int,
          alpha: float, bos: int, eos: int) -> list[list[int]]:
    """Beam search over one padded batch of sources: `beams` hypotheses per source ranked by
    log P / lp(length) (see length_penalty). A source is done when it holds `beams` finished hypotheses
    and none of its live ones can still rank above them at the current length; with one beam this is
    exactly greedy decoding. Self-attention caches follow their hypotheses (KVCache.reorder); the
    cross-attention keys/values are computed once per source and shared by all its beams."""
    B, K = src.size(0), beams
    memory = model.encode(src, smask).repeat_interleave(K, 0)  # (B*K, S, C)
    smask = smask.repeat_interleave(K, 0)
    self_caches, cross_caches = model.new_caches()
    y = torch.full((B * K, 1), bos, dtype=torch.long)  # (B*K, t)
    scores = torch.full((B, K), float("-inf"))
    scores[:, 0] = 0.0  # all beams start identical: only the first is live at step 0
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
    done = [False] * B
    steps = min(max_new, model.config.block_size - 1)
    for step in range(steps):
        logits = model.decode(y[:, -1:], memory, smask, caches=(self_caches, cross_caches))[:, -1]  # (B*K, V)
        V = logits.size(-1)
        cand = (scores.view(-1, 1) + logits.float().log_softmax(-1)).view(B, K * V)  # (B, K*V)
        top_s, top_i = cand.topk(min(2 * K, K * V), dim=1)
        new_scores = torch.full((B, K), float("-inf"))
        src_row = torch.arange(B * K).view(B, K).clone()
        new_tok = torch.full((B, K), eos, dtype=torch.long)
        lp = length_penalty(step + 1, alpha)
        for b in range(B):
            if done[b]:
                continue
            j = 0
            for rank, (s, i) in enumerate(zip(top_s[b].tolist(), top_i[b].tolist())):
                beam, tok = divmod(i, V)
                if s == float("-inf"):
                    break
                if tok == eos:
                    if rank < K:
                        finished[b].append((s / lp, y[b * K + beam, 1:].tolist()))
                    continue
                new_scores[b, j], src_row[b, j], new_tok[b, j] = s, b * K + beam, tok
                j += 1
                if j == K:
                    break
            if len(finished[b]) >= K:
                kth = sorted((f[0] for f in finished[b]), reverse=True)[K - 1]
                if kth >= float(new_scores[b].max()) / lp:
                    done[b] = True
        if all(done):
            break
        index = src_row.view(-1)
        for c in self_caches:
            c.reorder(index)
        y = torch.cat([y[index], new_tok.view(-1, 1)], 1)
        scores = new_scores
    for b in range(B):
        if not done[b]:
            lp = length_penalty(y.size(1) - 1, alpha)
            finished[b] += [(float(scores[b, k]) / lp, y[b * K + k, 1:].tolist()) for k in range(K)
                            if scores[b, k] > float("-inf")]
    return [max(f, key=lambda t: t[0])[1] if f else [] for f in finished]


def generate_ids(model: torch.nn.Module, sources: Sequence[Sequence[int]], cfg: GenerationConfig, bos: int,
                 eos: int, pad: int, beams: int = 1, alpha: float = 0.6, batch_size: int = 16) -> list[list[int]]:
    """Target ids for each source (eos not included): greedy (temperature 0), sampling, or beam search
    when beams > 1. Sources longer than the context are cut."""
    cfg.validate()
    if beams < 1:
        raise LlmlabError(f"--beams must be at least 1, got {beams}")
    if alpha < 0:
        raise LlmlabError(f"--length-penalty must be >= 0, got {alpha}")
    block = model.config.block_size
    gen = torch.Generator().manual_seed(cfg.seed) if cfg.seed is not None else None
    out: list[list[int]] = []
    for i in range(0, len(sources), batch_size):
        chunk = [list(s[:block]) or [eos] for s in sources[i:i + batch_size]]
        src, smask = pad_batch(chunk, pad)
        if beams > 1:
            out += _beam(model, src, smask, beams, cfg.max_new_tokens, alpha, bos, eos)
        else:
            out += _sample(model, src, smask, cfg, bos, eos, pad, gen)
    return out


def generate_seq2seq(model: torch.nn.Module, texts: Sequence[str], cfg: GenerationConfig, beams: int = 1,
                     alpha: float = 0.6) -> list[str]:
    """Output text for each source text of an encoder-decoder model (see generate_ids)."""
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise LlmlabError("this model has no tokenizer; generate from a run folder")
    if model.config.arch != "seq2seq":
        raise LlmlabError(f"this is a {model.config.arch} model, not an encoder-decoder (seq2seq) one")
    bos, eos, pad = _roles(tok)
    model = unwrap(model).eval()
    ids = generate_ids(model, [tok.encode(t) for t in texts], cfg, bos, eos, pad, beams, alpha)
    return [decode_target(tok, i) for i in ids]


__all__ = ["Seq2SeqObjective", "chrf", "exact_match", "span_noise", "corrupt", "read_pairs", "generate_ids",
           "generate_seq2seq", "length_penalty", "seq2seq_loss", "make_batch", "decode_target"]


# ----------------------------------------------------------------------------- command-line helpers


def greedy_target(model: torch.nn.Module, text: str, max_new_tokens: int = 64) -> str:
    """The model's greedy output for one source text (what `llmlab attention` shows when no --target)."""
    return generate_seq2seq(model, [text], GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0))[0]


def cross_attention_rows(maps: Any, top: int = 3) -> list[tuple[str, list[tuple[str, float]]]]:
    """For each output token, the source tokens its prediction attended to most (cross-attention averaged
    over every decoder layer and head): [(output token, [("token@position", weight)])]. Decoder position i reads
    target token i and predicts token i + 1, so row i is where output token i + 1 was chosen."""
    mean = maps.cross.mean((0, 1))  # (T_tgt, T_src)
    out = []
    for i in range(len(maps.target_tokens) - 1):
        w = mean[i]
        best = torch.argsort(w, descending=True)[:top].tolist()
        out.append((maps.target_tokens[i + 1], [(f"{maps.tokens[j]}@{j}", float(w[j])) for j in best]))
    return out


def cli_generate(model: torch.nn.Module, a: Any) -> int:
    """`llmlab generate` on a seq2seq run: each --prompt is a source; greedy, sampling or --beams N."""
    if not a.prompt:
        raise LlmlabError("give the source text with --prompt (repeat for several)")
    if any(not p.strip() for p in a.prompt):
        raise LlmlabError("a --prompt is empty; give the source text to transform")
    cfg = GenerationConfig(max_new_tokens=a.max_new_tokens, temperature=0.0 if a.greedy else a.temperature,
                           top_k=a.top_k, top_p=a.top_p, repetition_penalty=a.repetition_penalty, seed=a.seed,
                           use_cache=not a.no_cache)
    outs = generate_seq2seq(model, a.prompt, cfg, beams=a.beams, alpha=a.length_penalty)
    for s in a.stop:
        outs = [o.split(s, 1)[0] if s else o for o in outs]
    if a.json:
        print(json.dumps([{"prompt": p, "completion": o} for p, o in zip(a.prompt, outs)]))
    else:
        for p, o in zip(a.prompt, outs):
            print(f"--- {p!r}\n{o}")
    return 0
