"""Privacy lab building blocks that need no training: ROC/AUC/TPR@FPR against scikit-learn, canary formats,
the n-gram index against brute force, deduplication, and exact canary ranks against brute force."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from llmlab.config import ModelConfig
from llmlab.models import build_model
from llmlab.security.privacy.canary import (
    CanaryFormat,
    beam_extract,
    draw_canaries,
    exposure_from_rank,
    insert_canaries,
    measure_exposure,
    prefix_bits,
    score_space,
)
from llmlab.security.privacy.common import PrivacyError
from llmlab.security.privacy.dedup import dedup_docs, minhash_signatures, near_duplicates
from llmlab.security.privacy.extract import NgramIndex, min_window_nll
from llmlab.security.privacy.mia import bootstrap_auc, min_k, roc_auc, roc_curve, tpr_at_fpr
from llmlab.security.targets import WhiteBox
from llmlab.tokenizers import CharTokenizer

# ----------------------------------------------------------------------------- ROC metrics vs scikit-learn


def _sk_tpr_at(scores: np.ndarray, labels: np.ndarray, bound: float) -> float:
    fpr, tpr, _ = sk_roc_curve(labels, scores, drop_intermediate=False)
    return float(tpr[fpr <= bound + 1e-12].max())


@given(st.lists(st.tuples(st.integers(0, 12), st.booleans()), min_size=4, max_size=300))
def test_auc_and_tpr_match_sklearn(pairs: list[tuple[int, bool]]) -> None:
    scores = np.array([p[0] / 3.0 for p in pairs])  # few distinct values: many ties
    labels = np.array([int(p[1]) for p in pairs])
    if labels.min() == labels.max():
        return
    assert roc_auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    fpr, tpr, thr = roc_curve(scores, labels)
    sk_fpr, sk_tpr, _ = sk_roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    for bound in (0.001, 0.01, 0.1, 0.5):
        assert tpr_at_fpr(fpr, tpr, bound) == pytest.approx(_sk_tpr_at(scores, labels, bound))


def test_tpr_at_low_fpr_continuous_scores() -> None:
    rng = np.random.default_rng(0)
    labels = np.r_[np.ones(1000), np.zeros(1000)].astype(int)
    scores = rng.normal(size=2000) + labels * 1.5
    fpr, tpr, _ = roc_curve(scores, labels)
    for bound in (0.01, 0.001):
        assert tpr_at_fpr(fpr, tpr, bound) == pytest.approx(_sk_tpr_at(scores, labels, bound))
    assert 0 < tpr_at_fpr(fpr, tpr, 0.001) < tpr_at_fpr(fpr, tpr, 0.01) < 1
    ci = bootstrap_auc(scores, labels, n=300, seed=1)
    auc = roc_auc_score(labels, scores)
    assert ci["low"] < auc < ci["high"] and ci["high"] - ci["low"] < 0.1


def test_perfect_and_inverted_attacks() -> None:
    labels = [1, 1, 1, 0, 0, 0]
    assert roc_auc([3, 4, 5, 0, 1, 2], labels) == 1.0
    assert roc_auc([0, 1, 2, 3, 4, 5], labels) == 0.0
    fpr, tpr, _ = roc_curve([3, 4, 5, 0, 1, 2], labels)
    assert tpr_at_fpr(fpr, tpr, 0.0) == 1.0
    with pytest.raises(PrivacyError):
        roc_auc([1, 2], [1, 1])


def test_min_k_and_window() -> None:
    v = torch.tensor([-5.0, -1.0, -0.5, -3.0, -0.1])
    assert min_k(v, 0.4) == pytest.approx((-5 - 3) / 2)  # ceil(0.4 * 5) = 2 lowest
    assert min_k(v, 0.01) == -5.0
    assert min_window_nll(v, 2) == pytest.approx(min(-(v[i] + v[i + 1]) / 2 for i in range(4)).item())
    assert min_window_nll(v, 10) == pytest.approx(float(-v.mean()))


# ----------------------------------------------------------------------------- canary formats


def test_format_parsing_and_indexing() -> None:
    f = CanaryFormat.parse("key {L}{d}-{l} end")
    assert f.prefix == "key " and f.space_size == 26 * 10 * 26
    assert f.template[2] == "-" and f.slots == (0, 1, 3)
    for i in (0, 1, 259, 6759, 1234):
        s = f.secret_at(i)
        assert f.index_of(s) == i and len(s) == 3
    assert f.fill("B7q") == "key B7-q end"
    assert f.secret_at(0) == "A0a" and f.secret_at(f.space_size - 1) == "Z9z"
    assert exposure_from_rank(1, f.space_size) == pytest.approx(math.log2(6760))
    assert exposure_from_rank(6760, f.space_size) == 0


@pytest.mark.parametrize("fmt", ["my PIN is 1234", "no {x} slot", ""])
def test_bad_formats(fmt: str) -> None:
    with pytest.raises(PrivacyError, match="slot"):
        CanaryFormat.parse(fmt)


def test_insert_canaries_counts() -> None:
    f = CanaryFormat.parse("code {d}{d}{d}{d}")
    canaries = draw_canaries(f, [1, 5, 9], controls=2, seed=3)
    assert [c.repeats for c in canaries] == [1, 5, 9, 0, 0]
    assert len({c.secret for c in canaries}) == 5
    docs = ["alpha\nbeta\ngamma\n" * 5 for _ in range(4)]
    out = insert_canaries(docs, canaries, seed=1)
    text = "".join(out)
    for c in canaries:
        assert text.count(c.text + "\n") == c.repeats
    assert len(out) == len(docs)


# ----------------------------------------------------------------------------- exact rank vs brute force


def _random_wb(text: str, seed: int = 0) -> WhiteBox:
    tok = CharTokenizer.train(text, unk="replace")
    torch.manual_seed(seed)
    m = build_model(ModelConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=32)).double()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    m.tokenizer = tok
    return WhiteBox(m, tok)


@torch.no_grad()
def _brute_px(wb: WhiteBox, text: str) -> float:
    ids = torch.tensor([wb.encode("\n" + text)])
    logp = F.log_softmax(wb.model(ids[:, :-1])[0], -1)  # (T, V), float64
    return -float(logp.gather(1, ids[0, 1:, None]).sum()) / math.log(2)


def test_exact_rank_equals_brute_force() -> None:
    wb = _random_wb("pin: 0123456789-xyz\n")
    fmt = CanaryFormat.parse("pin: {d}{d}-{d}x")
    brute = np.array([_brute_px(wb, fmt.fill(fmt.secret_at(i))) for i in range(fmt.space_size)])
    tree = score_space(wb, fmt, max_rows=7).numpy() + prefix_bits(wb, fmt)  # tiny chunks exercise the batching
    np.testing.assert_allclose(tree, brute, rtol=0, atol=1e-9)
    canaries = draw_canaries(fmt, [1, 2, 3], controls=1, seed=5)
    res = measure_exposure(wb, fmt, canaries, beam=8)
    for e in res.canaries:
        rank = int((brute <= brute[fmt.index_of(e["secret"])]).sum())
        assert e["rank"] == rank
        assert e["exposure"] == pytest.approx(math.log2(1000) - math.log2(rank))
    # beam search with a beam as large as the space returns every candidate in exact order
    full = beam_extract(wb, fmt, 1000)
    order = np.argsort(brute, kind="stable")
    assert [fmt.index_of(s) for s, _ in full[:20]] == order[:20].tolist()
    assert res.greedy_secret == beam_extract(wb, fmt, 1)[0][0]


def test_estimate_agrees_with_exact_rank() -> None:
    wb = _random_wb("id 0123456789\n", seed=2)
    fmt = CanaryFormat.parse("id {d}{d}{d}{d}")
    canaries = draw_canaries(fmt, [1, 1, 1], controls=0, seed=0)
    exact = measure_exposure(wb, fmt, canaries)
    est = measure_exposure(wb, fmt, canaries, estimate=True, samples=3000)
    for a, b in zip(exact.canaries, est.canaries):
        assert b["exposure_interpolated"] == pytest.approx(a["exposure"], abs=0.6)
        assert 0 <= b["exposure"] <= est.max_exposure


def test_space_too_large_needs_estimate() -> None:
    wb = _random_wb("n 0123456789\n")
    fmt = CanaryFormat.parse("n {d}{d}{d}{d}{d}{d}{d}")
    with pytest.raises(PrivacyError, match="--estimate"):
        measure_exposure(wb, fmt, draw_canaries(fmt, [1], 0, 0))


# ----------------------------------------------------------------------------- n-gram index


def test_ngram_index_matches_brute_force() -> None:
    rng = random.Random(0)
    seqs = [[rng.randrange(6) for _ in range(rng.randrange(0, 200))] for _ in range(12)]
    n = 4
    grams = {tuple(s[i:i + n]) for s in seqs for i in range(len(s) - n + 1)}
    index = NgramIndex(seqs, n)
    assert len(index) == sum(max(0, len(s) - n + 1) for s in seqs)
    for _ in range(50):
        q = [rng.randrange(6) for _ in range(30)]
        expect = [tuple(q[i:i + n]) in grams for i in range(len(q) - n + 1)]
        assert index.hits(q).tolist() == expect
    # a copied span of 40 tokens is found with its full length
    src = seqs[3] if len(seqs[3]) > 60 else [1, 2, 3, 4, 5] * 20
    index = NgramIndex([src], 8)
    q = [9, 9, 9] + list(src[10:50]) + [9, 9]
    length, start = index.longest_match(q)
    assert length >= 40 and start <= 3


# ----------------------------------------------------------------------------- deduplication


def test_dedup_exact_and_near() -> None:
    rng = random.Random(1)
    words = [f"w{i}" for i in range(500)]

    def doc() -> str:
        return " ".join(rng.choice(words) for _ in range(120))

    base = [doc() for _ in range(8)]
    near = base[2].split()
    near[5] = "changed"
    docs = base + [base[0], " ".join(near), "secret line repeated\n" + doc(), "secret line repeated\n" + doc()]
    out, info = dedup_docs(docs, mode="both")
    assert info["exact_docs_removed"] == 1 and out[8] == ""
    assert info["repeated_lines_removed"] == 1 and out[10].startswith("secret") and "secret" not in out[11]
    assert info["near_docs_removed"] == 1 and out[9] == "" and out[2] == base[2]
    assert sum(1 for d in out if d) == 10
    # MinHash estimates Jaccard similarity
    a = " ".join(words[:200])
    b = " ".join(words[50:250])
    sig = minhash_signatures([a, b], n=1, num_perm=512)
    assert float((sig[0] == sig[1]).mean()) == pytest.approx(150 / 250, abs=0.07)
    assert near_duplicates([a, b, a], threshold=0.9, n=1) == [(0, 2, 1.0)]
    with pytest.raises(PrivacyError):
        dedup_docs(docs, mode="fuzzy")
