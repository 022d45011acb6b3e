"""The Goodhart lab (issue 20): against the proxy the gold reward peaks and falls while the proxy climbs; against
the gold reward itself (the control) it does not fall beyond noise. Both tests run the lab at its quick size (one
seed): about 3 minutes for the whole lab through the command line and 1 minute for the best-of-n-only lab on this
2-core machine under a load of 4-9 (README), so they are marked slow."""

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
    bon, bon_control = curves["bon/proxy/best-of-n"], curves["bon/control/best-of-n"]
    # best-of-n against the proxy exclaims; its gold fall at n <= 64 is small (0.02-0.04) and its interval reaches 0
    # at one seed (README), so only the direction is checked here (the peak-then-fall is in the best-of-n test)
    assert bon["spurious"][-1] > bon["spurious"][0] + 0.5 and bon["gold"][-1] < bon_control["gold"][-1] - 0.3
    rl = [v for k, v in curves.items() if k.startswith("rl/proxy/")]
    assert max(v["proxy"][-1] - v["proxy"][0] for v in rl) > 0  # RL climbs the proxy
    for opt in ("dpo", "rl"):
        proxy = [v for k, v in curves.items() if k.startswith(f"{opt}/proxy/")]
        control = [v for k, v in curves.items() if k.startswith(f"{opt}/control/")]
        # against the proxy: the proxy climbs while the gold reward falls after its peak, beyond noise
        assert max(v["gold_fall"]["lo"] for v in proxy) > 0.02, [v["gold_fall"] for v in proxy]
        assert all(v["proxy"][-1] > v["proxy"][0] + 0.5 for v in proxy)
        # the control (the gold reward itself): no fall beyond noise. The fall is measured from the peak of a
        # curve that starts at the SFT policy, so it also counts a loss against the start; its bootstrap
        # interval is >= 0 by construction, and "within noise" means it reaches 0
        for v in control:
            assert v["gold_fall"]["lo"] < 0.01, (v["setting"], v["gold_fall"], v["gold"])
    assert "report:" in capsys.readouterr().out
    # run again into the same folder: the finished runs are reused, not retrained
    before = (out / "seed-0" / "sft" / "model.safetensors").stat().st_mtime_ns
    assert main(["align", "goodhart", "--quick", "--out", str(out), "--optimisers", "bon"]) == 0
    assert (out / "seed-0" / "sft" / "model.safetensors").stat().st_mtime_ns == before
