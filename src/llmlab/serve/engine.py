"""Continuous batching for `llmlab serve`: one worker thread owns the model and decodes every running request
together, one token per request per step. A request joins the batch between steps (its prompt is prefilled
alone, so its prompt log-probabilities and first token are exactly those of serving it alone) and leaves it
as soon as it ends (end of text, a stop string, max_tokens, the context, or its client going away). With a
prefix cache (off by default), a prompt that starts like a recent one reuses that prefix's keys and values and
prefills only the rest: the same numbers up to float rounding (llmlab.serve.prefix_cache).

The batch keeps one KV cache per layer, (B, nh, L, hs), left padded: a joining request's cache is padded on
the left to the batch's length (or the batch's to its), and the attention mask hides the padding; positions
count real tokens only (GPT.forward), so each row sees what it would see alone. Each request has its own
sampling settings, stop strings, seed (its own torch.Generator) and token counts for the penalties; the
sampler is llmlab.generate.causal's process_logits/pick, the same as `llmlab generate`.

Log-probabilities are those of the model's raw next-token distribution (log_softmax of the logits, before
temperature, penalties or bias), the numbers llmlab.evaluate.token_logprobs gives for the same tokens.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from llmlab.attention import KVCache
from llmlab.generate.causal import GenerationConfig, TextStream, decode_layout, pick, process_logits
from llmlab.serve.prefix_cache import PrefixCache

MERGE_HEADROOM = 64  # tokens of room left in the batch's caches after a merge (appends past it reallocate)


@dataclass
class TokenLogprob:
    """One token with its log-probability and the top alternatives [(id, logprob)] (most likely first)."""

    id: int
    logprob: float | None
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Job:
    """One sequence to generate (one choice of one prompt). Filled in by the engine; `done` is set at the end.

    on_text(new_text, new_tokens) streams: text as soon as it is certain (see TextStream) and the generated
    tokens it covers (with log-probabilities when `logprobs` is not None)."""

    prompt: list[int]
    cfg: GenerationConfig
    logprobs: int | None = None  # None: none; k >= 0: each token's logprob and its k most likely alternatives
    prompt_logprobs: bool = False  # the prompt's tokens too (echo)
    on_text: Callable[[str, list[TokenLogprob]], None] | None = None
    cancelled: Callable[[], bool] | None = None
    # results
    text: str = ""
    finish_reason: str = "length"
    completion_tokens: int = 0
    tokens: list[TokenLogprob] = field(default_factory=list)  # generated tokens that are part of `text`
    prompt_tokens_lp: list[TokenLogprob] = field(default_factory=list)
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)

    # engine state
    _stream: TextStream | None = None
    _gen: torch.Generator | None = None
    _counts: torch.Tensor | None = None
    _all: list[TokenLogprob] = field(default_factory=list)
    _sent: int = 0  # tokens of _all already reported through on_text
    _ends: list[int] = field(default_factory=list)  # text length after each generated token
    _last: int = 0
    _length: int = 0  # real tokens in the cache

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt)


def _top(logp: torch.Tensor, k: int) -> list[tuple[int, float]]:
    if k <= 0:
        return []
    v, i = torch.topk(logp, min(k, logp.numel()))
    return list(zip(i.tolist(), v.tolist()))


class BatchEngine:
    """The model in a worker thread, decoding up to `max_batch` jobs together (continuous batching).
    batching=False serves one job at a time (the baseline the benchmark compares against). A `prefix_cache`
    (llmlab.serve.prefix_cache) lets a prompt that starts like an earlier one prefill only the rest.
    start=False starts no thread: `run_here` then decodes in the caller's thread."""

    def __init__(self, model: torch.nn.Module, max_batch: int = 16, threads: int = 0, batching: bool = True,
                 prefix_cache: PrefixCache | None = None, start: bool = True):
        self.model = model.eval()
        self.tok = model.tokenizer
        self.block = model.config.block_size
        self.max_batch = max_batch if batching else 1
        self.threads = threads
        self.prefix_cache = prefix_cache
        self.cond = threading.Condition()
        self.pending: list[Job] = []
        self.rows: list[Job] = []
        self.caches: list[KVCache] | None = None
        self.mask: torch.Tensor | None = None  # (B, L) 1 = real token
        self.steps = 0
        self.max_rows_seen = 0
        self.thread = None
        if start:
            self.thread = threading.Thread(target=self._loop, name="llmlab-engine", daemon=True)
            self.thread.start()

    # ------------------------------------------------------------------ public

    def submit(self, jobs: list[Job]) -> None:
        with self.cond:
            self.pending.extend(jobs)
            self.cond.notify()

    def run(self, jobs: list[Job]) -> list[Job]:
        """Submit and wait (from a worker thread, not the event loop)."""
        self.submit(jobs)
        for j in jobs:
            j.done.wait()
        return jobs

    def run_here(self, jobs: list[Job]) -> list[Job]:
        """Decode jobs in the calling thread, continuous batching, until all are done (an engine made with
        start=False: no thread owns the model, and the decoding layout is undone on return)."""
        if self.thread is not None:
            raise RuntimeError("this engine has a worker thread: use run()")
        self.pending.extend(jobs)
        with torch.inference_mode(), decode_layout(self.model):
            while self.pending or self.rows:
                self._cycle()
        return jobs

    @property
    def busy(self) -> int:
        return len(self.pending) + len(self.rows)

    # ------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        with torch.inference_mode(), decode_layout(self.model):
            while True:
                with self.cond:
                    while not self.pending and not self.rows:
                        self.cond.wait()
                self._cycle()

    def _cycle(self) -> None:
        """Let waiting jobs join while there is room, then decode one step of the batch."""
        with self.cond:
            room = self.max_batch - len(self.rows)
            new, self.pending = self.pending[:room], self.pending[room:]
        joined = []
        for job in new:
            try:
                caches = self._join(job)
            except Exception as e:  # noqa: BLE001 - reported to that request only
                self._fail(job, e)
                continue
            if caches is not None:
                joined.append((job, caches))
        if joined:
            self._merge(joined)
        if self.rows:
            try:
                self._step()
            except Exception as e:  # noqa: BLE001 - a failure of the batch fails its jobs, not the server
                for job in self.rows:
                    self._fail(job, e)
                self.rows, self.caches, self.mask = [], None, None

    def _fail(self, job: Job, e: BaseException) -> None:
        job.error = e
        job.done.set()

    # ------------------------------------------------------------------ joining: prefill alone

    def _join(self, job: Job) -> list[KVCache] | None:
        """Prefill job's prompt alone and take its first token; its caches to merge into the batch, or None when
        it has already ended."""
        cfg = job.cfg
        cfg.validate()
        tok = self.tok
        job._stream = TextStream(tok, 1, cfg.stop, tok.eos_id, None, None)
        job._gen = torch.Generator().manual_seed(cfg.seed) if cfg.seed is not None else None
        job._counts = torch.zeros(1, self.model.config.vocab_size) if cfg.counts_tokens else None
        full = job.prompt_logprobs and job.logprobs is not None
        cache = self.prefix_cache if not full else None  # echoed prompt log-probabilities need every position
        shared, caches = cache.lookup(job.prompt) if cache is not None else (0, None)
        if caches is None:
            shared, caches = 0, self.model.new_caches()
        ids = torch.tensor([job.prompt[shared:]], dtype=torch.long)
        logits = self.model(ids, caches=caches, last_only=not full)[0].float()  # (T or 1, V)
        if cache is not None:
            cache.store(job.prompt, caches)
        if full:
            logp = F.log_softmax(logits, -1)  # (T, V)
            k = job.logprobs or 0
            job.prompt_tokens_lp = [TokenLogprob(job.prompt[0], None, [])]
            for t in range(1, len(job.prompt)):
                job.prompt_tokens_lp.append(TokenLogprob(job.prompt[t], float(logp[t - 1, job.prompt[t]]),
                                                         _top(logp[t - 1], k)))
        job._length = len(job.prompt)
        if cfg.max_new_tokens == 0 or job._length >= self.block:
            self._finish(job, "length")
            return None
        if not self._take(job, logits[-1:]):
            return None
        return caches

    def _merge(self, joined: list[tuple[Job, list[KVCache]]]) -> None:
        """Add the jobs that joined this step to the batch in one copy: every row right-aligned to the longest,
        zeros (masked) on the left, and room for MERGE_HEADROOM more tokens so the next steps append in place."""
        parts = [] if self.caches is None else [(self.caches, self.mask)]  # (caches, mask (rows, length))
        parts += [(caches, torch.ones(1, caches[0].length, dtype=torch.long)) for _, caches in joined]
        B, L = sum(m.size(0) for _, m in parts), max(m.size(1) for _, m in parts)
        cap = L + min(MERGE_HEADROOM, max(0, self.block - L))
        mask = torch.zeros(B, L, dtype=torch.long)
        merged = [KVCache(dtype=ref.dtype) for ref in parts[0][0]]
        for c, ref in zip(merged, parts[0][0]):
            c.k = ref.k.new_zeros(B, ref.k.size(1), cap, ref.k.size(3))
            c.v = ref.v.new_zeros(B, ref.v.size(1), cap, ref.v.size(3))
            c.length = L
        r = 0
        for caches, m in parts:
            b, n = m.shape
            mask[r:r + b, L - n:] = m
            for c, part in zip(merged, caches):
                c.k[r:r + b, :, L - n:L] = part.k[:, :, :n]
                c.v[r:r + b, :, L - n:L] = part.v[:, :, :n]
            r += b
        self.caches, self.mask = merged, mask
        self.rows += [job for job, _ in joined]
        self.max_rows_seen = max(self.max_rows_seen, len(self.rows))

    # ------------------------------------------------------------------ one decoding step for the batch

    def _step(self) -> None:
        B = len(self.rows)
        last = torch.tensor([[j._last] for j in self.rows], dtype=torch.long)  # (B, 1)
        mask = torch.cat([self.mask, torch.ones(B, 1, dtype=torch.long)], 1)  # (B, L + 1)
        padded = bool((mask == 0).any())
        logits = self.model(last, attention_mask=mask if padded else None, caches=self.caches)[:, -1].float()
        self.mask = mask
        self.steps += 1
        keep = []
        for i, job in enumerate(self.rows):
            job._length += 1
            ok = False
            try:
                ok = self._take(job, logits[i:i + 1])
            except Exception as e:  # noqa: BLE001 - that request fails alone
                self._fail(job, e)
            if ok:
                keep.append(i)
        if len(keep) < B:
            self._drop(keep)

    def _drop(self, keep: list[int]) -> None:
        if not keep:
            self.rows, self.caches, self.mask = [], None, None
            return
        idx = torch.tensor(keep, dtype=torch.long)
        mask = self.mask.index_select(0, idx)
        first = int(mask.any(0).long().argmax())  # leading columns that are padding in every row go
        L = self.caches[0].length
        for c in self.caches:  # the room after L is kept, so the next steps still append in place
            c.k = c.k[:, :, first:].index_select(0, idx)
            c.v = c.v[:, :, first:].index_select(0, idx)
            c.length = L - first
        self.mask = mask[:, first:]
        self.rows = [self.rows[i] for i in keep]

    # ------------------------------------------------------------------ one token of one job

    def _take(self, job: Job, logits: torch.Tensor) -> bool:
        """Sample job's next token from its logits (1, V); True while the job goes on."""
        cfg = job.cfg
        nxt = int(pick(process_logits(logits, None, cfg, None, job._counts), cfg, job._gen)[0])
        if job._counts is not None:
            job._counts[0, nxt] += 1
        if job.logprobs is not None:
            logp = F.log_softmax(logits[0], -1)
            job._all.append(TokenLogprob(nxt, float(logp[nxt]), _top(logp, job.logprobs)))
        else:
            job._all.append(TokenLogprob(nxt, None))
        s = job._stream
        s.step(torch.tensor([nxt]), torch.tensor([True]))
        job._ends.append(len(s.text[0]))
        job._last = nxt
        cancelled = job.cancelled is not None and job.cancelled()
        if s.done[0] or cancelled:
            self._finish(job, s.finish[0])
            return False
        if s.count[0] >= cfg.max_new_tokens or job._length + 1 > self.block:
            self._finish(job, "length")
            return False
        self._report(job, len(s.text[0]) - s._held(s.text[0]))
        return True

    def _report(self, job: Job, upto: int) -> None:
        """Send text[emitted:upto] and the generated tokens that end inside it."""
        s = job._stream
        text = s.text[0] if s is not None else ""
        start = s.emitted[0] if s is not None else 0
        if upto < start:
            return
        new_tokens = []
        while job._sent < len(job._ends) and job._ends[job._sent] <= upto and job._sent < len(job._all):
            new_tokens.append(job._all[job._sent])
            job._sent += 1
        if upto > start or new_tokens:
            if s is not None:
                s.emitted[0] = upto
            if job.on_text is not None:
                job.on_text(text[start:upto], new_tokens)

    def _finish(self, job: Job, reason: str) -> None:
        s = job._stream
        job.finish_reason = reason
        if s is not None:
            job.text = s.text[0]
            job.completion_tokens = s.count[0]
            # the tokens that are part of the text: those whose text starts before its end (a token cut by a
            # stop string counts; the end-of-text token and tokens wholly inside the stop string do not)
            n, start = 0, 0
            for t, end in zip(job._all, job._ends):
                if start >= len(job.text) or (s.eos_id is not None and t.id == s.eos_id):
                    break
                n, start = n + 1, end
            job._ends = [min(e, len(job.text)) for e in job._ends[:n]]
            job._all = job._all[:n]
            job.tokens = list(job._all)
            self._report(job, len(job.text))
        job.done.set()
