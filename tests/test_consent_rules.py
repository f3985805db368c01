"""The pure consent rules: who may be sent what, and what an opt-in may trigger."""

from datetime import UTC, datetime, timedelta

import pytest

from mailer.domain.consent import (
    CONFIRM_DAILY_CAP,
    OptInOutcome,
    RequestHistory,
    SkipReason,
    may_send,
    next_suppression,
    opt_in_outcome,
)
from mailer.domain.ratelimit import KeyedLimiter, TokenBucket
from mailer.domain.retry import next_attempt
from mailer.statuses import MessageKind, SubscriptionStatus, SuppressionReason

C, P, U = SubscriptionStatus.CONFIRMED, SubscriptionStatus.PENDING, SubscriptionStatus.UNSUBSCRIBED
ALL_REASONS = list(SuppressionReason)
NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
WINDOW = timedelta(minutes=10)
NO_HISTORY = RequestHistory(None, 0)


@pytest.mark.parametrize("kind", [MessageKind.CAMPAIGN, MessageKind.PREVIEW])
def test_list_mail_needs_confirmed_and_unsuppressed(kind: MessageKind) -> None:
    """G1: only a confirmed, unsuppressed subscription may receive list mail."""
    assert may_send(kind, C, None) is None
    assert may_send(kind, P, None) is SkipReason.NOT_CONFIRMED
    assert may_send(kind, None, None) is SkipReason.NOT_CONFIRMED
    assert may_send(kind, U, None) is SkipReason.UNSUBSCRIBED
    for reason in ALL_REASONS:
        assert may_send(kind, C, reason) is SkipReason.SUPPRESSED


def test_announcement_needs_a_confirmed_subscription_anywhere() -> None:
    """A policy announcement goes to anyone confirmed on some list and not suppressed."""
    a = MessageKind.ANNOUNCEMENT
    assert may_send(a, None, None, confirmed_anywhere=True) is None
    assert may_send(a, None, None, confirmed_anywhere=False) is SkipReason.NOT_CONFIRMED
    for reason in ALL_REASONS:
        assert may_send(a, None, reason, confirmed_anywhere=True) is SkipReason.SUPPRESSED


def test_confirmation_request_rules() -> None:
    """A confirmation request goes only while pending, never over a blocking suppression."""
    assert may_send(MessageKind.CONFIRM, P, None) is None
    assert may_send(MessageKind.CONFIRM, P, SuppressionReason.UNSUBSCRIBED) is None
    assert may_send(MessageKind.CONFIRM, P, SuppressionReason.ERASED) is None
    for reason in (
        SuppressionReason.BOUNCED,
        SuppressionReason.COMPLAINED,
        SuppressionReason.MANUAL,
    ):
        assert may_send(MessageKind.CONFIRM, P, reason) is SkipReason.SUPPRESSED
    for status in (C, U, None):
        assert may_send(MessageKind.CONFIRM, status, None) is SkipReason.NO_LONGER_PENDING


def test_opt_in_outcomes() -> None:
    """Opt-in requests respect suppression, the resend window and the daily cap."""
    assert opt_in_outcome(None, None, NO_HISTORY, NOW, WINDOW) is OptInOutcome.REQUESTED
    assert opt_in_outcome(C, None, NO_HISTORY, NOW, WINDOW) is OptInOutcome.ALREADY_CONFIRMED
    assert (
        opt_in_outcome(C, SuppressionReason.UNSUBSCRIBED, NO_HISTORY, NOW, WINDOW)
        is OptInOutcome.REQUESTED
    )
    assert (
        opt_in_outcome(None, SuppressionReason.BOUNCED, NO_HISTORY, NOW, WINDOW)
        is OptInOutcome.SUPPRESSED
    )
    recent = RequestHistory(NOW - WINDOW + timedelta(seconds=1), 1)
    assert opt_in_outcome(P, None, recent, NOW, WINDOW) is OptInOutcome.RECENTLY_REQUESTED
    old = RequestHistory(NOW - WINDOW, 1)
    assert opt_in_outcome(P, None, old, NOW, WINDOW) is OptInOutcome.REQUESTED
    capped = RequestHistory(None, CONFIRM_DAILY_CAP)
    assert opt_in_outcome(None, None, capped, NOW, WINDOW) is OptInOutcome.DAILY_CAP


def test_an_unsubscribe_never_reopens_a_blocked_address() -> None:
    """A liftable reason never replaces a blocking one; anything replaces a liftable one."""
    blocking = [SuppressionReason.BOUNCED, SuppressionReason.COMPLAINED, SuppressionReason.MANUAL]
    liftable = [SuppressionReason.UNSUBSCRIBED, SuppressionReason.ERASED]
    for current in blocking:
        for new in liftable:
            assert next_suppression(current, new) is None
    for current in liftable:
        for new in blocking:
            assert next_suppression(current, new) is new
    assert next_suppression(None, SuppressionReason.UNSUBSCRIBED) is SuppressionReason.UNSUBSCRIBED
    assert next_suppression(SuppressionReason.MANUAL, SuppressionReason.MANUAL) is None
    bounced, complained = SuppressionReason.BOUNCED, SuppressionReason.COMPLAINED
    assert next_suppression(complained, bounced) is None  # a bounce keeps the complaint
    assert next_suppression(SuppressionReason.MANUAL, bounced) is None
    assert next_suppression(bounced, complained) is complained
    assert next_suppression(bounced, SuppressionReason.MANUAL) is SuppressionReason.MANUAL
    assert next_suppression(SuppressionReason.ERASED, SuppressionReason.UNSUBSCRIBED) is None
    assert (
        next_suppression(SuppressionReason.UNSUBSCRIBED, SuppressionReason.ERASED)
        is SuppressionReason.ERASED
    )


def test_token_bucket() -> None:
    """The bucket starts full at its burst, refills at its rate, and says how long to wait."""
    bucket = TokenBucket(rate=1.0, burst=2.0)
    assert bucket.take(0.0) == 0.0
    assert bucket.take(0.0) == 0.0
    assert bucket.take(0.0) == pytest.approx(1.0)
    assert bucket.take(0.5) == pytest.approx(0.5)
    assert bucket.take(1.0) == 0.0
    idle = TokenBucket(rate=2.0, burst=2.0)
    assert [idle.wait(0.0) for _ in range(5)] == [0.0] * 5  # looking costs nothing
    idle.spend(0.0)
    idle.spend(0.0)
    idle.spend(0.0)  # a debt: three taken from a burst of two
    assert idle.wait(0.0) == pytest.approx(1.0)
    assert idle.wait(1.0) == 0.0
    limiter = KeyedLimiter(per_minute=60)
    assert all(limiter.take("a", 0.0) == 0.0 for _ in range(120))
    assert limiter.take("a", 0.0) > 0
    assert limiter.take("b", 0.0) == 0.0


def test_retry_backoff_grows_and_gives_up() -> None:
    """Backoff doubles per attempt (with jitter), is capped, and stops after the give-up age."""
    day = timedelta(hours=24)
    first = next_attempt(0, NOW, NOW, day, jitter=0.5)
    second = next_attempt(1, NOW, NOW, day, jitter=0.5)
    assert first is not None and second is not None
    assert first - NOW == timedelta(seconds=30)
    assert second - NOW == timedelta(seconds=60)
    capped = next_attempt(40, NOW, NOW, day, jitter=0.5)
    assert capped is not None and capped - NOW == timedelta(hours=1)
    assert next_attempt(3, NOW - day, NOW, day, jitter=0.0) is None
