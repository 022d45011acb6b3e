"""Generation from a tiny trained model: KV cache vs recompute, batching with left padding, sampling,
top-k/top-p, the repetition penalty, stop strings, long prompts, and perplexity."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

import llmlab
from llmlab.cli import main
from llmlab.data import load_corpus
from llmlab.evaluate import perplexity, token_logprobs
from llmlab.generate.causal import GenerationConfig, generate_ids, generate_text, left_pad, process_logits
from llmlab.train.config import resolve_config
from llmlab.train.loop import train

LINES = ["the cat sat on the mat.\n", "a dog ran in the park.\n", "the bird sang a song.\n"]
BLOCK = 32


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer char GPT trained for 100 steps on three repeated sentences."""
    work = tmp_path_factory.mktemp("gen")
    rng = random.Random(0)
    data = work / "rep.txt"
    data.write_text("".join(rng.choice(LINES) for _ in range(400)))
    cfg = resolve_config(overrides=dict(
        data=str(data), n_layer=2, n_head=4, n_embd=64, block_size=BLOCK, batch_size=8, max_iters=100, lr=3e-3,
        min_lr=3e-4, warmup_iters=5, eval_interval=100, eval_iters=5, threads=1, num_samples=0, seed=1))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMLAB_CACHE", str(work / "cache"))
        train(cfg, work / "run")
    return work / "run"


@pytest.fixture(scope="module")
def model(run: Path) -> torch.nn.Module:
    return llmlab.load(run)


def enc(model: torch.nn.Module, text: str) -> list[int]:
    return model.tokenizer.encode(text)


GREEDY = GenerationConfig(max_new_tokens=24, temperature=0.0)


def greedy(**kw) -> GenerationConfig:  # noqa: ANN003
    return GenerationConfig(**{**GREEDY.__dict__, **kw})


# ----------------------------------------------------------------------------- greedy and the KV cache


def test_greedy_output_is_meaningful(model: torch.nn.Module) -> None:
    out = generate_text(model, ["the cat sat on the "], greedy(max_new_tokens=5))
    assert out == ["mat.\n"]


def test_kv_cache_equals_recompute(model: torch.nn.Module) -> None:
    prompt = enc(model, "a dog ran in the p")
    with_cache = generate_ids(model, [prompt], greedy(use_cache=True))
    without = generate_ids(model, [prompt], greedy(use_cache=False))
    assert with_cache == without and len(with_cache[0]) == 24


def test_kv_cache_equals_recompute_batched(model: torch.nn.Module) -> None:
    texts = ["the b", "a dog ran in the park.\nthe", "the cat sat on"]
    prompts = [enc(model, t) for t in texts]
    assert len({len(p) for p in prompts}) == 3  # different lengths: left padding
    cfg = greedy(max_new_tokens=5)
    batched_cache = generate_ids(model, prompts, cfg)
    batched_full = generate_ids(model, prompts, greedy(max_new_tokens=5, use_cache=False))
    assert batched_cache == batched_full
    for p, row in zip(prompts, batched_cache):
        assert generate_ids(model, [p], cfg) == [row]
        assert len(row) == 5


def test_finished_rows_leave_the_batch_without_changing_the_others(model: torch.nn.Module) -> None:
    """Rows that reach eos (or are ended by the caller) are packed out of the batch, KV caches included: every
    row still equals its own one-at-a-time generation, cut at its first eos."""
    texts = ["the b", "a dog ran in the park.\nthe", "the cat sat on", "a d", "the bird sang a", "t"]
    prompts = [enc(model, t) for t in texts]
    cfg = greedy(max_new_tokens=20)
    alone = [generate_ids(model, [p], cfg)[0] for p in prompts]  # no eos: the full 20 tokens
    eos = enc(model, ".")[0]
    cut = [row[: row.index(eos) + 1] if eos in row else row for row in alone]
    assert len({len(r) for r in cut}) >= 3  # rows end at different steps: the batch is packed several times
    steps: list[int] = []
    got = generate_ids(model, prompts, cfg, eos_id=eos, on_step=lambda nxt, act: steps.append(int(act.sum())) or False)
    assert got == cut
    assert steps[-1] < len(prompts)  # at the end fewer rows were decoded than the batch started with
    # rows the caller ends (here: after 3 tokens, the even rows) stop and leave too; the others are unchanged
    n = [0]
    flags = [False] * len(prompts)

    def step(nxt: torch.Tensor, act: torch.Tensor) -> bool:
        n[0] += 1
        if n[0] == 3:
            flags[0::2] = [True] * len(flags[0::2])
        return False

    got = generate_ids(model, prompts, cfg, on_step=step, ended=lambda: flags)
    assert [len(r) for r in got[0::2]] == [3] * 3 and got[1::2] == alone[1::2]


def test_left_pad() -> None:
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_generating_past_block_size(model: torch.nn.Module) -> None:
    prompt = enc(model, "the bird sang ")
    n = 3 * BLOCK
    with_cache = generate_ids(model, [prompt], greedy(max_new_tokens=n))
    without = generate_ids(model, [prompt], greedy(max_new_tokens=n, use_cache=False))
    assert len(with_cache[0]) == n
    assert with_cache == without
    text = model.tokenizer.decode(with_cache[0])
    assert sum(w in text for w in ("cat", "bird", "song", "mat", "the ")) >= 3


def test_empty_prompt_ids_rejected(model: torch.nn.Module) -> None:
    with pytest.raises(llmlab.LlmlabError, match="empty"):
        generate_ids(model, [[]], GREEDY)


# ----------------------------------------------------------------------------- sampling


def test_same_seed_same_text(model: torch.nn.Module) -> None:
    cfg = GenerationConfig(max_new_tokens=40, temperature=1.5, seed=123)
    a = generate_text(model, ["the ", "a "], cfg)
    b = generate_text(model, ["the ", "a "], GenerationConfig(max_new_tokens=40, temperature=1.5, seed=123))
    assert a == b
    others = {generate_text(model, ["the "], GenerationConfig(max_new_tokens=40, temperature=1.5, seed=s))[0]
              for s in range(5)}
    assert len(others) >= 2


def test_top_k_one_and_tiny_top_p_equal_greedy(model: torch.nn.Module) -> None:
    prompts = ["the cat", "a dog ran"]
    g = generate_text(model, prompts, greedy())
    k1 = generate_text(model, prompts, GenerationConfig(max_new_tokens=24, temperature=1.0, top_k=1, seed=0))
    p0 = generate_text(model, prompts, GenerationConfig(max_new_tokens=24, temperature=2.0, top_p=1e-6, seed=0))
    assert k1 == g and p0 == g


def test_process_logits_top_k_top_p_temperature() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    out = process_logits(logits, None, GenerationConfig(temperature=2.0))
    assert torch.allclose(out, logits / 2)
    out = process_logits(logits, None, GenerationConfig(top_k=2))
    assert torch.isinf(out[0, [0, 3]]).all() and torch.equal(out[0, [1, 2]], logits[0, [1, 2]])
    probs = logits.softmax(-1)[0]  # 0.644 (3.0), 0.237 (2.0), ...
    out = process_logits(logits, None, GenerationConfig(top_p=0.7))
    assert torch.isfinite(out[0]).tolist() == [False, True, True, False]  # the token that crosses 0.7 stays
    assert probs[1] < 0.7 < probs[1] + probs[2]
    out = process_logits(logits, None, GenerationConfig(top_p=0.5))
    assert torch.isfinite(out[0]).tolist() == [False, True, False, False]


def test_repetition_penalty_is_ctrl() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0], [2.0, -1.0, 0.5, 3.0, -2.0]])
    seqs = torch.tensor([[0, 1, 1], [3, 4, 4]])
    cfg = GenerationConfig(temperature=0.0, repetition_penalty=2.0)
    out = process_logits(logits, seqs, cfg)
    # seen positive logits are divided by the penalty, seen negative ones multiplied, once per token
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0, -2.0], [2.0, -1.0, 0.5, 1.5, -4.0]]
    assert torch.equal(process_logits(logits, seqs, GenerationConfig(temperature=0.0)), logits)
    # temperature applies after the penalty
    assert torch.allclose(process_logits(logits, seqs, GenerationConfig(temperature=0.5, repetition_penalty=2.0)),
                          out / 0.5)
    assert torch.equal(logits[0], torch.tensor([2.0, -1.0, 0.5, 3.0, -2.0]))  # the input is not modified


def test_repetition_penalty_changes_generation(model: torch.nn.Module) -> None:
    prompt = [enc(model, "the cat sat on the mat.\nthe cat sat on")]
    plain = generate_ids(model, prompt, greedy())
    penalised = generate_ids(model, prompt, greedy(repetition_penalty=3.0))
    assert plain != penalised
    assert penalised == generate_ids(model, prompt, greedy(repetition_penalty=3.0, use_cache=False))


def test_repetition_penalty_ignores_left_padding(model: torch.nn.Module) -> None:
    long = enc(model, "the bird sang a song.\nthe cat sat on the mat.\na dog")
    cfg = greedy(repetition_penalty=20.0, max_new_tokens=12)
    for short in ("the cat", "the bird sang a song."):
        batched = generate_ids(model, [long, enc(model, short)], cfg)
        assert batched[1] == generate_ids(model, [enc(model, short)], cfg)[0], short


# ----------------------------------------------------------------------------- text: stop strings and long prompts


def test_stop_string_cuts_before_it(model: torch.nn.Module) -> None:
    full = generate_text(model, ["the cat sat"], greedy(max_new_tokens=20))[0]
    assert "mat" in full
    stopped = generate_text(model, ["the cat sat"], greedy(max_new_tokens=20, stop=("mat",)))[0]
    assert stopped == full[:full.index("mat")]
    assert "mat" not in stopped
    # several stop strings: the first one to appear wins
    two = generate_text(model, ["the cat sat"], greedy(max_new_tokens=20, stop=("zzz", " the")))[0]
    assert two == full[:full.index(" the")]
    # streaming without stop strings delivers the whole text
    pieces: list[str] = []
    streamed = generate_text(model, ["the cat sat"], greedy(max_new_tokens=20), on_text=lambda i, t: pieces.append(t))
    assert "".join(pieces) == streamed[0] == full


def test_streamed_text_stops_before_stop_string(model: torch.nn.Module) -> None:
    pieces: list[str] = []
    out = generate_text(model, ["the cat sat"], greedy(max_new_tokens=20, stop=(" the",)),
                        on_text=lambda i, t: pieces.append(t))[0]
    assert "".join(pieces) == out


def test_long_prompt_is_cut_from_the_left_with_a_warning(model: torch.nn.Module) -> None:
    long_prompt = "".join(LINES) * 4
    assert len(model.tokenizer.encode(long_prompt)) > BLOCK
    warnings: list[str] = []
    out = generate_text(model, [long_prompt], greedy(max_new_tokens=10), warn=warnings.append)
    assert len(warnings) == 1 and "longer than the context" in warnings[0]
    assert len(out[0]) == 10
    tail = model.tokenizer.decode(model.tokenizer.encode(long_prompt)[-(BLOCK - 1):])
    quiet: list[str] = []
    assert generate_text(model, [tail], greedy(max_new_tokens=10), warn=quiet.append) == out
    assert quiet == []


def test_generation_config_validation(model: torch.nn.Module) -> None:
    for bad in (dict(top_p=0.0), dict(top_p=1.5), dict(temperature=-1.0), dict(top_k=-1),
                dict(repetition_penalty=0.0), dict(max_new_tokens=-1)):
        with pytest.raises(llmlab.LlmlabError):
            generate_text(model, ["the"], GenerationConfig(**bad))


# ----------------------------------------------------------------------------- perplexity


def test_perplexity_cli_matches_library(run: Path, model: torch.nn.Module, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    text = tmp_path / "eval.txt"
    text.write_text("the cat sat on the mat.\na dog ran in the park.\n" * 3)
    assert main(["perplexity", str(run), "--data", str(text), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["perplexity"] == pytest.approx(math.exp(r["loss"]), rel=1e-9)
    lib = perplexity(model, load_corpus(str(text)))
    assert r["tokens"] == lib["tokens"] == len(text.read_text()) - 1
    assert r["loss"] == pytest.approx(lib["loss"], rel=1e-6)
    assert r["perplexity"] == pytest.approx(lib["perplexity"], rel=1e-6)
    assert r["loss"] < 1.0  # the model knows these sentences
    # the library's loss is the mean negative log-probability of every next token
    lp = token_logprobs(model, model.tokenizer.encode(text.read_text()))
    assert lib["loss"] == pytest.approx(-float(lp.mean()), rel=1e-6)

    assert main(["perplexity", str(run), "--data", str(text)]) == 0
    out = capsys.readouterr().out
    assert "perplexity" in out and f"{r['perplexity']:.3f}" in out


def test_decode_layout_matches_plain_linear_and_restores() -> None:
    from llmlab.config import ModelConfig
    from llmlab.generate.causal import decode_layout
    from llmlab.models import GPT

    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_head=4, n_embd=512, vocab_size=600, block_size=16)).eval()
    ids = torch.randint(0, 600, (2, 7))
    with torch.inference_mode():
        plain = model(ids)
        with decode_layout(model) as dl:
            assert len(dl.layers) >= 3  # qkv, mlp and the head are large enough to get the (in, out) copy
            fast = model(ids)
        again = model(ids)
    assert (fast - plain).abs().max() <= 1e-4
    assert "forward" not in vars(dl.layers[0])  # the plain forward is back
    assert torch.equal(again, plain)
