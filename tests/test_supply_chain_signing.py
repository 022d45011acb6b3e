"""Signing and verifying folders with model_signing and a local EC key: offline, and every tamper fails with a
message naming what changed, including the two model_signing 1.1.1 weaknesses (PR 647, PR 650)."""

from __future__ import annotations

import re
import shutil
import socket
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from llmlab.errors import ModelLoadError
from llmlab.security.supply_chain import (
    SigningError,
    VerificationError,
    generate_keypair,
    sign_folder,
    verify_folder,
)
from llmlab.security.supply_chain.tamper import edit_signature, flip_byte, rename_tensor
from llmlab.signing import forge_manifest_signature


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("keys")
    return generate_keypair(d / "signer.key"), generate_keypair(d / "other.key")


@pytest.fixture
def signed(tmp_path: Path, keys) -> Path:
    m = tmp_path / "model"
    (m / "tokenizer").mkdir(parents=True)
    save_file({"wte": torch.randn(8, 4), "ln.weight": torch.ones(4)}, str(m / "model.safetensors"))
    (m / "config.json").write_text('{"n_embd": 4}')
    (m / "tokenizer" / "vocab.json").write_text('["a", "b"]')
    sign_folder(m, keys[0].private_key)
    return m


def test_keys_are_p256_and_private(keys) -> None:
    from cryptography.hazmat.primitives import serialization

    priv = Path(keys[0].private_key)
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert serialization.load_pem_private_key(priv.read_bytes(), None).curve.name == "secp256r1"
    with pytest.raises(SigningError, match="exists"):
        generate_keypair(priv)


def test_sign_then_verify_passes_offline(tmp_path: Path, keys, monkeypatch: pytest.MonkeyPatch) -> None:
    attempts = []

    def refuse(*a, **k):
        attempts.append(a)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    m = tmp_path / "m"
    m.mkdir()
    save_file({"w": torch.ones(3)}, str(m / "model.safetensors"))
    s = sign_folder(m, keys[0].private_key)
    assert s.files == ["model.safetensors"] and "model.sig" in s.ignored
    v = verify_folder(m, keys[0].public_key)
    assert v.files == ["model.safetensors"] and attempts == []


def _added(m: Path) -> None:
    (m / "notes.py").write_text("print('x')")


TAMPERS = {
    "flipped_byte": (lambda m: flip_byte(m / "model.safetensors"), "model.safetensors changed"),
    "added_file": (_added, "notes.py was added"),
    "removed_file": (lambda m: (m / "tokenizer" / "vocab.json").unlink(), "tokenizer/vocab.json was removed"),
    "renamed_tensor": (lambda m: rename_tensor(m / "model.safetensors"), "model.safetensors changed"),
    "edited_signature": (lambda m: edit_signature(m / "model.sig"), "does not verify"),
    "removed_signature": (lambda m: (m / "model.sig").unlink(), "has no signature"),
}


@pytest.mark.parametrize("kind", sorted(TAMPERS))
def test_each_tamper_fails_naming_what_changed(kind: str, signed: Path, keys) -> None:
    mutate, words = TAMPERS[kind]
    mutate(signed)
    with pytest.raises(VerificationError, match=re.escape(words)) as e:
        verify_folder(signed, keys[0].public_key)
    assert isinstance(e.value, ModelLoadError)  # what llmlab.load(..., verify=PUB) raises


def test_another_key_fails(signed: Path, keys) -> None:
    with pytest.raises(VerificationError, match="another key"):
        verify_folder(signed, keys[1].public_key)
    with pytest.raises(VerificationError, match="not a PEM public key"):
        verify_folder(signed, keys[0].private_key)


def test_manifest_path_outside_the_folder_is_refused(signed: Path, keys, tmp_path: Path) -> None:
    """model-transparency PR 647: a signed manifest naming ../outside.txt."""
    from model_signing import verifying

    outside = tmp_path / "outside.txt"
    outside.write_text("not part of the model")
    forge_manifest_signature(signed, keys[0].private_key, {"../outside.txt": outside}, signed / "model.sig")
    with pytest.raises(VerificationError, match=r"'\.\./outside\.txt', a path outside"):
        verify_folder(signed, keys[0].public_key)
    # model_signing 1.1.1 alone, with ignore_unsigned_files, hashes the outside file and passes
    cfg = verifying.Config().use_elliptic_key_verifier(public_key=keys[0].public_key).set_ignore_unsigned_files(True)
    try:
        cfg.verify(signed, signed / "model.sig")
    except ValueError:
        pytest.skip("this model_signing release refuses the path itself")


def test_a_verifier_is_never_reused_across_models(tmp_path: Path, signed: Path, keys) -> None:
    """model-transparency PR 650: model A leaves extra.bin unsigned; B does not, and gets extra.bin planted."""
    from model_signing import verifying

    a, b = tmp_path / "a", tmp_path / "b"
    for m in (a, b):
        shutil.copytree(signed, m)
        (m / "model.sig").unlink()
    sign_folder(a, keys[0].private_key, ignore=["extra.bin"])
    sign_folder(b, keys[0].private_key)
    (b / "extra.bin").write_bytes(b"planted")
    assert verify_folder(a, keys[0].public_key).files
    with pytest.raises(VerificationError, match="extra.bin was added"):
        verify_folder(b, keys[0].public_key)
    shared = verifying.Config().use_elliptic_key_verifier(public_key=keys[0].public_key)
    shared.verify(a, a / "model.sig")
    try:
        shared.verify(b, b / "model.sig")  # model_signing 1.1.1: the reused Config skips extra.bin
    except ValueError:
        pytest.skip("this model_signing release scopes the hashing config per call")


def test_bad_inputs(tmp_path: Path, signed: Path, keys) -> None:
    with pytest.raises(SigningError, match="not a folder or file"):
        sign_folder(tmp_path / "nope", keys[0].private_key)
    with pytest.raises(SigningError, match="keygen"):
        sign_folder(signed, tmp_path / "missing.key")
    with pytest.raises(SigningError, match="not a PEM private key"):
        sign_folder(signed, keys[0].public_key)
    with pytest.raises(VerificationError, match="no such folder or file"):
        verify_folder(tmp_path / "nope", keys[0].public_key)
    with pytest.raises(VerificationError, match="no such file"):
        verify_folder(signed, tmp_path / "missing.pub")
    (signed / "link").symlink_to(signed / "config.json")
    with pytest.raises(VerificationError, match="symlinks"):
        verify_folder(signed, keys[0].public_key)
    with pytest.raises(SigningError, match="symlinks"):
        sign_folder(signed, keys[0].private_key)


def test_a_single_model_file_is_signed_whole(tmp_path: Path, keys) -> None:
    f = tmp_path / "model.gguf"
    f.write_bytes(b"GGUF" + bytes(100))
    r = sign_folder(f, keys[0].private_key)
    assert Path(r.signature) == tmp_path / "model.gguf.sig"
    verify_folder(f, keys[0].public_key)
    flip_byte(f)
    with pytest.raises(VerificationError, match="model.gguf differs from what was signed"):
        verify_folder(f, keys[0].public_key)


def test_load_refuses_a_folder_whose_signature_does_not_verify(tmp_path: Path) -> None:
    import llmlab
    from llmlab.checkpoint import save_run_model
    from llmlab.config import ModelConfig
    from llmlab.models import build_model
    from llmlab.signing import VerificationError, generate_keypair, sign_folder

    run = tmp_path / "run"
    save_run_model(run, build_model(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=11)))
    keys = generate_keypair(tmp_path / "k.pem")
    pub = keys.public_key
    sign_folder(run, keys.private_key)
    assert llmlab.load(run, verify=pub).config.n_embd == 16  # signed and unchanged: loads
    w = run / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 1
    w.write_bytes(bytes(data))
    with pytest.raises(VerificationError, match="model.safetensors"):
        llmlab.load(run, verify=pub)
