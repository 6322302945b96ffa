"""The run report's page: one self-contained HTML file (every picture inline as a PNG data URI), and
the facts of a run folder it shows that need no model: stage table rows, rejected rows by reason,
the concept pool, training curves and evaluation pictures.

    html = page("demo", [Section("Stages", table(["stage", "status"], rows)), ...])

The page needs no network and no script: it opens from a file, a mail or a CI artifact.
"""
from __future__ import annotations

import base64
import html
import io
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

from pipeline.io import read_parquet
from pipeline.layout import RunLayout
from pipeline.sidecars import sidecar_shards

STYLE = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1180px;
       padding: 0 24px 48px; color: #222; }
h1 { margin: 28px 0 4px; } h2 { margin-top: 36px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
.sub { color: #666; margin: 0 0 16px; }
nav a { margin-right: 14px; }
table { border-collapse: collapse; margin: 10px 0 18px; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #ddd; padding: 4px 10px; text-align: left; }
td.num, th.num { text-align: right; }
th { background: #f4f4f4; }
figure { margin: 14px 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { color: #555; font-size: 13px; margin-top: 4px; }
.row { display: flex; flex-wrap: wrap; gap: 16px; align-items: flex-start; }
.note { color: #555; font-style: italic; }
"""


@dataclass
class Section:
    title: str
    body: str                  # HTML


def escape(value) -> str:
    return html.escape("" if value is None else str(value))


def png_data_uri(picture: Union[bytes, Path, "PIL.Image.Image"]) -> str:  # noqa: F821
    """A PNG (bytes, a file, or a PIL image) as a data URI."""
    if isinstance(picture, Path):
        data = picture.read_bytes()
    elif isinstance(picture, bytes):
        data = picture
    else:
        buffer = io.BytesIO()
        picture.save(buffer, "PNG")
        data = buffer.getvalue()
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def figure(picture, caption: str = "", width: int = 0) -> str:
    style = f' style="max-width:{width}px"' if width else ""
    return (f'<figure><img src="{png_data_uri(picture)}" alt="{escape(caption)}"{style}>'
            + (f"<figcaption>{escape(caption)}</figcaption>" if caption else "") + "</figure>")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def table(columns: Sequence[str], rows: Sequence[Sequence]) -> str:
    """An HTML table; numbers right-aligned."""
    head = "".join(f"<th>{escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f'<td class="num">{escape(v)}</td>' if _is_number(v) else f"<td>{escape(v)}</td>"
                                    for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def markdown_tables(text: str) -> str:
    """Markdown of pipe tables and plain lines (the results table of eval/summary.json) as HTML."""
    out, rows = [], []

    def flush():
        if rows:
            cells = [[c.strip() for c in r.strip().strip("|").split("|")] for r in rows]
            body = [r for r in cells[1:] if not all(set(c) <= set("-:") for c in r)]
            out.append(table(cells[0], body))
            rows.clear()

    for line in text.splitlines():
        if line.strip().startswith("|"):
            rows.append(line)
            continue
        flush()
        if line.strip():
            out.append(f"<p>{escape(line)}</p>")
    flush()
    return "\n".join(out)


def page(title: str, sections: Sequence[Section], subtitle: str = "") -> str:
    nav = " ".join(f'<a href="#s{i}">{escape(s.title)}</a>' for i, s in enumerate(sections))
    body = "\n".join(f'<h2 id="s{i}">{escape(s.title)}</h2>\n{s.body}' for i, s in enumerate(sections))
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{escape(title)}</title><style>{STYLE}</style></head>\n<body>\n<h1>{escape(title)}</h1>\n"
            f"<p class=\"sub\">{escape(subtitle)}</p>\n<nav>{nav}</nav>\n{body}\n</body></html>\n")


# -- facts of a run folder ----------------------------------------------------------------------------------

def shard_rejects(layout: RunLayout) -> Counter:
    """Rejected input rows of the shard stage by (status, reason), over every shard's Parquet (two
    columns read per shard)."""
    counts: Counter = Counter()
    for shard_id in sidecar_shards(layout.shards):
        table_ = read_parquet(layout.shards.parquet(shard_id), columns=["status", "reason"]).to_pydict()
        counts.update((s, r or "") for s, r in zip(table_["status"], table_["reason"]) if s != "success")
    return counts


def concept_pool(layout: RunLayout) -> list[dict]:
    """The concept pool's rows (concept_id, name, count, source), most frequent first as stored."""
    if not layout.concepts_parquet.is_file():
        return []
    return read_parquet(layout.concepts_parquet).to_pylist()


def training_curves(layout: RunLayout) -> list[Path]:
    """The training-curve PNGs of the run's training stages (teacher, rpn, pretrain, transfer)."""
    found = []
    for kind in ("teacher", "rpn", "pretrain", "transfer"):
        folder = layout.checkpoints(kind)
        found += sorted(folder.glob("*.png")) if folder.is_dir() else []
    return found


def evaluation_pictures(layout: RunLayout) -> list[Path]:
    """evaluate's pictures: the side-by-side one first, then one per model."""
    first = [layout.eval_detections_picture] if layout.eval_detections_picture.is_file() else []
    rest = sorted(p for p in layout.eval.glob("detections_*.png")) if layout.eval.is_dir() else []
    return first + rest
