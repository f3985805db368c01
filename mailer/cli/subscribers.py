"""``mailer subscriber add|show|export|erase|unsubscribe|import``."""

import sys
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from mailer.bootstrap import Mailer
from mailer.cli.output import (
    AsJson,
    print_json,
    print_table,
    run,
    say,
    staff_evidence,
    when,
)
from mailer.domain.consent import OptInOutcome
from mailer.services.importing import ImportReport, RowResult
from mailer.services.people import person_json
from mailer.statuses import Channel

app = typer.Typer(
    help="Subscribers: add, import, look up, export, unsubscribe.", no_args_is_help=True
)

_ADD_MESSAGES = {
    OptInOutcome.REQUESTED: "confirmation request queued for {email}; the worker sends it",
    OptInOutcome.ALREADY_CONFIRMED: "{email} is already subscribed; nothing sent",
    OptInOutcome.RECENTLY_REQUESTED: (
        "{email} was sent a confirmation request for this list recently; nothing sent"
    ),
    OptInOutcome.DAILY_CAP: "{email} reached today's limit of confirmation requests; nothing sent",
    OptInOutcome.SUPPRESSED: (
        "{email} is suppressed (bounce, complaint or manual); nothing sent. "
        "See `mailer suppression ls`"
    ),
}


@app.command("add")
def add(
    email: str,
    list_slug: Annotated[str, typer.Option("--list", help="The list's slug.")],
    name: Annotated[str | None, typer.Option("--name")] = None,
) -> None:
    """Send a double opt-in confirmation request (nobody is subscribed without confirming)."""
    outcome = run(lambda m: m.consent.request_opt_in(email, list_slug, name, staff_evidence()))
    say(_ADD_MESSAGES[outcome].format(email=email.strip()))
    if outcome is OptInOutcome.SUPPRESSED:
        raise typer.Exit(1)


@app.command("show")
def show(email: str, as_json: AsJson = False) -> None:
    """Show one person's subscriptions and suppression."""
    person = run(lambda m: m.people.show(email))
    if as_json:
        print_json(person_json(person))
        return
    say(
        f"{person.email}"
        + (f" ({person.subscriber.name})" if person.subscriber and person.subscriber.name else "")
    )
    say(f"suppressed: {person.suppression or 'no'}")
    print_table(
        None,
        ["list", "status", "since", "confirmed"],
        [
            (s.list_slug, s.status, when(s.updated_at), when(s.confirmed_at))
            for s in person.subscriptions
        ],
    )


@app.command("export")
def export(email: str) -> None:
    """Print, as JSON, everything held on one person (the export is recorded in the ledger)."""
    data = run(lambda m: m.people.export(email, staff_evidence()))
    print_json(data)
    if data["erased"]:
        sys.stderr.write(f"mailer: note: {data['note']}\n")


@app.command("erase")
def erase(
    email: str,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
    as_json: AsJson = False,
) -> None:
    """Delete all data on a person, captured mail included; only the keyed suppression hash
    remains."""
    if not yes:
        typer.confirm(f"Erase every record of {email.strip()}?", abort=True)
    done = run(lambda m: m.people.erase(email, staff_evidence()))
    if as_json:
        print_json(asdict(done))
        return
    if done.already_erased:
        say(f"{email.strip()} was already erased: only its suppression hash is held")
        return
    say(
        f"erased {email.strip()}: {done.subscriptions} subscription(s), "
        f"{done.deliveries} delivery record(s), {done.captured_files} captured message(s); "
        f"IP and user agent blanked on {done.ledger_entries} ledger entr"
        f"{'y' if done.ledger_entries == 1 else 'ies'}; only its suppression hash is kept "
        f"({done.suppression})"
    )


@app.command("unsubscribe")
def unsubscribe(
    email: str,
    list_slug: Annotated[
        str | None, typer.Option("--list", help="Only this list (default: every list).")
    ] = None,
) -> None:
    """Unsubscribe now, from one list or from everything."""
    run(lambda m: m.consent.unsubscribe_address(email, list_slug, staff_evidence()))
    say(f"unsubscribed {email.strip()} from " + (list_slug or "every list"))


_IMPORT_LABELS = {
    RowResult.NEW: "new: confirmation request queued",
    RowResult.ALREADY_CONFIRMED: "already subscribed: nothing sent",
    RowResult.ALREADY_PENDING: "already pending (asked before): nothing sent",
    RowResult.RATE_LIMITED: "rate-limited (resend window, daily cap): import again later",
    RowResult.UNSUBSCRIBED_FROM_LIST: "unsubscribed from this list: skipped",
    RowResult.SUPPRESSED: "suppressed: skipped",
    RowResult.DUPLICATE: "duplicates in the file",
    RowResult.INVALID: "invalid",
}
INVALID_SHOWN = 10


@app.command("import")
def import_csv(
    file: Annotated[Path, typer.Argument(help="CSV: email[,name]; a header row is optional.")],
    list_slug: Annotated[str, typer.Option("--list", help="The list's slug.")],
    as_json: AsJson = False,
) -> None:
    """Import addresses: each new one gets a confirmation request; nobody is subscribed.

    Suppressed addresses (for any reason) and people who left the list are skipped; a
    re-run sends nothing twice.
    """
    evidence = staff_evidence(Channel.IMPORT)
    err = Console(stderr=True, highlight=False)

    async def go(m: Mailer) -> ImportReport:
        if as_json or not err.is_terminal:
            return await m.imports.import_csv(file, list_slug, evidence)
        with err.status("importing") as status:
            return await m.imports.import_csv(
                file,
                list_slug,
                evidence,
                progress=lambda r: status.update(f"importing: {r.rows:,} rows read"),
            )

    report = run(go)
    if as_json:
        print_json(report.as_json())
        return
    print_table(
        f"import of {file} into {list_slug}: {report.rows:,} rows",
        ["rows", "count"],
        [(label, f"{report.counts[kind]:,}") for kind, label in _IMPORT_LABELS.items()],
    )
    if report.counts[RowResult.SUPPRESSED]:
        by_reason = ", ".join(f"{r} {n:,}" for r, n in report.suppressed_by_reason.items() if n)
        say(f"suppressed by reason: {by_reason}")
    invalid = report.counts[RowResult.INVALID]
    if invalid:
        shown = report.invalid_rows(INVALID_SHOWN)
        more = f" (first {len(shown)}; --json lists all)" if invalid > len(shown) else ""
        say(f"invalid rows{more}:")
        for line, reason in shown:
            say(f"  line {line}: {reason}")
    if report.counts[RowResult.NEW]:
        say("the worker (`mailer serve` or `mailer worker`) sends the confirmation requests")
