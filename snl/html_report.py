"""One self-contained HTML page per run: tables, ROC and PRO curves, and image grids.

``report.html`` opens offline in any browser: every figure and image is a PNG embedded as a
``data:`` URI, the style sheet is inline, there is no script. What it shows:

- the per-class table and the per-defect-type table (cross-class probes included), and, for
  ``snl compare``, SNL's and RD's rows side by side (mean ± std over seeds);
- image-level ROC curves and PRO curves (per-region overlap against the false-positive rate
  of normal pixels, up to AUPRO's limit), one line per class;
- for every class, a grid of test images, each row ``original | anomaly map with its colour
  scale | overlay | ground truth`` (no ground truth for ``snl predict``) at :data:`DISPLAY`
  pixels or more, with its score, the decision threshold and the verdict: the
  highest-scored defects, then the likeliest misses (the lowest-scored defects and the
  highest-scored good images).

The page is built from plain data (:class:`GridRow`, curve points, metric dicts), so the
evaluation, ``snl predict`` and ``snl compare`` each assemble theirs from what they have.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .report import METRIC_COLUMNS

#: Width and height, in pixels, of every image of a grid (inputs smaller than this are
#: upsampled: maps bilinearly, masks by nearest neighbour).
DISPLAY = 256
COLORMAP = "jet"

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; background: #fff; }
h1 { font-size: 1.5em; } h2 { font-size: 1.25em; margin-top: 1.6em; } h3 { font-size: 1.05em; }
table.metrics { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
table.metrics th, table.metrics td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
table.metrics th:first-child, table.metrics td:first-child { text-align: left; }
table.metrics tr.mean td { font-weight: bold; }
.curves img { margin-right: 1em; }
table.grid { border-collapse: collapse; margin: 0.5em 0 1.5em; }
table.grid td, table.grid th { padding: 4px; vertical-align: top; text-align: center; }
table.grid td.caption { text-align: left; font-size: 0.85em; width: 14em; }
.scale { display: inline-flex; align-items: stretch; gap: 4px; }
.ticks { display: flex; flex-direction: column; justify-content: space-between;
         font-size: 0.75em; text-align: left; }
.wrong { color: #b00; font-weight: bold; } .right { color: #070; }
.note { color: #555; font-size: 0.9em; }
pre { background: #f6f6f6; padding: 0.6em; font-size: 0.8em; overflow-x: auto; }
"""


@dataclass
class GridRow:
    """One image of a class's grid."""

    name: str  #: what the caption calls it (e.g. the file name)
    group: str  #: why it is shown: "highest-scored defect", "missed defect", ...
    defect: str  #: its defect type ("good" for normal images, "" when unknown)
    score: float  #: the image score (its map's maximum)
    image: np.ndarray  #: (H, W, 3) uint8 RGB, any size
    amap: np.ndarray  #: (h, w) anomaly map
    mask: np.ndarray | None = None  #: (h, w) ground truth, None when there is none
    label: int | None = None  #: ground truth, 1 anomalous, None when unknown


def png_bytes(rgb: np.ndarray) -> bytes:
    """(H, W, 3) or (H, W) uint8 as PNG bytes."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def img_tag(png: bytes, alt: str, width: int | None = None) -> str:
    size = f' width="{width}"' if width else ""
    return f'<img src="{data_uri(png)}" alt="{html.escape(alt)}"{size}>'


def _resize(array: np.ndarray, size: int, nearest: bool = False) -> np.ndarray:
    """A (h, w) float map or (h, w, 3) uint8 image resized to (size, size)."""
    from PIL import Image

    if array.ndim == 2 and array.dtype != np.uint8:
        image = Image.fromarray(np.asarray(array, dtype=np.float32), mode="F")
    else:
        image = Image.fromarray(np.ascontiguousarray(array))
    method = Image.NEAREST if nearest else Image.BILINEAR
    return np.asarray(image.resize((size, size), method))


def colourise(amap: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """An anomaly map in :data:`COLORMAP` colours, ``vmin`` to ``vmax``, as RGB uint8."""
    from matplotlib import colormaps

    span = vmax - vmin if vmax > vmin else 1.0
    rgb = colormaps[COLORMAP](np.clip((np.asarray(amap, np.float64) - vmin) / span, 0.0, 1.0))
    return (rgb[..., :3] * 255).round().astype(np.uint8)


def colour_bar(height: int = DISPLAY, width: int = 14) -> bytes:
    """A vertical colour bar, top = maximum, as PNG bytes."""
    column = np.linspace(1.0, 0.0, height)[:, None].repeat(width, axis=1)
    return png_bytes(colourise(column, 0.0, 1.0))


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def _percent(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, Mapping):  # {"mean": ..., "std": ...} of snl compare
        return f"{100 * v['mean']:.1f} ± {100 * v.get('std', 0.0):.1f}"
    return f"{100 * float(v):.1f}"


def metrics_table(rows: Mapping[str, Mapping[str, Any]], first: str = "class") -> str:
    """An HTML table of ``{row name: {metric key: value}}`` in percent; the columns are those
    of :data:`snl.report.METRIC_COLUMNS` that some row has. A value may be a number or
    ``{"mean", "std"}``."""
    keys = [(k, label) for k, label in METRIC_COLUMNS if any(k in r for r in rows.values())]
    head = "".join(f"<th>{html.escape(label)}</th>" for _, label in keys)
    lines = [f'<table class="metrics"><tr><th>{html.escape(first)}</th>{head}</tr>']
    for name, row in rows.items():
        cls = ' class="mean"' if name == "mean" or name.endswith("/ mean") else ""
        cells = "".join(f"<td>{_percent(row.get(k))}</td>" for k, _ in keys)
        lines.append(f"<tr{cls}><td>{html.escape(name)}</td>{cells}</tr>")
    lines.append("</table>")
    return "\n".join(lines)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]],
          bold: Sequence[int] = ()) -> str:
    """A plain HTML table of text cells (escaped); rows whose index is in ``bold`` in bold."""
    out = ['<table class="metrics"><tr>' + "".join(f"<th>{html.escape(h)}</th>" for h in headers)
           + "</tr>"]
    for i, row in enumerate(rows):
        cls = ' class="mean"' if i in bold else ""
        out.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def curves_png(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], title: str, xlabel: str,
               ylabel: str, xlim: float = 1.0, diagonal: bool = False,
               styles: Mapping[str, str] | None = None) -> bytes:
    """A line plot, one line per entry of ``curves`` (name -> (x, y)), as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.6, 4.2), dpi=100)
    for name, (x, y) in curves.items():
        ax.plot(x, y, (styles or {}).get(name, "-"), label=name, linewidth=1.2)
    if diagonal:
        ax.plot([0, xlim], [0, xlim], color="grey", linestyle=":", linewidth=0.8)
    ax.set_xlim(0, xlim)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if curves:
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def grid(rows: Sequence[GridRow], vmin: float, vmax: float, threshold: float | None = None,
         size: int = DISPLAY) -> str:
    """The image grid: ``original | map with colour scale | overlay | ground truth``.

    Args:
        rows: the images, in display order.
        vmin, vmax: the colour scale's bottom and top (e.g. the class's smallest and largest
            map values), shared by every row.
        threshold: the decision threshold on scores, shown in the captions (None: none).
        size: width and height of each image; at least :data:`DISPLAY`.
    """
    size = max(size, DISPLAY)
    bar = img_tag(colour_bar(size), "colour scale")
    ticks = (f'<div class="ticks" style="height:{size}px"><span>{_fmt(vmax)}</span>'
             f"<span>{_fmt((vmin + vmax) / 2)}</span><span>{_fmt(vmin)}</span></div>")
    truths = any(row.mask is not None for row in rows)
    out = ['<table class="grid"><tr><th></th><th>original</th>'
           '<th>anomaly map (colour scale)</th><th>overlay</th>'
           + ("<th>ground truth</th>" if truths else "") + "</tr>"]
    for row in rows:
        image = _resize(row.image, size)
        amap = _resize(row.amap, size)
        heat = colourise(amap, vmin, vmax)
        blend = (0.5 * image.astype(np.float64) + 0.5 * heat).round().astype(np.uint8)
        if row.mask is not None:
            truth = img_tag(png_bytes(_resize((np.asarray(row.mask) > 0.5).astype(np.uint8) * 255,
                                              size, nearest=True)), "ground truth")
        else:
            truth = '<span class="note">none</span>'
        out.append(
            f'<tr><td class="caption">{_caption(row, threshold)}</td>'
            f"<td>{img_tag(png_bytes(image), 'original ' + row.name)}</td>"
            f'<td><div class="scale">{img_tag(png_bytes(heat), "anomaly map " + row.name)}'
            f"{bar}{ticks}</div></td>"
            f"<td>{img_tag(png_bytes(blend), 'overlay ' + row.name)}</td>"
            + (f"<td>{truth}</td>" if truths else "") + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _caption(row: GridRow, threshold: float | None) -> str:
    parts = [f"<b>{html.escape(row.group)}</b>", html.escape(row.name)]
    if row.defect:
        parts.append(f"type: {html.escape(row.defect)}")
    parts.append(f"score: {_fmt(row.score)}")
    if threshold is not None:
        predicted = int(row.score >= threshold)
        verdict = "anomalous" if predicted else "normal"
        parts.append(f"threshold: {_fmt(threshold)}")
        if row.label is None:
            parts.append(f"verdict: {verdict}")
        else:
            cls = "right" if predicted == int(row.label) else "wrong"
            mark = "correct" if cls == "right" else "wrong"
            parts.append(f'verdict: <span class="{cls}">{verdict} ({mark})</span>')
    return "<br>".join(parts)


def pick_rows(scores: np.ndarray, labels: np.ndarray, per_group: int = 2) -> list[tuple[int, str]]:
    """Which images a class's grid shows, as (index, group), without repeats: the
    ``per_group`` highest-scored defects, then the likeliest misses: the lowest-scored defects
    and the highest-scored good images (the captions say which are wrong at the threshold)."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    order = np.argsort(-scores, kind="stable")
    defects = [int(i) for i in order if labels[i]]
    goods = [int(i) for i in order if not labels[i]]
    picked: dict[int, str] = {}
    for group, candidates in (("highest-scored defect", defects),
                              ("lowest-scored defect", defects[::-1]),
                              ("highest-scored good image", goods)):
        taken = 0
        for i in candidates:
            if taken == per_group:
                break
            if i not in picked:
                picked[i] = group
                taken += 1
    return list(picked.items())


def page(title: str, sections: Sequence[str], config: Mapping[str, Any] | None = None) -> str:
    """The whole document: a title, the sections' HTML in order, the configuration."""
    body = [f"<h1>{html.escape(title)}</h1>", *sections]
    if config:
        body += ["<h2>Configuration</h2>",
                 "<pre>" + html.escape(json.dumps(dict(config), indent=2, sort_keys=True,
                                                  default=str)) + "</pre>"]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def write(path: str | Path, document: str) -> Path:
    """Write ``document`` to ``path`` through a temporary file (never a half-written page)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(document, encoding="utf-8")
    tmp.replace(path)
    return path


def section(heading: str, *parts: str, level: int = 2) -> str:
    return f"<h{level}>{html.escape(heading)}</h{level}>\n" + "\n".join(parts)


def paragraph(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'
