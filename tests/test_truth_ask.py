"""Asking a model: shared-prefix batched sampling decodes exactly what one-at-a-time decoding does, answer scores
equal the plain per-token log-probabilities, and the measurement runs on white-box models and chat targets."""

from __future__ import annotations

import math

import pytest
import torch

from llmlab.config import ModelConfig
from llmlab.evaluate import token_logprobs
from llmlab.labs.truth.ask import (
    AskConfig,
    _generate,
    ask_model,
    ask_target,
    p_yes_of,
    sample_shared,
    score_continuations,
)
from llmlab.labs.truth.measure import MeasureConfig, run
from llmlab.labs.truth.questions import Question, question_from_dict
from llmlab.labs.truth.world import WorldConfig, generate_world
from llmlab.models import build_model
from llmlab.progress import Stage
from llmlab.tokenizers import CharTokenizer

WORLD = generate_world(WorldConfig(people=12, unseen=4, val_people=2, max_count=8, myths=2, templates=2))


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.set_num_threads(1)  # a tiny model: one thread is as fast, and steady when other jobs share the CPU
    tok = CharTokenizer.train("".join(WORLD.train_docs + WORLD.val_docs) + "QA:?YyNn", unk="replace")
    torch.manual_seed(0)
    m = build_model(ModelConfig(vocab_size=tok.vocab_size, block_size=96, n_layer=2, n_head=2, n_embd=32)).eval()
    m.tokenizer = tok
    return m


def _qs(n: int = 8) -> list[Question]:
    return [question_from_dict(q, "world", q["id"]) for q in WORLD.questions()][:n]


def test_shared_prefix_sampling_decodes_like_one_at_a_time(model) -> None:  # noqa: ANN001
    tok = model.tokenizer
    prompts = [tok.encode(q.prompt) for q in _qs(5)]  # different lengths: left padding
    cfg = AskConfig(max_new_tokens=9, batch_size=6)  # 2 prompts x 3 rows per batch
    quiet = Stage(None, "t", None)
    # a temperature this low is the arg-max: every row must equal the unbatched greedy continuation
    shared = sample_shared(model, prompts, 3, ("\n", "."), cfg, 1e-5, 0, quiet)
    one = _generate(model, prompts, ("\n", "."), AskConfig(max_new_tokens=9, batch_size=1), 0.0, 0, quiet)
    assert all(rows == [g] * 3 for rows, g in zip(shared, one)), (shared, one)
    # a stop string that ends rows at different steps: ended rows leave the batch, the rest decode unchanged
    free = _generate(model, prompts, (), AskConfig(max_new_tokens=9, batch_size=1), 0.0, 0, quiet)
    stop = (free[0][2],)
    one = _generate(model, prompts, stop, AskConfig(max_new_tokens=9, batch_size=1), 0.0, 0, quiet)
    assert len({len(g) for g in one}) >= 2, one  # the rows end at different steps
    shared = sample_shared(model, prompts, 3, stop, cfg, 1e-5, 0, quiet)
    assert all(rows == [g] * 3 for rows, g in zip(shared, one)), (shared, one)
    # at temperature 1 the rows differ, and the same seed gives the same samples
    a = sample_shared(model, prompts, 4, ("\n",), cfg, 1.0, 7, quiet)
    assert a == sample_shared(model, prompts, 4, ("\n",), cfg, 1.0, 7, quiet)
    assert any(len(set(rows)) > 1 for rows in a)


def test_scores_equal_plain_token_logprobs(model) -> None:  # noqa: ANN001
    tok = model.tokenizer
    rows = [(tok.encode(q.prompt), tok.encode(" " + q.answer)) for q in _qs(4)]
    got = score_continuations(model, rows, with_stats=True)
    for (p, c), g in zip(rows, got):
        ref = token_logprobs(model, p + c)[len(p) - 1:]
        assert g["logp"] == pytest.approx(ref.tolist(), abs=1e-5)
        assert all(0 <= h <= math.log(model.config.vocab_size) + 1e-6 for h in g["entropy"])
        assert g["hidden"].shape == (32,)


def test_p_yes() -> None:
    lp = torch.log(torch.tensor([0.1, 0.3, 0.2, 0.4]))
    assert p_yes_of(lp, [1], [3]) == pytest.approx(0.3 / 0.7)
    assert p_yes_of(lp, [1, 2], [3]) == pytest.approx(0.5 / 0.9)


def test_measure_a_white_box_model(model) -> None:  # noqa: ANN001
    qs = _qs(16)
    m = run(MeasureConfig(ask=AskConfig(mode="cloze", max_new_tokens=8, samples=3), bootstrap=50), model, None, qs)
    assert m.mode == "cloze" and m.n == 16 and len(m.items) == 16
    for it in m.items:
        assert 0 <= it["confidence"] <= 1 and it["outcome"] in ("correct", "wrong", "abstain")
        assert sum(it["samples"].values()) == 3 and len(it["choice_logprobs"]) == 4
    assert m.calibration["answer probability"]["n"] == sum(it["outcome"] != "abstain" for it in m.items)
    # an untrained model knows nothing: the accuracy is about chance
    assert m.outcomes["correct"]["rate"] <= 0.3


def test_yes_no_questions_in_cloze_mode(model) -> None:  # noqa: ANN001
    qs = [Question("a", "Is 7 prime?", "yes", "yesno", choices=("yes", "no")),
          Question("b", "Is 9 prime?", "no", "yesno", choices=("no", "yes"))]
    answers, mode = ask_model(model, qs, AskConfig(mode="cloze", max_new_tokens=4, samples=0))
    assert mode == "cloze"
    assert all(0 < a.p_yes < 1 for a in answers)


def test_chat_target_answers_with_text_only(model) -> None:  # noqa: ANN001
    from llmlab.security.targets import LlmlabChatTarget

    target = LlmlabChatTarget(model, name="tiny")
    qs = [Question("a", "Is 7 prime?", "yes", "yesno"), Question("b", "Capital of France?", "Paris")]
    answers, mode = ask_target(target, qs, AskConfig(max_new_tokens=4, samples=2))
    assert mode == "chat" and all(a.token_logprobs is None and len(a.samples) == 2 for a in answers)
    m = run(MeasureConfig(ask=AskConfig(max_new_tokens=4, samples=2), bootstrap=0), target, None, qs)
    assert not m.detectors["max_prob"]["measured"] and "token probabilities" in m.detectors["max_prob"]["why"]
    assert m.calibration == {}
