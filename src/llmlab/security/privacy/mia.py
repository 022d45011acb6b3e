"""Membership inference on language models, with the attacks and metrics of the MIMIR benchmark (Duan,
Suri et al. 2024, "Do Membership Inference Attacks Work on Large Language Models?").

With l_t = log p(x_t | x_<t) and L(x) = -mean_t l_t, each attack gives a score where higher = more
likely a member (MIMIR's scores are negated where lower means member):

    loss           -L(x)                                              (Yeom et al. 2018)
    reference      -(L_target(x) - L_ref(x))                          (Carlini et al. 2021; Watson et al. 2022)
    zlib           -L(x) / H_zlib(x)                                  (Carlini et al. 2021)
    min_k          mean of the lowest k% of l_t                        (Shi et al. 2024, Min-K% Prob)
    min_k++        mean of the lowest k% of (l_t - mu_t) / sigma_t     (Zhang et al. 2024, Min-K%++)
                   mu_t = E_{z~p(.|x_<t)} log p(z|x_<t), sigma_t^2 = Var_{z~p(.|x_<t)} log p(z|x_<t)
    neighbourhood  -(L(x) - mean_j L(x~_j)) over perturbed neighbours  (Mattern et al. 2023)
    blind          no model: TF-IDF character n-grams + logistic regression, out-of-fold (Das et al. 2024):
                   the baseline every attack must beat, since it only sees how members' text differs

Metrics: ROC AUC with a bootstrap confidence interval, and TPR at 1% and 0.1% FPR where the non-members are
enough to resolve it (at least 10 / FPR of them), else at the lowest FPR they resolve.
"""

from __future__ import annotations

import math
import random
import re
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from llmlab.security.privacy.common import Callback, PrivacyError, Stage, batch_logprobs, chunk_docs, quiet, sample_docs
from llmlab.security.privacy.extract import NgramIndex
from llmlab.security.targets import WhiteBox
from llmlab.stats import min_negatives_for_fpr, resolvable_fpr

ATTACKS = ("loss", "reference", "zlib", "min_k", "min_k++", "neighbourhood", "blind")


# ----------------------------------------------------------------------------- metrics


def roc_curve(scores: Sequence[float], labels: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds): predicting "member" when score >= threshold, one point per distinct score
    from the highest down, starting at (0, 0) with threshold +inf."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    P, N = int(y.sum()), int((~y).sum())
    if P == 0 or N == 0:
        raise PrivacyError("ROC needs both members and non-members")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]  # last index of each distinct score
    tps = np.cumsum(y)[last]
    fps = last + 1 - tps
    return np.r_[0.0, fps / N], np.r_[0.0, tps / P], np.r_[np.inf, s[last]]


def roc_auc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Area under the ROC curve = Pr[score(member) > score(non-member)] + 0.5 Pr[tie] (Mann-Whitney U
    with average ranks for ties)."""
    from scipy.stats import rankdata

    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    P, N = int(y.sum()), int((~y).sum())
    if P == 0 or N == 0:
        raise PrivacyError("AUC needs both members and non-members")
    r = rankdata(s)
    return float((r[y].sum() - P * (P + 1) / 2) / (P * N))


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, bound: float) -> float:
    """The highest TPR among ROC points with FPR <= bound."""
    ok = fpr <= bound + 1e-12
    return float(tpr[ok].max()) if ok.any() else 0.0


def bootstrap_auc(scores: Sequence[float], labels: Sequence[int], n: int = 1000, seed: int = 0,
                  level: float = 0.95) -> dict[str, float]:
    """Percentile bootstrap of the AUC, resampling members and non-members separately with replacement:
    mean, std and the central `level` interval."""
    from scipy.stats import rankdata

    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    pos, neg = s[y], s[~y]
    rng = np.random.default_rng(seed)
    P, N = len(pos), len(neg)
    if n <= 0:
        return {}
    bp = pos[rng.integers(0, P, (n, P))]
    bn = neg[rng.integers(0, N, (n, N))]
    r = rankdata(np.concatenate([bp, bn], 1), axis=1)
    aucs = (r[:, :P].sum(1) - P * (P + 1) / 2) / (P * N)
    lo, hi = np.percentile(aucs, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return {"mean": float(aucs.mean()), "std": float(aucs.std()), "low": float(lo), "high": float(hi),
            "level": level, "resamples": n}


def evaluate_scores(scores: Sequence[float], labels: Sequence[int], bootstrap: int = 1000, seed: int = 0
                    ) -> dict[str, Any]:
    """AUC (with bootstrap CI), TPR at 1% and 0.1% FPR, and the ROC curve of one attack.

    A TPR at an FPR is only reported when there are at least 10 / FPR non-members (`stats.min_negatives_for_fpr`):
    with 200 non-members the smallest non-zero FPR is 0.5%, so "TPR at 0.1% FPR" would be "TPR at zero false
    positives" on one sample. The unresolvable ones are None, and `tpr_at_resolvable` gives the TPR at the lowest
    FPR the data can resolve (10 / n_nonmembers)."""
    fpr, tpr, _ = roc_curve(scores, labels)
    n_neg = int(len(labels) - int(np.sum(labels)))
    out: dict[str, Any] = {"auc": roc_auc(scores, labels), "auc_ci": bootstrap_auc(scores, labels, bootstrap, seed),
                           "n_nonmembers": n_neg}
    for key, bound in (("tpr_at_1pct", 0.01), ("tpr_at_0.1pct", 0.001)):
        out[key] = tpr_at_fpr(fpr, tpr, bound) if n_neg >= min_negatives_for_fpr(bound) else None
    low = resolvable_fpr(n_neg)
    out["tpr_at_resolvable"] = {"fpr": low, "tpr": tpr_at_fpr(fpr, tpr, low)}
    out["roc"] = {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
    return out


def blind_baseline(members: Sequence[str], nonmembers: Sequence[str], folds: int = 5, seed: int = 0,
                   bootstrap: int = 1000) -> dict[str, Any]:
    """A membership "attack" that never touches the model: character 1-4-gram TF-IDF + logistic regression,
    scored out-of-fold (stratified k-fold). An AUC well above 0.5 means members and non-members differ in
    their text alone (a distribution shift), so the model's attacks are not measuring memorisation there
    (Das et al. 2024, "Blind Baselines Beat Membership Inference Attacks for Foundation Models"; Duan et al.
    2024)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    texts = list(members) + list(nonmembers)
    labels = np.array([1] * len(members) + [0] * len(nonmembers))
    k = max(2, min(folds, int(labels.sum()), int((1 - labels).sum())))
    scores = np.zeros(len(texts))
    for train_idx, test_idx in StratifiedKFold(k, shuffle=True, random_state=seed).split(texts, labels):
        vec = TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 4), sublinear_tf=True, min_df=1)
        x = vec.fit_transform([texts[i] for i in train_idx])
        clf = LogisticRegression(max_iter=2000, C=1.0).fit(x, labels[train_idx])
        scores[test_idx] = clf.decision_function(vec.transform([texts[i] for i in test_idx]))
    res = evaluate_scores(scores.tolist(), labels.tolist(), bootstrap, seed)
    res["method"] = f"char 1-4-gram TF-IDF + logistic regression, {k}-fold out-of-fold scores (no model)"
    return res


BLIND_WARNING_MARGIN = 0.05  # warn when the blind baseline's AUC is within this of the best attack's


def blind_warning(result: MIAResult) -> str | None:
    """A caveat when the blind baseline comes within BLIND_WARNING_MARGIN of the best attack's AUC."""
    blind = result.attacks.get("blind")
    others = {k: v for k, v in result.attacks.items() if k != "blind"}
    if not blind or not others:
        return None
    best_name, best = max(others.items(), key=lambda kv: kv[1]["auc"])
    if blind["auc"] >= best["auc"] - BLIND_WARNING_MARGIN:
        return (f"the blind baseline (no model) reaches AUC {blind['auc']:.3f}, within {BLIND_WARNING_MARGIN:.2f} "
                f"of the best attack ({best_name}, {best['auc']:.3f}): members and non-members differ in their text, "
                "so this AUC does not measure memorisation. Use an i.i.d. member/non-member split.")
    return None


# ----------------------------------------------------------------------------- attacks


def min_k(values: torch.Tensor, k: float) -> float:
    """Mean of the lowest ceil(k * n) values (at least one)."""
    v = values.double()
    n = max(1, math.ceil(k * v.numel()))
    return float(torch.topk(v, n, largest=False).values.mean())


_WORD = re.compile(r"[A-Za-z]+")


def neighbours(text: str, n: int, fraction: float, pool: Sequence[str], rng: random.Random) -> list[str]:
    """n perturbed copies of text, each with `fraction` of its words (at least one) replaced by words drawn
    from `pool`: a lexical-substitution neighbourhood (Mattern et al. 2023 fill masks with a BERT; no
    masked-LM is needed here)."""
    spans = [m.span() for m in _WORD.finditer(text)]
    if not spans or not pool:
        return [text] * n
    out = []
    for _ in range(n):
        k = max(1, round(fraction * len(spans)))
        chosen = sorted(rng.sample(range(len(spans)), min(k, len(spans))), reverse=True)
        t = text
        for i in chosen:
            a, b = spans[i]
            t = t[:a] + rng.choice(pool) + t[b:]
        out.append(t)
    return out


@dataclass
class MIAConfig:
    """A membership-inference run. Documents are cut into sequences of max_tokens tokens; the defaults
    score 200 member and 200 non-member sequences."""

    max_docs: int = 200  # sequences per side
    max_tokens: int = 0  # tokens per sequence; 0 = the model's context + 1
    min_tokens: int = 16
    k: float = 0.2  # Min-K% and Min-K%++ fraction
    neighbours: int = 8
    perturb: float = 0.15  # fraction of words replaced in a neighbour
    bootstrap: int = 1000
    batch_size: int = 16
    seed: int = 0
    attacks: tuple[str, ...] = ATTACKS


@dataclass
class MIAResult:
    config: MIAConfig
    n_members: int
    n_nonmembers: int
    attacks: dict[str, dict[str, Any]]
    skipped: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    sequences_per_s: float = 0.0
    scores: dict[str, list[float]] = field(default_factory=dict)
    labels: list[int] = field(default_factory=list)


def run_mia(wb: WhiteBox, members: Sequence[str], nonmembers: Sequence[str], cfg: MIAConfig | None = None,
            reference: WhiteBox | None = None, callback: Callback | None = None) -> MIAResult:
    """Score member and non-member documents with every attack of cfg.attacks and evaluate each."""
    cfg = cfg or MIAConfig()
    cb = callback or quiet
    bad = [a for a in cfg.attacks if a not in ATTACKS]
    if bad:
        raise PrivacyError(f"unknown attack(s) {', '.join(bad)}; choose from {', '.join(ATTACKS)}")
    if not 0 < cfg.k <= 1:
        raise PrivacyError(f"-k must be in (0, 1], got {cfg.k}")
    max_tokens = (cfg.max_tokens or wb.block_size + 1)
    mem = sample_docs(chunk_docs([d for d in members if d], wb, max_tokens, cfg.min_tokens), cfg.max_docs, cfg.seed)
    non = sample_docs(chunk_docs([d for d in nonmembers if d], wb, max_tokens, cfg.min_tokens), cfg.max_docs,
                      cfg.seed + 1)
    if len(mem) < 2 or len(non) < 2:
        raise PrivacyError(f"membership inference needs at least 2 member and 2 non-member sequences of "
                           f"{cfg.min_tokens}+ tokens (got {len(mem)} and {len(non)}); give more or longer documents")
    seqs = mem + non
    labels = [1] * len(mem) + [0] * len(non)
    texts = [wb.decode(s) for s in seqs]
    t0 = time.perf_counter()
    with Stage(cb, "score documents", len(seqs)) as st:
        stats = batch_logprobs(wb, seqs, batch_size=cfg.batch_size, stats="min_k++" in cfg.attacks, stage=st)
    L = np.array([float(-s["logp"].double().mean()) for s in stats])
    scores: dict[str, list[float]] = {}
    skipped: dict[str, str] = {}
    for attack in cfg.attacks:
        if attack == "loss":
            scores[attack] = (-L).tolist()
        elif attack == "zlib":
            scores[attack] = [-li / len(zlib.compress(t.encode("utf-8"))) for li, t in zip(L, texts)]
        elif attack == "min_k":
            scores[attack] = [min_k(s["logp"], cfg.k) for s in stats]
        elif attack == "min_k++":
            scores[attack] = [min_k((s["logp"] - s["mu"]) / s["sigma"].clamp(min=1e-6), cfg.k) for s in stats]
        elif attack == "reference":
            if reference is None:
                skipped[attack] = "no reference model given"
                continue
            ref_seqs = [reference.encode(t)[: reference.block_size + 1] for t in texts]
            with Stage(cb, "reference model", len(ref_seqs)) as st:
                ref = batch_logprobs(reference, ref_seqs, batch_size=cfg.batch_size, stage=st)
            L_ref = np.array([float(-r["logp"].double().mean()) if r["logp"].numel() else np.nan for r in ref])
            scores[attack] = (-(L - L_ref)).tolist()
        elif attack == "neighbourhood":
            if cfg.neighbours < 1:
                skipped[attack] = "--neighbours 0"
                continue
            rng = random.Random(cfg.seed)
            pool = sorted({w for t in texts for w in _WORD.findall(t) if len(w) > 1})
            nb_texts = [nb for t in texts for nb in neighbours(t, cfg.neighbours, cfg.perturb, pool, rng)]
            nb_seqs = [wb.encode(t)[:max_tokens] for t in nb_texts]
            nb_seqs = [s if len(s) >= 2 else seqs[i // cfg.neighbours] for i, s in enumerate(nb_seqs)]
            with Stage(cb, "neighbours", len(nb_seqs)) as st:
                nb = batch_logprobs(wb, nb_seqs, batch_size=cfg.batch_size * 2, stage=st)
            nb_L = np.array([float(-r["logp"].double().mean()) for r in nb]).reshape(len(seqs), cfg.neighbours)
            scores[attack] = (-(L - nb_L.mean(1))).tolist()
        elif attack == "blind":
            with Stage(cb, "blind baseline", 1) as st:
                blind = blind_baseline(texts[: len(mem)], texts[len(mem):], seed=cfg.seed, bootstrap=cfg.bootstrap)
                st.advance()
    seconds = time.perf_counter() - t0
    results = {}
    with Stage(cb, "bootstrap", len(scores)) as st:
        for i, (name, sc) in enumerate(scores.items()):
            results[name] = evaluate_scores(sc, labels, cfg.bootstrap, cfg.seed + i)
            st.advance()
    if "blind" in cfg.attacks:
        results["blind"] = blind
    return MIAResult(cfg, len(mem), len(non), results, skipped, seconds, len(seqs) / max(seconds, 1e-9),
                     scores, labels)


def overlap_fraction(nonmembers: Sequence[str], train: Sequence[str], wb: WhiteBox, n: int = 32,
                     threshold: float = 0.5) -> float:
    """Share of non-member documents of which at least `threshold` of the n-token windows occur verbatim
    in the training documents (or that are training documents)."""

    train_set = set(train)
    index = NgramIndex([wb.encode(d) for d in train], n)
    hit = 0
    docs = [d for d in nonmembers if d]
    for d in docs:
        if d in train_set:
            hit += 1
            continue
        h = index.hits(wb.encode(d))
        if len(h) and h.mean() >= threshold:
            hit += 1
    return hit / max(1, len(docs))


# ----------------------------------------------------------------------------- figures


def plot_roc(result: MIAResult, title: str = "") -> Any:
    """Log-scale ROC curves: one panel per attack, plus all attacks together."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result.attacks)
    cols = min(4, len(names) + 1)
    rows = math.ceil((len(names) + 1) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    floor = 1 / (2 * max(result.n_nonmembers, 1))
    grid = np.logspace(math.log10(floor), 0, 50)
    panels = [(n, [n]) for n in names] + [("all attacks", names)]
    for ax, (label, group) in zip(axes.flat, panels):
        for n in group:
            r = result.attacks[n]
            fpr, tpr = np.array(r["roc"]["fpr"]), np.array(r["roc"]["tpr"])
            ax.step(np.maximum(fpr, floor), np.maximum(tpr, floor), where="post",
                    label=f"{n} (AUC {r['auc']:.3f})")
        ax.plot(grid, grid, color="gray", ls="--", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(floor, 1)
        ax.set_ylim(floor, 1.05)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_title(label, fontsize=9)
        ax.legend(fontsize=6, loc="lower right")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
