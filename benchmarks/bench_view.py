"""`llmlab view` performance: the MiniLM page for the seed sentence, opened in headless Chromium (time from
navigation start to the page's data-ready mark), and the size of a SmolLM2 (30 layers) page for 64 tokens.

    .venv/bin/python benchmarks/bench_view.py [--out DIR]

Prints one line per measurement. The issue's targets: under 1 s to render, under 10 MB."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import llmlab  # noqa: E402
from llmlab.inspect.view import write_view  # noqa: E402

SEED = "The cat sat on the mat and then it woke"


def main() -> int:
    out = Path(sys.argv[sys.argv.index("--out") + 1]) if "--out" in sys.argv else Path(tempfile.mkdtemp())
    mini = write_view(llmlab.load("minilm"), SEED, out / "minilm", name="minilm")
    print(f"minilm page: {mini.size_bytes / 1e6:.2f} MB")
    from test_view import HAVE_BROWSER, chromium

    if HAVE_BROWSER:
        d = chromium(out)
        try:
            times = []
            for _ in range(5):
                d.get(mini.path.as_uri())
                ms = d.execute_script("var n = performance.getEntriesByType('navigation')[0];"
                                      "return n.loadEventEnd - n.startTime")
                times.append(ms)
            print(f"minilm render (navigation start to load end, headless Chromium, best of 5): {min(times):.0f} ms")
        finally:
            d.quit()
    else:
        print("minilm render: skipped (no chromium / chromedriver)")
    try:
        smol = llmlab.load("smollm2")
    except Exception as e:  # noqa: BLE001 - a benchmark reports and goes on
        print(f"smollm2 page: skipped ({e})")
        return 0
    tok = smol.tokenizer
    words = ("the quick brown fox jumps over the lazy dog and then it woke up again " * 20).split()
    text, n = "", 0
    for w in words:
        cand = (text + " " + w).strip()
        if len(tok.encode(cand)) > 64:
            break
        text = cand
    n = len(tok.encode(text))
    t0 = time.perf_counter()
    res = write_view(smol, text, out / "smollm2", name="smollm2")
    print(f"smollm2 page ({n} tokens, 30 layers x 9 heads): {res.size_bytes / 1e6:.2f} MB, "
          f"built in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
