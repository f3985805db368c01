"""``mailer policy publish|ls``."""

from datetime import date
from pathlib import Path
from typing import Annotated

import typer

from mailer.cli.output import AsJson, print_json, print_table, run, say, when
from mailer.errors import InvalidInput

app = typer.Typer(help="Privacy-policy versions and their announcements.", no_args_is_help=True)


@app.command("publish")
def publish(
    version: Annotated[str, typer.Option("--version", help="e.g. 2026-12")],
    effective: Annotated[str, typer.Option("--effective", help="YYYY-MM-DD, today or later")],
    summary: Annotated[Path, typer.Option("--summary", help="Markdown file: what changes")],
    url: Annotated[str | None, typer.Option("--url", help="Where the full policy is")] = None,
) -> None:
    """Record a new version and announce it once to every person with a confirmed subscription."""
    try:
        effective_on = date.fromisoformat(effective)
    except ValueError:
        raise InvalidInput(f"--effective {effective!r} is not a date (YYYY-MM-DD)") from None
    try:
        text = summary.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InvalidInput(f"{summary} is not UTF-8 text") from None
    published = run(lambda m: m.policy.publish(version, effective_on, text, url))
    say(
        f"published policy {published.version}; announcement is campaign "
        f"{published.campaign_id} (follow it with `mailer campaign status "
        f"{published.campaign_id}`)"
    )


@app.command("ls")
def ls(as_json: AsJson = False) -> None:
    """Every published version, oldest first."""
    rows = run(lambda m: m.policy.history())
    if as_json:
        print_json(
            [
                {
                    "version": r.version,
                    "effective_on": r.effective_on.isoformat(),
                    "published_at": r.published_at,
                    "url": r.url,
                    "announcement_campaign": r.campaign_id,
                }
                for r in rows
            ]
        )
        return
    print_table(
        None,
        ["version", "effective", "published", "announcement", "url"],
        [
            (r.version, r.effective_on.isoformat(), when(r.published_at), r.campaign_id, r.url)
            for r in rows
        ],
    )
