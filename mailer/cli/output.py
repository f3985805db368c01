"""Printing: Rich tables for people, ``--json`` for programs, one-line errors on stderr."""

import asyncio
import getpass
import json
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from mailer.bootstrap import Mailer, open_mailer
from mailer.config import load_settings
from mailer.domain.ledger import Evidence
from mailer.statuses import Channel

T = TypeVar("T")
console = Console(highlight=False, soft_wrap=True)

JSON_HELP = "Print JSON only."
AsJson = Annotated[bool, typer.Option("--json", help=JSON_HELP)]


def run(action: Callable[[Mailer], Awaitable[T]]) -> T:
    """Load the settings, open a mailer (no sender), run ``action`` on it."""
    settings = load_settings()

    async def go() -> T:
        async with open_mailer(settings) as mailer:
            return await action(mailer)

    return asyncio.run(go())


def staff_evidence(channel: Channel = Channel.CLI) -> Evidence:
    """Evidence for an act done by staff on the command line: who ran it."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return Evidence(channel=channel.value, actor=f"cli:{user}")


def _default(value: object) -> object:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"cannot encode {type(value).__name__}")


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False, default=_default) + "\n")


def when(value: datetime | None) -> str:
    return "" if value is None else value.strftime("%Y-%m-%d %H:%M:%S UTC")


def print_table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*("" if v is None else str(v) for v in row))
    console.print(table)


def say(message: str) -> None:
    console.print(message, markup=False)


def fail_line(message: str) -> None:
    """One error line on stderr, in the same form as every other CLI error."""
    sys.stderr.write(f"mailer: error: {message}\n")
