"""SMTP fault matrix against campaigns (G6, G1; reliability-plan b.3 tests 18, 20, 22).

Every test runs twice: against a relay that offers PIPELINING (MAIL FROM, RCPT TO and DATA
go in one write) and against one that does not (one command at a time, through aiosmtplib).
Every cell runs a real campaign to a fault-injecting aiosmtpd sink on loopback, with a
``MutableClock`` so retry and relay backoffs are made due by moving time, not by waiting.
Each cell checks the outbox rows after the fault, then after the relay recovers: the final
state and reason of every row, the attempts charged, and the copies the sink holds (never
more than one per recipient).
"""

import asyncio
import re
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mailer.bootstrap import Mailer, open_mailer
from mailer.config import Settings
from mailer.transport.outcomes import Sent
from mailer.transport.smtp import RelayConfig, SmtpPool
from tests.conftest import init_db, make_settings, seed_confirmed
from tests.databases import Db
from tests.harness import MutableClock, SinkEvent, SinkServer, query, wait_until

N = 24
EMAILS = [f"r{i}@example.org" for i in range(N)]
VICTIMS = EMAILS[1::4]
"""The recipients a per-recipient fault hits (a relay-wide fault hits everyone)."""
TIMEOUT = 0.4
"""MAILER_SMTP_TIMEOUT in the cells that need the client to give up."""
SLOW = 1.5
"""How long a slow relay holds its reply (well past ``TIMEOUT``)."""
LATER = 2 * 3600.0
"""Far past any retry or relay backoff, well inside the 24 h give-up age."""
BODY = "Hello **reader**,\n\nthis is the November issue.\n"


@pytest.fixture(params=[True, False], ids=["pipelined", "one-by-one"])
async def sink(request: pytest.FixtureRequest) -> AsyncIterator[SinkServer]:
    server = SinkServer(pipelining=request.param)
    await server.start()
    yield server
    await server.stop()


def grouped(sink: SinkServer) -> str:
    """How the client writes a transaction's commands to this sink."""
    return "MAIL,RCPT,DATA" if sink.pipelining else "MAIL"


@dataclass(frozen=True)
class Row:
    status: str
    reason: str | None
    attempts: int


@dataclass
class Run:
    """A running mailer with one campaign to ``EMAILS`` and the sink it sends to."""

    mailer: Mailer
    db: Db
    sink: SinkServer
    clock: MutableClock
    campaign: int = 0

    def rows(self) -> dict[str, Row]:
        found = query(
            self.db,
            "SELECT s.email, o.status, o.reason, o.attempts FROM outbox o"
            " JOIN subscriber s ON s.id = o.subscriber_id"
            " WHERE o.campaign_id = ? AND o.kind = 'campaign'",
            self.campaign,
        )
        return {email: Row(status, reason, attempts) for email, status, reason, attempts in found}

    def status(self) -> str:
        return str(query(self.db, "SELECT status FROM campaign WHERE id = ?", self.campaign)[0][0])

    def copies(self) -> Counter[str]:
        """Messages the sink holds, per recipient."""
        return Counter(rcpt for m in self.sink.messages for rcpt in m.rcpt_tos)

    async def start(self, emails: list[str]) -> None:
        await seed(self.mailer, self.db, emails)
        self.campaign = await self.mailer.campaigns.create("news", "Fault matrix", BODY, "campaign")
        await self.mailer.campaigns.send(self.campaign)

    async def recover(self) -> None:
        """Time moves past every backoff; the campaign must then finish by itself."""
        self.clock.advance(LATER)
        await wait_until(lambda: self.status() == "sent", timeout=15, what="the campaign to finish")

    async def stalled(self) -> None:
        """While the relay is backed off, nothing moves: no connection, no MAIL FROM, no row.

        Messages already in hand when the relay closed may still finish: wait for those
        first (up to 3 s), then nothing may change for a further 0.25 s.
        """
        before = await self.settled()
        await asyncio.sleep(0.25)
        assert self.sink.events[len(before[0]) :] == []
        now = self.rows()
        assert {e: r for e, r in now.items() if before[1].get(e) != r} == {}

    async def settled(self) -> tuple[list[SinkEvent], dict[str, Row]]:
        """Wait until neither the sink nor the outbox has changed for 0.2 s; return both."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 3
        state = (list(self.sink.events), self.rows())
        while True:
            await asyncio.sleep(0.2)
            now = (list(self.sink.events), self.rows())
            if now == state:
                return state
            assert loop.time() < deadline, "the mailer never settled"
            state = now


async def seed(m: Mailer, db: Db, emails: list[str]) -> None:
    """List "news" with ``emails`` as confirmed subscribers, inserted directly (fast)."""
    await m.lists.create("news", "Example News")
    list_id = query(db, "SELECT id FROM mailing_list WHERE slug = 'news'")[0][0]
    await seed_confirmed(m, list_id, emails)


def db_of(settings: Settings) -> Db:
    return settings.database_url


@asynccontextmanager
async def running(tmp_path: Path, sink: SinkServer, **overrides: Any) -> AsyncIterator[Run]:
    values: dict[str, Any] = {"smtp_host": "127.0.0.1", "smtp_port": sink.port}
    values["smtp_connections"] = 2
    values.update(overrides)
    settings = make_settings(tmp_path, **values)
    await init_db(settings)
    clock = MutableClock()
    async with open_mailer(settings, sending=True, clock=clock) as m:
        yield Run(m, db_of(settings), sink, clock)


# --- the matrix ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """One injected fault and what must become of the messages it hits.

    ``outcome``: ``retry`` (queued again, attempt charged, sent once later), ``relay``
    (queued again uncharged: the relay was unusable), ``failed`` (permanent, never retried)
    or ``unknown`` (no reply inside DATA: never retried).
    """

    stage: str
    reply: str | None
    outcome: str
    reason: str
    copies: int = 0
    relay_closes: bool = False
    bounce: bool = False

    @property
    def relay_wide(self) -> bool:
        return self.stage in ("greeting", "ehlo", "mail")

    @property
    def slow(self) -> bool:
        return self.reply is None


def inject(sink: SinkServer, cell: Cell) -> None:
    reply = cell.reply
    if cell.stage == "greeting":
        sink.greeting = reply
    elif cell.stage == "ehlo":
        sink.ehlo_reply = reply
    elif cell.stage == "mail":
        sink.mail_reply = reply
    for victim in VICTIMS:
        if cell.stage == "rcpt":
            if reply is None:
                sink.rcpt_delays[victim] = SLOW
            elif reply == "":
                sink.drop_at_rcpt.add(victim)
            else:
                sink.rcpt_replies[victim] = reply
        elif cell.stage == "data-command":
            assert reply is not None
            sink.data_command_replies[victim] = reply
        elif cell.stage == "final-dot":
            if reply is None:
                sink.data_delays[victim] = SLOW
            elif reply == "":
                sink.drop_in_data.add(victim)
            else:
                sink.data_replies[victim] = reply


def clear(sink: SinkServer) -> None:
    sink.greeting = sink.ehlo_reply = sink.mail_reply = None
    for knob in (
        sink.rcpt_replies,
        sink.data_replies,
        sink.data_command_replies,
        sink.rcpt_delays,
        sink.data_delays,
    ):
        knob.clear()
    sink.drop_at_rcpt.clear()
    sink.drop_in_data.clear()


GIBBERISH = "hello there, this is no SMTP reply"
CELLS = {
    # A relay that cannot be used at all: requeued uncharged, everyone waits for the relay.
    "greeting-421": Cell("greeting", "421 4.3.2 Too busy", "relay", "SMTPConnectResponseError"),
    "greeting-554": Cell("greeting", "554 5.3.2 No service", "relay", "SMTPConnectResponseError"),
    "greeting-drop": Cell("greeting", "", "relay", "SMTPConnectError"),
    "ehlo-421": Cell("ehlo", "421 4.3.2 Later", "relay", "SMTPHeloError"),
    "ehlo-550": Cell("ehlo", "550 5.7.1 Not you", "relay", "SMTPHeloError"),
    "ehlo-drop": Cell("ehlo", "", "relay", "SMTPServerDisconnected"),
    # MAIL FROM names no recipient, so a fault there hits every message.
    "mail-421": Cell("mail", "421 4.3.2 Closing", "retry", "MAIL FROM: 421 4.3.2", 0, True),
    "mail-451": Cell("mail", "451 4.3.0 Try later", "retry", "MAIL FROM: 451 4.3.0 Try later"),
    # A 5xx to MAIL FROM refuses our sender (address, account), not the recipient: the
    # relay is unusable as configured, so nobody is failed or charged for it.
    "mail-550": Cell("mail", "550 5.7.1 Sender refused", "relay", "refuses our sender: 550 5.7.1"),
    "mail-drop": Cell("mail", "", "retry", "connection lost at MAIL FROM"),
    # RCPT TO: every fault is before DATA, so it is never ambiguous.
    "rcpt-421": Cell("rcpt", "421 4.3.2 Closing", "retry", "RCPT TO: 421 4.3.2", 0, True),
    "rcpt-450": Cell("rcpt", "450 4.2.1 Mailbox busy", "retry", "RCPT TO: 450 4.2.1 Mailbox"),
    "rcpt-451": Cell("rcpt", "451 4.3.0 Try later", "retry", "RCPT TO: 451 4.3.0 Try later"),
    "rcpt-452": Cell("rcpt", "452 4.2.2 Mailbox full", "retry", "RCPT TO: 452 4.2.2 Mailbox"),
    "rcpt-550-5.1.1": Cell(
        "rcpt", "550 5.1.1 No such user", "failed", "RCPT TO: 550 5.1.1 No such user", bounce=True
    ),
    "rcpt-550-5.1.10": Cell(
        "rcpt", "550 5.1.10 Null MX", "failed", "RCPT TO: 550 5.1.10 Null MX", bounce=True
    ),
    "rcpt-550-5.7.1": Cell("rcpt", "550 5.7.1 Policy", "failed", "RCPT TO: 550 5.7.1 Policy"),
    "rcpt-551": Cell("rcpt", "551 User not local", "failed", "RCPT TO: 551 User not local"),
    "rcpt-553": Cell("rcpt", "553 Bad mailbox name", "failed", "RCPT TO: 553 Bad mailbox name"),
    "rcpt-drop": Cell("rcpt", "", "retry", "connection lost at RCPT TO"),
    "rcpt-slow": Cell("rcpt", None, "retry", "connection lost at RCPT TO: Timed out"),
    "rcpt-gibberish": Cell("rcpt", GIBBERISH, "retry", "RCPT TO: -1 Malformed SMTP response"),
    "rcpt-too-long": Cell("rcpt", "250 " + "x" * 9000, "retry", "RCPT TO: -1 Response too long"),
    # The DATA verb itself, before any 354: a reply is still unambiguous, silence is not.
    "data-421": Cell("data-command", "421 4.3.2 Closing", "retry", "DATA: 421 4.3.2", 0, True),
    "data-451": Cell("data-command", "451 4.3.0 Later", "retry", "DATA: 451 4.3.0 Later"),
    "data-554": Cell("data-command", "554 5.5.1 No data", "failed", "DATA: 554 5.5.1 No data"),
    "data-drop": Cell("data-command", "", "unknown", "no reply to DATA (SMTPServerDisconnected)"),
    # The reply to the final dot.
    "dot-421": Cell("final-dot", "421 4.3.2 Closing", "retry", "DATA: 421 4.3.2", 0, True),
    "dot-451": Cell("final-dot", "451 4.3.0 Later", "retry", "DATA: 451 4.3.0 Later"),
    "dot-452": Cell("final-dot", "452 4.3.1 Disk full", "retry", "DATA: 452 4.3.1 Disk full"),
    "dot-552": Cell("final-dot", "552 5.3.4 Too big", "failed", "DATA: 552 5.3.4 Too big"),
    "dot-554": Cell("final-dot", "554 5.7.1 Spam", "failed", "DATA: 554 5.7.1 Spam"),
    "dot-drop": Cell(
        "final-dot", "", "unknown", "no reply to DATA (SMTPServerDisconnected)", copies=1
    ),
    "dot-slow": Cell("final-dot", None, "unknown", "no reply to DATA (SMTPReadTimeoutError)", 1),
    # A reply to the final dot that cannot be read says nothing either: never retried.
    "dot-gibberish": Cell("final-dot", GIBBERISH, "unknown", "no reply to DATA"),
}


def first_state(cell: Cell, row: Row | None) -> bool:
    """Whether a hit message has reached the state the fault leads to (before recovery)."""
    if row is None or row.reason is None or cell.reason not in row.reason:
        return False
    if cell.outcome in ("retry", "relay"):
        return row.status == "queued" and row.attempts == (1 if cell.outcome == "retry" else 0)
    return row.status == cell.outcome and row.attempts == 1


@pytest.mark.parametrize("cell", list(CELLS.values()), ids=list(CELLS))
async def test_fault_cell(tmp_path: Path, sink: SinkServer, cell: Cell) -> None:
    """Each SMTP fault ends in its documented state and reason, with at most one copy each."""
    overrides = {"smtp_timeout": TIMEOUT} if cell.slow else {}
    inject(sink, cell)
    victims = EMAILS if cell.relay_wide else VICTIMS
    async with running(tmp_path, sink, **overrides) as run:
        await run.start(EMAILS)

        def hit(rows: dict[str, Row]) -> list[str]:
            return [e for e in victims if first_state(cell, rows.get(e))]

        if cell.outcome == "relay" or cell.relay_closes:
            # The relay is closed for everyone: wait for the first hit, then nothing moves.
            await wait_until(lambda: hit(run.rows()) != [], what=f"a message hit by {cell}")
            await run.stalled()
        else:
            others = [e for e in EMAILS if e not in victims]
            await wait_until(
                lambda: (
                    len(hit(rows := run.rows())) == len(victims)
                    and all(rows[e].status == "sent" for e in others)
                ),
                timeout=10,
                what=f"every message to meet {cell}",
            )
        rows = run.rows()
        hits = set(hit(rows))
        assert hits and hits <= set(victims)
        sent_to = run.copies()
        assert {e: sent_to[e] for e in hits} == dict.fromkeys(hits, cell.copies)
        if cell.relay_closes:  # each send task met the 421 at most once, then waited
            assert len(hits) <= 2
            assert any(r.status != "sent" for e, r in rows.items() if e not in hits)
        if cell.outcome == "relay":
            if cell.stage == "mail":  # each send task offered MAIL FROM once, then waited
                assert len(run.sink.seen("mail")) <= 2
            else:
                assert run.sink.seen("mail") == []  # not one message reached the relay
            assert {r.status for r in rows.values()} <= {"queued", "sending"}
            assert all(r.attempts == 0 for r in rows.values())

        # Permanent refusals: a hard bounce (5.1.1 / 5.1.10) suppresses, anything else not.
        suppressed = query(run.db, "SELECT email_hash, reason FROM suppression")
        bounced = query(
            run.db,
            "SELECT subject_hash FROM consent_event"
            " WHERE event = 'suppressed' AND channel = 'bounce'",
        )
        hashes = {run.mailer.consent.identify(e)[1] for e in hits}
        if cell.bounce:
            assert set(suppressed) == {(h, "bounced") for h in hashes}
            assert sorted(h for (h,) in bounced) == sorted(hashes)
        else:
            assert suppressed == [] and bounced == []

        clear(sink)
        await run.recover()
        final, sent_to = run.rows(), run.copies()
        assert set(final) == set(EMAILS)
        for email in EMAILS:
            row, copies = final[email], sent_to[email]
            if email in hits and cell.outcome in ("failed", "unknown"):
                assert row == rows[email], email  # never retried
                assert copies == cell.copies, email
            else:
                charged = email in hits and cell.outcome == "retry"
                assert row == Row("sent", None, 2 if charged else 1), email
                assert copies == 1, email
        assert set(sent_to) <= set(EMAILS)  # nothing stray
        report = await run.mailer.campaigns.report(run.campaign)
        assert report.campaign.status == "sent"
        assert {e.detail for e in sink.seen("read")} == {grouped(sink)}
        expected = {"sent": N, "failed": 0, "unknown": 0}
        if cell.outcome in ("failed", "unknown"):
            expected = {"sent": N - len(hits), cell.outcome: len(hits)}
        assert {k: v for k, v in report.states.items() if v} == {
            k: v for k, v in expected.items() if v
        }


# --- faults that need more than a sink knob ------------------------------------------------


async def test_utf8_recipient_without_smtputf8_fails_alone(
    tmp_path: Path, sink: SinkServer
) -> None:
    """A UTF-8 address on a relay without SMTPUTF8 fails (reason says so); the rest are sent."""
    sink.smtputf8 = False
    utf8 = "zoë.müller@example.org"
    async with running(tmp_path, sink) as run:
        await run.start([*EMAILS, utf8])
        await wait_until(lambda: run.status() == "sent", timeout=10, what="the campaign to end")
        rows = run.rows()
    assert len(rows) == N + 1
    row = rows[utf8]
    assert (row.status, row.attempts) == ("failed", 1)
    assert row.reason is not None and "SMTPUTF8" in row.reason
    assert run.copies() == dict.fromkeys(EMAILS, 1)  # none to the UTF-8 address
    assert all(rows[e] == Row("sent", None, 1) for e in EMAILS)
    assert utf8 not in [e.detail for e in sink.seen("rcpt")]  # refused before any MAIL FROM
    assert query(run.db, "SELECT count(*) FROM suppression") == [(0,)]


async def test_starttls_required_but_not_offered_sends_nothing(
    tmp_path: Path, sink: SinkServer
) -> None:
    """MAILER_SMTP_TLS=starttls and no STARTTLS: 0 messages reach the relay, none fail."""
    async with running(tmp_path, sink, smtp_tls="starttls") as run:
        await run.start(EMAILS)
        await wait_until(
            lambda: any(r.reason and "STARTTLS" in r.reason for r in run.rows().values()),
            what="the relay to be refused",
        )
        await run.stalled()
        run.clock.advance(LATER)  # the relay is tried again, and refused again
        connects = len(sink.seen("connect"))
        await wait_until(lambda: len(sink.seen("connect")) > connects, what="a second try")
        rows = run.rows()
    assert sink.seen("mail") == [] and sink.messages == []
    assert {r.status for r in rows.values()} <= {"queued", "sending"}
    assert all(r.attempts == 0 for r in rows.values())
    assert run.status() == "running"


async def test_auth_rejected_backs_off_then_sends_everyone_once(
    tmp_path: Path, sink: SinkServer
) -> None:
    """AUTH 535: nothing sent or charged while refused; once accepted, each sent exactly once."""
    sink.auth_password = "the-new-one"
    overrides = {"smtp_username": "mailer", "smtp_password": "the-old-one"}
    async with running(tmp_path, sink, **overrides) as run:
        await run.start(EMAILS)
        await wait_until(
            lambda: any(r.reason and "535" in r.reason for r in run.rows().values()),
            what="the login to be refused",
        )
        await run.stalled()
        rows = run.rows()
        assert sink.seen("mail") == []
        assert {e.detail for e in sink.seen("auth")} == {"refused"}
        assert all(r.attempts == 0 and r.status in ("queued", "sending") for r in rows.values())
        sink.auth_password = "the-old-one"  # the relay account is fixed
        await run.recover()
        final = run.rows()
    assert all(final[e] == Row("sent", None, 1) for e in EMAILS)
    assert run.copies() == dict.fromkeys(EMAILS, 1)


async def test_relay_rate_limit_421_on_nth_message_of_each_connection(
    tmp_path: Path, sink: SinkServer
) -> None:
    """421 on every connection's 5th MAIL FROM: all sent exactly once, <= 5 per connection."""
    sink.nth_mail_reply = (5, "421 4.7.0 Too many messages, slow down")
    async with running(tmp_path, sink) as run:
        await run.start(EMAILS)
        for _ in range(20):
            if run.status() == "sent":
                break
            # Let the open relay window run dry (the 421 closes it), then move past it.
            await run.settled()
            run.clock.advance(LATER)
        assert run.status() == "sent"
        final = run.rows()
    assert all(final[e].status == "sent" for e in EMAILS)
    assert run.copies() == dict.fromkeys(EMAILS, 1)
    attempts = sum(final[e].attempts for e in EMAILS)
    assert attempts > N  # some messages met the 421 and were tried again
    mails, connects = len(sink.seen("mail")), len(sink.seen("connect"))
    assert mails == attempts  # every transaction the relay saw was charged once, no more
    assert mails <= 5 * connects  # the relay never let a connection carry a 6th


# --- test 22: a pooled connection the relay closed or abandoned while idle -----------------


@pytest.mark.parametrize("how", ["closed", "silent"])
async def test_idle_pooled_connection_lost_reconnects(
    tmp_path: Path, sink: SinkServer, how: str
) -> None:
    """After the relay drops (or stops answering) an idle connection, the next send reconnects."""
    async with running(tmp_path, sink, smtp_connections=1, smtp_timeout=TIMEOUT) as run:
        await run.start(EMAILS[:3])
        await wait_until(lambda: run.status() == "sent", what="the first campaign")
        assert len(sink.seen("connect")) == 1  # one pooled connection carried all three
        lost = sink.drop_connections() if how == "closed" else sink.silence_connections()
        assert lost == 1
        await asyncio.sleep(0.1)
        started = asyncio.get_running_loop().time()
        second = await run.mailer.campaigns.create("news", "Second issue", BODY, "campaign")
        await run.mailer.campaigns.send(second)
        run.campaign = second
        await wait_until(lambda: run.status() == "sent", what="the second campaign")
        took = asyncio.get_running_loop().time() - started
        final = run.rows()
    assert took < TIMEOUT + 1.0  # no hang beyond the timeout plus a second
    assert all(final[e] == Row("sent", None, 1) for e in EMAILS[:3])
    assert run.copies() == dict.fromkeys(EMAILS[:3], 2)  # one per campaign, none lost or doubled
    assert len(sink.seen("connect")) == 2


@pytest.mark.parametrize(
    "data",
    [
        b"Subject: dots\r\n\r\n.\r\n..\r\n.hidden\r\nend\r\n",  # wire form: sent as it is
        b".starts with a dot\r\n\r\nbody\r\n",
        b"Subject: bare\n\n.line\nlone\rcr\r\nend",  # not wire form: line endings made CRLF
    ],
)
async def test_lines_starting_with_a_dot_arrive_intact(sink: SinkServer, data: bytes) -> None:
    """Dot-stuffing (RFC 5321 4.5.2), pipelined and one by one: what the relay stores is the
    message, line for line, with bare CR or LF turned into CRLF."""
    pool = SmtpPool(RelayConfig("127.0.0.1", sink.port), size=1)
    try:
        async with pool.connection() as conn:
            outcome = await conn.send("news@example.org", "a@example.org", data, False)
    finally:
        await pool.close()
    assert isinstance(outcome, Sent), outcome
    wire = re.sub(rb"\r\n|\r|\n", b"\r\n", data)
    wire = wire if wire.endswith(b"\r\n") else wire + b"\r\n"
    assert [m.raw for m in sink.messages] == [wire]


async def test_commands_are_pipelined_exactly_when_the_relay_offers_it(sink: SinkServer) -> None:
    """RFC 2920: MAIL FROM, RCPT TO and DATA in one write only to a relay that says
    PIPELINING in its EHLO; one connection carries every message either way."""
    pool = SmtpPool(RelayConfig("127.0.0.1", sink.port), size=1)
    try:
        for email in EMAILS[:3]:
            async with pool.connection() as conn:
                data = b"Subject: hi\r\n\r\nhello\r\n"
                assert isinstance(await conn.send("news@example.org", email, data, False), Sent)
    finally:
        await pool.close()
    assert [e.detail for e in sink.seen("read")] == [grouped(sink)] * 3
    assert [m.rcpt_tos for m in sink.messages] == [[e] for e in EMAILS[:3]]
    assert len(sink.seen("connect")) == 1
