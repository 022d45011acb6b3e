"""Run folders: safetensors weights + JSON config + tokenizer + a SHA-256 manifest, written atomically."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from llmlab.config import ModelConfig
from llmlab.errors import ConfigError, ModelLoadError
from llmlab.models import build_model
from llmlab.tokenizers import load_tokenizer

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
MANIFEST_FILE = "manifest.json"


# ----------------------------------------------------------------------------- atomic writes


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write data to path via a temporary file, fsync and rename: readers see the old or the new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a written file gets the usual mode (0644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: str | Path,
                        metadata: dict[str, str] | None = None) -> None:
    """save_file through a temporary name and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- weights


def unique_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """state_dict without the second name of tied parameters (safetensors stores each tensor once)."""
    seen: set[int] = set()
    out = {}
    for name, t in model.state_dict(keep_vars=False).items():
        key = t.data_ptr()
        if key in seen and t.numel():
            continue
        seen.add(key)
        out[name] = t
    return out


def load_weights_into(model: torch.nn.Module, path: str | Path) -> None:
    """Load a safetensors file into model; only tied duplicates may be missing."""
    path = Path(path)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read weights {path}: {e}; the file is truncated or corrupt — "
                             "re-export it or resume from an earlier checkpoint") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight", "mlm_decoder.weight"}
    missing = [m for m in missing if m not in tied]
    if missing or unexpected:
        raise ModelLoadError(f"weights in {path} do not fit the model in its config.json "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]}); was the config edited?")


# ----------------------------------------------------------------------------- run folders


def save_run_model(folder: str | Path, model: torch.nn.Module, tokenizer: Any = None,
                   extra_config: dict[str, Any] | None = None) -> None:
    """Write model.safetensors, config.json (model config + extra), tokenizer/ and manifest.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors(unique_state_dict(model), folder / WEIGHTS_FILE, metadata={"format": "llmlab"})
    if tokenizer is not None:
        tokenizer.save(folder / TOKENIZER_DIR)
    cfg = {"llmlab": {"format_version": FORMAT_VERSION}, "model": model.config.to_dict(), **(extra_config or {})}
    atomic_write_json(folder / CONFIG_FILE, cfg)
    write_manifest(folder)


def write_manifest(folder: str | Path) -> None:
    """manifest.json: SHA-256 of the weights and config, to detect tampering or corruption."""
    folder = Path(folder)
    files = {n: sha256_file(folder / n) for n in (WEIGHTS_FILE, CONFIG_FILE) if (folder / n).exists()}
    atomic_write_json(folder / MANIFEST_FILE, {"sha256": files})


# (path, size, mtime, ctime, inode) -> digest, for files already hashed in this process: a file changed in place
# gets a new ctime, which no user can set, so a cached entry never hides a change
_VERIFIED: dict[tuple[str, int, int, int, int], str] = {}


def _file_key(p: Path) -> tuple[str, int, int, int, int]:
    st = p.stat()
    return (str(p.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def check_manifest(folder: str | Path, cache: bool = True) -> int:
    """Check the files listed in a run folder's manifest.json against their SHA-256; return how many were
    checked (0 when the folder has no manifest). Raises ModelLoadError naming the first file that differs or is
    missing. With cache=True a file already checked in this process, and not changed since, is not re-read."""
    folder = Path(folder)
    mpath = folder / MANIFEST_FILE
    if not mpath.is_file():
        return 0
    try:
        listed = json.loads(mpath.read_text())["sha256"]
        if not isinstance(listed, dict):
            raise TypeError
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise ModelLoadError(f"{mpath} is malformed (no 'sha256' map); restore it or rewrite it by re-saving the "
                             "run") from None
    for name, digest in listed.items():
        p = folder / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise ModelLoadError(f"{mpath} lists {name!r}, a path outside the run folder; the manifest was forged")
        if not p.is_file():
            raise ModelLoadError(f"{p} is listed in {mpath} but missing; the run folder is incomplete — restore "
                                 "the file from a checkpoint or backup")
        key = _file_key(p)
        actual = _VERIFIED.get(key) if cache else None
        if actual is None:
            actual = sha256_file(p)
        if actual != digest:
            raise ModelLoadError(f"{p} does not match its SHA-256 in {mpath} (expected {digest[:12]}…, got "
                                 f"{actual[:12]}…): the file was changed or corrupted after the run saved it — "
                                 "restore it, or re-save the run if you changed it on purpose")
        _VERIFIED[key] = actual
    return len(listed)


def is_run_folder(folder: str | Path) -> bool:
    p = Path(folder) / CONFIG_FILE
    if not p.is_file():
        return False
    try:
        return "llmlab" in json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def read_run_config(folder: str | Path) -> dict[str, Any]:
    """The run's config.json, checked for format version."""
    folder = Path(folder)
    p = folder / CONFIG_FILE
    try:
        cfg = json.loads(p.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{folder} has no {CONFIG_FILE}; point at a run folder made by `llmlab train`") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{p} is not valid JSON ({e}); restore it from a checkpoint") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("llmlab"), dict):
        raise ModelLoadError(f"{p} is not an llmlab run config (no 'llmlab' section); point at a run folder")
    version = cfg["llmlab"].get("format_version")
    if version != FORMAT_VERSION:
        raise ModelLoadError(f"{folder} was written by an incompatible llmlab (run format {version}, this "
                             f"llmlab reads {FORMAT_VERSION}); retrain it or use the llmlab version that made it")
    return cfg


def load_run_model(folder: str | Path) -> torch.nn.Module:
    """The model of an llmlab run folder, in eval mode, with .tokenizer set when the run has one."""

    folder = Path(folder)
    cfg = read_run_config(folder)
    check_manifest(folder)
    try:
        mcfg = ModelConfig.from_dict(cfg["model"])
    except KeyError:
        raise ModelLoadError(f"{folder / CONFIG_FILE} has no 'model' section; the run folder is incomplete") from None
    except (ConfigError, TypeError, ValueError) as e:
        raise ModelLoadError(f"{folder / CONFIG_FILE}: {e}") from None
    if not (folder / WEIGHTS_FILE).is_file():
        raise ModelLoadError(f"{folder} has no {WEIGHTS_FILE}; the run did not finish saving — resume it")
    model = build_model(mcfg)
    load_weights_into(model, folder / WEIGHTS_FILE)
    if (folder / TOKENIZER_DIR).is_dir():
        model.tokenizer = load_tokenizer(folder / TOKENIZER_DIR)
    return model.eval()
