"""Shared fixtures. Nothing here may touch the network: the Hugging Face libraries run offline."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

# property tests draw the same examples on every run, so CI results do not depend on luck
settings.register_profile("llmlab", derandomize=True, deadline=None, database=None)
settings.load_profile("llmlab")

TINY_GPT2 = dict(n_layer=2, n_head=4, n_embd=64, vocab_size=101, n_positions=64,
                 bos_token_id=None, eos_token_id=None, pad_token_id=0)


def randomize_(model: torch.nn.Module, scale: float = 0.1) -> torch.nn.Module:
    """Give every bias and norm parameter non-trivial values, so a wrong mapping of them shows.

    Fresh models start with zero biases and unit norm weights; a loader that dropped or swapped
    them would still match. Matrices keep their (small) initialisation."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                owner = name.rsplit(".", 1)[0] if "." in name else ""
                if "norm" in owner.lower() or owner.split(".")[-1].startswith("ln"):
                    if name.endswith("weight"):
                        p.copy_(1.0 + scale * torch.randn_like(p))
                    else:
                        p.copy_(scale * torch.randn_like(p))
                else:
                    p.copy_(scale * torch.randn_like(p))
    return model


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def tiny_chat_model(seed: int = 0) -> torch.nn.Module:
    """A small untrained chat-template GPT (context 256) with sharpened weights, so greedy replies depend on
    the prompt rather than collapsing to one token, and an end-of-text logit pushed down so that every reply
    has exactly max_tokens tokens."""
    from llmlab.chat import render_chat
    from llmlab.config import ModelConfig
    from llmlab.models import build_model
    from llmlab.train.chat import chat_tokenizer, make_dataset

    rows = make_dataset(40, 0)
    tok = chat_tokenizer([render_chat(r["messages"], False) for r in rows])
    torch.manual_seed(seed)
    cfg = ModelConfig(arch="gpt", vocab_size=tok.vocab_size, block_size=256, n_layer=2, n_head=2, n_embd=32,
                      pad_token_id=tok.pad_id)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8.0)
        model.lm_head.weight[tok.eos_id] -= 100.0
    model.tokenizer = tok
    return model.eval()


@pytest.fixture(scope="module")
def server(request: pytest.FixtureRequest):
    """`llmlab serve` of tiny_chat_model() as model "tiny": a real uvicorn server on 127.0.0.1 (continuous
    batching on), one per test module. A module sets SERVE_API_KEY (default: none) and SERVE_LIMITS (ServeLimits
    fields over max_tokens=64, max_prompt_tokens=200). The yielded object has .url, .model, .app, .key."""
    from llmlab.serve.app import ServeLimits, ServerThread, create_app

    key = getattr(request.module, "SERVE_API_KEY", None)
    limits = ServeLimits(**{"max_tokens": 64, "max_prompt_tokens": 200, **getattr(request.module, "SERVE_LIMITS", {})})
    model = tiny_chat_model()
    app = create_app(model, name="tiny", api_key=key, limits=limits)
    with ServerThread(app) as s:
        s.model, s.app, s.key = model, app, key
        yield s


@pytest.fixture(scope="module")
def client(server):
    """The official openai client for `server` (no retries)."""
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key=server.key or "x", max_retries=0, timeout=60)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory):
    """A random Hugging Face GPT-2 (2 layers, width 64, vocab 101) saved with save_pretrained (safetensors).

    Session-scoped: tests must not modify the folder (copy it first)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1234)
    model = randomize_(GPT2LMHeadModel(GPT2Config(**TINY_GPT2))).eval()
    folder = tmp_path_factory.mktemp("tiny_gpt2")
    model.save_pretrained(folder)
    assert (folder / "model.safetensors").is_file()
    return folder


@pytest.fixture(scope="session")
def smollm2():  # noqa: ANN201
    """SmolLM2-135M-Instruct, loaded once for every test that uses it; skipped where it cannot load."""
    import llmlab

    try:
        return llmlab.load("smollm2")
    except Exception as e:  # noqa: BLE001 - any reason it cannot load is a reason to skip
        pytest.skip(f"SmolLM2 does not load here: {type(e).__name__}: {e}")
