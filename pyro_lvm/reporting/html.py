"""The report's single HTML page: inline CSS, no scripts, no external URLs; figures are PNG files
referenced by relative name from the same folder."""

import html
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1100px; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.8em; }
.subtitle { color: #666; margin-top: 0; }
.verdict { padding: 0.8em 1em; border-radius: 6px; font-size: 1.1em; }
.verdict.used { background: #e8f4ea; border-left: 6px solid #2e8b57; }
.verdict.collapsed { background: #fdecea; border-left: 6px solid #c0392b; }
.verdict.unknown { background: #f3f3f3; border-left: 6px solid #999; }
figure { margin: 0.8em 0; } figcaption { color: #555; font-size: 0.92em; max-width: 800px; }
img { max-width: 100%; border: 1px solid #eee; }
img.pixels { image-rendering: pixelated; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.95em; }
td, th { border: 1px solid #ddd; padding: 0.25em 0.7em; text-align: left; }
th { background: #f7f7f7; } td.number { text-align: right; font-variant-numeric: tabular-nums; }
.note { color: #666; font-style: italic; }
"""


@dataclass
class Section:
    """A titled part of the page: an optional figure (file name, alt text, pixel-art?), a caption
    (HTML) and a table of (name, value) rows."""

    title: str
    image: Optional[str] = None
    alt: str = ""
    pixels: bool = False
    caption: str = ""
    rows: List[Tuple[str, object]] = field(default_factory=list)
    note: str = ""


def _value(value):
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.6g}"
    return html.escape(str(value))


def _table(rows):
    cells = "".join(
        f"<tr><th>{html.escape(str(name))}</th><td class=\"{'number' if isinstance(value, (int, float)) else ''}\">"
        f"{_value(value)}</td></tr>"
        for name, value in rows
    )
    return f"<table>{cells}</table>"


def _section(section):
    parts = [f"<h2>{html.escape(section.title)}</h2>"]
    if section.note:
        parts.append(f"<p class=\"note\">{html.escape(section.note)}</p>")
    if section.image:
        css = ' class="pixels"' if section.pixels else ""
        parts.append(
            f"<figure><img src=\"{html.escape(section.image)}\" alt=\"{html.escape(section.alt)}\"{css}>"
            f"<figcaption>{section.caption}</figcaption></figure>"
        )
    elif section.caption:
        parts.append(f"<p>{section.caption}</p>")
    if section.rows:
        parts.append(_table(section.rows))
    return "\n".join(parts)


def render_page(title, subtitle, verdict, verdict_kind, sections):
    """The whole page as a string; ``verdict_kind`` is ``used``, ``collapsed`` or ``unknown``."""
    body = "\n".join(_section(section) for section in sections)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{html.escape(title)}</title>
<style>{STYLE}</style>
</head>
<body>
<h1>{html.escape(title)}</h1>
<p class="subtitle">{html.escape(subtitle)}</p>
<p class="verdict {verdict_kind}">{html.escape(verdict)}</p>
{body}
</body>
</html>
"""
