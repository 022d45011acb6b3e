"""`convert_to_safetensors(file)`: turn a PyTorch pickle checkpoint into safetensors, safely.

Order: the file is audited first (formats, structure, the scanners, weights_only=True); only a clean audit goes
on. The conversion itself runs `torch.load(weights_only=True)` in a child process with its own working folder,
writes the tensors to a temporary file, and the parent then checks the new file's structure and that every
tensor's bytes match what the child loaded, before renaming it into place. llmlab never unpickles the file."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from llmlab.security.supply_chain import formats as F
from llmlab.security.supply_chain.audit import AuditResult, audit
from llmlab.security.supply_chain.common import ConvertError
from llmlab.security.supply_chain.runner import Worker
from llmlab.security.supply_chain.structure import check_safetensors


@dataclass
class ConvertResult:
    """What `convert_to_safetensors` did: status "converted" or "refused" (the audit found something)."""

    source: str
    output: str | None
    status: str
    audit: AuditResult
    tensors: int = 0
    skipped: list[str] = field(default_factory=list)
    reason: str = ""
    seconds: float = 0.0


def _sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _verify_output(tmp: Path, digests: dict[str, str]) -> None:
    """The written file must be a well-formed safetensors file holding exactly the tensors the child loaded."""
    from safetensors import safe_open

    from llmlab.security.supply_chain._worker import tensor_digest

    bad = [f.message for f in check_safetensors(tmp).findings if f.counts]
    if bad:
        raise ConvertError(f"the converted file is malformed ({bad[0]}); nothing was written")
    with safe_open(str(tmp), framework="pt") as st:
        names = set(st.keys())
        if names != set(digests):
            raise ConvertError(f"the converted file holds {len(names)} tensors, the checkpoint {len(digests)}")
        for k in sorted(names):
            if tensor_digest(st.get_tensor(k)) != digests[k]:
                raise ConvertError(f"tensor {k!r} differs after conversion; nothing was written")


def convert_to_safetensors(src: str | Path, out: str | Path | None = None, *, overwrite: bool = False,
                           timeout: float = 600.0, worker: Worker | None = None,
                           workdir: str | Path | None = None) -> ConvertResult:
    """Convert a PyTorch pickle checkpoint (.bin/.pt/.pth/.ckpt) to safetensors at `out` (default: the same name
    with .safetensors) after a clean audit; refuse (status "refused") when the audit finds anything.
    Raises ConvertError for files that are not PyTorch pickle checkpoints, existing outputs, failed conversions."""
    t0 = time.perf_counter()
    src = Path(src)
    if not src.exists():
        raise ConvertError(f"{src}: no such file")
    if not src.is_file():
        raise ConvertError(f"{src} is not a file; give the checkpoint file (.bin, .pt, .pth, .ckpt)")
    try:
        sn = F.sniff(src)
    except OSError as e:
        raise ConvertError(f"cannot read {src}: {e.strerror or e}") from None
    if sn.detail.startswith("corrupt zip"):
        raise ConvertError(f"{src}: {sn.detail}; the archive is damaged — re-download or re-export it")
    if sn.format not in F.PICKLE_FORMATS:
        hint = " (it already is one)" if sn.format == F.SAFETENSORS else ""
        raise ConvertError(f"{src} is {sn.format}, not a PyTorch pickle checkpoint{hint}; llmlab convert turns "
                           ".bin/.pt/.pth/.ckpt checkpoints into safetensors")
    dst = Path(out) if out is not None else src.with_suffix(".safetensors")
    if dst.resolve() == src.resolve():
        raise ConvertError(f"the output {dst} would overwrite the checkpoint; choose --out")
    if dst.exists() and not overwrite:
        raise ConvertError(f"{dst} exists; pass --force to replace it or choose --out")
    if not dst.parent.is_dir():
        raise ConvertError(f"the output folder {dst.parent} does not exist")
    own_dir = workdir is None
    wd = Path(tempfile.mkdtemp(prefix="llmlab-convert-")) if own_dir else Path(workdir)
    own_worker = worker is None
    w = worker if worker is not None else Worker(wd / "worker")
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        a = audit(src, timeout=timeout, worker=w, workdir=wd / "audit")
        if a.status != "clean":
            first = next((f for _, f in a.all_findings() if f.counts), None)
            reason = f"the audit found: {first.message}" if first else "the audit found problems"
            return ConvertResult(str(src), None, "refused", a, reason=reason,
                                 seconds=round(time.perf_counter() - t0, 3))
        meta = {"format": "pt", "converted_by": "llmlab convert", "source_sha256": _sha256(src)}
        ans = w.run("to_safetensors", src, wd / "convert", timeout=timeout, out=str(tmp.absolute()), metadata=meta)
        v = ans.get("verdict") or {}
        if ans.get("created"):
            raise ConvertError(f"loading {src} left files in its working folder ({ans['created'][:3]}): code in it "
                               "ran; nothing was written")
        if ans["status"] != "done" or v.get("state") != "converted":
            raise ConvertError(f"converting {src} failed: {v.get('detail') or ans.get('error')}")
        _verify_output(tmp, v["digests"])
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dst)
        return ConvertResult(str(src), str(dst), "converted", a, tensors=len(v["digests"]),
                             skipped=list(v.get("skipped") or []), seconds=round(time.perf_counter() - t0, 3))
    finally:
        tmp.unlink(missing_ok=True)
        if own_worker:
            w.close()
        if own_dir:
            shutil.rmtree(wd, ignore_errors=True)
