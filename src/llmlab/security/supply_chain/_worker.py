"""The child process that runs the scanners and the loaders for `llmlab audit`, `llmlab convert` and the poisoned-
checkpoint lab. Started as `python -I _worker.py` (isolated: neither the working folder nor this folder is on
sys.path), it reads one JSON request per line on stdin and answers one JSON line on stdout. Every request runs
in a process forked for it, in the request's working folder, with its output sent to a log file and a timeout;
the worker then reports which files appeared in that folder (a payload's marker file shows that code ran).

The worker imports each tool's libraries once, before forking, so a call costs a fork rather than an import of
torch. It imports nothing from llmlab except for the `llmlab_load` tool, which is llmlab's own loader.

Tools: picklescan, modelscan, fickling (its default analysis), fickling-ml (its ML allowlist analysis), scanners
(all four), weights_only (torch.load(weights_only=True)), unsafe_load (torch.load(weights_only=False), the lab's
deliberate unsafe load), llmlab_load (llmlab.load), to_safetensors (weights_only load, then safetensors)."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import select
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

Verdict = dict[str, Any]


def _first_line(e: BaseException, limit: int = 400) -> str:
    """The informative part of an exception: torch's 'WeightsUnpickler error: ...' sentence, else line one."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
    key = "WeightsUnpickler error:"
    if key in text:
        rest = text[text.index(key) + len(key):].split("Check the documentation")[0]
        return f"{key} {' '.join(rest.split())}"[:limit]
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"[:limit]


def _files(path: Path) -> list[Path]:
    return [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------- scanners


def _picklescan(path: Path) -> Verdict:
    """picklescan 1.x as a library: scan_file_path for a file, scan_directory_path for a folder (which, like
    `picklescan -p DIR`, only opens files whose extension it knows)."""
    from picklescan import scanner as ps

    r = ps.scan_directory_path(str(path)) if path.is_dir() else ps.scan_file_path(str(path))
    by = {lvl: sorted({f"{g.module}.{g.name}" for g in r.globals if g.safety == lvl}) for lvl in ps.SafetyLevel}
    dangerous, suspicious = by[ps.SafetyLevel.Dangerous], by[ps.SafetyLevel.Suspicious]
    raw = {"scanned_files": r.scanned_files, "infected_files": r.infected_files, "issues_count": r.issues_count,
           "suspicious_count": r.suspicious_count, "scan_err": r.scan_err,
           "globals": [[g.module, g.name, g.safety.value] for g in r.globals]}
    extra = f"; suspicious: {', '.join(suspicious)}" if suspicious else ""
    if r.issues_count > 0:
        return {"state": "flagged", "detail": f"dangerous globals: {', '.join(dangerous)}{extra}", "raw": raw}
    if r.scan_err:
        return {"state": "error", "detail": f"scan error (exit 2){extra}", "raw": raw}
    if r.scanned_files == 0:
        return {"state": "skipped", "detail": "no file scanned (picklescan picks files by extension)", "raw": raw}
    return {"state": "clean", "detail": f"no dangerous global{extra}", "raw": raw}


def _modelscan(path: Path) -> Verdict:
    """ProtectAI modelscan as a library: ModelScan().scan(path) with its default settings."""
    from modelscan.modelscan import ModelScan

    rep = ModelScan().scan(str(path))
    issues = [f"{i.get('severity')} {i.get('module')}.{i.get('operator')}" for i in rep.get("issues", [])]
    errors = [str(e.get("description", e)) for e in rep.get("errors", [])]
    summary = rep["summary"]
    skipped = [f"{s.get('source')}: {s.get('description')}" for s in summary["skipped"]["skipped_files"]]
    scanned = summary["scanned"]["total_scanned"]
    raw = {"issues": issues, "errors": errors, "skipped": skipped, "scanned": scanned}
    if issues:
        return {"state": "flagged", "detail": f"issues: {', '.join(sorted(set(issues)))}", "raw": raw}
    if errors:
        return {"state": "error", "detail": f"errors: {'; '.join(errors)[:300]} (0 issues)", "raw": raw}
    if scanned == 0:
        return {"state": "skipped", "detail": f"nothing scanned: {'; '.join(skipped)[:300]}", "raw": raw}
    return {"state": "clean", "detail": f"0 issues in {scanned} scanned", "raw": raw}


def _fickling_route(f: Path) -> str:
    """The dispatch `fickling --huggingface` applies to each file: zip members, the whole file, or skip."""
    from fickling.cli import HF_RAW_PICKLE_EXTENSIONS, HF_ZIP_PICKLE_EXTENSIONS
    from fickling.polyglot import find_file_properties

    props = find_file_properties(str(f))
    ext = f.suffix.lower()
    if props["is_torch_zip"] or props["is_standard_zip"] or ext in HF_ZIP_PICKLE_EXTENSIONS:
        return "zip"
    if props["is_valid_pickle"] or ext in HF_RAW_PICKLE_EXTENSIONS:
        return "pickle"
    return "skip"


def _fickling_ml_bytes(name: str, data: bytes) -> tuple[Any, list[str], list[str]]:
    """fickling's check_safety with its ML allowlist analysis (fickling.ml.MLAllowlist) instead of the default
    analyses, with the same graceful error handling as fickling.loader._scan_bytes."""
    from fickling.analysis import Analyzer, Severity, check_safety
    from fickling.fickle import PickleDecodeError, StackedPickle
    from fickling.ml import MLAllowlist

    sev, lines, errors = Severity.LIKELY_SAFE, [], []
    try:
        for p in StackedPickle.load(io.BytesIO(data), fail_on_decode_error=False):
            res = check_safety(p, analyzer=Analyzer([MLAllowlist()]))
            sev = max(sev, res.severity)
            lines += [ln for ln in res.to_string().splitlines() if ln.strip()]
    except PickleDecodeError as e:
        errors.append(f"{name}: parse error ({e})")
        sev = max(sev, Severity.SUSPICIOUS)
    except Exception as e:  # noqa: BLE001 - mirrors fickling's own graceful mode
        errors.append(f"{name}: {type(e).__name__}: {e}")
        sev = max(sev, Severity.LIKELY_UNSAFE)
    return sev, lines, errors


def _fickling(path: Path, ml: bool = False) -> Verdict:
    """fickling 0.1.x as a library, file by file with fickling's own dispatch: scan_zip_archive for zips,
    scan_file for pickles (default analyses), or the ML allowlist analysis on the same bytes (ml=True)."""
    from fickling.analysis import Severity
    from fickling.loader import RelaxedZipFile, scan_file, scan_zip_archive

    worst, lines, errors, scanned, skipped = Severity.LIKELY_SAFE, [], [], 0, []
    for f in _files(path):
        route = _fickling_route(f)
        if route == "skip":
            skipped.append(f.name)
            continue
        if ml:
            if route == "zip":
                with RelaxedZipFile(str(f), "r") as z:
                    parts = [(i.filename, z.read(i)) for i in z.infolist()
                             if not i.is_dir() and Path(i.filename).suffix.lower() in (".pkl", ".pickle", ".bin")]
            else:
                parts = [(f.name, f.read_bytes())]
            for name, data in parts:
                sev, ls, es = _fickling_ml_bytes(name, data)
                worst, scanned = max(worst, sev), scanned + 1
                lines += [f"{name}: {ln}" for ln in ls]
                errors += es
        else:
            results = (list(scan_zip_archive(str(f), graceful=True).values()) if route == "zip"
                       else [scan_file(str(f), graceful=True)])
            for r in results:
                worst, scanned = max(worst, r.severity), scanned + 1
                for ar in r.results:
                    lines += [f"{Path(r.filepath).name}: {ln}" for ln in ar.to_string().splitlines() if ln.strip()]
                errors += r.errors
    raw = {"severity": worst.name, "analysis": lines, "errors": errors, "scanned": scanned, "skipped": skipped}
    if scanned == 0:
        return {"state": "skipped", "detail": f"nothing scanned ({', '.join(skipped)}: not a pickle or zip to "
                                              "fickling)", "raw": raw}
    detail = worst.name + (": " + " | ".join(lines[:3]) if lines else "") + (f" | {errors[0]}" if errors else "")
    return {"state": "flagged" if worst > Severity.LIKELY_SAFE else "clean", "detail": detail[:600], "raw": raw}


# ----------------------------------------------------------------------------- loaders


def _starts_as_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def _torch_load(path: Path, weights_only: bool) -> Any:
    import warnings

    import torch

    warnings.simplefilter("ignore")
    mmap = weights_only and path.is_file() and _starts_as_zip(path)
    return torch.load(str(path), weights_only=weights_only, map_location="cpu", mmap=mmap)


def _count_tensors(obj: Any) -> int:
    import torch

    if isinstance(obj, torch.Tensor):
        return 1
    if isinstance(obj, dict):
        return sum(_count_tensors(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_count_tensors(v) for v in obj)
    return 0


def _weights_only(path: Path) -> Verdict:
    import pickle

    try:
        obj = _torch_load(path, True)
    except pickle.UnpicklingError as e:
        return {"state": "refused", "detail": _first_line(e)}
    except Exception as e:  # noqa: BLE001 - any other failure is reported as it is
        return {"state": "error", "detail": _first_line(e)}
    return {"state": "loaded", "detail": f"{type(obj).__name__} with {_count_tensors(obj)} tensors"}


def _unsafe_load(path: Path) -> Verdict:
    try:
        obj = _torch_load(path, False)
    except Exception as e:  # noqa: BLE001
        return {"state": "error", "detail": _first_line(e)}
    return {"state": "loaded", "detail": f"{type(obj).__name__} with {_count_tensors(obj)} tensors"}


def _llmlab_load(path: Path) -> Verdict:
    import llmlab
    from llmlab.errors import LlmlabError

    try:
        model = llmlab.load(path)
    except LlmlabError as e:
        return {"state": "refused", "detail": f"{type(e).__name__}: {e}"[:400]}
    except Exception as e:  # noqa: BLE001
        return {"state": "error", "detail": _first_line(e)}
    return {"state": "loaded", "detail": type(model).__name__}


def tensor_digest(t: Any) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes (the parent checks the converted file against it)."""
    import torch

    t = t.detach().contiguous().cpu()
    h = hashlib.sha256(f"{t.dtype}|{list(t.shape)}|".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _flatten(obj: Any, prefix: str, out: dict[str, Any], skipped: list[str]) -> None:
    import torch

    if isinstance(obj, torch.Tensor):
        out[prefix or "tensor"] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out, skipped)
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            _flatten(v, f"{prefix}.{i}" if prefix else str(i), out, skipped)
    else:
        skipped.append(f"{prefix or '<root>'} ({type(obj).__name__})")


def _to_safetensors(path: Path, out: str, metadata: dict[str, str]) -> Verdict:
    """Load with weights_only=True, keep the tensors (unwrapping a lone state_dict/model entry), write them."""
    import pickle

    import torch
    from safetensors.torch import save_file

    try:
        obj = _torch_load(path, True)
    except pickle.UnpicklingError as e:
        return {"state": "refused", "detail": _first_line(e)}
    except Exception as e:  # noqa: BLE001
        return {"state": "error", "detail": _first_line(e)}
    if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = [k for k in ("state_dict", "model", "module") if isinstance(obj.get(k), dict)]
        if len(inner) == 1:
            obj = obj[inner[0]]
    tensors: dict[str, Any] = {}
    skipped: list[str] = []
    _flatten(obj, "", tensors, skipped)
    if not tensors:
        return {"state": "error", "detail": f"no tensors in the checkpoint ({type(obj).__name__})"}
    seen: set[int] = set()
    clean = {}
    for k, t in tensors.items():
        t = t.detach().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel():
            t = t.clone()
        seen.add(ptr)
        clean[k] = t
    save_file(clean, out, metadata=metadata)
    return {"state": "converted", "detail": f"{len(clean)} tensors", "skipped": skipped,
            "digests": {k: tensor_digest(t) for k, t in clean.items()}}


# ----------------------------------------------------------------------------- dispatch


def _quiet() -> None:
    for name in ("picklescan", "modelscan", "fickling"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def _scanners(path: Path) -> Verdict:
    out = {}
    for name, fn in SCANNERS.items():
        try:
            out[name] = fn(path)
        except Exception as e:  # noqa: BLE001 - a scanner crashing on a file is its verdict
            out[name] = {"state": "error", "detail": f"{name} raised {_first_line(e)}"}
    return {"state": "done", "scanners": out}


SCANNERS = {"picklescan": _picklescan, "modelscan": _modelscan, "fickling": _fickling,
            "fickling-ml": lambda p: _fickling(p, ml=True)}

TOOLS = {**SCANNERS, "scanners": _scanners, "weights_only": _weights_only, "unsafe_load": _unsafe_load,
         "llmlab_load": _llmlab_load}

PRELOAD = {"picklescan": ["picklescan.scanner"], "modelscan": ["modelscan.modelscan"],
           "fickling": ["fickling", "fickling.cli", "fickling.polyglot", "fickling.ml"],
           "weights_only": ["torch"], "unsafe_load": ["torch", "numpy"], "llmlab_load": ["llmlab"],
           "to_safetensors": ["torch", "safetensors.torch"]}
PRELOAD["fickling-ml"] = PRELOAD["fickling"]
PRELOAD["scanners"] = PRELOAD["picklescan"] + PRELOAD["modelscan"] + PRELOAD["fickling"]


def _preload(tool: str) -> None:
    import importlib

    for mod in PRELOAD.get(tool, []):
        importlib.import_module(mod)
    if "torch" in PRELOAD.get(tool, []):
        import torch

        torch.set_num_threads(1)
    _quiet()


def _work(req: dict[str, Any]) -> Verdict:
    tool, path = req["tool"], Path(req["path"])
    if tool == "to_safetensors":
        return _to_safetensors(path, req["out"], req.get("metadata") or {})
    if tool in SCANNERS:
        try:
            return SCANNERS[tool](path)
        except Exception as e:  # noqa: BLE001
            return {"state": "error", "detail": f"{tool} raised {_first_line(e)}"}
    return TOOLS[tool](path)


def _listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def _tail(path: str, n: int = 1500) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - n))
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def run_request(req: dict[str, Any]) -> dict[str, Any]:
    """Run one request in a forked process in its working folder; report its verdict, new files and time."""
    _preload(req["tool"])  # imports happen here, in the worker, once: not counted in the call's time
    cwd = Path(req["cwd"])
    before = _listing(cwd)
    timeout = float(req.get("timeout", 60))
    t0 = time.monotonic()
    if not hasattr(os, "fork"):  # no fork: run here (still a child of the caller)
        old = os.getcwd()
        try:
            os.chdir(cwd)
            res = {"status": "done", "verdict": _work(req)}
        except BaseException as e:  # noqa: BLE001
            res = {"status": "crashed", "error": f"{type(e).__name__}: {e}"}
        finally:
            os.chdir(old)
    else:
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the forked process: never returns
            code = 0
            try:
                os.close(rfd)
                os.setsid()
                fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                os.chdir(cwd)
                res = {"status": "done", "verdict": _work(req)}
            except BaseException as e:  # noqa: BLE001
                traceback.print_exc()
                res, code = {"status": "crashed", "error": f"{type(e).__name__}: {e}"}, 1
            data = json.dumps(res, default=str).encode()
            while data:
                data = data[os.write(wfd, data):]
            os._exit(code)
        os.close(wfd)
        chunks, deadline, timed_out = [], t0 + timeout, False
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            ready, _, _ = select.select([rfd], [], [], left)
            if ready:
                chunk = os.read(rfd, 65536)
                if not chunk:
                    break
                chunks.append(chunk)
        os.close(rfd)
        if timed_out:
            for kill in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
                try:
                    kill()
                except (ProcessLookupError, PermissionError):
                    pass
        _, status = os.waitpid(pid, 0)
        if timed_out:
            res = {"status": "timeout", "error": f"no answer within {timeout:g} s; killed"}
        else:
            try:
                res = json.loads(b"".join(chunks) or b"null") or {"status": "crashed",
                                                                  "error": f"exit status {status}, no answer"}
            except json.JSONDecodeError:
                res = {"status": "crashed", "error": f"exit status {status}, garbled answer"}
    res["created"] = sorted(_listing(cwd) - before)
    res["seconds"] = round(time.monotonic() - t0, 3)
    res["log"] = _tail(req["log"])
    return res


def main() -> None:
    """Serve requests: one JSON object per line on stdin, one answer per line on the original stdout."""
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # whatever the libraries print goes to the worker's log, not into the protocol
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        try:
            res = run_request(req)
        except Exception as e:  # noqa: BLE001 - keep serving; the caller sees the error
            res = {"status": "crashed", "error": f"worker: {type(e).__name__}: {e}", "created": [], "seconds": 0}
        proto.write(json.dumps(res, default=str) + "\n")
        proto.flush()


if __name__ == "__main__":
    main()
