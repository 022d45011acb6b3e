"""Structural checks that read only a file's header, streaming: safetensors (header bounds, JSON, dtypes, shapes
against byte spans, offsets inside the data section, no overlaps, no hidden bytes), GGUF (magic, version, counts,
every metadata value's type, tensor infos, alignment, offsets inside the file, no overlaps, the chat template),
NumPy .npy/.npz headers, and zip archives (member names, duplicates, compression ratio, pickles inside).

None of them loads tensor data: memory stays at the size of the header whatever the size of the file."""

from __future__ import annotations

import json
import math
import re
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from llmlab.security.supply_chain.common import Finding

ST_MAX_HEADER = 100_000_000  # the safetensors library refuses larger headers
ST_DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16,
                 "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "F64": 64, "I64": 64, "U64": 64,
                 "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}


@dataclass
class Structure:
    """What a structural check found, and a summary of the header (tensor count, dtypes, metadata keys...)."""

    findings: list[Finding] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def error(self, msg: str) -> None:
        self.findings.append(Finding("error", "structure", msg))

    def warn(self, msg: str) -> None:
        self.findings.append(Finding("warning", "structure", msg))

    def note(self, msg: str) -> None:
        self.findings.append(Finding("info", "structure", msg))


class _DuplicateKeys(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise _DuplicateKeys(dup)
    return dict(pairs)


def _spans_check(s: Structure, spans: list[tuple[int, int, str]], data_len: int, slack: int, unit: str) -> None:
    """Overlaps are errors; gaps (beyond `slack` padding bytes) and bytes after the last tensor are warnings."""
    pos, prev = 0, None
    for b, e, name in sorted(spans):
        if b < pos:
            s.error(f"tensors {prev!r} and {name!r} overlap ({unit} {b}..{pos}): two names read the same bytes")
        elif b - pos > slack:
            s.warn(f"{b - pos} bytes before tensor {name!r} ({unit} {pos}..{b}) belong to no tensor: hidden data")
        if e > pos:
            pos, prev = e, name
    if data_len - pos > slack:
        s.warn(f"{data_len - pos} bytes after the last tensor belong to no tensor: hidden or appended data")


# ----------------------------------------------------------------------------- safetensors


def check_safetensors(path: str | Path) -> Structure:
    """Check a safetensors header against the format (8-byte little-endian header length, a JSON object of
    {name: {dtype, shape, data_offsets}} plus an optional __metadata__ str->str map, then the raw bytes)."""
    s = Structure()
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            s.error(f"the file is {size} bytes; a safetensors file starts with an 8-byte header length")
            return s
        n = struct.unpack("<Q", raw)[0]
        s.info["header_bytes"] = n
        if n > size - 8:
            s.error(f"the header length {n} runs past the end of the file ({size} bytes): truncated or forged")
            return s
        if n > ST_MAX_HEADER:
            s.error(f"the header is {n} bytes; the safetensors library refuses headers over {ST_MAX_HEADER}")
            return s
        hb = f.read(n)
    try:
        text = hb.decode("utf-8")
    except UnicodeDecodeError as e:
        s.error(f"the header is not UTF-8 ({e})")
        return s
    if not text.startswith("{"):
        s.error("the header does not start with '{'")
        return s
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicates)
    except _DuplicateKeys as e:
        s.warn(f"the header names {e.args[0]!r} twice: JSON parsers disagree on which entry wins")
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        s.error(f"the header is not valid JSON ({e})")
        return s
    if not isinstance(obj, dict):
        s.error("the header is not a JSON object")
        return s
    meta = obj.pop("__metadata__", None)
    if meta is not None:
        if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            s.error("__metadata__ must map strings to strings")
        else:
            s.info["metadata"] = sorted(meta)
    data_len = size - 8 - n
    spans: list[tuple[int, int, str]] = []
    dtypes: dict[str, int] = {}
    params = 0
    for name, t in obj.items():
        if not name:
            s.error("a tensor has an empty name")
        if not isinstance(t, dict) or set(t) != {"dtype", "shape", "data_offsets"}:
            keys = sorted(t) if isinstance(t, dict) else type(t).__name__
            s.error(f"tensor {name!r}: an entry needs exactly dtype, shape and data_offsets (has {keys})")
            continue
        dtype, shape, offs = t["dtype"], t["shape"], t["data_offsets"]
        if dtype not in ST_DTYPE_BITS:
            s.error(f"tensor {name!r}: unknown dtype {dtype!r}")
            continue
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            s.error(f"tensor {name!r}: shape {shape!r} is not a list of non-negative integers")
            continue
        if (not isinstance(offs, list) or len(offs) != 2 or not all(type(o) is int for o in offs)
                or not 0 <= offs[0] <= offs[1]):
            s.error(f"tensor {name!r}: data_offsets {offs!r} is not [begin, end] with 0 <= begin <= end")
            continue
        b, e = offs
        if e > data_len:
            s.error(f"tensor {name!r}: data_offsets [{b}, {e}] end past the data section ({data_len} bytes)")
            continue
        nel = math.prod(shape)
        bits = nel * ST_DTYPE_BITS[dtype]
        if bits % 8 or e - b != bits // 8:
            s.error(f"tensor {name!r}: shape {shape} of {dtype} needs {bits / 8:g} bytes but data_offsets span "
                    f"{e - b}")
            continue
        spans.append((b, e, name))
        dtypes[dtype] = dtypes.get(dtype, 0) + 1
        params += nel
    _spans_check(s, spans, data_len, 0, "data bytes")
    s.info.update(tensors=len(obj), dtypes=dtypes, parameters=params)
    return s


# ----------------------------------------------------------------------------- GGUF


class _Truncated(Exception):
    pass


class _Reader:
    """Buffered little-endian reads from a file, with the absolute position and bounds checks."""

    def __init__(self, f: BinaryIO, size: int) -> None:
        self.f, self.size = f, size
        self.buf, self.bpos, self.base = b"", 0, 0
        self.what = ""

    @property
    def pos(self) -> int:
        return self.base + self.bpos

    def read(self, n: int) -> bytes:
        if self.pos + n > self.size:
            raise _Truncated(f"the header ends inside {self.what} (byte {self.pos} + {n} > file size {self.size})")
        if len(self.buf) - self.bpos < n:
            self.buf = self.buf[self.bpos:] + self.f.read(max(n, 1 << 20))
            self.base += self.bpos
            self.bpos = 0
        out = self.buf[self.bpos:self.bpos + n]
        self.bpos += n
        return out

    def skip(self, n: int) -> None:
        if self.pos + n > self.size:
            raise _Truncated(f"{self.what} runs past the end of the file (byte {self.pos} + {n} > {self.size})")
        if n <= len(self.buf) - self.bpos:
            self.bpos += n
        else:
            target = self.pos + n
            self.f.seek(target)
            self.buf, self.bpos, self.base = b"", 0, target

    def skip_strings(self, count: int) -> None:
        """Skip `count` GGUF strings (a tokenizer's vocabulary) without a method call per string."""
        unpack = struct.unpack_from
        for _ in range(count):
            if len(self.buf) - self.bpos < 8:
                self.read(8)  # refills the buffer (or reports the truncation); then step back onto the length
                self.bpos -= 8
            n = unpack("<Q", self.buf, self.bpos)[0]
            self.bpos += 8
            if n <= len(self.buf) - self.bpos:
                self.bpos += n
            else:
                self.skip(n)

    def u32(self) -> int:
        return struct.unpack("<I", self.read(4))[0]

    def u64(self) -> int:
        return struct.unpack("<Q", self.read(8))[0]

    def string(self, keep: int = 1 << 20) -> str | None:
        """A GGUF string (u64 length + UTF-8 bytes); strings longer than `keep` are skipped and give None."""
        n = self.u64()
        if n > keep:
            self.skip(n)
            return None
        return self.read(n).decode("utf-8", errors="replace")


# GGUFValueType: UINT8 INT8 UINT16 INT16 UINT32 INT32 FLOAT32 BOOL STRING ARRAY UINT64 INT64 FLOAT64
GGUF_TYPES = {0: ("UINT8", "<B"), 1: ("INT8", "<b"), 2: ("UINT16", "<H"), 3: ("INT16", "<h"), 4: ("UINT32", "<I"),
              5: ("INT32", "<i"), 6: ("FLOAT32", "<f"), 7: ("BOOL", "<B"), 8: ("STRING", ""), 9: ("ARRAY", ""),
              10: ("UINT64", "<Q"), 11: ("INT64", "<q"), 12: ("FLOAT64", "<d")}
UNSIGNED = ("UINT8", "UINT16", "UINT32", "UINT64")
# the types llama.cpp's loader expects for standard keys ({arch} is general.architecture)
GGUF_KEY_TYPES: dict[str, tuple[str, ...]] = {
    "general.architecture": ("STRING",), "general.name": ("STRING",), "general.alignment": ("UINT32",),
    "general.file_type": ("UINT32",), "general.quantization_version": ("UINT32",),
    "tokenizer.ggml.model": ("STRING",), "tokenizer.ggml.pre": ("STRING",),
    "tokenizer.ggml.tokens": ("ARRAY[STRING]",), "tokenizer.ggml.merges": ("ARRAY[STRING]",),
    "tokenizer.ggml.scores": ("ARRAY[FLOAT32]",), "tokenizer.ggml.token_type": ("ARRAY[INT32]",),
    "tokenizer.ggml.bos_token_id": ("UINT32",), "tokenizer.ggml.eos_token_id": ("UINT32",),
    "tokenizer.ggml.unknown_token_id": ("UINT32",), "tokenizer.ggml.padding_token_id": ("UINT32",),
    "tokenizer.ggml.add_bos_token": ("BOOL",), "tokenizer.ggml.add_eos_token": ("BOOL",),
    "tokenizer.chat_template": ("STRING",),
    "{arch}.context_length": UNSIGNED, "{arch}.embedding_length": UNSIGNED, "{arch}.block_count": UNSIGNED,
    "{arch}.feed_forward_length": UNSIGNED, "{arch}.attention.head_count": UNSIGNED,
    "{arch}.attention.head_count_kv": UNSIGNED, "{arch}.vocab_size": UNSIGNED,
    "{arch}.rope.dimension_count": UNSIGNED, "{arch}.rope.freq_base": ("FLOAT32",),
    "{arch}.attention.layer_norm_rms_epsilon": ("FLOAT32",), "{arch}.attention.layer_norm_epsilon": ("FLOAT32",),
}
# a chat template is a Jinja program run at every request; these reach Python objects from inside it
TEMPLATE_SUSPICIOUS = re.compile(r"__(class|mro|subclasses|globals|builtins|import|init|base|bases|getattribute)__|"
                                 r"\bos\.|popen|subprocess|\beval\s*\(|\bexec\s*\(|\bsystem\s*\(")
GGML_MAX_DIMS = 4


# ggml tensor types: id -> (elements per block, bytes per block, name), as gguf.constants.GGML_QUANT_SIZES of
# gguf 0.19 (a test keeps the two equal); written out because importing the gguf package costs 0.3 s
GGML_TYPES: dict[int, tuple[int, int, str]] = {
    0: (1, 4, "F32"), 1: (1, 2, "F16"), 2: (32, 18, "Q4_0"), 3: (32, 20, "Q4_1"), 6: (32, 22, "Q5_0"),
    7: (32, 24, "Q5_1"), 8: (32, 34, "Q8_0"), 9: (32, 40, "Q8_1"), 10: (256, 84, "Q2_K"), 11: (256, 110, "Q3_K"),
    12: (256, 144, "Q4_K"), 13: (256, 176, "Q5_K"), 14: (256, 210, "Q6_K"), 15: (256, 292, "Q8_K"),
    16: (256, 66, "IQ2_XXS"), 17: (256, 74, "IQ2_XS"), 18: (256, 98, "IQ3_XXS"), 19: (256, 50, "IQ1_S"),
    20: (32, 18, "IQ4_NL"), 21: (256, 110, "IQ3_S"), 22: (256, 82, "IQ2_S"), 23: (256, 136, "IQ4_XS"),
    24: (1, 1, "I8"), 25: (1, 2, "I16"), 26: (1, 4, "I32"), 27: (1, 8, "I64"), 28: (1, 8, "F64"),
    29: (256, 56, "IQ1_M"), 30: (1, 2, "BF16"), 34: (256, 54, "TQ1_0"), 35: (256, 66, "TQ2_0"),
    39: (32, 17, "MXFP4"), 40: (64, 36, "NVFP4"), 41: (128, 18, "Q1_0"),
}


def _gguf_value(r: _Reader, vtype: int, depth: int = 0) -> tuple[str, Any]:
    """Read one metadata value; return its type name ("ARRAY[STRING]" for arrays) and the value (scalars,
    strings up to 1 MiB) or the element count (arrays)."""
    if vtype not in GGUF_TYPES:
        raise ValueError(f"unknown value type {vtype}")
    name, fmt = GGUF_TYPES[vtype]
    if name == "STRING":
        return name, r.string()
    if name == "ARRAY":
        etype = r.u32()
        count = r.u64()
        if etype not in GGUF_TYPES:
            raise ValueError(f"unknown array element type {etype}")
        ename, efmt = GGUF_TYPES[etype]
        if efmt:
            r.skip(count * struct.calcsize(efmt))
        elif count > (r.size - r.pos) // 8:
            raise _Truncated(f"{r.what} claims {count} elements, more than the file can hold")
        elif ename == "STRING":
            r.skip_strings(count)
        else:
            if depth >= 3:
                raise ValueError("arrays nested more than 3 deep")
            inner = "ARRAY"
            for _ in range(count):
                inner = _gguf_value(r, 9, depth + 1)[0]
            ename = inner
        return f"ARRAY[{ename}]", count
    value = struct.unpack(fmt, r.read(struct.calcsize(fmt)))[0]
    if name == "BOOL" and value not in (0, 1):
        raise ValueError(f"BOOL value {value} is neither 0 nor 1")
    return name, value


def check_gguf(path: str | Path) -> Structure:
    """Check a GGUF header (v2/v3): magic, version, counts, every metadata key and its type, every tensor info
    (name, dims, ggml type, offset), alignment, tensor bytes inside the file and not overlapping."""
    s = Structure()
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        r = _Reader(f, size)
        try:
            _gguf_parse(r, s, size)
        except _Truncated as e:
            s.error(str(e))
        except ValueError as e:
            s.error(f"{r.what}: {e}")
    return s


def _gguf_parse(r: _Reader, s: Structure, size: int) -> None:
    r.what = "the magic"
    if r.read(4) != b"GGUF":
        s.error("the file does not start with the GGUF magic")
        return
    r.what = "the version"
    version = r.u32()
    s.info["version"] = version
    if version not in (2, 3):
        s.error(f"GGUF version {version}: only versions 2 and 3 exist with 64-bit counts")
        return
    r.what = "the counts"
    n_tensors, n_kv = r.u64(), r.u64()
    if n_kv > size // 13 or n_tensors > size // 24:  # each entry takes at least 13 / 24 bytes
        s.error(f"the header claims {n_tensors} tensors and {n_kv} metadata keys, more than {size} bytes can hold")
        return
    kv: dict[str, tuple[str, Any]] = {}
    for i in range(n_kv):
        r.what = f"metadata key #{i}"
        key = r.string(keep=65535)
        if key is None:
            raise ValueError("a key longer than 65535 bytes")
        r.what = f"metadata value {key!r}"
        vtype = r.u32()
        t, v = _gguf_value(r, vtype)
        if key in kv:
            s.warn(f"metadata key {key!r} appears twice: readers disagree on which value wins")
        kv[key] = (t, v)
    arch = kv.get("general.architecture", ("", ""))[1] or ""
    for pattern, allowed in GGUF_KEY_TYPES.items():
        key = pattern.replace("{arch}", str(arch))
        if key in kv and kv[key][0] not in allowed:
            s.error(f"metadata {key!r} is {kv[key][0]}, expected {' or '.join(allowed)}")
    alignment = 32
    if "general.alignment" in kv and kv["general.alignment"][0] == "UINT32":
        alignment = kv["general.alignment"][1]
        if alignment <= 0 or alignment % 8:
            s.error(f"general.alignment {alignment} is not a positive multiple of 8")
            return
    tok = kv.get("tokenizer.ggml.tokens")
    if tok and tok[0] == "ARRAY[STRING]":
        for k in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
            if k in kv and kv[k][0].startswith("ARRAY") and kv[k][1] != tok[1]:
                s.error(f"metadata {k!r} has {kv[k][1]} entries but tokenizer.ggml.tokens has {tok[1]}")
        for k in ("bos", "eos", "unknown", "padding"):
            tid = kv.get(f"tokenizer.ggml.{k}_token_id")
            if tid and isinstance(tid[1], int) and tid[1] >= tok[1]:
                s.error(f"tokenizer.ggml.{k}_token_id {tid[1]} is outside the {tok[1]}-token vocabulary")
    for key, (_t, v) in kv.items():
        if key.startswith("tokenizer.chat_template") and isinstance(v, str):
            m = TEMPLATE_SUSPICIOUS.search(v)
            if m:
                s.warn(f"the chat template {key!r} contains {m.group(0)!r}: a Jinja template is code run at every "
                       "request, and unsandboxed renderers ran such templates as Python (CVE-2024-34359)")
    sizes = GGML_TYPES
    tensors = []
    names: set[str] = set()
    for i in range(n_tensors):
        r.what = f"tensor info #{i}"
        name = r.string(keep=65535)
        if name is None:
            raise ValueError("a tensor name longer than 65535 bytes")
        r.what = f"tensor info {name!r}"
        if name in names:
            s.error(f"tensor {name!r} appears twice")
        names.add(name)
        n_dims = r.u32()
        if not 1 <= n_dims <= GGML_MAX_DIMS:
            raise ValueError(f"{n_dims} dimensions (ggml allows 1 to {GGML_MAX_DIMS})")
        dims = [r.u64() for _ in range(n_dims)]
        ttype = r.u32()
        offset = r.u64()
        tensors.append((name, dims, ttype, offset))
    data_start = -(-r.pos // alignment) * alignment
    data_len = size - data_start
    if data_len < 0:
        s.error(f"the file ends ({size} bytes) before its data section ({data_start})")
        return
    spans: list[tuple[int, int, str]] = []
    types: dict[str, int] = {}
    params = 0
    for name, dims, ttype, offset in tensors:
        if ttype not in sizes:
            s.error(f"tensor {name!r}: unknown ggml type {ttype}")
            continue
        block, tsize, tname = sizes[ttype]
        nel = math.prod(dims)
        if dims[0] % block:
            s.error(f"tensor {name!r}: first dimension {dims[0]} is not a multiple of the {tname} block ({block})")
            continue
        nbytes = nel // block * tsize
        if offset % alignment:
            s.error(f"tensor {name!r}: offset {offset} is not a multiple of the alignment {alignment}")
        if offset + nbytes > data_len:
            s.error(f"tensor {name!r}: bytes {offset}..{offset + nbytes} of the data section run past the end "
                    f"of the file (data section {data_len} bytes)")
            continue
        spans.append((offset, offset + nbytes, name))
        types[tname] = types.get(tname, 0) + 1
        params += nel
    _spans_check(s, spans, data_len, alignment - 1, "data bytes")
    s.info.update(tensors=n_tensors, metadata_keys=len(kv), architecture=arch, ggml_types=types,
                  parameters=params, data_offset=data_start, alignment=alignment)
    s.info["tensor_offsets"] = {name: data_start + off for name, _, _, off in tensors}


# ----------------------------------------------------------------------------- NumPy and zip


def _npy_header(f: BinaryIO) -> tuple[tuple[int, ...], bool, Any, int]:
    """(shape, fortran_order, dtype, header end) from a .npy stream, via numpy's literal-only header parser."""
    import numpy as np

    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    elif version in ((2, 0), (3, 0)):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        raise ValueError(f"unsupported .npy version {version}")
    return shape, fortran, dtype, f.tell()


def check_npy(path: str | Path) -> Structure:
    """Check a .npy header; an object array is reported (its data is a pickle)."""
    s = Structure()
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        try:
            shape, _, dtype, end = _npy_header(f)
        except Exception as e:  # noqa: BLE001 - numpy's header parser raises many types
            s.error(f"the .npy header is malformed ({e})")
            return s
    s.info.update(shape=list(shape), dtype=str(dtype))
    if dtype.hasobject:
        s.info["pickle"] = True
        s.warn("an object array: its data is a pickle, and np.load(allow_pickle=True) would run it")
        return s
    need = math.prod(shape) * dtype.itemsize
    if size - end < need:
        s.error(f"shape {list(shape)} of {dtype} needs {need} data bytes but the file has {size - end}: truncated")
    elif size - end > need:
        s.warn(f"{size - end - need} bytes after the array data: hidden or appended data")
    return s


def check_zip(path: str | Path, fmt: str) -> Structure:
    """Check a zip archive (PyTorch checkpoint, .npz or other): member names that escape the folder, duplicate
    names, a suspicious compression ratio, pickles and object arrays inside. A zip that cannot be opened raises
    zipfile.BadZipFile."""
    s = Structure()
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
        names = [i.filename for i in infos]
        for n in names:
            p = PurePosixPath(n.replace("\\", "/"))
            if p.is_absolute() or ".." in p.parts or re.match(r"^[A-Za-z]:", n):
                s.warn(f"member {n!r} escapes the extraction folder (zip slip)")
        dups = sorted({n for n in names if names.count(n) > 1})
        if dups:
            s.warn(f"members named twice: {dups[:3]}: readers disagree on which one counts")
        packed = sum(i.compress_size for i in infos)
        unpacked = sum(i.file_size for i in infos)
        if unpacked > 1 << 30 and unpacked > 100 * max(packed, 1):
            s.warn(f"the members unpack to {unpacked} bytes from {packed}: a zip bomb")
        pickles = [n for n in names if n.endswith((".pkl", ".pickle"))]
        s.info.update(members=len(names), pickles=pickles)
        if fmt == "pytorch-zip":
            data = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
            if len(data) > 1:
                s.warn(f"{len(data)} data.pkl members {data[:3]}: which one torch.load reads depends on its version")
            others = [n for n in pickles if not n.endswith(("/data.pkl", "/constants.pkl")) and n != "data.pkl"]
            if others:
                s.note(f"pickles besides data.pkl: {others[:5]}")
        objs = []
        for i in infos:
            if i.filename.endswith(".npy"):
                with zf.open(i) as m:
                    try:
                        _, _, dtype, _ = _npy_header(m)
                    except Exception as e:  # noqa: BLE001 - numpy's header parser raises many types
                        s.error(f"member {i.filename!r}: malformed .npy header ({e})")
                        continue
                if dtype.hasobject:
                    objs.append(i.filename)
        if objs:
            s.info["pickle"] = True
            s.warn(f"object arrays {objs[:3]}: their data is a pickle, and np.load(allow_pickle=True) would run it")
    return s
