"""Bounces and complaints, however they arrive (inbound DSN/ARF, relay webhooks): G5.

A hard bounce suppresses the address as ``bounced``; soft bounces are counted and suppress
once ``SoftBounceRule`` says so; a complaint suppresses as ``complained``. Each suppression
is a ledger entry (channel ``bounce`` or ``complaint``). Feedback about a delivery also marks
that outbox row, and a repeated report about the same delivery changes and counts nothing.
"""

from enum import StrEnum

from sqlalchemy import Connection

from mailer.domain.feedback import Feedback, FeedbackKind, SoftBounceRule, describe, replaces
from mailer.domain.ledger import Evidence
from mailer.services.metrics import Metrics
from mailer.services.ports import Clock
from mailer.services.subscriptions import Subscriptions
from mailer.statuses import SuppressionReason
from mailer.store import feedback, ledger, people, suppression
from mailer.store.db import Database

SUPPRESSES = {
    FeedbackKind.HARD_BOUNCE: SuppressionReason.BOUNCED,
    FeedbackKind.SOFT_BOUNCE: SuppressionReason.BOUNCED,
    FeedbackKind.COMPLAINT: SuppressionReason.COMPLAINED,
}


class Applied(StrEnum):
    """What one report did."""

    SUPPRESSED = "suppressed"
    UNSUBSCRIBED = "unsubscribed"
    COUNTED = "counted"
    """A soft bounce below the limit; or a report that changed no suppression."""
    ALREADY = "already"
    """Nothing new: this delivery was already marked so, or the address already suppressed."""
    UNKNOWN = "unknown"
    """No such delivery or address here (never held, or erased)."""


class FeedbackService:
    def __init__(
        self,
        db: Database,
        subscriptions: Subscriptions,
        clock: Clock,
        metrics: Metrics,
        soft_bounces: SoftBounceRule,
    ) -> None:
        self._db = db
        self._subscriptions = subscriptions
        self._clock = clock
        self._metrics = metrics
        self._rule = soft_bounces

    async def for_delivery(self, outbox_id: int, report: Feedback, evidence: Evidence) -> Applied:
        """Feedback about one message we sent (identified by a signed token naming its row)."""
        now = self._clock.now()

        def tx(conn: Connection) -> Applied:
            found = feedback.delivery(conn, outbox_id)
            if found is None:
                return Applied.UNKNOWN
            if not replaces(found.feedback, report.kind):
                return Applied.ALREADY
            feedback.mark(conn, outbox_id, report.kind.value, describe(report), now)
            return self._apply(conn, found.email_hash, report, evidence)

        return self._count(report, await self._db.write(tx))

    async def for_subject(self, subject_hash: str, report: Feedback, evidence: Evidence) -> Applied:
        """Feedback naming an address by its keyed hash (from a signed unsubscribe token)."""

        def tx(conn: Connection) -> Applied:
            if people.by_hash(conn, subject_hash) is None and (
                suppression.reason_for(conn, subject_hash) is None
            ):
                return Applied.UNKNOWN
            return self._apply(conn, subject_hash, report, evidence)

        return self._count(report, await self._db.write(tx))

    async def for_address(self, email: str, report: Feedback, evidence: Evidence) -> Applied:
        """Feedback naming an address (an authenticated relay webhook).

        Raises ``InvalidAddress`` for an address that is not valid. An address this instance
        never held gets no record: there is nothing to protect, and nothing is collected.
        """
        _, subject = self._subscriptions.identify(email)
        return await self.for_subject(subject, report, evidence)

    async def unsubscribe_delivery(self, outbox_id: int, evidence: Evidence) -> Applied:
        """A mail to a message's ``mailto:`` unsubscribe address: like its one-click POST."""
        done = await self._subscriptions.unsubscribe_delivery(outbox_id, evidence)
        return Applied.UNKNOWN if done is None else Applied.UNSUBSCRIBED

    def _apply(
        self, conn: Connection, subject: str, report: Feedback, evidence: Evidence
    ) -> Applied:
        now = self._clock.now()
        if report.kind is FeedbackKind.SOFT_BOUNCE:
            if suppression.reason_for(conn, subject) is not None:
                return Applied.ALREADY
            counted = self._rule.count(feedback.soft_bounces(conn, subject), now)
            if not self._rule.exhausted(counted):
                feedback.save_soft_bounces(conn, subject, counted)
                return Applied.COUNTED
            feedback.forget_soft_bounces(conn, subject)
        if not suppression.put(conn, subject, SUPPRESSES[report.kind], now):
            return Applied.ALREADY
        ledger.append(conn, event="suppressed", subject_hash=subject, evidence=evidence, now=now)
        return Applied.SUPPRESSED

    def _count(self, report: Feedback, applied: Applied) -> Applied:
        self._metrics.feedback.labels(report.kind.value, applied.value).inc()
        return applied
