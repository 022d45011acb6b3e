"""`llmlab view`: the page's data, its bad-input messages, and the page itself in a real browser (headless
Chromium from Debian's package, driven by Selenium with Debian's chromedriver, networking disabled)."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest
import torch

import llmlab
from llmlab.cli import main
from llmlab.inspect import view

SEED = "The cat sat on the mat and then it woke"
CORRUPT = "The dog sat on the mat and then it woke"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
HAVE_BROWSER = Path(CHROMIUM).exists() and Path(DRIVER).exists()
browser = pytest.mark.skipif(not HAVE_BROWSER, reason="needs Debian's chromium and chromium-driver "
                             "(apt-get install -y chromium chromium-driver; .ci/run installs them)")


@pytest.fixture(scope="module")
def minilm() -> torch.nn.Module:
    return llmlab.load("minilm")


@pytest.fixture(scope="module")
def page(minilm: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> view.ViewResult:
    # one thread, as the CLI run it is compared with (OMP_NUM_THREADS=1): a float sum splits differently over
    # another number of threads, and training tests earlier in the session leave torch at whatever their
    # thread governor chose under the machine's load
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return view.write_view(minilm, SEED, tmp_path_factory.mktemp("view"), patch=CORRUPT, name="minilm")
    finally:
        torch.set_num_threads(threads)


def test_page_is_self_contained(page: view.ViewResult) -> None:
    text = page.path.read_text()
    for bad in ("http://", "https://", "src=", "<link", "@import", "fetch(", "XMLHttpRequest"):
        assert bad not in text.replace("http://www.w3.org/2000/svg", ""), bad
    assert "Content-Security-Policy" in text and "default-src 'none'" in text


def test_qk_products_reproduce_the_models_attention(minilm: torch.nn.Module, page: view.ViewResult) -> None:
    qk = page.data["qk"]
    assert qk["layers"] == list(range(minilm.config.n_layer))
    ids = view._ids(minilm, SEED)
    got = view.query_keys(minilm, ids, qk["layers"])
    w = torch.tensor(page.data["weights"])
    for li in qk["layers"]:
        q, k, causal = got[li]
        assert not causal
        torch.testing.assert_close(view.qk_scores(q, k, causal), w[li], atol=1e-5, rtol=1e-4)


def test_qk_with_rotary_and_grouped_query_attention(tmp_path: Path) -> None:
    """A Llama-style GPT (RoPE, GQA, causal): q and k read by the hook give back the model's own weights."""
    from llmlab.config import ModelConfig
    from llmlab.models.gpt import GPT
    from llmlab.tokenizers import CharTokenizer

    tok = CharTokenizer.train("hello there wh")
    cfg = ModelConfig(arch="gpt", vocab_size=tok.vocab_size + 3,
                      n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=64,
                      position="rope", norm="rmsnorm", activation="swiglu", bias=False)
    m = GPT(cfg).eval()
    m.tokenizer = tok
    data = view.build_view_data(m, "hello there", patch="hello where")
    got = view.query_keys(m, view._ids(m, "hello there"), [0, 1])
    for li in (0, 1):
        q, k, causal = got[li]
        assert causal
        torch.testing.assert_close(view.qk_scores(q, k, causal), torch.tensor(data["weights"][li]),
                                   atol=1e-5, rtol=1e-4)
    assert len(data["lens"]["top"]) == 3 and len(data["patch"]["effects"]) == 2
    eff = torch.tensor(data["patch"]["effects"])
    # patching every position after the last layer restores the clean output exactly
    assert eff[-1, -1] == pytest.approx(1.0, abs=1e-3)


def test_patching_effects(page: view.ViewResult) -> None:
    p = page.data["patch"]
    eff = torch.tensor(p["effects"])
    assert eff.shape == (6, len(page.data["tokens"]))
    cat = page.data["tokens"].index("cat")
    # in layer 0 only the changed token carries the difference; elsewhere patching it does nothing
    assert eff[0, cat] > 0.5
    assert eff[0, :cat].abs().max() < 0.05


def test_bad_input(minilm: torch.nn.Module) -> None:
    with pytest.raises(llmlab.LlmlabError, match="different lengths"):
        view.build_view_data(minilm, SEED, patch="The elephant-like dog sat on the mat and then it woke")
    with pytest.raises(llmlab.LlmlabError, match="at most 4.*--max-tokens"):
        view.build_view_data(minilm, SEED, max_tokens=4)
    with pytest.raises(llmlab.LlmlabError, match="no attention weights"):
        view.build_view_data(torch.nn.Linear(2, 2), SEED)


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc = main(["view", "minilm", "--text", SEED, "--out", str(tmp_path), "--max-tokens", "3"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--max-tokens" in err


def test_serve(page: view.ViewResult) -> None:
    server = view.serve_page(page.path)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        host, port = server.server_address[:2]
        body = urllib.request.urlopen(f"http://{host}:{port}/view.html", timeout=10).read()
        assert body == page.path.read_bytes()
    finally:
        server.shutdown()
        server.server_close()


def chromium(tmp: Path):  # noqa: ANN201
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 "--proxy-server=http://127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND",
                 f"--user-data-dir={tmp / 'profile'}", "--window-size=1300,1000"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(DRIVER), options=opts)


@browser
def test_page_in_chromium(page: view.ViewResult, tmp_path: Path) -> None:
    from PIL import Image
    from selenium.webdriver.common.by import By

    cli = subprocess.run([sys.executable, "-m", "llmlab", "attention", SEED, "--model", "minilm", "--json"],
                         capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    expected = json.loads(cli.stdout)
    d = chromium(tmp_path)
    try:
        d.get(page.path.as_uri())
        assert d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1"
        errors = [e for e in d.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
        assert errors == []
        assert d.execute_script("return performance.getEntriesByType('resource').length") == 0
        data = d.execute_script("return window.LLMLAB.data")
        assert data["tokens"] == expected["tokens"]
        assert data["weights"] == expected["weights"]  # full precision: equal, not merely close
        # the lines drawn carry the same values
        lines = d.execute_script("return Array.from(document.querySelectorAll('#hv-lines line')).slice(0, 300)"
                                 ".map(e => [+e.dataset.l, +e.dataset.h, +e.dataset.q, +e.dataset.k, e.dataset.w])")
        assert lines
        for layer, h, q, k, w in lines:
            assert float(w) == expected["weights"][layer][h][q][k]
        # clicking a head in the model view changes the head view
        before = d.find_element(By.ID, "selected").text
        d.find_element(By.ID, "thumb-3-7").click()
        assert d.find_element(By.ID, "selected").text == "layer 3, heads 7" != before
        shown = d.execute_script("return Array.from(document.querySelectorAll('#hv-lines line'))"
                                 ".map(e => [+e.dataset.l, +e.dataset.h])")
        assert shown and set(map(tuple, shown)) == {(3, 7)}
        assert "layer 3, head 7" in d.find_element(By.ID, "big-title").text
        # the query/key view: the softmax of the per-dimension products equals the model's weights
        rows = d.execute_script("return Array.from(document.querySelectorAll('#qk-table tr[data-k]'))"
                                ".map(r => [+r.querySelector('.soft').textContent,"
                                " +r.querySelector('.mw').textContent])")
        assert len(rows) == len(expected["tokens"])
        for soft, mw in rows:
            assert soft == pytest.approx(mw, abs=2e-3)
        assert d.find_elements(By.CSS_SELECTOR, "#patch-table td")
        png = d.get_screenshot_as_png()
        img = Image.open(io.BytesIO(png)).convert("L")
        lo, hi = img.getextrema()
        assert hi - lo > 100 and sum(1 for c in img.histogram() if c) > 10  # not blank
        assert [e for e in d.get_log("browser") if e["level"] in ("SEVERE", "ERROR")] == []
    finally:
        d.quit()
