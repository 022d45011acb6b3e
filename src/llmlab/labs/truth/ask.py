"""Asking a model: the greedy answer to each question with what the model felt while writing it (each answer
token's probability and the entropy of its distribution, the hidden state before the answer, P(yes) for a
yes/no question), log-likelihoods of multiple-choice options, and N sampled answers.

A white-box model (a GPT with a tokenizer: an llmlab run, a Hugging Face folder, SmolLM2) is asked

    cloze  the question's `prompt` (else "Q: {question}\\nA:"), the completion ends at a line break or a
           full stop: base models, the lab's own
    chat   the question as a user turn in the model's chat template (its Jinja template, or llmlab's), the
           reply ends at end-of-turn: instruction-tuned models such as SmolLM2

Sampling is batched: every (question, sample) row is one row of a left-padded batch decoded with the KV cache
(`batch_size` rows at a time; batch_size 1 is one sequence at a time, what benchmarks/bench_truth.py compares).
A chat endpoint (llmlab.security.targets.ChatTarget) answers with text only."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from llmlab.chat import encode_chat as llmlab_encode_chat
from llmlab.chat import has_chat_template, render_plain
from llmlab.errors import LlmlabError
from llmlab.generate.causal import (
    GenerationConfig,
    TextStream,
    decode_layout,
    left_pad,
    pack_rows,
    pick,
    process_logits,
)
from llmlab.generate.chat import generate_from_ids
from llmlab.labs.truth.questions import Question
from llmlab.progress import Progress, Stage, message

CLOZE_STOP = ("\n", ".")
MODES = ("auto", "cloze", "chat")
YES_NO_HINT = " Answer yes or no."
LOGIT_BUDGET = 1 << 25  # floats of logits per scoring batch (128 MB)
KV_BUDGET = 1 << 27  # floats of KV cache per decoding batch (512 MB)


@dataclass
class AskConfig:
    """How questions are put to a model and how many answers are sampled."""

    mode: str = "auto"  # auto (chat when the model has a chat template) | cloze | chat
    max_new_tokens: int = 16  # tokens per answer
    samples: int = 10  # sampled answers per question (for SelfCheck and semantic entropy); 0 = none
    temperature: float = 1.0  # of the samples (the graded answer is greedy)
    top_p: float = 1.0
    batch_size: int = 64  # rows decoded together; 1 = one sequence at a time
    yes_no_hint: bool = True  # chat mode: end yes/no questions with "Answer yes or no."
    choices: bool = True  # score multiple-choice options by log-likelihood
    seed: int = 0

    def validate(self) -> None:
        if self.mode not in MODES:
            raise LlmlabError(f"mode {self.mode!r} is not one of {', '.join(MODES)}")
        if self.max_new_tokens < 1:
            raise LlmlabError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.samples < 0:
            raise LlmlabError(f"samples must be 0 or more, got {self.samples}")
        if self.batch_size < 1:
            raise LlmlabError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.temperature <= 0 and self.samples:
            raise LlmlabError(f"sampling needs a temperature above 0, got {self.temperature}")


@dataclass
class Asked:
    """One question's greedy answer and the model's view of it (None where the model does not show it)."""

    text: str
    samples: list[str] = field(default_factory=list)
    token_logprobs: list[float] | None = None  # log p of each answer token
    token_entropies: list[float] | None = None  # entropy (nats) of each answer token's distribution
    p_yes: float | None = None  # yes/no questions: P(yes) / (P(yes) + P(no)) of the reply's first token
    choice_logprobs: list[float] | None = None  # sum of log p of each choice's tokens
    hidden: np.ndarray | None = None  # (C,) the last layer's state at the last prompt token
    prompt_tokens: int = 0


def _has_jinja(tok: Any) -> bool:
    return bool(getattr(tok, "chat_template", None))


def resolve_mode(model: Any, mode: str) -> str:
    if mode != "auto":
        return mode
    tok = model.tokenizer
    return "chat" if (_has_jinja(tok) or has_chat_template(tok)) else "cloze"


def prompt_ids(model: Any, q: Question, mode: str, hint: bool = True) -> tuple[list[int], tuple[str, ...]]:
    """The prompt's token ids and the stop strings of its answer."""
    tok = model.tokenizer
    if mode == "cloze":
        return tok.encode(q.prompt or f"Q: {q.question}\nA:"), CLOZE_STOP
    text = q.question + (YES_NO_HINT if hint and q.kind == "yesno" else "")
    messages = [{"role": "user", "content": text}]
    if _has_jinja(tok):
        from llmlab.chat_template import encode_chat

        return encode_chat(tok, messages), ()
    if has_chat_template(tok):
        return llmlab_encode_chat(tok, messages)[0], ()
    return tok.encode(render_plain(messages)), ("\nUser:", "\nSystem:", "\n")


def check_model(model: Any) -> None:
    if getattr(model, "tokenizer", None) is None:
        raise LlmlabError("this model has no tokenizer; give an llmlab run folder, a Hugging Face folder with its "
                          "tokenizer, a .gguf file or smollm2")
    if getattr(model.config, "arch", "gpt") != "gpt":
        raise LlmlabError(f"the model is a {model.config.arch} model; asking questions needs a decoder-only (gpt) "
                          "model")


def _chunks(order: Sequence[int], size: int) -> list[list[int]]:
    return [list(order[i:i + size]) for i in range(0, len(order), size)]


def kv_rows(model: Any, tokens: int) -> int:
    """The most rows whose KV cache of `tokens` positions fits KV_BUDGET floats (twice, for the cache's growth)."""
    c = model.config
    kv_heads = getattr(c, "kv_heads", None) or c.n_kv_head or c.n_head
    per_token = 2 * c.n_layer * kv_heads * (c.n_embd // c.n_head)
    return max(1, KV_BUDGET // (2 * max(1, tokens) * per_token))


def _generate(model: Any, prompts: list[list[int]], stop: tuple[str, ...], cfg: AskConfig, temperature: float,
              seed: int, stage: Stage) -> list[str]:
    """Texts of the prompts' continuations, `cfg.batch_size` rows at a time (rows sorted by length, so a
    batch pads little)."""
    out: list[str] = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    size = min(cfg.batch_size, kv_rows(model, max(map(len, prompts), default=1) + cfg.max_new_tokens))
    for b, idx in enumerate(_chunks(order, size)):
        g = GenerationConfig(max_new_tokens=cfg.max_new_tokens, temperature=temperature, top_p=cfg.top_p,
                             stop=stop, seed=None if temperature == 0 else seed * 100_003 + b)
        for i, c in zip(idx, generate_from_ids(model, [prompts[i] for i in idx], g)):
            out[i] = c.text
        stage.advance(len(idx))
    return out


@torch.inference_mode()
def sample_shared(model: Any, prompts: list[list[int]], n: int, stop: tuple[str, ...], cfg: AskConfig,
                  temperature: float, seed: int, stage: Stage | None = None) -> list[list[str]]:
    """n sampled continuations of each prompt. A prompt is read once: its keys and values (the KV cache) are
    computed in one left-padded batch and then copied to its n rows, which decode together (cfg.batch_size
    rows at a time), so sampling N answers costs one prefill, not N."""
    tok = model.tokenizer
    eos = tok.eos_id
    pad = tok.pad_id if tok.pad_id is not None else (eos if eos is not None else 0)
    g = GenerationConfig(max_new_tokens=cfg.max_new_tokens, temperature=temperature, top_p=cfg.top_p, stop=stop)
    out: list[list[str]] = [[] for _ in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    longest = max(map(len, prompts), default=1) + cfg.max_new_tokens
    per = max(1, min(cfg.batch_size, kv_rows(model, longest)) // n)
    with decode_layout(model):
        for b, idx in enumerate(_chunks(order, per)):
            gen = torch.Generator().manual_seed(seed * 100_003 + b)
            ids, mask = left_pad([prompts[i] for i in idx], pad)  # (B, T)
            caches = model.new_caches()
            logits = model(ids, attention_mask=mask, caches=caches)[:, -1]  # (B, V)
            rows = torch.arange(len(idx)).repeat_interleave(n)  # (B*n,): row r samples for prompt r // n
            for c in caches:
                c.reorder(rows)
            logits, amask = logits[rows], mask[rows]
            R = len(rows)
            stream = TextStream(tok, R, stop, eos)
            live = torch.arange(R)  # the stream rows still decoded; ended ones leave the batch (as in generate_ids)
            for step in range(cfg.max_new_tokens):
                nxt = pick(process_logits(logits, None, g), g, gen)
                active = torch.tensor([not stream.done[i] for i in live.tolist()], dtype=torch.bool)
                nxt = torch.where(active, nxt, torch.full_like(nxt, pad))
                full_nxt, full_active = torch.full((R,), pad, dtype=nxt.dtype), torch.zeros(R, dtype=torch.bool)
                full_nxt[live], full_active[live] = nxt, active
                if stream.step(full_nxt, full_active) or step == cfg.max_new_tokens - 1:
                    break
                active = torch.tensor([not stream.done[i] for i in live.tolist()], dtype=torch.bool)
                if 4 * int((~active).sum()) >= len(live):  # a quarter has ended: pack the rest together
                    live, nxt, amask, active = pack_rows(active.nonzero().squeeze(1), caches, live, nxt, amask, active)
                amask = torch.cat([amask, active.long()[:, None]], dim=1)
                logits = model(nxt[:, None], attention_mask=amask, caches=caches)[:, -1]
            stream.flush()
            for r, text in enumerate(stream.text):
                out[idx[r // n]].append(text)
            if stage is not None:
                stage.advance(len(rows))
    return out


@torch.inference_mode()
def score_continuations(model: Any, rows: Sequence[tuple[list[int], list[int]]], with_stats: bool = False,
                        yes_no: tuple[Sequence[int], Sequence[int]] | None = None) -> list[dict[str, Any]]:
    """For each (prompt ids, continuation ids): the log p of every continuation token; with_stats also the
    entropy of each of those distributions and the last layer's hidden state at the last prompt token;
    with yes_no (the first token ids of the spellings of yes, and of no) also P(yes) of the first continuation
    token (p_yes_of). Right-padded batches sized to LOGIT_BUDGET."""
    block = model.config.block_size
    V = model.config.vocab_size
    out: list[dict[str, Any]] = [{} for _ in rows]
    seqs = []
    for p, c in rows:
        s = (list(p) + list(c))[-block:]
        seqs.append((s, max(1, len(s) - len(c))))  # (ids, index of the first continuation token)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
    captured: dict[str, torch.Tensor] = {}
    head = getattr(model, "lm_head", None)
    hook = None
    if with_stats and head is not None:
        hook = head.register_forward_hook(lambda m, inp, o: captured.__setitem__("h", inp[0]))
    try:
        i = 0
        while i < len(order):
            T = len(seqs[order[i]][0])
            rows_per = max(1, LOGIT_BUDGET // max(1, T * V))
            idx = order[i:i + rows_per]
            i += len(idx)
            ids = torch.zeros(len(idx), T, dtype=torch.long)
            for j, k in enumerate(idx):
                s = seqs[k][0]
                ids[j, :len(s)] = torch.tensor(s)
            logits = model(ids).float()  # (B, T, V); right padding is harmless for a causal model
            logp = F.log_softmax(logits, -1)
            for j, k in enumerate(idx):
                s, start = seqs[k]
                pos = torch.arange(start - 1, len(s) - 1)  # positions predicting the continuation
                tgt = torch.tensor(s[start:], dtype=torch.long)
                r: dict[str, Any] = {"logp": logp[j, pos, tgt].tolist()}
                if with_stats:
                    lp = logp[j, pos]
                    r["entropy"] = (-(lp.exp() * lp).sum(-1)).tolist()
                    if "h" in captured:
                        r["hidden"] = captured["h"][j, start - 1].float().numpy().copy()
                if yes_no is not None:
                    r["p_yes"] = p_yes_of(logp[j, start - 1], *yes_no)
                out[k] = r
    finally:
        if hook is not None:
            hook.remove()
    return out


def _first_ids(tok: Any, words: Sequence[str]) -> list[int]:
    ids = set()
    for w in words:
        e = tok.encode(w)
        if e:
            ids.add(e[0])
    return sorted(ids)


def p_yes_of(first_logp: torch.Tensor, yes_ids: Sequence[int], no_ids: Sequence[int]) -> float:
    """P(yes) / (P(yes) + P(no)) where P(yes) sums the first-token probability of the spellings of yes."""
    py = float(first_logp[list(yes_ids)].exp().sum())
    pn = float(first_logp[list(no_ids)].exp().sum())
    return py / (py + pn) if py + pn > 0 else 0.5


def ask_model(model: Any, questions: Sequence[Question], cfg: AskConfig | None = None,
              progress: Progress | None = None) -> tuple[list[Asked], str]:
    """Ask a white-box model every question; returns the answers and the mode used."""
    cfg = cfg or AskConfig()
    cfg.validate()
    check_model(model)
    model.eval()
    tok = model.tokenizer
    mode = resolve_mode(model, cfg.mode)
    block = model.config.block_size
    prompts, stop = [], CLOZE_STOP
    cut = 0
    for q in questions:
        ids, stop = prompt_ids(model, q, mode, cfg.yes_no_hint)
        if len(ids) > block - cfg.max_new_tokens:
            ids, cut = ids[-(block - cfg.max_new_tokens):], cut + 1
        prompts.append(ids)
    if cut:
        message(progress, f"{cut} prompts are longer than the context of {block} tokens; their last tokens are "
                          "kept", "warning")
    n = len(questions)
    with Stage(progress, "greedy answers", n) as st:
        greedy = _generate(model, prompts, stop, cfg, 0.0, cfg.seed, st)
    answers = [Asked(text=t, prompt_tokens=len(p)) for t, p in zip(greedy, prompts)]
    rows = []
    for a, p in zip(answers, prompts):
        cont = tok.encode(a.text) if a.text else []
        if mode == "chat" or not cont:  # keep at least one token: the one that ended the answer
            cont = cont or tok.encode(stop[-1] if stop else "\n") or [tok.eos_id or 0]
        rows.append((p, cont[: cfg.max_new_tokens]))
    yes_ids, no_ids = _first_ids(tok, ["Yes", "yes", " Yes", " yes", "YES"]), _first_ids(tok, ["No", "no", " No",
                                                                                              " no", "NO"])
    shared = set(yes_ids) & set(no_ids)  # a character tokenizer starts " yes" and " no" alike
    yes_ids, no_ids = [i for i in yes_ids if i not in shared], [i for i in no_ids if i not in shared]
    with Stage(progress, "scoring answers", n) as st:
        scored = score_continuations(model, rows, with_stats=True, yes_no=(yes_ids, no_ids))
        for a, q, s in zip(answers, questions, scored):
            a.token_logprobs, a.token_entropies, a.hidden = s["logp"], s["entropy"], s.get("hidden")
            if q.kind == "yesno":
                a.p_yes = s["p_yes"]
        st.advance(n)
    mc = [(i, q) for i, q in enumerate(questions) if cfg.choices and q.choices and q.kind != "yesno"]
    if mc:
        with Stage(progress, "scoring choices", sum(len(q.choices) for _, q in mc)) as st:
            crow, owner = [], []
            for i, q in mc:
                for c in q.choices:
                    crow.append((prompts[i], tok.encode((" " if mode == "cloze" else "") + c)))
                    owner.append(i)
            res = score_continuations(model, crow)
            for i, r in zip(owner, res):
                if answers[i].choice_logprobs is None:
                    answers[i].choice_logprobs = []
                answers[i].choice_logprobs.append(float(sum(r["logp"])))
            st.advance(len(crow))
    if cfg.samples:
        k = cfg.samples
        with Stage(progress, "sampling", n * k) as st:
            if cfg.batch_size > 1:
                for a, texts in zip(answers, sample_shared(model, prompts, k, stop, cfg, cfg.temperature,
                                                           cfg.seed + 1, st)):
                    a.samples = texts
            else:  # one sequence at a time: what batching is measured against
                texts = _generate(model, [p for p in prompts for _ in range(k)], stop, cfg, cfg.temperature,
                                  cfg.seed + 1, st)
                for i, a in enumerate(answers):
                    a.samples = texts[i * k:(i + 1) * k]
    return answers, mode


def ask_target(target: Any, questions: Sequence[Question], cfg: AskConfig | None = None,
               progress: Progress | None = None) -> tuple[list[Asked], str]:
    """Ask a chat target (text in, text out: an OpenAI-compatible endpoint): greedy replies and N samples,
    without token probabilities."""
    cfg = cfg or AskConfig()
    cfg.validate()
    reqs = [(None, q.question + (YES_NO_HINT if cfg.yes_no_hint and q.kind == "yesno" else "")) for q in questions]

    def texts(rs: list[Any]) -> list[str]:
        return [r if isinstance(r, str) else "" for r in rs]

    with Stage(progress, "greedy answers", len(reqs)) as st:
        greedy = texts(target.chat_many(reqs, max_tokens=cfg.max_new_tokens, temperature=0.0, seed=cfg.seed))
        st.advance(len(reqs))
    answers = [Asked(text=t) for t in greedy]
    if cfg.samples:
        with Stage(progress, "sampling", len(reqs) * cfg.samples) as st:
            for k in range(cfg.samples):
                rs = texts(target.chat_many(reqs, max_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                            seed=cfg.seed + 1 + k))
                for a, t in zip(answers, rs):
                    a.samples.append(t)
                st.advance(len(reqs))
    return answers, "chat"


def answer_probability(a: Asked) -> float:
    """exp(sum of the answer tokens' log p): the probability the model gave its own greedy answer."""
    return math.exp(sum(a.token_logprobs)) if a.token_logprobs else float("nan")
