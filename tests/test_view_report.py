"""Report pages: sortable tables (a real browser clicks a header) and hover values, still self-contained."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmlab.security.report import Section, write_report
from test_view import HAVE_BROWSER, chromium


def _report(tmp: Path) -> Path:
    rows = [["b", 10.0, 3], ["a", 2.5, 1], ["c", float("nan"), 2]]
    write_report(tmp / "r", "demo", {"rows": rows}, [Section("scores", header=["name", "score", "n"], rows=rows)],
                 "a summary")
    return tmp / "r" / "report.html"


def test_report_has_sort_script_and_hover_values(tmp_path: Path) -> None:
    text = _report(tmp_path).read_text()
    assert "<script>" in text and "data-sort" in text and "title='2.5'" in text
    assert "http://" not in text and "https://" not in text


@pytest.mark.skipif(not HAVE_BROWSER, reason="needs Debian's chromium and chromium-driver")
def test_report_sorts_in_chromium(tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    page = _report(tmp_path)
    d = chromium(tmp_path)
    try:
        d.get(page.as_uri())
        col = lambda i: [r.find_elements(By.TAG_NAME, "td")[i].text  # noqa: E731
                         for r in d.find_elements(By.CSS_SELECTOR, "tbody tr")]
        ths = d.find_elements(By.CSS_SELECTOR, "thead th")
        ths[1].click()
        assert col(0) == ["a", "b", "c"]  # 2.5 < 10, the missing value last
        ths[1].click()
        assert col(0) == ["b", "a", "c"]
        ths[0].click()
        assert col(0) == ["a", "b", "c"]
        assert [e for e in d.get_log("browser") if e["level"] == "SEVERE"] == []
    finally:
        d.quit()


def _plot_report(tmp: Path) -> tuple[Path, list]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from llmlab.security.report import figure_png

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot([1, 2, 3], [0.1, 0.7, 0.4], "o", color="red", ms=9, label="asr")
    ax.bar([5], [0.5], color="blue", label="bar")
    ax.set_xlabel("step")
    png = figure_png(fig)
    write_report(tmp / "p", "demo", {}, [Section("curve", figures={"asr curve": png})], "plots")
    return tmp / "p", png.points


def test_plot_points_land_where_the_png_drew_them(tmp_path: Path) -> None:
    import io

    from PIL import Image

    folder, pts = _plot_report(tmp_path)
    labels = [p[2] for p in pts]
    assert labels[:3] == ["asr: x=1, y=0.1", "asr: x=2, y=0.7", "asr: x=3, y=0.4"]
    assert "bar: x=5, y=0.5" in labels
    png = next((folder / "figures").glob("*.png")).read_bytes()
    img = Image.open(io.BytesIO(png)).convert("RGB")
    for x, y, _ in pts[:3]:  # the centre of each red marker is red in the saved picture
        r, g, b = img.getpixel((round(x), round(y)))
        assert r > 200 and g < 60 and b < 60, (x, y, (r, g, b))
    x, y, _ = next(p for p in pts if p[2].startswith("bar"))
    r, g, b = img.getpixel((round(x), round(y) + 3))  # just under the bar's top edge
    assert b > 200 and r < 60
    text = (folder / "report.html").read_text()
    assert "data-points=" in text and "llmlab-tip" in text and "https://" not in text


@pytest.mark.skipif(not HAVE_BROWSER, reason="needs Debian's chromium and chromium-driver")
def test_plot_shows_its_value_on_hover_in_chromium(tmp_path: Path) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    folder, pts = _plot_report(tmp_path)
    d = chromium(tmp_path)
    try:
        d.get((folder / "report.html").as_uri())
        img = d.find_element(By.CSS_SELECTOR, "img[data-points]")
        scale = img.size["width"] / d.execute_script("return arguments[0].naturalWidth", img)
        x, y, label = pts[1]
        ActionChains(d).move_to_element_with_offset(img, round(x * scale - img.size["width"] / 2),
                                                    round(y * scale - img.size["height"] / 2)).perform()
        tip = d.find_element(By.ID, "llmlab-tip")
        assert tip.is_displayed() and tip.text == label == "asr: x=2, y=0.7"
        ActionChains(d).move_to_element_with_offset(img, -img.size["width"] // 2 + 2, -img.size["height"] // 2 + 2
                                                    ).perform()
        assert not tip.is_displayed()  # far from every point
        assert [e for e in d.get_log("browser") if e["level"] == "SEVERE"] == []
    finally:
        d.quit()
