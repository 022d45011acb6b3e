"""Supply-chain verbs: `llmlab audit PATH`, `llmlab supply-chain lab|keygen`, `llmlab sign`, `llmlab verify`,
`llmlab convert FILE --to safetensors`. Thin layers over llmlab.security.supply_chain; register(sub) adds them to
the `llmlab` parser. User errors are raised as LlmlabError (one line, exit status 2), except `audit`, whose exit
status is for CI: 0 clean, 1 findings, 2 the audit could not run."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from llmlab.errors import LlmlabError


def _err(verb: str, e: Exception) -> int:
    print(f"llmlab {verb}: error: {e}", file=sys.stderr)
    return 2


# ----------------------------------------------------------------------------- audit


def _audit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="a model file or folder (safetensors, GGUF, PyTorch .bin/.pt/.pth/.ckpt, pickle, "
                                ".npy/.npz)")
    p.add_argument("--json", action="store_true", help="print the whole audit as JSON on stdout")
    p.add_argument("--report", metavar="DIR", help="also write report.json/html/md into DIR")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per scanner or loader call (default 120)")


def cmd_audit(a: argparse.Namespace) -> int:
    """Audit PATH; exit status 0 clean, 1 findings, 2 error."""
    from llmlab.security.supply_chain import audit, audit_dict, write_audit_report

    try:
        if a.timeout <= 0:
            raise LlmlabError("--timeout must be positive")
        res = audit(a.path, timeout=a.timeout)
        if a.report:
            write_audit_report(res, a.report)
    except LlmlabError as e:
        return _err("audit", e)
    except OSError as e:
        return _err("audit", f"{e.filename or a.path}: {e.strerror or e}")
    if a.json:
        print(json.dumps(audit_dict(res), indent=2))
        return res.exit_code
    for loc, f in [(res.path, f) for f in res.findings]:
        print(f"{loc}: {f.severity}: {f.message}")
    for fa in res.files:
        print(f"{fa.path}  [{fa.format}, {fa.size} bytes]  {fa.status}")
        for v in fa.verdicts:
            tag = "" if v.blocking else " (advisory)"
            print(f"    {v.tool}{tag}: {v.state} — {v.detail}")
        for f in fa.findings:
            if f.counts:
                print(f"    {f.severity}: [{f.check}] {f.message}")
    n = sum(f.counts for _, f in res.all_findings())
    print(f"{res.status}: {len(res.files)} model file(s), {n} finding(s), {res.seconds:.2f} s"
          + (f"; report in {a.report}" if a.report else ""))
    return res.exit_code


# ----------------------------------------------------------------------------- supply-chain lab / keygen


def _lab_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", help="report folder (default runs/supply-chain-<timestamp>); payload files and each "
                                 "call's working folder go there too")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per scanner or loader call (default 60)")
    p.add_argument("--payload", action="append", metavar="NAME", help="only this payload; repeatable")
    p.add_argument("--parallel", type=int, default=2, help="columns run at once (default 2)")
    p.add_argument("--no-signing", action="store_true", help="skip the signing and tamper checks")


def cmd_lab(a: argparse.Namespace) -> int:
    """Run the poisoned-checkpoint lab and write its detection matrix."""
    from llmlab.security.supply_chain import LabConfig, run_lab
    from llmlab.security.supply_chain.lab import LABELS, cell_text, lab_summary_text

    if a.timeout <= 0 or a.parallel < 1:
        raise LlmlabError("--timeout must be positive and --parallel at least 1")
    out = Path(a.out) if a.out else Path("runs") / f"supply-chain-{time.strftime('%Y%m%d-%H%M%S')}"
    cfg = LabConfig(timeout=a.timeout, parallel=a.parallel, signing=not a.no_signing, payloads=a.payload)
    done = [0]

    def progress(kind: str, d: dict) -> None:
        if kind == "built":
            print(f"lab: {d['payloads']} payload files, {d['columns']} scanners and loaders each", file=sys.stderr)
        elif kind == "cell":
            done[0] += 1
            if done[0] % 10 == 0:
                print(f"lab: {done[0]} calls done", file=sys.stderr)

    res = run_lab(out, cfg, progress)
    width = max(len(r["name"]) for r in res.rows)
    print("payload".ljust(width) + "  " + " | ".join(LABELS[c] for c in res.columns))
    for r in res.rows:
        cells = [cell_text(r, c, res.cells[r["name"]][c])[0] for c in res.columns]
        print(r["name"].ljust(width) + "  " + " | ".join(cells))
    print(lab_summary_text(res))
    for t in res.signing:
        ok = "ok" if t["llmlab"] == t["expected"] else "UNEXPECTED"
        print(f"signing: {t['case']}: {t['llmlab']} ({ok})")
    print(f"report: {out / 'report.html'}  ({res.seconds:.1f} s)")
    return 0


def _keygen_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("private_key", help="where to write the new private key (PEM, readable by you only)")
    p.add_argument("--public", help="where to write the public key (default PRIVATE_KEY.pub)")


def cmd_keygen(a: argparse.Namespace) -> int:
    """Make an EC P-256 key pair for `llmlab sign`."""
    from llmlab.security.supply_chain import generate_keypair

    kp = generate_keypair(a.private_key, a.public)
    print(f"private key {kp.private_key} (keep it secret)\npublic key  {kp.public_key} (give it to whoever "
          f"verifies)\nfingerprint sha256:{kp.fingerprint}")
    return 0


# ----------------------------------------------------------------------------- sign / verify / convert


def _sign_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", help="a run folder, a model folder or a single model file")
    p.add_argument("--key", required=True, help="EC private key (PEM); make one with `llmlab supply-chain keygen`")
    p.add_argument("--signature", help="where to write the signature (default FOLDER/model.sig or FILE.sig)")
    p.add_argument("--ignore", action="append", default=[], metavar="PATH",
                   help="a path inside the folder to leave unsigned; repeatable")


def cmd_sign(a: argparse.Namespace) -> int:
    """Sign every file of a folder with model_signing and a local key (no network)."""
    from llmlab.security.supply_chain import sign_folder

    r = sign_folder(a.folder, a.key, a.signature, a.ignore)
    print(f"signed {len(r.files)} files of {r.folder} -> {r.signature} (key sha256:{r.key_fingerprint[:16]}…)")
    return 0


def _verify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", help="a signed run folder, model folder or model file")
    p.add_argument("--public-key", required=True, help="the signer's EC public key (PEM)")
    p.add_argument("--signature", help="the signature (default FOLDER/model.sig or FILE.sig)")


def cmd_verify(a: argparse.Namespace) -> int:
    """Verify a folder against its signature; any change fails naming what changed (exit status 2)."""
    from llmlab.security.supply_chain import verify_folder

    r = verify_folder(a.folder, a.public_key, a.signature)
    print(f"verified: {len(r.files)} files of {r.folder} match {r.signature}")
    for w in r.warnings:
        print(f"warning: {w}", file=sys.stderr)
    return 0


def _convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="a PyTorch pickle checkpoint (.bin, .pt, .pth, .ckpt)")
    p.add_argument("--to", required=True, choices=["safetensors"], help="the output format")
    p.add_argument("--out", help="output file (default: FILE with the .safetensors extension)")
    p.add_argument("--force", action="store_true", help="replace an existing output file")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds for each scan and load (default 600)")


def cmd_convert(a: argparse.Namespace) -> int:
    """Audit a checkpoint, then convert it through weights_only=True in a child process; 1 if refused."""
    from llmlab.security.supply_chain import convert_to_safetensors

    r = convert_to_safetensors(a.file, a.out, overwrite=a.force, timeout=a.timeout)
    if r.status == "refused":
        print(f"refused: {r.source} was not converted; {r.reason}", file=sys.stderr)
        for _loc, f in r.audit.all_findings():
            if f.counts:
                print(f"  {f.severity}: [{f.check}] {f.message}", file=sys.stderr)
        return 1
    extra = f"; left out non-tensor entries: {', '.join(r.skipped[:5])}" if r.skipped else ""
    print(f"converted {r.source} -> {r.output} ({r.tensors} tensors, {r.seconds:.1f} s){extra}")
    return 0


# ----------------------------------------------------------------------------- registration


def register(sub: argparse._SubParsersAction) -> None:
    """Add audit, supply-chain (lab, keygen), sign, verify and convert to the `llmlab` subparsers."""
    p = sub.add_parser("audit", help="inspect a model file or folder before loading it (exit 0 clean, 1 findings, "
                                     "2 error)", description=cmd_audit.__doc__)
    _audit_args(p)
    p.set_defaults(func=cmd_audit)

    group = sub.add_parser("supply-chain", help="the poisoned-checkpoint lab and signing keys")
    ss = group.add_subparsers(dest="supply_chain_verb", metavar="SUBVERB")
    lab = ss.add_parser("lab", help="payloads vs scanners and loaders: the detection matrix",
                        description=cmd_lab.__doc__)
    _lab_args(lab)
    lab.set_defaults(func=cmd_lab)
    kg = ss.add_parser("keygen", help="make an EC P-256 key pair for `llmlab sign`", description=cmd_keygen.__doc__)
    _keygen_args(kg)
    kg.set_defaults(func=cmd_keygen)

    def _missing(a: argparse.Namespace) -> int:
        group.print_help(sys.stderr)
        return 2

    group.set_defaults(func=_missing)

    p = sub.add_parser("sign", help="sign a run or model folder (model_signing, local key, offline)",
                       description=cmd_sign.__doc__)
    _sign_args(p)
    p.set_defaults(func=cmd_sign)
    p = sub.add_parser("verify", help="verify a signed folder; fails naming what changed",
                       description=cmd_verify.__doc__)
    _verify_args(p)
    p.set_defaults(func=cmd_verify)
    p = sub.add_parser("convert", help="convert a PyTorch pickle checkpoint to safetensors after an audit",
                       description=cmd_convert.__doc__)
    _convert_args(p)
    p.set_defaults(func=cmd_convert)
