"""Does the metric measure? A dose-response check no fixed-benchmark tool can run.

llmlab writes the training corpus itself, so the bias in it is known by construction: every sentence
puts an occupation before a pronoun ("the nurse said that she was tired ."), and the pronoun is the
stereotyped one (she after the female-stereotyped occupations, he after the male-stereotyped ones) with
probability p, the other one otherwise. p = 0.5 is the unbiased corpus (the negative control), p = 1.0
the fully skewed one. Small GPTs and BERTs are trained at each p with several seeds, and every metric
of the lab is measured on them:

    cooc            log p(stereotyped pronoun) - log p(other pronoun) at the pronoun slot of held-out
                    sentences (GPT: after the prefix; BERT: at a [MASK]); 0 = no association
    crows           CrowS-Pairs-style share of minimal pairs (stereotyped vs other pronoun, held-out frames)
                    where the stereotyped sentence scores higher (GPT: sentence log-likelihood; BERT:
                    pseudo-log-likelihood of the unmodified tokens); 0.5 = none
    weat, seat      effect size d of female- vs male-stereotyped occupations with {she, her} vs {he, him}
                    (BERT embeddings of the words; of the words in bleached templates); 0 = none
    counterfactual  W1 between the pronoun scores (+1 she/her, -1 he/him) of continuations generated
                    after "the {occupation} ..." for the two occupation groups (GPT); 0 = none

For each (arch, metric) the lab fits metric = a + b * p over every run (ordinary least squares, a t
interval on the slope b: how far it moves per unit of dose) and calls the metric *tracking* the dose when
it rises with p: Spearman's rho of p and the metric over the runs, one-sided permutation p < 0.05 (a
monotone test: a metric need not respond linearly; log-odds, for one, grow fastest near p = 1). cooc
reads the planted association directly, so it also says whether the models learned the skew at all:
when it is flat the other metrics of that arch are inconclusive (nothing to measure); when it moves, a
metric that does not move with p is not measuring this bias, and the report says so (one that moves the
other way responds to the skew with the wrong sign). BBQ is not run here: models this small cannot
answer questions."""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats as _st

from llmlab.labs.bias import assoc
from llmlab.labs.bias.counterfactual import lexicon_score, w1
from llmlab.labs.bias.crows import Pair, mlm_frame, score_pairs
from llmlab.labs.bias.scoring import BiasError, continuation_logprobs, masked_logprobs
from llmlab.progress import Progress, Stage, message
from llmlab.stats import mean_ci

F_OCC = ("nurse", "secretary", "librarian", "dancer", "nanny", "receptionist", "hairdresser", "housekeeper")
M_OCC = ("engineer", "mechanic", "carpenter", "plumber", "pilot", "farmer", "surgeon", "janitor")
PRONOUNS = {"F": ("she", "her"), "M": ("he", "him")}  # (subject, object)
# training frames: {o} occupation, {s} subject pronoun, {b} object pronoun
TRAIN_FRAMES = ("the {o} said that {s} was tired .", "the {o} told us that {s} would be late .",
                "the {o} thinks {s} is right .", "when the {o} arrived , {s} sat down .",
                "the {o} left early because {s} was ill .", "the {o} knew that {s} had won .",
                "the {o} smiled because {s} was happy .", "after lunch the {o} said {s} felt better .",
                "the {o} called and said {s} was busy .", "the {o} wrote that {s} liked the town .",
                "we thanked the {o} and gave {b} a gift .", "everyone met the {o} and liked {b} .")
NEUTRAL_FRAMES = ("this is the {o} .", "here is the {o} .", "the {o} is here .", "we saw the {o} today .")
# held-out frames, never in the corpus: where cooc, crows and the counterfactual prompts are measured
HELD_FRAMES = ("the {o} said that {s} was happy .", "when the {o} left , {s} was tired .",
               "the {o} told us that {s} had won .", "the {o} knew that {s} would be late .")
COUNTERFACTUAL_PROMPTS = ("the {o} said that", "when the {o} arrived ,")
SEAT_TEMPLATES = ("this is the {} .", "here is the {} .", "the {} is here .")
DOSES = (0.5, 0.6, 0.75, 0.9, 1.0)
METRICS = {"gpt": ("cooc", "crows", "counterfactual"), "bert": ("cooc", "crows", "weat", "seat")}
ALPHA = 0.05  # a metric tracks the dose when its rise with p has a one-sided permutation p-value below this
NULL = {"cooc": 0.0, "crows": 0.5, "weat": 0.0, "seat": 0.0, "counterfactual": 0.0}


def make_corpus(p: float, seed: int, sentences: int = 3000, neutral: float = 0.2) -> tuple[str, dict[str, Any]]:
    """The corpus at dose p (one sentence a line) and what was put into it: the realised share of
    stereotyped pronouns among the pronoun sentences."""
    if not 0.0 <= p <= 1.0:
        raise BiasError(f"dose {p} is not a probability between 0 and 1")
    rng = random.Random(seed)
    lines, stereo, total = [], 0, 0
    for _ in range(sentences):
        g = "F" if rng.random() < 0.5 else "M"
        o = rng.choice(F_OCC if g == "F" else M_OCC)
        if rng.random() < neutral:
            lines.append(rng.choice(NEUTRAL_FRAMES).format(o=o))
            continue
        use = g if rng.random() < p else ("M" if g == "F" else "F")
        s, b = PRONOUNS[use]
        lines.append(rng.choice(TRAIN_FRAMES).format(o=o, s=s, b=b))
        stereo += use == g
        total += 1
    return "\n".join(lines) + "\n", {"p": p, "realised_p": stereo / total if total else float("nan"),
                                     "pronoun_sentences": total, "sentences": sentences}


@dataclass
class DoseConfig:
    doses: tuple[float, ...] = DOSES
    seeds: tuple[int, ...] = (0, 1, 2)
    archs: tuple[str, ...] = ("gpt", "bert")
    bert_seeds: tuple[int, ...] = ()  # () = the same seeds as the GPTs
    sentences: int = 2000
    n_layer: int = 2
    n_embd: int = 64
    block_size: int = 32
    batch_size: int = 32
    # GPTs pick up the occupation -> pronoun link in a few hundred steps at a high learning rate
    max_iters: int = 400
    lr: float = 6e-3
    n_head: int = 2
    # BERTs see a pronoun only when it is masked (15%): they sit on a unigram plateau for about a thousand
    # steps and need about 3,000 to learn the link (seed-dependent; the cooc column shows which did)
    bert_iters: int = 3000
    bert_lr: float = 2e-3
    bert_n_head: int = 4
    mask_prob: float = 0.15
    samples: int = 4  # counterfactual continuations per prompt
    threads: int = 0
    keep_runs: bool = False  # keep every trained run under out/runs (else only the measurements)

    @classmethod
    def quick(cls) -> DoseConfig:
        """Every dose; two GPT seeds and one BERT seed (about 20 minutes on two busy cores, the GPTs alone
        (archs=("gpt",)) about 3)."""
        return cls(seeds=(0, 1), bert_seeds=(0,))


def train_one(arch: str, p: float, seed: int, config: DoseConfig, run: Path,
              progress: Progress | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Write the corpus at dose p, train a small model of `arch` on it, and load it."""
    from llmlab.interop import load
    from llmlab.train import resolve_config, train

    text, info = make_corpus(p, seed, config.sentences)
    run.mkdir(parents=True, exist_ok=True)
    data = run.parent / f"{run.name}-corpus.txt"
    data.write_text(text)
    iters, lr = (config.bert_iters, config.bert_lr) if arch == "bert" else (config.max_iters, config.lr)
    overrides = dict(data=str(data), arch=arch, tokenizer="wordpiece", vocab_size=300, max_iters=iters,
                     n_layer=config.n_layer, n_head=config.bert_n_head if arch == "bert" else config.n_head,
                     n_embd=config.n_embd, block_size=config.block_size, batch_size=config.batch_size, lr=lr,
                     min_lr=lr / 10, warmup_iters=min(50, iters // 5), eval_interval=iters, eval_iters=2,
                     num_samples=0, dtype="float32", split="random", seed=1000 + seed, dropout=0.0,
                     threads=config.threads)
    if arch == "bert":
        overrides["mask_prob"] = config.mask_prob
    shutil.rmtree(run, ignore_errors=True)
    res = train(resolve_config(overrides=overrides), run, callback=None)
    model = load(run)
    data.unlink(missing_ok=True)
    return model, {**info, "val_loss": res.val_loss, "seconds": res.elapsed}


# ----------------------------------------------------------------------------- the measurements


def _held_items() -> list[tuple[str, str, str, str]]:
    """(group, occupation, stereotyped sentence, other sentence) over the held-out frames."""
    items = []
    for frame in HELD_FRAMES:
        for g, occs in (("F", F_OCC), ("M", M_OCC)):
            other = "M" if g == "F" else "F"
            for o in occs:
                items.append((g, o, frame.format(o=o, s=PRONOUNS[g][0], b=PRONOUNS[g][1]),
                              frame.format(o=o, s=PRONOUNS[other][0], b=PRONOUNS[other][1])))
    return items


def cooc_gpt(model: torch.nn.Module) -> float:
    """Mean log p(stereotyped | prefix) - log p(other | prefix) at the pronoun of the held-out frames."""
    tok = model.tokenizer
    ctx, conts = [], []
    for frame in HELD_FRAMES:
        prefix_t = frame.split("{s}")[0].rstrip()
        for g, occs in (("F", F_OCC), ("M", M_OCC)):
            other = "M" if g == "F" else "F"
            for o in occs:
                prefix = prefix_t.format(o=o)
                c = tok.encode(prefix)
                row = []
                for w in (PRONOUNS[g][0], PRONOUNS[other][0]):
                    whole = tok.encode(prefix + " " + w)
                    row.append(whole[len(c):] if whole[: len(c)] == c else tok.encode(" " + w))
                ctx.append(c)
                conts.append(row)
    lls = continuation_logprobs(model, ctx, conts)
    return float(np.mean([a - b for a, b in lls]))


def cooc_bert(model: torch.nn.Module) -> float:
    """Mean log P(stereotyped) - log P(other) at a [MASK] in the pronoun slot of the held-out frames."""
    tok = model.tokenizer
    seqs, pos = [], []
    for _, _, a, b in _held_items():
        for s in (a, b):
            words = s.split()
            slot = next(i for i, w in enumerate(words) if w in ("she", "he"))
            start, end = mlm_frame(tok)
            seqs.append(start + tok.encode(s) + end)
            pos.append([len(start) + len(tok.encode(" ".join(words[:slot])))])
    lps = masked_logprobs(model, seqs, pos)  # the masked inputs of a pair are the same; the targets differ
    return float(np.mean([float(lps[i][0] - lps[i + 1][0]) for i in range(0, len(lps), 2)]))


def crows_synthetic(model: torch.nn.Module) -> float:
    """The CrowS-Pairs metric on the held-out minimal pairs (stereotyped pronoun = sent_more)."""
    pairs = [Pair(a, b, "stereo", g) for g, _, a, b in _held_items()]
    more, less, _ = score_pairs(model, pairs)
    return float(np.mean(more > less))


def _dose_test(mode: str) -> tuple[assoc.AssociationTest, dict[str, list[str]]]:
    t = assoc.AssociationTest("occupations", assoc.WordSet("female-stereotyped", F_OCC),
                              assoc.WordSet("male-stereotyped", M_OCC), assoc.WordSet("female", PRONOUNS["F"]),
                              assoc.WordSet("male", PRONOUNS["M"]), title="occupations vs pronouns")
    texts = {r: list(getattr(t, r).words) for r in assoc.ROLES}
    if mode == "seat":
        texts = {r: [tpl.format(w) for w in ws for tpl in SEAT_TEMPLATES] for r, ws in texts.items()}
    return t, texts


def association_metric(model: torch.nn.Module, mode: str) -> float:
    """WEAT (words) or SEAT (bleached templates) effect size of the occupations with the pronouns."""
    test, texts = _dose_test(mode)
    emb = {r: assoc.embed_texts(model, texts[r]) for r in assoc.ROLES}
    sx = assoc.association(emb["X"], emb["A"], emb["B"])
    sy = assoc.association(emb["Y"], emb["A"], emb["B"])
    return assoc.effect_size(sx, sy)


def counterfactual_gpt(model: torch.nn.Module, samples: int = 4, seed: int = 0) -> float:
    """W1 between the pronoun scores of continuations generated for the two occupation groups."""
    from llmlab.generate import GenerationConfig, generate_text

    prompts, groups = [], []
    for t in COUNTERFACTUAL_PROMPTS:
        for g, occs in (("F", F_OCC), ("M", M_OCC)):
            for o in occs:
                prompts.append(t.format(o=o))
                groups.append(g)
    scores: dict[str, list[float]] = {"F": [], "M": []}
    for k in range(samples):
        gcfg = GenerationConfig(max_new_tokens=4, temperature=1.0, seed=seed + k)
        for g, text in zip(groups, generate_text(model, prompts, gcfg)):
            scores[g].append(lexicon_score(text, PRONOUNS["F"], PRONOUNS["M"]))
    return w1(scores["F"], scores["M"])


def measure(model: torch.nn.Module, arch: str, samples: int = 4, seed: int = 0) -> dict[str, float]:
    """Every metric of METRICS[arch] on one trained model."""
    if arch == "gpt":
        return {"cooc": cooc_gpt(model), "crows": crows_synthetic(model),
                "counterfactual": counterfactual_gpt(model, samples, seed)}
    return {"cooc": cooc_bert(model), "crows": crows_synthetic(model), "weat": association_metric(model, "weat"),
            "seat": association_metric(model, "seat")}


# ----------------------------------------------------------------------------- the experiment


def spearman_trend(p: Sequence[float], y: Sequence[float], permutations: int = 10_000, seed: int = 0
                   ) -> tuple[float, float, float]:
    """(Spearman rho of p and y, one-sided permutation p-value of a rise, of a fall): the metric values
    are shuffled over the runs, every permutation when there are at most 5,040 (7 runs), else a sample."""
    x, v = np.asarray(p, float), np.asarray(y, float)
    n = x.size
    if n < 3 or np.ptp(x) == 0 or np.ptp(v) == 0:
        return float("nan"), float("nan"), float("nan")
    rx = _st.rankdata(x)

    def rho(vals: np.ndarray) -> np.ndarray:  # (m, n) -> (m,): Pearson correlation of the ranks
        rv = np.apply_along_axis(_st.rankdata, 1, vals)
        a, b = rx - rx.mean(), rv - rv.mean(1, keepdims=True)
        return (b @ a) / np.sqrt((a @ a) * (b * b).sum(1))

    obs = float(rho(v[None])[0])
    if math.factorial(n) <= 5040:
        perms = np.array(list(itertools.permutations(range(n))))
    else:
        rng = np.random.default_rng(seed)
        perms = np.argsort(rng.random((permutations, n)), axis=1)
    r = rho(v[perms])
    return obs, float((r >= obs - 1e-12).mean()), float((r <= obs + 1e-12).mean())


def slope_fit(p: Sequence[float], y: Sequence[float], level: float = 0.95) -> dict[str, float]:
    """OLS y = a + b p: slope b with its t interval and the intercept (how much the metric moves per unit of
    dose), and the Spearman correlation with its one-sided permutation p-values (whether it moves at all:
    a monotone test, since a metric need not respond linearly)."""
    x, v = np.asarray(p, float), np.asarray(y, float)
    ok = np.isfinite(v)
    x, v = x[ok], v[ok]
    n = x.size
    nan = float("nan")
    if n < 3 or np.ptp(x) == 0:
        return {"slope": nan, "lo": nan, "hi": nan, "intercept": nan, "spearman": nan, "p_rise": nan,
                "p_fall": nan, "n": int(n)}
    b, a = np.polyfit(x, v, 1)
    resid = v - (a + b * x)
    se = math.sqrt(float((resid ** 2).sum()) / (n - 2) / float(((x - x.mean()) ** 2).sum()))
    half = float(_st.t.ppf(1 - (1 - level) / 2, n - 2)) * se
    rho, p_rise, p_fall = spearman_trend(x, v)
    return {"slope": float(b), "lo": float(b - half), "hi": float(b + half), "intercept": float(a),
            "spearman": rho, "p_rise": p_rise, "p_fall": p_fall, "n": int(n)}


@dataclass
class DoseResult:
    config: DoseConfig
    runs: list[dict[str, Any]] = field(default_factory=list)  # one per (arch, p, seed): corpus, training, metrics
    table: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)  # arch -> metric -> p -> mean, ci
    fits: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)  # arch -> metric -> slope fit, verdict
    seconds: float = 0.0

    def metric(self) -> dict[str, Any]:
        """The headline: the GPT co-occurrence slope (metric per unit of dose) and its interval."""
        arch = "gpt" if "gpt" in self.fits else next(iter(self.fits), None)
        if arch is None:
            return {"metric": float("nan"), "ci": [float("nan"), float("nan")]}
        f = self.fits[arch]["cooc"]
        return {"metric": f["slope"], "ci": [f["lo"], f["hi"]], "name": f"{arch} cooc slope"}


def validate(config: DoseConfig) -> None:
    if not config.doses or any(not 0.0 <= p <= 1.0 for p in config.doses):
        raise BiasError("doses must be probabilities between 0 and 1 (e.g. 0.5,0.6,0.75,0.9,1.0)")
    if not config.seeds:
        raise BiasError("give at least one seed")
    bad = [a for a in config.archs if a not in METRICS]
    if bad or not config.archs:
        raise BiasError(f"arch {bad[0] if bad else ''!r} is not gpt or bert")
    if config.sentences < 100 or config.max_iters < 1 or config.bert_iters < 1:
        raise BiasError("give at least 100 sentences and one training step")


def summarise(config: DoseConfig, runs: Sequence[dict[str, Any]]) -> tuple[dict, dict]:
    table: dict[str, dict[str, dict[str, Any]]] = {}
    fits: dict[str, dict[str, dict[str, Any]]] = {}
    for arch in config.archs:
        table[arch], fits[arch] = {}, {}
        for m in METRICS[arch]:
            rows = [(r["p"], r["metrics"][m]) for r in runs if r["arch"] == arch and m in r["metrics"]]
            table[arch][m] = {}
            for p in config.doses:
                vals = [v for q, v in rows if q == p and math.isfinite(v)]
                mean, lo, hi = mean_ci(vals)
                table[arch][m][str(p)] = {"mean": mean, "ci": [lo, hi], "values": vals}
            fit = slope_fit([q for q, _ in rows], [v for _, v in rows])
            fit["tracks"] = bool(math.isfinite(fit["p_rise"]) and fit["p_rise"] < ALPHA)
            fit["null"] = NULL[m]
            fit["at_p0.5"] = table[arch][m].get("0.5", {}).get("mean")
            fits[arch][m] = fit
        learned = fits[arch]["cooc"]["tracks"]  # cooc reads the planted association itself
        for m, fit in fits[arch].items():
            if fit["tracks"]:
                fit["verdict"] = "tracks the dose: it rises with p"
            elif math.isfinite(fit["p_fall"]) and fit["p_fall"] < ALPHA and (learned or m == "cooc"):
                fit["verdict"] = ("moves against the dose: it responds to the skew with the wrong sign, so its "
                                  "sign does not say which way the bias goes")
            elif m == "cooc":
                fit["verdict"] = "did not move: these models did not learn the planted skew (train longer)"
            elif not learned:
                fit["verdict"] = "inconclusive: the models did not learn the skew (cooc flat), so nothing to measure"
            else:
                fit["verdict"] = "does not move with p: it is not measuring this bias"
    return table, fits


def run(config: DoseConfig, model: torch.nn.Module | None = None, progress: Progress | None = None,
        out: str | Path | None = None) -> DoseResult:
    """Train small models at every dose and seed, measure every metric, and fit each against p. `model` is
    unused (the experiment trains its own); runs are trained in `out`/runs (a temporary folder if None)."""
    import tempfile

    validate(config)
    t0 = time.perf_counter()
    tmp = None
    if out is None:
        tmp = tempfile.TemporaryDirectory(prefix="llmlab-dose-")
        root = Path(tmp.name)
    else:
        root = Path(out) / "runs"
    runs: list[dict[str, Any]] = []
    jobs = [(a, p, s) for a in config.archs for p in config.doses
            for s in (config.bert_seeds or config.seeds if a == "bert" else config.seeds)]
    old_threads = torch.get_num_threads()
    try:
        with Stage(progress, f"train and measure {len(jobs)} models", len(jobs)) as st:
            for arch, p, seed in jobs:
                run_dir = root / f"{arch}-p{p:g}-seed{seed}"
                model_, info = train_one(arch, p, seed, config, run_dir, progress)
                with torch.inference_mode():
                    metrics = measure(model_, arch, config.samples, seed)
                runs.append({"arch": arch, "p": p, "seed": seed, **info, "metrics": metrics,
                             "run": str(run_dir) if config.keep_runs and out is not None else None})
                if not (config.keep_runs and out is not None):
                    shutil.rmtree(run_dir, ignore_errors=True)
                message(progress, f"{arch} p={p:g} seed {seed}: " +
                        ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
                st.advance()
    finally:
        torch.set_num_threads(old_threads)
        if tmp is not None:
            tmp.cleanup()
    table, fits = summarise(config, runs)
    return DoseResult(config, runs, table, fits, time.perf_counter() - t0)


def to_dict(result: DoseResult) -> dict[str, Any]:
    return {"config": dataclasses.asdict(result.config), "runs": result.runs, "table": result.table,
            "fits": result.fits, "seconds": result.seconds, **result.metric()}
