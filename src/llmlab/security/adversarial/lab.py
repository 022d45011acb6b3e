"""The adversarial-suffix lab: optimise GCG suffixes on white-box models, judge them by generation, send them
to other targets (transfer), and measure the baseline defences with the same attack.

    run(AttackConfig(...), progress) -> AttackResult

Negative control: every goal is also sent without a suffix. Several seeds give several suffixes per goal.
Attack success rates carry exact (Clopper-Pearson) intervals.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmlab.errors import LlmlabError
from llmlab.progress import Progress, Stage, message
from llmlab.security.adversarial.defences import PerplexityFilter, bpe_dropout_ids, smoothllm
from llmlab.security.adversarial.gcg import GCGConfig, Goal, gcg
from llmlab.security.adversarial.goals import judge
from llmlab.security.targets import BatchChatTarget, TargetError, WhiteBox
from llmlab.stats import rate_of

DEFENCES = ("ppl", "window", "retok", "smooth")
BENIGN_FILE = Path(__file__).with_name("benign_prompts.txt")


@dataclass
class AttackConfig:
    """What to attack, with what, and which defences to measure."""

    models: tuple[str, ...] = ()  # white-box models the suffix is optimised on (paths, .gguf, smollm2)
    goals: tuple[Goal, ...] = ()
    gcg: GCGConfig = field(default_factory=GCGConfig)
    universal: bool = False  # one suffix for all goals (else one per goal)
    joint: bool = True  # several models: one suffix optimised on all at once (else one per model)
    seeds: tuple[int, ...] = (0,)
    transfer: tuple[str, ...] = ()  # chat targets the suffixes are sent to (openai:MODEL@URL, model folders)
    defences: tuple[str, ...] = ()  # of DEFENCES
    adaptive_weight: float = 0.0  # > 0: also run the adaptive attack (perplexity term of this weight)
    benign: tuple[str, ...] = ()  # benign prompts for the filter thresholds (default: llmlab's list)
    fpr: float = 0.05  # false-positive rate the filter thresholds are set for
    window: int = 10  # windowed perplexity filter: tokens per window
    dropout: float = 0.4  # retokenisation: BPE-dropout rate
    smooth_copies: int = 5  # SmoothLLM: perturbed copies
    smooth_q: float = 0.1  # SmoothLLM: fraction of characters perturbed
    max_new_tokens: int = 32
    dtype: str | None = None

    def check(self) -> None:
        self.gcg.check()
        bad = [d for d in self.defences if d not in DEFENCES]
        if bad:
            raise LlmlabError(f"unknown defence {bad[0]!r}; use a comma-separated list of {', '.join(DEFENCES)}")
        if not self.goals:
            raise LlmlabError("no goals to attack; give a goal and a target, HarmBench goals or a goal CSV")
        for g in self.goals:
            if not g.target.strip():
                raise LlmlabError(f"the target of goal {g.goal[:40]!r} is empty; give the reply to force, e.g. "
                                  "'Sure, here is'")
        if not 0 < self.fpr < 1:
            raise LlmlabError(f"the false-positive rate must be between 0 and 1 (got {self.fpr})")
        if self.max_new_tokens < 1:
            raise LlmlabError(f"max-new-tokens must be at least 1 (got {self.max_new_tokens})")


@dataclass
class AttackResult:
    """Every optimisation run, every judged attempt, and the rates computed from them."""

    config: dict[str, Any]
    runs: list[dict[str, Any]]
    attempts: list[dict[str, Any]]
    asr: list[dict[str, Any]]
    transfer: list[dict[str, Any]]
    filters: dict[str, Any]
    seconds: dict[str, float]


def _benign(cfg: AttackConfig) -> list[str]:
    if cfg.benign:
        return list(cfg.benign)
    return [x.strip() for x in BENIGN_FILE.read_text(encoding="utf-8").splitlines() if x.strip()]


class _Evaluator:
    """A model or endpoint the suffixes are judged on: a white-box model (generation from the exact prompt
    ids, and retokenisation possible) or a chat target (text in, text out)."""

    def __init__(self, name: str, wb: WhiteBox | None = None, chat: BatchChatTarget | None = None,
                 system: str | None = None, template: bool = True, assistant_prefix: str = "",
                 max_new_tokens: int = 32):
        self.name, self.wb, self.system = name, wb, system
        self.template, self.assistant_prefix, self.max_new = template, assistant_prefix, max_new_tokens
        self.chat = chat

    def _stop(self) -> tuple[str, ...]:
        from llmlab.chat import PLAIN_STOP, has_chat_template
        from llmlab.generate.chat import own_template

        tok = self.wb.tokenizer
        if self.template and own_template(tok) is None and not has_chat_template(tok):
            return PLAIN_STOP
        return ()

    def generate_ids(self, prompts: Sequence[list[int]]) -> list[str]:
        from llmlab.generate.causal import GenerationConfig
        from llmlab.generate.chat import generate_from_ids

        block = self.wb.block_size
        out: list[str] = []
        for k in range(0, len(prompts), 16):
            chunk = [p[-(block - self.max_new):] for p in prompts[k:k + 16]]
            cfg = GenerationConfig(max_new_tokens=self.max_new, temperature=0.0, stop=self._stop())
            out += [c.text for c in generate_from_ids(self.wb.model, chunk, cfg)]
        return out

    def respond(self, goals: Sequence[str], suffixes: Sequence[str], retok: float = 0.0, seed: int = 0
                ) -> list[str]:
        """The greedy reply to each goal + suffix."""
        if self.wb is not None:
            rng = random.Random(seed)
            prompts = []
            for g, s in zip(goals, suffixes):
                if retok:
                    before, after = self.wb.place("", self.system, self.template, self.assistant_prefix)
                    prompts.append(before + bpe_dropout_ids(self.wb, g + s, retok, rng) + after)
                else:
                    before, after = self.wb.place(g, self.system, self.template, self.assistant_prefix)
                    prompts.append(before + (self.wb.encode(s) if s else []) + after)
            return self.generate_ids(prompts)
        return self.texts([g + s for g, s in zip(goals, suffixes)])

    def texts(self, users: Sequence[str]) -> list[str]:
        """Replies to whole user texts: on a white-box model placed as the attack placed them, else through
        the chat interface (errors become their message, judged refused)."""
        if self.wb is not None:
            before, after = self.wb.place("", self.system, self.template, self.assistant_prefix)
            return self.generate_ids([before + self.wb.encode(u) + after for u in users])
        replies = self.chat.chat_many([(self.system, u) for u in users], max_tokens=self.max_new, temperature=0.0)
        return [f"[error: {r}]" if isinstance(r, TargetError) else r for r in replies]


def _sources(cfg: AttackConfig, wbs: list[WhiteBox]) -> list[tuple[str, list[WhiteBox]]]:
    if len(wbs) > 1 and cfg.joint:
        return [("+".join(w.name for w in wbs), wbs)]
    return [(w.name, [w]) for w in wbs]


def run(cfg: AttackConfig, progress: Progress | None = None, models: Sequence[WhiteBox] | None = None,
        targets: Sequence[BatchChatTarget] | None = None) -> AttackResult:
    """Optimise, judge, transfer and defend; `models` / `targets` given already loaded override cfg.models
    and cfg.transfer."""
    from llmlab.security.targets import parse_target

    cfg.check()
    t_all = time.perf_counter()
    seconds: dict[str, float] = {}
    wbs = list(models) if models is not None else [WhiteBox.load(m, cfg.dtype) for m in cfg.models]
    if not wbs:
        raise LlmlabError("no white-box model to optimise on; give a run folder, a Hugging Face folder, a .gguf "
                          "file or smollm2")
    chats = list(targets) if targets is not None else [parse_target(t) for t in cfg.transfer]
    goals = list(cfg.goals)
    g = cfg.gcg

    # 1. optimisation: per source (model set), condition (plain GCG / adaptive), seed and goal set
    conditions = [("gcg", g)]
    if cfg.adaptive_weight > 0:
        conditions.append(("adaptive", dataclasses.replace(g, ppl_weight=cfg.adaptive_weight)))
    goal_sets = [list(range(len(goals)))] if cfg.universal or len(goals) == 1 else [[i] for i in range(len(goals))]
    runs: list[dict[str, Any]] = []
    suffix: dict[tuple[str, str, int, int], str] = {}  # (source, condition, seed, goal) -> suffix text
    t0 = time.perf_counter()
    for src, src_models in _sources(cfg, wbs):
        for cond, gc in conditions:
            for seed in cfg.seeds:
                for gs in goal_sets:
                    message(progress, f"GCG ({cond}) on {src}, seed {seed}, "
                                      f"goal{'s' if len(gs) > 1 else ''} {', '.join(str(i + 1) for i in gs)}")
                    res = gcg(src_models, [goals[i] for i in gs], dataclasses.replace(gc, seed=seed), progress)
                    runs.append({"source": src, "condition": cond, "seed": seed, "goal_indices": gs,
                                 **res.to_dict()})
                    for i in gs:
                        suffix[(src, cond, seed, i)] = res.suffix
    seconds["optimise"] = time.perf_counter() - t0

    # 2. judge every suffix (and the no-suffix control) on every model and target, with each defence
    gc0 = cfg.gcg
    evals = [_Evaluator(w.name, wb=w, system=gc0.system, template=gc0.template,
                        assistant_prefix=gc0.assistant_prefix, max_new_tokens=cfg.max_new_tokens) for w in wbs]
    names = {w.name for w in wbs}
    evals += [_Evaluator(f"{c.name} (chat)" if c.name in names else c.name, chat=c, system=gc0.system,
                         max_new_tokens=cfg.max_new_tokens) for c in chats]
    items = [("none", "-", 0, i, "") for i in range(len(goals))]
    items += [(src, cond, seed, i, s) for (src, cond, seed, i), s in suffix.items()]
    filters: dict[str, Any] = {}
    t0 = time.perf_counter()
    flt: dict[str, PerplexityFilter] = {}
    if any(d in cfg.defences for d in ("ppl", "window")):
        ref = wbs[0]
        benign = _benign(cfg)
        cal, held = benign[0::2], benign[1::2]
        for d in ("ppl", "window"):
            if d in cfg.defences:
                f = PerplexityFilter.fit(ref, cal, cfg.fpr, cfg.window if d == "window" else None)
                fp = [f.flags(ref, t) for t in held]
                flt[d] = f
                filters[d] = {"threshold": f.threshold, "window": f.window, "reference": ref.name,
                              "target_fpr": cfg.fpr, "calibration_prompts": len(cal),
                              "heldout_fpr": rate_of(fp).to_dict()}
    attempts: list[dict[str, Any]] = []
    scores: dict[tuple[str, str], float] = {}
    n_work = len(evals) * len(items)
    with Stage(progress, "judge suffixes", n_work) as stage:
        for ev in evals:
            gl = [goals[it[3]].goal for it in items]
            sl = [it[4] for it in items]
            plain = ev.respond(gl, sl)
            extra: dict[str, list[Any]] = {}
            if "retok" in cfg.defences and ev.wb is not None:
                extra["retok"] = ev.respond(gl, sl, retok=cfg.dropout, seed=0)
            if "smooth" in cfg.defences:
                outs = []
                for k, (gtext, s) in enumerate(zip(gl, sl)):
                    tgt = goals[items[k][3]].target
                    outs.append(smoothllm(ev.texts, gtext + s, lambda r, t=tgt: judge(r, t)["jailbroken"],
                                          cfg.smooth_copies, cfg.smooth_q, seed=k))
                extra["smooth"] = outs
            for k, (src, cond, seed, gi, s) in enumerate(items):
                goal = goals[gi]
                base = {"source": src, "condition": cond, "seed": seed, "goal_index": gi, "goal": goal.goal,
                        "target": goal.target, "suffix": s, "evaluated_on": ev.name}
                j = judge(plain[k], goal.target)
                attempts.append({**base, "defence": "none", "generation": plain[k], **j})
                for d, f in flt.items():
                    key = (d, goal.goal + s)
                    if key not in scores:  # the filter reads the text, whatever model answers it
                        scores[key] = f.score(wbs[0], goal.goal + s)
                    score = scores[key]
                    blocked = score > f.threshold
                    jd = {**j, "jailbroken": j["jailbroken"] and not blocked, "success": j["success"] and not blocked}
                    attempts.append({**base, "defence": d, "generation": "[blocked]" if blocked else plain[k],
                                     "flagged": blocked, "score": score, **{k2: v for k2, v in jd.items()}})
                if "retok" in extra:
                    attempts.append({**base, "defence": "retok", "generation": extra["retok"][k],
                                     **judge(extra["retok"][k], goal.target)})
                if "smooth" in extra:
                    pick, maj, _ = extra["smooth"][k]
                    jd = judge(pick, goal.target)
                    jd["jailbroken"] = maj
                    jd["success"] = jd["success"] and maj
                    attempts.append({**base, "defence": "smooth", "generation": pick, **jd})
                stage.advance()
    seconds["judge"] = time.perf_counter() - t0
    for d in flt:  # detection rate of the filters on the attack prompts
        flagged = [a["flagged"] for a in attempts if a["defence"] == d and a["condition"] != "-"
                   and a["evaluated_on"] == evals[0].name]
        filters[d]["attack_detection"] = rate_of(flagged).to_dict()
    asr = summarise(attempts)
    transfer = transfer_matrix(attempts)
    seconds["total"] = time.perf_counter() - t_all
    conf = dataclasses.asdict(cfg)
    conf["goals"] = [dataclasses.asdict(x) for x in goals]
    return AttackResult(conf, runs, attempts, asr, transfer, filters, seconds)


def summarise(attempts: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """ASR rows: per (evaluated on, source, condition, defence): success and jailbroken rates with exact
    intervals over goals x seeds."""
    groups: dict[tuple[str, str, str, str], list[dict[str, Any]]] = {}
    for a in attempts:
        groups.setdefault((a["evaluated_on"], a["source"], a["condition"], a["defence"]), []).append(a)
    return [{"evaluated_on": e, "source": s, "condition": c, "defence": d,
             "success": rate_of([a["success"] for a in xs]).to_dict(),
             "jailbroken": rate_of([a["jailbroken"] for a in xs]).to_dict(),
             "target_match": rate_of([a["target_match"] for a in xs]).to_dict()}
            for (e, s, c, d), xs in groups.items()]


def transfer_matrix(attempts: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Source model (set) x target: success rate of the plain GCG suffixes, no defence."""
    cells: dict[tuple[str, str], list[bool]] = {}
    for a in attempts:
        if a["defence"] == "none" and a["condition"] in ("gcg", "-"):
            cells.setdefault((a["source"], a["evaluated_on"]), []).append(a["success"])
    return [{"source": s, "target": t, "success": rate_of(v).to_dict()} for (s, t), v in cells.items()]
