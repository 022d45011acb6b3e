"""The Goodhart lab: optimise a policy against a proxy reward model whose training pairs carry label noise and a
planted spurious feature, and watch the gold reward (a program, see task.py) that the proxy was meant to stand
for. Per seed:

  1. SFT: a small decoder trained on demonstrations (no pretraining at this size: the task's text is all it sees)
  2. a proxy reward model (SFT-initialised, Bradley-Terry) on gold-labelled pairs with noise and the plant
  3. optimisers against the proxy, and against the gold reward itself (the control, where no fall is expected):
     best-of-n (n = 1..256, exact on a pool of samples), DPO at several betas on pairs of the SFT policy's own
     samples labelled by the reward, REINFORCE with a per-token KL penalty at several KL coefficients
  4. at each point: proxy and gold reward, KL to the SFT policy (Monte-Carlo for DPO and RL, exact on the pool
     and analytic for best-of-n), answer length and the spurious feature's rate; Gao et al. (2022)'s forms
     fitted; the peak of the gold reward and its fall after, with bootstrap intervals over seeds x prompts.

    result = run(LabConfig.quick_config(), None, progress, out)   then report.write_lab_report(result, out)

Training runs go through the one training loop (objectives sft, reward, dpo, reinforce) into run folders under
`out`; a finished run is reused when the lab is run again into the same folder."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmlab.checkpoint import atomic_write_bytes, load_weights_into
from llmlab.errors import ConfigError
from llmlab.labs.align.fit import bon_distribution, bon_kl_analytic, fall_statistic, fit_gao
from llmlab.labs.align.task import TaskConfig, eval_prompts, gold_rewards, is_correct, pair_rows, sft_rows, spurious
from llmlab.progress import Progress, Stage, message
from llmlab.train.config import resolve_config
from llmlab.train.loop import last_checkpoint, load_run_for_resume, run_finished, train
from llmlab.train.preference import (
    RewardFn,
    RewardModel,
    load_policy,
    prompt_ids_for,
    response_batch,
    response_text,
    sample_ids,
    token_logps,
)
from llmlab.train.reinforce import register_reward

OPTIMISERS = ("bon", "dpo", "rl")
REWARDS = ("proxy", "control")
GOLD_FN = "goodhart-gold"
register_reward(GOLD_FN, gold_rewards)


@dataclass
class LabConfig:
    """The Goodhart lab. Defaults: the full lab (23.5 min measured on 2 cores under a load of 4-9; goal < 15 min
    quiet, not yet timed quietly); quick_config(): toy size, one seed."""

    seeds: tuple[int, ...] = (0, 1, 2)
    optimisers: tuple[str, ...] = OPTIMISERS
    rewards: tuple[str, ...] = REWARDS
    task: TaskConfig = field(default_factory=TaskConfig)
    model: dict[str, Any] = field(default_factory=lambda: dict(n_layer=2, n_head=4, n_embd=96, block_size=112))
    n_sft: int = 3000
    n_pairs: int = 2000
    n_gold_pairs: int = 300  # held-out pairs labelled by the gold reward alone (no noise, no plant)
    n_train_prompts: int = 384  # prompts for DPO's sampled pairs and for RL
    n_eval_prompts: int = 48
    sft_iters: int = 600
    rm_iters: int = 250
    bon_ns: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    dpo_betas: tuple[float, ...] = (0.1, 0.5)
    dpo_iters: int = 80
    # lr 1e-3 over-tunes DPO even against the gold reward itself (the control's gold fell 0.23 -> 0.03 at KL 20-30);
    # at 1e-4 the control keeps its gold within noise while the proxy's falls (README, issue 20)
    dpo_lr: float = 1e-4
    rl_kl: tuple[float, ...] = (0.0, 0.1)
    rl_iters: int = 60
    rl_lr: float = 1e-4  # 1e-3 made even the control unstable (KL jumping 6 -> 36 -> 8, gold falling)
    rl_prompts: int = 8  # prompts per RL step (each sampled rl_samples times)
    rl_samples: int = 4
    points: int = 5  # evaluations along each DPO / RL run (plus the SFT policy at step 0)
    eval_samples: int = 4  # samples per evaluation prompt at each point
    max_new_tokens: int = 28
    bootstrap: int = 1000
    control_all_settings: bool = True  # False: the control runs only the first beta / KL coefficient

    @classmethod
    def quick_config(cls) -> LabConfig:
        """Toy size, every stage exercised, the same report (one seed; 3 min measured under a load of 4)."""
        return cls(seeds=(0,), n_sft=2000, n_pairs=1500, n_gold_pairs=200, n_train_prompts=256, n_eval_prompts=32,
                   sft_iters=300, rm_iters=150, bon_ns=(1, 2, 4, 8, 16, 32, 64), dpo_betas=(0.1,), dpo_iters=60,
                   rl_kl=(0.0, 0.1), rl_iters=48, points=4, eval_samples=4, max_new_tokens=28, bootstrap=400,
                   control_all_settings=False)

    def validate(self) -> None:
        bad = [o for o in self.optimisers if o not in OPTIMISERS]
        if bad or not self.optimisers:
            raise ConfigError(f"--optimisers: use a comma-separated list of {', '.join(OPTIMISERS)}")
        if any(r not in REWARDS for r in self.rewards) or not self.rewards:
            raise ConfigError(f"--rewards: use a comma-separated list of {', '.join(REWARDS)}")
        if not self.seeds:
            raise ConfigError("--seeds is empty; give at least one seed")
        if any(b <= 0 for b in self.dpo_betas):
            raise ConfigError(f"--betas must all be > 0, got {', '.join(map(str, self.dpo_betas))}")
        if any(k < 0 for k in self.rl_kl):
            raise ConfigError(f"--kl-coefs must all be >= 0, got {', '.join(map(str, self.rl_kl))}")
        if any(n < 1 for n in self.bon_ns) or 1 not in self.bon_ns:
            raise ConfigError("--ns must be positive and include 1 (the policy itself)")
        if max(self.bon_ns) > 1024:
            raise ConfigError("--ns: at most 1024 samples per prompt")
        if self.points < 1 or self.eval_samples < 2:
            raise ConfigError("points must be >= 1 and eval_samples >= 2")


@dataclass
class LabResult:
    config: dict[str, Any]
    reward_models: dict[str, dict[str, Any]]  # per seed: held-out accuracy, agreement with gold, "!" preference
    sft: dict[str, dict[str, Any]]  # per seed: the SFT policy's gold, proxy, length, "!" rate
    points: list[dict[str, Any]]  # every evaluated point (optimiser, reward, setting, seed, step, kl, proxy, ...)
    curves: dict[str, dict[str, Any]]  # "opt/reward/setting": means per point, fall statistic
    fits: dict[str, dict[str, Any]]  # "opt/reward": Gao fits of gold (and proxy) against d = sqrt(KL)
    frontier: dict[str, Any]  # RL: does the KL penalty move the gold-vs-KL frontier (Gao et al.)
    samples: list[dict[str, Any]]
    throughput: dict[str, float]
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)


# ----------------------------------------------------------------------------- measuring a policy


def load_run_policy(run: Path, weights: Path | None = None) -> torch.nn.Module:
    """A run folder's policy (its best weights, or a checkpoint's)."""
    m = load_policy(run, "policy")
    if weights is not None:
        load_weights_into(m, weights)
    m.eval()
    return m


@torch.inference_mode()
def measure_policy(policy: torch.nn.Module, ref: torch.nn.Module, prompts: list[str], k: int,
                   rewards: dict[str, RewardFn], max_new: int, seed: int) -> dict[str, Any]:
    """k samples per prompt from the policy: per-prompt means (P,) of every reward, the Monte-Carlo KL
    (sum over response tokens of log pi - log pi_ref, averaged over samples from pi: an unbiased estimate of
    KL(pi || pi_ref)), answer length (characters), the spurious feature's rate, correctness; and the texts."""
    tok = policy.tokenizer
    enc = prompt_ids_for(tok, prompts, policy.config.block_size, max_new)
    rep = [p for p in enc for _ in range(k)]
    resp = sample_ids(policy, rep, max_new, 1.0, seed)
    eos = tok.eos_id
    resp = [r or [eos if eos is not None else 0] for r in resp]
    pad = tok.pad_id if tok.pad_id is not None else 0
    kls = []
    for i in range(0, len(rep), 512):
        ids, mask = response_batch(rep[i:i + 512], resp[i:i + 512], pad)
        kls.append((token_logps(policy, ids, mask) - token_logps(ref, ids, mask)).sum(-1))
    kl = torch.cat(kls)
    texts = [response_text(tok, r) for r in resp]
    ptexts = [p for p in prompts for _ in range(k)]
    out: dict[str, Any] = {name: fn(ptexts, texts).float().view(-1, k).mean(1).numpy() for name, fn in rewards.items()}
    out["kl"] = kl.view(-1, k).mean(1).numpy()
    out["length"] = np.array([len(t.strip()) for t in texts], dtype=float).reshape(-1, k).mean(1)
    out["spurious"] = np.array([spurious(t) for t in texts], dtype=float).reshape(-1, k).mean(1)
    out["correct"] = np.array([is_correct(p, t) for p, t in zip(ptexts, texts)], dtype=float).reshape(-1, k).mean(1)
    out["texts"] = [texts[i * k:(i + 1) * k] for i in range(len(prompts))]
    return out


def score_pool(prompts: list[str], texts: list[list[str]], rewards: dict[str, RewardFn]) -> dict[str, np.ndarray]:
    """Every reward of every pooled sample (P, N), scored in one batch per reward."""
    P, N = len(texts), len(texts[0])
    flat_p = [p for p in prompts for _ in range(N)]
    flat_t = [t for ts in texts for t in ts]
    return {name: fn(flat_p, flat_t).float().numpy().reshape(P, N) for name, fn in rewards.items()}


def bon_points(pool: dict[str, np.ndarray], texts: list[list[str]], prompts: list[str], select: str,
               ns: tuple[int, ...]) -> list[dict[str, Any]]:
    """Best-of-n by the `select` reward for each n, exact on the pool: per-prompt expected rewards, length,
    spurious rate and correctness under the best-of-n distribution, the exact KL on the pool and the analytic
    bound; the selected answer of the first prompts."""
    P, N = pool[select].shape
    feats = {"length": np.array([[len(t.strip()) for t in ts] for ts in texts], dtype=float),
             "spurious": np.array([[spurious(t) for t in ts] for ts in texts], dtype=float),
             "correct": np.array([[is_correct(p, t) for t in ts] for p, ts in zip(prompts, texts)], dtype=float)}
    rows = []
    for n in ns:
        per: dict[str, list[float]] = {k: [] for k in [*pool, *feats, "kl"]}
        picks = []
        for i in range(P):
            q, kl = bon_distribution(pool[select][i], n)
            per["kl"].append(kl)
            for k, v in pool.items():
                per[k].append(float(q @ v[i]))
            for k, v in feats.items():
                per[k].append(float(q @ v[i]))
            if i < 3:
                picks.append(texts[i][int(np.argmax(pool[select][i][:n]))])
        rows.append({"n": n, "kl_analytic": bon_kl_analytic(n), **{k: np.array(v) for k, v in per.items()},
                     "picked": picks})
    return rows


# ----------------------------------------------------------------------------- training runs


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in rows).encode())


def _train(run: Path, overrides: dict[str, Any], align: dict[str, Any], model: dict[str, Any]) -> Path:
    """One training run through the one loop, reused when already finished, resumed when interrupted."""
    if run_finished(run):
        return run
    if run.exists() and last_checkpoint(run) is not None and (run / "config.json").is_file():
        train(load_run_for_resume(run), run, resume=True)  # an interrupted lab continues where it stopped
        return run
    cfg = resolve_config("tiny", None, {**model, **overrides})
    cfg = dataclasses.replace(cfg, model=cfg.model.replace(extra={"align": align}))
    train(cfg, run)
    return run


def _checkpoints(run: Path) -> list[tuple[int, Path]]:
    d = run / "checkpoints"
    out = []
    for p in sorted(d.iterdir()) if d.is_dir() else []:
        if p.name.startswith("step-") and (p / "model.safetensors").is_file():
            step = int(p.name.split("-")[1])
            if step > 0:
                out.append((step, p / "model.safetensors"))
    return out


def _common(seed: int, iters: int, lr: float, batch: int, points: int) -> dict[str, Any]:
    every = max(1, iters // points)
    return dict(seed=seed, max_iters=iters, lr=lr, min_lr=lr, warmup_iters=min(10, iters // 10), batch_size=batch,
                eval_interval=iters, eval_iters=2, checkpoint_every=every, keep_checkpoints=points + 2,
                weight_decay=0.0, num_samples=0, val_fraction=0.1, tokenizer="char")


# ----------------------------------------------------------------------------- the lab


def run(config: LabConfig, model: Any = None, progress: Progress | None = None, out: str | Path | None = None
        ) -> LabResult:
    """Run the Goodhart lab into `out` (run folders and data); returns every number (the report is written
    by report.write_lab_report). `model` is unused (the lab trains its own policy: the gold reward is only
    known for its task)."""
    config.validate()
    if out is None:
        raise ConfigError("the Goodhart lab needs an output folder for its runs (out=...)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    points: list[dict[str, Any]] = []
    rm_stats: dict[str, dict[str, Any]] = {}
    sft_stats: dict[str, dict[str, Any]] = {}
    samples: list[dict[str, Any]] = []
    throughput: dict[str, float] = {}
    c = config

    def tick(name: str, t: float) -> None:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - t

    def settings(kind: str, values: tuple[float, ...]) -> tuple[float, ...]:
        return values if kind == "proxy" or c.control_all_settings else values[:1]

    n_runs = len(c.seeds) * (2 + ("bon" in c.optimisers)
                             + ("dpo" in c.optimisers) * sum(len(settings(k, c.dpo_betas)) for k in c.rewards)
                             + ("rl" in c.optimisers) * sum(len(settings(k, c.rl_kl)) for k in c.rewards))
    with Stage(progress, "Goodhart lab (runs)", n_runs) as st:
        for seed in c.seeds:
            sd = out / f"seed-{seed}"
            data = sd / "data"
            data.mkdir(parents=True, exist_ok=True)
            base_seed = 1000 * (seed + 1)
            _write_jsonl(data / "sft.jsonl", sft_rows(c.n_sft, base_seed, c.task))
            pairs = pair_rows(c.n_pairs, base_seed + 1, c.task)
            _write_jsonl(data / "rm_pairs.jsonl", pairs)
            gold_pairs = pair_rows(c.n_gold_pairs, base_seed + 2, c.task, noisy=False)
            train_prompts = eval_prompts(c.n_train_prompts, base_seed + 3)
            evp = eval_prompts(c.n_eval_prompts, base_seed + 4)
            _write_jsonl(data / "prompts.jsonl", [{"prompt": p} for p in train_prompts])

            t = time.perf_counter()
            sft_run = _train(sd / "sft", dict(task="sft", data=str(data / "sft.jsonl"), seed=base_seed, lr=2e-3,
                                              min_lr=2e-4, max_iters=c.sft_iters, warmup_iters=30, batch_size=32,
                                              eval_interval=c.sft_iters, eval_iters=2, num_samples=0,
                                              val_fraction=0.05, tokenizer="char"), {}, c.model)
            tick("sft", t)
            st.advance()
            t = time.perf_counter()
            rm_run = _train(sd / "rm", dict(task="reward", base=str(sft_run), data=str(data / "rm_pairs.jsonl"),
                                            seed=base_seed + 1, lr=1e-3, min_lr=1e-4, max_iters=c.rm_iters,
                                            warmup_iters=20, batch_size=32, eval_interval=c.rm_iters, eval_iters=2,
                                            num_samples=0, val_fraction=0.1, weight_decay=0.0), {}, c.model)
            tick("reward model", t)
            st.advance()
            from llmlab.interop import load

            rm = RewardModel(load(rm_run))
            sft = load_run_policy(sft_run)
            rm_stats[str(seed)] = _rm_stats(rm, rm_run, gold_pairs, evp)
            rewards: dict[str, RewardFn] = {"proxy": rm, "gold": gold_rewards}
            select_by = {"proxy": "proxy", "control": "gold"}
            t = time.perf_counter()
            m0 = measure_policy(sft, sft, evp, c.eval_samples, rewards, c.max_new_tokens, base_seed + 5)
            sft_stats[str(seed)] = {k: float(np.mean(m0[k])) for k in ("proxy", "gold", "kl", "length", "spurious",
                                                                          "correct")}
            tick("evaluation", t)

            def add_point(opt: str, kind: str, setting: str, step: int, m: dict[str, Any], seed: int = seed,
                          **extra: Any) -> None:
                points.append({"optimiser": opt, "reward": kind, "setting": setting, "seed": seed, "step": step,
                               **{k: m[k] for k in ("proxy", "gold", "kl", "length", "spurious", "correct")},
                               **extra})

            if "bon" in c.optimisers:
                t = time.perf_counter()
                N = max(c.bon_ns)
                s0 = time.perf_counter()
                texts_flat = _pool_texts(sft, evp, N, c.max_new_tokens, base_seed + 6)
                s1 = time.perf_counter()
                pool = score_pool(evp, texts_flat, rewards)
                s2 = time.perf_counter()
                throughput[f"seed {seed}: samples/s (batched sampling)"] = len(evp) * N / max(1e-9, s1 - s0)
                throughput[f"seed {seed}: scores/s (batched reward model + gold)"] = len(evp) * N / max(1e-9, s2 - s1)
                for kind in c.rewards:
                    for row in bon_points(pool, texts_flat, evp, select_by[kind], c.bon_ns):
                        m = {"proxy": row["proxy"], "gold": row["gold"], "kl": row["kl"], "length": row["length"],
                             "spurious": row["spurious"], "correct": row["correct"]}
                        add_point("bon", kind, "best-of-n", row["n"], m, n=row["n"], kl_analytic=row["kl_analytic"])
                        if row["n"] in (1, 4, max(c.bon_ns)) or row["n"] == c.bon_ns[len(c.bon_ns) // 2]:
                            samples.append({"optimiser": "bon", "reward": kind, "seed": seed, "point": f"n={row['n']}",
                                            "kl": float(np.mean(row["kl"])), "gold": float(np.mean(row["gold"])),
                                            "proxy": float(np.mean(row["proxy"])),
                                            "prompts": evp[:3], "answers": row["picked"]})
                tick("best-of-n", t)
                st.advance()

            jobs: list[tuple[str, str, float]] = []
            if "dpo" in c.optimisers:
                jobs += [("dpo", kind, b) for kind in c.rewards for b in settings(kind, c.dpo_betas)]
            if "rl" in c.optimisers:
                jobs += [("rl", kind, k) for kind in c.rewards for k in settings(kind, c.rl_kl)]
            dpo_data: dict[str, Path] = {}
            for opt, kind, val in jobs:
                t = time.perf_counter()
                if opt == "dpo":
                    if kind not in dpo_data:
                        dpo_data[kind] = _dpo_pairs(sft, train_prompts, rewards[select_by[kind]], c.max_new_tokens,
                                                    base_seed + 7, data / f"dpo_pairs_{kind}.jsonl")
                    run_dir = sd / f"dpo-{kind}-beta{val:g}"
                    _train(run_dir, dict(task="dpo", base=str(sft_run), data=str(dpo_data[kind]),
                                         **_common(base_seed + 8, c.dpo_iters, c.dpo_lr, 32, c.points)),
                           {"beta": val, "loss_type": "sigmoid"}, c.model)
                    setting = f"beta={val:g}"
                else:
                    reward_spec = f"fn:{GOLD_FN}" if kind == "control" else str(rm_run)
                    run_dir = sd / f"rl-{kind}-kl{val:g}"
                    _train(run_dir, dict(task="reinforce", base=str(sft_run), data=str(data / "prompts.jsonl"),
                                         **_common(base_seed + 9, c.rl_iters, c.rl_lr, c.rl_prompts, c.points)),
                           {"reward": reward_spec, "kl_coef": val, "samples": c.rl_samples,
                            "max_new_tokens": c.max_new_tokens}, c.model)
                    setting = f"kl_coef={val:g}"
                tick(opt, t)
                t = time.perf_counter()
                add_point(opt, kind, setting, 0, m0)
                ckpts = _checkpoints(run_dir)
                pol = load_run_policy(sft_run)
                for j, (step, w) in enumerate(ckpts):
                    load_weights_into(pol, w)
                    m = measure_policy(pol, sft, evp, c.eval_samples, rewards, c.max_new_tokens, base_seed + 5)
                    add_point(opt, kind, setting, step, m)
                    if j in (0, len(ckpts) // 2, len(ckpts) - 1):
                        samples.append({"optimiser": opt, "reward": kind, "seed": seed,
                                        "point": f"{setting}, step {step}", "kl": float(np.mean(m["kl"])),
                                        "gold": float(np.mean(m["gold"])), "proxy": float(np.mean(m["proxy"])),
                                        "prompts": evp[:3], "answers": [ts[0] for ts in m["texts"][:3]]})
                tick("evaluation", t)
                st.advance()
            message(progress, f"seed {seed} done ({time.perf_counter() - t0:.0f} s so far)")

    curves, fits, frontier = summarise(points, c)
    return LabResult(config=_config_dict(c), reward_models=rm_stats, sft=sft_stats, points=_plain_points(points),
                     curves=curves, fits=fits, frontier=frontier, samples=samples, throughput=throughput,
                     seconds=time.perf_counter() - t0, timings=timings)


def _config_dict(c: LabConfig) -> dict[str, Any]:
    d = dataclasses.asdict(c)
    return d


def _pool_texts(policy: torch.nn.Module, prompts: list[str], N: int, max_new: int, seed: int) -> list[list[str]]:
    from llmlab.train.preference import sample_responses

    return sample_responses(policy, prompts, N, max_new, 1.0, seed, batch_size=4096)


def _dpo_pairs(policy: torch.nn.Module, prompts: list[str], reward: RewardFn, max_new: int, seed: int,
               path: Path) -> Path:
    """Pairs of the policy's own samples (two per prompt, four tried), the one with the higher reward chosen."""
    from llmlab.train.preference import sample_responses

    texts = sample_responses(policy, prompts, 4, max_new, 1.0, seed)
    flat_p = [p for p in prompts for _ in range(4)]
    r = reward(flat_p, [t for ts in texts for t in ts]).view(len(prompts), 4)
    rows = []
    for i, p in enumerate(prompts):
        j, k = int(r[i].argmax()), int(r[i].argmin())
        if r[i, j] - r[i, k] > 1e-6 and texts[i][j] != texts[i][k]:
            rows.append({"prompt": p, "chosen": texts[i][j], "rejected": texts[i][k]})
    if len(rows) < 8:
        raise ConfigError("the SFT policy's samples are too alike to make DPO pairs; train it less or sample more")
    _write_jsonl(path, rows)
    return path


@torch.inference_mode()
def _rm_stats(rm: RewardModel, rm_run: Path, gold_pairs: list[dict[str, Any]], prompts: list[str]) -> dict[str, Any]:
    """The proxy's accuracy on held-out pairs labelled like its training pairs, its agreement with the gold
    reward on clean pairs, and how often it prefers an answer exclaimed over the same answer plain."""
    from llmlab.labs.align.task import exclaim, plain

    ev = json.loads((rm_run / "eval.json").read_text()) if (rm_run / "eval.json").is_file() else {}
    ps = [r["prompt"] for r in gold_pairs]
    c = rm(ps, [r["chosen"] for r in gold_pairs])
    r = rm(ps, [r["rejected"] for r in gold_pairs])
    agree = (c > r).float()
    plain_ans = [" " + plain(r["chosen"]).strip() for r in gold_pairs]
    loud = [" " + exclaim(a, 3).strip() for a in plain_ans]
    pref = (rm(ps, loud) > rm(ps, plain_ans)).float()
    from llmlab.stats import rate_of

    return {"heldout_accuracy": ev.get("val_accuracy"), "heldout_pairs": ev.get("val_pairs"),
            "gold_agreement": rate_of(agree.bool().tolist()).to_dict(),
            "prefers_exclaimed": rate_of(pref.bool().tolist()).to_dict()}


def _plain_points(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Points with per-prompt arrays replaced by their means (the arrays stay in curves for the statistics)."""
    out = []
    for p in points:
        q = {k: (float(np.mean(v)) if isinstance(v, np.ndarray) else v) for k, v in p.items()}
        out.append(q)
    return out


def summarise(points: list[dict[str, Any]], c: LabConfig) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Curves (means per point over seeds x prompts, the gold fall after its peak with a bootstrap interval),
    Gao fits per optimiser and reward (gold and proxy gain over the SFT policy against d = sqrt(KL)), and
    the RL frontier check."""
    curves: dict[str, Any] = {}
    fits: dict[str, Any] = {}
    keys = sorted({(p["optimiser"], p["reward"], p["setting"]) for p in points})
    for opt, kind, setting in keys:
        rows = [p for p in points if (p["optimiser"], p["reward"], p["setting"]) == (opt, kind, setting)]
        steps = sorted({p["step"] for p in rows})
        seeds = sorted({p["seed"] for p in rows})
        by = {(p["step"], p["seed"]): p for p in rows}
        steps = [s for s in steps if all((s, sd) in by for sd in seeds)]
        if not steps:
            continue
        A = np.stack([np.concatenate([by[(s, sd)]["gold"] for sd in seeds]) for s in steps])
        Pm = np.stack([np.concatenate([by[(s, sd)]["proxy"] for sd in seeds]) for s in steps])
        mean = {k: [float(np.mean([np.mean(by[(s, sd)][k]) for sd in seeds])) for s in steps]
                for k in ("proxy", "gold", "kl", "length", "spurious", "correct")}
        entry = {"optimiser": opt, "reward": kind, "setting": setting, "steps": steps, "seeds": seeds, **mean,
                 "gold_fall": fall_statistic(A, c.bootstrap), "proxy_gain": float(Pm[-1].mean() - Pm[0].mean())}
        if opt == "bon":
            entry["kl_analytic"] = [float(by[(s, seeds[0])]["kl_analytic"]) for s in steps]
        curves[f"{opt}/{kind}/{setting}"] = entry
    for opt in OPTIMISERS:
        for kind in REWARDS:
            rows = [p for p in points if p["optimiser"] == opt and p["reward"] == kind]
            if not rows:
                continue
            base = {(p["seed"]): p for p in rows if p["step"] == 0 or p.get("n") == 1}
            d, g, r = [], [], []
            for p in rows:
                b = base.get(p["seed"])
                if b is None:
                    continue
                d.append(float(np.sqrt(max(0.0, float(np.mean(p["kl"]))))))
                g.append(float(np.mean(p["gold"]) - np.mean(b["gold"])))
                r.append(float(np.mean(p["proxy"]) - np.mean(b["proxy"])))
            form = "bon" if opt == "bon" else "rl"
            fits[f"{opt}/{kind}"] = {"form": form, "gold": fit_gao(d, g, form), "proxy": fit_gao(d, r, form),
                                     "d": d, "gold_gain": g, "proxy_gain": r}
            if opt == "bon":
                da = [float(np.sqrt(p["kl_analytic"])) for p in rows if p["seed"] in base]
                fits[f"{opt}/{kind}"]["gold_analytic_kl"] = fit_gao(da, g, "bon")
    frontier = _frontier(fits, points)
    return curves, fits, frontier


def _frontier(fits: dict[str, Any], points: list[dict[str, Any]]) -> dict[str, Any]:
    """Gao et al. (2022) report that a KL penalty does not move the gold-reward-versus-KL frontier (it only
    stops the run earlier on it). Check: fit the RL form to the proxy-reward RL points of all KL coefficients
    together, then each coefficient's mean residual (its points above or below the shared curve), with a
    bootstrap interval; intervals that cover 0 agree with the claim."""
    f = fits.get("rl/proxy")
    if not f:
        return {"measured": False}
    rows = [p for p in points if p["optimiser"] == "rl" and p["reward"] == "proxy" and p["step"] > 0]
    from llmlab.labs.align.fit import gao_curve
    from llmlab.stats import bootstrap_ci

    base = {p["seed"]: p for p in points if p["optimiser"] == "rl" and p["reward"] == "proxy" and p["step"] == 0}
    out: dict[str, Any] = {"measured": True, "shared_fit": f["gold"], "by_setting": {}}
    for setting in sorted({p["setting"] for p in rows}):
        res = []
        for p in rows:
            if p["setting"] != setting or p["seed"] not in base:
                continue
            d = float(np.sqrt(max(0.0, float(np.mean(p["kl"])))))
            g = float(np.mean(p["gold"]) - np.mean(base[p["seed"]]["gold"]))
            res.append(g - float(gao_curve([d], f["gold"]["alpha"], f["gold"]["beta"], "rl")[0]))
        lo, hi = bootstrap_ci(res) if len(res) > 1 else (float("nan"), float("nan"))
        out["by_setting"][setting] = {"mean_residual": float(np.mean(res)) if res else float("nan"), "lo": lo,
                                      "hi": hi, "n": len(res)}
    return out
