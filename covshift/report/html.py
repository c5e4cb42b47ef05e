"""The report as one self-contained HTML page, rendered from its Markdown with every figure
embedded and every name escaped.

The Markdown is rendered by markdown-it-py (CommonMark with tables, raw HTML off, so a name
holding ``<script>`` stays text). Each image whose source is one of the report's figures gets
its PNG as a ``data:`` URI; a paragraph made only of such images becomes ``<figure>`` elements
captioned by their alt text. Any other image is rendered as written.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path

from markdown_it import MarkdownIt
from markdown_it.renderer import RendererHTML
from markdown_it.token import Token
from markdown_it.utils import EnvType, OptionsDict

STYLE = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
         "img{max-width:100%}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;"
         "text-align:left;vertical-align:top}code{background:#f3f3f3;padding:0 3px}")


def _image(self: RendererHTML, tokens: Sequence[Token], idx: int, options: OptionsDict, env: EnvType) -> str:
    """The default ``<img>``, inside a captioned ``<figure>`` when the token is marked as one."""
    img = RendererHTML.image(self, tokens, idx, options, env)
    if not tokens[idx].meta.get("figure"):
        return img
    caption = html.escape(str(tokens[idx].attrGet("alt") or ""))
    return f"<figure>{img}<figcaption>{caption}</figcaption></figure>"


def _renderer() -> MarkdownIt:
    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    md.add_render_rule("image", _image)
    return md


_MD = _renderer()


def _embed(tokens: list[Token], figures: dict[str, Path]) -> None:
    """Point each image of ``tokens`` that names a figure at its PNG, inline; a paragraph of
    nothing but such images loses its ``<p>`` and shows them as figures."""
    # the parser percent-encodes link targets; match the figure names as it wrote them
    by_src = {_MD.normalizeLink(name): path for name, path in figures.items()}
    by_src.update(figures)
    for i, token in enumerate(tokens):
        if token.type != "inline" or not token.children:
            continue
        embedded = []
        for child in token.children:
            src = child.attrGet("src") if child.type == "image" else None
            if isinstance(src, str) and src in by_src:
                data = base64.b64encode(by_src[src].read_bytes()).decode("ascii")
                child.attrSet("src", f"data:image/png;base64,{data}")
                embedded.append(child)
        only_figures = embedded and all(
            c in embedded or c.type == "softbreak" or (c.type == "text" and not c.content.strip())
            for c in token.children)
        if only_figures and 0 < i < len(tokens) - 1 and tokens[i - 1].type == "paragraph_open":
            tokens[i - 1].hidden = tokens[i + 1].hidden = True
            for child in embedded:
                child.meta["figure"] = True


def to_html(md: str, figures: dict[str, Path]) -> str:
    """A self-contained HTML page from :func:`markdown`'s output, figures embedded.

    >>> page = to_html("# Runs\\n\\n- `<b> & $x`\\n", {})
    >>> "<h1>Runs</h1>" in page and "<li><code>&lt;b&gt; &amp; $x</code></li>" in page
    True
    """
    tokens = _MD.parse(md)
    _embed(tokens, figures)
    body = _MD.renderer.render(tokens, _MD.options, {})
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>covshift report</title>'
            f"<style>{STYLE}</style></head><body>\n" + body + "</body></html>\n")
