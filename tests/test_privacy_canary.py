"""Canary exposure on tiny models trained here: repetition raises exposure, DP-SGD lowers it, and
`compare` reports both side by side."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from llmlab.checkpoint import read_run_config
from llmlab.security.privacy.canary import CanaryConfig, load_canaries, run_canary_experiment
from llmlab.security.privacy.common import run_splits
from llmlab.security.privacy.compare import compare_runs
from llmlab.security.privacy.mia import MIAConfig

WORDS = ("the a one two red blue cat dog runs sits on under big small house tree river stone light dark "
         "green old new fast slow bird fish sun moon rain wind day night warm cold near far up down").split()
TRAIN = dict(n_layer=2, n_head=2, n_embd=64, block_size=32, batch_size=32, max_iters=200, eval_interval=100,
             eval_iters=5, lr=3e-3, warmup_iters=20, num_samples=0, threads=1)


def make_corpus(path: Path, docs: int = 30, lines: int = 20, seed: int = 0) -> Path:
    rng = random.Random(seed)
    text = []
    for _ in range(docs):
        body = "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 8))) for _ in range(lines))
        text.append(json.dumps({"text": body + "\n"}))
    path.write_text("\n".join(text) + "\n")
    return path


def _config(data: Path, **kw) -> CanaryConfig:  # noqa: ANN003
    return CanaryConfig(format="my PIN is {d}{d}{d}{d}", repeats=(1, 64), per_count=1, controls=1, data=str(data),
                        max_chars=0, train=dict(TRAIN), **kw)


@pytest.fixture(scope="module")
def experiments(tmp_path_factory: pytest.TempPathFactory) -> dict:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("canary")
    data = make_corpus(root / "corpus.jsonl")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMLAB_CACHE", str(root / "cache"))
        base = run_canary_experiment(_config(data), root / "base")
        dp = run_canary_experiment(_config(data, defence="dp", dp={"noise_multiplier": 1.0, "max_grad_norm": 1.0}),
                                   root / "dp")
    return {"root": root, "base": base, "dp": dp}


def _by_repeats(exp) -> dict[int, float]:  # noqa: ANN001
    return {c["repeats"]: c["exposure"] for c in exp.exposure.canaries}


def test_repeated_canary_is_exposed(experiments: dict) -> None:
    base = experiments["base"]
    e = _by_repeats(base)
    max_e = math.log2(10**4)
    assert base.exposure.method == "exact" and base.exposure.space_size == 10**4
    assert e[64] > 0.9 * max_e  # near the top of all 10,000 candidates
    assert e[64] > e[1] + 3 and e[64] > e[0] + 6  # much higher than once-seen and never-seen
    top = max(base.exposure.canaries, key=lambda c: c["repeats"])
    assert top["beam_rank"] is not None and top["beam_rank"] <= 3
    # the experiment folder holds what `compare` and `--run` need
    fmt, canaries = load_canaries(Path(base.run).parent / "canaries.json")
    assert [c.repeats for c in canaries] == [1, 64, 0]
    splits = run_splits(base.run)
    train_text = "".join(splits.train)
    assert train_text.count(canaries[1].text + "\n") == 64 and canaries[2].text not in train_text
    assert canaries[1].text not in "".join(splits.val)


def test_dp_training_reports_epsilon_and_lowers_exposure(experiments: dict) -> None:
    base, dp = experiments["base"], experiments["dp"]
    eps = dp.training["epsilon"]
    assert math.isfinite(eps) and 0 < eps < 100
    cfg = read_run_config(dp.run)
    assert cfg["dp"]["epsilon"] == pytest.approx(eps) and cfg["dp"]["delta"] == 1e-5
    assert cfg["data"]["hash"] == read_run_config(base.run)["data"]["hash"]
    assert (Path(dp.run) / "model.safetensors").is_file() and (Path(dp.run) / "loss.png").is_file()
    rows = [json.loads(x) for x in (Path(dp.run) / "metrics.jsonl").read_text().splitlines()]
    assert any(r["kind"] == "eval" and "epsilon" in r for r in rows)
    assert _by_repeats(dp)[64] < _by_repeats(base)[64] - 3


def test_compare_reports_before_and_after(experiments: dict) -> None:
    root = experiments["root"]
    res = compare_runs(root / "base", root / "dp", mia_config=MIAConfig(max_docs=60, neighbours=2, bootstrap=50))
    by_r = {e["repeats"]: e for e in res.exposure}
    assert by_r[64]["before"] == pytest.approx(_by_repeats(experiments["base"])[64])
    assert by_r[64]["after"] == pytest.approx(_by_repeats(experiments["dp"])[64])
    assert by_r[64]["change"] < 0
    assert {m["attack"] for m in res.mia} == {"loss", "zlib", "min_k", "min_k++", "neighbourhood", "blind"}
    assert all(0 <= m["auc_before"] <= 1 and 0 <= m["auc_after"] <= 1 for m in res.mia)
    assert res.val_loss["cost"] == pytest.approx(res.val_loss["after"] - res.val_loss["before"])
    assert res.val_loss["after"] > res.val_loss["before"]  # DP costs utility
    assert res.defended["dp"]["epsilon"] == pytest.approx(experiments["dp"].training["epsilon"])


def test_compare_command(experiments: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from llmlab.cli import main

    root = experiments["root"]
    out = tmp_path / "cmp"
    rc = main(["privacy", "compare", str(root / "base"), str(root / "dp"), "--max-docs", "40", "--neighbours", "1",
               "--bootstrap", "20", "--out", str(out)])
    assert rc == 0 and "epsilon" in capsys.readouterr().out
    rep = json.loads((out / "report.json").read_text())
    res = rep["results"]
    assert [e["repeats"] for e in res["exposure"]] == [1, 64, 0]
    assert res["val_loss"]["cost"] > 0 and res["defended"]["dp"]["epsilon"] > 0
    assert rep["model_sha256"] and (out / "report.html").read_text().count("data:image/png;base64,") == 3


def test_several_canaries_per_count_give_a_mean_and_spread(tmp_path: Path) -> None:
    from llmlab.security.privacy.canary import (
        CanaryFormat,
        ExposureResult,
        canary_corpus,
        draw_canaries,
        exposure_by_count,
    )

    fmt = CanaryFormat.parse("my PIN is {d}{d}{d}{d}")
    cans = draw_canaries(fmt, [r for r in (1, 4) for _ in range(3)], 3, seed=0)
    assert [c.repeats for c in cans] == [1, 1, 1, 4, 4, 4, 0, 0, 0] and len({c.secret for c in cans}) == 9
    res = ExposureResult(fmt.text, fmt.space_size, "exact", math.log2(fmt.space_size),
                         [{"repeats": c.repeats, "exposure": float(i)} for i, c in enumerate(cans)])
    by = {g["repeats"]: g for g in exposure_by_count(res)}
    assert by[1]["n"] == 3 and by[1]["mean"] == 1.0 and by[1]["lo"] < 1.0 < by[1]["hi"]
    assert by[4]["min"] == 3.0 and by[4]["max"] == 5.0
    # the canary corpus is split by characters: the validation share holds in characters
    data = make_corpus(tmp_path / "c.jsonl", docs=12, lines=30)
    train, val = canary_corpus(str(data), 0, 0.1)
    share = sum(map(len, val)) / (sum(map(len, train)) + sum(map(len, val)))
    assert 0.08 < share < 0.12
