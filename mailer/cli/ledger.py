"""``mailer ledger verify``."""

import typer

from mailer.cli.output import AsJson, fail_line, print_json, run, say
from mailer.services.ledger import verify as verify_chain

app = typer.Typer(help="The consent ledger.", no_args_is_help=True)


@app.command("verify")
def verify(as_json: AsJson = False) -> None:
    """Check the hash chain; exit non-zero on the first broken entry."""
    result = run(lambda m: verify_chain(m.db))
    problem = result.problem
    if as_json:
        print_json(
            {
                "ok": problem is None,
                "entries": result.entries,
                "broken_at": None if problem is None else problem.seq,
                "problem": None if problem is None else problem.problem,
            }
        )
    elif problem is None:
        say(f"ledger ok: {result.entries} entries, chain intact")
    else:
        fail_line(f"ledger BROKEN at entry {problem.seq}: {problem.problem}")
    if problem is not None:
        raise typer.Exit(1)
