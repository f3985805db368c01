"""Opt-in, confirmation and opt-out: the consent use cases (G1, G2, G5)."""

from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import Connection

from mailer.domain.addresses import Address, address_hash, parse_address
from mailer.domain.compose import is_one_line
from mailer.domain.consent import REQUEST_LIFTABLE, OptInOutcome, opt_in_outcome
from mailer.domain.ledger import Evidence
from mailer.domain.tokens import LinkClaim, TokenCodec
from mailer.errors import BadToken, InvalidInput, NotFound
from mailer.services.metrics import Metrics
from mailer.services.ports import Clock
from mailer.statuses import MessageKind, SubscriptionStatus, SuppressionReason
from mailer.store import feedback, ledger, lists, outbox, people, suppression
from mailer.store.db import Database
from mailer.store.lists import ListRow

MAX_NAME = 200


def clean_name(name: str | None) -> str | None:
    """A display name as volunteered, or ``InvalidInput`` if it could break a header."""
    if name is None:
        return None
    name = name.strip()
    if not name:
        return None
    if len(name) > MAX_NAME:
        raise InvalidInput(f"name is longer than {MAX_NAME} characters")
    if not is_one_line(name):
        raise InvalidInput("name contains control characters")
    return name


@dataclass(frozen=True, slots=True)
class LinkPage:
    """What a confirm or unsubscribe page shows before the person presses its button."""

    list_name: str | None
    is_global: bool


@dataclass(frozen=True, slots=True)
class Unsubscribed:
    list_name: str | None
    is_global: bool


class Subscriptions:
    """Consent use cases. Every state change commits before the caller answers."""

    def __init__(
        self,
        db: Database,
        codec: TokenCodec,
        hash_key: bytes,
        clock: Clock,
        metrics: Metrics,
        resend_window: timedelta,
        on_enqueued: Callable[[], None],
    ) -> None:
        self._db = db
        self._codec = codec
        self._hash_key = hash_key
        self._clock = clock
        self._metrics = metrics
        self._resend_window = resend_window
        self._on_enqueued = on_enqueued

    def identify(self, raw_email: str) -> tuple[Address, str]:
        """Validate an address and return it with its keyed hash."""
        address = parse_address(raw_email)
        return address, address_hash(self._hash_key, address)

    async def request_opt_in(
        self, raw_email: str, list_slug: str, name: str | None, evidence: Evidence
    ) -> OptInOutcome:
        """Record an opt-in request and queue a confirmation request if the rules allow one."""
        address, subject = self.identify(raw_email)
        name = clean_name(name)
        now = self._clock.now()

        def tx(conn: Connection) -> OptInOutcome:
            target = _list_or_404(conn, list_slug)
            reason = suppression.reason_for(conn, subject)
            if reason is not None and reason not in REQUEST_LIFTABLE:
                return OptInOutcome.SUPPRESSED
            person = people.ensure(
                conn, email=address.email, email_hash=subject, name=name, now=now
            )
            status = people.subscription_status(conn, person, target.id)
            history = outbox.confirm_history(conn, person, target.id, now)
            outcome = opt_in_outcome(status, reason, history, now, self._resend_window)
            if outcome is not OptInOutcome.REQUESTED:
                return outcome
            people.set_status(conn, person, target.id, SubscriptionStatus.PENDING, now)
            outbox.enqueue(
                conn, kind=MessageKind.CONFIRM, list_id=target.id, subscriber_id=person, now=now
            )
            ledger.append(
                conn,
                event="opt-in-requested",
                subject_hash=subject,
                evidence=evidence,
                now=now,
                list_uid=target.uid,
            )
            return outcome

        outcome = await self._db.write(tx)
        self._metrics.opt_ins.labels(outcome.value).inc()
        if outcome is OptInOutcome.REQUESTED:
            self._on_enqueued()
        return outcome

    async def describe_confirm(self, token: str) -> LinkPage:
        """For ``GET /confirm``: check the token and name the list. Changes nothing."""
        claim = self._codec.read_confirm(token)
        found = await self._db.read(lists.by_uid, claim.list_uid)
        if found is None:
            raise BadToken("this list no longer exists")
        return LinkPage(found.name, False)

    async def confirm(self, token: str, evidence: Evidence) -> str:
        """The human act of consent (``POST /confirm``). Returns the list's name."""
        claim = self._codec.read_confirm(token)
        now = self._clock.now()

        def tx(conn: Connection) -> tuple[str, bool]:
            target = lists.by_uid(conn, claim.list_uid) if claim.list_uid else None
            person = people.by_hash(conn, claim.subject_hash)
            if target is None or person is None:
                raise BadToken("this confirmation link is no longer valid")
            reason = suppression.reason_for(conn, claim.subject_hash)
            if reason is not None and reason not in REQUEST_LIFTABLE:
                raise BadToken("this address cannot be subscribed; please contact us")
            before = people.set_status(
                conn, person.id, target.id, SubscriptionStatus.CONFIRMED, now
            )
            if before == SubscriptionStatus.CONFIRMED and reason is None:
                return target.name, False
            if reason is not None:
                suppression.lift(conn, claim.subject_hash)
            ledger.append(
                conn,
                event="confirmed",
                subject_hash=claim.subject_hash,
                evidence=evidence,
                now=now,
                list_uid=target.uid,
            )
            return target.name, True

        list_name, changed = await self._db.write(tx)
        if changed:
            self._metrics.confirmations.inc()
        return list_name

    async def describe_unsubscribe(self, token: str) -> LinkPage:
        """For ``GET /unsubscribe``: check the token and name the list. Changes nothing."""
        claim = self._codec.read_unsubscribe(token)
        if claim.list_uid is None:
            return LinkPage(None, True)
        found = await self._db.read(lists.by_uid, claim.list_uid)
        return LinkPage(None if found is None else found.name, False)

    async def unsubscribe_link(
        self, token: str, everything: bool, evidence: Evidence
    ) -> Unsubscribed:
        """Unsubscribe from a link (one-click or page): from its list, or from everything."""
        claim = self._codec.read_unsubscribe(token)
        if everything:
            claim = LinkClaim(claim.subject_hash, None)
        return await self._unsubscribe(claim, None, evidence)

    async def unsubscribe_address(
        self, raw_email: str, list_slug: str | None, evidence: Evidence
    ) -> Unsubscribed:
        """Unsubscribe by address (API ``DELETE``, CLI): from one list, or from everything."""
        _, subject = self.identify(raw_email)
        return await self._unsubscribe(LinkClaim(subject, None), list_slug, evidence)

    async def unsubscribe_delivery(self, outbox_id: int, evidence: Evidence) -> Unsubscribed | None:
        """Unsubscribe the recipient of one message (a mail to its ``mailto:`` address).

        The scope is the one its header one-click has: the list for list mail, everything for
        confirmation requests and policy announcements. ``None`` when the message is gone
        with its erased recipient (who is suppressed as ``erased`` already).
        """
        found = await self._db.read(feedback.delivery, outbox_id)
        if found is None:
            return None
        list_scoped = found.kind in (MessageKind.CAMPAIGN, MessageKind.PREVIEW)
        claim = LinkClaim(found.email_hash, found.list_uid if list_scoped else None)
        return await self._unsubscribe(claim, None, evidence)

    async def _unsubscribe(
        self, claim: LinkClaim, list_slug: str | None, evidence: Evidence
    ) -> Unsubscribed:
        now = self._clock.now()

        def tx(conn: Connection) -> tuple[Unsubscribed, bool]:
            target: ListRow | None = None
            if list_slug is not None:
                target = _list_or_404(conn, list_slug)
            elif claim.list_uid is not None:
                target = lists.by_uid(conn, claim.list_uid)
                if target is None:  # the list was deleted: nothing left to send from it
                    return Unsubscribed(None, False), False
            person = people.by_hash(conn, claim.subject_hash)
            if target is None:
                changed = person is not None and people.unsubscribe_all(conn, person.id, now) > 0
                changed |= suppression.put(
                    conn, claim.subject_hash, SuppressionReason.UNSUBSCRIBED, now
                )
            else:
                changed = person is not None and people.subscription_status(
                    conn, person.id, target.id
                ) not in (None, SubscriptionStatus.UNSUBSCRIBED)
                if changed and person is not None:
                    people.set_status(
                        conn, person.id, target.id, SubscriptionStatus.UNSUBSCRIBED, now
                    )
            if changed:
                ledger.append(
                    conn,
                    event="unsubscribed",
                    subject_hash=claim.subject_hash,
                    evidence=evidence,
                    now=now,
                    list_uid=None if target is None else target.uid,
                )
            return Unsubscribed(None if target is None else target.name, target is None), changed

        result, changed = await self._db.write(tx)
        if changed:
            scope = "global" if result.is_global else "list"
            self._metrics.unsubscribes.labels(evidence.channel, scope).inc()
        return result


def _list_or_404(conn: Connection, slug: str) -> ListRow:
    found = lists.by_slug(conn, slug)
    if found is None:
        raise NotFound(f"no list named {slug!r}")
    return found
