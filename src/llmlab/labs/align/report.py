"""The Goodhart lab's report, built with the shared writer (report.json with every number, report.html,
report.md): proxy and gold reward against sqrt(KL) for each optimiser with Gao et al.'s fitted curves, the
gold reward's peak and fall with bootstrap intervals, the reward model's accuracy, the KL-penalty frontier
check, and answers sampled at several points of optimisation."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from llmlab.labs.align.fit import gao_curve
from llmlab.labs.align.lab import LabResult
from llmlab.security.report import Section, figure_png, fmt_seconds, write_report

NAMES = {"bon": "best-of-n", "dpo": "DPO", "rl": "REINFORCE + KL"}


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _n(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and (math.isnan(x))):
        return "—"
    if isinstance(x, float) and math.isinf(x):
        return "∞"
    return f"{x:.{digits}f}"


def _fall(f: dict[str, Any]) -> str:
    return f"{_n(f['fall'])} [{_n(f['lo'])}, {_n(f['hi'])}]"


def plot_optimiser(r: LabResult, opt: str) -> bytes:
    """Proxy (left) and gold (right) reward gain over the SFT policy against d = sqrt(KL), one line per
    setting and reward, the fitted Gao curve dashed."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colors = {"proxy": plt.cm.Reds, "control": plt.cm.Blues}
    for kind in ("proxy", "control"):
        cs = [v for v in r.curves.values() if v["optimiser"] == opt and v["reward"] == kind]
        for j, cv in enumerate(cs):
            col = colors[kind](0.45 + 0.5 * (j + 1) / (len(cs) + 1))
            d = np.sqrt(np.clip(cv["kl"], 0, None))
            for ax, key in zip(axes, ("proxy", "gold")):
                y = np.array(cv[key]) - cv[key][0]
                ax.plot(d, y, "o-", color=col, ms=3, label=f"{kind}: {cv['setting']}")
        fit = r.fits.get(f"{opt}/{kind}")
        if fit and fit["d"]:
            dd = np.linspace(0, max(fit["d"]) * 1.05, 60)
            for ax, key in zip(axes, ("proxy", "gold")):
                g = fit[key]
                if g["alpha"] == g["alpha"]:
                    ax.plot(dd, gao_curve(dd, g["alpha"], g["beta"], fit["form"]), "--", color=colors[kind](0.9),
                            lw=1, label=f"{kind}: fit ({'d(α-βd)' if fit['form'] == 'bon' else 'd(α-β log d)'})")
    for ax, key in zip(axes, ("proxy reward", "gold reward")):
        ax.axhline(0, color="#999", lw=0.8)
        ax.set_xlabel("d = sqrt(KL to the SFT policy) (nats^½)")
        ax.set_ylabel(f"{key} − SFT policy's")
        ax.set_title(f"{NAMES[opt]}: {key}", fontsize=10)
    axes[1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    return figure_png(fig)


def plot_features(r: LabResult) -> bytes:
    """Answer length and the spurious feature's rate against sqrt(KL), proxy runs (solid) and control (dashed)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    cols = {"bon": "tab:purple", "dpo": "tab:green", "rl": "tab:orange"}
    seen: set[str] = set()
    for cv in r.curves.values():
        d = np.sqrt(np.clip(cv["kl"], 0, None))
        lab = f"{NAMES[cv['optimiser']]} ({cv['reward']})"
        for ax, key in zip(axes, ("length", "spurious")):
            ax.plot(d, cv[key], "-" if cv["reward"] == "proxy" else "--", color=cols[cv["optimiser"]], lw=1,
                    marker=".", label=lab if lab not in seen and ax is axes[0] else None)
        seen.add(lab)
    axes[0].set_ylabel("answer length (characters)")
    axes[1].set_ylabel('answers ending with "!"')
    for ax in axes:
        ax.set_xlabel("d = sqrt(KL)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return figure_png(fig)


def lab_summary(r: LabResult) -> str:
    """A few lines: for each optimiser, how far the proxy rose and the gold fell after its peak, with the control."""
    lines = []
    for opt in ("bon", "dpo", "rl"):
        for kind in ("proxy", "control"):
            cs = [v for v in r.curves.values() if v["optimiser"] == opt and v["reward"] == kind]
            if not cs:
                continue
            cv = max(cs, key=lambda v: v["kl"][-1])  # the setting that moved furthest
            f = cv["gold_fall"]
            lines.append(f"- **{NAMES[opt]}** against the {'proxy' if kind == 'proxy' else 'gold reward (control)'} "
                         f"({cv['setting']}): proxy {_n(cv['proxy'][0])} → {_n(cv['proxy'][-1])}, gold "
                         f"{_n(cv['gold'][0])} → peak {_n(f['peak'])} at KL {_n(cv['kl'][f['peak_index']], 2)} → "
                         f"{_n(cv['gold'][-1])} at KL {_n(cv['kl'][-1], 2)}; fall after the peak {_fall(f)}; "
                         f'"!" rate {_n(cv["spurious"][0], 2)} → {_n(cv["spurious"][-1], 2)}')
    rm = r.reward_models
    accs = [v["heldout_accuracy"] for v in rm.values() if v.get("heldout_accuracy") is not None]
    agree = [v["gold_agreement"]["rate"] for v in rm.values()]
    excl = [v["prefers_exclaimed"]["rate"] for v in rm.values()]
    acc = _n(float(np.mean(accs)) if accs else None)
    head = (f"Proxy reward model (mean over {len(rm)} seeds): held-out accuracy {acc}, "
            f"agreement with the gold reward on clean pairs {_n(float(np.mean(agree)))}, prefers an answer exclaimed "
            f'("!!!") over the same answer plain {_n(float(np.mean(excl)))} of the time.')
    return head + "\n\n" + "\n".join(lines)


def write_lab_report(r: LabResult, out: str | Path) -> Path:
    """report.json / .html / .md of a Goodhart lab result."""
    sections = []
    figs = {f"{NAMES[o]}: proxy and gold reward against sqrt(KL)": plot_optimiser(r, o)
            for o in ("bon", "dpo", "rl") if any(v["optimiser"] == o for v in r.curves.values())}
    sections.append(Section("Proxy and gold reward against KL", text=(
        "Each point is a mean over seeds × evaluation prompts of the gain over the SFT policy. Red: optimised "
        "against the proxy reward model; blue: against the gold reward itself (the control). Dashed: the forms "
        "of Gao, Schulman & Hilton (2022) fitted through the origin. Best-of-n's KL is exact on the pool of "
        "samples (ties counted; the analytic log n − (n−1)/n is in the table, an upper bound per Beirami et al. "
        "2024); DPO's and RL's are Monte-Carlo estimates on samples of the tuned policy."), figures=figs))
    sections.append(Section("How the answers change", figures={"length and spurious feature": plot_features(r)}))
    rows = []
    for cv in r.curves.values():
        f = cv["gold_fall"]
        rows.append([NAMES[cv["optimiser"]], cv["reward"], cv["setting"], cv["proxy"][0], cv["proxy"][-1],
                     cv["gold"][0], f["peak"], cv["kl"][f["peak_index"]], cv["gold"][-1], _fall(f), cv["kl"][-1],
                     cv["length"][-1], cv["spurious"][-1], cv["correct"][-1]])
    sections.append(Section("Curves: the gold reward's peak and fall", text=(
        "fall = gold at its peak − gold at the last point, with a 95% percentile bootstrap interval over seeds × "
        "prompts (the peak chosen again in each resample, so the fall is never negative; a fall whose interval "
        "starts at 0 is within noise)."), header=["optimiser", "reward", "setting", "proxy start", "proxy end",
                                                   "gold start", "gold peak", "KL at peak", "gold end",
                                                   "fall [95% CI]", "KL end", "length end", '"!" end', "correct end"],
        rows=rows))
    frows = []
    for key, f in r.fits.items():
        for what in ("gold", "proxy"):
            g = f[what]
            frows.append([key, what, f["form"], g["alpha"], g["beta"], g["r2"], g["peak_d"],
                          g["peak_d"] ** 2 if math.isfinite(g["peak_d"]) else float("inf"), g["peak_r"], g["n"]])
        if "gold_analytic_kl" in f:
            g = f["gold_analytic_kl"]
            frows.append([key, "gold (analytic KL)", f["form"], g["alpha"], g["beta"], g["r2"], g["peak_d"],
                          g["peak_d"] ** 2 if math.isfinite(g["peak_d"]) else float("inf"), g["peak_r"], g["n"]])
    sections.append(Section("Gao et al. fits", text=(
        "best-of-n: R(d) = d(α − βd), peak at d* = α/(2β); RL (used for DPO too): R(d) = d(α − β log d), peak at "
        "d* = exp(α/β − 1). R is the gain over the SFT policy, d = sqrt(KL)."),
        header=["optimiser/reward", "reward fitted", "form", "α", "β", "R²", "peak d*", "peak KL", "peak R", "points"],
        rows=frows))
    fr = r.frontier
    if fr.get("measured"):
        sections.append(Section("Does the KL penalty move the frontier? (RL against the proxy)", text=(
            "Gao et al. (2022) found that a KL penalty does not change the gold reward reached at a given KL, only "
            "how far a run gets. Residuals of each KL coefficient's points from one RL-form curve fitted to all of "
            "them: an interval covering 0 agrees with the claim."),
            header=["setting", "mean residual", "95% CI", "points"],
            rows=[[k, v["mean_residual"], f"[{_n(v['lo'])}, {_n(v['hi'])}]", v["n"]]
                  for k, v in fr["by_setting"].items()]))
    rm_rows = [[s, v.get("heldout_accuracy"), v.get("heldout_pairs"),
                f"{_n(v['gold_agreement']['rate'])} [{_n(v['gold_agreement']['lo'])}, {_n(v['gold_agreement']['hi'])}]",
                f"{_n(v['prefers_exclaimed']['rate'])} [{_n(v['prefers_exclaimed']['lo'])}, "
                f"{_n(v['prefers_exclaimed']['hi'])}]"] for s, v in r.reward_models.items()]
    sections.append(Section("The proxy reward model", text=(
        "Held-out accuracy: on pairs labelled like its training pairs (label noise and the planted \"!\"). "
        "Agreement with gold: on clean pairs labelled by the gold reward alone. Prefers exclaimed: how often it "
        "scores an answer ending \"!!!\" above the same answer ending with a full stop (the gold reward prefers "
        "the full stop every time). Exact 95% intervals."),
        header=["seed", "held-out accuracy", "held-out pairs", "agreement with gold", "prefers exclaimed"],
        rows=rm_rows))
    srows = []
    for s in r.samples:
        for p, a in zip(s["prompts"][:2], s["answers"][:2]):
            srows.append([NAMES[s["optimiser"]], s["reward"], s["seed"], s["point"], s["kl"], s["gold"],
                          p.replace("\n", " "), a])
    sections.append(Section("Answers at several points of optimisation", text=(
        "The evidence of the hacking: against the proxy, answers drift toward what the reward model over-rewards "
        "(exclaimed, longer) while the gold reward, which counts every extra character, falls."),
        header=["optimiser", "reward", "seed", "point", "KL", "gold (mean)", "prompt", "answer"], rows=srows))
    trows = [[k, v] for k, v in r.throughput.items()] + [[f"time: {k}", fmt_seconds(v)] for k, v in r.timings.items()]
    sections.append(Section("Throughput and time", header=["what", "value"], rows=trows,
                            text=f"Total {fmt_seconds(r.seconds)}."))
    return write_report(out, "align goodhart", {"reward_models": r.reward_models, "sft": r.sft, "curves": r.curves,
                                                "fits": r.fits, "frontier": r.frontier, "points": r.points,
                                                "samples": r.samples, "throughput": r.throughput,
                                                "seconds": r.seconds, "timings": r.timings},
                        sections, lab_summary(r), config=r.config)
