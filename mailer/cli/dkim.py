"""``mailer dkim keygen``: make a DKIM signing key and print the DNS record to publish."""

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from mailer.domain.dns_advice import dkim_record
from mailer.errors import Conflict, InvalidInput
from mailer.transport.dkim import key_from_pem, new_private_key

app = typer.Typer(help="DKIM signing keys.", no_args_is_help=True)


@app.command("keygen")
def keygen(
    selector: Annotated[str, typer.Option("--selector", help="DNS selector, e.g. mail2026")],
    algorithm: Annotated[str, typer.Option("--algorithm", help="rsa (2048 bits) or ed25519")] = (
        "rsa"
    ),
    domain: Annotated[
        str | None,
        typer.Option("--domain", envvar="MAILER_DKIM_DOMAIN", help="Signing domain (d=)"),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Private key file (default var/dkim-SELECTOR.pem)")
    ] = None,
) -> None:
    """Write a new private key (mode 0600) and print the TXT record to publish for it."""
    if algorithm not in ("rsa", "ed25519"):
        raise InvalidInput(f"--algorithm {algorithm!r}: use rsa or ed25519")
    if not selector.replace("-", "").replace(".", "").isalnum():
        raise InvalidInput(f"--selector {selector!r}: use letters, digits, '-' and '.'")
    path = out or Path(os.environ.get("MAILER_VAR_DIR", "var")) / f"dkim-{selector}.pem"
    pem = new_private_key(algorithm)
    record = key_from_pem(pem, selector).public_record
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise Conflict(f"{path} exists; choose another --out or selector") from None
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    sys.stdout.write(dkim_record(selector, domain or "DOMAIN", record).zone_line() + "\n")
    sys.stderr.write(
        f"wrote {path} (mode 600). Publish the record above, then set "
        f"MAILER_DKIM_SELECTOR={selector} MAILER_DKIM_KEY_FILE={path}"
        f"{'' if domain else ' MAILER_DKIM_DOMAIN=<your domain>'}\n"
    )
