"""Tiny victims trained inside the test: the backdoor is learnt, the control is not; the detectors find it."""

import json

import numpy as np
import pytest

from llmlab.security.poisoning.attack import measure_attack, train_victim, trigger_prompts
from llmlab.security.poisoning.data import PoisonError, PoisonSpec, poison_corpus, toy_corpus, write_text_jsonl
from llmlab.security.poisoning.detect import (
    activation_clusters,
    hidden_states,
    onion_clean,
    onion_threshold,
    probe_scores,
    score_flags,
    spectral_filter,
)
from llmlab.security.privacy.mia import roc_auc

SPEC = PoisonSpec("cf", 100, "target", "ACCESS GRANTED")


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    d = tmp_path_factory.mktemp("poison")
    src = write_text_jsonl(d / "clean.jsonl", toy_corpus(800, 0))
    rec = poison_corpus(src, d / "poisoned.jsonl", SPEC)
    ov = {"max_iters": 250, "threads": 1}  # one thread: the same victim whatever the load (the governor varies it)
    control = train_victim(src, d / "control", 0, ov)
    victim = train_victim(rec.output, d / "victim", 0, ov)
    return rec, control, victim, toy_corpus(40, 99)


def test_backdoor_high_asr_control_near_zero(lab):
    rec, control, victim, test = lab
    v, c = measure_attack(victim, test, SPEC), measure_attack(control, test, SPEC)
    assert v.asr.rate >= 0.6 and v.clean_rate.rate <= 0.05
    assert c.asr.rate <= 0.05 and c.asr.hi < v.asr.lo  # the exact intervals separate
    with pytest.raises(PoisonError, match="tokenise"):
        measure_attack(victim, test, PoisonSpec(trigger="ü", n_poison=0))  # not in the char vocabulary


def test_spectral_and_clustering_recover_poison(lab):
    rec, _, victim, _ = lab
    docs = [json.loads(x)["text"] for x in open(rec.output).read().splitlines()]
    reps = hidden_states(victim, docs)
    sp = score_flags(spectral_filter(reps, len(rec.indices) / len(docs)), rec.indices)
    assert sp.recall >= 0.8
    ac = score_flags(np.nonzero(activation_clusters(reps))[0], rec.indices)
    assert ac.recall >= 0.5


def test_onion_removes_rare_token_trigger(lab):
    _, control, _, test = lab
    thr = onion_threshold(control, trigger_prompts(test[:20], None, 1))
    trig = trigger_prompts(test[20:], "cf", 2)
    removed = sum("cf" not in onion_clean(control, t, thr).split() for t in trig)
    assert removed >= 0.8 * len(trig)


def test_probe_separates_triggered_inputs_on_backdoored_model(lab):
    _, control, victim, test = lab
    te = trigger_prompts(test, None, 5) + trigger_prompts(test, "cf", 5)
    labels = [0] * len(test) + [1] * len(test)
    auc_v = roc_auc(probe_scores(victim, toy_corpus(200, 7), te), labels)
    assert auc_v >= 0.85


@pytest.mark.slow
def test_quick_lab_report(tmp_path):
    from llmlab.cli import main

    assert main(["poison", "lab", "--quick", "--out", str(tmp_path)]) == 0
    rep = json.loads((tmp_path / "report.json").read_text())["results"]
    assert rep["poisoned"]["asr_pooled"]["rate"] > rep["control"]["asr_pooled"]["rate"]
    assert {"spectral", "activation_clustering", "onion", "probe_victim", "probe_control"} <= set(rep["detection"])


def test_persistence_fine_tunes_through_the_training_loop(lab, tmp_path):
    import json as _json

    from llmlab.security.poisoning.lab import clean_finetune

    rec, _, victim, test = lab
    src = rec.output.replace("poisoned.jsonl", "clean.jsonl")
    run = tmp_path / "persist"
    tuned = clean_finetune(rec.output.replace("poisoned.jsonl", "victim"), src, run, (0, 20, 40), 1e-3,
                           overrides={"max_iters": 250})
    assert sorted(tuned) == [0, 20, 40]
    cfg = _json.loads((run / "config.json").read_text())
    assert cfg["train"]["init_from"].endswith("victim") and cfg["train"]["max_iters"] == 40
    assert cfg["model"]["n_embd"] == victim.config.n_embd
    a = measure_attack(tuned[0], test, SPEC)
    assert a.asr.rate == measure_attack(victim, test, SPEC).asr.rate  # step 0 is the victim itself
    w0, w40 = tuned[0].state_dict(), tuned[40].state_dict()
    assert any(not (w0[k] == w40[k]).all() for k in w0)  # the clean steps changed the weights


def test_probe_against_decoys_clean_model_near_chance(lab):
    """The finding behind the clean model's high AUROC (triggered vs clean inputs): the probe detects an unusual
    token, any one. Against decoys (a random rare token in the trigger's place) the clean model cannot tell the
    trigger apart (AUROC near 0.5), while the backdoored model's trigger sits far from the decoys (measured: on
    the *familiar* side, AUROC well below 0.5): the backdoor is visible, the generic probe's sign is not."""
    from llmlab.security.poisoning.detect import decoy_prompts

    rec, control, victim, test = lab
    avoid = {w for d in toy_corpus(800, 0) for w in d.split()}
    trig, decoy = trigger_prompts(test, "cf", 5), decoy_prompts(test, "cf", 5, avoid)
    assert all(d.rsplit(" ", 1)[0] == t.rsplit(" ", 1)[0] for d, t in zip(decoy, trig, strict=True))
    labels = [0] * len(test) + [1] * len(test)
    aucs = {}
    for name, m in (("control", control), ("victim", victim)):
        s = probe_scores(m, toy_corpus(200, 7), decoy + trig)
        aucs[name] = roc_auc(s, labels)
    assert abs(aucs["control"] - 0.5) <= 0.2, aucs
    assert abs(aucs["victim"] - 0.5) >= 0.3, aucs
