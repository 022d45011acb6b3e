"""`audit(path)`: look at a model file or folder before anything loads it.

Each file's format is told from its content (formats.sniff). Safetensors and GGUF headers get a structural check
that reads only the header (structure.py). Files that hold pickles (PyTorch zip or legacy checkpoints, bare
pickles, object arrays, polyglots) go to the real scanners, run as libraries in a child process, side by side:
picklescan, modelscan, fickling's default analyses and fickling's ML allowlist, and then to
`torch.load(weights_only=True)` in another child process. llmlab never unpickles the file itself.

What makes the audit fail (exit status 1): structural errors and warnings, a flag from picklescan, modelscan or
fickling's ML allowlist, a scanner that cannot parse the file, a refusal by weights_only=True, or a file created
by any of them. fickling's default analyses are shown but advisory: they flag every PyTorch checkpoint (the
lab's benign control shows it). An audit that cannot run (missing path, unreadable file, a folder without model
files, a corrupt archive) raises AuditError (exit status 2)."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmlab.security.supply_chain import formats as F
from llmlab.security.supply_chain.common import AuditError, Finding
from llmlab.security.supply_chain.runner import Worker
from llmlab.security.supply_chain.structure import Structure, check_gguf, check_npy, check_safetensors, check_zip

SCANNER_NAMES = ("picklescan", "modelscan", "fickling", "fickling-ml")
BLOCKING = {"picklescan": True, "modelscan": True, "fickling": False, "fickling-ml": True, "weights_only": True}
LABELS = {"picklescan": "picklescan", "modelscan": "modelscan", "fickling": "fickling (default analyses, advisory)",
          "fickling-ml": "fickling (ML allowlist)", "weights_only": "torch.load(weights_only=True)"}
SKIP_DIRS = {".git", "__pycache__", ".cache", ".huggingface"}


@dataclass
class ToolVerdict:
    """One scanner's or loader's answer on one file: its state (flagged/clean/error/skipped/timeout for
    scanners, loaded/refused/error/timeout for loaders), its exact finding, and whether it counts."""

    tool: str
    state: str
    detail: str
    blocking: bool
    created: list[str] = field(default_factory=list)


@dataclass
class FileAudit:
    """The audit of one file."""

    path: str
    format: str
    size: int
    findings: list[Finding] = field(default_factory=list)
    verdicts: list[ToolVerdict] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def status(self) -> str:
        return "findings" if any(f.counts for f in self.findings) else "clean"


@dataclass
class AuditResult:
    """The audit of a file or folder: one FileAudit per model file, the files skipped, folder-level findings."""

    path: str
    files: list[FileAudit]
    skipped: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def status(self) -> str:
        """'clean' or 'findings'."""
        bad = any(f.counts for f in self.findings) or any(fa.status != "clean" for fa in self.files)
        return "findings" if bad else "clean"

    @property
    def exit_code(self) -> int:
        """0 clean, 1 findings (errors raise AuditError, exit status 2)."""
        return 0 if self.status == "clean" else 1

    def all_findings(self) -> list[tuple[str, Finding]]:
        """(file or folder, finding) pairs, folder-level first."""
        return [(self.path, f) for f in self.findings] + [(fa.path, f) for fa in self.files for f in fa.findings]


# ----------------------------------------------------------------------------- finding the files


def _readable(p: Path) -> None:
    try:
        with open(p, "rb") as f:
            f.read(1)
    except PermissionError:
        raise AuditError(f"cannot read {p}: permission denied; fix its permissions or run as its owner") from None
    except OSError as e:
        raise AuditError(f"cannot read {p}: {e.strerror or e}") from None


def _model_files(root: Path) -> tuple[list[Path], list[str], list[Finding]]:
    files: list[Path] = []
    skipped: list[str] = []
    findings: list[Finding] = []
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        for name in list(dirnames):
            if (d / name).is_symlink():
                findings.append(Finding("warning", "folder", f"{(d / name).relative_to(root)} is a symlink to "
                                        f"{os.readlink(d / name)}: a model folder's files should be its own"))
        dirnames[:] = sorted(n for n in dirnames if n not in SKIP_DIRS and not (d / n).is_symlink())
        for name in sorted(filenames):
            p = d / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                findings.append(Finding("warning", "folder", f"{rel} is a symlink to {os.readlink(p)}: a model "
                                        "folder's files should be its own (model_signing refuses symlinks too)"))
                continue
            mode = p.lstat().st_mode
            if not stat.S_ISREG(mode):
                findings.append(Finding("warning", "folder", f"{rel} is not a regular file (a pipe or device)"))
                continue
            _readable(p)
            fmt = F.sniff(p).format
            if fmt != F.UNKNOWN or p.suffix.lower() in F.MODEL_EXTENSIONS:
                files.append(p)
            else:
                skipped.append(rel)
    return files, skipped, findings


def _folder_findings(root: Path) -> list[Finding]:
    """A run folder's SHA-256 manifest, and whether the folder carries a signature."""
    out: list[Finding] = []
    if (root / "manifest.json").is_file():
        from llmlab.checkpoint import check_manifest
        from llmlab.errors import ModelLoadError

        try:
            n = check_manifest(root, cache=False)
            if n:
                out.append(Finding("info", "manifest", f"manifest.json: the SHA-256 of {n} files match"))
        except ModelLoadError as e:
            out.append(Finding("error", "manifest", str(e)))
    if (root / "model.sig").is_file():
        out.append(Finding("info", "signature", "the folder carries model.sig: check it with "
                                                "`llmlab verify FOLDER --public-key PUB`"))
    return out


# ----------------------------------------------------------------------------- one file


def _structure(fa: FileAudit, p: Path, sn: F.Sniffed) -> bool:
    """Run the format's structural check; return whether the file needs the pickle scanners."""
    s: Structure | None = None
    needs_scan = sn.format in F.PICKLE_FORMATS or sn.zip_inside
    if sn.format == F.SAFETENSORS:
        s = check_safetensors(p)
    elif sn.format == F.GGUF:
        s = check_gguf(p)
    elif sn.format == F.NPY:
        s = check_npy(p)
        needs_scan = needs_scan or bool(s.info.get("pickle"))
    elif sn.format in (F.TORCH_ZIP, F.ZIP, F.NPZ):
        if sn.detail.startswith("corrupt zip"):
            raise AuditError(f"{p}: {sn.detail}; the archive is damaged — re-download or re-export it")
        try:
            s = check_zip(p, sn.format)
        except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError) as e:
            raise AuditError(f"{p}: corrupt zip archive ({e}); re-download or re-export it") from None
        needs_scan = needs_scan or bool(s.info.get("pickles")) or bool(s.info.get("pickle"))
    elif sn.format in (F.TORCH_LEGACY, F.PICKLE):
        what = "a legacy (pre-1.6) PyTorch checkpoint" if sn.format == F.TORCH_LEGACY else "a bare pickle"
        fa.findings.append(Finding("info", "format", f"{what}: torch.load(weights_only=False) or pickle.load would "
                                                     "run any code it holds"))
    elif sn.format == F.SEVEN_Z:
        fa.findings.append(Finding("warning", "format", "a 7z archive: llmlab does not look inside it"))
    else:
        fa.findings.append(Finding("warning", "format", "the content is not any model format llmlab knows"))
    if s is not None:
        fa.findings += s.findings
        fa.info.update({k: v for k, v in s.info.items() if k != "tensor_offsets"})
    if sn.format == F.TORCH_ZIP:
        fa.findings.append(Finding("info", "format", "a PyTorch zip checkpoint: its data.pkl is a pickle"))
    if sn.zip_inside:
        fa.findings.append(Finding("warning", "format", f"a polyglot: the file reads as {sn.format} from its start "
                                   "and also holds a zip archive; zip readers (picklescan, fickling) see the "
                                   "archive while pickle.load and torch.load see the leading bytes"))
    mismatch = F.extension_mismatch(p, sn.format)
    if mismatch:
        fa.findings.append(Finding("warning", "format", mismatch))
    return needs_scan


def _tool_findings(fa: FileAudit, tool: str, state: str, detail: str, raw: dict[str, Any] | None) -> None:
    label = LABELS[tool]
    if tool == "fickling":
        if state != "skipped":
            fa.findings.append(Finding("info", tool, f"{label}: {detail}"))
        return
    if tool == "weights_only":
        if state == "refused":
            fa.findings.append(Finding("error", tool, f"{label} refuses it: {detail}"))
        elif state == "timeout":
            fa.findings.append(Finding("warning", tool, f"{label} did not finish: {detail}"))
        elif state == "error":  # expected of a bare pickle; of a PyTorch checkpoint it means a damaged file
            sev = "warning" if fa.format in (F.TORCH_ZIP, F.TORCH_LEGACY) else "info"
            fa.findings.append(Finding(sev, tool, f"{label} cannot read it as a checkpoint: {detail}"))
        else:
            fa.findings.append(Finding("info", tool, f"{label} loads it: {detail}"))
        return
    if state == "flagged":
        severe = tool != "fickling-ml" or (raw or {}).get("severity") in ("LIKELY_OVERTLY_MALICIOUS",
                                                                          "OVERTLY_MALICIOUS")
        fa.findings.append(Finding("error" if severe else "warning", tool, f"{label}: {detail}"))
    elif state in ("error", "timeout"):
        fa.findings.append(Finding("warning", tool, f"{label} could not finish ({detail}); a file that breaks a "
                                                    "scanner may be built to hide a payload from it"))
    elif state == "skipped":
        fa.findings.append(Finding("info", tool, f"{label} did not scan it: {detail}"))
    elif "suspicious" in detail:
        fa.findings.append(Finding("info", tool, f"{label}: {detail}"))


def _record(fa: FileAudit, tool: str, ans: dict[str, Any], verdict: dict[str, Any] | None,
            created: list[str]) -> None:
    if ans["status"] != "done" or verdict is None:
        state, detail, raw = "timeout" if ans["status"] == "timeout" else "error", ans.get("error", ""), None
    else:
        state, detail, raw = verdict["state"], verdict.get("detail", ""), verdict.get("raw")
    fa.verdicts.append(ToolVerdict(tool, state, detail, BLOCKING[tool], created))
    _tool_findings(fa, tool, state, detail, raw)


def _scan(fa: FileAudit, p: Path, worker: Worker, cwd: Path, timeout: float, torch_loadable: bool) -> None:
    ans = worker.run("scanners", p, cwd / "scan", timeout=timeout)
    per = (ans.get("verdict") or {}).get("scanners") or {}
    for name in SCANNER_NAMES:
        _record(fa, name, ans, per.get(name), [])
    runs = [("the scanners", ans)]
    if torch_loadable:
        ans = worker.run("weights_only", p, cwd / "load", timeout=timeout)
        _record(fa, "weights_only", ans, ans.get("verdict"), list(ans.get("created") or []))
        runs.append((LABELS["weights_only"], ans))
    for who, a in runs:
        if a.get("created"):
            fa.findings.append(Finding("error", "sandbox", f"{who} left files in their working folder: "
                                                           f"{a['created'][:5]} — code in the file ran"))


def audit_file(p: Path, get_worker: Callable[[], Worker] | None, workdir: Path, timeout: float) -> FileAudit:
    """Structural checks of one file, then, if it holds pickles, the scanners and the weights_only load in
    the Worker that `get_worker()` returns (skipped when get_worker is None)."""
    sn = F.sniff(p)
    fa = FileAudit(str(p), sn.format, sn.size)
    needs_scan = _structure(fa, p, sn)
    if needs_scan and get_worker is not None:
        torch_loadable = sn.format in F.PICKLE_FORMATS or (sn.zip_inside and sn.format not in (F.SAFETENSORS,
                                                                                                 F.GGUF, F.NPY))
        _scan(fa, p, get_worker(), workdir, timeout, torch_loadable)
    return fa


def audit(path: str | Path, *, timeout: float = 120.0, worker: Worker | None = None,
          workdir: str | Path | None = None) -> AuditResult:
    """Audit a model file or folder without loading it; see the module docstring for what counts.
    `worker` reuses a running Worker; `workdir` keeps the scanners' working folders (default: a temporary
    folder, removed afterwards)."""
    t0 = time.perf_counter()
    p = Path(path)
    if not p.exists():
        if p.is_symlink():
            raise AuditError(f"{p} is a symlink to {os.readlink(p)}, which does not exist")
        raise AuditError(f"{p}: no such file or folder")
    skipped: list[str] = []
    findings: list[Finding] = []
    if p.is_dir():
        files, skipped, findings = _model_files(p)
        if not files:
            seen = f" (found only {', '.join(skipped[:5])})" if skipped else " (it is empty)"
            raise AuditError(f"{p} holds no model files{seen}; give a folder or file with .safetensors, .gguf, "
                             ".bin, .pt, .pth, .ckpt, .pkl, .npy or .npz weights")
        findings += _folder_findings(p)
    elif p.is_file():
        _readable(p)
        files = [p]
    else:
        raise AuditError(f"{p} is not a regular file or folder")
    own_dir = workdir is None
    wd = Path(tempfile.mkdtemp(prefix="llmlab-audit-")) if own_dir else Path(workdir)
    own_worker = worker is None
    results: list[FileAudit] = []

    def get_worker() -> Worker:
        nonlocal worker
        if worker is None:
            worker = Worker(wd / "worker")
        return worker

    try:
        for i, f in enumerate(files):
            fa = audit_file(f, get_worker, wd / f"file-{i}", timeout)
            if p.is_dir():
                fa.path = str(f.relative_to(p))
            results.append(fa)
    finally:
        if own_worker and worker is not None:
            worker.close()
        if own_dir:
            shutil.rmtree(wd, ignore_errors=True)
    return AuditResult(str(p), results, skipped, findings, round(time.perf_counter() - t0, 3))


# ----------------------------------------------------------------------------- output


def audit_dict(res: AuditResult) -> dict[str, Any]:
    """Everything in an AuditResult as plain JSON-able data."""
    import dataclasses

    return {"path": res.path, "status": res.status, "exit_code": res.exit_code, "seconds": res.seconds,
            "skipped": res.skipped, "findings": [dataclasses.asdict(f) for f in res.findings],
            "files": [{**dataclasses.asdict(fa), "status": fa.status} for fa in res.files]}


def write_audit_report(res: AuditResult, out: str | Path) -> Path:
    """report.json / report.html / report.md for an audit, through the shared report writer."""
    from llmlab.security.report import Section, write_report

    rows = [[loc, f.severity, f.check, f.message] for loc, f in res.all_findings()]
    verdicts = [[fa.path, v.tool, v.state, "yes" if v.blocking else "advisory", v.detail]
                for fa in res.files for v in fa.verdicts]
    files = [[fa.path, fa.format, fa.size, fa.status] for fa in res.files]
    sections = [Section("Files", header=["file", "format", "bytes", "status"], rows=files),
                Section("Findings", header=["where", "severity", "check", "message"], rows=rows)]
    if verdicts:
        sections.append(Section("Scanners and loaders, side by side",
                                "Each scanner ran as a library in a child process; torch.load(weights_only=True) "
                                "ran in another. 'advisory' verdicts are shown but do not change the status.",
                                header=["file", "tool", "verdict", "counts", "exact finding"], rows=verdicts))
    summary = (f"{res.path}: {res.status} ({len(res.files)} model files, "
               f"{sum(f.counts for _, f in res.all_findings())} findings that count)")
    return write_report(out, "audit", audit_dict(res), sections, summary, config={"path": res.path})
