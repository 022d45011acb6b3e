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
