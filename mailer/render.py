"""Jinja2 rendering of email bodies and web pages (autoescaped, strict about undefined names)."""

from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

from mailer.domain.compose import Rendered


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

    def email(self, name: str, subject: str, context: dict[str, Any]) -> Rendered:
        """Render ``email/<name>.txt.j2`` and ``email/<name>.html.j2`` with the footer values."""
        values = {**self._footer, **context, "subject": subject}
        text = self._env.get_template(f"email/{name}.txt.j2").render(values)
        html = self._env.get_template(f"email/{name}.html.j2").render(values)
        return Rendered(subject=subject, text=text, html=html)

    def page(self, name: str, context: dict[str, Any]) -> str:
        """Render ``web/<name>.html.j2``."""
        return self._env.get_template(f"web/{name}.html.j2").render({**self._footer, **context})
