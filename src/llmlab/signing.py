"""Signing and verifying run folders and model folders with OpenSSF model_signing, offline, with a local EC key.

`sign_folder` hashes every file of the folder (SHA-256 per file; the signature file itself and git metadata are
left out) and writes a Sigstore bundle (`model.sig` in the folder by default) signed with a P-256 private key.
A single model file (a GGUF, say) is signed whole, its signature beside it as FILE.sig.
`verify_folder` checks that bundle against a public key and re-hashes the folder; any change fails with a
message naming what changed: a file whose bytes differ (one flipped byte, a renamed tensor), a file added, a file
removed. Two weaknesses of model_signing 1.1.1 are closed here rather than inherited:

- a signed manifest naming a path outside the folder (`../secret`) is refused before anything is hashed
  (sigstore/model-transparency PR 647: with ignore_unsigned_files the verifier would hash that outside file);
- every verification builds a fresh verifying.Config, so ignore paths or a hashing configuration guessed for one
  model never carry over to the next (model-transparency PR 650: a reused Config let an unsigned file planted at
  an earlier model's ignored path through).

Key-based signing needs no network: no transparency log, no OIDC; the tests check it with sockets blocked."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from llmlab.errors import LlmlabError, ModelLoadError


class SigningError(LlmlabError):
    """A folder could not be signed (no key, unreadable files)."""


class VerificationError(ModelLoadError):
    """A signature does not verify: the message names what changed."""

SIGNATURE_FILE = "model.sig"
CURVES = ("secp256r1", "secp384r1", "secp521r1")  # what model_signing accepts


@dataclass
class KeyPair:
    """Paths of a new key pair and the SHA-256 of the public key (what model_signing records as the key hint)."""

    private_key: str
    public_key: str
    fingerprint: str


@dataclass
class SignResult:
    """A signed folder: the signature path, the files it covers, the paths left out."""

    folder: str
    signature: str
    files: list[str]
    ignored: list[str]
    key_fingerprint: str
    seconds: float


@dataclass
class VerifyResult:
    """A verified folder: the files the signature covers (all matched) and the paths its signer left out."""

    folder: str
    signature: str
    files: list[str]
    ignored: list[str]
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _pub_fingerprint(pub: Any) -> str:
    from cryptography.hazmat.primitives import serialization

    raw = pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(raw).hexdigest()


def generate_keypair(private_key: str | Path, public_key: str | Path | None = None,
                     overwrite: bool = False) -> KeyPair:
    """Write a new EC P-256 key pair as PEM files (the private key readable by its owner only); the public key
    goes to `public_key` or PRIVATE.pub. Existing files are never replaced unless `overwrite`."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    priv = Path(private_key)
    pub = Path(public_key) if public_key is not None else priv.with_name(priv.name + ".pub")
    for p in (priv, pub):
        if p.exists() and not overwrite:
            raise SigningError(f"{p} exists; choose another path (a key is never overwritten)")
        if not p.parent.is_dir():
            raise SigningError(f"the folder {p.parent} does not exist")
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(priv, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    os.chmod(priv, 0o600)
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return KeyPair(str(priv), str(pub), _pub_fingerprint(key.public_key()))


def _load_private(path: Path) -> Any:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if not path.is_file():
        raise SigningError(f"private key {path}: no such file; make one with `llmlab supply-chain keygen {path}`")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), None)
    except TypeError:
        raise SigningError(f"private key {path} is encrypted; llmlab signs with unencrypted PEM keys") from None
    except (ValueError, OSError) as e:
        raise SigningError(f"private key {path} is not a PEM private key ({e})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name not in CURVES:
        raise SigningError(f"private key {path} is not an EC P-256/P-384/P-521 key; model_signing signs only with "
                           "those")
    return key


def _load_public(path: Path) -> Any:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if not path.is_file():
        raise VerificationError(f"public key {path}: no such file")
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (ValueError, OSError) as e:
        raise VerificationError(f"public key {path} is not a PEM public key ({e}); give the .pub file") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in CURVES:
        raise VerificationError(f"public key {path} is not an EC P-256/P-384/P-521 key")
    return key


def _symlinks(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_symlink())


def _inside(folder: Path, p: Path) -> str | None:
    try:
        return str(p.resolve().relative_to(folder.resolve()))
    except ValueError:
        return None


def default_signature(path: str | Path) -> Path:
    """Where the signature of a folder (FOLDER/model.sig) or of a single file (FILE.sig) goes by default."""
    p = Path(path)
    return p / SIGNATURE_FILE if p.is_dir() else p.with_name(p.name + ".sig")


def sign_folder(folder: str | Path, private_key: str | Path, signature: str | Path | None = None,
                ignore: Iterable[str] = ()) -> SignResult:
    """Sign every file of `folder` (or one model file) with the EC private key; write the bundle to
    `signature` (default FOLDER/model.sig, or FILE.sig). `ignore` lists further paths inside the folder to
    leave unsigned."""
    from model_signing import hashing, signing

    t0 = time.perf_counter()
    folder = Path(folder)
    if folder.is_symlink() or not folder.exists():
        raise SigningError(f"{folder} is not a folder or file; give a run folder, a model folder or a model file")
    key = _load_private(Path(private_key))
    sig = Path(signature) if signature is not None else default_signature(folder)
    if folder.is_file():
        if list(ignore):
            raise SigningError("--ignore applies to folders; a single file is signed whole")
        tmp = sig.with_name(f".{sig.name}.{os.getpid()}.tmp")
        try:
            signing.Config().use_elliptic_key_signer(private_key=private_key).sign(folder, tmp)
            os.replace(tmp, sig)
        finally:
            tmp.unlink(missing_ok=True)
        return SignResult(str(folder), str(sig), [folder.name], [], _pub_fingerprint(key.public_key()),
                          round(time.perf_counter() - t0, 3))
    links = _symlinks(folder)
    if links:
        raise SigningError(f"{folder} holds symlinks ({', '.join(links[:3])}); copy the files in instead")
    ignored = [str(PurePosixPath(p)) for p in ignore]
    bad = [p for p in ignored if PurePosixPath(p).is_absolute() or ".." in PurePosixPath(p).parts]
    if bad:
        raise SigningError(f"--ignore {bad[0]}: give a path inside the folder")
    rel = _inside(folder, sig)
    if rel is not None:
        ignored.append(rel)
    hc = hashing.Config().set_ignored_paths(paths=ignored, ignore_git_paths=True)
    tmp = sig.with_name(f".{sig.name}.{os.getpid()}.tmp")
    try:
        signing.Config().set_hashing_config(hc).use_elliptic_key_signer(private_key=private_key).sign(folder, tmp)
        os.replace(tmp, sig)
    finally:
        tmp.unlink(missing_ok=True)
    files, ignored_rec, _ = _read_bundle(sig)
    return SignResult(str(folder), str(sig), files, ignored_rec, _pub_fingerprint(key.public_key()),
                      round(time.perf_counter() - t0, 3))


def _read_bundle(sig: Path) -> tuple[list[str], list[str], dict[str, Any]]:
    """The resource names, the ignore paths and the serialization of a signature bundle (not yet verified)."""
    try:
        bundle = json.loads(sig.read_text())
        statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
        pred = statement["predicate"]
        names = [r["name"] for r in pred["resources"]]
        ser = pred["serialization"]
        return names, list(ser.get("ignore_paths") or []), ser
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise VerificationError(f"{sig} is not a model_signing signature bundle ({type(e).__name__}: {e}); "
                                "re-sign the folder with `llmlab sign`") from None


def _escapes(name: str) -> bool:
    p = PurePosixPath(name.replace("\\", "/"))
    return p.is_absolute() or ".." in p.parts or (len(name) > 1 and name[1] == ":")


def _diff(folder: Path, sig: Path, ser: dict[str, Any]) -> list[str]:
    """What differs between the folder and the signed manifest, file by file."""
    from model_signing import hashing

    bundle = json.loads(sig.read_text())
    pred = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))["predicate"]
    expected = {r["name"]: r["digest"] for r in pred["resources"]}
    hc = hashing.Config().use_file_serialization(hashing_algorithm=ser.get("hash_type", "sha256"),
                                                 allow_symlinks=bool(ser.get("allow_symlinks")))
    hc.set_ignored_paths(paths=ser.get("ignore_paths") or [], ignore_git_paths=True)
    actual = {rd.identifier: rd.digest.digest_hex for rd in hc.hash(folder).resource_descriptors()}
    out = [f"{n} changed (its SHA-256 differs from the signed one)" for n in sorted(expected)
           if n in actual and actual[n] != expected[n]]
    out += [f"{n} was added (not in the signature)" for n in sorted(set(actual) - set(expected))]
    out += [f"{n} was removed (the signature lists it)" for n in sorted(set(expected) - set(actual))]
    return out


def verify_folder(path: str | Path, public_key: str | Path, signature: str | Path | None = None) -> VerifyResult:
    """Verify a folder (or one model file) against its signature (default PATH/model.sig, or FILE.sig) and the
    EC public key; this is what llmlab.load(..., verify=PUB) calls. Raises
    VerificationError (a ModelLoadError) naming what changed: files changed, added or removed, a signature made
    by another key or altered, or a signed manifest that names paths outside the folder."""
    from cryptography.exceptions import InvalidSignature
    from model_signing import verifying

    t0 = time.perf_counter()
    folder = Path(path)
    if not folder.exists():
        raise VerificationError(f"{folder}: no such folder or file")
    if folder.is_symlink() or not (folder.is_dir() or folder.is_file()):
        raise VerificationError(f"{folder} is not a folder or a regular file")
    pub = Path(public_key)
    _load_public(pub)
    sig = Path(signature) if signature is not None else default_signature(folder)
    if not sig.is_file():
        raise VerificationError(f"{folder} has no signature {sig}; sign it with `llmlab sign {folder} --key KEY`")
    names, ignored, ser = _read_bundle(sig)
    outside = [n for n in names + ignored if _escapes(n)]
    if outside:
        raise VerificationError(f"the signed manifest in {sig} names {outside[0]!r}, a path outside {folder}; "
                                "refusing to read it (model-transparency PR 647)")
    if ser.get("method") != "files":
        raise VerificationError(f"{sig} uses the {ser.get('method')!r} serialization; llmlab verifies per-file "
                                "signatures made by `llmlab sign`")
    links = _symlinks(folder) if folder.is_dir() else []
    if links:
        raise VerificationError(f"{folder} holds symlinks ({', '.join(links[:3])}), which the signature cannot "
                                "cover")
    cfg = verifying.Config().use_elliptic_key_verifier(public_key=pub)  # fresh per call (PR 650)
    try:
        cfg.verify(folder, sig)
    except InvalidSignature:
        raise VerificationError(f"the signature in {sig} does not verify with {pub}: the signature file was altered "
                                "or another key made it") from None
    except ValueError as e:
        msg = str(e)
        if msg.startswith("Key mismatch"):
            raise VerificationError(f"{sig} was signed by another key than {pub} (the key hint in the signature "
                                    "does not match); ask the publisher for their public key") from None
        if msg.startswith("Signature mismatch"):
            if folder.is_file():
                raise VerificationError(f"{folder} differs from what was signed: its SHA-256 changed") from None
            changes = _diff(folder, sig, ser) or [msg]
            raise VerificationError(f"{folder} differs from what was signed: {'; '.join(changes)}") from None
        raise VerificationError(f"{folder} does not verify: {msg}") from None
    except Exception as e:  # noqa: BLE001 - a malformed bundle can fail deep inside protobuf parsing
        raise VerificationError(f"{sig} is not a valid signature bundle ({type(e).__name__}: {e})") from None
    warnings = [f"{p} exists but its signer left it unsigned" for p in ignored if folder.is_dir()
                and (folder / p).is_file() and p != SIGNATURE_FILE and not p.startswith(".git")]
    return VerifyResult(str(folder), str(sig), names, ignored, warnings, round(time.perf_counter() - t0, 3))


# ----------------------------------------------------------------------------- the lab's attacks on signatures


def forge_manifest_signature(folder: str | Path, private_key: str | Path, extra: dict[str, Path],
                             signature: str | Path) -> None:
    """Sign a manifest of `folder` that also lists `extra` names (e.g. '../outside.txt') with the digests of the
    given files, as a compromised or careless signer could (model-transparency PR 647). Lab and tests only."""
    from model_signing import hashing, manifest
    from model_signing._hashing.hashing import Digest
    from model_signing._signing import sign_ec_key, signing

    folder = Path(folder)
    m = hashing.Config().set_ignored_paths(paths=[Path(signature).name]).hash(folder)
    items = [manifest.FileManifestItem(path=PurePosixPath(rd.identifier), digest=rd.digest)
             for rd in m.resource_descriptors()]
    for name, src in extra.items():
        digest = Digest("sha256", hashlib.sha256(Path(src).read_bytes()).digest())
        items.append(manifest.FileManifestItem(path=PurePosixPath(name), digest=digest))
    forged = manifest.Manifest(m.model_name, items, m._serialization_type)  # noqa: SLF001 - same serialization
    sign_ec_key.Signer(Path(private_key)).sign(signing.Payload(forged)).write(Path(signature))
