"""Jinja2 rendering of email bodies and web pages (autoescaped, strict about undefined names)."""

from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from markdown_it import MarkdownIt
from markdown_it.rules_core import StateCore
from markdown_it.token import Token

from mailer.domain.compose import Rendered

INLINE_STYLES = {
    "heading_open": "margin:24px 0 12px;line-height:1.3;color:#1a1a1a;",
    "paragraph_open": "margin:0 0 16px;",
    "link_open": "color:#1a4fa0;",
    "bullet_list_open": "margin:0 0 16px;padding-left:24px;",
    "ordered_list_open": "margin:0 0 16px;padding-left:24px;",
    "blockquote_open": (
        "margin:0 0 16px;padding-left:12px;border-left:3px solid #dddddd;color:#555555;"
    ),
    "code_inline": "font-family:monospace;background:#f0f0f0;padding:0 3px;",
    "fence": "font-family:monospace;background:#f0f0f0;padding:12px;overflow:auto;",
    "code_block": "font-family:monospace;background:#f0f0f0;padding:12px;overflow:auto;",
}
"""Mail clients drop <style> blocks, so each element the Markdown produces carries its CSS."""


def _inline_styles(state: StateCore) -> None:
    stack: list[Token] = list(state.tokens)
    while stack:
        token = stack.pop()
        style = INLINE_STYLES.get(token.type)
        if style:
            token.attrSet("style", style)
        if token.children:
            stack.extend(token.children)


def markdown_renderer() -> MarkdownIt:
    """CommonMark with raw HTML turned off: the body is data, it cannot inject markup."""
    md = MarkdownIt("commonmark", {"html": False, "linkify": False, "typographer": False})
    md.core.ruler.push("inline_styles", _inline_styles)
    return md


class Renderer:
    """Renders ``templates/email/*`` into message parts and ``templates/web/*`` into pages."""

    def __init__(self, templates_dir: Path, footer: dict[str, str]) -> None:
        self._env = Environment(
            loader=FileSystemLoader(str(templates_dir)),
            autoescape=select_autoescape(enabled_extensions=("html", "html.j2")),
            undefined=StrictUndefined,
            keep_trailing_newline=True,
            auto_reload=False,
        )
        self._footer = footer
        self._markdown = markdown_renderer()

    def markdown(self, body: str) -> str:
        """Render a Markdown body to HTML with inline styles."""
        html: str = self._markdown.render(body)
        return html

    def email(self, name: str, subject: str, context: dict[str, Any]) -> Rendered:
        """Render ``email/<name>.txt.j2`` and ``email/<name>.html.j2`` with the footer values."""
        values = {**self._footer, **context, "subject": subject}
        text = self._env.get_template(f"email/{name}.txt.j2").render(values)
        html = self._env.get_template(f"email/{name}.html.j2").render(values)
        return Rendered(subject=subject, text=text, html=html)

    def has_email(self, name: str) -> bool:
        """Whether both parts of ``email/<name>`` exist."""
        known = set(self._env.list_templates())
        return {f"email/{name}.txt.j2", f"email/{name}.html.j2"} <= known

    def page(self, name: str, context: dict[str, Any]) -> str:
        """Render ``web/<name>.html.j2``."""
        return self._env.get_template(f"web/{name}.html.j2").render({**self._footer, **context})
