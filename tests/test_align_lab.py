"""The Goodhart lab (issue 20): against the proxy the gold reward peaks and falls while the proxy climbs; against
the gold reward itself (the control) it does not fall beyond noise. The whole --quick lab through the command
line is slow; so is the best-of-n-only lab at toy size (one seed: about 45 s on a quiet 2-core machine by
estimate, 10 min measured on a machine loaded 7x over; move it to the default suite once timed quietly)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from llmlab.cli import main
from llmlab.labs.align.lab import LabConfig, run
from llmlab.labs.align.report import write_lab_report


def _bon_lab(tmp: Path) -> object:
    cfg = dataclasses.replace(LabConfig.quick_config(), seeds=(0,), optimisers=("bon",))
    return run(cfg, None, None, tmp)


pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bon_lab(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    d = tmp_path_factory.mktemp("goodhart")
    return _bon_lab(d), d


def test_best_of_n_against_the_proxy_overoptimises_and_the_control_does_not(bon_lab) -> None:  # noqa: ANN001
    r, _ = bon_lab
    proxy, control = r.curves["bon/proxy/best-of-n"], r.curves["bon/control/best-of-n"]
    assert proxy["proxy"][-1] > proxy["proxy"][0] + 0.5  # the proxy climbs with n
    assert proxy["spurious"][-1] > proxy["spurious"][0] + 0.2  # by exclaiming
    fp, fc = proxy["gold_fall"], control["gold_fall"]
    # measured (seed 0, quick): gold 0.22 -> peak 0.26 at n=4 -> 0.19 at n=64 while "!" goes 0.19 -> 0.95
    assert fp["fall"] > 0.02 and fp["peak_index"] < fp["points"] - 1, fp  # the gold reward peaks, then falls
    assert fc["fall"] == 0.0 and fc["hi"] == 0.0, fc  # the control's never falls (best-of-n by gold is monotone)
    assert control["gold"][-1] > proxy["gold"][-1] + 0.3 and control["gold"][-1] > control["gold"][0] + 0.3
    kl = proxy["kl"]
    assert all(a <= b + 1e-9 for a, b in zip(kl, kl[1:])) and all(k <= ka + 1e-9 for k, ka in
                                                                   zip(kl, proxy["kl_analytic"]))
    rm = r.reward_models["0"]
    assert rm["prefers_exclaimed"]["rate"] > 0.6 and rm["gold_agreement"]["rate"] > 0.5


def test_report_has_every_part(bon_lab) -> None:  # noqa: ANN001
    r, d = bon_lab
    out = write_lab_report(r, d / "report")
    data = json.loads((out / "report.json").read_text())
    assert {"curves", "fits", "reward_models", "samples", "throughput"} <= set(data["results"])
    html = (out / "report.html").read_text()
    assert "Gao et al. fits" in html and "data:image/png;base64" in html and "best-of-n" in html
    assert "bon/proxy" in data["results"]["fits"]


def test_quick_lab_through_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "lab"
    assert main(["align", "goodhart", "--quick", "--out", str(out)]) == 0
    data = json.loads((out / "report.json").read_text())["results"]
    curves = data["curves"]
    for opt in ("bon", "dpo", "rl"):
        assert any(k.startswith(f"{opt}/proxy/") for k in curves) and any(k.startswith(f"{opt}/control/")
                                                                          for k in curves)
    assert curves["bon/proxy/best-of-n"]["gold_fall"]["lo"] > 0
    rl = [v for k, v in curves.items() if k.startswith("rl/proxy/")]
    assert max(v["proxy"][-1] - v["proxy"][0] for v in rl) > 0  # RL climbs the proxy
    assert "report:" in capsys.readouterr().out
    # run again into the same folder: the finished runs are reused, not retrained
    before = (out / "seed-0" / "sft" / "model.safetensors").stat().st_mtime_ns
    assert main(["align", "goodhart", "--quick", "--out", str(out), "--optimisers", "bon"]) == 0
    assert (out / "seed-0" / "sft" / "model.safetensors").stat().st_mtime_ns == before
