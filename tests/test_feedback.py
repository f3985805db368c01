"""Bounces and complaints change what an address may receive (G5), whichever way they arrive.

The rules (``mailer.domain.feedback``) are tested directly; the service runs against a real
mailer (SQLite file, worker, aiosmtpd sink) whose messages really went out first.
"""

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from mailer.bootstrap import Mailer, open_mailer
from mailer.config import Settings
from mailer.domain.feedback import (
    DETAIL_MAX,
    Feedback,
    FeedbackKind,
    SoftBounceRule,
    SoftBounces,
    describe,
    replaces,
)
from mailer.domain.ledger import Evidence
from mailer.errors import InvalidAddress
from mailer.services.feedback import Applied
from mailer.statuses import Channel
from tests.conftest import init_db, links, make_settings, path_of
from tests.harness import MutableClock, SinkServer, wait_until

HARD = Feedback(FeedbackKind.HARD_BOUNCE, "5.1.1", "550 5.1.1 <a@example.org>: no such user")
SOFT = Feedback(FeedbackKind.SOFT_BOUNCE, "4.2.2", "452 4.2.2 mailbox full")
COMPLAINT = Feedback(FeedbackKind.COMPLAINT, None, "abuse report from a feedback loop")
RELAY = Evidence(channel=Channel.BOUNCE.value, actor="test-relay")
FBL = Evidence(channel=Channel.COMPLAINT.value, actor="test-fbl")
T0 = datetime(2026, 11, 1, tzinfo=UTC)


# -- the rules ------------------------------------------------------------------------------


def test_soft_bounces_count_up_within_the_window_and_start_over_after_it() -> None:
    rule = SoftBounceRule(limit=3, window=timedelta(days=30))
    first = rule.count(None, T0)
    assert first == SoftBounces(1, T0)
    second = rule.count(first, T0 + timedelta(days=10))
    assert second == SoftBounces(2, T0)
    assert not rule.exhausted(second)
    third = rule.count(second, T0 + timedelta(days=30))
    assert third == SoftBounces(3, T0) and rule.exhausted(third)
    assert rule.count(second, T0 + timedelta(days=31)) == SoftBounces(1, T0 + timedelta(days=31))


def test_a_delivery_keeps_its_strongest_feedback() -> None:
    assert replaces(None, FeedbackKind.SOFT_BOUNCE)
    assert replaces("soft-bounce", FeedbackKind.HARD_BOUNCE)
    assert replaces("hard-bounce", FeedbackKind.COMPLAINT)
    assert not replaces("hard-bounce", FeedbackKind.HARD_BOUNCE)
    assert not replaces("hard-bounce", FeedbackKind.SOFT_BOUNCE)
    assert not replaces("complaint", FeedbackKind.HARD_BOUNCE)


def test_the_stored_detail_is_one_printable_line_of_bounded_length() -> None:
    text = describe(Feedback(FeedbackKind.HARD_BOUNCE, "5.1.1", "line one\r\nline\x00two\t " * 80))
    assert text.startswith("hard-bounce 5.1.1: line one line two")
    assert text.isprintable() and len(text) == DETAIL_MAX
    assert describe(Feedback(FeedbackKind.COMPLAINT)) == "complaint"


# -- the service against a real mailer ------------------------------------------------------


@pytest.fixture
def clock() -> MutableClock:
    return MutableClock()


@pytest.fixture
async def running(
    tmp_path: Any, sink: SinkServer, clock: MutableClock
) -> AsyncIterator[tuple[Mailer, Settings]]:
    settings = make_settings(
        tmp_path, smtp_host="127.0.0.1", smtp_port=sink.port, soft_bounce_limit=3
    )
    await init_db(settings)
    async with open_mailer(settings, sending=True, clock=clock) as m:
        await m.lists.create("news", "Example News")
        yield m, settings


async def subscribe(m: Mailer, sink: SinkServer, email: str) -> int:
    """Opt in and confirm ``email`` through the real send path; return the confirm's row id."""
    evidence = Evidence(channel=Channel.API.value, actor="test")
    before = len(sink.to(email))
    await m.consent.request_opt_in(email, "news", None, evidence)
    await wait_until(lambda: len(sink.to(email)) > before, what=f"confirmation to {email}")
    token = path_of(links(sink.to(email)[-1])["confirm"]).rpartition("/")[2]
    await m.consent.confirm(token, evidence)
    return await delivery_id(m, email)


async def delivery_id(m: Mailer, email: str) -> int:
    export = await m.people.export(email, Evidence(channel=Channel.CLI.value, actor="test"))
    return int(export["deliveries"][-1]["id"])


async def export_of(m: Mailer, email: str) -> dict[str, Any]:
    return await m.people.export(email, Evidence(channel=Channel.CLI.value, actor="test"))


async def test_a_hard_bounce_suppresses_marks_the_delivery_and_is_recorded_once(
    running: tuple[Mailer, Settings], sink: SinkServer
) -> None:
    m, _ = running
    row = await subscribe(m, sink, "alice@example.org")
    await subscribe(m, sink, "bob@example.org")

    assert await m.feedback.for_delivery(row, HARD, RELAY) is Applied.SUPPRESSED
    assert await m.feedback.for_delivery(row, HARD, RELAY) is Applied.ALREADY

    alice = await export_of(m, "alice@example.org")
    assert alice["suppression"] == "bounced"
    [mark] = [d for d in alice["deliveries"] if d["id"] == row]
    assert mark["feedback"] == "hard-bounce"
    assert mark["feedback_detail"].startswith("hard-bounce 5.1.1: 550 5.1.1")
    suppressed = [e for e in alice["consent_events"] if e["event"] == "suppressed"]
    assert [(e["channel"], e["actor"]) for e in suppressed] == [("bounce", "test-relay")]
    assert (await export_of(m, "bob@example.org"))["suppression"] is None


async def test_soft_bounces_suppress_only_at_the_limit_and_a_repeat_is_not_counted(
    running: tuple[Mailer, Settings], sink: SinkServer
) -> None:
    m, _ = running
    row = await subscribe(m, sink, "carol@example.org")
    assert await m.feedback.for_delivery(row, SOFT, RELAY) is Applied.COUNTED
    assert await m.feedback.for_delivery(row, SOFT, RELAY) is Applied.ALREADY  # same DSN again
    assert await m.feedback.for_address("carol@example.org", SOFT, RELAY) is Applied.COUNTED
    assert (await export_of(m, "carol@example.org"))["suppression"] is None
    assert await m.feedback.for_address("Carol@Example.org", SOFT, RELAY) is Applied.SUPPRESSED
    assert (await export_of(m, "carol@example.org"))["suppression"] == "bounced"
    assert await m.feedback.for_address("carol@example.org", SOFT, RELAY) is Applied.ALREADY


async def test_soft_bounces_outside_the_window_start_a_new_count(
    running: tuple[Mailer, Settings], sink: SinkServer, clock: MutableClock
) -> None:
    m, _ = running
    await subscribe(m, sink, "dave@example.org")
    for _ in range(2):
        assert await m.feedback.for_address("dave@example.org", SOFT, RELAY) is Applied.COUNTED
    clock.advance(timedelta(days=31).total_seconds())
    for _ in range(2):
        assert await m.feedback.for_address("dave@example.org", SOFT, RELAY) is Applied.COUNTED
    assert (await export_of(m, "dave@example.org"))["suppression"] is None


async def test_a_complaint_suppresses_as_complained_even_over_a_bounce(
    running: tuple[Mailer, Settings], sink: SinkServer
) -> None:
    m, _ = running
    row = await subscribe(m, sink, "erin@example.org")
    await m.feedback.for_delivery(row, HARD, RELAY)
    assert await m.feedback.for_delivery(row, COMPLAINT, FBL) is Applied.SUPPRESSED
    erin = await export_of(m, "erin@example.org")
    assert erin["suppression"] == "complained"
    assert [d["feedback"] for d in erin["deliveries"] if d["id"] == row] == ["complaint"]
    channels = [e["channel"] for e in erin["consent_events"] if e["event"] == "suppressed"]
    assert channels == ["bounce", "complaint"]
    # a later bounce says nothing about what she wants: the complaint stays
    assert await m.feedback.for_address("erin@example.org", HARD, RELAY) is Applied.ALREADY
    assert (await export_of(m, "erin@example.org"))["suppression"] == "complained"
    # a suppressed address gets no more mail: a new opt-in sends nothing
    before = len(sink.to("erin@example.org"))
    await m.consent.request_opt_in("erin@example.org", "news", None, RELAY)
    assert len(sink.to("erin@example.org")) == before


async def test_feedback_about_unknown_people_or_rows_records_nothing(
    running: tuple[Mailer, Settings], sink: SinkServer
) -> None:
    m, _ = running
    assert await m.feedback.for_address("stranger@example.org", HARD, RELAY) is Applied.UNKNOWN
    assert await m.feedback.for_address("stranger@example.org", SOFT, RELAY) is Applied.UNKNOWN
    assert await m.feedback.for_delivery(999_999, COMPLAINT, FBL) is Applied.UNKNOWN
    assert await m.people.suppressions() == []
    with pytest.raises(InvalidAddress):
        await m.feedback.for_address("not an address", HARD, RELAY)


async def test_erasure_forgets_the_soft_bounce_count(
    running: tuple[Mailer, Settings], sink: SinkServer
) -> None:
    m, _ = running
    await subscribe(m, sink, "fay@example.org")
    for _ in range(2):
        await m.feedback.for_address("fay@example.org", SOFT, RELAY)
    await m.people.erase("fay@example.org", Evidence(channel=Channel.CLI.value, actor="test"))
    await subscribe(m, sink, "fay@example.org")  # a new, confirmed opt-in lifts `erased`
    assert await m.feedback.for_address("fay@example.org", SOFT, RELAY) is Applied.COUNTED


async def test_unsubscribing_a_confirmation_request_by_mail_is_global(
    running: tuple[Mailer, Settings], sink: SinkServer
) -> None:
    m, _ = running
    row = await subscribe(m, sink, "gus@example.org")
    mail = Evidence(channel=Channel.MAIL.value, actor="mailto")
    assert await m.feedback.unsubscribe_delivery(row, mail) is Applied.UNSUBSCRIBED
    gus = await export_of(m, "gus@example.org")
    assert gus["suppression"] == "unsubscribed"
    assert [s["status"] for s in gus["subscriptions"]] == ["unsubscribed"]
    await m.people.erase("gus@example.org", Evidence(channel=Channel.CLI.value, actor="test"))
    assert await m.feedback.unsubscribe_delivery(row, mail) is Applied.UNKNOWN
