"""Consent rules: who may be sent what, and what an opt-in request may trigger."""

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from mailer.statuses import MessageKind, SubscriptionStatus, SuppressionReason

CONFIRM_DAILY_CAP = 3
"""Confirmation requests per address per 24 hours, across all lists."""

REQUEST_LIFTABLE = frozenset({SuppressionReason.UNSUBSCRIBED, SuppressionReason.ERASED})
"""Suppressions a person may lift themselves with a new confirmed opt-in."""


_STRONGER_THAN_BOUNCE = frozenset({SuppressionReason.COMPLAINED, SuppressionReason.MANUAL})


class SkipReason(StrEnum):
    NOT_CONFIRMED = "not-confirmed"
    UNSUBSCRIBED = "unsubscribed"
    NO_LONGER_PENDING = "no-longer-pending"
    SUPPRESSED = "suppressed"


def may_send(
    kind: MessageKind,
    subscription: str | None,
    suppression: str | None,
    confirmed_anywhere: bool = False,
) -> SkipReason | None:
    """The send-time check (G1/G2): ``None`` when the message may go, else why not.

    A confirmation request goes only while its subscription is pending, and never over a
    suppression the person cannot lift themselves (bounce, complaint, manual). A policy
    announcement needs a confirmed subscription to *some* list (``confirmed_anywhere``) and
    no suppression. Every other message needs a confirmed subscription to its own list and
    no suppression at all.
    """
    if kind is MessageKind.ANNOUNCEMENT:
        if suppression is not None:
            return SkipReason.SUPPRESSED
        return None if confirmed_anywhere else SkipReason.NOT_CONFIRMED
    if kind is MessageKind.CONFIRM:
        if subscription != SubscriptionStatus.PENDING:
            return SkipReason.NO_LONGER_PENDING
        if suppression is not None and suppression not in REQUEST_LIFTABLE:
            return SkipReason.SUPPRESSED
        return None
    if suppression is not None:
        return SkipReason.SUPPRESSED
    if subscription == SubscriptionStatus.UNSUBSCRIBED:
        return SkipReason.UNSUBSCRIBED
    if subscription != SubscriptionStatus.CONFIRMED:
        return SkipReason.NOT_CONFIRMED
    return None


class OptInOutcome(StrEnum):
    """What an opt-in request did. The API answers the same for all of them (no enumeration)."""

    REQUESTED = "confirmation-requested"
    ALREADY_CONFIRMED = "already-confirmed"
    RECENTLY_REQUESTED = "recently-requested"
    DAILY_CAP = "daily-cap-reached"
    SUPPRESSED = "suppressed"


@dataclass(frozen=True, slots=True)
class RequestHistory:
    """Recent confirmation requests for one address: for this list, and across all lists."""

    last_for_list: datetime | None
    count_last_day: int


def opt_in_outcome(
    subscription: str | None,
    suppression: str | None,
    history: RequestHistory,
    now: datetime,
    resend_window: timedelta,
) -> OptInOutcome:
    """Decide whether an opt-in request may send a confirmation request now."""
    if suppression is not None and suppression not in REQUEST_LIFTABLE:
        return OptInOutcome.SUPPRESSED
    if subscription == SubscriptionStatus.CONFIRMED and suppression is None:
        return OptInOutcome.ALREADY_CONFIRMED
    if history.last_for_list is not None and now - history.last_for_list < resend_window:
        return OptInOutcome.RECENTLY_REQUESTED
    if history.count_last_day >= CONFIRM_DAILY_CAP:
        return OptInOutcome.DAILY_CAP
    return OptInOutcome.REQUESTED


def next_suppression(current: str | None, new: SuppressionReason) -> SuppressionReason | None:
    """The reason to store when ``new`` arrives over ``current``; ``None`` means keep as is.

    A reason the person can lift themselves (unsubscribed, erased) never replaces one they
    cannot (bounced, complained, manual): an unsubscribe must not reopen a bounced address.
    An unsubscribe never replaces ``erased`` either: both block all mail, and an old link
    clicked after erasure must not start a new record about a person who asked to be forgotten.
    A bounce never replaces a complaint or a staff decision: it says nothing about what the
    person wants, and they do.
    """
    if current == new:
        return None
    if new == SuppressionReason.BOUNCED and current in _STRONGER_THAN_BOUNCE:
        return None
    if current == SuppressionReason.ERASED and new == SuppressionReason.UNSUBSCRIBED:
        return None
    if current is not None and current not in REQUEST_LIFTABLE and new in REQUEST_LIFTABLE:
        return None
    return new
