"""`llmlab truth lab|eval|world`: hallucination and calibration measured against known truth.

    llmlab truth lab --quick                      the lab at toy size (about a minute on 2 cores)
    llmlab truth lab --out runs/truth             the full lab: 3 seeds, corpus as written and deduplicated
    llmlab truth eval smollm2 --questions primes  a real model on garak's questions (or your JSONL file)
    llmlab truth world --out w                    only write a world: corpus, fact table, questions

Each sub-command writes report.json, report.html and report.md with the shared writer and prints a summary."""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any

from llmlab.cli.common import ProgressRenderer, console, name_list, number_list, set_pairs, verb
from llmlab.errors import LlmlabError
from llmlab.labs.truth.ask import MODES, AskConfig
from llmlab.labs.truth.detectors import LABELS
from llmlab.labs.truth.lab import CONDITIONS, LabConfig
from llmlab.labs.truth.measure import CLUSTERS, MeasureConfig
from llmlab.labs.truth.questions import GARAK_SETS
from llmlab.labs.truth.world import RELATIONS, WorldConfig

WORLD_FLAGS = ("people", "unseen", "myths", "myth_ratio", "zipf_s", "max_count", "templates")








def _world_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("the world (defaults: the full lab; --quick makes it smaller)")
    g.add_argument("--people", type=int, help="people in the corpus (default 60)")
    g.add_argument("--unseen", type=int, help="people in the world but never in the corpus (default 30)")
    g.add_argument("--myths", type=int, help="people with a planted misconception (default 8)")
    g.add_argument("--myth-ratio", type=float, help="mentions of the myth per mention of the truth (default 3)")
    g.add_argument("--zipf-s", type=float, help="exponent of the mention counts, P(c) ~ c^-s (default 1.3)")
    g.add_argument("--max-count", type=int, help="the most mentions of one fact (default 100)")
    g.add_argument("--templates", type=int, help="sentence templates per attribute, 1-5 (default 3)")
    g.add_argument("--relations", help=f"attributes, comma-separated from {', '.join(RELATIONS)} (default all)")
    g.add_argument("--world-seed", type=int, help=argparse.SUPPRESS)


def _world_config(a: argparse.Namespace, base: WorldConfig) -> WorldConfig:
    kw = {k: getattr(a, k) for k in WORLD_FLAGS if getattr(a, k, None) is not None}
    if getattr(a, "relations", None):
        kw["relations"] = name_list(a.relations, "--relations", tuple(RELATIONS))
    return dataclasses.replace(base, **kw)


def _ask_args(p: argparse.ArgumentParser, samples: int, batch: int) -> None:
    g = p.add_argument_group("asking and sampling")
    g.add_argument("--samples", type=int, default=samples,
                   help=f"sampled answers per question for SelfCheck and semantic entropy (>= 2, or 0 to skip; "
                        f"default {samples})")
    g.add_argument("--max-new-tokens", type=int, help="tokens per answer")
    g.add_argument("--temperature", type=float, default=1.0, help="temperature of the samples (default 1)")
    g.add_argument("--batch-size", type=int, default=batch,
                   help=f"rows decoded together (default {batch}; 1 = one sequence at a time)")
    g.add_argument("--cluster", choices=CLUSTERS, default="string",
                   help="semantic-entropy equivalence: string (normalised equality) or minilm (cosine)")
    g.add_argument("--cluster-threshold", type=float, default=0.9, help="minilm cosine threshold (default 0.9)")
    g.add_argument("--bootstrap", type=int, help="bootstrap resamples of the intervals")
    g.add_argument("--seed", type=int, default=0)


def _measure_config(a: argparse.Namespace, base: MeasureConfig) -> MeasureConfig:
    ask = dataclasses.replace(base.ask, samples=a.samples, temperature=a.temperature, batch_size=a.batch_size,
                              seed=a.seed, **({"max_new_tokens": a.max_new_tokens} if a.max_new_tokens else {}),
                              **({"mode": a.mode} if getattr(a, "mode", None) else {}),
                              **({"yes_no_hint": False} if getattr(a, "no_hint", False) else {}))
    cfg = dataclasses.replace(base, ask=ask, cluster=a.cluster, cluster_threshold=a.cluster_threshold, seed=a.seed,
                              **({"bootstrap": a.bootstrap} if a.bootstrap is not None else {}))
    cfg.validate()
    return cfg


def _add_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="truth_cmd", metavar="COMMAND")
    _lab_args(sub.add_parser("lab", help="train models on a corpus of known facts and measure their hallucinations",
                             description="Train small GPTs on a corpus whose facts and their frequencies are known "
                                         "(as written and deduplicated), and measure correct/wrong answers by "
                                         "frequency, hallucination against the monofact rate, calibration and "
                                         "detectors."))
    _eval_args(sub.add_parser("eval", help="ask a model questions with known answers and measure its answers",
                              description="Measure a model (a run folder, a Hugging Face folder, a .gguf file, "
                                          "smollm2, or openai:MODEL@URL) on questions whose answers are known."))
    _world_cmd_args(sub.add_parser("world", help="write a world of known facts: corpus, fact table and questions",
                                   description="Write corpus.jsonl (train then val documents), facts.jsonl (every "
                                               "fact and its count), questions.jsonl and world.json into a folder."))


def _lab_args(lab: argparse.ArgumentParser) -> None:
    lab.add_argument("--quick", action="store_true", help="the toy size: about a minute on 2 cores")
    lab.add_argument("--out", help="experiment folder (default runs/truth/lab-<time>); run again to resume")
    lab.add_argument("--seeds", help="seeds, comma-separated (default 0,1,2; quick 0,1)")
    lab.add_argument("--conditions", help=f"comma-separated from {', '.join(CONDITIONS)} (default both)")
    lab.add_argument("--dedup-mode", choices=("exact", "near", "both"), default="exact",
                     help="the privacy lab's deduplication (default exact)")
    lab.add_argument("--free-samples", type=int, help="free generations per model (default 400; quick 200)")
    lab.add_argument("--max-iters", type=int, help="training steps per model (default 1200; quick 300)")
    lab.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="any model or training field, e.g. --set n_layer=2 --set lr=3e-3")
    _world_args(lab)
    _ask_args(lab, 10, 320)


def _eval_args(ev: argparse.ArgumentParser) -> None:
    ev.add_argument("model", help="run folder, Hugging Face folder, .gguf file, smollm2, or openai:MODEL@BASE_URL")
    ev.add_argument("--questions", required=True,
                    help=f"a JSONL file ({{\"question\": ..., \"answer\": ...}} per line) or a garak set: "
                         f"{', '.join(GARAK_SETS)}")
    ev.add_argument("--limit", type=int, help="use the first N items (a balanced garak set gives up to 2N questions)")
    ev.add_argument("--mode", choices=MODES, help="auto (chat when the model has a chat template), cloze or chat")
    ev.add_argument("--no-hint", action="store_true", help="do not add \"Answer yes or no.\" to yes/no questions")
    ev.add_argument("--out", help="report folder (default runs/truth/eval-<time>)")
    ev.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key of "
                                                                    "an openai: target")
    ev.add_argument("--concurrency", type=int, default=4, help="requests in flight at once to an openai: target")
    _ask_args(ev, 10, 64)


def _world_cmd_args(wo: argparse.ArgumentParser) -> None:
    wo.add_argument("--out", required=True, help="folder to write into")
    wo.add_argument("--seed", type=int, default=0)
    wo.add_argument("--quick", action="store_true", help="the quick lab's smaller world")
    _world_args(wo)


def _out(a: argparse.Namespace, kind: str) -> Path:
    return Path(a.out) if a.out else Path("runs") / "truth" / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"


def _lab(a: argparse.Namespace) -> int:
    from llmlab.labs.truth.lab import run
    from llmlab.labs.truth.report import lab_summary, write_lab_report

    base = LabConfig.quick_config() if a.quick else LabConfig()
    train = {**base.train, **set_pairs(a.set)}
    if a.max_iters:
        train["max_iters"] = a.max_iters
    cfg = dataclasses.replace(base, world=_world_config(a, base.world), train=train, dedup_mode=a.dedup_mode,
                              measure=_measure_config(a, base.measure),
                              **({"seeds": number_list(a.seeds, "--seeds")} if a.seeds else {}),
                              **({"conditions": name_list(a.conditions, "--conditions", CONDITIONS)} if a.conditions
                                 else {}),
                              **({"free_samples": a.free_samples} if a.free_samples is not None else {}))
    cfg.validate()
    out = _out(a, "lab")
    with ProgressRenderer() as pr:
        result = run(cfg, None, pr, out)
    write_lab_report(result, out)
    c = console()
    _lab_table(c, result)
    c.print(lab_summary(result), markup=False)
    c.print(f"report: {out / 'report.html'}  ({result.seconds:.0f} s; list with: llmlab report {out})")
    return 0


def _lab_table(c: Any, r: Any) -> None:
    from rich.table import Table

    from llmlab.labs.truth.report import METRICS, NAMES, _ci

    t = Table(title="truth lab (mean over seeds, 95% interval)")
    t.add_column("")
    for cond in r.conditions:
        t.add_column(NAMES.get(cond, cond))
    if r.differences:
        t.add_column("dedup - none")
    for key, label, pct in METRICS[:7]:
        if not any(key in r.conditions[cond] for cond in r.conditions):
            continue
        row = [label, *[_ci(r.conditions[cond][key], pct=pct) if key in r.conditions[cond] else "—"
                        for cond in r.conditions]]
        if r.differences:
            row.append(_ci(r.differences[key]) if key in r.differences else "—")
        t.add_row(*row)
    c.print(t)


def _eval(a: argparse.Namespace) -> int:
    from llmlab.labs.truth.measure import run
    from llmlab.labs.truth.questions import resolve_questions
    from llmlab.labs.truth.report import _rate, measure_summary, write_measure_report

    base = MeasureConfig(ask=AskConfig(max_new_tokens=a.max_new_tokens or 24))
    cfg = _measure_config(a, dataclasses.replace(base, questions=a.questions, limit=a.limit))
    if a.limit is not None and a.limit < 1:
        raise LlmlabError(f"--limit must be at least 1, got {a.limit}")
    questions = resolve_questions(a.questions, a.limit, a.seed)  # a bad file fails before the model loads
    target = None
    if a.model.startswith("openai:"):
        from llmlab.security.targets import parse_target

        if a.concurrency < 1:
            raise LlmlabError(f"--concurrency must be at least 1, got {a.concurrency}")
        model: Any = parse_target(a.model, api_key_env=a.api_key_env, concurrency=a.concurrency)
        target = a.model
    else:
        from llmlab.interop import load

        model = load(a.model)
    out = _out(a, "eval")
    with ProgressRenderer() as pr:
        m = run(cfg, model, pr, questions, name=a.model)
    write_measure_report(m, out, model=None if target else a.model, target=target, questions=a.questions)
    c = console()
    from rich.table import Table

    t = Table(title=f"{a.model} on {a.questions}: {m.n} questions, {m.questions_per_s:.2f} questions/s")
    t.add_column("detector")
    t.add_column("AUROC (answer is wrong)")
    t.add_column("AURAC")
    for name, d in m.detectors.items():
        t.add_row(LABELS.get(name, name), f"{d['auroc']:.3f}" if d.get("measured") else "not measured",
                  f"{d['aurac']:.3f}" if "aurac" in d else "—")
    c.print(t)
    for g, d in m.groups.items():
        c.print(f"{g}: correct {_rate(d['correct'])}, abstain {_rate(d['abstain'])}", markup=False)
    c.print(measure_summary(m), markup=False)
    c.print(f"report: {out / 'report.html'}  ({m.seconds:.0f} s; list with: llmlab report {out})")
    return 0


def _world(a: argparse.Namespace) -> int:
    from llmlab.labs.truth.lab import write_corpus
    from llmlab.labs.truth.world import count_statements, generate_world, monofact_rate, write_world

    base = LabConfig.quick_config().world if a.quick else WorldConfig()
    cfg = dataclasses.replace(_world_config(a, base), seed=a.seed)
    world = generate_world(cfg)
    out = Path(a.out)
    paths = write_world(world, out)
    vf = write_corpus(out / "corpus.jsonl", world.train_docs, world.val_docs)
    mf = monofact_rate(count_statements(world.train_docs))
    c = console()
    c.print(f"{mf['statements']:,} statements of {mf['facts']:,} facts ({mf['singletons']} stated once: monofact "
            f"rate {mf['monofact_rate']:.3f}); {len(world.questions())} questions", markup=False)
    for k, p in {"corpus": out / "corpus.jsonl", **paths}.items():
        c.print(f"{k}: {p}", markup=False)
    c.print(f"train on it: `llmlab train --data {out / 'corpus.jsonl'} --tokenizer char --val-fraction {vf:.6f} "
            f"--out RUN`, then measure it: `llmlab truth eval RUN` with --questions {paths['questions']} --mode cloze",
            markup=False)
    return 0


def _run(a: argparse.Namespace) -> int:
    cmd = getattr(a, "truth_cmd", None)
    if cmd == "lab":
        return _lab(a)
    if cmd == "eval":
        return _eval(a)
    if cmd == "world":
        return _world(a)
    raise _no_command()


def _no_command() -> LlmlabError:
    return LlmlabError("give a command: lab (e.g. lab --quick), eval MODEL --questions FILE|SET, or world --out DIR; "
                       "see llmlab truth --help")


cmd_truth = verb("truth", "hallucination and calibration against known truth: the lab, eval on real models", _add_args)(
    _run)
