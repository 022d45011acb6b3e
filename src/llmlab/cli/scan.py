"""`llmlab scan TARGET`: prompt-injection and jailbreak probes against an llmlab run or any OpenAI-compatible
endpoint, with and without defences; a JSONL of attempts, an HTML report and a CI exit status."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from llmlab.cli.common import ProgressRenderer, console, verb
from llmlab.errors import LlmlabError
from llmlab.security.scan.probes import load_probes
from llmlab.security.scan.scanner import SCAN_SYSTEM, ScanConfig, run_scan, write_scan_report
from llmlab.security.targets import LlmlabChatTarget, parse_target


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", help="an llmlab run folder, or openai:MODEL@BASE_URL for any OpenAI-compatible endpoint "
                                  "(e.g. openai:llmlab@http://127.0.0.1:8000/v1)")
    p.add_argument("--probes", action="append", default=[],
                   help="a built-in probe set name or a .yaml/.jsonl file; repeatable (default: every built-in set)")
    p.add_argument("--family", action="append", default=[], help="only probes of this family; repeatable")
    p.add_argument("--defences", default="none,delimit,datamark,encode,canary,filter",
                   help="comma-separated defences to evaluate besides none (delimit,datamark,encode,canary,filter)")
    p.add_argument("--system", help="the target's system prompt; {secret} is replaced by a fresh secret per probe")
    p.add_argument("--out", help="report folder (default runs/scan-<timestamp>)")
    p.add_argument("--fail-above", type=float, metavar="RATE",
                   help="exit with status 1 when the overall attack success rate without a defence is above RATE")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the intervals")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    p.add_argument("--concurrency", type=int, default=4, help="parallel requests to an HTTP target")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per HTTP request")
    p.add_argument("--list", action="store_true", help="list the probes and exit")


@verb("scan", "probe a model or an OpenAI-compatible endpoint for prompt injection and jailbreaks", _args)
def cmd_scan(a: argparse.Namespace) -> int:
    from rich.markup import escape
    from rich.table import Table


    probes = load_probes(a.probes)
    if a.family:
        known = sorted({p.family for p in probes})
        bad = [f for f in a.family if f not in known]
        if bad:
            raise LlmlabError(f"--family {bad[0]}: no such family in these probes; families: {', '.join(known)}")
        probes = [p for p in probes if p.family in a.family]
    c = console()
    if a.list:
        for p in probes:
            c.print(f"[bold]{p.family}[/] {escape(p.id)}: {escape(p.prompt if p.document is None else p.task)}")
        return 0
    if a.fail_above is not None and not 0 <= a.fail_above <= 1:
        raise LlmlabError(f"--fail-above {a.fail_above} is not a rate between 0 and 1")
    if a.max_tokens < 1 or a.bootstrap < 1 or a.concurrency < 1:
        raise LlmlabError("--max-tokens, --bootstrap and --concurrency must be at least 1")
    defences = ["none"] + [d.strip() for d in a.defences.split(",") if d.strip() and d.strip() != "none"]
    target = parse_target(a.target, a.api_key_env, a.concurrency, a.timeout)
    cfg = ScanConfig(system=a.system if a.system is not None else SCAN_SYSTEM, defences=defences,
                     max_tokens=a.max_tokens, temperature=a.temperature, seed=a.seed, bootstrap=a.bootstrap)
    out = Path(a.out) if a.out else Path("runs") / f"scan-{time.strftime('%Y%m%d-%H%M%S')}"
    c.print(f"scanning {target.name}: {len(probes)} probes x {len(defences)} defence settings", style="bold")
    with ProgressRenderer() as progress:
        result = run_scan(target, probes, cfg, progress)
    write_scan_report(result, out, model=target.path if isinstance(target, LlmlabChatTarget) else None)
    t = Table("family", "attempts", *defences)
    families = [f for f in result.rates["none"] if f != "overall"] + ["overall"]
    # a family name is never cut to "payload_spl…" in an 80-column terminal: the rate columns wrap instead
    t.columns[0].no_wrap, t.columns[0].min_width = True, max(len(f) for f in families)
    for col in t.columns[1:]:
        col.overflow = "fold"  # wrap a cell rather than cut it
    for f in families:
        t.add_row(f, str(result.rates["none"][f].n),
                  *(f"{r.rate:.0%} [{r.lo:.0%}-{r.hi:.0%}]" if r.n else "not measured"
                    for r in (result.rates[d][f] for d in defences)))
    c.print(t)
    if result.benign:
        c.print("false refusals on benign requests: " + ", ".join(
            f"{d} {r.rate:.0%}" for d, r in result.benign.items()))
    errors = sum(1 for x in result.attempts if x.error)
    if errors:
        c.print(f"[yellow]{errors} attempts got no answer (left out of the rates; see the report)[/]")
    c.print(f"report: {out / 'report.html'}   attempts: {out / 'attempts.jsonl'}")
    base = result.overall("none")
    if a.fail_above is not None and base > a.fail_above:
        c.print(f"[red]FAIL[/]: attack success rate {base:.1%} is above --fail-above {a.fail_above:.1%}")
        return 1
    return 0
