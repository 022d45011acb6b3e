"""Likelihood scoring for the bias lab, batched: sentence log-likelihoods and continuation log-likelihoods
from causal LMs, and pseudo-log-likelihoods from masked LMs. Each batched function has a one-at-a-time
twin (`*_loop`) that computes the same numbers the plain way; the tests check they agree and
benchmarks/bench_bias.py times one against the other.

    causal:   l_t = log p(x_t | x_<t)                            (one forward pass per sequence)
    masked:   PLL_u = log P_MLM(x_u | x with x_u replaced by [MASK])   (one masked copy per position u)

The batched versions sort by length (little padding), cap each batch by a token budget, apply the
output head only where a log-probability is needed, and score the choices of a multiple-choice item
from one shared pass over their common context (its KV cache copied to each choice)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from llmlab.errors import LlmlabError

BATCH_TOKENS = 2048  # tokens per forward pass of the batched scorers
HEAD_ROWS = 256  # rows of hidden states sent through a vocabulary head at a time

Advance = Callable[[int], None] | None


class BiasError(LlmlabError):
    """A problem with a bias-lab input: a data file, a word set, or a model that cannot give the metric."""


# ----------------------------------------------------------------------------- what a model must be


def arch_of(model: torch.nn.Module) -> str:
    return getattr(getattr(model, "config", None), "arch", "?")


def require_causal(model: torch.nn.Module, what: str, name: str = "the model") -> None:
    """BiasError unless the model is a decoder-only LM with a tokenizer."""
    arch = arch_of(model)
    if arch != "gpt":
        kind = {"bert": "an encoder-only (bert)", "seq2seq": "an encoder-decoder (seq2seq)"}.get(arch, arch)
        raise BiasError(f"{what} needs a causal (decoder-only) LM, but {name} is {kind} model; give an llmlab "
                        "GPT run, a GPT-2/Llama folder, a .gguf file or smollm2")
    if getattr(model, "tokenizer", None) is None:
        raise BiasError(f"{name} has no tokenizer; give a run folder or a Hugging Face folder with one")


def require_mlm(model: torch.nn.Module, what: str, name: str = "the model") -> None:
    """BiasError unless the model is an encoder with a masked-LM head and a tokenizer with a mask token."""
    if arch_of(model) != "bert":
        raise BiasError(f"{what} needs a masked LM, but {name} is a {arch_of(model)} model")
    if not model.config.mlm_head:
        raise BiasError(f"{name} has no masked-LM head (e.g. minilm is a sentence encoder); give a run trained "
                        "with `llmlab train --arch bert`, or score a causal LM")
    tok = getattr(model, "tokenizer", None)
    if tok is None or tok.mask_id is None:
        raise BiasError(f"{name} has no tokenizer with a mask token; give a run trained with "
                        "`llmlab train --arch bert`")


def require_encoder(model: torch.nn.Module, what: str, name: str = "the model") -> None:
    """BiasError unless the model is an encoder that gives sentence embeddings."""
    if arch_of(model) != "bert" or not hasattr(model, "sentence_embedding"):
        raise BiasError(f"{what} needs an encoder that gives sentence embeddings (minilm or an llmlab BERT run), "
                        f"but {name} is a {arch_of(model)} model")
    if getattr(model, "tokenizer", None) is None:
        raise BiasError(f"{name} has no tokenizer; give a run folder or a Hugging Face folder with one")


def score_prefix(tok) -> list[int]:  # noqa: ANN001
    """The token a sentence is scored after when it has no context (as lm-eval does): BOS if the tokenizer
    has one, else its end-of-text token, else none (then the first token is not scored)."""
    for i in (tok.bos_id, tok.eos_id):
        if i is not None:
            return [int(i)]
    return []


# ----------------------------------------------------------------------------- helpers


@contextmanager
def hidden_states(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Inside, a GPT returns its final hidden states (B, T, C) instead of logits; yields the real head."""
    head = model.lm_head
    model.lm_head = torch.nn.Identity()
    try:
        yield head
    finally:
        model.lm_head = head


def head_logprobs(head: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor, targets: torch.Tensor
                  ) -> torch.Tensor:
    """log softmax(head(h))[target] for rows h (N, C) and targets (N,), HEAD_ROWS rows at a time:
    logit[target] - logsumexp(logits)."""
    out = []
    for i in range(0, h.size(0), HEAD_ROWS):
        lg = head(h[i:i + HEAD_ROWS]).float()  # (n, V)
        t = targets[i:i + HEAD_ROWS]
        out.append(lg.gather(1, t[:, None])[:, 0] - torch.logsumexp(lg, -1))
    return torch.cat(out) if out else torch.empty(0)


def _batches(lengths: Sequence[int], budget: int, max_rows: int = 256) -> Iterator[list[int]]:
    """Indices grouped longest first, each group at most `budget` padded tokens (and at least one item)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    b = 0
    while b < len(order):
        rows = max(1, min(max_rows, budget // max(1, lengths[order[b]])))
        yield order[b:b + rows]
        b += rows


def _context_batches(contexts: Sequence[Sequence[int]], choices: Sequence[Sequence[Sequence[int]]], budget: int,
                     block: int, max_rows: int = 64) -> Iterator[list[int]]:
    """Items grouped longest context first: padded context tokens plus choice tokens at most `budget`, and
    the padded context and the padded choices together within the model's context window."""
    order = sorted(range(len(contexts)), key=lambda i: -len(contexts[i]))
    group: list[int] = []
    t_ctx = t_ch = n_ch = 0
    for i in order:
        lc, lx, k = len(contexts[i]), max(len(x) for x in choices[i]), len(choices[i])
        nt, nx, nk = max(t_ctx, lc), max(t_ch, lx), n_ch + k
        if group and (len(group) >= max_rows or nt + nx - 1 > block or nt * (len(group) + 1) + nx * nk > budget):
            yield group
            group, nt, nx, nk = [], lc, lx, k
        group.append(i)
        t_ctx, t_ch, n_ch = nt, nx, nk
    if group:
        yield group


# ----------------------------------------------------------------------------- causal: whole sequences


@torch.inference_mode()
def sequence_logprobs(model: torch.nn.Module, seqs: Sequence[Sequence[int]], batch_tokens: int = BATCH_TOKENS,
                      advance: Advance = None) -> list[torch.Tensor]:
    """For each token sequence (cut to block_size + 1 tokens), l_t = log p(x_t | x_<t) for t = 1..n-1.
    Right-padded batches (a causal model's real tokens never see the padding after them)."""
    block = model.config.block_size
    seqs = [list(s)[: block + 1] for s in seqs]
    out: list[torch.Tensor] = [torch.empty(0) for _ in seqs]
    pad = 0
    for idx in _batches([len(s) for s in seqs], batch_tokens):
        group = [seqs[i] for i in idx]
        T = max(len(s) for s in group) - 1
        if T <= 0:
            if advance:
                advance(len(idx))
            continue
        ids = torch.full((len(group), T), pad, dtype=torch.long)
        for j, s in enumerate(group):
            ids[j, : len(s) - 1] = torch.tensor(s[:-1])
        with hidden_states(model) as head:
            h = model(ids)  # (B, T, C)
        rows, targets = [], []
        for j, s in enumerate(group):
            n = len(s) - 1
            rows.append(h[j, :n])
            targets.append(torch.tensor(s[1:]))
        lp = head_logprobs(head, torch.cat(rows), torch.cat(targets))
        start = 0
        for j, i in enumerate(idx):
            n = len(group[j]) - 1
            out[i] = lp[start:start + n].clone()
            start += n
        if advance:
            advance(len(idx))
    return out


def sequence_logprobs_loop(model: torch.nn.Module, seqs: Sequence[Sequence[int]], advance: Advance = None
                           ) -> list[torch.Tensor]:
    """sequence_logprobs one sequence at a time with llmlab.evaluate.token_logprobs (the plain loop)."""
    from llmlab.evaluate import token_logprobs

    block = model.config.block_size
    out = []
    for s in seqs:
        out.append(token_logprobs(model, list(s)[: block + 1]).float())
        if advance:
            advance(1)
    return out


# ----------------------------------------------------------------------------- causal: choices after a context


@torch.inference_mode()
def continuation_logprobs(model: torch.nn.Module, contexts: Sequence[Sequence[int]],
                          choices: Sequence[Sequence[Sequence[int]]], batch_tokens: int = BATCH_TOKENS,
                          advance: Advance = None, score_context: bool = False) -> list[list[float]]:
    """log p(choice | context) = sum_t log p(c_t | context, c_<t) for every choice of every context; with
    score_context, log p(context + choice) = sum_{t >= 1} log p(x_t | x_<t) instead (the context's own
    tokens after its first are added: a shared prefix of whole sentences).

    Contexts are scored once (right-padded batches, the output head only at each last position, or at every
    position with score_context), their KV caches copied to each of their choices, and the choices scored in
    one more pass. Contexts must be non-empty; a context and a choice together must fit the context window."""
    block = model.config.block_size
    pad = 0
    for i, (c, ch) in enumerate(zip(contexts, choices)):
        if not c:
            raise BiasError(f"item {i + 1} has an empty context; give at least one token")
        if any(not x for x in ch) or not ch:
            raise BiasError(f"item {i + 1} has an empty answer choice")
        if len(c) + max(len(x) for x in ch) > block:
            raise BiasError(f"item {i + 1} is {len(c) + max(len(x) for x in ch)} tokens, longer than the "
                            f"model's context of {block}")
    out: list[list[float]] = [[] for _ in contexts]
    for idx in _context_batches(contexts, choices, batch_tokens, block):
        ctx = [list(contexts[i]) for i in idx]
        lens = torch.tensor([len(c) for c in ctx])
        T = int(lens.max())
        ids = torch.full((len(ctx), T), pad, dtype=torch.long)
        mask = torch.zeros((len(ctx), T), dtype=torch.long)
        for j, c in enumerate(ctx):
            ids[j, : len(c)] = torch.tensor(c)
            mask[j, : len(c)] = 1
        caches = model.new_caches()
        with hidden_states(model) as head:
            # right padding needs no mask here (causal attention): the fused kernel's fast path
            hall = model(ids, caches=caches)  # (B, T, C)
            h = hall[torch.arange(len(ctx)), lens - 1]  # (B, C) each last context token
            first = F.log_softmax(head(h).float(), -1)  # (B, V): the first token of every choice
            own = torch.zeros(len(ctx))  # log p of each context's own tokens (score_context)
            if score_context and T > 1:
                rows = [hall[j, : len(c) - 1] for j, c in enumerate(ctx)]
                tgt = [torch.tensor(c[1:], dtype=torch.long) for c in ctx]
                lp_ctx = head_logprobs(head, torch.cat(rows), torch.cat(tgt))
                owner_ctx = torch.tensor([j for j, c in enumerate(ctx) for _ in range(len(c) - 1)], dtype=torch.long)
                own = own.index_add(0, owner_ctx, lp_ctx)
            rep, conts = [], []
            for j, i in enumerate(idx):
                for x in choices[i]:
                    rep.append(j)
                    conts.append(list(x))
            rep_t = torch.tensor(rep)
            first_tok = torch.tensor([x[0] for x in conts])
            total = first[rep_t, first_tok] + own[rep_t]  # (N,)
            Tc = max(len(x) for x in conts) - 1
            if Tc > 0:
                for cache in caches:
                    cache.reorder(rep_t)
                cids = torch.full((len(conts), Tc), pad, dtype=torch.long)
                cmask = torch.zeros((len(conts), Tc), dtype=torch.long)
                for r, x in enumerate(conts):
                    cids[r, : len(x) - 1] = torch.tensor(x[:-1])
                    cmask[r, : len(x) - 1] = 1
                # the mask hides the context's padding from the choice tokens and numbers their positions
                # len(context) + t (a running count of real tokens)
                hc = model(cids, attention_mask=torch.cat([mask[rep_t], cmask], 1), caches=caches)  # (N, Tc, C)
                rows, targets, owner = [], [], []
                for r, x in enumerate(conts):
                    n = len(x) - 1
                    if n:
                        rows.append(hc[r, :n])
                        targets.append(torch.tensor(x[1:]))
                        owner += [r] * n
                lp = head_logprobs(head, torch.cat(rows), torch.cat(targets))
                total = total.index_add(0, torch.tensor(owner), lp)
        r = 0
        for i in idx:
            k = len(choices[i])
            out[i] = [float(v) for v in total[r:r + k]]
            r += k
        if advance:
            advance(len(idx))
    return out


def continuation_logprobs_loop(model: torch.nn.Module, contexts: Sequence[Sequence[int]],
                               choices: Sequence[Sequence[Sequence[int]]], advance: Advance = None,
                               score_context: bool = False) -> list[list[float]]:
    """continuation_logprobs the plain way: one full forward pass of context + choice per choice."""
    from llmlab.evaluate import token_logprobs

    out = []
    for c, ch in zip(contexts, choices):
        row = []
        for x in ch:
            lp = token_logprobs(model, list(c) + list(x))
            row.append(float(lp.sum() if score_context else lp[len(c) - 1:].sum()))
        out.append(row)
        if advance:
            advance(1)
    return out


# ----------------------------------------------------------------------------- masked LMs


def _masked_copies(seqs: Sequence[Sequence[int]], positions: Sequence[Sequence[int]]
                   ) -> list[tuple[int, int]]:
    return [(i, u) for i, pos in enumerate(positions) for u in pos]


@torch.inference_mode()
def masked_logprobs(model: torch.nn.Module, seqs: Sequence[Sequence[int]], positions: Sequence[Sequence[int]],
                    batch_tokens: int = BATCH_TOKENS, advance: Advance = None) -> list[torch.Tensor]:
    """For each sequence and each position u in its `positions`: log P_MLM(x_u | x with x_u masked), one
    masked copy per position (Salazar et al. 2020's pseudo-log-likelihood terms), in padded batches."""
    tok = model.tokenizer
    mask_id, pad = tok.mask_id, tok.pad_id if tok.pad_id is not None else 0
    block = model.config.block_size
    for i, s in enumerate(seqs):
        if len(s) > block:
            raise BiasError(f"sentence {i + 1} is {len(s)} tokens, longer than the model's context of {block}")
    copies = _masked_copies(seqs, positions)
    vals = torch.zeros(len(copies))
    done_per_seq = [0] * len(seqs)
    for idx in _batches([len(seqs[i]) for i, _ in copies], batch_tokens):
        T = max(len(seqs[copies[k][0]]) for k in idx)
        ids = torch.full((len(idx), T), pad, dtype=torch.long)
        amask = torch.zeros((len(idx), T), dtype=torch.long)
        pos, target = [], []
        for j, k in enumerate(idx):
            i, u = copies[k]
            s = seqs[i]
            ids[j, : len(s)] = torch.tensor(list(s))
            amask[j, : len(s)] = 1
            target.append(int(s[u]))
            ids[j, u] = mask_id
            pos.append(u)
        h = model(ids, attention_mask=amask)  # (B, T, C)
        hs = h[torch.arange(len(idx)), torch.tensor(pos)]  # (B, C)
        vals[torch.tensor(idx)] = head_logprobs(model.mlm_logits, hs, torch.tensor(target))
        if advance:
            finished = 0
            for k in idx:
                i = copies[k][0]
                done_per_seq[i] += 1
                finished += done_per_seq[i] == len(positions[i])
            advance(finished)
    out, k = [], 0
    for pos in positions:
        out.append(vals[k:k + len(pos)].clone())
        k += len(pos)
    return out


@torch.inference_mode()
def masked_logprobs_loop(model: torch.nn.Module, seqs: Sequence[Sequence[int]], positions: Sequence[Sequence[int]],
                         advance: Advance = None) -> list[torch.Tensor]:
    """masked_logprobs the plain way: one forward pass per masked copy."""
    mask_id = model.tokenizer.mask_id
    out = []
    for s, pos in zip(seqs, positions):
        row = []
        for u in pos:
            x = torch.tensor([list(s)])
            x[0, u] = mask_id
            lp = F.log_softmax(model.mlm_logits(model(x)[0, u]).float(), -1)
            row.append(float(lp[int(s[u])]))
        out.append(torch.tensor(row))
        if advance:
            advance(1)
    return out
