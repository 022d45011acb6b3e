"""What a model file is, told from its first bytes (never from its name): safetensors, GGUF, PyTorch zip, legacy
PyTorch pickle, NumPy .npy/.npz, a bare pickle, another zip, 7z, or unknown. The name only tells what a tool that
trusts extensions would make of it, and a mismatch between the two is itself a finding."""

from __future__ import annotations

import io
import pickle
import pickletools
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

SAFETENSORS = "safetensors"
GGUF = "gguf"
TORCH_ZIP = "pytorch-zip"
TORCH_LEGACY = "pytorch-legacy"
PICKLE = "pickle"
NPY = "numpy-npy"
NPZ = "numpy-npz"
ZIP = "zip"
SEVEN_Z = "7z"
UNKNOWN = "unknown"

PICKLE_FORMATS = (TORCH_ZIP, TORCH_LEGACY, PICKLE)  # formats whose loading runs the pickle VM
TORCH_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER, the first pickle of a legacy file
LEGACY_PREFIX = pickle.dumps(TORCH_MAGIC_NUMBER, protocol=2)

# what an extension promises; files whose content is something else are reported
EXTENSION_FORMATS: dict[str, tuple[str, ...]] = {
    ".safetensors": (SAFETENSORS,),
    ".gguf": (GGUF,),
    ".npy": (NPY,),
    ".npz": (NPZ, ZIP),
    ".pt": (TORCH_ZIP, TORCH_LEGACY),
    ".pth": (TORCH_ZIP, TORCH_LEGACY),
    ".ckpt": (TORCH_ZIP, TORCH_LEGACY),
    ".bin": (TORCH_ZIP, TORCH_LEGACY, SAFETENSORS, PICKLE),
    ".pkl": (PICKLE, TORCH_LEGACY),
    ".pickle": (PICKLE, TORCH_LEGACY),
    ".joblib": (PICKLE,),
}
MODEL_EXTENSIONS = frozenset(EXTENSION_FORMATS) | {".h5", ".keras", ".onnx", ".pb", ".tflite", ".mar", ".dill",
                                                    ".dat", ".data", ".7z", ".zip", ".msgpack", ".model"}


@dataclass
class Sniffed:
    """The format of a file from its content, what else it contains, and its size."""

    format: str
    size: int
    detail: str = ""
    zip_inside: bool = False  # a zip central directory was found although the file does not start as a zip
    members: list[str] = field(default_factory=list)  # zip member names, for zip formats


def _looks_like_pickle(head: bytes) -> bool:
    """A protocol 2+ pickle starts with PROTO; protocol 0/1 pickles are recognised by parsing to a STOP."""
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return True
    if not head or head[:1] not in b"(]}cNIFSVX]KJMGUTlde.":
        return False
    try:
        ops = list(pickletools.genops(io.BytesIO(head)))
    except Exception:  # noqa: BLE001 - pickletools raises several types on non-pickles
        return False
    return bool(ops) and ops[-1][0].name == "STOP" and len(ops) > 1


def sniff(path: str | Path) -> Sniffed:
    """Detect the format of `path` from its first bytes (reads at most 64 KiB plus the zip directory)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(65536)
    zip_inside = False
    if head[:4] not in (b"PK\x03\x04", b"PK\x05\x06"):
        try:
            zip_inside = zipfile.is_zipfile(path)
        except OSError:
            zip_inside = False
    if head[:4] == b"GGUF":
        return Sniffed(GGUF, size, zip_inside=zip_inside)
    if len(head) >= 9 and head[8:9] == b"{":
        n = struct.unpack("<Q", head[:8])[0]
        return Sniffed(SAFETENSORS, size, f"header {n} bytes", zip_inside=zip_inside)
    if head[:6] == b"\x93NUMPY":
        return Sniffed(NPY, size, zip_inside=zip_inside)
    if head[:6] == b"7z\xbc\xaf\x27\x1c":
        return Sniffed(SEVEN_Z, size)
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError) as e:
            return Sniffed(ZIP, size, f"corrupt zip: {e}")
        if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
            return Sniffed(TORCH_ZIP, size, members=names)
        if names and all(n.endswith(".npy") for n in names):
            return Sniffed(NPZ, size, members=names)
        return Sniffed(ZIP, size, members=names)
    if head.startswith(LEGACY_PREFIX):
        return Sniffed(TORCH_LEGACY, size, zip_inside=zip_inside)
    if _looks_like_pickle(head):
        return Sniffed(PICKLE, size, zip_inside=zip_inside)
    return Sniffed(UNKNOWN, size, zip_inside=zip_inside)


def extension_mismatch(path: str | Path, fmt: str) -> str | None:
    """A message when the file's extension promises another format than its content, else None."""
    ext = Path(path).suffix.lower()
    expected = EXTENSION_FORMATS.get(ext)
    if expected is None or fmt in expected:
        return None
    return (f"the extension {ext} promises {' or '.join(expected)} but the content is {fmt}: tools that pick a "
            "parser by extension (scanners, loaders) will read it differently")
