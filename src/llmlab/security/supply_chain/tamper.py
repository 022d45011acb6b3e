"""Tamper checks for the lab: sign a small run folder, change copies of it one way each, and record what
`verify_folder` says, next to what model_signing 1.1.1 says when used directly where the two differ."""

from __future__ import annotations

import base64
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmlab.errors import ModelLoadError
from llmlab.signing import (
    SIGNATURE_FILE,
    forge_manifest_signature,
    generate_keypair,
    sign_folder,
    verify_folder,
)


def flip_byte(path: Path, offset: int = -5) -> None:
    """Flip the lowest bit of one byte of a file (by default near its end, inside the tensor data)."""
    b = bytearray(path.read_bytes())
    b[offset] ^= 1
    path.write_bytes(bytes(b))


def rename_tensor(path: Path) -> tuple[str, str]:
    """Rename the first tensor of a safetensors file (llmlab wrote it); return (old, new)."""
    from safetensors.torch import load_file, save_file

    t = load_file(str(path))
    old = sorted(t)[0]
    t[old + "_renamed"] = t.pop(old)
    save_file(t, str(path), metadata={"format": "pt"})
    return old, old + "_renamed"


def edit_signature(sig: Path) -> None:
    """Replace one digest inside the signed statement without re-signing it."""
    bundle = json.loads(sig.read_text())
    st = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    st["predicate"]["resources"][0]["digest"] = "00" * 32
    bundle["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(st).encode()).decode()
    sig.write_text(json.dumps(bundle))


def _verify(folder: Path, pub: str) -> tuple[str, str]:
    try:
        r = verify_folder(folder, pub)
    except ModelLoadError as e:
        return "failed", str(e)
    return "passed", f"verified {len(r.files)} files"


def _upstream(fn: Callable[[], None]) -> str:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - whatever model_signing raises is the answer
        return f"failed: {str(e)[:200]}"
    return "passed"


def run_tamper_checks(root: str | Path) -> list[dict[str, Any]]:
    """Sign ROOT/model with a fresh key and run each tamper case on a copy; return one row per case."""
    from model_signing import verifying

    from llmlab.checkpoint import check_manifest
    from llmlab.security.supply_chain.payloads import _benign_safetensors

    root = Path(root)
    shutil.rmtree(root, ignore_errors=True)
    (root / "keys").mkdir(parents=True)
    kp = generate_keypair(root / "keys" / "signer.key")
    other = generate_keypair(root / "keys" / "other.key")
    base = root / "model"
    base.mkdir()
    _benign_safetensors(base)
    (base / "README.md").write_text("a tiny llmlab run folder, signed for the tamper checks\n")
    sign_folder(base, kp.private_key)
    rows: list[dict[str, Any]] = []

    def case(name: str, mutate: Callable[[Path], None], pub: str = kp.public_key, expect: str = "failed",
             upstream: Callable[[Path], str] | None = None) -> None:
        folder = root / ("case-" + "".join(ch if ch.isalnum() else "-" for ch in name.lower())[:40])
        shutil.copytree(base, folder)
        mutate(folder)
        result, message = _verify(folder, pub)
        row = {"case": name, "llmlab": result, "expected": expect, "message": message}
        if upstream is not None:
            row["upstream"] = upstream(folder)
        rows.append(row)

    case("an untouched copy", lambda f: None, expect="passed")
    case("one flipped byte in the weights", lambda f: flip_byte(f / "model.safetensors"))
    case("an added file", lambda f: (f / "extra.py").write_text("print('not signed')\n"))
    case("a removed file", lambda f: (f / "README.md").unlink())
    case("a renamed tensor", lambda f: rename_tensor(f / "model.safetensors"))
    case("the signature edited (one digest replaced)", lambda f: edit_signature(f / SIGNATURE_FILE))
    case("verified with another public key", lambda f: None, pub=other.public_key)
    outside = root / "outside.txt"
    outside.write_text("a file outside the model folder\n")

    def dotdot(f: Path) -> None:
        forge_manifest_signature(f, kp.private_key, {"../outside.txt": outside}, f / SIGNATURE_FILE)

    def upstream_dotdot(f: Path) -> str:
        cfg = verifying.Config().use_elliptic_key_verifier(public_key=kp.public_key).set_ignore_unsigned_files(True)
        res = _upstream(lambda: cfg.verify(f, f / SIGNATURE_FILE))
        return res + (" (with ignore_unsigned_files it hashed ../outside.txt)" if res == "passed" else "")

    case("a signed manifest naming ../outside.txt (PR 647)", dotdot, upstream=upstream_dotdot)

    # PR 650: model A's signer left extra.bin unsigned; model B's did not, and someone planted extra.bin in B
    a, b = root / "reuse-a", root / "reuse-b"
    for m in (a, b):
        shutil.copytree(base, m)
        (m / SIGNATURE_FILE).unlink()
    sign_folder(a, kp.private_key, ignore=["extra.bin"])
    sign_folder(b, kp.private_key)
    (b / "extra.bin").write_bytes(b"planted after signing")
    verify_folder(a, kp.public_key)
    result, message = _verify(b, kp.public_key)
    shared = verifying.Config().use_elliptic_key_verifier(public_key=kp.public_key)
    shared.verify(a, a / SIGNATURE_FILE)
    up = _upstream(lambda: shared.verify(b, b / SIGNATURE_FILE))
    rows.append({"case": "one verifier reused across two models (PR 650)", "llmlab": result, "expected": "failed",
                 "message": message,
                 "upstream": up + (" (the reused Config skipped extra.bin, ignored for model A)" if up == "passed"
                                   else "")})
    # the SHA-256 manifest every llmlab run folder carries, checked on every load
    runf = root / "run-manifest"
    shutil.copytree(base, runf)
    flip_byte(runf / "model.safetensors")
    try:
        check_manifest(runf, cache=False)
        rows.append({"case": "run folder, no signature: one flipped byte (manifest.json)", "llmlab": "passed",
                     "expected": "failed", "message": "manifest matched"})
    except ModelLoadError as e:
        rows.append({"case": "run folder, no signature: one flipped byte (manifest.json)", "llmlab": "failed",
                     "expected": "failed", "message": str(e)})
    return rows
