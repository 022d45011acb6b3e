"""Alignment (issue 20): the losses against TRL's on fixed tensors, the objectives through the one training
loop on tiny models, best-of-n, Gao et al.'s fits, and bad input on the command line."""

from __future__ import annotations

import collections
import importlib
import json
import math
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llmlab.cli import main
from llmlab.labs.align.fit import bon_distribution, bon_kl_analytic, fall_statistic, fit_gao, gao_curve, gao_peak
from llmlab.labs.align.task import TaskConfig, gold_reward, pair_rows, sft_rows
from llmlab.labs.align.tune import best_of_n, train_dpo, train_reward_model, train_sft
from llmlab.train.preference import (
    bradley_terry_loss,
    dpo_loss,
    gae,
    load_reward_model,
    ppo_losses,
    preference_metrics,
    read_pairs,
    response_batch,
    sequence_logps,
)

TINY = dict(n_layer=1, n_head=2, n_embd=32, block_size=96, max_iters=80, eval_interval=80, batch_size=16,
            lr=3e-3, min_lr=3e-4, warmup_iters=5, threads=1)


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny SFT policy on the Goodhart task's demonstrations, and a reward model trained from it."""
    d = tmp_path_factory.mktemp("align")
    cfg = TaskConfig()
    sft = _jsonl(d / "sft.jsonl", sft_rows(400, 0, cfg))
    pairs = _jsonl(d / "pairs.jsonl", [{k: r[k] for k in ("prompt", "chosen", "rejected")}
                                      for r in pair_rows(300, 1, cfg)])
    train_sft(sft, d / "sft", overrides=TINY)
    train_reward_model(pairs, d / "rm", base=d / "sft", overrides={**TINY, "max_iters": 60, "eval_interval": 60})
    return {"dir": d, "sft": d / "sft", "rm": d / "rm", "pairs": pairs, "sft_data": sft}


# ----------------------------------------------------------------------------- losses


def _fixed() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return tuple(-torch.rand(8, generator=g) * 20 for _ in range(4))


def test_bradley_terry_is_the_formula() -> None:
    rc, rr = torch.tensor([1.0, 0.0, -2.0]), torch.tensor([0.0, 0.5, -1.0])
    want = -np.log(1 / (1 + np.exp(-(np.array([1.0, -0.5, -1.0]) - 0.3)))).mean()
    assert bradley_terry_loss(rc, rr, 0.3).item() == pytest.approx(want, rel=1e-6)
    assert bradley_terry_loss(rc, rr).item() == pytest.approx(-F.logsigmoid(rc - rr).mean().item())


def test_dpo_family_formulas() -> None:
    pc, pr, rc, rr = _fixed()
    h = (pc - pr) - (rc - rr)
    b = 0.2
    losses, cr, rj = dpo_loss(pc, pr, rc, rr, b, "sigmoid", 0.1)
    want = -(0.9 * torch.log(torch.sigmoid(b * h)) + 0.1 * torch.log(torch.sigmoid(-b * h)))
    assert torch.allclose(losses, want, atol=1e-5)
    assert torch.allclose(dpo_loss(pc, pr, rc, rr, b, "ipo")[0], (h - 1 / (2 * b)) ** 2)
    assert torch.allclose(dpo_loss(pc, pr, rc, rr, b, "hinge")[0], torch.clamp(1 - b * h, min=0))
    assert torch.allclose(cr, b * (pc - rc)) and torch.allclose(rj, b * (pr - rr))
    m = preference_metrics(cr, rj)
    assert m["rewards/margins"] == pytest.approx((cr - rj).mean().item())
    assert m["rewards/accuracies"] == pytest.approx((cr > rj).float().mean().item())


def _trl(name: str):  # noqa: ANN202
    """A TRL trainer class (TRL is the dev-only reference: the test skips without it)."""
    pytest.importorskip("trl", reason="TRL is the dev-only reference: pip install -e '.[dev]'")
    import trl

    try:
        return getattr(importlib.import_module("trl"), name)
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"TRL {trl.__version__} does not import here: {e}")


def _fake_trainer(**kw: object) -> types.SimpleNamespace:
    """What TRL's trainers read from themselves in their loss code (TRL 1.16), nothing else."""
    acc = types.SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)
    return types.SimpleNamespace(model=types.SimpleNamespace(training=True), accelerator=acc, aux_loss_enabled=False,
                                 ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
                                 loss_weights=[1.0], use_weighting=False, _total_train_tokens=0, _tp_size=1,
                                 _metrics=collections.defaultdict(lambda: collections.defaultdict(list)), **kw)


@pytest.mark.parametrize(("loss_type", "eps"), [("sigmoid", 0.0), ("robust", 0.2), ("ipo", 0.0), ("hinge", 0.0)])
def test_dpo_losses_equal_trl(loss_type: str, eps: float) -> None:
    """TRL's DPOTrainer loss code on the same per-token log-probabilities (its fused head's outputs faked)."""
    dpo_trainer = _trl("DPOTrainer")
    g = torch.Generator().manual_seed(3)
    B, T = 6, 9
    mask = torch.zeros(2 * B, T, dtype=torch.long)
    for i in range(2 * B):
        mask[i, 3:3 + 2 + i % 5] = 1  # prompt of 3 tokens, completions of 2..6
    tok_lp = -torch.rand(2 * B, T - 1, generator=g) * 3 * mask[:, 1:]
    ref = -torch.rand(2 * B, generator=g) * 10
    beta = 0.3
    out = types.SimpleNamespace(log_probs=tok_lp, entropy=torch.zeros(2 * B, T - 1),
                                mean_logits=torch.zeros(2 * B, T - 1), is_top1=torch.zeros(2 * B, T - 1, dtype=bool))
    fake = _fake_trainer(beta=beta, label_smoothing=eps, loss_types=[loss_type])
    inputs = {"input_ids": torch.zeros(2 * B, T, dtype=torch.long), "attention_mask": torch.ones(2 * B, T),
              "completion_mask": mask, "ref_chosen_logps": ref[:B], "ref_rejected_logps": ref[B:]}
    want = dpo_trainer._compute_loss(fake, lambda **kw: out, inputs, False)
    lp = tok_lp.sum(1)
    if loss_type == "ipo":  # IPO on log-probabilities averaged over the completion, as TRL (and we) do
        n = mask.sum(1).float()
        losses, rc, rr = dpo_loss(lp[:B] / n[:B], lp[B:] / n[B:], ref[:B] / n[:B], ref[B:] / n[B:], beta, "ipo")
        rc, rr = beta * (lp[:B] - ref[:B]), beta * (lp[B:] - ref[B:])
    else:
        losses, rc, rr = dpo_loss(lp[:B], lp[B:], ref[:B], ref[B:], beta, loss_type, eps)
    assert losses.mean().item() == pytest.approx(float(want), rel=1e-5)
    m = preference_metrics(rc, rr)
    logged = fake._metrics["train"]
    for k in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"):
        assert m[k] == pytest.approx(logged[k][0], rel=1e-5, abs=1e-7), k


def test_bradley_terry_equals_trl_reward_trainer() -> None:
    reward_trainer = _trl("RewardTrainer")
    rc, rr = torch.tensor([0.3, -1.0, 2.0, 0.0]), torch.tensor([0.1, 0.5, 1.5, 0.2])
    margin = torch.tensor([0.0, 0.2, 1.0, 0.5])
    out = types.SimpleNamespace(logits=torch.cat([rc, rr])[:, None])
    for kw, m in (({}, None), ({"margin": margin}, margin)):
        fake = _fake_trainer(args=types.SimpleNamespace(center_rewards_coefficient=None))
        inputs = {"attention_mask": torch.ones(8, 4), **kw}
        want = reward_trainer.compute_loss(fake, lambda **k: out, inputs)
        assert bradley_terry_loss(rc, rr, m).item() == pytest.approx(float(want), rel=1e-6)


def test_gae_and_ppo_losses() -> None:
    r = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    v = torch.tensor([[0.1, 0.2, 0.3, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    adv, ret = gae(r, v, mask, gamma=0.9, lam=0.8)
    d2 = 1.0 - 0.3
    d1 = 0.0 + 0.9 * 0.3 - 0.2
    d0 = 0.0 + 0.9 * 0.2 - 0.1
    want = [d0 + 0.72 * d1 + 0.72 ** 2 * d2, d1 + 0.72 * d2, d2, 0.0]
    assert torch.allclose(adv[0], torch.tensor(want), atol=1e-6)
    assert torch.allclose(ret, adv + v)
    lp = torch.log(torch.tensor([[0.5, 0.9, 0.2, 0.3]]))
    old = torch.log(torch.tensor([[0.25, 0.9, 0.4, 0.3]]))
    pg, vl = ppo_losses(lp, old, adv, v, v, ret, mask, clip=0.2)
    ratio = torch.exp(lp - old)
    want_pg = torch.max(-adv * ratio, -adv * ratio.clamp(0.8, 1.2))[0, :3].mean()
    assert pg.item() == pytest.approx(want_pg.item(), rel=1e-6)
    assert vl.item() == pytest.approx((0.5 * (v - ret) ** 2)[0, :3].mean().item(), rel=1e-6)


# ----------------------------------------------------------------------------- best-of-n and the fits


def test_bon_kl_is_the_analytic_bound_without_ties_and_below_it_with_ties() -> None:
    rng = np.random.default_rng(0)
    for n in (1, 2, 8):
        q, kl = bon_distribution(rng.normal(size=20000), n)
        assert q.sum() == pytest.approx(1.0)
        assert kl == pytest.approx(bon_kl_analytic(n), abs=2e-3 + 5e-3 * n / 8)
    q, kl = bon_distribution(np.array([0.0] * 50 + [1.0] * 50), 8)  # half the pool ties at the top
    lo, hi = 0.5 ** 8, 1 - 0.5 ** 8  # best-of-8 lands in the low block only when all 8 draws do
    assert kl == pytest.approx(hi * math.log(hi / 0.5) + lo * math.log(lo / 0.5), abs=1e-9)
    assert kl < bon_kl_analytic(8)


def test_gao_fits_recover_alpha_and_beta() -> None:
    rng = np.random.default_rng(1)
    d = np.linspace(0.05, 3.0, 40)
    for form, (a, b) in (("bon", (0.9, 0.25)), ("rl", (0.6, 0.3))):
        y = gao_curve(d, a, b, form) + rng.normal(0, 0.005, d.size)
        f = fit_gao(d, y, form)
        assert f["alpha"] == pytest.approx(a, rel=0.03) and f["beta"] == pytest.approx(b, rel=0.05)
        assert f["r2"] > 0.99
        pd, pr = gao_peak(a, b, form)
        assert float(gao_curve([pd], a, b, form)[0]) == pytest.approx(pr)
        assert gao_curve([pd * 0.9], a, b, form)[0] < pr and gao_curve([pd * 1.1], a, b, form)[0] < pr


def test_fall_statistic() -> None:
    rng = np.random.default_rng(2)
    rising = np.stack([np.full(200, m) + rng.normal(0, 0.05, 200) for m in (0.0, 0.2, 0.4, 0.5)])
    falling = np.stack([np.full(200, m) + rng.normal(0, 0.05, 200) for m in (0.0, 0.4, 0.2, -0.1)])
    f = fall_statistic(rising, 300)
    assert f["fall"] == 0 and f["lo"] == 0 and f["peak_index"] == 3
    g = fall_statistic(falling, 300)
    assert g["peak_index"] == 1 and g["fall"] == pytest.approx(0.5, abs=0.03) and g["lo"] > 0.4


def test_gold_reward() -> None:
    p = "The box is red. The cup is blue. What colour is the cup?\nA:"
    assert gold_reward(p, " blue.") == 1.0
    assert gold_reward(p, " red.") == 0.0
    assert gold_reward(p, " Blue") == 1.0
    assert gold_reward(p, " blue!!!") == pytest.approx(0.6 - 0.02 * 2)
    assert gold_reward(p, " The cup is blue.") == pytest.approx(0.6 - 0.02 * 11)
    assert gold_reward(p, " blue or red") == 0.0


def test_best_of_n_reward_rises_with_n(runs: dict[str, Path]) -> None:
    prompts = [r["prompt"] for r in sft_rows(12, 5, TaskConfig())]
    def longer(ps: list[str], rs: list[str]) -> torch.Tensor:  # a fixed reward: the answer's length
        return torch.tensor([float(len(r)) for r in rs])

    res = best_of_n(runs["sft"], longer, prompts, ns=(1, 2, 4, 16), max_new_tokens=24, seed=0)
    assert all(a <= b + 1e-9 for a, b in zip(res.reward, res.reward[1:])), res.reward
    assert res.reward[-1] > res.reward[0]
    assert all(k <= ka + 1e-9 for k, ka in zip(res.kl, res.kl_analytic)) and res.kl[0] == 0
    rm = load_reward_model(runs["rm"])
    res2 = best_of_n(runs["sft"], rm, prompts, ns=(1, 4, 16), max_new_tokens=24, seed=0)
    assert res2.reward[-1] > res2.reward[0] and res2.samples_per_s > 0


# ----------------------------------------------------------------------------- objectives


def test_reward_model_learns_the_pairs(runs: dict[str, Path]) -> None:
    ev = json.loads((runs["rm"] / "eval.json").read_text())
    assert ev["val_accuracy"] > 0.6, ev  # chance is 0.5; labels are 80% right and the "!" plant is easy
    cfg = json.loads((runs["rm"] / "config.json").read_text())
    assert cfg["model"]["extra"]["align"]["role"] == "reward" and cfg["train"]["task"] == "reward"


def test_dpo_raises_the_margin_on_its_training_pairs(runs: dict[str, Path]) -> None:
    d = runs["dir"]
    pairs = read_pairs(runs["pairs"])
    out = train_dpo(runs["pairs"], d / "dpo", base=runs["sft"], beta=0.5,
                    overrides={**TINY, "max_iters": 40, "eval_interval": 40, "lr": 2e-3})
    ev = json.loads((out.run / "eval.json").read_text())
    assert ev["train"]["rewards/margins"] > 0.1 and ev["train"]["rewards/accuracies"] > 0.6, ev
    # the same numbers by hand: implicit rewards of the tuned policy against the SFT reference
    from llmlab.interop import load

    pol, ref = load(out.run), load(runs["sft"])
    tok = pol.tokenizer
    rows = [r for r in pairs if len(r["prompt"]) + max(len(r["chosen"]), len(r["rejected"])) + 1 <= 96][:32]
    p = [tok.encode(r["prompt"]) for r in rows]
    c = [tok.encode(r["chosen"]) + [tok.eos_id] for r in rows]
    rj = [tok.encode(r["rejected"]) + [tok.eos_id] for r in rows]
    with torch.no_grad():
        ids_c, m_c = response_batch(p, c, tok.pad_id)
        ids_r, m_r = response_batch(p, rj, tok.pad_id)
        margin = 0.5 * ((sequence_logps(pol, ids_c, m_c) - sequence_logps(ref, ids_c, m_c))
                        - (sequence_logps(pol, ids_r, m_r) - sequence_logps(ref, ids_r, m_r)))
    assert margin.mean().item() > 0.1


# ----------------------------------------------------------------------------- bad input


def _one_line_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


def test_bad_input_is_one_line(runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = _jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "chosen": "b"}] * 5)
    out = tmp_path / "o"
    line = _one_line_error(["align", "rm", "--data", str(bad), "--out", str(out)], capsys)
    assert "rejected" in line and not out.exists()
    line = _one_line_error(["align", "dpo", "--data", str(runs["pairs"]), "--base", str(runs["sft"]), "--beta", "0",
                            "--out", str(out)], capsys)
    assert "--beta" in line and not out.exists()
    line = _one_line_error(["align", "dpo", "--data", str(runs["pairs"]), "--base", str(runs["rm"]),
                            "--out", str(out)], capsys)
    assert "reward model" in line and not out.exists()
    line = _one_line_error(["align", "bon", "--policy", str(runs["rm"]), "--reward", str(runs["rm"]), "--prompts",
                            str(runs["pairs"])], capsys)
    assert "reward model" in line
    # a reference with another tokenizer
    other = _jsonl(tmp_path / "other.jsonl", [{"prompt": "xyz " * 3, "completion": "qqq ###"}] * 20)
    train_sft(other, tmp_path / "other", overrides={**TINY, "max_iters": 2, "eval_interval": 2})
    line = _one_line_error(["align", "dpo", "--data", str(runs["pairs"]), "--base", str(runs["sft"]), "--ref",
                            str(tmp_path / "other"), "--out", str(out)], capsys)
    assert "tokenizer" in line and not out.exists()
    # an existing run is never overwritten
    before = (runs["rm"] / "model.safetensors").read_bytes()
    line = _one_line_error(["align", "rm", "--data", str(runs["pairs"]), "--base", str(runs["sft"]),
                            "--out", str(runs["rm"])], capsys)
    assert "already exists" in line and (runs["rm"] / "model.safetensors").read_bytes() == before
    line = _one_line_error(["align", "goodhart", "--quick", "--betas", "0.1,-1", "--out", str(out)], capsys)
    assert "--betas" in line and not out.exists()
