"""The ``mailer`` entry point: wires the noun groups and turns every error into one line."""

import os
import sys
import traceback

import typer
from sqlalchemy.exc import SQLAlchemyError

from mailer.cli import (
    apikeys,
    campaigns,
    dkim,
    doctor,
    ledger,
    lists,
    policy,
    server,
    subscribers,
    suppression,
)
from mailer.cli.output import fail_line
from mailer.errors import MailerError

app = typer.Typer(
    help="mailer: mailing lists with guaranteed opt-out.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
app.command("init")(server.init)
app.command("serve")(server.serve)
app.command("worker")(server.worker)
app.command("inbound")(server.inbound)
app.add_typer(server.db_app, name="db")
app.command("doctor")(doctor.doctor)
app.add_typer(lists.app, name="list")
app.add_typer(apikeys.app, name="apikey")
app.add_typer(subscribers.app, name="subscriber")
app.add_typer(suppression.app, name="suppression")
app.add_typer(ledger.app, name="ledger")
app.add_typer(campaigns.app, name="campaign")
app.add_typer(policy.app, name="policy")
app.add_typer(dkim.app, name="dkim")


def _fail(message: str, code: int = 1) -> int:
    fail_line(message)
    return code


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return the exit code. Errors never print a traceback (set MAILER_DEBUG=1)."""
    try:
        result = app(args=argv, standalone_mode=False, prog_name="mailer")
    except typer.Abort:
        return _fail("aborted", 130)
    except typer.TyperException as exc:  # usage errors: unknown verb, missing option, ...
        code = exc.exit_code
        hint = " (see `mailer --help`)" if code == 2 else ""
        return _fail(exc.format_message().rstrip(".") + hint, code)
    except MailerError as exc:
        return _fail(exc.message)
    except SQLAlchemyError as exc:
        return _fail(f"database: {exc.__class__.__name__}: {str(exc).splitlines()[0]}")
    except OSError as exc:
        return _fail(f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""))
    except Exception as exc:
        if os.environ.get("MAILER_DEBUG"):
            traceback.print_exc()
        return _fail(f"unexpected {type(exc).__name__}: {exc}")
    return result if isinstance(result, int) else 0


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    run()
