"""llmlab serve as real clients use it (issue 13): log-probabilities equal to llmlab's own scoring, echo and
max_tokens=0, n, token-id prompts, penalties and logit_bias, completions usage chunks, lone surrogates,
embeddings, the tokenizer endpoints, and continuous batching: the same greedy outputs as serving each request
alone, a disconnecting client freeing its slot, a failing request failing alone. A real uvicorn server on
127.0.0.1 and the official openai client."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from llmlab.evaluate import token_logprobs
from llmlab.generate.causal import GenerationConfig, generate_ids
from llmlab.generate.chat import generate_from_ids, prompt_ids
from llmlab.serve.app import ServerThread, create_app
from llmlab.serve.engine import Job

# `server` and `client` are the shared fixtures of conftest.py (tiny_chat_model as "tiny", no API key)


def _plain(tok, tokens: list[str]) -> str:
    """The text of token strings without the special ones (the text of a reply skips them)."""
    specials = {tok.decode([i], skip_special_tokens=False) for i in range(tok.vocab_size) if tok.decode([i]) == ""}
    return "".join(t for t in tokens if t not in specials)


def _post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=60)


def test_echo_max_tokens_0_logprobs_equal_llmlab_scoring(server, client: openai.OpenAI) -> None:
    tok = server.model.tokenizer
    text = "The river flows to the sea."
    ids = tok.encode(text)
    ref = token_logprobs(server.model, ids).tolist()
    r = client.completions.create(model="tiny", prompt=text, max_tokens=0, echo=True, logprobs=2, temperature=0)
    c = r.choices[0]
    assert c.text == text and r.usage.completion_tokens == 0
    lp = c.logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert len(lp.tokens) == len(ids) and "".join(lp.tokens) == text
    assert max(abs(a - b) for a, b in zip(lp.token_logprobs[1:], ref)) <= 1e-5
    assert lp.text_offset == [len(tok.decode(ids[:i])) for i in range(len(ids))]
    for t, top in zip(lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert 2 <= len(top) <= 3 and max(top.values()) >= t - 1e-9
    # token-id prompt, lm-eval's way: echo, max_tokens=1, logprobs=1; the last entry is the generated token
    r2 = client.completions.create(model="tiny", prompt=ids, max_tokens=1, echo=True, logprobs=1, temperature=0)
    lp2 = r2.choices[0].logprobs
    assert len(lp2.token_logprobs) == len(ids) + 1
    assert max(abs(a - b) for a, b in zip(lp2.token_logprobs[1:-1], ref)) <= 1e-5
    full = ids + tok.encode(r2.choices[0].text[len(text):])
    assert abs(lp2.token_logprobs[-1] - float(token_logprobs(server.model, full)[-1])) <= 1e-5
    # without echo: only the generated tokens, offsets counted from the end of the prompt
    r3 = client.completions.create(model="tiny", prompt=text, max_tokens=5, logprobs=0, temperature=0)
    lp3 = r3.choices[0].logprobs
    assert _plain(tok, lp3.tokens) == r3.choices[0].text and lp3.text_offset[0] == len(text)
    gen = [tok.token_to_id(t) for t in lp3.tokens]
    want = token_logprobs(server.model, ids + gen)[-len(gen):].tolist()
    assert max(abs(a - b) for a, b in zip(lp3.token_logprobs, want)) <= 1e-5


def test_chat_logprobs_plain_and_streamed(server, client: openai.OpenAI) -> None:
    msgs = [{"role": "user", "content": "Say hello."}]
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert _plain(server.model.tokenizer, [e.token for e in content]) == r.choices[0].message.content
    assert len(content) == 8
    assert all(len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob >= e.logprob - 1e-9 for e in content)
    assert all(bytes(e.bytes).decode() == e.token for e in content)
    ids, _ = prompt_ids(server.model, msgs)
    gen = [server.model.tokenizer.token_to_id(e.token) for e in content]
    want = token_logprobs(server.model, ids + gen)[-len(gen):].tolist()
    assert max(abs(e.logprob - w) for e, w in zip(content, want)) <= 1e-5
    s = list(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0, logprobs=True,
                                            top_logprobs=3, stream=True))
    streamed = [e for c in s if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 6)) for e in streamed] == [(e.token, round(e.logprob, 6)) for e in content]
    # completions streamed with logprobs and echo, and the usage chunk
    cs = list(client.completions.create(model="tiny", prompt="abc", max_tokens=4, temperature=0, echo=True, logprobs=1,
                                        stream=True, stream_options={"include_usage": True}))
    assert cs[-1].usage is not None and cs[-1].usage.completion_tokens == 4 and not cs[-1].choices
    assert cs[0].choices[0].text == "abc" and cs[0].choices[0].logprobs.token_logprobs[0] is None
    plain = client.completions.create(model="tiny", prompt="abc", max_tokens=4, temperature=0, echo=True)
    assert "".join(c.choices[0].text for c in cs if c.choices) == plain.choices[0].text


def test_n_token_prompts_penalties_and_logit_bias(server, client: openai.OpenAI) -> None:
    model, tok = server.model, server.model.tokenizer
    a = client.completions.create(model="tiny", prompt="abc", max_tokens=12, temperature=1.0, n=3, seed=5)
    b = client.completions.create(model="tiny", prompt="abc", max_tokens=12, temperature=1.0, n=3, seed=5)
    assert [c.text for c in a.choices] == [c.text for c in b.choices] and [c.index for c in a.choices] == [0, 1, 2]
    assert len({c.text for c in a.choices}) > 1  # seeded per choice: independent samples
    ch = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], n=2,
                                        max_tokens=4, temperature=0)
    assert len(ch.choices) == 2 and ch.choices[0].message.content == ch.choices[1].message.content
    # prompts as token ids, alone and batched, equal the text prompts
    by_text = client.completions.create(model="tiny", prompt=["abc", "xyz"], max_tokens=6, temperature=0)
    by_ids = client.completions.create(model="tiny", prompt=[tok.encode("abc"), tok.encode("xyz")], max_tokens=6,
                                       temperature=0)
    assert [c.text for c in by_ids.choices] == [c.text for c in by_text.choices]
    # penalties and logit_bias: the server equals llmlab's own sampler with the same settings
    ids = tok.encode("abc")
    for kw in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}, {"logit_bias": {tok.encode("z")[0]: 100}}):
        r = client.completions.create(model="tiny", prompt="abc", max_tokens=10, temperature=0, **kw)
        bias = {int(k): float(v) for k, v in kw.get("logit_bias", {}).items()} or None
        cfg = GenerationConfig(max_new_tokens=10, temperature=0.0, presence_penalty=kw.get("presence_penalty", 0.0),
                               frequency_penalty=kw.get("frequency_penalty", 0.0), logit_bias=bias)
        assert r.choices[0].text == generate_from_ids(model, [ids], cfg)[0].text
    assert client.completions.create(model="tiny", prompt="abc", max_tokens=5, temperature=0,
                                     logit_bias={tok.encode("z")[0]: 100}).choices[0].text == "zzzzz"
    plain = generate_ids(model, [ids], GenerationConfig(max_new_tokens=10, temperature=0.0))[0]
    pen = generate_ids(model, [ids], GenerationConfig(max_new_tokens=10, temperature=0.0, frequency_penalty=2.0))[0]
    assert len(set(pen)) >= len(set(plain))
    bad = _post(server, "/v1/completions", {"model": "tiny", "prompt": [10**7], "max_tokens": 2})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "prompt"


def test_lone_surrogate_echo_is_not_a_500(server) -> None:
    raw = b'{"model": "tiny", "prompt": "ab\\ud800c", "max_tokens": 2, "echo": true, "temperature": 0}'
    for stream in (False, True):
        body = raw.replace(b"}", b', "stream": true}') if stream else raw
        r = httpx.post(server.url + "/v1/completions", content=body, headers={"content-type": "application/json"},
                       timeout=30)
        assert r.status_code == 200, r.text
        text = r.text if stream else r.json()["choices"][0]["text"]
        assert "\ufffd" in text and ("[DONE]" in text) == stream


def test_continuous_batching_equals_serving_alone(server, client: openai.OpenAI) -> None:
    model = server.model
    engine = server.app.state.engine
    prompts = [("word " * (1 + i * 3)) + str(i) for i in range(12)]
    lengths = [4 + 3 * (i % 5) for i in range(12)]
    alone = [generate_from_ids(model, [model.tokenizer.encode(p)], GenerationConfig(max_new_tokens=n,
                                                                                   temperature=0.0))[0].text
             for p, n in zip(prompts, lengths)]
    assert len(set(alone)) > 3

    def ask(i: int) -> str:
        if i % 4 == 3:
            s = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=lengths[i], temperature=0,
                                          stream=True)
            return "".join(c.choices[0].text for c in s)
        return client.completions.create(model="tiny", prompt=prompts[i], max_tokens=lengths[i],
                                         temperature=0).choices[0].text

    engine.max_rows_seen = 0
    with ThreadPoolExecutor(12) as pool:
        got = list(pool.map(ask, range(12)))
    assert got == alone
    assert engine.max_rows_seen >= 2  # they really were decoded together


def _alone(model: torch.nn.Module, prompt: str, n: int) -> str:
    """The greedy completion of serving `prompt` alone, in process (llmlab's own generate)."""
    return generate_from_ids(model, [model.tokenizer.encode(prompt)],
                             GenerationConfig(max_new_tokens=n, temperature=0.0))[0].text


class _Spy:
    """Records the jobs given to the server's engine (and lets a test change them before they run)."""

    def __init__(self, engine, change=None):  # noqa: ANN001
        self.engine, self.change, self.jobs = engine, change, []

    def __enter__(self) -> _Spy:
        real = self.engine.submit

        def submit(jobs: list[Job]) -> None:
            for j in jobs:
                if self.change is not None:
                    self.change(j)
            self.jobs.extend(jobs)
            real(jobs)

        self.engine.submit = submit
        return self

    def __exit__(self, *exc: object) -> None:
        del self.engine.submit  # back to the class's method


def _idle(engine, timeout: float = 20.0) -> None:  # noqa: ANN001
    deadline = time.time() + timeout
    while engine.busy and time.time() < deadline:
        time.sleep(0.02)
    assert engine.busy == 0 and engine.rows == [] and engine.caches is None


def test_disconnect_mid_stream_frees_the_slot(server, client: openai.OpenAI) -> None:
    """A client that goes away mid-stream leaves the batch at the next token; the requests decoded beside it
    and the requests after it complete with their single-request replies, and the batch empties."""
    model, engine = server.model, server.app.state.engine
    prompts = [f"{i} " + "word " * (2 + 3 * i) for i in range(6)]
    want = [_alone(model, p, 30 + 5 * i) for i, p in enumerate(prompts)]

    def slow(job: Job) -> None:  # the streamed job's client reads slowly: 20 ms per piece of text
        if job.cfg.max_new_tokens == 63 and job.on_text is not None:
            send = job.on_text
            job.on_text = lambda text, toks: (time.sleep(0.02), send(text, toks))

    def ask(i: int) -> str:
        return client.completions.create(model="tiny", prompt=prompts[i], max_tokens=30 + 5 * i,
                                         temperature=0).choices[0].text

    body = {"model": "tiny", "prompt": "abc", "max_tokens": 63, "temperature": 0, "stream": True}
    with _Spy(engine, slow) as spy, ThreadPoolExecutor(6) as pool:
        others = [pool.submit(ask, i) for i in range(6)]
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["text"]:
                    break  # closing the response here disconnects
        got = [f.result(timeout=60) for f in others]
    assert got == want
    _idle(engine)
    streamed = [j for j in spy.jobs if j.cfg.max_new_tokens == 63]
    assert len(streamed) == 1 and streamed[0].done.is_set()
    assert streamed[0].completion_tokens < 40  # it stopped early: the slot was freed, not run to the end
    assert ask(2) == want[2]  # and the server goes on serving
    _idle(engine)


def test_a_failing_request_fails_alone(server, client: openai.OpenAI) -> None:
    """Requests that fail (a bad logit_bias id, a prompt past the context, an id outside the vocabulary; a job
    failing inside the batch, at its prefill or mid-decode) get their error alone: the requests decoded
    beside them complete with their single-request replies."""
    model, engine = server.model, server.app.state.engine
    vocab = model.config.vocab_size
    prompts = [("word " * (1 + i * 2)) + str(i) for i in range(10)]
    lengths = [8 + 4 * (i % 5) for i in range(10)]
    want = [_alone(model, p, n) for p, n in zip(prompts, lengths)]
    bad = [
        ({"logit_bias": {str(vocab + 5): 3}}, "logit_bias", "invalid_value"),
        ({"prompt": [1] * 300}, "prompt", "context_length_exceeded"),
        ({"prompt": [1, 2, vocab + 1]}, "prompt", "invalid_value"),
        ({"max_tokens": 10_000}, "max_tokens", "invalid_value"),
    ]

    def good(i: int) -> str:
        return client.completions.create(model="tiny", prompt=prompts[i], max_tokens=lengths[i],
                                         temperature=0).choices[0].text

    def refused(k: int) -> httpx.Response:
        return _post(server, "/v1/completions", {"model": "tiny", "prompt": "abc", "max_tokens": 8,
                                                 "temperature": 0, **bad[k][0]})

    # two jobs that fail inside the engine while the good ones are in the batch: one at its prefill (a bias
    # on a token the model does not have; the server's own check is bypassed), one after 3 tokens
    calls = {"n": 0}

    def explode(text: str, toks: list) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("the client's callback failed")

    inner = [Job(model.tokenizer.encode("abc"), GenerationConfig(max_new_tokens=20, temperature=0.0,
                                                                 logit_bias={vocab + 3: 1.0})),
             Job(model.tokenizer.encode("xyz"), GenerationConfig(max_new_tokens=30, temperature=0.0),
                 on_text=explode)]
    engine.max_rows_seen = 0
    with ThreadPoolExecutor(14) as pool:
        goods = [pool.submit(good, i) for i in range(10)]
        bads = [pool.submit(refused, k) for k in range(len(bad))]
        time.sleep(0.05)
        engine.submit(inner)
        got = [f.result(timeout=60) for f in goods]
        answers = [f.result(timeout=60) for f in bads]
    for j in inner:
        assert j.done.wait(30)
    assert got == want
    for r, (_, param, code) in zip(answers, bad):
        assert r.status_code == 400 and r.json()["error"]["param"] == param and r.json()["error"]["code"] == code
    assert "vocabulary" in str(inner[0].error)
    assert isinstance(inner[1].error, RuntimeError) and calls["n"] == 3
    assert engine.max_rows_seen >= 2
    _idle(engine)


def test_tokenizer_endpoints_are_the_scored_tokens(server, client: openai.OpenAI) -> None:
    """vLLM's /tokenizer_info, /tokenize and /detokenize (what lm-evaluation-harness's remote tokenizer asks
    for) answer with the served model's tokenizer, and the ids /tokenize gives are those /v1/completions
    scores."""
    tok = server.model.tokenizer
    info = httpx.get(server.url + "/tokenizer_info", timeout=30).json()
    assert info["eos_token"] == tok.id_to_token(tok.eos_id) and info["model_max_length"] == 256
    text = "The river flows."
    t = _post(server, "/tokenize", {"prompt": text, "add_special_tokens": False}).json()
    assert t["tokens"] == tok.encode(text) and t["count"] == len(t["tokens"])
    assert _post(server, "/detokenize", {"tokens": t["tokens"]}).json() == {"prompt": text}
    assert _post(server, "/detokenize", {"tokens": [tok.eos_id]}).json() == {"prompt": info["eos_token"]}
    r = client.completions.create(model="tiny", prompt=t["tokens"], max_tokens=0, echo=True, logprobs=0)
    ref = token_logprobs(server.model, t["tokens"]).tolist()
    assert max(abs(a - b) for a, b in zip(r.choices[0].logprobs.token_logprobs[1:], ref)) <= 1e-5
    for path, body, status, param in (("/detokenize", {"tokens": [tok.vocab_size + 2]}, 400, "tokens"),
                                      ("/tokenize", {"prompt": "a", "model": "other"}, 404, "model"),
                                      ("/tokenize", {"prompt": "a", "frobnicate": 1}, 400, "frobnicate"),
                                      ("/tokenize", {"text": "a"}, 400, "prompt")):
        e = _post(server, path, body)
        assert e.status_code == status and e.json()["error"]["param"] == param, (path, body, e.text)


def test_embeddings_for_an_encoder() -> None:
    import llmlab

    model = llmlab.load("minilm")
    with ServerThread(create_app(model, name="minilm")) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=60)
        r = c.embeddings.create(model="minilm", input=["a cat sat", "the stock market"])
        ids = model.tokenizer.encode("a cat sat", add_special_tokens=True)
        with torch.no_grad():
            want = model.sentence_embedding(torch.tensor([ids]))[0]
        got = torch.tensor(r.data[0].embedding)
        assert len(r.data) == 2 and torch.allclose(got, want, atol=1e-6) and r.usage.prompt_tokens > 0
        b64 = c.embeddings.create(model="minilm", input="a cat sat", encoding_format="base64")
        import base64

        import numpy as np

        vec = np.frombuffer(base64.b64decode(b64.data[0].embedding), dtype="<f4")
        assert torch.allclose(torch.from_numpy(vec.copy()), want, atol=1e-6)
        with pytest.raises(openai.BadRequestError):
            c.chat.completions.create(model="minilm", messages=[{"role": "user", "content": "hi"}])
