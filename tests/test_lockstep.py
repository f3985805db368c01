"""Deterministic lockstep G2 (reliability-plan b.2 test 10): an answered opt-out stops the mail.

A campaign goes to r0..r39. The sink holds its reply to the DATA of each even recipient r_i
until the test has unsubscribed r_{i+1} by one of the opt-out paths and got the answer. With
one SMTP connection, r_{i+1} cannot have been checked yet, so it must never be sent. With
four connections r_{i+1} may already be in flight; the oracle is then the outbox column
``checked_at`` (when the send-time consent check passed): no recipient whose check came after
its opt-out was answered may ever be sent. The same oracle holds for four workers (four
senders, one connection each) sharing one PostgreSQL database.
"""

import time
from collections import Counter
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from sqlalchemy import Connection, select

from mailer.bootstrap import Mailer, open_mailer
from mailer.domain.ledger import Evidence
from mailer.domain.tokens import LinkClaim, TokenCodec
from mailer.store.tables import outbox, subscribers
from mailer.web.app import create_app
from tests.conftest import SECRET, auth, init_db, make_settings, seed_confirmed
from tests.databases import POSTGRESQL, SQLITE, active
from tests.harness import SinkServer, wait_until
from tests.postgres import pg_url, requires_postgres

__all__ = ["pg_url"]  # the fixture, used by the PostgreSQL variant

N = 40
EMAILS = [f"r{i}@example.org" for i in range(N)]
ODD = EMAILS[1::2]
EVEN = EMAILS[0::2]
CODEC = TokenCodec([SECRET], clock=time.time)
STAFF = Evidence(channel="cli", actor="tests")
W = 1.0
"""Erase leaves no outbox row to audit: a copy to an erased person must at least have
reached the relay within this many seconds of the answer (it was in flight already)."""

TEETH_RUNS = 3
"""Runs of the four-connection lockstep until one race goes the opt-out's way."""
ODD_REPLY_DELAY = {SQLITE: 0.05, POSTGRESQL: 0.2}
"""Seconds the relay takes over the odd recipients' DATA with several connections. An opt-out
takes several round trips on PostgreSQL, so connections must stay busy longer there for the
race to go the opt-out's way at times."""

# path -> the skip reason its opt-out leaves on a queued campaign message (None: no row left)
PATHS: dict[str, str | None] = {
    "one-click-urlencoded": "unsubscribed",
    "one-click-multipart": "unsubscribed",
    "page-form-all": "suppressed",
    "api-delete": "suppressed",
    "api-delete-list": "unsubscribed",
    "service-unsubscribe-address": "suppressed",
    "people-suppress": "suppressed",
    "people-erase": None,
}


@dataclass
class Lockstep:
    """Runs the opt-outs from inside the sink's DATA hook and records when each was answered."""

    mailer: Mailer
    http: TestClient[Any, Any]
    path: str
    list_uid: str
    api_key: str
    answered: dict[str, tuple[float, datetime]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    async def hook(self, rcpt: str) -> None:
        i = EMAILS.index(rcpt)
        if i % 2 or i + 1 >= N:
            return
        target = EMAILS[i + 1]
        try:
            await self.opt_out(target)
        except Exception as exc:  # recorded, so the test fails with it instead of a 500 reply
            self.errors.append(f"{self.path} {target}: {exc!r}")
            return
        self.answered[target] = (time.monotonic(), datetime.now(UTC))

    async def opt_out(self, email: str) -> None:
        m, http = self.mailer, self.http
        subject = m.consent.identify(email)[1]
        token = CODEC.unsubscribe_token(LinkClaim(subject, self.list_uid))
        if self.path == "one-click-urlencoded":
            r = await http.post(f"/unsubscribe/{token}", data={"List-Unsubscribe": "One-Click"})
        elif self.path == "one-click-multipart":
            form = aiohttp.FormData()
            form.add_field("List-Unsubscribe", "One-Click", content_type="text/plain")
            assert form.is_multipart
            r = await http.post(f"/unsubscribe/{token}", data=form)
        elif self.path == "page-form-all":
            r = await http.post(f"/unsubscribe/{token}", data={"scope": "all"})
        elif self.path in ("api-delete", "api-delete-list"):
            body = {"email": email} | ({"list": "news"} if self.path == "api-delete-list" else {})
            r = await http.delete("/api/v1/subscriptions", json=body, headers=auth(self.api_key))
            assert await r.json() == {"status": "unsubscribed"}
        elif self.path == "service-unsubscribe-address":
            assert (await m.consent.unsubscribe_address(email, None, STAFF)).is_global
            return
        elif self.path == "people-suppress":
            assert await m.people.suppress(email, STAFF) is True
            return
        else:
            assert self.path == "people-erase"
            await m.people.erase(email, STAFF)
            return
        assert r.status == 200, await r.text()


@dataclass(frozen=True)
class Row:
    status: str
    reason: str | None
    checked_at: datetime | None
    owner: str | None


async def rows(m: Mailer, campaign: int) -> dict[str, Row]:
    def read(conn: Connection) -> list[Any]:
        q = (
            select(
                subscribers.c.email,
                outbox.c.status,
                outbox.c.reason,
                outbox.c.checked_at,
                outbox.c.lease_owner,
            )
            .join(subscribers, subscribers.c.id == outbox.c.subscriber_id)
            .where(outbox.c.campaign_id == campaign, outbox.c.kind == "campaign")
        )
        return list(conn.execute(q).all())

    return {email: Row(*values) for email, *values in await m.db.read(read)}


async def run_lockstep(
    tmp_path: Path,
    sink: SinkServer,
    path: str,
    connections: int,
    workers: int = 1,
    database_url: str | None = None,
) -> tuple[Lockstep, dict[str, Row]]:
    """Send the campaign with the hook in place; return the recorder and the final rows.

    With several connections (or workers) the relay also answers the odd recipients' DATA
    slowly, so connections are often busy with them while an opt-out runs: then r_{i+1} is
    sometimes not yet checked when its opt-out is answered, and sometimes already in flight.
    """
    if connections * workers > 1:
        sink.data_delays.update(dict.fromkeys(ODD, ODD_REPLY_DELAY[active.name]))
    settings = make_settings(
        tmp_path,
        smtp_host="127.0.0.1",
        smtp_port=sink.port,
        smtp_connections=connections,
        api_rate_per_minute=10_000,
        **({"database_url": database_url} if database_url else {}),
    )
    await init_db(settings)
    async with AsyncExitStack() as stack:
        m = await stack.enter_async_context(open_mailer(settings, sending=True))
        for _ in range(workers - 1):
            await stack.enter_async_context(open_mailer(settings, sending=True))
        http = await stack.enter_async_context(TestClient(TestServer(create_app(m))))
        target = await m.lists.create("news", "Example News")
        await seed_confirmed(m, target.id, EMAILS)
        lockstep = Lockstep(m, http, path, target.uid, await m.api_keys.create("lockstep"))
        sink.before_data_reply = lockstep.hook
        campaign = await m.campaigns.create("news", "Lockstep", "Hello **you**.", "campaign")
        await m.campaigns.send(campaign)

        async def sent() -> bool:
            return (await m.campaigns.get(campaign)).status == "sent"

        await wait_until(sent, timeout=20, what="the campaign to finish")
        sink.before_data_reply = None
        return lockstep, await rows(m, campaign)


def copies(sink: SinkServer) -> Counter[str]:
    """Messages the sink holds, per recipient."""
    return Counter(rcpt for m in sink.messages for rcpt in m.rcpt_tos)


@pytest.mark.parametrize("path", list(PATHS))
async def test_lockstep_one_connection_never_sends_after_answer(
    tmp_path: Path, sink: SinkServer, path: str
) -> None:
    """One connection: every r_{i+1} opted out while r_i's DATA was held is never sent."""
    lockstep, final = await run_lockstep(tmp_path, sink, path, connections=1)
    sent_to = copies(sink)
    assert lockstep.errors == []
    assert sorted(lockstep.answered) == sorted(ODD)
    for email in EVEN:
        assert final[email].status == "sent", email
        assert sent_to[email] == 1, email
    for email in ODD:
        assert sent_to[email] == 0, email
        assert email not in [e.detail for e in sink.seen("rcpt")], email
        if PATHS[path] is None:
            assert email not in final  # erased: the message went with the person
        else:
            assert (final[email].status, final[email].reason) == ("skipped", PATHS[path]), email
    assert len(sink.messages) == len(EVEN)


@pytest.mark.parametrize("path", list(PATHS))
async def test_lockstep_four_connections_checked_after_answer_never_sent(
    tmp_path: Path, path: str
) -> None:
    """Four connections: a message whose consent check came after the opt-out answer never goes.

    Whether a race goes the opt-out's way depends on timing (a loaded machine can settle every
    one before its answer); every run is audited in full, and a new run (fresh sink and
    database) is made until one shows the oracle has teeth, at most ``TEETH_RUNS`` times.
    """
    for run in range(TEETH_RUNS):
        sink = SinkServer()
        await sink.start()
        try:
            home = tmp_path / f"run{run}"
            home.mkdir()
            lockstep, final = await run_lockstep(home, sink, path, connections=4)
            skipped = check_checked_after_answer_never_sent(sink, path, lockstep, final)
        finally:
            await sink.stop()
        if skipped:
            return
    pytest.fail(f"in {TEETH_RUNS} runs no race went the opt-out's way: the oracle has no teeth")


@requires_postgres
@pytest.mark.parametrize("path", list(PATHS))
async def test_lockstep_four_workers_on_postgres(
    tmp_path: Path, sink: SinkServer, path: str, pg_url: str
) -> None:
    """Four workers on one PostgreSQL database: the same oracle as four connections."""
    lockstep, final = await run_lockstep(
        tmp_path, sink, path, connections=1, workers=4, database_url=pg_url
    )
    assert check_checked_after_answer_never_sent(sink, path, lockstep, final) >= 1  # has teeth
    assert len({r.owner for r in final.values() if r.status == "sent"}) >= 2  # shared work


def check_checked_after_answer_never_sent(
    sink: SinkServer, path: str, lockstep: Lockstep, final: dict[str, Row]
) -> int:
    """No opted-out recipient whose check came after the answer was sent; returns how many
    opted-out recipients were skipped (the races that went the opt-out's way)."""
    sent_to = copies(sink)
    assert lockstep.errors == []
    assert sorted(lockstep.answered) == sorted(ODD)
    assert all(final[e].status == "sent" and sent_to[e] == 1 for e in EVEN)
    assert all(sent_to[e] <= 1 for e in ODD)
    skipped = 0
    for email in ODD:
        answered_mono, answered_at = lockstep.answered[email]
        if PATHS[path] is None:
            # Erased: no row is left to audit; any copy was already in flight at the answer.
            assert email not in final
            late = [e for e in sink.seen("mail") if e.at > answered_mono + W]
            arrived = [e.at for e in sink.seen("rcpt") if e.detail == email]
            assert all(at <= answered_mono + W for at in arrived), (email, late)
            skipped += sent_to[email] == 0
            continue
        row = final[email]
        if row.status == "sent":
            assert sent_to[email] == 1, email
            assert row.checked_at is not None and row.checked_at <= answered_at, email
        else:
            assert (row.status, row.reason) == ("skipped", PATHS[path]), email
            assert sent_to[email] == 0, email
            skipped += 1
        if row.checked_at is not None and row.checked_at > answered_at:
            assert row.status != "sent" and sent_to[email] == 0, email
    return skipped
