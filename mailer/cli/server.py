"""``mailer init``, ``db upgrade``, ``serve``, ``worker`` and ``inbound``: set-up and services."""

import asyncio
import contextlib
import logging
import signal
from collections.abc import Coroutine
from typing import Annotated, Any

import typer
from aiohttp import web

from mailer.bootstrap import Mailer, open_mailer
from mailer.cli.output import say
from mailer.config import Settings, load_settings
from mailer.errors import ConfigError
from mailer.services.setup import initialise
from mailer.store import migrate
from mailer.store.db import open_database
from mailer.web.app import RedactingAccessLogger, create_app, create_ops_app

db_app = typer.Typer(help="Database schema.", no_args_is_help=True)


def _run_service(main: Coroutine[Any, Any, None]) -> None:
    """Run a long-lived service on uvloop where available (about 10% more messages/s here)."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("aiosmtpd").setLevel(logging.WARNING)
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("flufl.bounce").setLevel(logging.CRITICAL)  # mailer.inbound logs its errors


async def _until_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def init() -> None:
    """Create var/, the database schema and a secret key. Safe to run again."""
    settings = load_settings()

    async def go() -> None:
        db = open_database(settings.database_url)
        try:
            report = await initialise(settings, db)
        finally:
            await db.close()
        if report.created_key_file:
            say(f"created a secret key in {settings.secret_keys_file}")
        if report.revision_before != report.revision_after:
            say(f"database schema at revision {report.revision_after}")
        say("mailer is initialised")

    asyncio.run(go())


@db_app.command("upgrade")
def upgrade() -> None:
    """Apply pending database migrations."""
    settings = load_settings()

    async def go() -> None:
        db = open_database(settings.database_url)
        try:
            before, after = await migrate.upgrade(db)
        finally:
            await db.close()
        say(
            f"schema already current ({after})"
            if before == after
            else f"schema {before} -> {after}"
        )

    asyncio.run(go())


def _say_listening(mailer: Mailer) -> None:
    if mailer.listener is not None:
        say(
            f"inbound mail for {mailer.settings.inbound_domain} on "
            f"{mailer.listener.host}:{mailer.listener.port}"
        )


async def _serve(settings: Settings, host: str, port: int, worker: bool) -> None:
    async with open_mailer(settings, sending=worker, listening=True) as mailer:
        runner = web.AppRunner(create_app(mailer), access_log_class=RedactingAccessLogger)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
            where = f"http://{host}:{port}"
            say(f"mailer serving on {where}" + ("" if worker else " (no worker)"))
            if mailer.capture is not None:
                say(f"no SMTP relay set: mail is captured in {mailer.capture.path}/")
            _say_listening(mailer)
            await _until_signal()
        finally:
            await runner.cleanup()


def serve(
    host: Annotated[str | None, typer.Option("--host", help="Default: MAILER_HTTP_HOST.")] = None,
    port: Annotated[int | None, typer.Option("--port", help="Default: MAILER_HTTP_PORT.")] = None,
    no_worker: Annotated[bool, typer.Option("--no-worker", help="HTTP only, no sending.")] = False,
) -> None:
    """Run the HTTP server and, unless --no-worker, the sender in the same process."""
    settings = load_settings()
    _logging()
    with contextlib.suppress(KeyboardInterrupt):
        _run_service(
            _serve(settings, host or settings.http_host, port or settings.http_port, not no_worker)
        )


async def _work(settings: Settings, metrics_host: str, metrics_port: int | None) -> None:
    async with open_mailer(settings, sending=True) as mailer:
        runner = None
        if metrics_port is not None:
            runner = web.AppRunner(create_ops_app(mailer), access_log=None)
            await runner.setup()
            await web.TCPSite(runner, metrics_host, metrics_port).start()
        try:
            say(
                "mailer worker running"
                + (f"; /metrics on http://{metrics_host}:{metrics_port}" if runner else "")
                + (f"; mail is captured in {mailer.capture.path}/" if mailer.capture else "")
            )
            await _until_signal()
        finally:
            if runner is not None:
                await runner.cleanup()


def worker(
    metrics_port: Annotated[
        int | None,
        typer.Option("--metrics-port", help="Serve /metrics and /healthz on this port."),
    ] = None,
    metrics_host: Annotated[
        str, typer.Option("--metrics-host", help="Where --metrics-port listens.")
    ] = "127.0.0.1",
) -> None:
    """Run the sender only (scheduler and send tasks)."""
    settings = load_settings()
    _logging()
    with contextlib.suppress(KeyboardInterrupt):
        _run_service(_work(settings, metrics_host, metrics_port))


async def _listen(settings: Settings) -> None:
    async with open_mailer(settings, listening=True) as mailer:
        _say_listening(mailer)
        await _until_signal()


def inbound() -> None:
    """Run the inbound SMTP listener only: bounces, complaints and mailto unsubscribes."""
    settings = load_settings()
    if not settings.inbound_enabled:
        raise ConfigError("inbound mail is off: set MAILER_INBOUND_PORT to listen")
    _logging()
    with contextlib.suppress(KeyboardInterrupt):
        _run_service(_listen(settings))
