"""Every --flag a message recommends exists on the command that prints it.

The static check reads every string literal of src/llmlab (docstrings left out): error messages, help
texts, hints. Each --flag in one is attributed to the verbs that can print it: text inside a backquoted
command (`llmlab train --arch bert`) belongs to that command, a backquoted other program (`pip install
--no-deps ...`) to none; everything else to the verbs of the function it is written in (the verb's own
functions are found from cli.VERBS; helpers and the library are in the hand-kept maps below). Each flag
must be a visible option of that verb's parser (build_parser()). A function with flags in its strings that
no map names fails the test, so a new message is attributed when it is written (modules no verb imports
are left out: nothing can print their strings).

The dynamic checks run a few verbs on bad input and check the flags the one-line error names."""

from __future__ import annotations

import argparse
import ast
import json
import re
from pathlib import Path

import pytest

import llmlab
from llmlab.cli import VERBS, build_parser, main
from llmlab.cli import privacy as privacy_cli

SRC = Path(llmlab.__file__).parent
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9]*(?:-[a-z0-9]+)*")
COMMAND = re.compile(r"^llmlab ([a-z][a-z0-9-]*)(?: ([a-z][a-z0-9-]*))?")
OTHER_PROGRAM = re.compile(r"^(pip|python|uv|make|git|torchrun) ")

PRIVACY = tuple(f"privacy {c}" for c in privacy_cli.COMMANDS)
# verbs reading corpora the user names; `privacy compare` reads only the corpora its runs were trained on,
# the way they were read then (run_splits), so their messages cannot reach it
CORPUS_READERS = ("train", "perplexity", "privacy canary", "privacy mia", "privacy extract", "privacy dedup")

# helpers of the verbs (cli/), by module:function
HELPERS: dict[str, tuple[str, ...]] = {
    "llmlab.cli:build_parser": ("",),  # the top-level parser
    "llmlab.cli.common:_parse_head": ("attention",),
    "llmlab.cli.models:cli_generate": ("generate",),
    "llmlab.cli.common:set_pairs": ("privacy canary", "truth *"),
    "llmlab.cli.privacy:_dp_args": ("privacy canary",),
    "llmlab.cli.privacy:_file_args": ("privacy mia", "privacy extract", "privacy dedup"),
    "llmlab.cli.privacy:_read_docs": ("privacy mia", "privacy extract", "privacy dedup"),
    "llmlab.cli.serve:check_port": ("serve",),
    "llmlab.cli.models:_chat": ("generate",),
}

# the library, by module:function or module (and the packages above it): which verbs reach it
LIBRARY: dict[str, tuple[str, ...]] = {
    "llmlab.data:_decode": CORPUS_READERS,  # `finetune` checks UTF-8 itself before
    "llmlab.data:_read_jsonl": CORPUS_READERS,
    "llmlab.data:load_corpus": CORPUS_READERS,
    "llmlab.data:split_corpus": ("train",),  # the privacy verbs split with a fixed or recorded fraction
    "llmlab.data:train_tokenizer": ("train",),  # `privacy canary` fixes a character tokenizer
    "llmlab.data:BatchSampler": ("train", "privacy canary"),
    "llmlab.datasets": ("dataset",),
    "llmlab.generate.seq2seq": ("generate",),
    "llmlab.security.privacy.canary": ("privacy canary",),
    "llmlab.security.privacy.canary:measure_exposure": ("privacy canary", "privacy compare"),
    "llmlab.security.privacy.canary:load_canaries": ("privacy canary", "privacy compare"),
    "llmlab.security.privacy.dedup": ("privacy dedup",),  # the canary's dedup defence fixes the mode
    # (`llmlab train --resume` of a DP-SGD run reuses the settings the run was checked with)
    "llmlab.security.privacy.dp": ("privacy canary",),
    "llmlab.security.privacy.extract": ("privacy extract",),
    "llmlab.security.privacy.mia": ("privacy mia", "privacy compare"),
    "llmlab.security.scan": ("scan",),
    "llmlab.security.struq": ("harden",),
    "llmlab.train.chat": ("train",),
    "llmlab.train.classify": ("train", "finetune"),
    "llmlab.train.config": ("train",),  # the TOML file of --config
    "llmlab.train.loop": ("train", "finetune"),
    "llmlab.train.init": ("train",),  # --init-from (fine-tuning)
    "llmlab.train.registry": ("train",),
    "llmlab.train.seq2seq": ("train",),
    # alignment objectives (issue 20): `llmlab train --task sft|reward|dpo|reinforce` and the align verbs
    "llmlab.train.preference": ("train", "align *"),
    "llmlab.train.sft": ("train", "align *"),
    "llmlab.train.reward": ("train", "align *"),
    "llmlab.train.dpo": ("train", "align *"),
    "llmlab.train.reinforce": ("train", "align *"),
    "llmlab.inspect.view": ("view",),
    "llmlab.inspect.view_assets": ("view",),  # the page's JavaScript: no messages with flags
    "llmlab.security.poisoning": ("poison *",),
    "llmlab.security.supply_chain.convert": ("convert",),
    "llmlab.security.supply_chain.lab": ("supply-chain lab",),
    "llmlab.signing": ("sign",),
}

# Known wrong flags in files this change could not edit, each with its fix. The test fails when one of
# them is fixed (remove it here then) as well as when a new one appears.
PENDING: dict[tuple[str, str, str], str] = {
}


# ----------------------------------------------------------------------------- the parsers


def _visible_flags(p: argparse.ArgumentParser) -> set[str]:
    return {o for a in p._actions if a.help != argparse.SUPPRESS for o in a.option_strings}


def _subparsers(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            return dict(a.choices)
    return {}


def verb_flags() -> dict[str, set[str]]:
    """Visible option strings of each verb ("privacy canary" for sub-commands; "" = the top level)."""
    top = build_parser()
    out = {"": _visible_flags(top)}
    for name, p in _subparsers(top).items():
        out[name] = _visible_flags(p)
        every = set(out[name])
        for sub, sp in _subparsers(p).items():
            out[f"{name} {sub}"] = out[name] | _visible_flags(sp)
            every |= out[f"{name} {sub}"]
        out[f"{name} *"] = every  # any of the verb's sub-commands (see verbs_of's fallback)
    return out


# ----------------------------------------------------------------------------- the strings


def _pieces(node: ast.AST) -> list[str]:
    """The text of a string literal; an f-string's values read as {}."""
    if isinstance(node, ast.JoinedStr):
        return ["".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)]
    return [node.value]  # type: ignore[attr-defined]


def strings() -> list[tuple[str, str, int, str]]:
    """(module, qualified function, line, text) of every string literal of llmlab but docstrings."""
    out = []
    for f in sorted(SRC.rglob("*.py")):
        mod = ".".join(("llmlab", *f.relative_to(SRC).with_suffix("").parts)).removesuffix(".__init__")
        tree = ast.parse(f.read_text())
        docs = {id(n.body[0].value) for n in ast.walk(tree)
                if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
                and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        # a parameter's default value (e.g. flag="--data", which callers override) is not a message
        docs |= {id(d) for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
                 for d in [*n.args.defaults, *n.args.kw_defaults] if d is not None}

        def walk(node: ast.AST, qual: list[str], docs: set[int] = docs, mod: str = mod) -> None:
            for c in ast.iter_child_nodes(node):
                if isinstance(c, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                    walk(c, [*qual, c.name], docs)
                elif isinstance(c, ast.Call) and getattr(c.func, "attr", "") == "add_argument":
                    for k in c.keywords:  # its option strings define flags; its help may recommend some
                        walk(k, qual, docs)
                elif isinstance(c, ast.JoinedStr) or (isinstance(c, ast.Constant) and isinstance(c.value, str)):
                    if id(c) not in docs:
                        out.extend((mod, ".".join(qual) or "<module>", c.lineno, t) for t in _pieces(c))
                else:
                    walk(c, qual, docs)

        walk(tree, [])
    return out


def _command(text: str) -> str | None:
    """The verb of a command line `llmlab VERB [SUB] ...`, or None if the text is not one."""
    m = COMMAND.match(text)
    if not m:
        return None
    name, sub = m.groups()
    return f"{name} {sub}" if name == "privacy" and sub in privacy_cli.COMMANDS else name


def flags_by_context(text: str) -> list[tuple[str | None, str]]:
    """(verb or None = the function's verbs, flag) for every flag in a text; flags of a command that is not
    llmlab (backquoted, or the whole text, e.g. "pip install --no-deps x") are left out."""
    out: list[tuple[str | None, str]] = []
    if OTHER_PROGRAM.match(text):
        return out
    whole = _command(text)
    for i, seg in enumerate(text.split("`")):
        if i % 2:  # inside backquotes
            if seg.startswith("llmlab "):
                out += [(_command(seg), f) for f in FLAG.findall(seg)]
        else:
            out += [(whole, f) for f in FLAG.findall(seg)]
    return out


def _own_functions() -> dict[str, tuple[str, ...]]:
    """module:function of each verb's add-args and run functions (privacy: of each sub-command)."""
    own: dict[str, set[str]] = {}
    for v in VERBS:
        for fn in (v.add_args, v.run):
            own.setdefault(f"{fn.__module__}:{fn.__qualname__}", set()).add(v.name)
    for sub, (add, run, _) in privacy_cli.COMMANDS.items():
        for fn in (add, run):
            own.setdefault(f"{fn.__module__}:{fn.__qualname__}", set()).add(f"privacy {sub}")
    return {k: tuple(sorted(v)) for k, v in own.items()}


def reachable() -> set[str] | None:
    """The modules the verbs' modules import, directly or not, at the top or inside functions (grimp, which
    import-linter uses); None when grimp is not installed (then every module counts)."""
    try:
        import grimp
    except ImportError:
        return None
    graph = grimp.build_graph("llmlab", cache_dir=None)  # no cache folder written
    roots = {"llmlab.cli", *(v.run.__module__ for v in VERBS)}
    return roots | {m for r in roots for m in graph.find_upstream_modules(r)}


def verbs_of(mod: str, qual: str) -> tuple[str, ...] | None:
    own = _own_functions()
    keys = [f"{mod}:{qual}", f"{mod}:{qual.split('.')[0]}"]
    parts = mod.split(".")
    keys += [".".join(parts[:i]) for i in range(len(parts), 1, -1)]
    for k in keys:
        for table in (own, HELPERS, LIBRARY):
            if k in table:
                return table[k]
    # a lab's own package and its cli module (llmlab.labs.bias, llmlab.cli.bias) belong to the verb of that
    # name; with no finer map its flags are checked against the union of the verb's sub-commands
    if len(parts) >= 3 and parts[1] in ("labs", "cli"):
        name = parts[2].replace("_", "-")
        if name in _subparsers(build_parser()):
            return (f"{name} *",)
    return None


def problems() -> tuple[dict[tuple[str, str, str], list[str]], list[str]]:
    """(wrong flags: (module:function, verb, flag) -> where, strings with flags no map attributes)."""
    flags = verb_flags()
    wrong: dict[tuple[str, str, str], list[str]] = {}
    unattributed = []
    reach = reachable()
    for mod, qual, line, text in strings():
        if reach is not None and mod not in reach:
            continue  # no verb imports it (yet): nothing can print its strings
        for ctx, flag in flags_by_context(text):
            verbs = (ctx,) if ctx is not None else verbs_of(mod, qual)
            if verbs is None:
                unattributed.append(f"{mod}:{qual} line {line}: {text[:80]!r}")
                continue
            for v in verbs:
                if v not in flags:
                    unattributed.append(f"{mod}:{qual} line {line}: no verb {v!r}")
                elif flag not in flags[v]:
                    wrong.setdefault((f"{mod}:{qual.split('.')[0]}", v, flag), []).append(
                        f"{mod.replace('.', '/')}.py:{line}: {text[:100]!r}")
    return wrong, unattributed


# ----------------------------------------------------------------------------- the checks


def test_the_checker_finds_flags_and_their_commands() -> None:
    assert flags_by_context("give more text or a smaller --block-size") == [(None, "--block-size")]
    assert flags_by_context("a run trained with `llmlab train --arch bert`, or --base") == [
        ("train", "--arch"), (None, "--base")]
    assert flags_by_context("install it with `pip install --no-deps x`") == []
    assert flags_by_context("pip install --no-deps x") == []
    assert flags_by_context("`llmlab privacy canary --out DIR` folder") == [("privacy canary", "--out")]
    assert flags_by_context('llmlab generate {} --prompt "..."') == [("generate", "--prompt")]
    assert flags_by_context("-k must be positive; --x-y 2 and --a") == [(None, "--x-y"), (None, "--a")]
    flags = verb_flags()
    assert "--defence" in flags["privacy canary"] and "--defense" not in flags["privacy canary"]  # hidden alias
    assert "--encoding-errors" in flags["train"] and "--resume" in flags["finetune"]
    assert verbs_of("llmlab.security.scan.probes", "load_probes") == ("scan",)
    assert verbs_of("llmlab.cli.models", "cmd_perplexity") == ("perplexity",)
    assert verbs_of("llmlab.cli.privacy", "cmd_mia") == ("privacy mia",)


def test_every_recommended_flag_exists_on_its_command() -> None:
    wrong, unattributed = problems()
    assert not unattributed, "attribute these strings to their verbs (HELPERS / LIBRARY):\n" + "\n".join(unattributed)
    new = {k: v for k, v in wrong.items() if k not in PENDING}
    assert not new, "messages name flags their command does not have:\n" + "\n".join(
        f"{verb or 'llmlab'}: {flag} in {where[0]}" for (_, verb, flag), where in new.items())
    fixed = sorted(set(PENDING) - set(wrong))
    assert not fixed, f"fixed, remove from PENDING: {fixed}"


# ----------------------------------------------------------------------------- bad input, run


def _error_flags(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[str, list[str]]:
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    verb = argv[0] + (f" {argv[1]}" if argv[0] == "privacy" else "")
    flags = verb_flags()
    for ctx, flag in flags_by_context(lines[0].split(": error: ", 1)[1]):
        assert flag in flags[ctx or verb], (ctx or verb, flag, lines[0])
    return lines[0], [f for _, f in flags_by_context(lines[0])]


def test_bad_input_names_flags_of_its_own_command(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMLAB_CACHE", str(tmp_path / "cache"))
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(b"caf\xe9 au lait\n" * 50)
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"body": f"document {i} " * 5}) + "\n" for i in range(12)))
    out = str(tmp_path / "out")
    line, flags = _error_flags(["privacy", "dedup", "--data", str(latin1), "--out", out], capsys)
    assert "--encoding-errors" in flags
    assert main(["privacy", "dedup", "--data", str(latin1), "--encoding-errors", "replace", "--out", out]) == 0
    line, flags = _error_flags(["privacy", "dedup", "--data", str(jsonl), "--out", out], capsys)
    assert "--text-field" in flags
    assert main(["privacy", "dedup", "--data", str(jsonl), "--text-field", "body", "--out", out]) == 0
    line, flags = _error_flags(["finetune", "classify", "--data", str(jsonl)], capsys)
    assert "--base" in flags and "`llmlab train --arch bert`" in line
    _error_flags(["report", str(tmp_path / "nothing")], capsys)
    (tmp_path / "empty").mkdir()
    line, flags = _error_flags(["report", str(tmp_path / "empty")], capsys)
    assert "`llmlab scan TARGET --out" in line
    line, flags = _error_flags(["privacy", "compare", str(tmp_path / "a"), str(tmp_path)], capsys)
    assert "`llmlab privacy canary --out DIR`" in line
