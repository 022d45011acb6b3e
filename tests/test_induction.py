"""The induction-head experiment: the measures on hand-built attention, and the training run (slow)."""

from __future__ import annotations

import pytest
import torch

from llmlab.inspect import evals, induction


def test_prefix_matching_of_a_perfect_induction_pattern() -> None:
    x, lengths, starts = induction.repeated_batch(4, 50, 16, torch.Generator().manual_seed(0))
    B, T = x.shape
    w = torch.zeros(B, 2, T, T)
    w[:, :, torch.arange(T), 0] = 1.0  # head 0 and 1 look at the first token
    _, second = induction._second_copy(lengths, starts, T)
    for b, i in second.nonzero().tolist():
        w[b, 1, i] = 0
        w[b, 1, i, i - int(lengths[b]) + 1] = 1.0  # head 1: a perfect induction head
    s = induction.prefix_matching(w, lengths, starts)
    assert s[1] == 1.0 and s[0] < 0.1
    assert 0 < induction.chance_prefix(lengths, starts, T) < 0.2


def test_copying_score_of_an_identity_ov_circuit() -> None:
    m = induction.AttentionOnly(vocab=16, block=8, n_layer=1, n_embd=16, n_head=1)
    with torch.no_grad():
        C = 16
        m.attn[0].qkv.weight[2 * C:] = torch.eye(C)
        m.attn[0].proj.weight.copy_(torch.eye(C))
        m.wte.weight.copy_(torch.eye(16))
        m.lm_head.weight.copy_(torch.eye(16))
    assert induction.copying_scores(m)[0, 0] == pytest.approx(1.0)


def test_checkpoint_evals_on_an_llmlab_gpt() -> None:
    from llmlab.config import ModelConfig
    from llmlab.models.gpt import GPT

    m = GPT(ModelConfig(vocab_size=40, n_layer=2, n_head=2, n_embd=32, block_size=64))
    got = evals.run_checkpoint_evals(evals.resolve_evals("induction,attention_entropy"), m)
    assert {"induction/icl_score", "induction/prefix_matching_L1", "attention_entropy/attention_entropy_L0"} <= set(got)
    with pytest.raises(Exception, match="unknown checkpoint evaluation nope"):
        evals.resolve_evals("induction,nope")


@pytest.mark.slow
@pytest.mark.xfail(reason="measured 2026-12-01: the 2-layer model's in-context score drops at steps 1200-1600 (a phase "
                   "change the 1-layer control lacks) but no layer-2 head attends to the token after the earlier "
                   "occurrence (best prefix score 0.064, chance 0.047); see README 'Emergence'", strict=False)
def test_induction_heads_form_in_two_layers_not_one(tmp_path) -> None:  # noqa: ANN001
    res = induction.run_experiment(induction.InductionConfig(max_iters=2000, lr=3e-3))
    (tmp_path / "induction.html").write_text(induction.induction_page(res))
    chance = res["chance_prefix"]
    two = max(res["two_layer"]["checkpoints"][-1]["prefix"][1])
    one = max(res["one_layer"]["checkpoints"][-1]["prefix"][0])
    assert two > 0.5 > 5 * chance
    assert one < 0.3
    assert res["two_layer"]["checkpoints"][-1]["icl"] < res["one_layer"]["checkpoints"][-1]["icl"]


def test_train_runs_evaluations_on_every_checkpoint(tmp_path, capsys) -> None:  # noqa: ANN001
    import json

    from llmlab.cli import main

    corpus = tmp_path / "c.txt"
    corpus.write_text("the cat sat on the mat. " * 200)
    run = tmp_path / "run"
    flags = ("--n-layer 2 --n-head 2 --n-embd 32 --block-size 32 --batch-size 4 --max-iters 20 --checkpoint-every 10 "
             "--eval-interval 100 --num-samples 0 --eval-every-checkpoint induction,attention_entropy").split()
    rc = main(["train", "--data", str(corpus), "--out", str(run), *flags])
    assert rc == 0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    ev = [r for r in rows if r["kind"] == "checkpoint_eval"]
    assert [r["step"] for r in ev] == [0, 10, 20]  # the step-0 checkpoint, one in the middle, the final one
    assert all("induction/prefix_matching_L1" in r and "attention_entropy/attention_entropy_L0" in r for r in ev)
    assert ev[0]["induction/icl_score"] != ev[-1]["induction/icl_score"]  # it tracks the changing model
    assert (run / "checkpoint_evals.png").stat().st_size > 1000
    cap = capsys.readouterr()
    out = " ".join((cap.out + cap.err).split())  # progress goes to stderr; the console wraps long lines
    assert "checkpoint 10: induction/icl_score" in out
    assert main(["train", "--data", str(corpus), "--out", str(tmp_path / "r2"), "--max-iters", "2",
                 "--eval-every-checkpoint", "nope"]) == 2
    assert not (tmp_path / "r2").exists()
