"""Reports of the privacy experiments, built from their results with the shared writer
(llmlab.security.report.write_report: report.json with every number, report.html, report.md):

    exp = run_canary_experiment(CanaryConfig(...), "runs/privacy/canary")
    write_canary_report(exp, "runs/privacy/canary")

Each write_* function returns the report folder; each *_summary function gives the one-line summary the
report opens with."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llmlab.checkpoint import atomic_write_bytes
from llmlab.security.privacy.canary import (
    CanaryExperiment,
    ExposureResult,
    exposure_by_count,
    plot_exposure,
    plot_histogram,
)
from llmlab.security.privacy.compare import EPSILON_MEANING, CompareResult
from llmlab.security.privacy.extract import ExtractResult
from llmlab.security.privacy.mia import MIAResult, blind_warning, plot_roc
from llmlab.security.report import Section, figure_png, write_report

# ----------------------------------------------------------------------------- canary


def canary_sections(res: ExposureResult, title: str = "Canaries") -> list[Section]:
    """The canary tables — the mean exposure per repetition count, then every canary with each estimator in
    its own column — with the exposure plot and the histogram of the candidates' Px."""
    exact = res.method == "exact"
    rows = []
    for c in res.canaries:
        clipped = " (clipped at log2|R|)" if c.get("skewnorm_clipped") else ""
        if exact:
            rows.append([c["secret"], c["repeats"], round(c["px_bits"], 2), c["rank"], round(c["exposure"], 2),
                         f"{c['exposure_skewnorm']:.2f}{clipped}" if "exposure_skewnorm" in c else "-",
                         "yes" if c["greedy_extracted"] else "no", c["beam_rank"] or "-"])
        else:
            rows.append([c["secret"], c["repeats"], round(c["px_bits"], 2), f"{c['rank_estimate']:,.0f}",
                         round(c["exposure_sampled"], 2) if "exposure_sampled" in c else "-",
                         f"{c['exposure']:.2f}{clipped}", "yes" if c["greedy_extracted"] else "no",
                         c["beam_rank"] or "-"])
    header = (["secret", "repeats", "Px (bits)", "rank (exact)", "exposure (exact)", "exposure (skew-normal fit)",
               "greedy", "beam rank"] if exact else
              ["secret", "repeats", "Px (bits)", "rank (sampled)", "exposure (sampled)", "exposure (skew-normal fit)",
               "greedy", "beam rank"])
    by = exposure_by_count(res)
    count_rows = [[g["repeats"] or "0 (control)", g["n"], round(g["mean"], 2),
                   f"[{g['lo']:.2f}, {g['hi']:.2f}]" if g["n"] > 1 else "— (one canary)", round(g["min"], 2),
                   round(g["max"], 2)] for g in by]
    figs = {"exposure vs repetitions": figure_png(plot_exposure({"model": res}))}
    if res.histogram:
        figs["Px of all candidates"] = figure_png(plot_histogram(res))
    how = ("exact: every candidate scored, rank = how many score at most the canary's Px" if exact else
           f"estimated from {res.samples:,} random candidates: the *sampled* rank and exposure come from the share "
           "of them scoring below the canary; the *skew-normal* exposure extrapolates a fitted tail (Carlini et "
           "al. 2019) and is clipped at log2|R|")
    text = (f"{res.space_size:,} candidate secrets (max exposure {res.max_exposure:.2f} bits = log2|R|); {how}."
            " Exposure = log2|R| - log2 rank."
            + (" The skew-normal column is the estimator a space too large to score would need, shown beside the "
               "exact value so its error is visible." if exact else "")
            + f" Greedy decoding from the prefix gives `{res.greedy_secret}`; unconstrained greedy continues "
              f"`{res.free_greedy_text}`."
            + (f" The characters {res.oov!r} are not in the model's vocabulary: candidates differing only in them "
               "read the same and tie." if res.oov else ""))
    return [Section(f"{title}: exposure per repetition count",
                    "Several canaries per count: the mean, its 95% t interval, and the range.",
                    ["repeats", "canaries", "mean exposure", "95% CI", "min", "max"], count_rows),
            Section(title, text, header, rows, figs)]


def canary_summary(res: ExposureResult) -> str:
    return ("; ".join(f"x{g['repeats']}: exposure {g['mean']:.1f}" + (f" (n={g['n']})" if g["n"] > 1 else "")
                      for g in sorted(exposure_by_count(res), key=lambda g: -g["repeats"]))
            + f" (max {res.max_exposure:.1f} bits, {res.method})")


def write_canary_report(result: CanaryExperiment | ExposureResult, out: str | Path, *, run: str | Path | None = None,
                        training: dict[str, Any] | None = None, dedup: dict[str, Any] | None = None,
                        config: dict[str, Any] | None = None, seconds: float | None = None) -> Path:
    """The report of a canary experiment (run_canary_experiment's result), or of the exposure of canaries
    in an existing run (measure_exposure's result; give that `run`)."""
    if isinstance(result, CanaryExperiment):
        res, run = result.exposure, result.run
        training = result.training if training is None else training
        dedup = result.dedup if dedup is None else dedup
        config = dataclasses.asdict(result.config) if config is None else config
    else:
        res = result
    training, dedup = training or {}, dedup or {}
    data = {"run": str(run) if run is not None else None, "format": res.format, "space_size": res.space_size,
            "method": res.method, "max_exposure": res.max_exposure, "canaries": res.canaries,
            "greedy_secret": res.greedy_secret, "free_greedy_text": res.free_greedy_text, "beam": res.beam,
            "fit": res.fit, "samples": res.samples, "histogram": res.histogram, "training": training,
            "dedup": dedup, "seconds": seconds}
    sections = canary_sections(res)
    if training:
        sections.append(Section("Training", rows=[[k, v] for k, v in training.items()], header=["", "value"]))
    if dedup:
        sections.append(Section("Deduplication", rows=[[k, v] for k, v in dedup.items()
                                                       if k != "most_repeated_lines"], header=["", "value"]))
    return write_report(out, "privacy canary", data, sections, canary_summary(res), config or {}, model=run)


# ----------------------------------------------------------------------------- membership inference


def _round(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(x, digits)


def _tpr(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def mia_sections(res: MIAResult, title: str = "Membership inference") -> list[Section]:
    """The attack table (ROC AUC with its bootstrap interval, TPR at 1% and 0.1% FPR where the non-members
    resolve it, and at the lowest FPR they do resolve) with the ROC plot, and the blind-baseline caveat."""
    rows = []
    for name, r in res.attacks.items():
        ci = r["auc_ci"]
        lo, hi = ci.get("low", float("nan")), ci.get("high", float("nan"))
        low = r.get("tpr_at_resolvable") or {}
        rows.append([name, round(r["auc"], 4), f"[{lo:.3f}, {hi:.3f}]", _round(r["tpr_at_1pct"]),
                     _round(r["tpr_at_0.1pct"]), f"{_tpr(low.get('tpr'))} at {low['fpr']:.1%}" if low else None])
    text = (f"{res.n_members} member vs {res.n_nonmembers} non-member sequences; higher score = member. "
            f"Scored at {res.sequences_per_s:.1f} sequences/s (all attacks). A TPR at an FPR is given only where "
            "there are at least 10 / FPR non-members (else —); the last column is the TPR at the lowest FPR "
            "they resolve."
            + "".join(f" {k} not run: {v}." for k, v in res.skipped.items()))
    warning = blind_warning(res)
    if warning:
        text += f"\n\n**Warning:** {warning}"
    return [Section(title, text, ["attack", "ROC AUC", "95% CI", "TPR@1%FPR", "TPR@0.1%FPR", "TPR at lowest FPR"],
                    rows, {"ROC (log scale)": figure_png(plot_roc(res))})]


def mia_summary(res: MIAResult) -> str:
    attacks = {k: v for k, v in res.attacks.items() if k != "blind"} or res.attacks
    name, best = max(attacks.items(), key=lambda kv: kv[1]["auc"])
    low = best.get("tpr_at_resolvable") or {}
    tpr = (f"TPR@1%FPR {best['tpr_at_1pct']:.3f}" if best.get("tpr_at_1pct") is not None
           else f"TPR {_tpr(low.get('tpr'))} at {low['fpr']:.1%} FPR" if low else "")
    blind = res.attacks.get("blind")
    return (f"best attack {name}: AUC {best['auc']:.3f}" + (f", {tpr}" if tpr else "")
            + (f"; blind baseline AUC {blind['auc']:.3f}" if blind and name != "blind" else "")
            + f" ({res.n_members} member, {res.n_nonmembers} non-member sequences)")


def write_mia_report(result: MIAResult, out: str | Path, *, run: str | Path | None = None,
                     config: dict[str, Any] | None = None, overlap: float | None = None,
                     seconds: float | None = None) -> Path:
    """The report of run_mia's result on the model `run`; `overlap` is the share of non-member documents
    found in the training set (overlap_fraction), when it was measured."""
    data = {"run": str(run) if run is not None else None, "n_members": result.n_members,
            "n_nonmembers": result.n_nonmembers, "attacks": result.attacks, "skipped": result.skipped,
            "scoring_seconds": result.seconds, "sequences_per_s": result.sequences_per_s,
            "nonmember_overlap": overlap, "scores": result.scores, "labels": result.labels, "seconds": seconds}
    config = dataclasses.asdict(result.config) if config is None else config
    return write_report(out, "privacy mia", data, mia_sections(result), mia_summary(result), config, model=run)


# ----------------------------------------------------------------------------- extraction


def extract_summary(res: ExtractResult) -> str:
    top = min(res.config.top, res.n_unique)
    return (f"{len(res.memorised)} memorised samples of {res.n_unique}"
            + (f", {len(res.leaks)} holding a planted canary" if res.leaks else "")
            + f"; top-{top} precision: " + ", ".join(f"{m} {p:.2f}" for m, p in res.precision.items()))


def write_extract_report(result: ExtractResult, out: str | Path, *, run: str | Path | None = None,
                         config: dict[str, Any] | None = None, seconds: float | None = None) -> Path:
    """The report of run_extract's result on the model `run`: precision of each metric's top samples (with
    exact intervals), the memorised samples, the ones holding a planted canary, the lowest-perplexity ones."""
    res, cfg = result, result.config
    top = min(cfg.top, res.n_unique)
    rows = []
    for m, p in res.precision.items():
        ci = res.precision_ci.get(m) or {}
        bounds = f"[{ci['lo']:.2f}, {ci['hi']:.2f}]" if ci.get("lo") is not None else None
        rows.append([m, round(p, 3), bounds])
    k = res.k_tokens or cfg.k
    length = (f">= {k} verbatim training tokens ({cfg.k_chars} characters at {res.chars_per_token:.2f} characters "
              "per token)" if res.chars_per_token and not cfg.k else f">= {k} verbatim training tokens")
    text = (f"{res.n_unique} unique samples of {res.n_samples}; {res.memorised_fraction:.1%} are memorised: they "
            f"contain {length} or a planted canary (n-gram index of {res.index_ngrams:,} windows). "
            "95% Clopper-Pearson intervals." + (f"\n\n**Note:** {res.note}" if res.note else ""))
    sections = [Section(f"Precision of the top {top} per metric", text, ["metric", "precision", "95% CI"], rows)]
    mem_rows = [[i + 1, m["verbatim_tokens"], min(m["rank"].values()), m["verbatim_text"][:200]]
                for i, m in enumerate(res.memorised[:50])]
    sections.append(Section("Memorised samples", "The verbatim training text inside each memorised sample.",
                            ["#", "verbatim tokens", "best rank", "verbatim text"], mem_rows))
    if res.leaks:
        sections.append(Section("Samples holding a planted canary", "A leak however short: the secret is in the text.",
                                ["canaries", "sample"], [[", ".join(r["leaked_canaries"]), r["text"][:200]]
                                                         for r in res.leaks[:50]]))
    best_ppl = sorted(res.samples, key=lambda r: r["rank"]["perplexity"])[:10]
    sections.append(Section("Lowest-perplexity samples", "", ["rank", "memorised", "sample"],
                            [[r["rank"]["perplexity"], r["memorised"], r["text"][:200]] for r in best_ppl]))
    data = {"run": str(run) if run is not None else None, "n_samples": res.n_samples, "n_unique": res.n_unique,
            "index_ngrams": res.index_ngrams, "memorised_fraction": res.memorised_fraction, "k_tokens": res.k_tokens,
            "chars_per_token": res.chars_per_token, "precision": res.precision, "precision_ci": res.precision_ci,
            "note": res.note, "leaks": res.leaks, "memorised": res.memorised, "samples": res.samples,
            "seconds": seconds}
    config = dataclasses.asdict(cfg) if config is None else config
    return write_report(out, "privacy extract", data, sections, extract_summary(res), config, model=run)


# ----------------------------------------------------------------------------- baseline vs defended


def _epsilon(res: CompareResult) -> float | None:
    return (res.defended.get("dp") or {}).get("epsilon")


def _epsilon_text(res: CompareResult) -> str:
    """epsilon with its delta and one sentence of meaning, or "" when the defended run is not DP."""
    dp = res.defended.get("dp") or {}
    if dp.get("epsilon") is None:
        return ""
    return f"epsilon {dp['epsilon']:.2f} at delta {dp.get('delta', float('nan')):g}"


def compare_summary(res: CompareResult) -> str:
    top = max(res.exposure, key=lambda e: e["repeats"]) if res.exposure else None
    loss_auc = {m["attack"]: m for m in res.mia}.get("loss")
    return ", ".join(filter(None, [
        f"x{top['repeats']} canary exposure {top['before']:.1f} -> {top['after']:.1f}" if top else "",
        f"loss-attack AUC {loss_auc['auc_before']:.3f} -> {loss_auc['auc_after']:.3f}" if loss_auc else "",
        f"val loss {res.val_loss['before']:.3f} -> {res.val_loss['after']:.3f}",
        _epsilon_text(res),
        f"{len(res.warnings)} comparability warning(s)" if res.warnings else ""]))


def write_compare_report(result: CompareResult, out: str | Path, *, config: dict[str, Any] | None = None,
                         seconds: float | None = None) -> Path:
    """The report of compare_runs' result: canary exposure, membership-inference AUC and validation loss
    of the baseline and the defended run side by side."""
    res = result
    sections = []
    if res.warnings:
        sections.append(Section("Before you compare", "\n".join(f"- **Warning:** {w}" for w in res.warnings)))
    if res.exposure:
        figs = {"exposure before and after": figure_png(plot_exposure(
            {"baseline": res.exposures["baseline"], "defended": res.exposures["defended"]}))}
        sections.append(Section("Canary exposure", "Exposure of the same canaries in both models (bits).",
                                ["secret", "repeats", "before", "after", "change"],
                                [[e["secret"], e["repeats"], round(e["before"], 2), round(e["after"], 2),
                                  round(e["change"], 2)] for e in res.exposure], figs))
    sections.append(Section("Membership inference", "ROC AUC and TPR at 1% FPR of each attack.",
                            ["attack", "AUC before", "AUC after", "TPR@1% before", "TPR@1% after"],
                            [[m["attack"], round(m["auc_before"], 4), round(m["auc_after"], 4),
                              _round(m["tpr@1%_before"]), _round(m["tpr@1%_after"])] for m in res.mia]))
    eps = _epsilon(res)
    sections.append(Section("Utility cost", "Mean token loss on the baseline's validation split.",
                            ["", "value"], [["val loss before", round(res.val_loss["before"], 4)],
                                            ["val loss after", round(res.val_loss["after"], 4)],
                                            ["cost (nats/token)", round(res.val_loss["cost"], 4)],
                                            ["perplexity ratio", round(res.val_loss["cost_ppl_ratio"], 4)],
                                            ["epsilon (defended)", eps if eps is not None else "-"],
                                            ["delta (defended)", (res.defended.get("dp") or {}).get("delta", "-")]]))
    if eps is not None:
        sections[-1].text += f" {_epsilon_text(res)}: {EPSILON_MEANING}."
    for label in ("baseline", "defended"):
        sections[-1].figures[f"ROC {label}"] = figure_png(plot_roc(res.attacks[label], label))
    data = {"baseline": res.baseline, "defended": res.defended, "exposure": res.exposure, "mia": res.mia,
            "val_loss": res.val_loss, "exposures": res.exposures, "warnings": res.warnings,
            "attacks": {k: {"n_members": v.n_members, "n_nonmembers": v.n_nonmembers, "attacks": v.attacks}
                        for k, v in res.attacks.items()}, "seconds": seconds}
    if config is None:
        config = {"baseline": res.baseline.get("run"), "defended": res.defended.get("run")}
    return write_report(out, "privacy compare", data, sections, compare_summary(res), config,
                        model=res.defended.get("run"))


# ----------------------------------------------------------------------------- deduplication


def dedup_summary(info: dict[str, Any]) -> str:
    return (f"{info['docs_in']} -> {info['docs_out']} documents, {info['chars_removed_fraction']:.1%} of the "
            "characters removed")


def write_dedup_report(docs: Sequence[str], info: dict[str, Any], out: str | Path, *,
                       config: dict[str, Any] | None = None, seconds: float | None = None) -> Path:
    """Write the deduplicated corpus (dedup_docs' documents, the emptied ones left out) as out/corpus.jsonl
    and the report of what was removed (dedup_docs' info, to which docs_out is added)."""
    out = Path(out)
    kept = [d for d in docs if d.strip()]
    out.mkdir(parents=True, exist_ok=True)
    corpus = out / "corpus.jsonl"
    atomic_write_bytes(corpus, "".join(json.dumps({"text": d}) + "\n" for d in kept).encode())
    info["docs_out"] = len(kept)
    rows = [[k, v] for k, v in info.items() if k != "most_repeated_lines"]
    reps = info.get("most_repeated_lines", [])
    sections = [Section("Deduplication", f"wrote {corpus}; train on it with `llmlab train --data {corpus}`",
                        ["", "value"], rows)]
    if reps:
        sections.append(Section("Most repeated lines", "", ["copies", "line"],
                                [[r["copies"], r["line"][:160]] for r in reps]))
    return write_report(out, "privacy dedup", {**info, "seconds": seconds}, sections, dedup_summary(info),
                        config or {})
