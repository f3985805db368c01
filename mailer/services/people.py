"""What staff may see and do about one person: show, export, erase, suppress, lift."""

import asyncio
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection

from mailer.domain.consent import REQUEST_LIFTABLE
from mailer.domain.ledger import Evidence
from mailer.errors import Conflict, NotFound
from mailer.services.erasure import AddressMatcher, scrub_maildir
from mailer.services.ports import Clock
from mailer.services.subscriptions import Subscriptions
from mailer.statuses import SuppressionReason
from mailer.store import feedback, ledger, people, suppression
from mailer.store.db import Database
from mailer.store.people import SubscriberRow, SubscriptionRow
from mailer.store.suppression import SuppressionRow

ERASED_NOTE = (
    "this address was erased: no personal data is held on it; only its keyed suppression "
    "hash and its consent ledger entries (without IP address or user agent) are kept"
)


@dataclass(frozen=True, slots=True)
class Erasure:
    """What an erasure removed. ``already_erased``: only the suppression hash was held."""

    already_erased: bool
    subscriptions: int
    deliveries: int
    ledger_entries: int
    """Entries about the person, kept for the chain with their IP and user agent blanked."""
    captured_files: int
    """Captured messages deleted from the capture Maildir (``var/outbox/``)."""
    suppression: str
    """The suppression reason kept (``erased``, or a stricter one such as ``bounced``)."""


@dataclass(frozen=True, slots=True)
class Person:
    email: str
    email_hash: str
    subscriber: SubscriberRow | None
    subscriptions: list[SubscriptionRow]
    suppression: str | None


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


class People:
    def __init__(
        self, db: Database, clock: Clock, consent: Subscriptions, captured: Path | None = None
    ) -> None:
        self._db = db
        self._clock = clock
        self._consent = consent
        self._captured = captured
        """The capture Maildir whose copies of a person's mail erasure deletes."""

    async def show(self, raw_email: str) -> Person:
        address, subject = self._consent.identify(raw_email)

        def tx(conn: Connection) -> Person:
            found = people.by_hash(conn, subject)
            subs = [] if found is None else people.subscriptions_of(conn, found.id)
            email = address.email if found is None else found.email
            return Person(email, subject, found, subs, suppression.reason_for(conn, subject))

        person = await self._db.read(tx)
        if person.subscriber is None and person.suppression is None:
            raise NotFound("no data is held on that address")
        return person

    async def export(self, raw_email: str, evidence: Evidence) -> dict[str, Any]:
        """Everything held on one person, as JSON-ready data; the export itself is recorded.

        Subscriber, subscriptions, suppression, consent ledger entries and deliveries (their
        outbox rows). After erasure nothing personal is left: the result then has
        ``"erased": true``, no address, and only the hash-keyed suppression and ledger
        entries. The ``exported`` ledger entry (who, when) is appended in the same
        transaction, after the data was read; ``"export"`` in the result names it.
        """
        _, subject = self._consent.identify(raw_email)
        now = self._clock.now()

        def tx(conn: Connection) -> dict[str, Any]:
            found = people.by_hash(conn, subject)
            reason = suppression.reason_for(conn, subject)
            events = ledger.for_subject(conn, subject)
            if found is None and reason is None and not events:
                raise NotFound("no data is held on that address")
            data = _export_json(conn, subject, found, reason, events)
            seq = ledger.append(
                conn, event="exported", subject_hash=subject, evidence=evidence, now=now
            )
            data["export"] = {
                "seq": seq,
                "at": _iso(now),
                "channel": evidence.channel,
                "actor": evidence.actor,
            }
            return data

        return await self._db.write(tx)

    async def suppressions(self) -> list[SuppressionRow]:
        return await self._db.read(suppression.all_rows)

    async def suppress(self, raw_email: str, evidence: Evidence) -> bool:
        """Add a manual suppression; return False if the address already was suppressed so."""
        _, subject = self._consent.identify(raw_email)
        now = self._clock.now()

        def tx(conn: Connection) -> bool:
            changed = suppression.put(conn, subject, SuppressionReason.MANUAL, now)
            if changed:
                ledger.append(
                    conn, event="suppressed", subject_hash=subject, evidence=evidence, now=now
                )
            return changed

        return await self._db.write(tx)

    async def lift(self, raw_email: str, evidence: Evidence) -> str:
        """Remove a bounce, complaint or manual suppression; return the reason removed.

        ``unsubscribed`` and ``erased`` are the person's own choice: only their new confirmed
        opt-in lifts those (G5), so this refuses them.
        """
        _, subject = self._consent.identify(raw_email)
        now = self._clock.now()

        def tx(conn: Connection) -> str:
            reason = suppression.reason_for(conn, subject)
            if reason is None:
                raise NotFound("that address is not suppressed")
            if reason in REQUEST_LIFTABLE:
                raise Conflict(
                    f"the address is suppressed as {reason!r}; only the person's own "
                    "confirmed opt-in can lift that"
                )
            suppression.lift(conn, subject)
            ledger.append(
                conn, event="suppression-lifted", subject_hash=subject, evidence=evidence, now=now
            )
            return reason

        return await self._db.write(tx)

    async def erase(self, raw_email: str, evidence: Evidence) -> Erasure:
        """Delete every trace of a person but the keyed suppression hash (G5).

        Rows go (the subscriber; subscriptions and outbox rows by cascade), the IP and user
        agent of their ledger entries are blanked (the chain keeps their digest), freed pages
        are zeroed and the WAL truncated (``compact_erased``), and captured copies of their
        mail are deleted from the capture Maildir. The suppression becomes ``erased`` unless a
        stricter reason already holds, and an ``erased`` entry records who asked, and when.

        Erasing again is harmless: it is recorded too, and ``already_erased`` says only the
        hash was held. Their unsubscribe links keep working (G4): they name only that hash.
        """
        address, subject = self._consent.identify(raw_email)
        matcher = AddressMatcher(raw_email, address)
        # First pass: captured mail is data held, even if the database has forgotten them.
        captured = await self._scrub(matcher)
        now = self._clock.now()

        def tx(conn: Connection) -> Erasure:
            found = people.by_hash(conn, subject)
            before = suppression.reason_for(conn, subject)
            entries = ledger.count_for_subject(conn, subject)
            if found is None and before is None and entries == 0 and not captured:
                raise NotFound("no data is held on that address")
            subs = deliveries = 0
            if found is not None:
                subs = people.count_subscriptions(conn, found.id)
                deliveries = people.count_deliveries(conn, found.id)
                people.delete(conn, found.id)
            already = (
                found is None
                and not captured
                and (before == SuppressionReason.ERASED or _was_erased(conn, subject))
            )
            ledger.blank_evidence(conn, subject)
            feedback.forget_soft_bounces(conn, subject)
            suppression.put(conn, subject, SuppressionReason.ERASED, now)
            kept = suppression.reason_for(conn, subject) or SuppressionReason.ERASED.value
            ledger.append(conn, event="erased", subject_hash=subject, evidence=evidence, now=now)
            return Erasure(already, subs, deliveries, entries, captured, kept)

        erasure = await self._db.write(tx)
        await self._db.compact_erased()
        # Second pass: a message handed to the capture server while the rows were deleted.
        late = await self._scrub(matcher)
        if late:
            erasure = replace(
                erasure, already_erased=False, captured_files=erasure.captured_files + late
            )
        return erasure

    async def _scrub(self, matcher: AddressMatcher) -> int:
        if self._captured is None:
            return 0
        return await asyncio.to_thread(scrub_maildir, self._captured, matcher)


def _was_erased(conn: Connection, subject: str) -> bool:
    return any(r.entry.event == "erased" for r in ledger.for_subject(conn, subject))


def _export_json(
    conn: Connection,
    subject: str,
    found: SubscriberRow | None,
    reason: str | None,
    events: list[ledger.LedgerRecord],
) -> dict[str, Any]:
    erased = found is None and (
        reason == SuppressionReason.ERASED or any(r.entry.event == "erased" for r in events)
    )
    subs = [] if found is None else people.subscriptions_of(conn, found.id)
    deliveries = [] if found is None else people.deliveries_of(conn, found.id)
    return {
        "email": None if found is None else found.email,
        "email_hash": subject,
        "erased": erased,
        "note": ERASED_NOTE if erased else None,
        "subscriber": None
        if found is None
        else {"name": found.name, "created_at": _iso(found.created_at)},
        "subscriptions": [
            {
                "list": s.list_slug,
                "list_name": s.list_name,
                "status": s.status,
                "created_at": _iso(s.created_at),
                "updated_at": _iso(s.updated_at),
                "confirmed_at": _iso(s.confirmed_at),
            }
            for s in subs
        ],
        "suppression": reason,
        "consent_events": [
            {
                "seq": r.entry.seq,
                "at": _iso(r.entry.at),
                "event": r.entry.event,
                "scope": r.entry.scope,
                "list_uid": r.entry.list_uid,
                "channel": r.entry.channel,
                "actor": r.entry.actor,
                "ip": r.ip,
                "user_agent": r.user_agent,
                "policy_version": r.entry.policy_version,
            }
            for r in events
        ],
        "deliveries": [
            {
                "id": d.id,
                "kind": d.kind,
                "list": d.list_slug,
                "campaign_id": d.campaign_id,
                "campaign_subject": d.campaign_subject,
                "status": d.status,
                "reason": d.reason,
                "attempts": d.attempts,
                "created_at": _iso(d.created_at),
                "updated_at": _iso(d.updated_at),
                "checked_at": _iso(d.checked_at),
                "feedback": d.feedback,
                "feedback_detail": d.feedback_detail,
                "feedback_at": _iso(d.feedback_at),
            }
            for d in deliveries
        ],
    }


def person_json(person: Person) -> dict[str, Any]:
    return {
        "email": person.email,
        "name": None if person.subscriber is None else person.subscriber.name,
        "suppression": person.suppression,
        "subscriptions": [
            {
                "list": s.list_slug,
                "status": s.status,
                **{k: _iso(v) for k, v in asdict(s).items() if k.endswith("_at")},
            }
            for s in person.subscriptions
        ],
    }
