"""Hallucination detectors and how they are scored. Every detector maps one answer to an uncertainty (higher =
more likely wrong); the truth says which answers are wrong, so each is scored exactly.

    max_prob          1 - p(answer) = 1 - prod_t p(y_t | y_<t, x): the greedy answer's own probability (each of
                      its tokens is the most probable one); for a yes/no question, 1 - P(the answer's side)
    min_token_prob    1 - min_t p(y_t | y_<t, x) (the least certain token; MosaicML Composer's confidence)
    mean_entropy      (1/T) sum_t H(p(. | y_<t, x)), H in nats
    selfcheck_ngram   SelfCheckGPT's n-gram variant (Manakul, Liusie, Gales 2023, arXiv 2303.08896): a unigram
                      model fit on the answer and N sampled answers (counts / total, no smoothing, as
                      `UnigramModel.train(k=0)`), score = -mean_w log p(w) over the answer's words
    semantic_entropy  discrete semantic entropy (Farquhar, Kossen, Kuhn, Gal 2024, Nature 630): the N samples are
                      clustered by meaning, SE = -sum_c (n_c / N) log (n_c / N); meaning = normalised-string
                      equality, or MiniLM cosine similarity above a threshold
    p_ik              P(IK) (Kadavath et al. 2022, "Language Models (Mostly) Know What They Know"): a logistic
                      regression on the last layer's hidden state before the answer, predicting "correct";
                      cross-fitted (each answer scored by a probe that never saw it); score = 1 - P(correct)
    random            uniform noise: the negative control, its AUROC must be about 0.5

Scores of a detector, with y = 1 for a wrong answer (abstentions left out):

    AUROC    Pr[score(wrong) > score(right)] + Pr[tie] / 2 (Mann-Whitney), bootstrap interval
    rejection curve  acc(c) = accuracy on the fraction c of answers with the lowest uncertainty (answering the
                     most confident first; answers tied in score count at their mean accuracy, the expectation
                     over orders of ties)
    AURAC    the mean of acc(k / n) over k = 1..n (area under the rejection-accuracy curve)
    PRR      (AURAC - acc) / (AURAC_oracle - acc), the prediction-rejection ratio: 0 = random order, 1 = oracle
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from llmlab.security.privacy.mia import bootstrap_auc, roc_auc, roc_curve

DETECTORS = ("max_prob", "min_token_prob", "mean_entropy", "selfcheck_ngram", "semantic_entropy", "p_ik", "random")
LABELS = {"max_prob": "max probability", "min_token_prob": "min token probability", "mean_entropy": "mean entropy",
          "selfcheck_ngram": "SelfCheck unigram", "semantic_entropy": "semantic entropy (discrete)",
          "p_ik": "P(IK) probe", "random": "random (control)"}
NEEDS = {"max_prob": "token probabilities", "min_token_prob": "token probabilities",
         "mean_entropy": "token probabilities", "selfcheck_ngram": "N >= 2 samples",
         "semantic_entropy": "N >= 2 samples", "p_ik": "hidden states and both outcomes in each fold", "random": ""}
_WORD = re.compile(r"\w+|[^\w\s]")


def max_prob(token_logprobs: Sequence[float]) -> float:
    return 1.0 - math.exp(sum(token_logprobs)) if len(token_logprobs) else float("nan")


def min_token_prob(token_logprobs: Sequence[float]) -> float:
    return 1.0 - math.exp(min(token_logprobs)) if len(token_logprobs) else float("nan")


def mean_entropy(token_entropies: Sequence[float]) -> float:
    return float(np.mean(token_entropies)) if len(token_entropies) else float("nan")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def selfcheck_ngram(answer: str, samples: Sequence[str]) -> dict[str, float]:
    """SelfCheckGPT unigram scores of an answer against sampled answers: avg_neg_logprob and
    max_neg_logprob of the answer's words under counts over the answer and the samples (nan without words)."""
    counts: Counter = Counter()
    for t in (answer, *samples):
        counts.update(words(t))
    total = sum(counts.values())
    w = words(answer)
    if not w or not total:
        return {"avg_neg_logprob": float("nan"), "max_neg_logprob": float("nan")}
    nl = [-math.log(counts[x] / total) for x in w]
    return {"avg_neg_logprob": float(np.mean(nl)), "max_neg_logprob": float(max(nl))}


def cluster_strings(keys: Sequence[str]) -> list[int]:
    """Cluster ids by equality of the (already normalised) strings, in order of first appearance."""
    ids: dict[str, int] = {}
    return [ids.setdefault(k, len(ids)) for k in keys]


def cluster_embeddings(texts: Sequence[str], embed: Callable[[list[str]], np.ndarray], threshold: float = 0.9
                       ) -> list[int]:
    """Greedy clustering by meaning: each text joins the first cluster whose first member has cosine similarity
    >= threshold with it (embeddings L2-normalised), else starts a new one. Equal strings always share one."""
    uniq = list(dict.fromkeys(texts))
    if not uniq:
        return []
    e = np.asarray(embed(uniq), dtype=np.float64)
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    heads: list[int] = []
    of: dict[str, int] = {}
    for i, t in enumerate(uniq):
        for c, h in enumerate(heads):
            if float(e[i] @ e[h]) >= threshold:
                of[t] = c
                break
        else:
            of[t] = len(heads)
            heads.append(i)
    return [of[t] for t in texts]


def discrete_semantic_entropy(cluster_ids: Sequence[int]) -> float:
    """-sum_c p_c log p_c with p_c the share of samples in cluster c (nats); nan without samples."""
    if not len(cluster_ids):
        return float("nan")
    n = len(cluster_ids)
    return float(-sum((k / n) * math.log(k / n) for k in Counter(cluster_ids).values()))


def minilm_embedder() -> Callable[[list[str]], np.ndarray]:
    """Normalised mean-pooled all-MiniLM-L6-v2 sentence embeddings (the shipped encoder)."""
    import torch

    from llmlab.interop import load

    enc = load("minilm")

    @torch.no_grad()
    def embed(texts: list[str]) -> np.ndarray:
        seqs = [enc.tokenizer.encode(t or " ", add_special_tokens=True)[: enc.config.block_size] for t in texts]
        T = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), T, dtype=torch.long)
        mask = torch.zeros(len(seqs), T, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
        return enc.sentence_embedding(ids, mask).numpy()

    return embed


def p_ik_probe(features: np.ndarray, correct: Sequence[bool], folds: int = 5, seed: int = 0, C: float = 1.0
               ) -> np.ndarray | None:
    """Out-of-fold P(correct) of a standardised logistic regression on the features (stratified K folds);
    None when either outcome has fewer than 2 examples."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y = np.asarray(correct, dtype=int)
    k = min(folds, int(np.bincount(y, minlength=2).min()))
    if k < 2:
        return None
    out = np.zeros(len(y))
    for tr, te in StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(features, y):
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000))
        clf.fit(features[tr], y[tr])
        out[te] = clf.predict_proba(features[te])[:, 1]
    return out


# ----------------------------------------------------------------------------- scoring a detector


def rejection_curve(uncertainty: Sequence[float], correct: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
    """(coverage k/n, accuracy of the k most confident answers) for k = 1..n; ties in uncertainty count at
    their block's mean accuracy."""
    u = np.asarray(uncertainty, dtype=np.float64)
    y = np.asarray(correct, dtype=np.float64)
    n = len(u)
    if n == 0:
        return np.zeros(0), np.zeros(0)
    order = np.argsort(u, kind="mergesort")
    u, y = u[order], y[order].copy()
    start = 0
    for i in range(1, n + 1):
        if i == n or u[i] != u[start]:
            y[start:i] = y[start:i].mean()
            start = i
    k = np.arange(1, n + 1)
    return k / n, np.cumsum(y) / k


def aurac(uncertainty: Sequence[float], correct: Sequence[bool]) -> float:
    """Area under the rejection-accuracy curve: mean over k of the accuracy of the k most confident answers."""
    _, acc = rejection_curve(uncertainty, correct)
    return float(acc.mean()) if acc.size else float("nan")


def accuracy_at_coverage(uncertainty: Sequence[float], correct: Sequence[bool], coverage: float) -> float:
    """Accuracy when answering only the ceil(coverage * n) most confident questions."""
    cov, acc = rejection_curve(uncertainty, correct)
    if not acc.size:
        return float("nan")
    k = max(1, math.ceil(coverage * len(acc) - 1e-9))
    return float(acc[k - 1])


def prr(uncertainty: Sequence[float], correct: Sequence[bool]) -> float:
    """Prediction-rejection ratio (AURAC - acc) / (AURAC_oracle - acc); nan when all answers are right or
    all wrong."""
    y = np.asarray(correct, dtype=np.float64)
    base = float(y.mean()) if y.size else float("nan")
    oracle = aurac(-y, y)
    if not y.size or oracle - base <= 0:
        return float("nan")
    return (aurac(uncertainty, correct) - base) / (oracle - base)


def score_detector(uncertainty: Sequence[float], correct: Sequence[bool], coverages: Sequence[float] = (0.8, 0.9, 0.95),
                   bootstrap: int = 1000, seed: int = 0, roc_points: int = 200) -> dict[str, Any]:
    """AUROC for "the answer is wrong" (with a bootstrap interval), AURAC, PRR, accuracy at each coverage and
    the ROC and rejection curves (thinned to about roc_points points) of one detector. Answers without a
    score (nan) are left out and counted in `missing`."""
    u = np.asarray(uncertainty, dtype=np.float64)
    y = np.asarray(correct, dtype=bool)
    ok = ~np.isnan(u)
    u, y = u[ok], y[ok]
    out: dict[str, Any] = {"n": int(ok.sum()), "missing": int((~ok).sum()), "wrong": int((~y).sum())}
    if out["n"] == 0:
        return {**out, "measured": False, "why": "no scores"}
    out["aurac"] = aurac(u, y)
    out["prr"] = prr(u, y)
    out["accuracy"] = float(y.mean())
    out["accuracy_at"] = {f"{c:g}": accuracy_at_coverage(u, y, c) for c in coverages}
    cov, acc = rejection_curve(u, y)
    step = max(1, len(cov) // roc_points)
    out["rejection"] = {"coverage": cov[::step].tolist(), "accuracy": acc[::step].tolist()}
    wrong = (~y).astype(int)
    if wrong.sum() == 0 or wrong.sum() == len(wrong):
        return {**out, "measured": False, "why": "needs both right and wrong answers for an AUROC"}
    out["auroc"] = roc_auc(u, wrong)
    b = bootstrap_auc(u, wrong, n=bootstrap, seed=seed) if bootstrap else {}
    out["auroc_ci"] = [b.get("low"), b.get("high")] if b else [None, None]
    fpr, tpr, _ = roc_curve(u, wrong)
    step = max(1, len(fpr) // roc_points)
    out["roc"] = {"fpr": np.r_[fpr[::step], fpr[-1]].tolist(), "tpr": np.r_[tpr[::step], tpr[-1]].tolist()}
    out["measured"] = True
    return out
