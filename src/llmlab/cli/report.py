"""`llmlab report`: list the experiment reports under a folder and open one."""

from __future__ import annotations

import argparse
import json
import webbrowser
from pathlib import Path

from llmlab.cli.common import console, verb
from llmlab.errors import LlmlabError
from llmlab.security.report import find_reports


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="a run folder, an experiment's output folder, or any folder above them")
    p.add_argument("--open", action="store_true", help="open the newest report.html in a browser")
    p.add_argument("--json", action="store_true", help="print the list as JSON")


@verb("report", "list (and open) the experiment reports under a folder", _args)
def cmd_report(a: argparse.Namespace) -> int:
    root = Path(a.path)
    if not root.exists():
        raise LlmlabError(f"{root} does not exist; give a run folder or the folder an experiment wrote its report to")
    reports = find_reports(root)
    if not reports:
        raise LlmlabError(f"no report.json under {root}; write one there, e.g. `llmlab scan TARGET --out {root}/scan`")
    items = []
    for r in reports:
        d = json.loads((r / "report.json").read_text())
        items.append({"folder": str(r), "experiment": d.get("experiment"), "created": d.get("created"),
                      "summary": d.get("summary", ""), "html": str(r / "report.html")})
    if a.json:
        print(json.dumps(items, indent=2))
    else:
        c = console()
        for it in items:
            c.print(f"[bold]{it['experiment']}[/]  {it['created']}  {it['folder']}")
            c.print(f"    {it['summary']}", markup=False)
            c.print(f"    {it['html']}")
    if a.open:
        page = Path(items[0]["html"]).resolve()
        try:
            opened = webbrowser.open(page.as_uri())
        except webbrowser.Error:
            opened = False
        if not opened:
            console(stderr=True).print(f"no web browser found to open it; open {page} in one yourself", markup=False)
    return 0
