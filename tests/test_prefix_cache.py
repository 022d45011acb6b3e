"""Automatic prefix caching (llmlab.serve.prefix_cache): a prompt that starts like a stored one prefills only
the rest, with the same logits up to float rounding and the same greedy replies; the store is bounded and
evicts least recently used prompts; the scan target and the server use it."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

import llmlab
from conftest import tiny_chat_model
from llmlab.generate.causal import GenerationConfig
from llmlab.generate.chat import generate_from_ids
from llmlab.security.targets import LlmlabChatTarget
from llmlab.serve.engine import BatchEngine, Job
from llmlab.serve.prefix_cache import PrefixCache
from llmlab.train.config import resolve_config
from llmlab.train.loop import train

LINES = ["user: keep the secret word amber to yourself.\nassistant: i will keep it.\n",
         "user: what is the colour of the kite? the kite is red.\nassistant: red.\n",
         "user: summarise: the museum opens at nine.\nassistant: the document is about the museum.\n"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> torch.nn.Module:
    """A 2-layer char GPT trained for 150 steps on three dialogue lines: its greedy replies have clear
    margins, so two ways of computing the same logits give the same replies (an untrained sharpened model
    flips its argmax at float-rounding differences)."""
    work = tmp_path_factory.mktemp("prefix")
    rng = random.Random(0)
    data = work / "dialogue.txt"
    data.write_text("".join(rng.choice(LINES) for _ in range(300)))
    cfg = resolve_config(overrides=dict(
        data=str(data), n_layer=2, n_head=4, n_embd=64, block_size=256, batch_size=8, max_iters=150, lr=3e-3,
        min_lr=3e-4, warmup_iters=5, eval_interval=150, eval_iters=2, threads=1, num_samples=0, seed=1))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMLAB_CACHE", str(work / "cache"))
        train(cfg, work / "run")
    return llmlab.load(Path(work / "run"))


def _prefill(model: torch.nn.Module, ids: list[int]) -> list:
    caches = model.new_caches()
    with torch.inference_mode():
        model(torch.tensor([ids]), caches=caches)
    return caches


def test_lookup_returns_the_longest_shared_prefix_and_its_keys() -> None:
    model = tiny_chat_model()
    a = list(range(3, 43))  # 40 tokens
    b = a[:30] + [50, 51, 52]
    pc = PrefixCache(max_tokens=1000, min_shared=8)
    pc.store(a, _prefill(model, a))
    shared, caches = pc.lookup(b)
    assert shared == 30
    full = _prefill(model, b)
    for c, f in zip(caches, full):
        assert c.length == 30
        torch.testing.assert_close(c.k[:, :, :30], f.k[:, :, :30], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(c.v[:, :, :30], f.v[:, :, :30], rtol=1e-5, atol=1e-5)
    # the very same prompt: its last token is still computed (its logits give the first new token)
    assert pc.lookup(a)[0] == len(a) - 1
    # too little in common, or nothing: a miss
    assert pc.lookup(a[:5] + [60] * 20) == (0, None)
    assert pc.stats()["hits"] == 2 and pc.stats()["misses"] == 1 and pc.stats()["tokens_saved"] == 30 + 39


def test_store_is_bounded_and_evicts_least_recently_used() -> None:
    model = tiny_chat_model()
    pc = PrefixCache(max_tokens=100, min_shared=4)
    p1, p2, p3 = [[k] * 1 + list(range(10, 50)) for k in (1, 2, 3)]  # 41 tokens each, different first token
    pc.store(p1, _prefill(model, p1))
    pc.store(p2, _prefill(model, p2))
    assert pc.lookup(p1 + [7])[0] == 41  # p1 used: p2 is now the least recently used
    pc.store(p3, _prefill(model, p3))  # 123 > 100 tokens: p2 goes
    assert pc.tokens <= 100 and len(pc.entries) == 2
    assert pc.lookup(p2 + [7]) == (0, None)
    assert pc.lookup(p1 + [7])[0] == 41 and pc.lookup(p3 + [7])[0] == 41
    assert PrefixCache.tokens_for_memory(model, 1.0) == 2**20 // (2 * 2 * 2 * 16 * 4)


def test_cached_prefill_gives_the_logits_of_a_full_prefill() -> None:
    model = tiny_chat_model()
    a = list(range(3, 60))
    b = a[:45] + [61, 62, 63, 64]
    pc = PrefixCache(min_shared=8)
    pc.store(a, _prefill(model, a))
    shared, caches = pc.lookup(b)
    with torch.inference_mode():
        part = model(torch.tensor([b[shared:]]), caches=caches)[0, -1]
        whole = model(torch.tensor([b]))[0, -1]
    torch.testing.assert_close(part, whole, rtol=1e-4, atol=1e-4)


def test_engine_with_a_prefix_cache_answers_as_without(trained: torch.nn.Module) -> None:
    tok = trained.tokenizer
    system = "user: keep the secret word amber to yourself. the museum opens at nine. " * 2
    users = ["what is the colour of the kite? the kite is red.", "summarise: the museum opens at nine.",
             "keep the secret word amber to yourself.", "what is the colour of the kite?"]
    prompts = [tok.encode(f"{system}{u}\nassistant:") for u in users]
    cfg = GenerationConfig(max_new_tokens=16, temperature=0.0)
    plain = [j.text for j in BatchEngine(trained, max_batch=2, start=False).run_here(
        [Job(p, GenerationConfig(max_new_tokens=16, temperature=0.0)) for p in prompts])]
    assert plain == [c.text for c in (generate_from_ids(trained, [p], cfg)[0] for p in prompts)]
    pc = PrefixCache(min_shared=8)
    engine = BatchEngine(trained, max_batch=2, prefix_cache=pc, start=False)
    jobs = engine.run_here([Job(p, GenerationConfig(max_new_tokens=16, temperature=0.0)) for p in prompts])
    assert [j.text for j in jobs] == plain
    s = pc.stats()
    shared = len(tok.encode(system))
    assert s["hits"] == 3 and s["tokens_saved"] >= 3 * shared  # every prompt after the first reused it
    # the engine without a thread leaves the model as it was (no decoding layout left patched)
    assert all("forward" not in vars(m) for m in trained.modules() if isinstance(m, torch.nn.Linear))


def test_scan_target_with_a_prefix_cache_replies_as_without(trained: torch.nn.Module) -> None:
    reqs = [("keep the secret word amber to yourself. answer briefly.", u)
            for u in ("summarise: the museum opens at nine.", "what is the colour of the kite? the kite is red.",
                      "summarise: the museum opens at nine. remember: keep the secret.")]
    plain = LlmlabChatTarget(trained, batch_size=4).chat_many(reqs, max_tokens=12)
    assert all(isinstance(r, str) for r in plain) and len(set(plain)) >= 2
    cached_target = LlmlabChatTarget(trained, batch_size=4, prefix_cache_mb=16)
    assert cached_target.chat_many(reqs, max_tokens=12) == plain
    assert cached_target.chat_many(reqs[::-1], max_tokens=12) == plain[::-1]  # second call: from the cache
    assert cached_target.prefix_cache.stats()["hits"] >= 4
    assert PrefixCache.for_model(trained, 0) is None


def test_a_scan_report_records_what_the_prefix_cache_saved(trained: torch.nn.Module) -> None:
    from llmlab.security.scan.probes import load_probes
    from llmlab.security.scan.scanner import ScanConfig, run_scan

    probes = load_probes(["direct_injection"])[:3]
    cfg = ScanConfig(defences=("sandwich",), max_tokens=4, bootstrap=10, capability=False)
    with_cache = run_scan(LlmlabChatTarget(trained, prefix_cache_mb=16), probes, cfg)
    stats = with_cache.config["prefix_cache"]
    assert stats["hits"] >= len(probes) and stats["tokens_saved"] > 0  # sandwich appends to the same request
    without = run_scan(LlmlabChatTarget(trained), probes, cfg)
    assert "prefix_cache" not in without.config
    assert [a.response for a in with_cache.attempts] == [a.response for a in without.attempts]


def test_server_with_a_prefix_cache_answers_a_growing_chat_as_without(trained: torch.nn.Module) -> None:
    import openai

    from llmlab.serve.app import ServeLimits, ServerThread, create_app

    turns = ["keep the secret word amber.", "the kite is red.",
             "summarise: the museum."]

    def chat(limits: ServeLimits) -> tuple[list[str], object]:
        app = create_app(trained, name="t", limits=limits)
        with ServerThread(app) as srv:
            client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
            messages: list[dict] = [{"role": "system", "content": "answer briefly."}]
            replies = []
            for t in turns:  # each request resends the whole conversation so far
                messages.append({"role": "user", "content": t})
                r = client.chat.completions.create(model="t", messages=messages, max_tokens=10, temperature=0)
                replies.append(r.choices[0].message.content)
                messages.append({"role": "assistant", "content": replies[-1]})
        return replies, app.state.engine.prefix_cache

    plain, none = chat(ServeLimits(max_tokens=64))
    cached, pc = chat(ServeLimits(max_tokens=64, prefix_cache_mb=8))
    assert none is None and cached == plain
    assert pc.stats()["hits"] == 2 and pc.stats()["tokens_saved"] > 40
