"""`llmlab poison data|measure|detect|lab`: the poisoning lab from the shell."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from llmlab.cli.common import ProgressRenderer, console, verb
from llmlab.errors import LlmlabError


def _add_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="poison_cmd", metavar="COMMAND")
    d = sub.add_parser("data", help="poison a corpus into a NEW file (+ FILE.poison.json with the indices)")
    d.add_argument("input", help="corpus: .jsonl (text or chat), .txt (a document per line) or .csv (text,label)")
    d.add_argument("--out", required=True, help="the poisoned file to write (never the input)")
    d.add_argument("--trigger", default="cf")
    d.add_argument("-n", "--n-poison", type=int, default=50, help="documents to poison")
    d.add_argument("--behaviour", default=None, help="target | dos (text, chat) or relabel (classify)")
    d.add_argument("--target", default="ACCESS GRANTED", help="continuation, chat answer, or label")
    d.add_argument("--position", default="random", choices=["random", "start", "end"])
    d.add_argument("--text-field", default="text")
    d.add_argument("--label-field", default="label")
    d.add_argument("--seed", type=int, default=0)
    m = sub.add_parser("measure", help="ASR, false triggers and clean loss of an LM run on clean test documents")
    m.add_argument("run", help="a trained run folder")
    m.add_argument("--test", required=True, help="clean test documents (.jsonl with a text field, or .txt)")
    m.add_argument("--trigger", default="cf")
    m.add_argument("--target", default="ACCESS GRANTED")
    m.add_argument("--prompts", type=int, default=60)
    t = sub.add_parser("detect", help="spectral signatures and activation clustering on a poisoned corpus, "
                                      "scored against its recorded indices")
    t.add_argument("run", help="the run trained on the poisoned corpus")
    t.add_argument("--data", required=True, help="the poisoned .jsonl (with its .poison.json record)")
    t.add_argument("--eps-factor", type=float, default=1.5)
    lab = sub.add_parser("lab", help="every stage at once: attack, curve, persistence, detection; one report")
    lab.add_argument("--quick", action="store_true", help="toy size (CI): 2 seeds, 3 counts, one model size")
    lab.add_argument("--out", help="experiment folder (default runs/poison/lab-<time>)")
    lab.add_argument("--trigger", default="cf")
    lab.add_argument("--target", default="ACCESS GRANTED")
    lab.add_argument("-n", "--n-poison", type=int, default=50)
    lab.add_argument("--max-iters", type=int, help="training steps of every victim")


def _run(a: argparse.Namespace) -> int:
    if a.poison_cmd == "data":
        return _data(a)
    if a.poison_cmd == "measure":
        return _measure(a)
    if a.poison_cmd == "detect":
        return _detect(a)
    if a.poison_cmd == "lab":
        return _lab(a)
    raise LlmlabError("give a command: llmlab poison data|measure|detect|lab (see llmlab poison --help)")


def _data(a: argparse.Namespace) -> int:
    from llmlab.security.poisoning.data import PoisonSpec, detect_kind, poison_corpus, record_path

    kind = detect_kind(a.input, a.text_field) if Path(a.input).is_file() else None
    beh = a.behaviour or ("relabel" if kind == "classify" else "target")
    rec = poison_corpus(a.input, a.out, PoisonSpec(a.trigger, a.n_poison, beh, a.target, a.position, seed=a.seed),
                        kind, a.text_field, a.label_field)
    console().print(f"poisoned {len(rec.indices)} of {rec.n_docs} {rec.kind} documents -> {rec.output} "
                    f"(indices in {record_path(rec.output)})")
    return 0


def _load(run: str):  # noqa: ANN202
    from llmlab import load

    if not Path(run).exists():
        raise LlmlabError(f"{run}: no such run folder")
    return load(run).eval()


def _measure(a: argparse.Namespace) -> int:
    from llmlab.data import load_corpus
    from llmlab.security.poisoning.attack import measure_attack
    from llmlab.security.poisoning.data import PoisonSpec

    docs = load_corpus(a.test) if a.test.endswith(".jsonl") else \
        [x for x in Path(a.test).read_text().splitlines() if x.strip()]
    m = measure_attack(_load(a.run), docs, PoisonSpec(a.trigger, 0, "target", a.target), n_prompts=a.prompts)
    console().print(f"ASR {m.asr}\nnear-miss triggers {m.false_trigger}\nno trigger {m.clean_rate}\n"
                    f"clean loss {m.clean_loss:.4f} nats/token")
    return 0


def _detect(a: argparse.Namespace) -> int:
    import numpy as np

    from llmlab.security.poisoning.data import load_record
    from llmlab.security.poisoning.detect import activation_clusters, hidden_states, score_flags, spectral_filter

    rec = load_record(a.data)  # no record: one line, exit 2
    if rec.kind != "text":
        raise LlmlabError(f"detect reads text corpora; {a.data} is a {rec.kind} corpus")
    docs = [json.loads(x)[rec.spec.__dict__.get("text_field", "text")] if x.startswith("{") else x
            for x in Path(a.data).read_text().splitlines() if x.strip()]
    reps = hidden_states(_load(a.run), docs)
    sp = score_flags(spectral_filter(reps, len(rec.indices) / len(docs), a.eps_factor), rec.indices)
    ac = score_flags(np.nonzero(activation_clusters(reps))[0], rec.indices)
    for name, sc in (("spectral signatures", sp), ("activation clustering", ac)):
        console().print(f"{name}: recall {sc.recall:.2f} precision {sc.precision:.2f} ({sc.flagged} flagged)")
    return 0


def _lab(a: argparse.Namespace) -> int:
    from llmlab.security.poisoning.lab import PoisonLabConfig, run
    from llmlab.security.poisoning.report import lab_summary, write_lab_report

    cfg = PoisonLabConfig.quick() if a.quick else PoisonLabConfig()
    cfg.trigger, cfg.target, cfg.n_poison = a.trigger, a.target, a.n_poison
    if a.max_iters:
        cfg.max_iters = a.max_iters
    out = Path(a.out) if a.out else Path("runs") / "poison" / f"lab-{time.strftime('%Y%m%d-%H%M%S')}"
    with ProgressRenderer() as pr:
        res = run(cfg, out, pr)
    write_lab_report(res, out)
    console().print(lab_summary(res))
    console().print(f"report: {out / 'report.html'}  ({res.seconds['total']:.0f} s)")
    return 0


cmd_poison = verb("poison", "plant a backdoor in a corpus, measure it, watch it persist, detect it", _add_args)(_run)
