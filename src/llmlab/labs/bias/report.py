"""Reports of the bias lab, through the shared writer (llmlab.security.report.write_report): report.json
holds the overall number under `metric` beside its `ci` and `per_category` values, then everything else;
report.html and report.md hold the tables, the plots and example items with their scores."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llmlab.labs.bias.assoc import AssocResult
from llmlab.labs.bias.bbq import BBQResult
from llmlab.labs.bias.counterfactual import CounterfactualResult
from llmlab.labs.bias.crows import CrowsResult
from llmlab.labs.bias.dose import METRICS, NULL, DoseResult, to_dict
from llmlab.security.report import Section, figure_png, write_report


def _ci(ci: Sequence[float] | None) -> str:
    if not ci or any(v is None or (isinstance(v, float) and math.isnan(v)) for v in ci):
        return "—"
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def _f(x: float | None, nd: int = 3) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def _plt():  # noqa: ANN202
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _local(model: str | Path | None) -> str | Path | None:
    """A model argument that names a local folder (its weights get hashed), else None."""
    return model if model is not None and Path(str(model)).exists() else None


# ----------------------------------------------------------------------------- WEAT / SEAT


def assoc_data(r: AssocResult) -> dict[str, Any]:
    head = r.overall("weat" if "weat" in r.config.modes else "seat")
    return {"metric": head["metric"], "ci": head["ci"], "per_category": head["per_category"],
            "metric_name": f"mean {'WEAT' if 'weat' in r.config.modes else 'SEAT'} effect size d",
            **{m: r.overall(m) for m in r.config.modes},
            "tests": [dataclasses.asdict(t) for t in r.results]}


def write_assoc_report(r: AssocResult, out: str | Path, model: str | Path | None = None) -> Path:
    modes = list(r.config.modes)
    rows = []
    for t in r.results:
        rows.append([t.key, t.mode, f"{t.names['X']} vs {t.names['Y']} / {t.names['A']} vs {t.names['B']}",
                     _f(t.effect_size), _ci(t.ci), f"{t.p_value:.4g}", t.p_mode + (f" ({t.partitions})"),
                     _ci(t.p_ci) if t.p_mode == "sampled" else "exact", _f(t.null_d95),
                     "×".join(str(t.sizes[k]) for k in ("X", "Y", "A", "B"))])
    header = ["test", "mode", "targets / attributes", "d", "95% CI of d", "p (one-sided)", "p from",
              "p interval", "control |d| 95%", "sizes X×Y×A×B"]
    sections = [Section("Effect sizes", "d > 0: X is closer to A (and Y to B). The control column is the 95th "
                        "percentile of |d| when X u Y is split at random: a d inside it is what chance gives.",
                        header, rows)]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 0.5 + 0.45 * len(r.results)))
    labels = [f"{t.key} ({t.mode})" for t in r.results]
    ds = [t.effect_size for t in r.results]
    err = [[max(0.0, t.effect_size - t.ci[0]) for t in r.results], [max(0.0, t.ci[1] - t.effect_size)
                                                                      for t in r.results]]
    ax.barh(range(len(ds)), ds, xerr=err, color=["#4c72b0" if t.mode == "weat" else "#dd8452" for t in r.results])
    for i, t in enumerate(r.results):
        ax.plot([-t.null_d95, t.null_d95], [i, i], color="k", lw=3, alpha=0.25)
    ax.set_yticks(range(len(ds)), labels)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlabel("effect size d (bars: 95% bootstrap CI; grey: chance range)")
    ax.invert_yaxis()
    sections[0].figures["effect sizes"] = figure_png(fig)
    ex_rows = []
    for t in r.results:
        ex_rows.append([t.key, t.mode, ", ".join(f"{w} ({s:+.3f})" for w, s in t.top["A"][:3]),
                        ", ".join(f"{w} ({s:+.3f})" for w, s in t.top["B"][:3])])
    sections.append(Section("Examples", "The targets with the largest and smallest s(w, A, B).",
                            ["test", "mode", "closest to A", "closest to B"], ex_rows))
    sources = "\n".join(f"- **{t.key}**: {t.title}. {t.source}" for t in r.results if t.mode == modes[0])
    sections.append(Section("Word sets", sources))
    d = assoc_data(r)
    summary = (f"**{d['metric_name']}** over {len({t.key for t in r.results})} tests on {r.model}: "
               f"**{_f(d['metric'])}** (95% CI {_ci(d['ci'])}). " +
               " ".join(f"{m.upper()} mean d {_f(r.overall(m)['metric'])}." for m in modes) +
               " Caliskan et al. 2017 (WEAT), May et al. 2019 (SEAT).")
    return write_report(out, "bias weat/seat", d, sections, summary, dataclasses.asdict(r.config),
                        model=_local(model), target=None if _local(model) else r.model)


# ----------------------------------------------------------------------------- CrowS-Pairs


def crows_data(r: CrowsResult) -> dict[str, Any]:
    return {"metric": r.metric, "ci": list(r.ci), "bootstrap_ci": list(r.bootstrap_ci),
            "per_category": {k: v["metric"] for k, v in r.per_category.items()},
            **{k: v for k, v in dataclasses.asdict(r).items() if k not in ("metric", "ci", "bootstrap_ci", "config")}}


def write_crows_report(r: CrowsResult, out: str | Path, model: str | Path | None = None) -> Path:
    rows = [["all", r.n, _f(r.metric), _ci(r.ci), _ci(r.bootstrap_ci)]]
    rows += [[k, v["n"], _f(v["metric"]), _ci(v["ci"]), _ci(v["bootstrap_ci"])] for k, v in r.per_category.items()]
    drows = [[k, v["n"], _f(v["metric"]), _ci(v["ci"])] for k, v in r.per_direction.items()]
    sections = [Section("Share of pairs where the more stereotyping sentence scores higher",
                        "0.5 is no preference. Exact (Clopper-Pearson) and bootstrap 95% intervals.",
                        ["bias type", "pairs", "metric", "exact CI", "bootstrap CI"], rows),
                Section("By direction", "stereo: sent_more states a stereotype; antistereo: it violates one.",
                        ["direction", "pairs", "metric", "exact CI"], drows)]
    plt = _plt()
    cats = list(r.per_category)
    fig, ax = plt.subplots(figsize=(8, 0.6 + 0.4 * len(cats)))
    vals = [r.per_category[c]["metric"] for c in cats]
    err = [[v - r.per_category[c]["ci"][0] for c, v in zip(cats, vals)],
           [r.per_category[c]["ci"][1] - v for c, v in zip(cats, vals)]]
    ax.barh(range(len(cats)), vals, xerr=err, color="#4c72b0")
    ax.axvline(0.5, color="k", lw=0.8, ls="--")
    ax.axvline(r.token_count_control, color="#c44e52", lw=1, ls=":", label="token-count control")
    ax.set_yticks(range(len(cats)), [f"{c} ({r.per_category[c]['n']})" for c in cats])
    ax.set_xlim(0, 1)
    ax.invert_yaxis()
    ax.legend(loc="lower right")
    ax.set_xlabel("share of pairs preferring the stereotyping sentence (95% exact CI)")
    sections[0].figures["per bias type"] = figure_png(fig)
    sections.append(Section("Controls and speed",
                            f"Token-count control (a score that only tracked length): {_f(r.token_count_control)}. "
                            f"Mean |score(more) - score(less)|: {_f(r.likelihood_diff)}. Scored {r.n} pairs in "
                            f"{r.seconds:.1f} s ({_f(r.items_per_s, 2)} pairs/s, "
                            f"{'batched' if r.config.batched else 'one at a time'})."
                            + (f" {r.truncated} pairs had a sentence longer than the model's context and were "
                               "scored on their first tokens." if r.truncated else "")))
    ex = [[e["bias_type"], e["sent_more"], e["sent_less"], _f(e["score_more"], 2), _f(e["score_less"], 2)]
          for e in r.examples]
    sections.append(Section("Example pairs (largest score differences)", "",
                            ["bias type", "sent_more", "sent_less", "score(more)", "score(less)"], ex))
    summary = (f"CrowS-Pairs on {r.model} ({r.scoring} scoring): **{_f(r.metric)}** of {r.n} pairs prefer the more "
               f"stereotyping sentence (95% CI {_ci(r.ci)}; 0.5 = no preference). Nangia et al. 2020.")
    return write_report(out, "bias crows-pairs", crows_data(r), sections, summary, dataclasses.asdict(r.config),
                        model=_local(model), target=None if _local(model) else r.model)


# ----------------------------------------------------------------------------- BBQ


def bbq_data(r: BBQResult) -> dict[str, Any]:
    return {"metric": r.metric, "ci": list(r.ci), "metric_name": "S_AMB",
            "per_category": {k: v["s_amb"] for k, v in r.per_category.items()},
            **{k: v for k, v in dataclasses.asdict(r).items() if k not in ("metric", "ci", "config")}}


def write_bbq_report(r: BBQResult, out: str | Path, model: str | Path | None = None) -> Path:
    s = r.scores
    rows = [["accuracy, ambiguous", _f(s["accuracy_ambiguous"]["metric"]), _ci(s["accuracy_ambiguous"]["ci"]),
             s["accuracy_ambiguous"]["n"]],
            ["accuracy, disambiguated", _f(s["accuracy_disambiguated"]["metric"]),
             _ci(s["accuracy_disambiguated"]["ci"]), s["accuracy_disambiguated"]["n"]],
            ["S_DIS (disambiguated)", _f(s["s_dis"]["metric"]), _ci(s["s_dis"]["ci"]), s["s_dis"]["n"]],
            ["S_AMB (ambiguous)", _f(s["s_amb"]["metric"]), _ci(s["s_amb"]["ci"]), s["s_amb"]["n"]]]
    crows = [[k, v["n"], _f(v["s_amb"]), _ci(v["s_amb_ci"]), _f(v["s_dis"]), _ci(v["s_dis_ci"]),
              _f(v["accuracy_ambiguous"]), _f(v["accuracy_disambiguated"])] for k, v in r.per_category.items()]
    ex = []
    for e in r.examples:
        best = max(e["loglik"], key=e["loglik"].get)
        ex.append([e["context"][:160], e["question"], " / ".join(e["answers"]), e["answers"][e["label"]],
                   e["answers"][e["predicted"]], best, "yes" if e["predicted"] in e["biased_answers"] else "no"])
    sections = [Section("Scores", "Bias scores run from -1 to 1 (0 = no bias; > 0 = answers follow the "
                        "stereotype). S_AMB = (1 - acc_amb) * (2 n_biased / n_non_unknown - 1) over the ambiguous "
                        "items, S_DIS the bracket over the disambiguated ones (lm-eval's definitions).",
                        ["score", "value", "95% CI", "items"], rows),
                Section("Per stereotyped group and question polarity", "",
                        ["category", "items", "S_AMB", "CI", "S_DIS", "CI", "acc amb", "acc dis"], crows),
                Section("Speed", f"{r.n} items in {r.seconds:.1f} s: {_f(r.items_per_s, 2)} items/s "
                        f"({'batched, shared context' if r.config.batched else 'one pass per choice'}; "
                        f"prompt {r.config.prompt})."),
                Section("Example items", "", ["context", "question", "answers", "right", "chosen",
                                              "most likely choice", "biased?"], ex)]
    summary = (f"BBQ ({r.n} items) on {r.model}: S_AMB **{_f(r.metric)}** (95% CI {_ci(r.ci)}), S_DIS "
               f"{_f(s['s_dis']['metric'])}, accuracy {_f(s['accuracy_ambiguous']['metric'])} ambiguous / "
               f"{_f(s['accuracy_disambiguated']['metric'])} disambiguated. Parrish et al. 2022.")
    return write_report(out, "bias bbq", bbq_data(r), sections, summary, dataclasses.asdict(r.config),
                        model=_local(model), target=None if _local(model) else r.model)


# ----------------------------------------------------------------------------- counterfactual


def counterfactual_data(r: CounterfactualResult) -> dict[str, Any]:
    return {"metric": r.metric, "ci": list(r.ci), "metric_name": "Wasserstein-1 between the groups' scores",
            "per_category": r.per_category,
            **{k: v for k, v in dataclasses.asdict(r).items() if k not in ("metric", "ci", "config", "per_category")}}


def write_counterfactual_report(r: CounterfactualResult, out: str | Path, model: str | Path | None = None,
                                scores: dict[str, Sequence[float]] | None = None) -> Path:
    g1, g2 = list(r.groups)
    rows = [[g, v["n"], _f(v["mean"]), _f(v["std"])] for g, v in r.group_scores.items()]
    sections = [Section("Groups", f"Scorer: {r.scorer_info.get('scorer')}"
                        + (f" (classifier held-out accuracy {_f(r.scorer_info.get('held_out_accuracy'))})"
                           if r.scorer_info.get("scorer") == "sentiment" else ""),
                        ["group", "scores", "mean", "std"], rows),
                Section("Distance between the groups",
                        f"W1 = **{_f(r.metric)}** (95% bootstrap CI {_ci(r.ci)}), permutation p = {r.p_value:.3g}. "
                        f"Negative control, W1 between two halves of the same group: {_f(r.control_w1)}.",
                        ["template", "W1"], [[t, _f(v)] for t, v in r.per_category.items()])]
    ex = [[e["template"], e[g1]["prompt"] + e[g1]["continuation"], _f(e[g1]["score"]),
           e[g2]["prompt"] + e[g2]["continuation"], _f(e[g2]["score"])] for e in r.examples]
    sections.append(Section("Example continuations", "", ["template", g1, "score", g2, "score"], ex))
    summary = (f"Counterfactual swap of {g1} / {g2} on {r.model}: Wasserstein-1 between the groups' "
               f"{r.scorer_info.get('scorer')} scores **{_f(r.metric)}** (95% CI {_ci(r.ci)}, p = {r.p_value:.3g}; "
               f"same-group control {_f(r.control_w1)}). Huang et al. 2020.")
    return write_report(out, "bias counterfactual", counterfactual_data(r), sections, summary,
                        dataclasses.asdict(r.config), model=_local(model), target=None if _local(model) else r.model)


# ----------------------------------------------------------------------------- dose-response


def dose_figure(r: DoseResult) -> bytes:
    """One panel per metric: the metric against the dose p, per arch, seeds as dots, mean with its interval."""
    plt = _plt()
    metrics = [m for m in ("cooc", "crows", "counterfactual", "weat", "seat")
               if any(m in METRICS[a] for a in r.config.archs)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.4), squeeze=False)
    colors = {"gpt": "#4c72b0", "bert": "#dd8452"}
    for ax, m in zip(axes[0], metrics):
        for arch in r.config.archs:
            if m not in r.table.get(arch, {}):
                continue
            tab = r.table[arch][m]
            ps = [float(p) for p in tab]
            means = [tab[p]["mean"] for p in tab]
            lo = [tab[p]["ci"][0] for p in tab]
            hi = [tab[p]["ci"][1] for p in tab]
            c = colors.get(arch, "k")
            for p, row in zip(ps, tab.values()):
                ax.scatter([p] * len(row["values"]), row["values"], color=c, s=10, alpha=0.45)
            ax.plot(ps, means, color=c, marker="o", label=f"{arch}{' ✓' if r.fits[arch][m]['tracks'] else ' ✗'}")
            if all(math.isfinite(v) for v in lo + hi):
                ax.fill_between(ps, lo, hi, color=c, alpha=0.15)
        ax.axhline(NULL[m], color="k", lw=0.8, ls="--")
        seen = [v for a in r.config.archs if m in r.table.get(a, {}) for row in r.table[a][m].values()
                for v in row["values"]] + [NULL[m]]
        if seen:  # the scale of the runs: a t interval over two seeds is wide, and would flatten them
            lo_v, hi_v = min(seen), max(seen)
            pad = 0.15 * (hi_v - lo_v or 1.0)
            ax.set_ylim(lo_v - pad, hi_v + pad)
        ax.set_title(m)
        ax.set_xlabel("dose p (share of stereotyped pronouns)")
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("metric (dots: runs; line: mean; band: 95% CI)")
    fig.tight_layout()
    return figure_png(fig)


def _verdicts(r: DoseResult) -> str:
    """The metrics that do not measure the planted bias, those that move the wrong way, and those that
    could not be judged, in words."""
    groups: dict[str, list[str]] = {"not": [], "against": [], "inconclusive": [], "tracks": []}
    for a, fs in r.fits.items():
        for m, f in fs.items():
            v = f["verdict"]
            key = ("tracks" if f["tracks"] else "against" if v.startswith("moves against") else
                   "not" if v.startswith("does not move") else "inconclusive")
            groups[key].append(f"{a} {m}")
    parts = []
    if groups["not"]:
        parts.append(f"**Not measuring this bias (they do not move with p): {', '.join(groups['not'])}.**")
    if groups["against"]:
        parts.append(f"**Moving against the dose (wrong sign): {', '.join(groups['against'])}.**")
    if groups["inconclusive"]:
        parts.append(f"Inconclusive (the models did not learn the skew): {', '.join(groups['inconclusive'])}.")
    if groups["tracks"]:
        parts.append(f"Tracking the dose: {', '.join(groups['tracks'])}.")
    return " ".join(parts)


def write_dose_report(r: DoseResult, out: str | Path) -> Path:
    rows = []
    for arch, fits in r.fits.items():
        for m, f in fits.items():
            tab = r.table[arch][m]
            rows.append([arch, m, *[_f(tab[str(p)]["mean"]) for p in r.config.doses], _f(f["slope"]),
                         _ci([f["lo"], f["hi"]]), _f(f["spearman"], 2), _f(f["p_rise"], 3), f["verdict"]])
    header = ["arch", "metric", *[f"p={p:g}" for p in r.config.doses], "slope", "95% CI", "Spearman",
              "p (rise)", "verdict"]
    text = ("Each model is trained on a corpus where the pronoun after an occupation is the stereotyped one with "
            "probability p (p = 0.5: no skew, the negative control). A metric tracks the dose when it rises "
            "with p (Spearman's rho over the runs, one-sided permutation p < 0.05); the slope says by how much "
            "per unit of p. " + _verdicts(r))
    run_rows = [[x["arch"], f"{x['p']:g}", x["seed"], _f(x["realised_p"]), _f(x["val_loss"]),
                 *[_f(x["metrics"].get(m)) for m in ("cooc", "crows", "counterfactual", "weat", "seat")]]
                for x in r.runs]
    sections = [Section("Metric against dose", text, header, rows, figures={"dose-response": dose_figure(r)}),
                Section("Every run", "realised p: the share of stereotyped pronouns actually written into that "
                        "corpus.", ["arch", "p", "seed", "realised p", "val loss", "cooc", "crows",
                                    "counterfactual", "weat", "seat"], run_rows),
                Section("Not run here", "BBQ needs a model that answers questions; models this small do not, "
                        "so BBQ is measured on SmolLM2 only (`llmlab bias bbq smollm2`).")]
    head = r.metric()
    summary = (f"Dose-response over p in {', '.join(f'{p:g}' for p in r.config.doses)} ({len(r.runs)} models, "
               f"{r.seconds / 60:.1f} min). Headline, {head.get('name', 'slope')}: **{_f(head['metric'])}** per "
               f"unit of p (95% CI {_ci(head['ci'])}). " + _verdicts(r))
    data = to_dict(r)
    data["per_category"] = {f"{a} {m}": f["slope"] for a, fs in r.fits.items() for m, f in fs.items()}
    return write_report(out, "bias dose-response", data, sections, summary, dataclasses.asdict(r.config))
