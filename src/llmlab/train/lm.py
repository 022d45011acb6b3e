"""The causal language-modelling objective: next-token prediction for decoder-only GPTs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from llmlab.checkpoint import (
    atomic_write_bytes,
)
from llmlab.config import ModelConfig
from llmlab.data import DEFAULT_SOURCE, BatchSampler, TokenizedCorpus, encode_docs, load_corpus, prepare, split_corpus
from llmlab.generate.causal import GenerationConfig, generate_text
from llmlab.runtime import autocast
from llmlab.train.objective import Objective


def lm_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of a causal LM on inputs x and targets y (B, T)."""
    logits = model(x)
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))


class LMObjective(Objective):
    """Next-token prediction for decoder-only GPTs on a text corpus."""

    name = "lm"
    arch = "gpt"
    auto_bf16 = True  # tinyshakespeare, 2,000 steps: bf16 1.8903 vs float32 1.8905 (bench_shakespeare.py)

    def setup(self, run: Path, resume: bool) -> ModelConfig:
        t, m = self.cfg.train, self.cfg.model
        init = getattr(self, "init_source", None)  # --init-from: the source's tokenizer and model config
        if init is not None:
            self.corpus = encode_corpus(t, init.tokenizer)
            self.tokenizer = init.tokenizer
        else:
            self.corpus = prepare(t.data, t.tokenizer, t.vocab_size, t.val_fraction, t.text_field, t.encoding_errors,
                                  split=t.split, split_seed=t.split_seed)
            self.tokenizer = self.corpus.tokenizer
        micro = t.batch_size // t.grad_accum
        self.sampler = BatchSampler(self.corpus.train, m.block_size, micro, t.seed + 1, self.dist.rank,
                                    self.dist.world)
        if init is not None:  # the weights fix the vocabulary (it may be padded beyond the tokenizer)
            return m
        pad = self.tokenizer.pad_id
        return m.replace(vocab_size=self.tokenizer.vocab_size, **({"pad_token_id": pad} if pad is not None else {}))

    def data_info(self) -> dict[str, Any]:
        t, c = self.cfg.train, self.corpus
        return {"source": t.data or DEFAULT_SOURCE, "hash": c.data_hash, "val_fraction": t.val_fraction,
                "split": t.split, "split_seed": t.split_seed, "train_docs": c.n_train_docs, "val_docs": c.n_val_docs,
                "train_tokens": int(len(c.train)), "val_tokens": int(len(c.val))}

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
                with autocast(t.dtype):
                    losses.append(lm_loss(model, *sampler.next()).item())
            out[split] = sum(losses) / len(losses)
        return out

    def rng_state(self) -> torch.Tensor:
        return self.sampler.state()

    def set_rng_state(self, s: torch.Tensor) -> None:
        self.sampler.set_state(s)

    def finish(self, run: Path, best: torch.nn.Module) -> list[str]:

        t = self.cfg.train
        gcfg = GenerationConfig(max_new_tokens=t.sample_tokens, temperature=0.8, top_k=50, seed=t.seed)
        samples = generate_text(best, ["\n"] * t.num_samples, gcfg) if t.num_samples else []
        text = "".join(f"--- sample {i + 1} ---\n{s}\n" for i, s in enumerate(samples))
        atomic_write_bytes(run / "samples.txt", text.encode())
        return samples


def encode_corpus(t: Any, tokenizer: Any) -> TokenizedCorpus:
    """The corpus of TrainConfig t split as prepare() splits it, tokenised with a given tokenizer (a fine-tune's
    source tokenizer: nothing is trained, nothing cached)."""
    import hashlib

    docs = load_corpus(t.data, t.text_field, t.encoding_errors)
    train_docs, val_docs = split_corpus(docs, t.val_fraction, t.split, t.split_seed)
    h = hashlib.sha256()
    for d in docs:
        h.update(hashlib.sha256(d.encode("utf-8", "surrogatepass")).digest())
    return TokenizedCorpus(encode_docs(tokenizer, train_docs), encode_docs(tokenizer, val_docs), tokenizer,
                           h.hexdigest(), len(train_docs), len(val_docs))
