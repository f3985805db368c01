"""What staff may see and do about one person: show, export, suppress, lift."""

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection

from mailer.domain.consent import REQUEST_LIFTABLE
from mailer.domain.ledger import Evidence
from mailer.errors import Conflict, NotFound
from mailer.services.ports import Clock
from mailer.services.subscriptions import Subscriptions
from mailer.statuses import SuppressionReason
from mailer.store import ledger, people, suppression
from mailer.store.db import Database
from mailer.store.people import SubscriberRow, SubscriptionRow
from mailer.store.suppression import SuppressionRow


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
    def __init__(self, db: Database, clock: Clock, consent: Subscriptions) -> None:
        self._db = db
        self._clock = clock
        self._consent = consent

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

    async def export(self, raw_email: str) -> dict[str, Any]:
        """Everything held on one person, as JSON-ready data."""
        person = await self.show(raw_email)
        events = await self._db.read(ledger.for_subject, person.email_hash)
        sub = person.subscriber
        return {
            "email": person.email,
            "subscriber": None
            if sub is None
            else {"name": sub.name, "created_at": _iso(sub.created_at)},
            "subscriptions": [
                {
                    "list": s.list_slug,
                    "list_name": s.list_name,
                    "status": s.status,
                    "created_at": _iso(s.created_at),
                    "updated_at": _iso(s.updated_at),
                    "confirmed_at": _iso(s.confirmed_at),
                }
                for s in person.subscriptions
            ],
            "suppression": person.suppression,
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
        }

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

    async def erase(self, raw_email: str, evidence: Evidence) -> None:
        """Delete everything held on a person but the keyed suppression hash (G5).

        Their unsubscribe links keep working (G4): they name only that hash.
        """
        _, subject = self._consent.identify(raw_email)
        now = self._clock.now()

        def tx(conn: Connection) -> None:
            found = people.by_hash(conn, subject)
            if found is None and suppression.reason_for(conn, subject) is None:
                raise NotFound("no data is held on that address")
            if found is not None:
                people.delete(conn, found.id)
            ledger.blank_evidence(conn, subject)
            suppression.put(conn, subject, SuppressionReason.ERASED, now)
            ledger.append(conn, event="erased", subject_hash=subject, evidence=evidence, now=now)

        await self._db.write(tx)
        await self._db.compact_erased()


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
