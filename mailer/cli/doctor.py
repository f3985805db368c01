"""``mailer doctor``: the compliance self-test of PRODUCT.md, against the live configuration.

It never touches the operator's data or relay. The live settings are checked as they are and
the live database is only read; everything that sends or changes state runs on a *private*
instance built from a copy of the live settings: a scratch SQLite database in a temporary
directory, an SMTP sink on loopback that keeps messages in memory, the real worker and the
real web app on a loopback port. The live templates, organisation details, base URL, sender
and signing keys are what that instance uses, so its messages are the ones subscribers would get.
"""

import asyncio
import contextlib
import logging
import os
import re
import secrets
import tempfile
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import aiohttp
import typer
from aiohttp import web
from aiosmtpd.smtp import SMTP as SMTPServer
from aiosmtpd.smtp import Envelope, Session
from pydantic import SecretStr
from rich.table import Table
from rich.text import Text
from sqlalchemy import Connection, select

from mailer.bootstrap import Mailer, open_mailer
from mailer.cli.output import AsJson, console, print_json
from mailer.config import Settings, load_settings
from mailer.domain.dns_advice import DnsRecord
from mailer.domain.inbound import InboundAddresses
from mailer.domain.ledger import Evidence
from mailer.domain.tokens import RowTokens
from mailer.errors import ConfigError, MailerError, NotFound
from mailer.services import doctor as checks
from mailer.services.doctor import Check, Expected, Status
from mailer.services.setup import initialise
from mailer.statuses import Channel, OutboxStatus
from mailer.store.db import open_database
from mailer.store.tables import outbox
from mailer.transport.dns import lookup_txt
from mailer.web.app import create_app

ADDRESS = "mailer-doctor@example.org"
"""The private instance's one subscriber; its mail only ever reaches the private sink."""
LIST_SLUG = "doctor"
LIST_NAME = "Doctor self-test"
BODY = "This is a **self-test** message from `mailer doctor`.\n\nIt never leaves this machine."
WAIT_SECONDS = 15.0
EVIDENCE = Evidence(channel=Channel.CLI.value, actor="mailer-doctor")
ONE_CLICK_FORM = {"List-Unsubscribe": "One-Click"}
STYLE = {Status.PASS: "green", Status.WARN: "yellow", Status.SKIP: "dim", Status.FAIL: "bold red"}
_NOT_SENT = (OutboxStatus.FAILED.value, OutboxStatus.UNKNOWN.value, OutboxStatus.SKIPPED.value)


class _Kept:
    """aiosmtpd handler that keeps each message's exact bytes in memory."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []
        self.senders: list[str] = []
        """The envelope sender (MAIL FROM) of each message, in the same order."""

    async def handle_DATA(self, server: Any, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or envelope.content
        raw = content if isinstance(content, bytes) else str(content).encode("utf-8")
        self.senders.append(str(envelope.mail_from))
        self.messages.append(raw)
        return "250 2.0.0 kept by mailer doctor"


@contextlib.asynccontextmanager
async def _private_sink() -> AsyncIterator[tuple[_Kept, int]]:
    kept = _Kept()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTPServer(kept, enable_SMTPUTF8=True, hostname="mailer-doctor"),
        host="127.0.0.1",
        port=0,
    )
    try:
        yield kept, int(server.sockets[0].getsockname()[1])
    finally:
        server.close()
        await server.wait_closed()


def private_settings(live: Settings, root: Path, keys: list[str], smtp_port: int) -> Settings:
    """The live settings with their own database, var/ and relay: the private sink."""
    return live.model_copy(
        update={
            "database_url": f"sqlite+aiosqlite:///{root / 'doctor.db'}",
            "var_dir": root / "var",
            "smtp_host": "127.0.0.1",
            "smtp_port": smtp_port,
            "smtp_tls": "none",
            "smtp_username": None,
            "smtp_password": None,
            "smtp_timeout": 10.0,
            "smtp_connections": 1,
            "smtp_rate": 0.0,
            "worker_poll_seconds": 0.05,
            "secret_keys": [SecretStr(k) for k in keys],
        }
    )


class StepFailed(Exception):
    """A step of the walk-through did not happen; the message says what was seen instead."""


def _not_sent_after(conn: Connection, after: int) -> tuple[int, str, str | None] | None:
    q = (
        select(outbox.c.id, outbox.c.status, outbox.c.reason)
        .where(outbox.c.id > after, outbox.c.status.in_(_NOT_SENT))
        .order_by(outbox.c.id)
        .limit(1)
    )
    row = conn.execute(q).first()
    return None if row is None else (int(row[0]), str(row[1]), row[2])


class Walk:
    """The subscriber's side of the loop, on the private instance, one step at a time."""

    def __init__(
        self, mailer: Mailer, kept: _Kept, http: aiohttp.ClientSession, expected: Expected
    ) -> None:
        self.mailer = mailer
        self.kept = kept
        self.http = http
        self.expected = expected
        self.base = expected.base_url
        self.rows: list[Check] = []
        self.captured: dict[str, bytes] = {}
        self._seen = 0
        self._not_sent_seen = 0

    def add(self, name: str, status: Status, detail: str) -> None:
        self.rows.append(Check(name, status, detail))

    async def next_message(self) -> bytes:
        """The next message the sink receives, or ``StepFailed`` with the outbox's reason."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT_SECONDS
        while True:
            if len(self.kept.messages) > self._seen:
                self._seen += 1
                return self.kept.messages[self._seen - 1]
            refused = await self.mailer.db.read(_not_sent_after, self._not_sent_seen)
            if refused is not None:
                self._not_sent_seen = refused[0]
                raise StepFailed(f"{refused[1]}: {refused[2] or 'no reason given'}")
            if loop.time() > deadline:
                raise StepFailed(f"nothing reached the private sink within {WAIT_SECONDS:.0f} s")
            await asyncio.sleep(0.02)

    async def state(self) -> tuple[str | None, str | None]:
        """(subscription status on the doctor list, suppression reason) right now."""
        try:
            person = await self.mailer.people.show(ADDRESS)
        except NotFound:
            return None, None
        status = next((s.status for s in person.subscriptions if s.list_slug == LIST_SLUG), None)
        return status, person.suppression

    def path(self, url: str) -> str:
        return url.removeprefix(self.base)

    async def capture(self, kind: str, trigger: Any) -> bytes | None:
        """Run ``trigger`` (an awaitable that queues one message), check what arrives."""
        name = f"message: {kind}"
        try:
            await trigger
            raw = await self.next_message()
        except (StepFailed, MailerError) as exc:
            detail = exc.message if isinstance(exc, MailerError) else str(exc)
            self.add(name, Status.FAIL, f"not delivered to the private sink: {detail}")
            return None
        self.captured[kind] = raw
        sender = self.kept.senders[self._seen - 1]
        self.rows.append(checks.message(kind, raw, self.expected, sender))
        return raw

    def confirm_link(self, raw: bytes) -> str | None:
        parsed = checks.parts(checks.parse(raw))
        if parsed is None:
            return None
        found = re.search(rf"{re.escape(self.base)}/confirm/[A-Za-z0-9_.~-]+", parsed[0])
        return None if found is None else found.group(0)

    async def run(self, layouts: list[str], announce: bool) -> str | None:
        """Walk the loop; return an unsubscribe token minted by the running mailer, if any."""
        await self.mailer.lists.create(LIST_SLUG, LIST_NAME)
        request = await self.capture(
            "confirmation request",
            self.mailer.consent.request_opt_in(ADDRESS, LIST_SLUG, None, EVIDENCE),
        )
        confirmed = request is not None and await self.confirm(request)
        last_list_mail = None
        for layout in layouts:
            kind = "campaign" if layout == "campaign" else f"campaign ({layout})"
            try:  # creating one renders it: a campaign that could not be stopped is refused
                campaign_id = await self.mailer.campaigns.create(
                    LIST_SLUG, f"mailer doctor: {kind}", BODY, layout
                )
            except MailerError as exc:
                self.add(f"message: {kind}", Status.FAIL, f"refused: {exc.message}")
                continue
            if not confirmed:
                self.add(f"message: {kind}", Status.SKIP, "needs a confirmed subscriber")
                continue
            raw = await self.capture(kind, self.mailer.campaigns.send(campaign_id))
            last_list_mail = raw or last_list_mail
        if announce:
            await self.announcement(confirmed)
        await self.unsubscribe(last_list_mail, request)
        for raw in (last_list_mail, request):
            url = None if raw is None else checks.header_url(raw, self.base)
            if url is not None:
                return url.rpartition("/")[2]
        return None

    async def confirm(self, request: bytes) -> bool:
        url = self.confirm_link(request)
        if url is None:
            for name in ("confirm link: GET changes nothing", "confirm link: POST confirms"):
                self.add(name, Status.FAIL, "the confirmation request shows no confirm link")
            return False
        async with self.http.get(self.path(url), allow_redirects=False) as r:
            status = r.status
        after = await self.state()
        if status == 200 and after == ("pending", None):
            self.add("confirm link: GET changes nothing", Status.PASS, "200, still pending")
        else:
            self.add(
                "confirm link: GET changes nothing",
                Status.FAIL,
                f"GET answered {status}; the subscription is now {after[0]} (want pending)",
            )
        async with self.http.post(self.path(url), allow_redirects=False) as r:
            status = r.status
        after = await self.state()
        if status == 200 and after[0] == "confirmed":
            self.add("confirm link: POST confirms", Status.PASS, "200, now confirmed")
            return True
        self.add(
            "confirm link: POST confirms",
            Status.FAIL,
            f"POST answered {status}; the subscription is {after[0]} (want confirmed)",
        )
        return False

    async def announcement(self, confirmed: bool) -> None:
        """A policy announcement through ``policy publish``'s own path (one per person)."""
        if not confirmed:
            self.add("message: announcement", Status.SKIP, "needs a confirmed subscriber")
            return
        today = self.mailer.clock.now().date()
        publish = self.mailer.policy.publish("doctor-self-test", today, BODY, None)
        await self.capture("announcement", publish)

    async def _post_one_click(self, url: str, multipart: bool) -> tuple[int, list[str]]:
        data: Any = ONE_CLICK_FORM
        if multipart:
            data = aiohttp.FormData()
            data.add_field("List-Unsubscribe", "One-Click", content_type="text/plain")
        async with self.http.post(self.path(url), data=data, allow_redirects=False) as r:
            await r.read()
            extra = [h for h in ("Location", "Set-Cookie") if h in r.headers]
            return r.status, extra

    async def unsubscribe(self, list_mail: bytes | None, request: bytes | None) -> None:
        """GET the list mail's link (changes nothing), then one-click it and the global one."""
        names = (
            "unsubscribe link: GET changes nothing",
            "one-click POST (urlencoded)",
            "one-click POST (multipart)",
        )
        list_url = None if list_mail is None else checks.header_url(list_mail, self.base)
        global_url = None if request is None else checks.header_url(request, self.base)
        if list_url is None:
            for name in names[:2]:
                self.add(name, Status.SKIP, "needs a campaign message with its link")
        else:
            before = await self.state()
            async with self.http.get(self.path(list_url), allow_redirects=False) as r:
                status, referrer = r.status, r.headers.get("Referrer-Policy")
            after = await self.state()
            if status == 200 and referrer == "no-referrer" and after == before:
                self.add(names[0], Status.PASS, "200 with Referrer-Policy: no-referrer; no change")
            else:
                self.add(
                    names[0],
                    Status.FAIL,
                    f"GET answered {status} (Referrer-Policy {referrer}); "
                    f"state {before} became {after}",
                )
            await self.one_click(names[1], list_url, False, ("unsubscribed", None))
        if global_url is None:
            self.add(names[2], Status.SKIP, "needs a confirmation request with its link")
        else:
            subscribed = (await self.state())[0] is not None
            want = ("unsubscribed" if subscribed else None, "unsubscribed")
            await self.one_click(names[2], global_url, True, want)

    async def one_click(
        self, name: str, url: str, multipart: bool, want: tuple[str | None, str | None]
    ) -> None:
        """RFC 8058: 200, no redirect, no cookie, the state flips; a repeat is harmless."""
        status, extra = await self._post_one_click(url, multipart)
        after = await self.state()
        again, _ = await self._post_one_click(url, multipart)
        problems = []
        if status != 200:
            problems.append(f"answered {status}, not 200")
        if extra:
            problems.append("sent " + " and ".join(extra))
        if want[0] is not None and after[0] != want[0]:
            problems.append(f"the subscription is {after[0]}, not {want[0]}")
        if after[1] != want[1]:
            problems.append(f"the suppression is {after[1]}, not {want[1]}")
        if again != 200:
            problems.append(f"a repeat answered {again}")
        if problems:
            self.add(name, Status.FAIL, "; ".join(problems))
            return
        scope = "from everything (suppressed)" if want[1] else "from the list"
        self.add(name, Status.PASS, f"200, no redirect or cookie; unsubscribed {scope}")


def inbound_addresses(live: Settings, keys: list[str]) -> InboundAddresses | None:
    """What the messages must carry when inbound mail is on (read with the live keys)."""
    if not live.inbound_enabled:
        return None
    return InboundAddresses(RowTokens(keys), live.inbound_domain)


def _describe(exc: Exception) -> str:
    return exc.message if isinstance(exc, MailerError) else f"{type(exc).__name__}: {exc}"


async def self_test(
    live: Settings, keys: list[str]
) -> tuple[list[Check], dict[str, bytes], str | None]:
    """Run the walk on a private instance; return its rows, the captured mail and a token."""
    layouts = [n for n in checks.campaign_layouts(live.templates_dir) if n != "announcement"]
    announce = "announcement" in checks.email_templates(live.templates_dir)
    with tempfile.TemporaryDirectory(prefix="mailer-doctor-") as tmp:
        async with _private_sink() as (kept, smtp_port):
            settings = private_settings(live, Path(tmp), keys, smtp_port)
            db = open_database(settings.database_url)
            try:
                await initialise(settings, db)
            finally:
                await db.close()
            async with open_mailer(settings, sending=True) as mailer:
                runner = web.AppRunner(create_app(mailer), access_log=None)
                await runner.setup()
                try:
                    await web.TCPSite(runner, "127.0.0.1", 0).start()
                    port = runner.addresses[0][1]
                    async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:
                        expected = Expected(
                            live.base_url, ADDRESS, live, inbound_addresses(live, keys)
                        )
                        walk = Walk(mailer, kept, http, expected)
                        try:
                            token = await walk.run(layouts, announce)
                        except Exception as exc:  # a step broke: keep the rows so far
                            walk.add("private instance", Status.FAIL, _describe(exc))
                            token = None
                finally:
                    await runner.cleanup()
    return walk.rows, walk.captured, token


async def examine(environ: Mapping[str, str]) -> tuple[list[Check], list[DnsRecord]]:
    """Every check, in the order of the report, and the DNS records to publish."""
    try:
        settings = load_settings(environ)
    except ConfigError as exc:
        return [Check("configuration", Status.FAIL, exc.message)], []
    rows = [
        checks.configuration(settings, environ),
        checks.organisation(settings),
        checks.sender(settings),
        checks.base_url(settings),
    ]
    keys = checks.read_keys(settings)
    later = [
        checks.key_file(settings),
        checks.data_files(settings),
        await checks.database(settings),
        checks.templates(settings),
    ]
    try:
        walked, captured, token = await self_test(settings, keys or [secrets.token_urlsafe(32)])
    except Exception as exc:  # the private instance itself could not start
        walked, captured, token = [Check("private instance", Status.FAIL, _describe(exc))], {}, None
    rows.append(checks.signing(keys, token if keys else None))
    rows += later + walked
    rows.append(checks.dkim(settings, captured))
    if checks.dkim_configured(settings):
        rows.append(await checks.dkim_dns(settings, lookup_txt))
    return rows, checks.dns_records(settings)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The private instance's own logs are not the report (MAILER_DEBUG=1 keeps them)."""
    if os.environ.get("MAILER_DEBUG"):
        yield
        return
    loggers = [logging.getLogger(name) for name in ("mailer", "aiohttp", "mail.log")]
    before = [log.disabled for log in loggers]
    for log in loggers:
        log.disabled = True
    try:
        yield
    finally:
        for log, was in zip(loggers, before, strict=True):
            log.disabled = was


def print_report(rows: list[Check], records: list[DnsRecord]) -> None:
    table = Table(title="mailer doctor", title_justify="left")
    table.add_column("check", no_wrap=True)
    table.add_column("result", no_wrap=True)
    table.add_column("detail")
    for row in rows:
        table.add_row(
            Text(row.name), Text(row.status.value, style=STYLE[row.status]), Text(row.detail)
        )
    console.print(table)
    if records:
        console.print(Text("DNS records to publish", style="bold"))
        for record in records:
            console.print(Text(record.zone_line()))
            console.print(Text(f"  ; {record.note}", style="dim"))
    counts = {s: sum(1 for r in rows if r.status is s) for s in Status}
    summary = ", ".join(f"{n} {s.value}" for s, n in counts.items() if n)
    verdict = "all checks passed" if checks.passed(rows) else "FAILED"
    console.print(Text(f"{verdict} ({summary})"))


def doctor(as_json: AsJson = False) -> None:
    """Compliance self-test: render each kind of message to a private sink and check it;
    print the DNS records (DKIM, SPF, DMARC) to publish."""
    with _quiet():
        rows, records = asyncio.run(examine(os.environ))
    ok = checks.passed(rows)
    if as_json:
        print_json(
            {
                "ok": ok,
                "checks": [row.as_json() for row in rows],
                "dns_records": [asdict(record) for record in records],
            }
        )
    else:
        print_report(rows, records)
    if not ok:
        raise typer.Exit(1)
