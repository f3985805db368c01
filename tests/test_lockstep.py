"""Deterministic lockstep G2 (reliability-plan b.2 test 10): an answered opt-out stops the mail.

A campaign goes to r0..r39. The sink holds its reply to the DATA of each even recipient r_i
until the test has unsubscribed r_{i+1} by one of the opt-out paths and got the answer. With
one SMTP connection, r_{i+1} cannot have been checked yet, so it must never be sent. With
four connections r_{i+1} may already be in flight; the oracle is then the outbox column
``checked_at`` (when the send-time consent check passed): no recipient whose check came after
its opt-out was answered may ever be sent.
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

from mailer.bootstrap import Mailer, open_mailer
from mailer.domain.ledger import Evidence
from mailer.domain.tokens import LinkClaim, TokenCodec
from mailer.web.app import create_app
from tests.conftest import SECRET, auth, init_db, make_settings, seed_confirmed
from tests.databases import POSTGRESQL, SQLITE, Db, active
from tests.harness import SinkServer, as_utc, query, wait_until

N = 40
EMAILS = [f"r{i}@example.org" for i in range(N)]
ODD = EMAILS[1::2]
EVEN = EMAILS[0::2]
CODEC = TokenCodec([SECRET], clock=time.time)
STAFF = Evidence(channel="cli", actor="tests")
W = 1.0
"""Erase leaves no outbox row to audit: a copy to an erased person must at least have
reached the relay within this many seconds of the answer (it was in flight already)."""

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


def rows(db: Db, campaign: int) -> dict[str, Row]:
    found = query(
        db,
        "SELECT s.email, o.status, o.reason, o.checked_at FROM outbox o"
        " JOIN subscriber s ON s.id = o.subscriber_id"
        " WHERE o.campaign_id = ? AND o.kind = 'campaign'",
        campaign,
    )
    return {
        email: Row(
            status,
            reason,
            None if at is None else as_utc(at),
        )
        for email, status, reason, at in found
    }


def seed(m: Mailer, db: Db) -> None:
    """``EMAILS`` as confirmed subscribers of "news", in id order, inserted directly (fast)."""
    list_id = query(db, "SELECT id FROM mailing_list WHERE slug = 'news'")[0][0]
    seed_confirmed(m, list_id, EMAILS)


async def run_lockstep(
    tmp_path: Path, sink: SinkServer, path: str, connections: int
) -> tuple[Lockstep, dict[str, Row]]:
    """Send the campaign with the hook in place; return the recorder and the final rows.

    With several connections the relay also answers the odd recipients' DATA slowly, so
    connections are often busy with them while an opt-out runs: then r_{i+1} is sometimes
    not yet checked when its opt-out is answered, and sometimes already in flight.
    """
    if connections > 1:
        sink.data_delays.update(dict.fromkeys(ODD, ODD_REPLY_DELAY[active.name]))
    settings = make_settings(
        tmp_path,
        smtp_host="127.0.0.1",
        smtp_port=sink.port,
        smtp_connections=connections,
        api_rate_per_minute=10_000,
    )
    await init_db(settings)
    db = settings.database_url
    async with AsyncExitStack() as stack:
        m = await stack.enter_async_context(open_mailer(settings, sending=True))
        http = await stack.enter_async_context(TestClient(TestServer(create_app(m))))
        target = await m.lists.create("news", "Example News")
        seed(m, db)
        lockstep = Lockstep(m, http, path, target.uid, await m.api_keys.create("lockstep"))
        sink.before_data_reply = lockstep.hook
        campaign = await m.campaigns.create("news", "Lockstep", "Hello **you**.", "campaign")
        await m.campaigns.send(campaign)
        await wait_until(
            lambda: query(db, "SELECT status FROM campaign WHERE id = ?", campaign) == [("sent",)],
            timeout=20,
            what="the campaign to finish",
        )
        sink.before_data_reply = None
        return lockstep, rows(db, campaign)


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
    tmp_path: Path, sink: SinkServer, path: str
) -> None:
    """Four connections: a message whose consent check came after the opt-out answer never goes."""
    lockstep, final = await run_lockstep(tmp_path, sink, path, connections=4)
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
    assert skipped >= 1  # the race went the opt-out's way at least once: the oracle has teeth
