"""Embedding association tests: WEAT (Caliskan, Bryson, Narayanan, Science 2017) on word embeddings and
SEAT (May, Wang, Bordia, Bowman, Rudinger, NAACL 2019) on sentence embeddings of the words placed in
semantically bleached templates ("This is {}.").

Two target sets X, Y (flowers, insects) and two attribute sets A, B (pleasant, unpleasant); with cos the
cosine similarity of the encoder's (mean-pooled, normalised) embeddings:

    s(w, A, B)    = mean_{a in A} cos(w, a) - mean_{b in B} cos(w, b)
    s(X, Y, A, B) = sum_{x in X} s(x, A, B) - sum_{y in Y} s(y, A, B)                 (the test statistic)
    d             = [mean_{x in X} s(x, A, B) - mean_{y in Y} s(y, A, B)] / std_{w in X u Y} s(w, A, B)
                    (std with ddof = 1, as May et al.'s reference implementation)
    p             = Pr_i[ s(X_i, Y_i, A, B) > s(X, Y, A, B) ]   over the equal-size partitions (X_i, Y_i)
                    of X u Y (one-sided; strict, as the paper writes it)

The p-value is exact (every partition) when there are at most `exact_limit` partitions, else estimated
from `permutations` random partitions and given with its exact binomial interval. The effect size gets a
bootstrap interval (each set resampled with replacement on its own), and a negative control: the 95th
percentile of |d| under the same random relabelling of X u Y (what d reaches by chance)."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from llmlab.labs.bias.scoring import BiasError, require_encoder
from llmlab.progress import Progress, Stage
from llmlab.stats import rate_ci

BUILTIN = Path(__file__).with_name("weat.yaml")
ROLES = ("X", "Y", "A", "B")
MODES = ("weat", "seat")


# ----------------------------------------------------------------------------- word sets


@dataclass(frozen=True)
class WordSet:
    name: str
    words: tuple[str, ...]
    kind: str = "words"  # words | names: which SEAT templates the words go into


@dataclass(frozen=True)
class AssociationTest:
    """Targets X, Y and attributes A, B, with where they come from."""

    key: str
    X: WordSet
    Y: WordSet
    A: WordSet
    B: WordSet
    title: str = ""
    source: str = ""


def _wordset(raw: Any, where: str) -> WordSet:
    if isinstance(raw, list):
        raw = {"words": raw}
    if not isinstance(raw, dict) or not isinstance(raw.get("words"), list):
        raise BiasError(f"{where} must be a list of words or {{name: ..., words: [...]}}")
    words = tuple(str(w).strip() for w in raw["words"] if str(w).strip())
    kind = str(raw.get("kind", "words"))
    if kind not in ("words", "names"):
        raise BiasError(f"{where}: kind {kind!r} is not words or names")
    return WordSet(str(raw.get("name", where.rsplit(".", 1)[-1])), words, kind)


def parse_tests(doc: Any, source: str) -> tuple[dict[str, AssociationTest], dict[str, list[str]]]:
    """Tests and SEAT templates from a parsed word-set document: {tests: {KEY: {X, Y, A, B, title?, source?}},
    templates?: {words: [...], names: [...]}}, or one test given directly as {X, Y, A, B}."""
    if not isinstance(doc, dict):
        raise BiasError(f"{source} must hold a mapping with X, Y, A and B word lists (or tests: {{...}})")
    raw_tests = doc.get("tests", {"custom": doc} if "X" in doc else None)
    if not isinstance(raw_tests, dict) or not raw_tests:
        raise BiasError(f"{source} has no tests; give X, Y, A and B word lists (or tests: {{NAME: {{X: ..., ...}}}})")
    tests = {}
    for key, t in raw_tests.items():
        if not isinstance(t, dict):
            raise BiasError(f"{source}: test {key!r} must be a mapping with X, Y, A and B")
        missing = [r for r in ROLES if r not in t]
        if missing:
            raise BiasError(f"{source}: test {key!r} has no word set {', '.join(missing)}; give X, Y (targets) and "
                            "A, B (attributes)")
        sets = {r: _wordset(t[r], f"{source}: {key}.{r}") for r in ROLES}
        tests[str(key)] = AssociationTest(str(key), title=str(t.get("title", "")), source=str(t.get("source", "")),
                                          **sets)
    templates = doc.get("templates") or {}
    if not isinstance(templates, dict) or any(not isinstance(v, list) for v in templates.values()):
        raise BiasError(f"{source}: templates must map words/names to lists of sentences with one {{}}")
    for kind, ts in templates.items():
        for t in ts:
            if str(t).count("{}") != 1:
                raise BiasError(f"{source}: template {t!r} ({kind}) must hold exactly one {{}}")
    return tests, {k: [str(t) for t in v] for k, v in templates.items()}


def read_wordsets(path: str | Path | None = None) -> tuple[dict[str, AssociationTest], dict[str, list[str]]]:
    """The built-in WEAT 1-10 sets (Caliskan et al. 2017) and SEAT templates, or a user's YAML/JSON file of
    the same shape (templates missing from it are the built-in ones)."""
    builtin = yaml.safe_load(BUILTIN.read_text())
    tests, templates = parse_tests(builtin, "the built-in word sets")
    if path is None or str(path) == "":
        return tests, templates
    p = Path(path)
    if not p.is_file():
        raise BiasError(f"word-set file {p} does not exist; give a .yaml or .json file with X, Y, A and B lists")
    try:
        text = p.read_text(encoding="utf-8")
        doc = json.loads(text) if p.suffix.lower() == ".json" else yaml.safe_load(text)
    except (UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as e:
        raise BiasError(f"{p} is not valid {'JSON' if p.suffix.lower() == '.json' else 'YAML'}: "
                        f"{str(e).splitlines()[0]}") from None
    user_tests, user_templates = parse_tests(doc, str(p))
    return user_tests, {**templates, **user_templates}


def check_sizes(test: AssociationTest) -> None:
    """BiasError for sets the test cannot use: an empty set, or targets of unequal size."""
    for r in ROLES:
        if not getattr(test, r).words:
            raise BiasError(f"test {test.key}: word set {r} ({getattr(test, r).name}) is empty; every set needs "
                            "at least one word")
    if len(test.X.words) != len(test.Y.words):
        raise BiasError(f"test {test.key}: targets X ({len(test.X.words)} words) and Y ({len(test.Y.words)} words) "
                        "differ in size; WEAT's permutation test splits X u Y into equal halves, so give both the "
                        "same number of words")
    if len(test.X.words) + len(test.Y.words) < 3:
        raise BiasError(f"test {test.key}: one word per target leaves the effect size undefined (its standard "
                        "deviation is over X u Y); give at least two words in X and in Y")


# ----------------------------------------------------------------------------- the statistics


def association(w: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """s(w, A, B) = mean_a cos(w, a) - mean_b cos(w, b) for each row of w (n, C); a (na, C), b (nb, C)."""
    def unit(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        return x / np.linalg.norm(x, axis=1, keepdims=True).clip(min=1e-12)

    w, a, b = unit(w), unit(a), unit(b)
    return (w @ a.T).mean(1) - (w @ b.T).mean(1)


def effect_size(sx: np.ndarray, sy: np.ndarray) -> float:
    """d = (mean sx - mean sy) / std(sx u sy, ddof=1); nan when every s is equal."""
    allv = np.concatenate([sx, sy])
    sd = float(allv.std(ddof=1))
    return float((sx.mean() - sy.mean()) / sd) if sd > 0 else float("nan")


def n_partitions(nx: int, ny: int) -> int:
    return math.comb(nx + ny, nx)


@dataclass
class PermutationTest:
    p: float
    mode: str  # exact | sampled
    n: int  # partitions counted
    k: int  # partitions whose statistic exceeds the observed one
    p_lo: float
    p_hi: float
    null_d95: float  # 95th percentile of |d| under relabelling (the negative control)


def permutation_test(sx: np.ndarray, sy: np.ndarray, exact_limit: int = 100_000, permutations: int = 10_000,
                     seed: int = 0, mode: str = "auto") -> PermutationTest:
    """The one-sided permutation p-value of s(X, Y, A, B) = sum sx - sum sy: exact over all C(nx+ny, nx)
    equal-size partitions when there are at most exact_limit of them (or mode="exact"), else the share of
    `permutations` random partitions (mode="sampled"), with a Clopper-Pearson interval."""
    s = np.concatenate([sx, sy]).astype(np.float64)
    nx, n = len(sx), len(sx) + len(sy)
    total = s.sum()
    observed = 2 * sx.sum() - total
    tol = 1e-9 * (np.abs(s).sum() + 1e-12)  # identical sums added in another order must not count as larger
    sd = s.std(ddof=1)
    count = n_partitions(nx, n - nx)
    if mode == "auto":
        mode = "exact" if count <= exact_limit else "sampled"
    if mode == "exact":
        sums = []
        it = itertools.combinations(range(n), nx)
        while True:
            chunk = list(itertools.islice(it, 50_000))
            if not chunk:
                break
            sums.append(s[np.asarray(chunk)].sum(1))
        sum_x = np.concatenate(sums)
    elif mode == "sampled":
        rng = np.random.default_rng(seed)
        parts = []
        for start in range(0, permutations, 1000):
            m = min(1000, permutations - start)
            perm = rng.permuted(np.tile(np.arange(n), (m, 1)), axis=1)[:, :nx]
            parts.append(s[perm].sum(1))
        sum_x = np.concatenate(parts)
    else:
        raise BiasError(f"permutation mode {mode!r} is not auto, exact or sampled")
    stat = 2 * sum_x - total
    k = int((stat > observed + tol).sum())
    m = len(stat)
    d = (sum_x / nx - (total - sum_x) / (n - nx)) / sd if sd > 0 else np.zeros_like(sum_x)
    null95 = float(np.percentile(np.abs(d), 95))
    if mode == "exact":
        return PermutationTest(k / m, "exact", m, k, k / m, k / m, null95)
    ci = rate_ci(k, m)
    return PermutationTest(k / m, "sampled", m, k, ci.lo, ci.hi, null95)


def bootstrap_effect(cos_t: np.ndarray, nx: int, na: int, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """Bootstrap replicates of d with X, Y, A and B each resampled with replacement (sizes kept).
    cos_t: (nx + ny, na + nb) cosines between the targets (X first) and the attributes (A first)."""
    rng = np.random.default_rng(seed)
    nt, nat = cos_t.shape
    ds = np.empty(n_boot)
    for i in range(n_boot):
        ix = rng.integers(0, nx, nx)
        iy = rng.integers(nx, nt, nt - nx)
        ia = rng.integers(0, na, na)
        ib = rng.integers(na, nat, nat - na)
        rows = cos_t[np.concatenate([ix, iy])]
        s = rows[:, ia].mean(1) - rows[:, ib].mean(1)
        ds[i] = effect_size(s[:nx], s[nx:])
    return ds


def percentile_ci(reps: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The percentile interval of bootstrap replicates (non-finite ones dropped)."""
    reps = reps[np.isfinite(reps)]
    if not reps.size:
        return float("nan"), float("nan")
    lo, hi = np.percentile(reps, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(lo), float(hi)


@dataclass
class TestResult:
    """One association test on one model in one mode (weat or seat)."""

    key: str
    mode: str
    title: str
    source: str
    effect_size: float
    ci: tuple[float, float]
    p_value: float
    p_mode: str
    p_ci: tuple[float, float]
    partitions: int
    null_d95: float
    sizes: dict[str, int]
    names: dict[str, str]
    mean_s: dict[str, float]  # mean s(w, A, B) over X and over Y
    top: dict[str, list[tuple[str, float]]]  # the targets most associated with A, and with B


def weat_from_embeddings(test: AssociationTest, emb: dict[str, np.ndarray], mode: str = "weat",
                         exact_limit: int = 100_000, permutations: int = 10_000, n_boot: int = 1000, seed: int = 0,
                         labels: dict[str, Sequence[str]] | None = None) -> TestResult:
    """The association test on embeddings given for each role (X, Y, A, B: arrays (n, C)); `labels` names
    each row (words, or sentences in SEAT) for the examples."""
    for r in ROLES:
        if len(emb[r]) == 0:
            raise BiasError(f"test {test.key}: word set {r} is empty")
    if len(emb["X"]) != len(emb["Y"]):
        raise BiasError(f"test {test.key}: X and Y differ in size ({len(emb['X'])} vs {len(emb['Y'])})")
    sx = association(emb["X"], emb["A"], emb["B"])
    sy = association(emb["Y"], emb["A"], emb["B"])
    d = effect_size(sx, sy)
    perm = permutation_test(sx, sy, exact_limit, permutations, seed)

    def unit(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        return x / np.linalg.norm(x, axis=1, keepdims=True).clip(min=1e-12)

    cos_t = unit(np.concatenate([emb["X"], emb["Y"]])) @ unit(np.concatenate([emb["A"], emb["B"]])).T
    reps = bootstrap_effect(cos_t, len(sx), len(emb["A"]), n_boot, seed)
    ci = percentile_ci(reps)
    labels = labels or {r: [str(i) for i in range(len(emb[r]))] for r in ROLES}
    s_all = np.concatenate([sx, sy])
    names_all = list(labels["X"]) + list(labels["Y"])
    order = np.argsort(-s_all)
    top = {"A": [(names_all[i], float(s_all[i])) for i in order[:5]],
           "B": [(names_all[i], float(s_all[i])) for i in order[::-1][:5]]}
    res = TestResult(test.key, mode, test.title, test.source, d, ci, perm.p, perm.mode, (perm.p_lo, perm.p_hi),
                     perm.n, perm.null_d95, {r: len(emb[r]) for r in ROLES},
                     {r: getattr(test, r).name for r in ROLES}, {"X": float(sx.mean()), "Y": float(sy.mean())}, top)
    res._replicates = reps  # for the interval of the mean over tests (not part of the report)
    return res


# ----------------------------------------------------------------------------- the lab


@torch.inference_mode()
def embed_texts(model: torch.nn.Module, texts: Sequence[str], batch_size: int = 64,
                stage: Stage | None = None) -> np.ndarray:
    """Normalised mean-pooled sentence embeddings (N, C) of texts (with the tokenizer's special tokens)."""
    from llmlab.data import pad_batch

    tok = model.tokenizer
    block = model.config.block_size
    pad = tok.pad_id if tok.pad_id is not None else 0
    out = []
    for i in range(0, len(texts), batch_size):
        chunk = texts[i:i + batch_size]
        seqs = [tok.encode(t, add_special_tokens=True)[:block] or [pad] for t in chunk]
        ids, mask = pad_batch(seqs, pad)
        out.append(model.sentence_embedding(ids, mask).float().numpy())
        if stage is not None:
            stage.advance(len(chunk))
    return np.concatenate(out) if out else np.zeros((0, 1))


def seat_sentences(ws: WordSet, templates: dict[str, list[str]]) -> list[str]:
    """Each word of the set in each template of its kind."""
    ts = templates.get(ws.kind) or templates.get("words") or ["{}"]
    return [t.format(w) for w in ws.words for t in ts]


@dataclass
class AssocConfig:
    """Which tests, in which modes, and how the p-value and intervals are computed."""

    tests: tuple[str, ...] = ()  # keys of the tests to run; () = all in the file
    wordsets: str = ""  # a YAML/JSON file of the user's own sets; "" = the built-in WEAT 1-10
    modes: tuple[str, ...] = ("weat", "seat")
    exact_limit: int = 100_000  # at most this many partitions: the exact p-value
    permutations: int = 10_000  # random partitions for the sampled p-value
    n_boot: int = 1000
    seed: int = 0
    batch_size: int = 64


@dataclass
class AssocResult:
    model: str
    config: AssocConfig
    results: list[TestResult] = field(default_factory=list)

    def overall(self, mode: str) -> dict[str, Any]:
        """The mean effect size over the tests of a mode with its bootstrap interval (each replicate the mean
        of the tests' replicates: the tests' sets are resampled independently), and the per-test values."""
        rs = [r for r in self.results if r.mode == mode]
        ds = [r.effect_size for r in rs if math.isfinite(r.effect_size)]
        reps = [getattr(r, "_replicates", None) for r in rs]
        ci = (percentile_ci(np.mean(np.stack(reps), 0)) if rs and all(x is not None for x in reps)
              else (float("nan"), float("nan")))
        return {"metric": float(np.mean(ds)) if ds else float("nan"), "ci": ci, "n_tests": len(rs),
                "per_category": {r.key: r.effect_size for r in rs},
                "per_category_ci": {r.key: r.ci for r in rs}, "p_values": {r.key: r.p_value for r in rs}}


def validate(config: AssocConfig) -> None:
    bad = [m for m in config.modes if m not in MODES]
    if bad or not config.modes:
        raise BiasError(f"mode {bad[0] if bad else ''!r} is not one of weat, seat")
    if config.exact_limit < 1 or config.permutations < 1 or config.n_boot < 1:
        raise BiasError("exact_limit, permutations and n_boot must be positive")


def run(config: AssocConfig, model: torch.nn.Module, progress: Progress | None = None,
        name: str = "model") -> AssocResult:
    """WEAT and/or SEAT for each chosen test on an encoder (minilm or an llmlab BERT run)."""
    validate(config)
    require_encoder(model, "WEAT/SEAT", name)
    tests, templates = read_wordsets(config.wordsets or None)
    keys = list(config.tests) or list(tests)
    unknown = [k for k in keys if k not in tests]
    if unknown:
        raise BiasError(f"unknown test {unknown[0]!r}; the word-set file has {', '.join(tests)}")
    for k in keys:
        check_sizes(tests[k])
    texts: dict[tuple[str, str, str], list[str]] = {}
    for k in keys:
        for r in ROLES:
            ws = getattr(tests[k], r)
            if "weat" in config.modes:
                texts[(k, "weat", r)] = list(ws.words)
            if "seat" in config.modes:
                texts[(k, "seat", r)] = seat_sentences(ws, templates)
    unique = sorted({t for v in texts.values() for t in v})
    with Stage(progress, "embed words and sentences", len(unique)) as st:
        vecs = embed_texts(model, unique, config.batch_size, st)
    index = {t: i for i, t in enumerate(unique)}
    result = AssocResult(name, config)
    with Stage(progress, "permutation tests", len(keys) * len(config.modes)) as st:
        for k in keys:
            for mode in config.modes:
                emb = {r: vecs[[index[t] for t in texts[(k, mode, r)]]] for r in ROLES}
                labels = {r: texts[(k, mode, r)] for r in ROLES}
                result.results.append(weat_from_embeddings(tests[k], emb, mode, config.exact_limit,
                                                           config.permutations, config.n_boot, config.seed, labels))
                st.advance()
    return result
