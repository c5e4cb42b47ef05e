"""The report as one self-contained HTML page, rendered from its Markdown with every figure
embedded and every name escaped.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path


def _inline(text: str) -> str:
    """Escaped HTML of one Markdown line, with `code`, **bold** and [links](url) rendered."""
    parts = re.split(r"(`+ ?.+? ?`+|\*\*.+?\*\*|\[[^\]`]+\]\([^)\s]+\))", text)
    rendered = []
    for part in parts:
        link = re.fullmatch(r"\[([^\]`]+)\]\(([^)\s]+)\)", part)
        if link:
            rendered.append(f'<a href="{html.escape(link.group(2))}">{html.escape(link.group(1))}</a>')
        elif part.startswith("`"):
            rendered.append(f"<code>{html.escape(part.strip('`').strip())}</code>")
        elif part.startswith("**") and part.endswith("**") and len(part) > 4:
            rendered.append(f"<strong>{html.escape(part[2:-2])}</strong>")
        else:
            rendered.append(html.escape(part))
    return "".join(rendered)


def to_html(md: str, figures: dict[str, Path]) -> str:
    """A self-contained HTML page from :func:`markdown`'s output, figures embedded."""
    body: list[str] = []
    open_block = ""  # "ul" or "table" while one is open
    for line in md.splitlines():
        block = "ul" if line.startswith("- ") else "table" if line.startswith("|") else ""
        if open_block and block != open_block:
            body.append(f"</{open_block}>")
            open_block = ""
        if block and not open_block:
            body.append(f"<{block}>")
            open_block = block
        image = re.fullmatch(r"!\[(.+)\]\((.+)\)", line)
        if line.startswith("# "):
            body.append(f"<h1>{_inline(line[2:])}</h1>")
        elif line.startswith("## "):
            body.append(f"<h2>{_inline(line[3:])}</h2>")
        elif block == "ul":
            body.append(f"<li>{_inline(line[2:])}</li>")
        elif block == "table" and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            tag = "th" if cells[0] == "claim" else "td"
            body.append("<tr>" + "".join(f"<{tag}>{_inline(c)}</{tag}>" for c in cells) + "</tr>")
        elif image and image.group(2) in figures:
            data = base64.b64encode(figures[image.group(2)].read_bytes()).decode("ascii")
            body.append(f'<figure><img alt="{html.escape(image.group(1))}" src="data:image/png;base64,{data}">'
                        f"<figcaption>{html.escape(image.group(1))}</figcaption></figure>")
        elif line and not block:
            body.append(f"<p>{_inline(line)}</p>")
    if open_block:
        body.append(f"</{open_block}>")
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
             "img{max-width:100%}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;"
             "text-align:left;vertical-align:top}code{background:#f3f3f3;padding:0 3px}")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>covshift report</title>'
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
