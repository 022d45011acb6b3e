"""Reports of the truthfulness lab and of `llmlab truth eval`, built with the shared writer
(llmlab.security.report.write_report: report.json with every number, report.html, report.md):

    write_lab_report(lab.run(...), out)          write_measure_report(measure.run(...), out)

Figures: reliability diagrams, accuracy by training frequency, hallucination rate against the monofact rate
(with the Kalai-Vempala line), detector ROC and rejection curves; tables of every number with its interval,
and example answers (question, truth, answer, confidence)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llmlab.labs.truth.detectors import LABELS
from llmlab.labs.truth.lab import LabResult
from llmlab.labs.truth.measure import Measurement
from llmlab.security.report import Section, figure_png, write_report

COLORS = {"none": "tab:blue", "dedup": "tab:orange"}
OUTS = ("correct", "wrong", "abstain")
NAMES = {"none": "corpus as written", "dedup": "deduplicated"}


def _pct(x: float | None) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _rate(d: dict[str, Any] | None) -> str:
    if not d or not d.get("n"):
        return "not measured"
    return f"{d['k']}/{d['n']} = {_pct(d['rate'])} [{_pct(d['lo'])}, {_pct(d['hi'])}]"


def _num(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x:.{digits}f}"


def _ci(d: dict[str, Any], digits: int = 3, pct: bool = False) -> str:
    """A summary over seeds: a rate pooled over seeds with its exact interval, else the mean with its Student-t
    interval (3 seeds or more); then the per-seed values."""
    f = _pct if pct else (lambda v: _num(v, digits))
    if d.get("mean") is None:
        return "not measured"
    vals = ", ".join(f(v) for v in d.get("values", []))
    if d.get("pooled") and d["pooled"].get("n"):
        return f"{_rate(d['pooled'])} (seeds: {vals})"
    if d.get("lo") is None or (isinstance(d["lo"], float) and math.isnan(d["lo"])):
        return f"{f(d['mean'])} (seeds: {vals})"
    return f"{f(d['mean'])} [{f(d['lo'])}, {f(d['hi'])}] (seeds: {vals})"


def _boot(d: dict[str, Any]) -> str:
    """A mean over questions with its bootstrap interval."""
    if d.get("mean") is None:
        return "not measured"
    return f"{_num(d['mean'])} [{_num(d['lo'])}, {_num(d['hi'])}] (n={d['n']})"


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ----------------------------------------------------------------------------- figures


def plot_reliability(cals: dict[str, dict[str, Any]]) -> bytes:
    """Reliability diagrams: accuracy per confidence bin against the diagonal, one panel per calibration."""
    plt = _plt()
    cals = {k: v for k, v in cals.items() if v.get("measured")}
    fig, axes = plt.subplots(1, max(1, len(cals)), figsize=(4.2 * max(1, len(cals)), 4), squeeze=False)
    for ax, (name, c) in zip(axes[0], cals.items()):
        b = c["bins"]
        edges = b["edges"]
        width = edges[1] - edges[0]
        centers = [e + width / 2 for e in edges[:-1]]
        acc = [a if a == a else 0 for a in b["accuracy"]]
        ax.bar(centers, acc, width=width * 0.92, color="tab:blue", alpha=0.75, label="accuracy")
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
        first = True
        for x, n, conf in zip(centers, b["count"], b["confidence"]):
            if n:
                ax.plot([x], [conf], "o", color="tab:red", ms=3, label="mean confidence" if first else None)
                ax.text(x, 1.02, str(n), ha="center", fontsize=7, color="#555")
                first = False
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.08)
        ax.set_xlabel("confidence")
        ax.set_ylabel("fraction correct" if name != "P(yes)" else "fraction whose truth is yes")
        ax.set_title(f"{name}: ECE {_num(c['ece'])}, n={c['n']}", fontsize=10)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return figure_png(fig)


def plot_by_count(series: dict[str, list[dict[str, Any]]], xlabel: str = "mentions of the fact in training") -> bytes:
    """Accuracy per training-frequency bucket with exact 95% intervals, one line per series."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    labels = list(dict.fromkeys(b["bucket"] for rows in series.values() for b in
                                sorted(rows, key=lambda r: r["lo"])))
    pos = {lab: i for i, lab in enumerate(labels)}
    for k, (name, rows) in enumerate(series.items()):
        xs = [pos[r["bucket"]] + (k - (len(series) - 1) / 2) * 0.08 for r in rows]
        ys = [r["accuracy"]["rate"] for r in rows]
        lo = [y - r["accuracy"]["lo"] for y, r in zip(ys, rows)]
        hi = [r["accuracy"]["hi"] - y for y, r in zip(ys, rows)]
        ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=NAMES.get(name, name),
                    color=COLORS.get(name))
    ax.set_xticks(range(len(labels)), [f"{lab}\n" for lab in labels])
    ax.set_xlabel(xlabel + " (0 = unseen: the negative control)")
    ax.set_ylabel("accuracy (exact 95% interval)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return figure_png(fig)


def plot_monofact(points: Sequence[dict[str, Any]]) -> bytes:
    """Hallucination rate of free generation against the monofact rate of the training corpus, one point per
    model (exact 95% interval), with the line hallucination = monofact rate."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    top = max([0.5] + [p["mf"] for p in points] + [p["hi"] for p in points])
    ax.plot([0, top], [0, top], "k--", lw=1, label="hallucination = monofact rate\n(Kalai & Vempala: the floor "
                                                    "of a\ncalibrated model, up to small terms)")
    seen = set()
    for p in points:
        c = p["condition"]
        ax.errorbar([p["mf"]], [p["rate"]], yerr=[[p["rate"] - p["lo"]], [p["hi"] - p["rate"]]], fmt="o", capsize=3,
                    color=COLORS.get(c), label=NAMES.get(c, c) if c not in seen else None)
        ax.annotate(f"s{p['seed']}", (p["mf"], p["rate"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
        seen.add(c)
    ax.set_xlim(0, min(1.0, top * 1.05))
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("monofact rate of the training corpus (N1 / N)")
    ax.set_ylabel("hallucination rate of free generation")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return figure_png(fig)


def plot_detectors(dets: dict[str, dict[str, Any]]) -> bytes:
    """ROC curves (predicting "the answer is wrong") and rejection-accuracy curves of every measured detector."""
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for name, d in dets.items():
        if not d.get("measured"):
            continue
        ls = "--" if name == "random" else "-"
        a1.plot(d["roc"]["fpr"], d["roc"]["tpr"], ls, label=f"{LABELS.get(name, name)} ({d['auroc']:.2f})")
        a2.plot(d["rejection"]["coverage"], d["rejection"]["accuracy"], ls, label=LABELS.get(name, name))
    a1.plot([0, 1], [0, 1], ":", color="#999", lw=1)
    a1.set_xlabel("false positive rate (right answers flagged)")
    a1.set_ylabel("true positive rate (wrong answers flagged)")
    a1.set_title("ROC: AUROC in brackets", fontsize=10)
    a1.legend(fontsize=7)
    a2.set_xlabel("coverage (share answered, most confident first)")
    a2.set_ylabel("accuracy of the answered")
    a2.set_title("rejection-accuracy curves", fontsize=10)
    a2.grid(alpha=0.3)
    fig.tight_layout()
    return figure_png(fig)


# ----------------------------------------------------------------------------- sections


def detector_rows(dets: dict[str, dict[str, Any]], coverages: Sequence[str]) -> list[list[Any]]:
    rows = []
    for name, d in dets.items():
        if not d.get("measured") and "aurac" not in d:
            why = "not measured: " + d.get("why", "")
            rows.append([LABELS.get(name, name), why, "—", "—", *["—"] * len(coverages)])
            continue
        auroc = (f"{d['auroc']:.3f} [{_num(d['auroc_ci'][0])}, {_num(d['auroc_ci'][1])}]" if d.get("measured")
                 else "not measured: " + d.get("why", ""))
        rows.append([LABELS.get(name, name), auroc, _num(d["aurac"]), _num(d["prr"]),
                     *[_pct(d["accuracy_at"].get(c)) for c in coverages]])
    return rows


def measurement_sections(m: Measurement, title_prefix: str = "") -> list[Section]:
    """The sections of one measurement: outcomes, frequency, calibration, detectors, choices, targets, examples."""
    p = title_prefix
    out = [Section(f"{p}Answers", f"{m.n} questions, asked in {m.mode} mode; {m.questions_per_s:.2f} questions/s "
                   f"({m.seconds:.1f} s, sampling included). Rates have exact (Clopper-Pearson) 95% intervals.",
                   ["group", "n", "correct", "wrong", "abstain"],
                   [["all", m.n, *[_rate(m.outcomes[o]) for o in OUTS]]]
                   + [[g, d["n"], *[_rate(d[o]) for o in OUTS]] for g, d in m.groups.items()])]
    if m.by_count:
        out.append(Section(f"{p}Accuracy by training frequency", "Questions grouped by how often their fact is "
                           "stated in the training corpus (planted myths left out).", ["mentions", "n", "accuracy"],
                           [[b["bucket"], b["n"], _rate(b["accuracy"])] for b in m.by_count],
                           {"accuracy by training frequency": plot_by_count({"model": m.by_count})}))
    if m.calibration:
        rows = [[k, c["n"], f"{_num(c['ece'])} [{_num(c['ece_ci'][0])}, {_num(c['ece_ci'][1])}]", _num(c["mce"]),
                 _num(c["brier"]), _pct(c["mean_confidence"]), _pct(c["accuracy"])]
                for k, c in m.calibration.items() if c.get("measured")]
        text = ("Answer probability: the probability the model gives its own answer (for a yes/no question, P of the "
                "side it took), against being right. P(yes): P(yes) / (P(yes) + P(no)) of the reply's first token, "
                "against the truth being yes. ECE and MCE over 10 equal-width bins (Guo et al. 2017), ECE with a "
                "bootstrap interval; Brier = mean (p - y)^2.")
        out.append(Section(f"{p}Calibration", text, ["confidence", "n", "ECE", "MCE", "Brier", "mean confidence",
                                                     "accuracy"], rows,
                           {"reliability diagram": plot_reliability(m.calibration)}))
    covs = [f"{c:g}" for c in m.config.get("coverages", (0.8, 0.9, 0.95))]
    figs = {"detectors: ROC and rejection curves": plot_detectors(m.detectors)} if any(
        d.get("measured") for d in m.detectors.values()) else {}
    out.append(Section(f"{p}Hallucination detectors", "Each detector's uncertainty scored against the truth "
                       "(y = the answer is wrong; abstentions left out): AUROC with a bootstrap interval, area under "
                       "the rejection-accuracy curve (AURAC), prediction-rejection ratio (PRR), and accuracy when "
                       "answering only the most confident share. The random detector is the negative control.",
                       ["detector", "AUROC", "AURAC", "PRR", *[f"acc @ {float(c):.0%}" for c in covs]],
                       detector_rows(m.detectors, covs), figs))
    if m.choice:
        out.append(Section(f"{p}Multiple choice", "MC1: the truth has the highest likelihood among the choices; "
                           "MC2: its share of the choices' probability (lm-evaluation-harness's TruthfulQA formulas). "
                           "For yes/no questions the choice is the reply's first token. MC2 with a bootstrap interval.",
                           ["group", "MC1", "MC2"],
                           [[g, _rate(d["mc1"]), _boot(d["mc2"])] for g, d in m.choice.items()]))
    if m.myths:
        out.append(Section(f"{p}Planted misconceptions", "Questions whose fact the corpus states falsely more often "
                           "than truly: how often the greedy answer repeats the myth.", ["n", "says the myth",
                                                                                          "says the truth"],
                           [[m.myths["n"], _rate(m.myths["said_myth"]), _rate(m.myths["said_truth"])]]))
    cw = m.confident_wrong
    out.append(Section(f"{p}Confident errors and confidence targets",
                       f"Confident wrong answers (confidence at least {cw['threshold']:g}): {_rate(cw)}. Below: "
                       "answering only when the confidence is at least t, a wrong answer costing t/(1-t) (Kalai et al. "
                       "2025, \"Why language models hallucinate\"); t = 0 is plain accuracy.",
                       ["t", "penalty", "answered", "errors", "score"],
                       [[f"{t['t']:g}", _num(t["penalty"], 2), _rate(t["answered"]), _rate(t["errors"]),
                         _num(t["score"])] for t in m.targets]))
    out.append(Section(f"{p}Example answers", "", ["question", "truth", "answer", "confidence", "outcome"],
                       [[e["question"][-160:], e["truth"], e["answer"][:120], _num(e["confidence"]), e["outcome"]]
                        for e in examples(m.items, int(m.config.get("examples", 12)))]))
    return out


def examples(items: Sequence[dict[str, Any]], k: int) -> list[dict[str, Any]]:
    """A few answers worth reading: the most confident wrong ones, then right ones, then abstentions."""
    def conf(it: dict[str, Any]) -> float:
        c = it.get("confidence")
        return -1.0 if c is None or c != c else c

    wrong = sorted((i for i in items if i["outcome"] == "wrong"), key=conf, reverse=True)
    right = sorted((i for i in items if i["outcome"] == "correct"), key=conf, reverse=True)
    abst = [i for i in items if i["outcome"] == "abstain"]
    n_w = max(1, k // 2)
    out = wrong[:n_w] + right[: max(1, k - n_w - min(2, len(abst)))] + abst[:2]
    return out[:k]


def measure_summary(m: Measurement) -> str:
    best = max(((n, d) for n, d in m.detectors.items() if d.get("measured") and n != "random"),
               key=lambda x: x[1]["auroc"], default=None)
    cal = m.calibration.get("answer probability") or m.calibration.get("P(yes)")
    bits = [f"accuracy {_rate(m.outcomes['correct'])}, wrong {_pct(m.outcomes['wrong']['rate'])}, abstained "
            f"{_pct(m.outcomes['abstain']['rate'])}"]
    if cal:
        bits.append(f"ECE {_num(cal['ece'])}")
    bits.append(f"confident wrong answers {_pct(m.confident_wrong['rate'])}")
    if best:
        bits.append(f"best detector {LABELS.get(best[0], best[0])} (AUROC {best[1]['auroc']:.2f})")
    rnd = m.detectors.get("random", {})
    if rnd.get("measured"):
        bits.append(f"random control AUROC {rnd['auroc']:.2f}")
    return "; ".join(bits) + "."


def write_measure_report(m: Measurement, out: str | Path, model: str | Path | None = None,
                         target: str | None = None, questions: str = "") -> Path:
    """The report of one model's measurement (`llmlab truth eval`)."""
    data = {k: v for k, v in dataclasses.asdict(m).items()}
    text = f"Questions: {questions}. " if questions else ""
    sections = measurement_sections(m)
    sections[0].text = text + sections[0].text
    local = model if model is not None and Path(str(model)).exists() else None
    return write_report(out, "truth eval", data, sections, measure_summary(m), m.config, model=local,
                        target=target or (None if local else str(model) if model else None))


# ----------------------------------------------------------------------------- the lab

METRICS = (("monofact_rate", "monofact rate of the training corpus", True),
           ("hallucination_rate", "hallucination rate (free generation)", True),
           ("accuracy_frequent", "accuracy, facts stated >= 16 times (before dedup)", True),
           ("accuracy_once", "accuracy, facts stated once (before dedup)", True),
           ("accuracy_seen", "accuracy, all seen facts", True),
           ("accuracy_unseen", "accuracy, unseen people (negative control)", True),
           ("myth_said", "planted myths repeated", True),
           ("mc1_myth", "MC1 on myths", True),
           ("mc1_seen", "MC1 on seen facts", True),
           ("ece", "ECE of the answer probability", False),
           ("brier", "Brier score", False))


def lab_summary(r: LabResult) -> str:
    c = r.conditions
    bits = []
    if "none" in c:
        n = c["none"]
        bits.append(f"Facts stated 16+ times are answered {_ci(n['accuracy_frequent'], pct=True)}, singletons "
                    f"{_ci(n['accuracy_once'], pct=True)}, unseen people (control) "
                    f"{_ci(n['accuracy_unseen'], pct=True)} (pooled over seeds).")
    if r.differences:
        d = r.differences
        bits.append(f"Deduplication changes the monofact rate by {_ci(d['monofact_rate'])} and the hallucination "
                    f"rate by {_ci(d['hallucination_rate'])} (paired, dedup - none), the accuracy on frequent facts by "
                    f"{_ci(d['accuracy_frequent'])}" + (f" and myth repetition by {_ci(d['myth_said'])}"
                                                        if "myth_said" in d else "") + ".")
    first = next((x for x in r.runs if x.condition == "none"), r.runs[0] if r.runs else None)
    if first is not None:
        dets = {k: v for k, v in c[first.condition].items() if k.startswith("auroc_")}
        best = max((k for k in dets if k != "auroc_random"), key=lambda k: dets[k]["mean"], default=None)
        if best:
            bits.append(f"Best detector {LABELS.get(best[6:], best[6:])}: AUROC {_ci(dets[best])}; random control "
                        f"{_ci(dets.get('auroc_random', {'mean': None}))}.")
    return " ".join(bits)


def lab_sections(r: LabResult) -> list[Section]:
    conds = list(r.conditions)
    seeds = sorted({x.seed for x in r.runs})
    cfg = r.config
    w = cfg["world"]
    intro = (f"{len(seeds)} seeds × {len(conds)} conditions ({', '.join(NAMES.get(c, c) for c in conds)}). Each seed "
             f"draws a world of {w['people']} people ({w['myths']} with a planted myth, stated {w['myth_ratio']:g}× as "
             f"often as the truth) and {w['unseen']} unseen people, attributes {', '.join(w['relations'])}, mention "
             f"counts from a Zipf law (s = {w['zipf_s']}, at most {w['max_count']}), {w['templates']} sentence "
             f"templates per attribute; deduplication is the privacy lab's ({cfg['dedup_mode']}). Each condition of a "
             f"seed trains the same model (preset {cfg['preset']}, {cfg['train'].get('n_layer')} layers × "
             f"{cfg['train'].get('n_embd')}, {cfg['train'].get('max_iters')} steps, character tokenizer): the same "
             "steps on a smaller deduplicated corpus are more passes over each remaining line. Rates are "
             "pooled over seeds with exact 95% intervals, other numbers are means over seeds with a Student-t 95% "
             "interval from 3 seeds on; the per-seed values follow in brackets. A paired difference compares the "
             "two models of one seed (same world).")
    rows = []
    for key, label, pct in METRICS:
        if not any(key in r.conditions[c] for c in conds):
            continue
        row = [label, *[_ci(r.conditions[c][key], pct=pct) if key in r.conditions[c] else "—" for c in conds]]
        if r.differences:
            row.append(_ci(r.differences[key]) if key in r.differences else "—")
        rows.append(row)
    head = ["", *[NAMES.get(c, c) for c in conds], *(["dedup - none (paired)"] if r.differences else [])]
    points = [{"condition": x.condition, "seed": x.seed, "mf": x.corpus["monofact_rate"],
               "rate": x.hallucination["rate"]["rate"] or 0.0, "lo": x.hallucination["rate"]["lo"] or 0.0,
               "hi": x.hallucination["rate"]["hi"] or 0.0} for x in r.runs if x.hallucination["rate"]["n"]]
    figs = {"hallucination rate against monofact rate": plot_monofact(points)} if points else {}
    figs["accuracy by training frequency (counts before dedup), pooled over seeds"] = plot_by_count(
        r.by_original_count, "mentions of the fact in the corpus as written")
    out = [Section("The experiment", intro, head, rows, figs)]
    out.append(Section("Accuracy by training frequency", "Pooled over seeds, by the count in the corpus each model "
                       "trained on (after dedup for the deduplicated models).", ["condition", "mentions", "n",
                                                                                 "accuracy"],
                       [[NAMES.get(c, c), b["bucket"], b["n"], _rate(b["accuracy"])] for c in conds
                        for b in r.by_count[c]]))
    det_names = [k for k in dict.fromkeys(k for c in conds for k in r.conditions[c]) if k.startswith("auroc_")]
    out.append(Section("Detectors over seeds", "AUROC for \"the answer is wrong\", mean over seeds.",
                       ["detector", *[NAMES.get(c, c) for c in conds]],
                       [[LABELS.get(k[6:], k[6:]), *[_ci(r.conditions[c][k]) if k in r.conditions[c] else "—"
                                                     for c in conds]] for k in det_names]))
    gen_rows = []
    for x in r.runs:
        h = x.hallucination
        gen_rows.append([x.seed, NAMES.get(x.condition, x.condition), _pct(x.corpus["monofact_rate"]), h.get("parsed"),
                         h.get("true"), h.get("wrong"), h.get("myth"), h.get("fabricated"), h.get("unparsed"),
                         _rate(h["rate"])])
    ex = next((x for x in r.runs if x.hallucination.get("examples")), None)
    text = "Free generation after a line break, read back with the corpus's templates."
    if ex is not None:
        e = ex.hallucination["examples"]
        text += f" Examples (seed {ex.seed}, {NAMES.get(ex.condition, ex.condition)}): " + "; ".join(
            f"{k}: `{v[0]}`" for k, v in e.items() if v)
    out.append(Section("Free generation", text, ["seed", "condition", "monofact", "parsed", "true", "wrong", "myth",
                                                 "fabricated", "unparsed", "hallucination rate"], gen_rows))
    out.append(Section("Runs", "", ["seed", "condition", "statements", "facts", "chars", "steps", "val loss",
                                    "train s", "run"],
                       [[x.seed, NAMES.get(x.condition, x.condition), x.corpus["statements"], x.corpus["facts"],
                         x.corpus["chars"], x.training.get("steps"), _num(x.training.get("val_loss")),
                         _num(x.training.get("seconds"), 1), x.run] for x in r.runs]))
    first = next((x for x in r.runs if x.condition == "none"), r.runs[0])
    out += measurement_sections(first.measurement, f"Seed {first.seed}, {NAMES.get(first.condition)}: ")
    return out


def write_lab_report(r: LabResult, out: str | Path | None = None) -> Path:
    """The lab's report in `out` (default: the lab's folder)."""
    data = {"out": r.out, "conditions": r.conditions, "differences": r.differences, "by_count": r.by_count,
            "by_original_count": r.by_original_count, "seconds": r.seconds,
            "runs": [dataclasses.asdict(x) for x in r.runs]}
    return write_report(out or r.out, "truth lab", data, lab_sections(r), lab_summary(r), r.config)
