"""``mailer suppression ls|add|remove``."""

import typer

from mailer.cli.output import AsJson, print_json, print_table, run, say, staff_evidence, when

app = typer.Typer(help="The suppression list: addresses that get no mail.", no_args_is_help=True)


@app.command("ls")
def ls(as_json: AsJson = False) -> None:
    """Show suppressions; erased people appear only as their keyed hash."""
    rows = run(lambda m: m.people.suppressions())
    if as_json:
        print_json(
            [
                {"email": r.email, "hash": r.email_hash, "reason": r.reason, "since": r.created_at}
                for r in rows
            ]
        )
        return
    print_table(
        None,
        ["address", "reason", "since"],
        [(r.email or f"(erased) {r.email_hash[:12]}…", r.reason, when(r.created_at)) for r in rows],
    )


@app.command("add")
def add(email: str) -> None:
    """Suppress an address (reason: manual). No mail goes to it until removed."""
    changed = run(lambda m: m.people.suppress(email, staff_evidence()))
    say(f"suppressed {email.strip()}" if changed else f"{email.strip()} was already suppressed")


@app.command("remove")
def remove(email: str) -> None:
    """Lift a bounce, complaint or manual suppression (not a person's own unsubscribe)."""
    reason = run(lambda m: m.people.lift(email, staff_evidence()))
    say(f"lifted the {reason} suppression of {email.strip()}")
