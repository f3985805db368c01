"""``mailer subscriber add|show|export|erase|unsubscribe``."""

from typing import Annotated

import typer

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
from mailer.services.people import person_json

app = typer.Typer(help="Subscribers: add, look up, export, unsubscribe.", no_args_is_help=True)

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
    """Print, as JSON, everything held on one person."""
    print_json(run(lambda m: m.people.export(email)))


@app.command("erase")
def erase(
    email: str,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete all data on a person; only the keyed suppression hash remains."""
    if not yes:
        typer.confirm(f"Erase every record of {email.strip()}?", abort=True)
    run(lambda m: m.people.erase(email, staff_evidence()))
    say(f"erased {email.strip()}; only its suppression hash is kept")


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
