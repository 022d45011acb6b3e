"""The poisoned-checkpoint lab: build harmless payloads (their only effect is a marker file), run every scanner
and every loader on each, each call in its own child process and throwaway working folder, and write the
detection matrix with each tool's exact finding. Nothing here decides a verdict: every cell is what the scanner
or loader returned, and whether the payload's marker file appeared in that call's folder.

Rows: the payloads of payloads.py and three benign controls. Columns: picklescan, modelscan, fickling (default
analyses), fickling (ML allowlist), torch.load(weights_only=True), torch.load(weights_only=False) (the one
deliberate unsafe load), llmlab's loader (llmlab.load on a folder holding the file), and `llmlab convert`."""

from __future__ import annotations

import html
import json
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llmlab.security.supply_chain.common import ConvertError, LabError
from llmlab.security.supply_chain.convert import convert_to_safetensors
from llmlab.security.supply_chain.payloads import MARKER_PREFIX, PAYLOADS, Payload, build_payloads
from llmlab.security.supply_chain.runner import Worker

SCANNERS = ("picklescan", "modelscan", "fickling", "fickling-ml")
LOADERS = ("weights_only", "unsafe_load", "llmlab_load", "convert")
COLUMNS = SCANNERS + LOADERS
LABELS = {"picklescan": "picklescan", "modelscan": "modelscan", "fickling": "fickling",
          "fickling-ml": "fickling (ML allowlist)", "weights_only": "weights_only=True",
          "unsafe_load": "weights_only=False", "llmlab_load": "llmlab's loader", "convert": "safetensors conversion"}
HOW = {
    "picklescan": "picklescan 1.0.5 as a library on the payload's folder (scan_directory_path, as `picklescan -p "
                  "DIR`); flagged = a dangerous global (its exit status 1)",
    "modelscan": "modelscan 0.8.8 as a library on the payload's folder (ModelScan().scan, default settings); "
                 "flagged = at least one issue (its exit status 1)",
    "fickling": "fickling 0.1.12 file by file with its own dispatch (scan_zip_archive / scan_file, default "
                "analyses); flagged = severity above LIKELY_SAFE (its exit status 1)",
    "fickling-ml": "fickling 0.1.12's ML allowlist analysis (fickling.ml.MLAllowlist) on the same bytes",
    "weights_only": "torch.load(FILE, weights_only=True)",
    "unsafe_load": "torch.load(FILE, weights_only=False): the deliberate unsafe load",
    "llmlab_load": "llmlab.load(FOLDER) on a folder holding the file (plus a GPT-2 config.json)",
    "convert": "llmlab convert FILE --to safetensors (audit first, then weights_only=True in a child process)",
}
GPT2_CONFIG = {"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 16, "vocab_size": 32, "n_positions": 16}

# Why a scanner misses (shown only where the real verdict is a miss), why a control is flagged, and notes on
# errors; keyed by (payload, column). The verdict itself always comes from the run.
MISS_NOTES: dict[tuple[str, str], str] = {
    ("memo_copy", "picklescan"): "picklescan records, for each BINPUT, the argument of the opcode before it (here "
        "BINGET's index 0), not the string on the stack; the STACK_GLOBAL then resolves to the global '0.1', which "
        "is on no list. Unknown globals are only 'suspicious', and those do not count outside picklescan's "
        "strict mode.",
    ("memo_copy", "modelscan"): "modelscan's copy of the same memo tracker stores the integer and then crashes on it "
        "(TypeError); the scan ends with an error and zero issues, so a gate that reads the issue count lets it "
        "through (protectai/modelscan#338, PR 348).",
    ("build_setattr", "picklescan"): "picklescan sees pickletools.dis, pickletools.dis.m and pickletools.dis.n, and "
        "for the STACK_GLOBAL the memo entries it recorded: the GLOBAL opcodes' arguments, not the strings they "
        "push at load time. Nothing there is on its denylist.",
    ("build_setattr", "modelscan"): "the same root cause in modelscan (issue 85, still open): BUILD is a setattr, "
        "and the memo tracker records opcode arguments rather than values.",
    ("importlib_import_module", "picklescan"): "importlib.import_module, builtins.vars and operator.getitem are each "
        "innocent-looking; 'exec' only appears as a string argument. picklescan rates the three 'suspicious', which "
        "does not count outside picklescan's strict mode.",
    ("importlib_import_module", "modelscan"): "modelscan's denylist has builtins.getattr and operator.attrgetter but "
        "neither vars, operator.getitem nor importlib.",
    ("pkgutil_resolve_name", "modelscan"): "pkgutil.resolve_name is not on modelscan's default denylist; picklescan "
        "added it after an advisory.",
    ("attribute_chain", "picklescan"): "the global is pathlib's attribute io.open: picklescan matches the module "
        "name, pathlib, which is on neither of its lists; only picklescan's strict mode would flag it.",
    ("attribute_chain", "modelscan"): "modelscan matches the module name against its denylist; pathlib is not on it.",
    ("nested_pickle", "picklescan"): "the inner pickle is one BINBYTES constant; picklescan does not look inside byte "
        "strings, and numpy.load and io.BytesIO are not denylisted (its source lists numpy.load as a TODO).",
    ("nested_pickle", "modelscan"): "the same: modelscan's source lists pickle-loading functions such as numpy.load "
        "as a TODO, and the inner pickle is an opaque constant.",
    ("torch_zip_odd_extension", "picklescan"): "picklescan -p DIR only opens files whose extension it knows (.pkl, "
        ".pt, .bin, .zip, ...); model.weights is never opened. Given the file itself it would sniff the zip.",
    ("torch_zip_odd_extension", "modelscan"): "modelscan picks its scanners by extension and skips the file.",
    ("polyglot_bin", "modelscan"): "modelscan's PyTorch scanner (.bin) first reads the legacy magic number; the "
        "leading pickle is not it, so the file is skipped ('Invalid magic number'), and modelscan only opens "
        "archives that start with 'PK'.",
    ("polyglot_bin", "fickling-ml"): "fickling's dispatch sees a zip (zipfile.is_zipfile finds the central "
        "directory at the end) and scans only the archive's data.pkl, which is benign; the leading pickle is "
        "never read.",
    ("polyglot_pkl", "fickling-ml"): "as for polyglot_bin: fickling scans the appended archive's members only.",
    ("polyglot_pkl", "picklescan"): "picklescan asks zipfile.is_zipfile first, finds the appended archive and scans "
        "only its members; the leading pickle is never read.",
    ("polyglot_bin", "picklescan"): "picklescan's .bin path reads the file as a legacy checkpoint.",
}
FLAG_NOTES: dict[tuple[str, str], str] = {
    ("benign_state_dict", "fickling"): "fickling's default analyses call every import outside the standard library "
        "unsafe, torch._utils._rebuild_tensor_v2 included, so every PyTorch checkpoint is flagged; its ML allowlist "
        "(next column) passes the same file.",
    ("polyglot_bin", "fickling"): "flagged, but for the benign archive's torch imports (the same finding as the "
        "benign control): the leading pickle was never read.",
    ("polyglot_pkl", "fickling"): "flagged for the benign archive's torch imports, as for the benign control; the "
        "payload itself was never read.",
}
ERROR_NOTES: dict[tuple[str, str], str] = {
    ("benign_numpy", "modelscan"): "modelscan 0.8.8 calls numpy.lib.format._check_version, which NumPy 2 removed, "
        "so every .npy scan ends in an error.",
}


@dataclass
class LabConfig:
    """Settings of the lab: per-call timeout, columns run in parallel, the signing part, a subset of payloads."""

    timeout: float = 60.0
    parallel: int = 2
    signing: bool = True
    payloads: list[str] | None = None


@dataclass
class Cell:
    """One scanner's or loader's answer on one payload. `flagged`: a scanner flagged it, or a loader did not
    load it, or the conversion refused it. `marker`: the payload's marker file appeared, i.e. its code ran."""

    state: str
    flagged: bool
    marker: bool
    detail: str
    created: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class LabResult:
    """The detection matrix (cells[payload][column]), per-column summaries and the signing checks."""

    out: str
    rows: list[dict[str, Any]]
    columns: list[str]
    cells: dict[str, dict[str, Cell]]
    summary: dict[str, dict[str, Any]]
    signing: list[dict[str, Any]]
    seconds: float


Progress = Callable[[str, dict[str, Any]], None]


def _cell(column: str, payload: Payload, ans: dict[str, Any]) -> Cell:
    v = ans.get("verdict") or {}
    state = v.get("state") if ans["status"] == "done" else ans["status"]
    detail = v.get("detail") or ans.get("error") or ""
    created = list(ans.get("created") or [])
    marker = payload.marker is not None and payload.marker in created
    flagged = state == "flagged" if column in SCANNERS else state != "loaded"
    return Cell(state or "error", flagged, marker, detail, created, float(ans.get("seconds") or 0))


def _loader_folder(root: Path, p: Payload, file: Path) -> Path:
    """The folder llmlab.load gets: the run folder itself for the safetensors control, else a copy of the file
    with a GPT-2 config.json beside it (a Hugging Face folder whose weights are the payload)."""
    if p.name == "benign_safetensors":
        return file.parent
    folder = root / p.name
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy2(file, folder / file.name)
    (folder / "config.json").write_text(json.dumps(GPT2_CONFIG))
    return folder


def _run_columns(columns: list[str], payloads: list[Payload], files: dict[str, Path], loaders: dict[str, Path],
                 out: Path, cfg: LabConfig, progress: Progress | None, slot: int) -> dict[str, dict[str, Cell]]:
    """Run whole columns in one Worker (every call still in a process of its own, forked for it)."""
    cells: dict[str, dict[str, Cell]] = {c: {} for c in columns}
    with Worker(out / "work" / f"worker-{slot}") as w:
        for column in columns:
            for p in payloads:
                cwd = out / "cells" / p.name / column
                if column == "convert":
                    cell = _convert_cell(p, files[p.name], cwd, w, cfg)
                else:
                    target = (files[p.name].parent if column in SCANNERS
                              else loaders[p.name] if column == "llmlab_load" else files[p.name])
                    cell = _cell(column, p, w.run(column, target, cwd, timeout=cfg.timeout))
                cells[column][p.name] = cell
                if progress:
                    progress("cell", {"payload": p.name, "column": column, "state": cell.state,
                                      "marker": cell.marker})
    return cells


def _convert_cell(p: Payload, file: Path, cwd: Path, w: Worker, cfg: LabConfig) -> Cell:
    cwd.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        r = convert_to_safetensors(file, cwd / "converted.safetensors", worker=w, workdir=cwd / "work",
                                   timeout=cfg.timeout)
        state = r.status
        detail = r.reason if r.status == "refused" else f"{r.tensors} tensors written"
    except ConvertError as e:
        state, detail = "error", str(e)
    created = sorted(str(m.relative_to(cwd)) for m in cwd.rglob(MARKER_PREFIX + "*"))
    marker = p.marker is not None and any(Path(c).name == p.marker for c in created)
    return Cell(state, state != "converted", marker, detail, created, round(time.perf_counter() - t0, 3))


def _summary(payloads: list[Payload], cells: dict[str, dict[str, Cell]]) -> dict[str, dict[str, Any]]:
    attacks = [p.name for p in payloads if not p.control]
    controls = [p.name for p in payloads if p.control]
    out: dict[str, dict[str, Any]] = {}
    for c in COLUMNS:
        col = {n: cells[n][c] for n in cells}
        s: dict[str, Any] = {"payloads": len(attacks), "controls": len(controls),
                             "code_ran": [n for n in col if col[n].marker],
                             "errors": [n for n in col if col[n].state in ("error", "timeout", "crashed")]}
        if c in SCANNERS:
            s["false_negatives"] = [n for n in attacks if not col[n].flagged]
            s["false_positives"] = [n for n in controls if col[n].flagged]
            s["detected"] = len(attacks) - len(s["false_negatives"])
        else:
            s["blocked"] = [n for n in attacks if not col[n].marker and col[n].flagged]
            s["controls_loaded"] = [n for n in controls if not col[n].flagged]
            s["controls_refused"] = [n for n in controls if col[n].flagged]
        out[c] = s
    return out


LAB_DIRS = ("payloads", "cells", "loader-inputs", "work", "signing")


def _prepare_out(out: Path) -> None:
    """OUT must be new, empty, or an earlier lab's folder (whose payloads and cells are then cleared)."""
    if out.exists() and not out.is_dir():
        raise LabError(f"--out {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()):
        try:
            earlier = json.loads((out / "report.json").read_text()).get("experiment") == "supply-chain lab"
        except (OSError, ValueError, AttributeError):
            earlier = False
        if not earlier:
            raise LabError(f"--out {out} is not empty and holds no earlier lab; choose a new or empty folder")
        for d in LAB_DIRS:
            shutil.rmtree(out / d, ignore_errors=True)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LabError(f"--out {out}: cannot create it ({e.strerror or e})") from None


def run_lab(out: str | Path, cfg: LabConfig | None = None, progress: Progress | None = None) -> LabResult:
    """Build the payloads under OUT/payloads, run every scanner and loader on each (OUT/cells/PAYLOAD/COLUMN is
    each call's working folder), check signing against tampering (OUT/signing), and write the report."""
    cfg = cfg or LabConfig()
    t0 = time.perf_counter()
    out = Path(out)
    known = {p.name for p in PAYLOADS}
    unknown = [n for n in cfg.payloads or [] if n not in known]
    if unknown:
        raise LabError(f"unknown payload {unknown[0]!r}; the lab has {', '.join(sorted(known))}")
    _prepare_out(out)
    payloads = [p for p in PAYLOADS if cfg.payloads is None or p.name in cfg.payloads]
    files = build_payloads(out / "payloads", [p.name for p in payloads])
    loaders = {p.name: _loader_folder(out / "loader-inputs", p, files[p.name]) for p in payloads}
    if progress:
        progress("built", {"payloads": len(payloads), "columns": len(COLUMNS)})
    cells: dict[str, dict[str, Cell]] = {p.name: {} for p in payloads}
    # columns dealt out to `parallel` workers, the slow one (conversion: an audit and a load per file) first
    order = ["convert", *[c for c in COLUMNS if c != "convert"]]
    n = max(1, min(cfg.parallel, len(order)))
    with ThreadPoolExecutor(max_workers=n) as ex:
        futures = [ex.submit(_run_columns, order[i::n], payloads, files, loaders, out, cfg, progress, i)
                   for i in range(n)]
        for fut in futures:
            for c, col in fut.result().items():
                for name, cell in col.items():
                    cells[name][c] = cell
    signing: list[dict[str, Any]] = []
    if cfg.signing:
        from llmlab.security.supply_chain.tamper import run_tamper_checks

        signing = run_tamper_checks(out / "signing")
        if progress:
            progress("signing", {"cases": len(signing)})
    rows = [{"name": p.name, "file": p.filename, "technique": p.technique, "reference": p.reference,
             "control": p.control, "marker": p.marker, "how": p.doc} for p in payloads]
    res = LabResult(str(out), rows, list(COLUMNS), cells, _summary(payloads, cells), signing,
                    round(time.perf_counter() - t0, 3))
    write_lab_report(res, cfg)
    return res


# ----------------------------------------------------------------------------- report


def cell_text(row: dict[str, Any], column: str, cell: Cell) -> tuple[str, str]:
    """The matrix text of a cell and its colour class: 'good', 'bad' or 'neutral'."""
    attack = not row["control"]
    if column in SCANNERS:
        if attack:
            return ("FLAGGED", "good") if cell.flagged else (
                {"skipped": "missed (not scanned)", "error": "missed (error)"}.get(cell.state, "missed"), "bad")
        if cell.flagged:
            return "false positive", "bad"
        if cell.state in ("error", "timeout"):
            return cell.state, "neutral"
        return ("not scanned" if cell.state == "skipped" else "clean"), "good"
    if cell.marker:
        return "CODE RAN", "bad"
    if attack:
        if not cell.flagged:
            return f"{cell.state}, no marker", "neutral"
        return {"refused": "refused", "error": "error, no code ran"}.get(cell.state, cell.state), "good"
    return cell.state, "good" if cell.state in ("loaded", "converted") else "neutral"


def _note(name: str, column: str, cell: Cell, control: bool) -> str:
    if not control and column in SCANNERS and not cell.flagged:
        return MISS_NOTES.get((name, column), "")
    if cell.flagged and column in SCANNERS:
        return FLAG_NOTES.get((name, column), "")
    if cell.state in ("error", "timeout"):
        return ERROR_NOTES.get((name, column), "")
    return ""


def _matrix_html(res: LabResult) -> str:
    colours = {"good": "#d9f2d9", "bad": "#f8d0d0", "neutral": "#eeeeee"}
    head = "".join(f"<th>{html.escape(LABELS[c])}</th>" for c in res.columns)
    body = []
    for row in res.rows:
        tds = []
        for c in res.columns:
            cell = res.cells[row["name"]][c]
            text, cls = cell_text(row, c, cell)
            tds.append(f"<td style='background:{colours[cls]}' title='{html.escape(cell.detail, quote=True)}'>"
                       f"{html.escape(text)}</td>")
        name = html.escape(row["name"]) + (" <i>(control)</i>" if row["control"] else "")
        body.append(f"<tr><td><b>{name}</b><br><small>{html.escape(row['file'])}</small></td>{''.join(tds)}</tr>")
    return (f"<table><thead><tr><th>payload</th>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
            "<p class='meta'>Green: the tool did what protects you; red: a missed payload, a false positive, or code "
            "that ran; grey: neither. Hover a cell for the tool's exact finding.</p>")


def lab_summary_text(res: LabResult) -> str:
    """One paragraph: per scanner how many payloads it missed, and where code ran."""
    s = res.summary
    n = s["picklescan"]["payloads"]
    parts = []
    for c in SCANNERS:
        aside = [r["name"] for r in res.rows if not r["control"] and res.cells[r["name"]][c].flagged
                 and (r["name"], c) in FLAG_NOTES]
        parts.append(f"{LABELS[c]} missed {len(s[c]['false_negatives'])}/{n}"
                     + (f" (and flagged {', '.join(aside)} only for the benign archive inside)" if aside else "")
                     + (f" and flagged {len(s[c]['false_positives'])} benign control(s)" if s[c]["false_positives"]
                        else ""))
    ran = {c: s[c]["code_ran"] for c in LOADERS if s[c]["code_ran"]}
    ran_text = "; ".join(f"{LABELS[c]}: {len(v)}/{n}" for c, v in ran.items()) or "nowhere"
    return (f"{n} payloads and {s['picklescan']['controls']} benign controls. " + "; ".join(parts)
            + f". Payload code ran (marker file created) under {ran_text}; "
            f"weights_only=True blocked {len(s['weights_only']['blocked'])}/{n}.")


def write_lab_report(res: LabResult, cfg: LabConfig | None = None) -> Path:
    """report.json (every cell), report.html (the coloured matrix) and report.md, via the shared writer."""
    from llmlab.security.report import Section, write_report

    header = ["payload", *[LABELS[c] for c in res.columns]]
    rows = [[r["name"] + (" (control)" if r["control"] else ""),
             *[cell_text(r, c, res.cells[r["name"]][c])[0] for c in res.columns]] for r in res.rows]
    s = res.summary
    scan_rows = [[LABELS[c], f"{s[c]['detected']}/{s[c]['payloads']}", ", ".join(s[c]["false_negatives"]) or "-",
                  ", ".join(s[c]["false_positives"]) or "-", ", ".join(s[c]["errors"]) or "-"] for c in SCANNERS]
    load_rows = [[LABELS[c], ", ".join(s[c]["code_ran"]) or "-", f"{len(s[c]['blocked'])}/{s[c]['payloads']}",
                  ", ".join(s[c]["controls_loaded"]) or "-", ", ".join(s[c]["controls_refused"]) or "-"]
                 for c in LOADERS]
    tech = [[r["name"], r["technique"], r["how"], r["reference"] or "-"] for r in res.rows]
    notes, details = [], []
    for r in res.rows:
        for c in res.columns:
            cell = res.cells[r["name"]][c]
            note = _note(r["name"], c, cell, r["control"])
            text = cell_text(r, c, cell)[0]
            if note:
                notes.append([r["name"], LABELS[c], text, note])
            details.append([r["name"], LABELS[c], cell.state, "yes" if cell.marker else "no", cell.detail])
    sections = [
        Section("Detection matrix", "Each cell is what that scanner or loader returned for the payload, run in its "
                "own child process and working folder; CODE RAN means the payload's marker file appeared there.",
                raw_html=_matrix_html(res)),
        Section("Detection matrix as text", header=header, rows=rows),
        Section("Scanners: false negatives and false positives",
                header=["scanner", "payloads flagged", "missed (false negatives)", "false positives", "errors"],
                rows=scan_rows),
        Section("Loaders", header=["loader", "payload code ran", "payloads blocked", "controls loaded",
                                   "controls refused"], rows=load_rows),
        Section("Why each scanner misses what it misses",
                "Shown only where the run's verdict is a miss, a false positive or an error.",
                header=["payload", "tool", "verdict", "why"], rows=notes),
        Section("The techniques", header=["payload", "technique", "how it works", "reference"], rows=tech),
        Section("What each column runs", header=["column", "call"], rows=[[LABELS[c], HOW[c]] for c in res.columns]),
        Section("Every cell's exact finding", header=["payload", "tool", "state", "marker", "finding"],
                rows=details),
    ]
    if res.signing:
        sections.append(Section(
            "Signing and tamper detection",
            "A folder signed with model_signing (EC P-256 key, offline), then changed one way each; llmlab verify "
            "must fail naming the change. The last column uses model_signing 1.1.1 directly where its own "
            "behaviour differs (PR 647, PR 650).",
            header=["case", "llmlab verify", "message", "model_signing directly"],
            rows=[[t["case"], t["llmlab"], t["message"], t.get("upstream", "-")] for t in res.signing]))
    data = {"rows": res.rows, "columns": res.columns, "labels": LABELS,
            "cells": {n: {c: asdict(cell) for c, cell in cols.items()} for n, cols in res.cells.items()},
            "summary": res.summary, "signing": res.signing, "seconds": res.seconds}
    return write_report(res.out, "supply-chain lab", data, sections, lab_summary_text(res),
                        config=asdict(cfg) if cfg else {})
