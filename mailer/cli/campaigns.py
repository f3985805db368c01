"""``mailer campaign create|preview|audience|ls|status|schedule|send|pause|resume|cancel``."""

import asyncio
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from mailer.bootstrap import Mailer, open_mailer
from mailer.cli.output import AsJson, console, print_json, print_table, run, say, when
from mailer.config import load_settings
from mailer.errors import InvalidInput
from mailer.services.campaigns import Report
from mailer.statuses import CampaignStatus

app = typer.Typer(help="Campaigns: newsletters to a list.", no_args_is_help=True)
DONE = {CampaignStatus.SENT.value, CampaignStatus.CANCELLED.value}
ID = Annotated[int, typer.Argument(help="The campaign id (see `mailer campaign ls`).")]


def _read_body(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InvalidInput(f"{path} is not UTF-8 text") from None


@app.command("create")
def create(
    list_slug: Annotated[str, typer.Option("--list", help="The list's slug.")],
    subject: Annotated[str, typer.Option("--subject")],
    body: Annotated[Path, typer.Option("--body", help="A Markdown file.")],
    template: Annotated[str, typer.Option("--template", help="templates/email/NAME")] = "campaign",
) -> None:
    """Create a draft campaign from a Markdown file; prints its id."""
    text = _read_body(body)
    campaign_id = run(lambda m: m.campaigns.create(list_slug, subject, text, template))
    say(str(campaign_id))


@app.command("preview")
def preview(
    campaign_id: ID,
    to: Annotated[
        str | None,
        typer.Option("--to", help="Send one real copy to this confirmed subscriber."),
    ] = None,
) -> None:
    """Print the message as a subscriber gets it, or send one copy to a test subscriber."""
    if to is None:

        async def sample(m: Mailer) -> bytes:
            return m.campaigns.sample(await m.campaigns.get(campaign_id))

        sys.stdout.write(run(sample).decode("utf-8", errors="replace"))
        return
    run(lambda m: m.campaigns.preview_to(campaign_id, to))
    say(f"preview queued for {to.strip()}; the worker sends it")


@app.command("audience")
def audience(campaign_id: ID, as_json: AsJson = False) -> None:
    """Who would receive the campaign now, and who would not, by reason."""
    counts = run(lambda m: m.campaigns.audience(campaign_id))
    if as_json:
        print_json(counts)
        return
    will = counts.pop("will-receive", 0)
    others = ", ".join(f"{n:,} {reason}" for reason, n in sorted(counts.items()) if n)
    say(f"{will:,} will get it" + (f"; not: {others}" if others else ""))


@app.command("ls")
def ls(as_json: AsJson = False) -> None:
    """Show every campaign."""
    rows = run(lambda m: m.campaigns.all())
    if as_json:
        print_json(
            [
                {
                    "id": c.id,
                    "list": c.list_slug,
                    "subject": c.subject,
                    "status": c.status,
                    "scheduled_at": c.scheduled_at,
                    "created_at": c.created_at,
                }
                for c in rows
            ]
        )
        return
    print_table(
        None,
        ["id", "list", "subject", "status", "scheduled", "created"],
        [
            (c.id, c.list_slug, c.subject, c.status, when(c.scheduled_at), when(c.created_at))
            for c in rows
        ],
    )


def _show(report: Report) -> None:
    c = report.campaign
    say(f"campaign {c.id} to {c.list_slug}: {c.subject!r} is {c.status}")
    print_table(None, ["state", "messages"], sorted(report.states.items()))
    if report.reasons:
        print_table(None, ["why", "messages"], sorted(report.reasons.items()))


@app.command("status")
def status(campaign_id: ID, as_json: AsJson = False) -> None:
    """Counts per state and per failure reason."""
    report = run(lambda m: m.campaigns.report(campaign_id))
    if as_json:
        print_json(report.as_json())
    else:
        _show(report)


@app.command("schedule")
def schedule(
    campaign_id: ID,
    at: Annotated[
        str, typer.Option("--at", help="ISO 8601 with an offset: 2026-12-01T09:00+01:00")
    ],
) -> None:
    """Send at a given time (the worker starts it)."""
    try:
        moment = datetime.fromisoformat(at)
    except ValueError:
        raise InvalidInput(f"--at {at!r} is not an ISO 8601 time") from None
    run(lambda m: m.campaigns.schedule(campaign_id, moment))
    say(f"campaign {campaign_id} scheduled for {moment.isoformat()}")


@app.command("send")
def send(
    campaign_id: ID,
    wait: Annotated[bool, typer.Option("--wait", help="Show progress until it is done.")] = False,
) -> None:
    """Start sending now. The worker in `mailer serve` or `mailer worker` does the sending."""
    run(lambda m: m.campaigns.send(campaign_id))
    say(f"campaign {campaign_id} is sending")
    if wait:
        _follow(campaign_id)


def _follow(campaign_id: int) -> None:
    settings = load_settings()

    async def go() -> Report:
        async with open_mailer(settings) as m:
            columns = (
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[detail]}"),
                TimeRemainingColumn(),
            )
            with Progress(*columns, console=console, transient=False) as bar:
                task = bar.add_task(f"campaign {campaign_id}", total=None, detail="")
                started = time.monotonic()
                while True:
                    report = await m.campaigns.report(campaign_id)
                    s = report.states
                    finished = s["sent"] + s["failed"] + s["skipped"] + s["unknown"]
                    rate = s["sent"] / max(time.monotonic() - started, 0.001)
                    total = sum(s.values()) if report.campaign.fanout_done else None
                    detail = (
                        f"sent {s['sent']:,} failed {s['failed'] + s['unknown']:,} "
                        f"skipped {s['skipped']:,}  {rate:,.0f}/s"
                    )
                    bar.update(task, completed=finished, total=total, detail=detail)
                    if report.campaign.status in DONE:
                        return report
                    await asyncio.sleep(0.5)

    try:
        report = asyncio.run(go())
    except KeyboardInterrupt:
        say(f"stopped watching; campaign {campaign_id} keeps sending")
        return
    _show(report)


@app.command("pause")
def pause(campaign_id: ID) -> None:
    """Stop handing off messages; no claim happens after this returns."""
    run(lambda m: m.campaigns.pause(campaign_id))
    say(f"campaign {campaign_id} paused")


@app.command("resume")
def resume(campaign_id: ID) -> None:
    """Carry on with a paused campaign."""
    run(lambda m: m.campaigns.resume(campaign_id))
    say(f"campaign {campaign_id} resumed")


@app.command("cancel")
def cancel(campaign_id: ID) -> None:
    """Stop for good; messages not yet handed off are reported skipped."""
    skipped = run(lambda m: m.campaigns.cancel(campaign_id))
    say(f"campaign {campaign_id} cancelled; {skipped:,} messages will not be sent")
