"""Fixtures: a real mailer on a real database, a real SMTP sink, a real aiohttp server.

The database is a SQLite file, or with ``--db=postgresql`` a PostgreSQL database on the server
named by ``$MAILER_TEST_POSTGRES_URL`` (see ``tests/databases.py``).
"""

import os
import re
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from sqlalchemy import Connection

from mailer.bootstrap import Mailer, open_mailer
from mailer.cli.main import main as cli_main
from mailer.config import Settings, load_settings
from mailer.domain.ledger import Evidence
from mailer.services.setup import initialise
from mailer.store.db import open_database
from mailer.store.tables import subscribers, subscriptions
from mailer.transport.dkim import key_from_pem, new_private_key
from mailer.web.app import create_app
from tests.databases import POSTGRESQL, SQLITE, URL_VARIABLE, PostgresPool, active
from tests.harness import Captured, SinkServer, wait_until

SECRET = "test-secret-key-one"
BASE_URL = "http://mailer.test"
DKIM_DOMAIN = "example.org"
STAFF = Evidence(channel="cli", actor="cli:test")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--db",
        choices=[SQLITE, POSTGRESQL],
        default=SQLITE,
        help=f"the database engine to test against (postgresql needs ${URL_VARIABLE})",
    )


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--db") == POSTGRESQL and not os.environ.get(URL_VARIABLE):
        raise pytest.UsageError(f"--db=postgresql needs ${URL_VARIABLE}")


def pytest_report_header(config: pytest.Config) -> str:
    return f"database: {config.getoption('--db')}"


@pytest.fixture(scope="session", autouse=True)
def _backend(request: pytest.FixtureRequest) -> Iterator[None]:
    """Point ``tests.databases.active`` at this run's engine; drop the run's databases after."""
    if request.config.getoption("--db") != POSTGRESQL:
        yield
        return
    active.pool = PostgresPool(os.environ[URL_VARIABLE])
    try:
        yield
    finally:
        active.pool.close()
        active.pool = None


@pytest.fixture(autouse=True)
def _fresh_databases() -> Iterator[None]:
    """Each test starts on empty databases: on PostgreSQL, its own are emptied after it."""
    yield
    if active.pool is not None:
        active.pool.release()


sqlite_only = pytest.mark.skipif(
    "config.getoption('--db') != 'sqlite'", reason="about SQLite's own files or threads"
)
"""For tests that are about SQLite itself (its files, WAL, writer thread)."""


@pytest.fixture
async def sink() -> AsyncIterator[SinkServer]:
    server = SinkServer()
    await server.start()
    yield server
    await server.stop()


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "var_dir": tmp_path / "var",
        "database_url": active.url(tmp_path / "mailer.db"),
        "secret_keys": SECRET,
        "base_url": BASE_URL,
        "worker_poll_seconds": 0.05,
        "smtp_connections": 2,
    }
    values.update(overrides)
    return load_settings(environ={}, **values)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "mailer.db"


@pytest.fixture
def settings(tmp_path: Path, sink: SinkServer) -> Settings:
    return make_settings(tmp_path, smtp_host="127.0.0.1", smtp_port=sink.port)


async def init_db(settings: Settings) -> None:
    db = open_database(settings.database_url)
    try:
        await initialise(settings, db)
    finally:
        await db.close()


@pytest.fixture
async def mailer(settings: Settings) -> AsyncIterator[Mailer]:
    """A running mailer with its worker sending to the sink (and its inbound listener, when
    the settings configure one)."""
    await init_db(settings)
    async with open_mailer(settings, sending=True, listening=True) as running:
        yield running


@pytest.fixture
async def client(mailer: Mailer) -> AsyncIterator[TestClient[Any, Any]]:
    """An HTTP client talking to the real aiohttp app on a loopback port."""
    async with TestClient(TestServer(create_app(mailer))) as http:
        yield http


@pytest.fixture
async def news(mailer: Mailer) -> str:
    await mailer.lists.create("news", "Example News")
    return "news"


@pytest.fixture
async def api_key(mailer: Mailer) -> str:
    return await mailer.api_keys.create("tests")


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


LINK = re.compile(r"https?://[^\s\"<>]+/(confirm|unsubscribe)/([A-Za-z0-9_.~-]+)")


def links(message: Captured) -> dict[str, str]:
    """The confirm and unsubscribe URLs shown in a message's text part."""
    text = message.message.get_body(("plain",))
    assert text is not None
    found: dict[str, str] = {}
    for m in LINK.finditer(text.get_content()):
        found.setdefault(m.group(1), m.group(0))
    return found


async def seed_confirmed(m: Mailer, list_id: int, emails: list[str]) -> None:
    """Insert ``emails`` as confirmed subscribers of a list, in id order, in one transaction.

    Fast set-up for tests that send to many people, on SQLite or PostgreSQL alike; addresses
    are normalised and hashed by the mailer itself, so unsubscribing them by address works.
    """
    now = datetime.now(UTC)
    people = [m.consent.identify(raw) for raw in emails]

    def insert(conn: Connection) -> None:
        for address, subject in people:
            sid = conn.execute(
                subscribers.insert().values(
                    email=address.email, email_hash=subject, name=None, created_at=now
                )
            ).inserted_primary_key
            assert sid is not None
            conn.execute(
                subscriptions.insert().values(
                    subscriber_id=sid[0],
                    list_id=list_id,
                    status="confirmed",
                    created_at=now,
                    updated_at=now,
                    confirmed_at=now,
                )
            )

    await m.db.write(insert)


Run = tuple[int, str, str]
Cli = Callable[..., Run]


def make_cli(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    secret_keys: str | None = None,
) -> Cli:
    """``mailer ARGS`` run in-process against a fresh installation; returns (code, out, err).

    Without ``secret_keys``, ``mailer init`` generates the key file as it would for a user.
    """
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MAILER_DATABASE_URL", active.url(tmp_path / "cli.db"))
    monkeypatch.setenv("MAILER_VAR_DIR", str(tmp_path / "var"))
    if secret_keys is None:
        monkeypatch.delenv("MAILER_SECRET_KEYS", raising=False)
    else:
        monkeypatch.setenv("MAILER_SECRET_KEYS", secret_keys)
    monkeypatch.delenv("MAILER_CONFIG", raising=False)

    def run(*args: str) -> Run:
        code = cli_main(list(args))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    assert run("init")[0] == 0
    return run


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Cli:
    """Run ``mailer ARGS`` in-process against a fresh installation; return (code, out, err)."""
    return make_cli(tmp_path, monkeypatch, capsys)


def path_of(url: str) -> str:
    return url.removeprefix(BASE_URL)


def dkim_key(tmp_path: Path, algorithm: str, selector: str) -> tuple[Path, str, str]:
    """A fresh 0600 DKIM private key file: (path, TXT name, TXT value to publish)."""
    pem = new_private_key(algorithm)
    path = tmp_path / f"{selector}.pem"
    path.write_bytes(pem)
    path.chmod(0o600)
    record = key_from_pem(pem, selector).public_record
    return path, f"{selector}._domainkey.{DKIM_DOMAIN}", record


def dkim_settings(
    tmp_path: Path, sink: SinkServer, algorithms: tuple[str, ...]
) -> tuple[Settings, dict[str, str]]:
    """Settings that sign with one new key per algorithm (selector ``ALGORITHMsel``) and send
    to ``sink``; and the TXT records (name -> value) their signatures verify under."""
    keys = [dkim_key(tmp_path, a, f"{a}sel") for a in algorithms]
    settings = make_settings(
        tmp_path,
        smtp_host="127.0.0.1",
        smtp_port=sink.port,
        dkim_domain=DKIM_DOMAIN,
        dkim_selector=",".join(f"{a}sel" for a in algorithms),
        dkim_key_file=",".join(str(path) for path, _, _ in keys),
    )
    return settings, {name: record for _, name, record in keys}


async def send_every_kind(m: Mailer, sink: SinkServer) -> dict[str, Captured]:
    """A confirmation request, a campaign, a preview and a policy announcement, each sent
    through the real send path and captured at the sink."""
    list_id = (await m.lists.create("news", "Example News")).id
    await m.consent.request_opt_in("new@example.org", "news", None, STAFF)
    await seed_confirmed(m, list_id, ["reader@example.org"])
    kinds = ("confirm", "campaign", "preview", "announcement")
    await wait_until(lambda: len(sink.messages) == 1, 10, "the confirmation request")
    cid = await m.campaigns.create("news", "The November issue", "Hello *world*", "campaign")
    await m.campaigns.send(cid)
    await wait_until(lambda: len(sink.messages) == 2, 10, "the campaign")
    draft = await m.campaigns.create("news", "The December issue", "Hello *again*", "campaign")
    await m.campaigns.preview_to(draft, "reader@example.org")
    await wait_until(lambda: len(sink.messages) == 3, 10, "the preview")
    await m.policy.publish("2026-12", date.today() + timedelta(days=30), "Shorter.", None)
    await wait_until(lambda: len(sink.messages) == 4, 10, "the announcement")
    return dict(zip(kinds, sink.messages, strict=True))
