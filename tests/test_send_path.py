"""The send path (G1, G2, G6): send-time consent check, SMTP fault outcomes, crash recovery."""

import asyncio
import shutil
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from mailer.bootstrap import Mailer, open_mailer
from mailer.config import Settings
from mailer.domain.consent import OptInOutcome
from mailer.domain.ledger import Evidence
from mailer.domain.retry import BASE_DELAY, next_attempt
from mailer.domain.tokens import TokenCodec
from mailer.services.messages import MessageConfig, MessageFactory
from mailer.services.ports import MailConnection
from mailer.services.sending import Sender, SendPolicy
from mailer.transport.outcomes import Outcome
from mailer.web.app import create_app
from tests.conftest import SECRET, auth, init_db, make_settings
from tests.databases import Db, active
from tests.harness import MutableClock, SinkServer, as_utc, query, wait_until

EVIDENCE = Evidence(channel="api", actor="tests")
ANN, BOB = "ann@example.org", "bob@example.org"
MARK1, MARK2 = "mark-one@example.org", "mark-two@example.org"


@dataclass(frozen=True)
class Row:
    status: str
    reason: str | None
    attempts: int
    next_attempt_at: datetime


def row_of(db_path: Db, email: str) -> Row:
    """The one outbox row addressed to ``email``, read through a separate connection."""
    found = query(
        db_path,
        "SELECT o.status, o.reason, o.attempts, o.next_attempt_at FROM outbox o"
        " JOIN subscriber s ON s.id = o.subscriber_id WHERE s.email = ?",
        email,
    )
    assert len(found) == 1, found
    status, reason, attempts, at = found[0]
    return Row(status, reason, attempts, as_utc(at))


def execute(db_path: Db, sql: str, *params: Any) -> None:
    """Change the database behind the mailer's back (as a crash would leave it), committed."""
    with active.connect(db_path) as conn, conn:
        assert conn.execute(sql, params).rowcount == 1


def status_of(db_path: Db, email: str) -> str:
    return row_of(db_path, email).status


def db_of(settings: Settings) -> Db:
    return settings.database_url


async def settled(db_path: Db, email: str, status: str = "sent") -> None:
    await wait_until(
        lambda: status_of(db_path, email) == status, what=f"{email}'s message to be {status}"
    )


async def queue_requests(
    settings: Settings, emails: list[str], clock: MutableClock | None = None
) -> str:
    """With no worker running: create list "news" and queue a confirmation request per address.

    Returns an API key, made while no sender runs.
    """
    async with open_mailer(settings, sending=False, clock=clock) as m:
        await m.lists.create("news", "Example News")
        for email in emails:
            outcome = await m.consent.request_opt_in(email, "news", None, EVIDENCE)
            assert outcome is OptInOutcome.REQUESTED
        return await m.api_keys.create("tests")


async def opt_in(m: Mailer, email: str) -> None:
    assert await m.consent.request_opt_in(email, "news", None, EVIDENCE) is OptInOutcome.REQUESTED


def serial_settings(tmp_path: Path, sink: SinkServer) -> Settings:
    return make_settings(tmp_path, smtp_host="127.0.0.1", smtp_port=sink.port, smtp_connections=1)


# --- G1/G2: the consent check runs when the message is claimed, not when it was queued ---


@pytest.mark.parametrize("scope", [None, "news"], ids=["global", "list"])
async def test_unsubscribe_after_queueing_stops_confirmation_request(
    tmp_path: Path, sink: SinkServer, scope: str | None
) -> None:
    """A request queued before an unsubscribe is skipped at claim time; an untouched one is sent."""
    settings = serial_settings(tmp_path, sink)
    await init_db(settings)
    db = db_of(settings)
    async with open_mailer(settings, sending=False) as m:
        await m.lists.create("news", "Example News")
        await opt_in(m, ANN)
        await opt_in(m, BOB)
        await m.consent.unsubscribe_address(ANN, scope, EVIDENCE)
    assert status_of(db, ANN) == "queued"  # the unsubscribe did not touch the queued row
    async with open_mailer(settings, sending=True):
        await settled(db, BOB, "sent")
        await wait_until(lambda: status_of(db, ANN) != "queued", what="ann's row claimed")
    ann = row_of(db, ANN)
    assert (ann.status, ann.reason) == ("skipped", "no-longer-pending")
    assert sink.to(ANN) == []
    assert len(sink.to(BOB)) == 1


@pytest.mark.parametrize("via", ["service", "http"])
async def test_unsubscribe_answered_during_hand_off_stops_next_message(
    tmp_path: Path, sink: SinkServer, via: str
) -> None:
    """G2 lockstep: B unsubscribes (answered) while A's DATA is in flight -> B is never sent."""
    settings = serial_settings(tmp_path, sink)
    await init_db(settings)
    db = db_of(settings)
    key = await queue_requests(settings, [ANN, BOB])
    events: list[str] = []
    ready = asyncio.Event()
    running: dict[str, Any] = {}

    async def unsubscribe_bob_first(rcpt: str) -> None:
        events.append(f"DATA {rcpt}")
        if rcpt != ANN:
            return
        await ready.wait()
        if via == "http":
            r = await running["http"].delete(
                "/api/v1/subscriptions", json={"email": BOB}, headers=auth(key)
            )
            events.append(f"answered {r.status} {await r.json()}")
        else:
            done = await running["mailer"].consent.unsubscribe_address(BOB, None, EVIDENCE)
            events.append(f"answered global={done.is_global}")
        # B may already be reserved (claimed into the prefetch buffer), but not handed off:
        # its consent check runs right before its own hand-off, after this answer.
        assert status_of(db, BOB) in ("queued", "sending")
        assert sink.to(BOB) == []
        events.append("B not handed off")

    sink.before_data_reply = unsubscribe_bob_first
    async with AsyncExitStack() as stack:
        m = await stack.enter_async_context(open_mailer(settings, sending=True))
        http = await stack.enter_async_context(TestClient(TestServer(create_app(m))))
        running.update(mailer=m, http=http)
        ready.set()
        await settled(db, ANN, "sent")
        await wait_until(
            lambda: status_of(db, BOB) not in ("queued", "sending"), what="bob's row settled"
        )
    answer = "answered 200 {'status': 'unsubscribed'}" if via == "http" else "answered global=True"
    assert events == [f"DATA {ANN}", answer, "B not handed off"]
    bob = row_of(db, BOB)
    assert (bob.status, bob.reason) == ("skipped", "no-longer-pending")
    assert sink.to(BOB) == []
    assert len(sink.to(ANN)) == 1


# --- G6: each SMTP outcome maps to the right row state, with no duplicate at the sink ---

FAULTS = [
    # (where, reply, first status, retried)
    ("rcpt", "550 5.1.1 No such user", "failed", False),
    ("rcpt", "451 4.3.0 Try again later", "queued", True),
    ("rcpt", "421 4.3.2 Service shutting down", "queued", True),
    ("data", "554 5.7.1 Message rejected", "failed", False),
    ("data", "452 4.3.1 Insufficient storage", "queued", True),
    ("drop", None, "unknown", False),
]


@pytest.mark.parametrize(
    ("where", "reply", "first_status", "retried"),
    FAULTS,
    ids=["rcpt-550", "rcpt-451", "rcpt-421", "data-554", "data-452", "drop-in-data"],
)
async def test_smtp_fault_outcome(
    tmp_path: Path,
    sink: SinkServer,
    where: str,
    reply: str | None,
    first_status: str,
    retried: bool,
) -> None:
    """5xx fails, 4xx requeues until due then sends once, a drop inside DATA is never retried."""
    settings = serial_settings(tmp_path, sink)
    await init_db(settings)
    db = db_of(settings)
    clock = MutableClock()
    if where == "rcpt":
        sink.rcpt_replies[ANN] = str(reply)
    elif where == "data":
        sink.data_replies[ANN] = str(reply)
    else:
        sink.drop_in_data.add(ANN)
    async with open_mailer(settings, sending=True, clock=clock) as m:
        await m.lists.create("news", "Example News")
        await opt_in(m, ANN)
        await wait_until(lambda: row_of(db, ANN).attempts == 1, what="first attempt recorded")
        first = row_of(db, ANN)
        assert first.status == first_status
        assert first.reason is not None
        if reply is None:
            assert "no reply to DATA" in first.reason
        else:
            assert reply in first.reason
        if retried:
            assert first.next_attempt_at > clock.now()
        copies = len(sink.to(ANN))
        assert copies == (1 if where == "drop" else 0)

        relay_closed = reply is not None and reply.startswith("421")
        await opt_in(m, MARK1)
        if relay_closed:
            # 421 backs the whole relay off: nothing else is handed off until it reopens.
            await asyncio.sleep(0.5)
            assert status_of(db, MARK1) == "queued"
            assert sink.to(MARK1) == []
        else:
            # A later message goes out while ANN's retry is not due: ANN is left alone.
            await settled(db, MARK1)
            assert row_of(db, ANN) == first
            assert len(sink.to(ANN)) == copies

        # The fault is gone and time moves far past any backoff.
        sink.rcpt_replies.clear()
        sink.data_replies.clear()
        sink.drop_in_data.clear()
        clock.advance(timedelta(days=3).total_seconds())
        if retried:
            await settled(db, ANN, "sent")
        if relay_closed:
            await settled(db, MARK1)
        await opt_in(m, MARK2)  # claimed after any due retry of ANN (one sender, due order)
        await settled(db, MARK2)
    final = row_of(db, ANN)
    if retried:
        assert (final.status, final.attempts) == ("sent", 2)
        assert len(sink.to(ANN)) == 1
    else:
        assert final == first
        assert len(sink.to(ANN)) == copies
    assert all(len(sink.to(a)) == 1 for a in (MARK1, MARK2))


# --- G6: crashes, give-up, graceful stop ---


async def test_row_left_sending_by_crash_is_failed_not_sent(
    tmp_path: Path, sink: SinkServer
) -> None:
    """A row a crash left in 'sending' is reported failed ('interrupted') at start, never sent."""
    settings = serial_settings(tmp_path, sink)
    await init_db(settings)
    db = db_of(settings)
    await queue_requests(settings, [ANN, BOB])
    execute(
        db,
        "UPDATE outbox SET status = 'sending' WHERE subscriber_id ="
        " (SELECT id FROM subscriber WHERE email = ?)",
        ANN,
    )
    async with open_mailer(settings, sending=True):
        await settled(db, BOB, "sent")
    ann = row_of(db, ANN)
    assert ann.status == "failed"
    assert ann.reason is not None and "interrupted" in ann.reason
    assert sink.to(ANN) == []
    assert len(sink.to(BOB)) == 1
    assert query(db, "SELECT count(*) FROM outbox WHERE status = 'sending'") == [(0,)]


async def test_temporary_failure_after_a_day_gives_up(tmp_path: Path, sink: SinkServer) -> None:
    """A 4xx for a message first queued over 24 h ago fails it ('gave up'); a younger one waits."""
    settings = serial_settings(tmp_path, sink)
    await init_db(settings)
    db = db_of(settings)
    clock = MutableClock()
    await queue_requests(settings, [ANN], clock=clock)
    clock.advance(timedelta(hours=1).total_seconds())
    async with open_mailer(settings, sending=False, clock=clock) as m:
        await opt_in(m, BOB)
    clock.advance(timedelta(hours=23, minutes=1).total_seconds())
    sink.rcpt_replies[ANN] = sink.rcpt_replies[BOB] = "451 4.3.0 Try again later"
    async with open_mailer(settings, sending=True, clock=clock):
        await wait_until(lambda: row_of(db, ANN).attempts == 1, what="ann's attempt")
        await wait_until(lambda: row_of(db, BOB).attempts == 1, what="bob's attempt")
    ann, bob = row_of(db, ANN), row_of(db, BOB)
    assert ann.status == "failed"
    assert ann.reason == "gave up retrying: RCPT TO: 451 4.3.0 Try again later"
    assert bob.status == "queued"
    assert bob.next_attempt_at > clock.now()
    assert sink.messages == []


def test_backoff_jitter_bounds_and_give_up_boundary() -> None:
    """The first retry lands 15-45 s later; a retry exactly at the give-up age is still allowed."""
    now = datetime(2026, 11, 24, 12, tzinfo=UTC)
    day = timedelta(hours=24)
    low = next_attempt(0, now, now, day, 0.0)
    high = next_attempt(0, now, now, day, 0.999)
    assert low == now + BASE_DELAY / 2
    assert high is not None and now + BASE_DELAY < high < now + BASE_DELAY * 3 / 2
    edge = now + BASE_DELAY - day  # first queued so that the next try is exactly 24 h after it
    assert next_attempt(0, edge, now, day, 0.5) == now + BASE_DELAY
    assert next_attempt(0, edge - timedelta(microseconds=1), now, day, 0.5) is None


async def test_stop_lets_message_in_hand_finish(tmp_path: Path, sink: SinkServer) -> None:
    """Stop while the relay holds its DATA reply: it waits, records 'sent', claims nothing more."""
    settings = serial_settings(tmp_path, sink)
    await init_db(settings)
    db = db_of(settings)
    await queue_requests(settings, [ANN, BOB])
    entered, release = asyncio.Event(), asyncio.Event()

    async def hold(rcpt: str) -> None:
        entered.set()
        await release.wait()

    sink.before_data_reply = hold
    running = open_mailer(settings, sending=True)
    await running.__aenter__()
    closing: asyncio.Task[bool | None] | None = None
    try:
        await asyncio.wait_for(entered.wait(), 5)
        assert status_of(db, ANN) == "sending"
        closing = asyncio.create_task(running.__aexit__(None, None, None))
        await asyncio.sleep(0.2)
        assert not closing.done()  # the stop waits for the message in hand
        release.set()
        await asyncio.wait_for(closing, 5)
    finally:
        release.set()
        if closing is None:
            await running.__aexit__(None, None, None)
    ann = row_of(db, ANN)
    assert (ann.status, ann.attempts) == ("sent", 1)
    assert len(sink.to(ANN)) == 1
    assert status_of(db, BOB) == "queued"  # left for the next start, not half-sent
    assert sink.to(BOB) == []
    assert query(db, "SELECT count(*) FROM outbox WHERE status = 'sending'") == [(0,)]


# --- A bug never leaves a row 'sending' until the next restart (G6 without a restart) ---


async def test_message_that_cannot_be_built_fails_at_once(tmp_path: Path, sink: SinkServer) -> None:
    """A template error (an undefined name) marks the row failed with the cause; nothing sent."""
    templates = tmp_path / "templates"
    shutil.copytree(Path(__file__).resolve().parent.parent / "templates", templates)
    body = templates / "email" / "confirm.txt.j2"
    body.write_text(body.read_text().replace("{{ confirm_url }}", "{{ confirm_url }} {{ nope }}"))
    settings = make_settings(
        tmp_path, smtp_host="127.0.0.1", smtp_port=sink.port, templates_dir=templates
    )
    await init_db(settings)
    await queue_requests(settings, [ANN])
    async with open_mailer(settings, sending=True):
        await settled(db_of(settings), ANN, "failed")
    row = row_of(db_of(settings), ANN)
    assert row.reason == "not sent: the message could not be built (UndefinedError)"
    assert sink.messages == []


class _RaisingConnection:
    async def send(self, sender: str, recipient: str, data: bytes, smtputf8: bool) -> Outcome:
        raise RuntimeError("transport bug")


class _RaisingTransport:
    @asynccontextmanager
    async def connection(self) -> AsyncIterator[MailConnection]:
        yield _RaisingConnection()


async def test_hand_off_that_raises_is_unknown_not_stuck(tmp_path: Path, sink: SinkServer) -> None:
    """A transport raising mid-hand-off leaves the row 'unknown' (never retried), not 'sending'."""
    settings = serial_settings(tmp_path, sink)
    await init_db(settings)
    await queue_requests(settings, [ANN])
    async with open_mailer(settings, sending=False) as m:
        factory = MessageFactory(
            m.renderer,
            TokenCodec([SECRET], clock=time.time),
            m.clock,
            MessageConfig(settings.base_url, settings.from_addr, "test"),
        )
        policy = SendPolicy()
        sender = Sender(m.db, _RaisingTransport(), factory, m.clock, m.metrics, policy, "test")
        sender.recorder.start()
        assert await sender.send_one() is True
        assert await sender.send_one() is False
        await sender.recorder.stop()
    row = row_of(db_of(settings), ANN)
    assert row.status == "unknown"
    assert row.reason == "the hand-off raised RuntimeError; may have been delivered"
