"""Baseline defences against adversarial suffixes, measured by the same attack.

Jain, Schwarzschild, Wen, Somepalli, Kirchenbauer, Chiang, Goldblum, Saha, Geiping, Goldstein 2023,
"Baseline Defenses for Adversarial Attacks Against Aligned Language Models":

- perplexity filter: flag a prompt x_1..x_n when its log-perplexity -(1/n) sum_t log p(x_t | x_<t) under a
  reference model exceeds a threshold, set on benign prompts so that a chosen fraction of them (the
  false-positive rate) is flagged;
- windowed perplexity filter: flag when the log-perplexity of any window of w consecutive tokens exceeds
  its threshold (a short gibberish suffix hides inside a long fluent prompt's average, not inside a window);
- retokenisation: encode the user's text with BPE-dropout (Provilkov, Emelianenko, Voita 2020), so the
  model sees the same text in other, finer tokens than the ones the suffix was optimised in. Here each token
  is, with probability p, split at a random character boundary and the two pieces encoded apart (its last
  merge dropped), which works for any tokenizer and is reproducible with a seed.

Robey, Wong, Hassani, Pappas 2023, "SmoothLLM: Defending Large Language Models Against Jailbreaking
Attacks": N copies of the prompt, each with a fraction q of its characters replaced by random printable
ones; the copies' responses are judged jailbroken or not, and the majority decides (the defended answer is
one of the majority's responses).
"""

from __future__ import annotations

import math
import random
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from llmlab.errors import LlmlabError
from llmlab.security.targets import WhiteBox


@torch.no_grad()
def token_nll(wb: WhiteBox, text: str) -> list[float]:
    """-log p(x_t | x_<t) of every token of the text after the first, under the reference model."""
    ids = wb.encode(text)[: wb.block_size]
    if len(ids) < 2:
        return []
    return (-wb.token_logprobs(ids)).tolist()


def log_perplexity(nll: Sequence[float]) -> float:
    """The mean of the token NLLs (log-perplexity)."""
    return sum(nll) / len(nll) if nll else 0.0


def windowed_log_perplexity(nll: Sequence[float], window: int = 10) -> float:
    """The largest mean NLL over windows of `window` consecutive tokens (the whole text when shorter)."""
    if len(nll) <= window:
        return log_perplexity(nll)
    s = sum(nll[:window])
    best = s
    for i in range(window, len(nll)):
        s += nll[i] - nll[i - window]
        best = max(best, s)
    return best / window


def threshold_for(scores: Sequence[float], fpr: float) -> float:
    """The smallest threshold that flags at most a fraction `fpr` of the benign scores (score > threshold)."""
    if not scores:
        raise LlmlabError("no benign prompts to set the perplexity threshold on; give some")
    s = sorted(scores)
    k = int(math.floor(fpr * len(s)))  # prompts allowed above the threshold
    return s[len(s) - 1 - k] if k < len(s) else s[0] - 1e-9


@dataclass
class PerplexityFilter:
    """A (windowed) perplexity filter with its threshold set on benign prompts."""

    threshold: float
    window: int | None = None  # None: the whole prompt

    def score(self, wb: WhiteBox, text: str) -> float:
        nll = token_nll(wb, text)
        return windowed_log_perplexity(nll, self.window) if self.window else log_perplexity(nll)

    def flags(self, wb: WhiteBox, text: str) -> bool:
        return self.score(wb, text) > self.threshold

    @classmethod
    def fit(cls, wb: WhiteBox, benign: Sequence[str], fpr: float = 0.05, window: int | None = None
            ) -> PerplexityFilter:
        """The filter whose threshold flags at most `fpr` of the benign prompts."""
        f = cls(0.0, window)
        scores = [f.score(wb, t) for t in benign]
        return cls(threshold_for(scores, fpr), window)


def bpe_dropout_ids(wb: WhiteBox, text: str, p: float = 0.4, rng: random.Random | None = None) -> list[int]:
    """The text's tokens, each split with probability p at a random character boundary into two separately
    encoded pieces (a dropped merge, as in BPE-dropout); single-character tokens stay."""
    rng = rng or random.Random(0)
    out: list[int] = []
    for t in wb.encode(text):
        piece = wb.decode([t])
        if len(piece) > 1 and rng.random() < p and wb.encode(piece) == [t]:
            cut = rng.randint(1, len(piece) - 1)
            out += wb.encode(piece[:cut]) + wb.encode(piece[cut:])
        else:
            out.append(t)
    return out


PRINTABLE = string.ascii_letters + string.digits + string.punctuation + " "


def perturb(text: str, q: float, rng: random.Random) -> str:
    """SmoothLLM's swap perturbation: ceil(q * len) randomly chosen characters replaced by random printable
    characters."""
    chars = list(text)
    if not chars:
        return text
    n = min(len(chars), max(1, math.ceil(q * len(chars))))
    for i in rng.sample(range(len(chars)), n):
        chars[i] = rng.choice(PRINTABLE)
    return "".join(chars)


def smoothllm(respond: Callable[[list[str]], list[str]], prompt: str, is_jailbroken: Callable[[str], bool],
              copies: int = 5, q: float = 0.1, seed: int = 0) -> tuple[str, bool, list[str]]:
    """(defended response, majority says jailbroken, the copies' responses): respond() answers a batch of
    user prompts."""
    rng = random.Random(seed)
    texts = [perturb(prompt, q, rng) for _ in range(copies)]
    responses = respond(texts)
    votes = [is_jailbroken(r) for r in responses]
    majority = sum(votes) > copies / 2
    pick = next(r for r, v in zip(responses, votes) if v == majority)
    return pick, majority, responses
