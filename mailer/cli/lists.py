"""``mailer list create|ls``."""

from typing import Annotated

import typer

from mailer.cli.output import AsJson, print_json, print_table, run, say

app = typer.Typer(help="Mailing lists.", no_args_is_help=True)


@app.command("create")
def create(
    slug: Annotated[str, typer.Argument(help="Short handle, e.g. 'news'.")],
    name: Annotated[str, typer.Option("--name", help="Name shown to subscribers.")],
    description: Annotated[str, typer.Option("--description")] = "",
    from_addr: Annotated[str | None, typer.Option("--from", help="From address.")] = None,
) -> None:
    """Create a list."""
    row = run(lambda m: m.lists.create(slug, name, description, from_addr))
    say(f"created list {row.slug} ({row.name})")


@app.command("ls")
def ls(as_json: AsJson = False) -> None:
    """Show every list with its subscriber counts."""
    summaries = run(lambda m: m.lists.summaries())
    if as_json:
        print_json(
            [
                {
                    "slug": s.list.slug,
                    "name": s.list.name,
                    "description": s.list.description,
                    "from": s.list.from_addr,
                    "subscriptions": s.counts,
                }
                for s in summaries
            ]
        )
        return
    print_table(
        None,
        ["slug", "name", "confirmed", "pending", "unsubscribed", "from"],
        [
            (
                s.list.slug,
                s.list.name,
                s.counts["confirmed"],
                s.counts["pending"],
                s.counts["unsubscribed"],
                s.list.from_addr or "(default)",
            )
            for s in summaries
        ],
    )
