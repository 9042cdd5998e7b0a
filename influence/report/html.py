"""Small HTML builders: escaping, number formatting, tables, sample cards and the page shell."""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", "DejaVu Sans", sans-serif; color: #222;
       margin: 0; background: #f6f7f9; }
header { background: #1f2d3d; color: #fff; padding: 18px 32px; }
header h1 { margin: 0; font-size: 22px; } header p { margin: 4px 0 0; color: #c9d3dd; }
nav { padding: 8px 32px; background: #fff; border-bottom: 1px solid #dde; position: sticky; top: 0; }
nav a { margin-right: 14px; color: #2471a3; text-decoration: none; }
main { padding: 8px 32px 40px; max-width: 1240px; }
section { background: #fff; border: 1px solid #e1e4e8; border-radius: 6px; padding: 14px 20px; margin: 16px 0; }
h2 { font-size: 18px; margin: 0 0 8px; } p.note { color: #555; margin: 4px 0 10px; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { padding: 3px 10px; border-bottom: 1px solid #eee; text-align: right; }
th { background: #f0f2f5; } td.text, th.text { text-align: left; }
table.kv td:first-child { text-align: left; color: #555; white-space: nowrap; } table.kv td { text-align: left; }
.grid { display: flex; flex-wrap: wrap; gap: 10px; }
.card { margin: 0; width: 122px; border: 1px solid #e1e4e8; border-radius: 4px; padding: 5px; font-size: 11.5px;
        background: #fff; }
.card img { width: 112px; height: 112px; image-rendering: pixelated; display: block; margin: 0 auto 3px; }
.card .idx { font-weight: 600; } .card.noisy { border: 2px solid #e67e22; }
.badge { display: inline-block; background: #e67e22; color: #fff; border-radius: 3px; padding: 0 4px; }
.harm { color: #c0392b; } .help { color: #2471a3; }
.pair { display: flex; gap: 16px; } .pair > section { flex: 1 1 0; min-width: 0; }
.figs { display: flex; flex-wrap: wrap; gap: 16px; align-items: flex-start; }
section > img, .figs img { max-width: 100%; }
"""


def esc(value: Any) -> str:
    """HTML-escaped text of a value."""
    return html.escape(str(value), quote=True)


def fmt(value: Any, digits: int = 4) -> str:
    """Short text for a table cell: ints as is, floats with ``digits`` significant digits, NaN as a dash.

    A float that is not a whole number never reads as one: 0.99996 at 3 digits is "1.00", not "1"
    (a correlation of 1 would claim a perfect fit).
    """
    if value is None:
        return "—"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        number = float(value)
        if math.isnan(number):
            return "—"
        if math.isfinite(number) and number == round(number) and abs(number) < 1e6:
            return str(int(number))
        text = f"{number:.{digits}g}"
        if text.lstrip("-").isdigit():  # rounded to a whole number: keep the digits asked for
            text = f"{number:.{max(1, digits - len(text.lstrip('-')))}f}"
        return text
    if isinstance(value, (list, tuple, np.ndarray)):
        return "[" + ", ".join(fmt(v, 3) for v in np.ravel(value)[:6]) + (", …]" if np.size(value) > 6 else "]")
    return str(value)


def table(frame: pd.DataFrame, *, text_columns: Iterable[str] = (), css_class: str = "") -> str:
    """A DataFrame as an HTML table (no index); numbers right-aligned and formatted with :func:`fmt`."""
    text = set(text_columns)
    head = "".join(f'<th class="{"text" if c in text else ""}">{esc(c)}</th>' for c in frame.columns)
    rows = []
    for values in frame.itertuples(index=False):
        cells = "".join(
            f'<td class="{"text" if c in text else ""}">{esc(fmt(v))}</td>' for c, v in zip(frame.columns, values)
        )
        rows.append(f"<tr>{cells}</tr>")
    cls = f' class="{css_class}"' if css_class else ""
    return f"<table{cls}><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def key_value(items: Mapping[str, Any]) -> str:
    """A two-column table of a summary."""
    rows = "".join(f"<tr><td>{esc(k)}</td><td>{esc(fmt(v))}</td></tr>" for k, v in items.items())
    return f'<table class="kv"><tbody>{rows}</tbody></table>'


@dataclass(frozen=True)
class Card:
    """One training sample in an image grid."""

    src: str
    index: int
    lines: Sequence[str]
    noisy: bool = False
    note: str = ""


def grid(cards: Sequence[Card], *, id_prefix: str = "sample") -> str:
    """Sample cards in a wrapping grid; known-noisy samples get an orange frame and badge.

    Each card's anchor is ``{id_prefix}-{index}``: a grid that may repeat samples of another
    grid takes its own prefix, so ids stay unique on the page.
    """
    parts = []
    for card in cards:
        badge = f'<div><span class="badge">{esc(card.note or "noisy")}</span></div>' if card.noisy else ""
        lines = "".join(f"<div>{line}</div>" for line in card.lines)
        parts.append(
            f'<figure class="card{" noisy" if card.noisy else ""}" id="{esc(id_prefix)}-{card.index}">'
            f'<img src="{esc(card.src)}" alt="training sample {card.index}">'
            f'<figcaption><div class="idx">#{card.index}</div>{lines}{badge}</figcaption></figure>'
        )
    return f'<div class="grid">{"".join(parts)}</div>'


def image(src: str, alt: str) -> str:
    """An image reference."""
    return f'<img src="{esc(src)}" alt="{esc(alt)}">'


@dataclass(frozen=True)
class Section:
    """One section of the page: an anchor id, a heading and an HTML body."""

    id: str
    title: str
    body: str
    note: str = ""
    half: bool = False  # consecutive half-width sections share a row


def page(title: str, subtitle: str, sections: Sequence[Section]) -> str:
    """The complete, self-contained HTML document (inline CSS, no scripts, no network)."""
    nav = "".join(f'<a href="#{esc(s.id)}">{esc(s.title)}</a>' for s in sections)
    parts: list[str] = []
    for i, s in enumerate(sections):
        html_ = (
            f'<section id="{esc(s.id)}"><h2>{esc(s.title)}</h2>'
            + (f'<p class="note">{s.note}</p>' if s.note else "")
            + f"{s.body}</section>"
        )
        if s.half and not (i > 0 and sections[i - 1].half):
            parts.append('<div class="pair">')
        parts.append(html_)
        if s.half and not (i + 1 < len(sections) and sections[i + 1].half):
            parts.append("</div>")
    body = "".join(parts)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
        f"<header><h1>{esc(title)}</h1><p>{esc(subtitle)}</p></header>"
        f"<nav>{nav}</nav><main>{body}</main></body></html>\n"
    )
