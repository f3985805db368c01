"""Delivery feedback (bounces and complaints) and what it does to an address. Pure rules."""

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

DETAIL_MAX = 400
"""Diagnostic text kept with a delivery; reports can quote whole transcripts."""


class FeedbackKind(StrEnum):
    HARD_BOUNCE = "hard-bounce"
    SOFT_BOUNCE = "soft-bounce"
    COMPLAINT = "complaint"


STRENGTH = {FeedbackKind.SOFT_BOUNCE: 1, FeedbackKind.HARD_BOUNCE: 2, FeedbackKind.COMPLAINT: 3}
"""A delivery keeps its strongest feedback: a complaint outranks a bounce, hard outranks soft."""


@dataclass(frozen=True, slots=True)
class Feedback:
    """One report about one delivered message: what happened, the status code, the diagnostic."""

    kind: FeedbackKind
    status: str | None = None
    """An RFC 3463 enhanced status code such as ``5.1.1``, when the report gives one."""
    detail: str | None = None


def replaces(current: str | None, new: FeedbackKind) -> bool:
    """Whether ``new`` feedback is news for a delivery already marked ``current``.

    A repeated report (the same DSN delivered twice, a relay's webhook retry) changes nothing,
    and is not counted again.
    """
    if current is None:
        return True
    try:
        return STRENGTH[new] > STRENGTH[FeedbackKind(current)]
    except ValueError:
        return True


def describe(feedback: Feedback) -> str:
    """The one-line text stored with the delivery: kind, status code and diagnostic."""
    parts = [str(feedback.kind)]
    if feedback.status:
        parts.append(feedback.status)
    text = " ".join(parts)
    if feedback.detail:
        text = f"{text}: {feedback.detail}"
    printable = "".join(ch if ch.isprintable() else " " for ch in text)
    return " ".join(printable.split())[:DETAIL_MAX]


@dataclass(frozen=True, slots=True)
class SoftBounces:
    """The soft-bounce count of one address within the current window."""

    count: int
    since: datetime


@dataclass(frozen=True, slots=True)
class SoftBounceRule:
    """Suppress an address after ``limit`` soft bounces within ``window`` of the first one."""

    limit: int
    window: timedelta

    def count(self, current: SoftBounces | None, now: datetime) -> SoftBounces:
        """The count after one more soft bounce at ``now``; an old window starts over."""
        if current is None or now - current.since > self.window:
            return SoftBounces(1, now)
        return SoftBounces(current.count + 1, current.since)

    def exhausted(self, counted: SoftBounces) -> bool:
        return counted.count >= self.limit
