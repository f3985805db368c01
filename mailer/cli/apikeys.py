"""``mailer apikey create|ls|revoke``."""

from typing import Annotated

import typer

from mailer.cli.output import AsJson, print_json, print_table, run, say, when

app = typer.Typer(help="API keys for other services.", no_args_is_help=True)


@app.command("create")
def create(name: Annotated[str, typer.Argument(help="What the key is for.")]) -> None:
    """Create a key and print it once; only its hash is stored."""
    key = run(lambda m: m.api_keys.create(name))
    say(key)


@app.command("ls")
def ls(as_json: AsJson = False) -> None:
    """Show the keys (names and prefixes only)."""
    keys = run(lambda m: m.api_keys.all())
    if as_json:
        print_json(
            [
                {
                    "name": k.name,
                    "prefix": k.prefix,
                    "created_at": k.created_at,
                    "revoked_at": k.revoked_at,
                }
                for k in keys
            ]
        )
        return
    print_table(
        None,
        ["name", "prefix", "created", "revoked"],
        [(k.name, k.prefix + "…", when(k.created_at), when(k.revoked_at)) for k in keys],
    )


@app.command("revoke")
def revoke(name: str) -> None:
    """Revoke a key: the very next request with it gets 401."""
    run(lambda m: m.api_keys.revoke(name))
    say(f"revoked API key {name}")
