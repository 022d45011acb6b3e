"""The poisoning lab's report through the shared writer: summary, attack table, the poison-count curve and
the persistence curve (plots and tables), the detection table, triggered and clean generations side by side."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from llmlab.security.poisoning.lab import PoisonLabResult
from llmlab.security.report import Section, figure_png, write_report


def _r(d: dict[str, Any]) -> str:
    if not d.get("n"):
        return "not measured"
    return f"{d['k']}/{d['n']} = {d['rate']:.0%} [{d['lo']:.0%}, {d['hi']:.0%}]"


def lab_summary(r: PoisonLabResult) -> str:
    c, p = r.control, r.poisoned
    return (f"Trigger `{r.config['trigger']}` -> `{r.config['target']}` in {r.config['n_poison']} of "
            f"{r.config['n_docs']} documents. ASR poisoned {_r(p['asr_pooled'])} vs control {_r(c['asr_pooled'])} "
            f"({p['seeds']} seeds, exact 95% intervals); clean loss {p['clean_loss_mean']:.3f} vs "
            f"{c['clean_loss_mean']:.3f} nats/char; false triggers {_r(p['false_trigger_pooled'])}.")


def write_lab_report(r: PoisonLabResult, out: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [[name, _r(s["asr_pooled"]), f"{s['asr_seed_mean']:.2f}", str(s["asr_bootstrap_ci"]),
             _r(s["false_trigger_pooled"]), _r(s["clean_rate_pooled"]), f"{s['clean_loss_mean']:.3f}"]
            for name, s in (("control (unpoisoned)", r.control), ("poisoned", r.poisoned))]
    attack = Section("Attack", "ASR: greedy continuation of triggered clean prompts starts with the target.",
                     ["model", "ASR pooled", "ASR seed mean", "ASR bootstrap CI", "near-miss triggers",
                      "no trigger", "clean loss"], rows)
    fig, ax = plt.subplots(figsize=(6, 4))
    groups: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for pt in r.curve:
        groups.setdefault((pt["corpus_docs"], pt["n_embd"]), []).append(pt)
    for (n, e), pts in groups.items():
        ax.plot([p["n_poison"] for p in pts], [p["asr"]["rate"] for p in pts], "o-", label=f"{n} docs, n_embd {e}")
    ax.set_xlabel("poisoned documents (count)")
    ax.set_ylabel("ASR")
    ax.legend()
    curve = Section("Poison-count curve", "ASR against the number of poisoned documents (seed 0).",
                    ["corpus docs", "n_embd", "poisoned", "fraction", "ASR", "clean loss"],
                    [[p["corpus_docs"], p["n_embd"], p["n_poison"], f"{p['fraction']:.3f}", _r(p["asr"]),
                      f"{p['clean_loss']:.3f}"] for p in r.curve], {"poison-count curve": figure_png(fig)})
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([p["clean_steps"] for p in r.persistence], [p["asr"]["rate"] for p in r.persistence], "o-")
    ax.set_xlabel("clean fine-tuning steps")
    ax.set_ylabel("ASR")
    persist = Section("Persistence", "The seed-0 poisoned model fine-tuned on clean data.",
                      ["clean steps", "ASR", "clean loss"],
                      [[p["clean_steps"], _r(p["asr"]), f"{p['clean_loss']:.3f}"] for p in r.persistence],
                      {"persistence": figure_png(fig)})
    d = r.detection
    det_rows = [[k, v["flagged"], v["true_poison"], f"{v['recall']:.2f}", f"{v['precision']:.2f}"]
                for k, v in d.items() if k in ("spectral", "activation_clustering", "dedup")]
    det = Section("Detection: training-set filters", f"Retrained after spectral filtering: ASR "
                  f"{_r(d['retrained_spectral']['asr'])}, clean loss {d['retrained_spectral']['clean_loss']:.3f}.",
                  ["filter", "flagged", "poisoned", "recall", "precision"], det_rows)
    o, nan = d["onion"], float("nan")
    test = Section("Detection: test time",
                   f"ONION (threshold {o['threshold']:.3g} from clean validation prompts, control LM as scorer): "
                   f"trigger removed {_r(o['trigger_removed'])}, clean words removed {_r(o['clean_words_removed'])}, "
                   f"ASR {_r(o['asr_before'])} -> {_r(o['asr_after'])}. The probe (logistic regression on the "
                   "middle block's last-token activation, trained on generic contrast pairs only): triggered inputs "
                   "against clean ones, and against decoys (a random rare token in the trigger's place). A probe "
                   "that detects the backdoor, not just an unusual token, separates triggered from decoy inputs "
                   "on the victim and not on the control.",
                   ["probe on", "AUROC vs clean", "TPR at 1% FPR vs clean", "AUROC vs decoys",
                    "TPR at 1% FPR vs decoys", "negatives"],
                   [[k, f"{p['auroc']:.3f}", f"{p['tpr_at_1pct_fpr']:.2f}", f"{p.get('auroc_vs_decoy', nan):.3f}",
                     f"{p.get('tpr_at_1pct_fpr_vs_decoy', nan):.2f}", p["negatives"]]
                    for k, p in ((k, d[f"probe_{k}"]) for k in ("victim", "control"))])
    other_rows = []
    for kind, what in (("chat", "chat model (changed answer)"), ("classify", "classifier (BadNets relabel)")):
        o = r.other_kinds.get(kind)
        if not o:
            continue
        for name in ("control", "poisoned"):
            m = o[name]
            other_rows.append([f"{what}: {name}", _r(m["asr"]), _r(m["false_trigger"]), _r(m["clean_rate"]),
                               _r(m.get("clean_accuracy", {})), f"{m['clean_loss']:.3f}"])
    other = Section("Chat data and a classifier",
                    "The same measure on the other corpus kinds (seed 0, each next to an unpoisoned control). "
                    "Chat: trigger in the user turn, ASR = the greedy reply starts with the target; clean accuracy "
                    "= the clean reply contains the right answer. Classifier: ASR over texts whose label is not the "
                    "target; clean accuracy is CACC; clean loss is cross-entropy.",
                    ["model", "ASR", "near-miss triggers", "no trigger", "clean accuracy", "clean loss"], other_rows)
    ex = Section("Generations", "", ["clean prompt", "clean output", "triggered prompt", "triggered output"],
                 [[e["clean_prompt"], e["clean_output"], e["triggered_prompt"], e["triggered_output"]]
                  for e in r.examples])
    return write_report(out, "poison lab", asdict(r), [attack, curve, persist, det, test, other, ex], lab_summary(r),
                        config=r.config)
