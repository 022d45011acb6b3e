"""Real third-party clients against `llmlab serve` (issue 13), each installed from PyPI into its own venv
outside the repo, driving the real CLI server (`python -m llmlab serve RUN`, a subprocess on 127.0.0.1, its
access log read back):

- lm-evaluation-harness 0.4.13 (`lm_eval --model local-completions`, its default tokenizer_backend=auto, which
  finds the server's /tokenizer_info and /tokenize and sends token ids) runs a local multiple-choice
  (log-likelihood) task and a local generate_until task (tests/data/lmeval: YAML + JSONL, nothing is
  downloaded). Its log-likelihoods equal llmlab's own scoring (llmlab.evaluate.token_logprobs) of the same
  tokens within 1e-4, its accuracy is the one those scores give, and every generation equals llmlab's own
  greedy generation with the same stop strings.
- garak 0.17.1 (its `openai.OpenAICompatible` generator, configured by a generator options file) runs three
  probes, one generation each; every chat request it sends is answered 200 and every attempt has an output.

The model is a tiny GPT with a byte-level BPE tokenizer, trained here on the task's own facts for a few
seconds. Slow (`.venv/bin/pytest -m slow tests/test_serve_clients.py`): the first run installs the clients
(lm-eval ~1 min, garak several minutes) into /work/venvs/lm-eval and /work/venvs/garak ($LLMLAB_CLIENT_VENVS
moves them). The venvs see this interpreter's packages (torch, transformers) through a .pth file and pip
installs only what is missing or pinned differently into the venv, so .venv itself is never changed. Without
access to PyPI the tests skip, saying so.
"""

from __future__ import annotations

import json
import os
import random
import re
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import httpx
import pytest
import torch
import torch.nn.functional as F

from llmlab.checkpoint import save_run_model
from llmlab.config import ModelConfig
from llmlab.evaluate import token_logprobs
from llmlab.generate.causal import GenerationConfig
from llmlab.generate.chat import generate_from_ids
from llmlab.models import build_model
from llmlab.tokenizers import BPETokenizer

pytestmark = pytest.mark.slow

DATA = Path(__file__).resolve().parent / "data" / "lmeval"
VENVS = Path(os.environ.get("LLMLAB_CLIENT_VENVS", "/work/venvs"))
LM_EVAL = "lm-eval[api]==0.4.13"
GARAK = "garak==0.17.1"
KEY = "llmlab-client-test"
ACCESS = re.compile(r'"(GET|POST|PUT|DELETE|OPTIONS|HEAD) (\S+) HTTP/[\d.]+" (\d{3})')


def client_venv(name: str, requirement: str) -> Path:
    """The python of the venv VENVS/name holding `requirement` (created and installed on first use).

    The venv is made from the base interpreter and sees this interpreter's site-packages through a .pth
    file, after its own: pip installs into the venv only what is missing there or pinned to another version
    (pip never uninstalls outside the environment it installs into), so torch is reused and .venv untouched."""
    venv = VENVS / name
    py = venv / "bin" / "python"
    stamp = venv / ".llmlab-installed"
    if py.exists() and stamp.is_file() and stamp.read_text() == requirement:
        return py
    try:
        VENVS.mkdir(parents=True, exist_ok=True)
        if not py.exists():
            subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(venv)], check=True,
                           capture_output=True, timeout=300)
        site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              check=True, capture_output=True, text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"cannot create a venv at {venv}: {e}")
    # addsitedir (not a plain path line) so that the .pth files over there (editable installs) work too
    base = sysconfig.get_paths()["purelib"]
    (Path(site) / "llmlab-base.pth").write_text(f"import site; site.addsitedir({base!r})\n")
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", requirement],
                       capture_output=True, text=True, timeout=3000)
    if r.returncode != 0:
        pytest.skip(f"cannot install {requirement} into {venv} (no access to PyPI?): {(r.stdout + r.stderr)[-600:]}")
    stamp.write_text(requirement)
    return py


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines() if line.strip()]


def trained_model(block_size: int = 1024, steps: int = 300) -> torch.nn.Module:
    """A 2-layer GPT with a byte-level BPE tokenizer trained for a few seconds on the tasks' facts ("The
    capital of France is Paris.", "Q: What is the capital of France?\\nA: Paris"), so it answers some of them."""
    lines = [f"{r['question']} {r['choices'][r['answer']]}." for r in _rows("capitals_mc.jsonl")]
    lines += [f"{r['question']} {r['answer']}" for r in _rows("capitals_gen.jsonl")]
    tok = BPETokenizer.train(lines, vocab_size=400)
    rng = random.Random(0)
    corpus = []
    for _ in range(40):
        rng.shuffle(lines)
        corpus.extend(lines)
    data = torch.tensor(tok.encode("\n".join(corpus)), dtype=torch.long)
    torch.manual_seed(0)
    cfg = ModelConfig(arch="gpt", vocab_size=tok.vocab_size, block_size=block_size, n_layer=2, n_head=2, n_embd=64)
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    T, B = 64, 16
    for _ in range(steps):
        ix = torch.randint(0, data.numel() - T - 1, (B,))
        x = torch.stack([data[i:i + T] for i in ix])  # (B, T)
        y = torch.stack([data[i + 1:i + T + 1] for i in ix])
        loss = F.cross_entropy(model(x).reshape(-1, cfg.vocab_size), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.tokenizer = tok
    return model.eval()


class Served:
    """`python -m llmlab serve RUN` on 127.0.0.1 with an API key, its access log in a file."""

    def __init__(self, run: Path, log: Path, model: torch.nn.Module):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url, self.log, self.model = f"http://127.0.0.1:{self.port}", log, model
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}  # the access log reaches the file at once
        self.out = log.open("w")
        self.proc = subprocess.Popen([sys.executable, "-m", "llmlab", "serve", str(run), "--port", str(self.port),
                                      "--name", "tiny", "--api-key", KEY, "--max-tokens", "256",
                                      "--log-level", "info"], stdout=self.out, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert self.proc.poll() is None and time.time() < deadline, log.read_text()[-2000:]
            time.sleep(0.2)

    def mark(self) -> int:
        return self.log.stat().st_size

    def requests_since(self, mark: int) -> list[tuple[str, str, int]]:
        """(method, path, status) of every request in the access log after `mark`."""
        with self.log.open("rb") as f:
            f.seek(mark)
            text = f.read().decode("utf-8", "replace")
        return [(m, p, int(s)) for m, p, s in ACCESS.findall(text)]

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.out.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("clients")
    model = trained_model()
    save_run_model(tmp / "run", model, model.tokenizer)
    s = Served(tmp / "run", tmp / "server.log", model)
    yield s
    s.close()


def _client_env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp / "hf"),
               HF_DATASETS_CACHE=str(tmp / "hf" / "datasets"), XDG_DATA_HOME=str(tmp / "xdg" / "data"),
               XDG_CONFIG_HOME=str(tmp / "xdg" / "config"), XDG_CACHE_HOME=str(tmp / "xdg" / "cache"),
               NO_PROXY="127.0.0.1,localhost", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **extra)
    return env


def _loglikelihood(model: torch.nn.Module, context: str, continuation: str) -> float:
    """log p(continuation | context) by llmlab's own scoring, tokenized as lm-eval does for a causal model
    (trailing spaces of the context move to the continuation; the whole is encoded and split)."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    tok = model.tokenizer
    whole, ctx = tok.encode(context + continuation), tok.encode(context)
    lp = token_logprobs(model, whole)  # lp[t - 1] = log p(whole[t] | whole[:t])
    return float(lp[len(ctx) - 1:].sum())


def _samples(out: Path, task: str) -> list[dict]:
    files = sorted(out.rglob(f"samples_{task}_*.jsonl"))
    assert files, f"lm-eval wrote no samples for {task} under {out}"
    return [json.loads(line) for line in files[-1].read_text().splitlines() if line.strip()]


def test_lm_evaluation_harness_local_completions(served: Served, tmp_path: Path) -> None:
    py = client_venv("lm-eval", LM_EVAL)
    out = tmp_path / "out"
    mark = served.mark()
    args = (f"model=tiny,base_url={served.url}/v1/completions,auth_token={KEY},num_concurrent=4,max_retries=1,"
            "timeout=300,max_length=1024")
    cmd = [str(py), "-m", "lm_eval", "--model", "local-completions", "--model_args", args, "--batch_size", "4",
           "--tasks", "llmlab_capitals_mc,llmlab_capitals_gen", "--include_path", str(DATA),
           "--output_path", str(out), "--log_samples"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=DATA, capture_output=True, text=True, timeout=1800,
                       env=_client_env(tmp_path, OPENAI_API_KEY=KEY))
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    took = time.perf_counter() - t0
    model = served.model

    # multiple choice: every choice's log-likelihood equals llmlab's scoring of the same tokens
    mc = _samples(out, "llmlab_capitals_mc")
    assert len(mc) == 12
    worst, right = 0.0, 0
    for s in mc:
        doc = s["doc"]
        theirs = [float(x[0]) for x in s["filtered_resps"]]
        ours = [_loglikelihood(model, doc["question"], " " + c) for c in doc["choices"]]
        assert len(theirs) == len(ours) == 4
        worst = max(worst, max(abs(a - b) for a, b in zip(theirs, ours)))
        right += int(max(range(4), key=lambda i: ours[i]) == doc["answer"])
    assert worst <= 1e-4, worst
    results = json.loads(sorted(out.rglob("results_*.json"))[-1].read_text())["results"]
    acc = results["llmlab_capitals_mc"]["acc,none"]
    assert abs(acc - right / 12) < 1e-9 and acc > 0.25, acc  # the trained model beats chance (4 choices)

    # generate_until: every generation equals llmlab's own greedy generation with the same stop strings
    gen = _samples(out, "llmlab_capitals_gen")
    assert len(gen) == 12
    tok = model.tokenizer
    stop = ("\n", ".", "Q:", "?", tok.id_to_token(tok.eos_id))
    for s in gen:
        raw = s["resps"][0][0]
        want = generate_from_ids(model, [tok.encode(s["doc"]["question"])],
                                 GenerationConfig(max_new_tokens=8, temperature=0.0, stop=stop))[0].text
        assert raw == want, (s["doc"], raw, want)
    assert "exact_match,strip" in results["llmlab_capitals_gen"]

    # the server's log: lm-eval found the tokenizer endpoints, and no request got a 4xx or 5xx
    seen = served.requests_since(mark)
    paths = {p for _, p, _ in seen}
    assert {"/tokenizer_info", "/tokenize", "/v1/completions"} <= paths, paths
    assert all(status == 200 for _, _, status in seen), [x for x in seen if x[2] != 200]
    print(f"lm-eval: {len(seen)} requests, acc {acc:.3f}, max |d loglik| {worst:.2e}, {took:.0f} s")


def test_garak_openai_compatible_generator(served: Served, tmp_path: Path) -> None:
    py = client_venv("garak", GARAK)
    opts = tmp_path / "generator.json"
    opts.write_text(json.dumps({"openai": {"OpenAICompatible": {
        "uri": served.url + "/v1/", "max_tokens": 48, "seed": 7}}}))
    cfg = tmp_path / "garak.yaml"
    cfg.write_text("run:\n  generations: 1\n  soft_probe_prompt_cap: 8\n  seed: 7\n"
                   f"reporting:\n  report_dir: {tmp_path / 'reports'}\n  bootstrap_num_iterations: 100\n")
    probes = ["test.Test", "encoding.InjectBase64", "lmrc.Anthropomorphisation"]
    mark = served.mark()
    cmd = [str(py), "-m", "garak", "--target_type", "openai.OpenAICompatible", "--target_name", "tiny",
           "--generator_option_file", str(opts), "--config", str(cfg),
           "--spec", ",".join(f"probes.{p}" for p in probes),
           "--report_prefix", "llmlab", "--parallel_attempts", "4"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=1800,
                       env=_client_env(tmp_path, OPENAICOMPATIBLE_API_KEY=KEY))
    log = (r.stdout + r.stderr)[-4000:]
    assert r.returncode == 0, log
    took = time.perf_counter() - t0
    reports = sorted(tmp_path.rglob("llmlab.report.jsonl"))
    assert reports, f"garak wrote no report under {tmp_path}: {log}"
    entries = [json.loads(line) for line in reports[-1].read_text().splitlines() if line.strip()]
    attempts = [e for e in entries if e.get("entry_type") == "attempt" and e.get("status") == 2]
    by_probe = {p: [a for a in attempts if a.get("probe_classname", "").endswith(p)] for p in probes}
    assert all(by_probe.values()), {p: len(v) for p, v in by_probe.items()}
    # every attempt got an output (garak records None when a request fails)
    assert all(a["outputs"] and all(o is not None for o in a["outputs"]) for a in attempts), log

    # the server's log: every chat request garak sent was answered 200; the only other request is garak's
    # reachability check (GET /v1/, which an OpenAI API answers 404)
    seen = served.requests_since(mark)
    chats = [x for x in seen if x[:2] == ("POST", "/v1/chat/completions")]
    assert len(chats) >= len(attempts) and all(status == 200 for _, _, status in chats), chats
    others = [x for x in seen if x[:2] != ("POST", "/v1/chat/completions")]
    assert all(x[:2] == ("GET", "/v1/") for x in others), others
    print(f"garak: {len(attempts)} attempts, {len(chats)} chat requests, all 200, {took:.0f} s")
