"""Encoder-decoder family: chrF, T5 span corruption, label smoothing, a tiny supervised run that learns to
reverse word lists, a denoising run on plain text, resume, generation (beam search with one beam equals
greedy, a wide beam equals exhaustive search, cached equals uncached decoding, cross-attention cached once),
`llmlab generate` / `llmlab attention` on a seq2seq run, and bad input."""

from __future__ import annotations

import itertools
import json
import random
import string
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import llmlab
from llmlab.cli import main
from llmlab.config import ModelConfig
from llmlab.datasets import reverse_words, write_dataset
from llmlab.generate.causal import GenerationConfig
from llmlab.generate.seq2seq import generate_seq2seq
from llmlab.generate.seq2seq import generate_seq2seq_ids as generate_ids
from llmlab.metrics import chrf, exact_match
from llmlab.models import build_model
from llmlab.train.config import resolve_config
from llmlab.train.loop import train
from llmlab.train.seq2seq import corrupt, make_batch, seq2seq_loss, span_noise

TINY = dict(arch="seq2seq", n_layer=2, n_dec_layer=2, n_head=4, n_embd=64, block_size=32, threads=1,
            batch_size=32, eval_iters=1, num_samples=2, log_interval=5)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def rev_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(reverse_words(600, seed=0, min_len=2, max_len=4, vocab=5),
                         tmp_path_factory.mktemp("s2s") / "rev.jsonl")


@pytest.fixture(scope="module")
def rev_run(rev_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny char-level encoder-decoder trained 150 steps to reverse lists of 2-4 words."""
    cfg = resolve_config(overrides={**TINY, "data": str(rev_data), "max_iters": 150, "lr": 5e-3, "min_lr": 5e-4,
                                    "warmup_iters": 10, "eval_interval": 75, "label_smoothing": 0.05, "seed": 1})
    run = tmp_path_factory.mktemp("runs") / "rev"
    train(cfg, run)
    return run


def random_seq2seq(vocab: int = 12, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = build_model(ModelConfig(arch="seq2seq", vocab_size=vocab, n_layer=1, n_dec_layer=2, n_head=2, n_embd=32,
                                block_size=24))
    return m.eval()


# ----------------------------------------------------------------------------- metrics


def test_chrf_known_values() -> None:
    assert chrf(["the cat"], ["the cat"]) == pytest.approx(100.0)
    assert chrf(["thecat"], ["the cat"]) == pytest.approx(100.0)  # whitespace is ignored
    assert chrf(["xyz"], ["abc"]) == 0.0
    # "ab" vs "abc": 1-grams P=1 R=2/3; 2-grams P=1 R=1/2; 3-grams P=0 R=0 (no hypothesis 3-gram)
    P, R = (1 + 1 + 0) / 3, (2 / 3 + 1 / 2 + 0) / 3
    assert chrf(["ab"], ["abc"]) == pytest.approx(100 * 5 * P * R / (4 * P + R))
    # recall counts twice as much as precision (beta = 2): a short hypothesis loses more than a long one
    assert chrf(["the"], ["the cat"]) < chrf(["the cat sat"], ["the cat"])
    # corpus statistics: counts are summed over sentences before the averages
    assert chrf(["ab", "xyz"], ["ab", "xyz"]) == pytest.approx(100.0)
    assert exact_match([" a b", "c"], ["a b", "d"]) == 0.5


# ----------------------------------------------------------------------------- span corruption


def test_span_corruption_statistics_and_round_trip() -> None:
    gen = torch.Generator().manual_seed(0)
    L, lengths, n_noise = 128, [], 0
    for _ in range(300):
        spans = span_noise(L, 0.15, 3.0, gen)
        assert spans[0][0] >= 1  # a kept run comes first
        for (_, b), (c, _) in zip(spans, spans[1:]):
            assert b < c  # spans never touch: a kept run between any two
        assert spans[-1][1] <= L
        n_noise += sum(b - a for a, b in spans)
        lengths += [b - a for a, b in spans]
        ids = list(range(1000, 1000 + L))
        sentinels = list(range(100, 132))
        src, tgt = corrupt(ids, spans, sentinels, eos=2)
        assert tgt[-1] == 2 and len(src) == L - sum(b - a for a, b in spans) + len(spans)
        rebuilt, parts = [], {}  # put every span back in place of its sentinel
        cur = None
        for t in tgt[:-1]:
            if t in sentinels:
                cur = t
                parts[cur] = []
            else:
                parts[cur].append(t)
        for t in src:
            rebuilt += parts[t] if t in sentinels else [t]
        assert rebuilt == ids
    assert n_noise / (300 * L) == pytest.approx(round(0.15 * L) / L)  # 15% of the tokens
    assert sum(lengths) / len(lengths) == pytest.approx(3.0, abs=0.25)  # mean span length 3


def test_label_smoothing_matches_its_formula() -> None:
    m = random_seq2seq()
    b = make_batch([([3, 4, 5], [6, 7, 2]), ([4, 4], [8, 2])], bos=1, pad=0)
    logits = m(b.src, b.dec_in, b.src_mask)
    sel = b.labels != -100
    logp = logits[sel].log_softmax(-1)
    nll = -logp.gather(1, b.labels[sel][:, None]).mean()
    eps = 0.1
    expected = (1 - eps) * nll + eps * (-logp.mean(-1)).mean()
    assert seq2seq_loss(m, b, eps).item() == pytest.approx(expected.item(), rel=1e-5)
    assert seq2seq_loss(m, b, 0.0).item() == pytest.approx(nll.item(), rel=1e-5)


# ----------------------------------------------------------------------------- supervised training


def test_supervised_run_learns_to_reverse(rev_run: Path) -> None:
    ev = json.loads((rev_run / "eval.json").read_text())
    first = next(r["loss"] for r in metrics(rev_run) if r["kind"] == "train")
    assert first > 2.5
    assert ev["val_loss"] < 0.1 * first, (first, ev)
    assert ev["token_accuracy"] > 0.9, ev
    # chance: a random ordering of the same 2-4 words is right far less than 1 time in 5
    assert ev["exact_match"] > 0.3 and ev["chrf"] > 60, ev
    assert ev["mode"] == "supervised" and ev["n_val"] == 60
    evals = [r for r in metrics(rev_run) if r["kind"] == "eval"]
    assert {"val_exact_match", "val_chrf", "val_token_accuracy"} <= set(evals[-1])
    cfg = json.loads((rev_run / "config.json").read_text())
    assert cfg["data"]["mode"] == "supervised" and cfg["data"]["val_pairs"] == 60


def test_beam_search_with_one_beam_equals_greedy(rev_run: Path) -> None:
    model = llmlab.load(rev_run)
    lists = [r["source"] for r in reverse_words(40, seed=7, min_len=2, max_len=4, vocab=5)]
    greedy = GenerationConfig(max_new_tokens=30, temperature=0.0)
    g = generate_seq2seq(model, lists, greedy)
    assert generate_seq2seq(model, lists, greedy, beams=1) == g
    tok = model.tokenizer
    ids = [tok.encode(s) for s in lists]
    bos, eos, pad = tok.bos_id, tok.eos_id, tok.pad_id
    assert generate_ids(model, ids, greedy, bos, eos, pad, beams=1) == \
        [list(x) for x in generate_ids(model, ids, greedy, bos, eos, pad)]
    assert [x.split() for x in g].count([]) == 0
    right = sum(out.split() == src.split()[::-1] for out, src in zip(g, lists))
    beam = generate_seq2seq(model, lists, greedy, beams=4)
    assert sum(out.split() == src.split()[::-1] for out, src in zip(beam, lists)) >= right - 2
    # a random model too, where greedy paths are arbitrary
    m = random_seq2seq(seed=3)
    srcs = [[random.Random(i).randrange(3, 12) for _ in range(5)] for i in range(12)]
    cfg = GenerationConfig(max_new_tokens=10, temperature=0.0)
    assert generate_ids(m, srcs, cfg, 1, 2, 0, beams=1, alpha=0.6) == generate_ids(m, srcs, cfg, 1, 2, 0)


def test_wide_beam_equals_exhaustive_search() -> None:
    """With as many beams as there are hypotheses, beam search (no length penalty) finds the sequence of
    highest log-probability among every sequence of up to 3 tokens."""
    V, bos, eos, pad = 6, 1, 2, 0
    m = random_seq2seq(vocab=V, seed=5)
    src = torch.tensor([[3, 4, 5, 3]])
    mem = m.encode(src)

    def logp(seq: list[int], finished: bool) -> float:
        y = torch.tensor([[bos, *seq]])
        lp = m.decode(y, mem)[0].detach().log_softmax(-1)
        full = [*seq, eos] if finished else seq
        return float(sum(lp[i, t] for i, t in enumerate(full)))

    best = (float("-inf"), None)
    normal = [t for t in range(V) if t != eos]
    for n in range(0, 4):
        for seq in itertools.product(normal, repeat=n):
            best = max(best, (logp(list(seq), finished=n < 3), list(seq)))
    cfg = GenerationConfig(max_new_tokens=3, temperature=0.0)
    with torch.no_grad():
        got = generate_ids(m, [[3, 4, 5, 3]], cfg, bos, eos, pad, beams=V ** 3, alpha=0.0)[0]
    assert got == best[1]


def test_cached_decoding_equals_recompute_and_cross_kv_is_computed_once() -> None:
    m = random_seq2seq(seed=1)
    srcs = [[3, 4, 5], [6, 7, 8, 9, 10], [11]]
    made = []
    new_caches = m.new_caches

    def recording() -> tuple:
        made.append(new_caches())
        return made[-1]

    m.new_caches = recording  # the real caches, recorded so the test can look at them afterwards
    cached = generate_ids(m, srcs, GenerationConfig(max_new_tokens=8, temperature=0.0), 1, 2, 0)
    assert generate_ids(m, srcs, GenerationConfig(max_new_tokens=8, temperature=0.0, use_cache=False),
                        1, 2, 0) == cached
    self_caches, cross_caches = made[0]
    for c in cross_caches:
        assert c.static and c.length == 5 and c.k.shape == (3, 2, 5, 16)  # (B, nh, S, hs): the source only
    steps = max(len(x) for x in cached) + (0 if all(len(x) == 8 for x in cached) else 1)
    assert all(c.length == min(steps, 8) for c in self_caches)
    # with beams, the cross K/V are computed once for the B*K rows and never re-projected
    made.clear()
    generate_ids(m, srcs, GenerationConfig(max_new_tokens=6, temperature=0.0), 1, 2, 0, beams=3)
    k0 = made[0][1][0].k
    assert k0.shape[0] == 9 and torch.equal(k0[0], k0[2]) and torch.equal(k0[3], k0[5])


def test_batched_sources_decode_like_single_ones() -> None:
    """Right-padded sources of different lengths: each row equals decoding that source alone."""
    m = random_seq2seq(seed=2)
    srcs = [[random.Random(i).randrange(3, 12) for _ in range(1 + i % 7)] for i in range(10)]
    cfg = GenerationConfig(max_new_tokens=10, temperature=0.0)
    for beams in (1, 3):
        batched = generate_ids(m, srcs, cfg, 1, 2, 0, beams=beams)
        assert batched == [generate_ids(m, [s], cfg, 1, 2, 0, beams=beams)[0] for s in srcs]


def test_sampling_is_seeded(rev_run: Path) -> None:
    model = llmlab.load(rev_run)
    cfg = GenerationConfig(max_new_tokens=20, temperature=1.5, top_k=5, seed=3)
    a = generate_seq2seq(model, ["apple cherry banana"] * 6, cfg)
    assert a == generate_seq2seq(model, ["apple cherry banana"] * 6, cfg)


def test_generate_verb_on_seq2seq_run(rev_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", str(rev_run), "--prompt", "apple cherry", "--prompt", "grape apple banana",
                 "--greedy", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    expect = generate_seq2seq(llmlab.load(rev_run), ["apple cherry", "grape apple banana"],
                              GenerationConfig(max_new_tokens=200, temperature=0.0))
    assert [o["completion"] for o in out] == expect
    assert main(["generate", str(rev_run), "--prompt", "apple cherry", "--beams", "3", "--length-penalty", "1.0"]) == 0
    assert capsys.readouterr().out.startswith("--- 'apple cherry'\n")
    assert main(["generate", str(rev_run)]) == 2
    assert "--prompt" in capsys.readouterr().err


def test_attention_verb_shows_cross_attention(rev_run: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["attention", "cherry apple", "--model", str(rev_run), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "cross-attention" in out and "<-" in out
    assert (tmp_path / "cross_attention_grid.png").stat().st_size > 1000
    assert (tmp_path / "attention_grid.png").is_file()
    assert main(["attention", "cherry apple", "--model", str(rev_run), "--json"]) == 0
    maps = json.loads(capsys.readouterr().out)
    cross = torch.tensor(maps["cross_weights"])  # (L, H, T_tgt, T_src)
    assert cross.shape[:2] == (2, 4) and cross.shape[-1] == len(maps["tokens"])
    assert torch.allclose(cross.sum(-1), torch.ones(cross.shape[:-1]), atol=1e-5)
    assert len(maps["target_tokens"]) > 5  # the greedy output, with bos first


# ----------------------------------------------------------------------------- denoising


@pytest.fixture(scope="module")
def letters(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = random.Random(0)
    p = tmp_path_factory.mktemp("den") / "runs.txt"
    p.write_text("".join(rng.choice(string.ascii_lowercase) * rng.randint(8, 20) + "\n" for _ in range(500)))
    return p


def test_denoising_run_learns(letters: Path, tmp_path: Path) -> None:
    cfg = resolve_config(overrides={**TINY, "data": str(letters), "max_iters": 80, "batch_size": 16, "lr": 5e-3,
                                    "warmup_iters": 10, "eval_interval": 80, "mask_prob": 0.3, "seed": 2})
    train(cfg, tmp_path / "den")
    ev = json.loads((tmp_path / "den" / "eval.json").read_text())
    first = next(r["loss"] for r in metrics(tmp_path / "den") if r["kind"] == "train")
    assert ev["mode"] == "denoising"
    assert ev["val_loss"] < 0.4 * first and ev["token_accuracy"] > 0.6, (first, ev)  # chance: about 1/26
    assert "<|extra_0|>" in ev["examples"][0]["source"] and ev["examples"][0]["reference"].startswith("<|extra_0|>")


def test_seq2seq_resume_is_exact(letters: Path, tmp_path: Path) -> None:
    kw = {**TINY, "data": str(letters), "batch_size": 8, "eval_interval": 5, "num_samples": 0, "seed": 4}
    train(resolve_config(overrides={**kw, "max_iters": 8}), tmp_path / "straight")
    train(resolve_config(overrides={**kw, "max_iters": 4}), tmp_path / "resumed")
    train(resolve_config(overrides={**kw, "max_iters": 8}), tmp_path / "resumed", resume=True)
    a = load_file(str(tmp_path / "straight" / "checkpoints" / "step-0000008" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "checkpoints" / "step-0000008" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("content,expected", [
    ('{"source": "a", "target": "b"}\n["a", "b"]\n', "not a JSON object"),
    ('{"source": "a", "target": "b"}\n{"source": "c"}\n', "has no field 'target'"),
    ('{"input": "a", "output": "b"}\n', "has no field 'source'"),
    ('{"source": "a", "target": "b"}\n{"source": "c", "target": 3}\n', "not a string"),
    ('{"source": "a", "target": "b"}\n{"source": "c", "target"\n', "not valid JSON"),
])
def test_bad_pairs_exit_2_with_one_line(content: str, expected: str, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "pairs.jsonl"
    data.write_text(content)
    out = tmp_path / "run"
    rc = main(["train", "--arch", "seq2seq", "--data", str(data), "--out", str(out), "--max-iters", "2"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert expected in err and "Traceback" not in err
    assert not out.exists()


def test_bad_pairs_in_a_real_process(tmp_path: Path) -> None:
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"source": "a", "target": "b"}\n"just a string"\n')
    r = subprocess.run([sys.executable, "-m", "llmlab", "train", "--arch", "seq2seq", "--data", str(data),
                        "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "pairs.jsonl:2 has no field 'source': it is not a JSON object" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_beams_on_a_decoder_only_model_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from llmlab.checkpoint import save_run_model
    from llmlab.tokenizers import CharTokenizer

    tok = CharTokenizer.train("abc de", unk="replace")
    save_run_model(tmp_path / "gpt", build_model(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_embd=32,
                                                             block_size=16)), tok)
    assert main(["generate", str(tmp_path / "gpt"), "--prompt", "ab", "--beams", "2"]) == 2
    assert "seq2seq" in capsys.readouterr().err


def test_label_smoothing_is_validated() -> None:
    from llmlab.errors import ConfigError

    with pytest.raises(ConfigError, match="label_smoothing"):
        resolve_config(overrides={"label_smoothing": 1.5})




@pytest.mark.slow
@pytest.mark.parametrize("which", ["supervised", "denoising"])
def test_seq2seq_ddp_matches_single_process(which: str, rev_data: Path, letters: Path, tmp_path: Path) -> None:
    from test_encoder import ddp_matches_single

    data = rev_data if which == "supervised" else letters
    ddp_matches_single(tmp_path, ["train", "--arch", "seq2seq", "--data", str(data), "--n-layer", "1",
                                  "--n-dec-layer", "1", "--n-embd", "32", "--block-size", "32", "--batch-size", "8",
                                  "--max-iters", "4", "--threads", "1", "--eval-interval", "4", "--eval-iters", "1",
                                  "--num-samples", "0", "--label-smoothing", "0.1"])
