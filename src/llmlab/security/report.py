"""Experiment reports: report.json (every number, the config, the model's hash), a self-contained
report.html (plots embedded as base64 PNG with their values on hover, readable offline) and a short
report.md summary."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import html
import io
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llmlab.checkpoint import atomic_write_bytes, atomic_write_json, sha256_file

REPORT_FILES = ("report.json", "report.html", "report.md")


def model_hash(model_path: str | Path | None) -> str | None:
    """SHA-256 of a model's weights file (a run or HF folder, or a file), or None if there is none."""
    if model_path is None:
        return None
    p = Path(model_path)
    if p.is_dir():
        p = p / "model.safetensors"
    return sha256_file(p) if p.is_file() else None


def _jsonable(x: Any) -> Any:
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return _jsonable(dataclasses.asdict(x))
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if hasattr(x, "item") and callable(x.item) and getattr(x, "ndim", 1) == 0:
        return _jsonable(x.item())
    if hasattr(x, "tolist"):
        return _jsonable(x.tolist())
    return x


class PlotPNG(bytes):
    """PNG bytes of a plot, with the plotted points: (x pixel, y pixel, label) in the image's own pixels, which
    the HTML report shows as values on hover."""

    points: list[tuple[float, float, str]]


SAVE_DPI = 100
MAX_HOVER_POINTS = 3000


def _num(v: float) -> str:
    return f"{v:.4g}"


def plot_points(fig: Any, dpi: float = SAVE_DPI, pad: float = 0.1) -> list[tuple[float, float, str]]:
    """Where every line vertex, scatter point and bar top of `fig` lands in the PNG that
    savefig(dpi=dpi, bbox_inches="tight", pad_inches=pad) writes, with a "series: x=…, y=…" label."""
    import numpy as np

    fig.set_dpi(dpi)
    fig.canvas.draw()
    box = fig.get_tightbbox(fig.canvas.get_renderer()).padded(pad)  # inches, the saved image's extent
    pts: list[tuple[float, float, str]] = []

    def add(ax: Any, xy: Any, name: str) -> None:
        xy = np.asarray(xy, dtype=float).reshape(-1, 2)
        xy = xy[np.isfinite(xy).all(1)]
        if not len(xy):
            return
        disp = ax.transData.transform(xy) / fig.dpi
        for (x, y), (dx, dy) in zip(xy, disp):
            px, py = (dx - box.x0) * dpi, (box.y1 - dy) * dpi
            if 0 <= px <= box.width * dpi and 0 <= py <= box.height * dpi:
                pts.append((round(float(px), 1), round(float(py), 1),
                            (f"{name}: " if name and not name.startswith("_") else "") + f"x={_num(x)}, y={_num(y)}"))

    for ax in fig.axes:
        for line in ax.get_lines():
            add(ax, line.get_xydata(), str(line.get_label()))
        for coll in ax.collections:
            if coll.get_offset_transform() == ax.transData and len(coll.get_offsets()):
                add(ax, coll.get_offsets(), str(coll.get_label()))
        bar_label = {id(b): str(c.get_label()) for c in ax.containers for b in c if hasattr(b, "get_x")}
        for bar in ax.patches:
            if type(bar).__name__ == "Rectangle" and bar.get_width() and bar.get_height():
                x0, y0 = bar.get_x(), bar.get_y()
                add(ax, [(x0 + bar.get_width() / 2, y0 + bar.get_height())],
                    bar_label.get(id(bar), str(bar.get_label())))
    if len(pts) > MAX_HOVER_POINTS:  # keep the page small: an even subsample
        step = len(pts) / MAX_HOVER_POINTS
        pts = [pts[int(i * step)] for i in range(MAX_HOVER_POINTS)]
    return pts


def figure_png(fig: Any) -> PlotPNG:
    """A matplotlib figure as PNG bytes with its plotted points for hover values (the figure is closed)."""
    import matplotlib.pyplot as plt

    try:
        points = plot_points(fig)
    except Exception:  # noqa: BLE001 - a figure whose points cannot be placed still gets its picture
        points = []
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=SAVE_DPI, bbox_inches="tight", pad_inches=0.1)
    plt.close(fig)
    png = PlotPNG(buf.getvalue())
    png.points = points
    return png


def html_table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(_td(c) for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _td(c: Any) -> str:
    """A cell; a float shows 4 significant digits and its full value on hover."""
    if isinstance(c, float) and not math.isnan(c):
        return f"<td title='{c!r}'>{html.escape(_fmt(c))}</td>"
    return f"<td>{html.escape(_fmt(c))}</td>"


def md_table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _fmt(c: Any) -> str:
    if c is None:
        return "—"
    if isinstance(c, float):
        return "—" if math.isnan(c) else f"{c:.4g}"
    return str(c)


def markdown_html(text: str) -> str:
    """Section text (Markdown: `code`, **bold**, lists, links) as HTML, with raw HTML in the text escaped."""
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": False}).render(text)


def fmt_seconds(s: float) -> str:
    """A duration with its unit: 41.2 s, 17 min 21 s, 1 h 02 min."""
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


@dataclasses.dataclass
class Section:
    """A part of a report: a heading, optional text, optional table, optional figures (PNG bytes)."""

    title: str
    text: str = ""
    header: Sequence[str] = ()
    rows: Sequence[Sequence[Any]] = ()
    figures: dict[str, bytes] = dataclasses.field(default_factory=dict)
    raw_html: str = ""


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;
font-size:14px}th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee}code,pre{background:#f6f6f6}
pre{padding:8px;overflow-x:auto;white-space:pre-wrap}.meta{color:#666;font-size:13px}
th{cursor:pointer;user-select:none}th[data-sort=asc]::after{content:" \\25B2"}
th[data-sort=desc]::after{content:" \\25BC"}
td[title]{cursor:help}img[data-points]{cursor:crosshair}
#llmlab-tip{position:absolute;display:none;background:#222;color:#fff;font-size:12px;padding:3px 6px;
border-radius:3px;pointer-events:none;white-space:nowrap}"""

# Sortable tables, written for llmlab (no library, nothing fetched): click a header to sort by that column
# (numbers numerically, "—" last), click again to reverse; a numeric cell shows its full value on hover.
SORT_JS = r"""(function(){
function key(td){var t=td.textContent.trim();var n=parseFloat(t.replace(/[%,]/g,''));
return (t==='\u2014'||t==='')?null:(isNaN(n)||!/^[-+.\d]/.test(t)?t.toLowerCase():n);}
document.querySelectorAll('table').forEach(function(tb){var ths=tb.querySelectorAll('thead th');
ths.forEach(function(th,c){th.addEventListener('click',function(){var body=tb.tBodies[0];
var dir=th.getAttribute('data-sort')==='asc'?'desc':'asc';ths.forEach(function(o){o.removeAttribute('data-sort');});
th.setAttribute('data-sort',dir);var rows=Array.from(body.rows);rows.sort(function(a,b){
var x=key(a.cells[c]),y=key(b.cells[c]);if(x===null)return 1;if(y===null)return -1;
if(typeof x!==typeof y){x=String(x);y=String(y);}var r=x<y?-1:x>y?1:0;return dir==='asc'?r:-r;});
rows.forEach(function(r){body.appendChild(r);});});});});})();"""


# Values on hover, written for llmlab: each plot carries its points in the image's own pixels (data-points);
# the point nearest the pointer (within 10 displayed pixels) is shown in a small box beside it.
HOVER_JS = r"""(function(){var tip=document.getElementById('llmlab-tip');
document.querySelectorAll('img[data-points]').forEach(function(img){var pts=JSON.parse(img.dataset.points);
img.addEventListener('mousemove',function(e){var r=img.getBoundingClientRect();
var s=img.naturalWidth/r.width,x=(e.clientX-r.left)*s,y=(e.clientY-r.top)*s,best=null,bd=1e18;
pts.forEach(function(p){var d=(p[0]-x)*(p[0]-x)+(p[1]-y)*(p[1]-y);if(d<bd){bd=d;best=p;}});
if(best&&Math.sqrt(bd)/s<=10){tip.textContent=best[2];tip.style.display='block';
tip.style.left=(e.pageX+12)+'px';tip.style.top=(e.pageY+12)+'px';}else{tip.style.display='none';}});
img.addEventListener('mouseleave',function(){tip.style.display='none';});});})();"""


def _header(meta: dict[str, Any]) -> list[str]:
    """The report's provenance line: only what is known (a model folder and its hash, or an endpoint)."""
    bits = [meta["created"]]
    if meta.get("model"):
        bits.append(f"model {meta['model']}")
    if meta.get("model_sha256"):
        bits.append(f"weights sha256 {meta['model_sha256'][:16]}…")
    if meta.get("target"):
        bits.append(f"target {meta['target']}")
    return bits


def write_report(out: str | Path, experiment: str, data: dict[str, Any], sections: Sequence[Section],
                 summary: str, config: dict[str, Any] | None = None, model: str | Path | None = None,
                 target: str | None = None) -> Path:
    """Write report.json, report.html and report.md into `out`; return the folder. `model` is a local model
    (its weights' SHA-256 is recorded); `target` names what was tested when it is not a local folder (an
    endpoint such as openai:MODEL@URL). Section text is Markdown. Files are readable by others (0644)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"experiment": experiment, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
            "model": str(model) if model is not None else None, "model_sha256": model_hash(model),
            "target": target, "config": _jsonable(config or {})}
    payload = {**meta, "summary": summary, "results": _jsonable(data)}
    atomic_write_json(out / "report.json", payload)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>llmlab {html.escape(experiment)}</title>"
             f"<style>{CSS}</style></head><body><h1>llmlab {html.escape(experiment)}</h1>",
             f"<p class='meta'>{html.escape(' · '.join(_header(meta)))}</p>", markdown_html(summary)]
    md = [f"# llmlab {experiment}", "", " · ".join(_header(meta)), "", summary, ""]
    for s in sections:
        parts.append(f"<h2>{html.escape(s.title)}</h2>")
        md += [f"## {s.title}", ""]
        if s.text:
            parts.append(markdown_html(s.text))
            md += [s.text, ""]
        if s.rows:
            parts.append(html_table(s.rows, s.header))
            md += [md_table(s.rows, s.header), ""]
        for name, png in s.figures.items():
            b64 = base64.b64encode(png).decode()
            pts = getattr(png, "points", None)
            hover = f" data-points='{html.escape(json.dumps(pts), quote=True)}'" if pts else ""
            parts.append(f"<figure><img alt='{html.escape(name)}'{hover} src='data:image/png;base64,{b64}'>"
                         f"<figcaption>{html.escape(name)}</figcaption></figure>")
            fname = hashlib.sha1(name.encode()).hexdigest()[:8] + ".png"
            atomic_write_bytes(out / "figures" / fname, png)
            md += [f"![{name}](figures/{fname})", ""]
        if s.raw_html:
            parts.append(s.raw_html)
    parts.append(f"<h2>Configuration</h2><pre>{html.escape(json.dumps(meta['config'], indent=2))}</pre>")
    parts.append(f"<div id='llmlab-tip'></div><script>{SORT_JS}\n{HOVER_JS}</script></body></html>")
    atomic_write_bytes(out / "report.html", "\n".join(parts).encode())
    atomic_write_bytes(out / "report.md", "\n".join(md).encode())
    return out


def find_reports(root: str | Path) -> list[Path]:
    """Folders under root (root included) that hold a report.json, newest first."""
    root = Path(root)
    found = [p.parent for p in root.rglob("report.json")]
    return sorted(found, key=lambda p: (p / "report.json").stat().st_mtime, reverse=True)
