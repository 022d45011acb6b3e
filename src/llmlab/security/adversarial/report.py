"""The adversarial-suffix lab's report through the shared writer: loss curve per step, best suffix per step,
ASR with exact intervals per model and per defence, the transfer matrix, the filters' thresholds and false-
positive rates, wall time per step, and attempts.jsonl with every judged attempt."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from llmlab.checkpoint import atomic_write_bytes
from llmlab.security.adversarial.lab import AttackResult
from llmlab.security.report import Section, figure_png, write_report


def _r(d: dict[str, Any]) -> str:
    if not d.get("n"):
        return "not measured"
    return f"{d['k']}/{d['n']} = {d['rate']:.0%} [{d['lo']:.0%}, {d['hi']:.0%}]"


def _short(s: str, n: int = 80) -> str:
    s = s.replace("\n", "\\n")
    return s if len(s) <= n else s[: n - 1] + "…"


def summary(r: AttackResult) -> str:
    """A few lines: the suffix ASR against the no-suffix control on each model and target."""
    lines = []
    for row in r.asr:
        if row["defence"] == "none" and row["condition"] in ("gcg", "-"):
            what = "no suffix (control)" if row["condition"] == "-" else f"GCG suffix from {row['source']}"
            lines.append(f"- {row['evaluated_on']}: {what}: success {_r(row['success'])}, "
                         f"no refusal {_r(row['jailbroken'])}")
    steps = [s for run in r.runs for s in run["steps"]]
    per = statistics.median(s["seconds"] for s in steps) if steps else float("nan")
    return ("GCG adversarial suffixes (Zou et al. 2023). Success = the generation starts with the target and has "
            "no refusal string; exact 95% intervals.\n\n" + "\n".join(lines) +
            f"\n\nMedian wall time per step {per:.2f} s over {len(steps)} steps.")


def write_attack_report(r: AttackResult, out: str | Path, model: str | None = None) -> Path:
    """report.json/html/md and attempts.jsonl into `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "attempts.jsonl",
                       "".join(json.dumps(a, ensure_ascii=False) + "\n" for a in r.attempts).encode())
    sections = []
    fig, ax = plt.subplots(figsize=(7, 4))
    for run in r.runs:
        xs = [0] + [s["step"] for s in run["steps"]]
        ys = [run["init_loss"]] + [s["loss"] for s in run["steps"]]
        label = f"{run['condition']} seed {run['seed']} goals {','.join(str(i + 1) for i in run['goal_indices'])}"
        ax.plot(xs, ys, label=label[:40])
    ax.set_xlabel("step")
    ax.set_ylabel("best loss (target NLL per token)")
    if len(r.runs) <= 10:
        ax.legend(fontsize=7)
    rows = [[run["source"], run["condition"], run["seed"], ",".join(str(i + 1) for i in run["goal_indices"]),
             f"{run['init_loss']:.3f}", f"{run['loss']:.3f}", run["matched_step"] if run["matched_step"] is not None
             else "—", len(run["steps"]), f"{run['seconds']:.1f}", _short(run["suffix"], 60)] for run in r.runs]
    sections.append(Section("Optimisation", "Best loss after each step (the loss the buffer's best suffix has; "
                            "mean NLL of the target tokens, plus the perplexity term for the adaptive attack).",
                            ["source", "condition", "seed", "goals", "initial loss", "final loss",
                             "first exact match (step)", "steps", "seconds", "suffix"], rows,
                            {"loss curve": figure_png(fig)}))
    asr_rows = [[a["evaluated_on"], a["source"], a["condition"], a["defence"], _r(a["success"]),
                 _r(a["jailbroken"]), _r(a["target_match"])] for a in r.asr]
    sections.append(Section("Attack success rate", "Per model or target, suffix source, condition (`-`: no "
                            "suffix, the negative control; gcg; adaptive: GCG with a perplexity term) and defence.",
                            ["evaluated on", "suffix from", "condition", "defence", "success", "no refusal",
                             "target match"], asr_rows))
    targets = sorted({t["target"] for t in r.transfer})
    sources = sorted({t["source"] for t in r.transfer})
    cell = {(t["source"], t["target"]): _r(t["success"]) for t in r.transfer}
    sections.append(Section("Transfer matrix", "Success of the GCG suffixes (no defence) found on each source "
                            "(rows) when sent to each model or target (columns); `none` is the no-suffix control.",
                            ["source \\ target", *targets],
                            [[s, *(cell.get((s, t), "—") for t in targets)] for s in sources]))
    if r.filters:
        frows = [[d, f"{f['threshold']:.3f}", f["window"] or "whole prompt", f["calibration_prompts"],
                  f"{f['target_fpr']:.0%}", _r(f["heldout_fpr"]), _r(f.get("attack_detection", {}))]
                 for d, f in r.filters.items()]
        sections.append(Section("Perplexity filters", "Thresholds set on half of the benign prompts for the "
                                "target false-positive rate; the false-positive rate measured on the other half; "
                                "detection = attack prompts (with a suffix) flagged.",
                                ["filter", "threshold (log-ppl)", "window", "calibration prompts", "target FPR",
                                 "held-out FPR", "attack prompts flagged"], frows))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for run in r.runs:
        ax.plot([s["step"] for s in run["steps"]], [s["seconds"] for s in run["steps"]])
    ax.set_xlabel("step")
    ax.set_ylabel("seconds")
    trows = []
    for run in r.runs:
        ts = [s["seconds"] for s in run["steps"]]
        if ts:
            trows.append([run["source"], run["condition"], run["seed"], len(ts), f"{statistics.median(ts):.3f}",
                          f"{statistics.fmean(ts):.3f}", f"{sum(s['kept'] for s in run['steps']) / len(ts):.1f}"])
    sections.append(Section("Wall time per step", "", ["source", "condition", "seed", "steps", "median s/step",
                                                       "mean s/step", "candidates kept per step (mean)"], trows,
                            {"seconds per step": figure_png(fig)}))
    plt.close("all")
    first = r.runs[0] if r.runs else None
    if first:
        srows = [[s["step"], f"{s.get('candidate_loss', float('nan')):.3f}", f"{s['loss']:.3f}", s["kept"],
                  "yes" if s["matched"] else "", _short(s["suffix"], 70)] for s in first["steps"]]
        sections.append(Section("Best suffix per step (first run)", "Every step of the first optimisation run.",
                                ["step", "step's best candidate", "best loss", "candidates kept", "exact match",
                                 "suffix"], srows))
    arows = [[a["evaluated_on"], a["condition"], a["defence"], a["goal_index"] + 1, _short(a["suffix"], 30),
              _short(a["generation"], 60), "yes" if a["success"] else ""] for a in r.attempts[:60]]
    sections.append(Section("Attempts", f"{len(r.attempts)} judged attempts in attempts.jsonl (the first 60 here).",
                            ["evaluated on", "condition", "defence", "goal", "suffix", "generation", "success"],
                            arows))
    data = {"runs": r.runs, "asr": r.asr, "transfer": r.transfer, "filters": r.filters, "seconds": r.seconds,
            "n_attempts": len(r.attempts)}
    return write_report(out, "attack gcg", data, sections, summary(r), config=r.config, model=model)
