"""The outbox: one row per message, claimed with a send-time consent check (G1/G2, G6)."""

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    ARRAY,
    Connection,
    Integer,
    Select,
    and_,
    any_,
    bindparam,
    func,
    insert,
    literal_column,
    select,
    update,
)

from mailer.domain.consent import RequestHistory, may_send
from mailer.domain.ledger import Evidence
from mailer.statuses import (
    CampaignStatus,
    Channel,
    MessageKind,
    OutboxStatus,
    SubscriptionStatus,
    SuppressionReason,
)
from mailer.store import ledger, suppression
from mailer.store.dbclock import database_now
from mailer.store.tables import (
    campaigns,
    lists,
    outbox,
    subscribers,
    subscriptions,
    suppressions,
)


@dataclass(frozen=True, slots=True)
class Claimed:
    """A message that passed its consent check and is now ``sending``: everything to render it."""

    outbox_id: int
    kind: MessageKind
    attempts: int
    email: str
    email_hash: str
    name: str | None
    list_uid: str | None
    list_slug: str | None
    list_name: str | None
    list_from: str | None
    queued_at: datetime
    campaign_id: int | None
    fence: int
    """The row's fence as this claim set it: outcomes are written only under it."""


@dataclass(frozen=True, slots=True)
class Lease:
    """Who claims (``host:pid:random``) and for how long the claim holds."""

    owner: str
    seconds: float


_INSERT = insert(outbox)
_RECIPIENT = (
    outbox.c.subscriber_id == bindparam("sid"),
    outbox.c.kind == MessageKind.CONFIRM.value,
)
_LAST_REQUEST = select(func.max(outbox.c.created_at)).where(
    *_RECIPIENT, outbox.c.list_id == bindparam("lid")
)
_REQUESTS_SINCE = select(func.count()).where(*_RECIPIENT, outbox.c.created_at > bindparam("since"))


def enqueue(
    conn: Connection,
    *,
    kind: MessageKind,
    list_id: int | None,
    subscriber_id: int,
    now: datetime,
    campaign_id: int | None = None,
) -> int:
    values = {
        "kind": kind.value,
        "campaign_id": campaign_id,
        "list_id": list_id,
        "subscriber_id": subscriber_id,
        "status": OutboxStatus.QUEUED.value,
        "reason": None,
        "attempts": 0,
        "next_attempt_at": now,
        "checked_at": None,
        "created_at": now,
        "updated_at": now,
    }
    key = conn.execute(_INSERT, values).inserted_primary_key
    assert key is not None
    return int(key[0])


_REQUEUE_PREVIEW = (
    update(outbox)
    .where(
        outbox.c.campaign_id == bindparam("b_cid"),
        outbox.c.subscriber_id == bindparam("b_sid"),
        outbox.c.kind == MessageKind.PREVIEW.value,
        outbox.c.status != OutboxStatus.SENDING.value,
    )
    .values(status=OutboxStatus.QUEUED.value, reason=None, attempts=0)
)


def enqueue_preview(
    conn: Connection, *, campaign_id: int, list_id: int, subscriber_id: int, now: datetime
) -> None:
    """Queue a preview copy of a campaign; a repeated preview re-queues the same row."""
    again = conn.execute(
        _REQUEUE_PREVIEW,
        {"b_cid": campaign_id, "b_sid": subscriber_id, "next_attempt_at": now, "updated_at": now},
    )
    if again.rowcount:
        return
    enqueue(
        conn,
        kind=MessageKind.PREVIEW,
        list_id=list_id,
        subscriber_id=subscriber_id,
        now=now,
        campaign_id=campaign_id,
    )


def confirm_history(
    conn: Connection, subscriber_id: int, list_id: int, now: datetime
) -> RequestHistory:
    """When this person was last sent a confirmation request for this list; how many today."""
    last = conn.execute(_LAST_REQUEST, {"sid": subscriber_id, "lid": list_id}).scalar_one()
    day_ago = now - timedelta(days=1)
    count = conn.execute(_REQUESTS_SINCE, {"sid": subscriber_id, "since": day_ago}).scalar_one()
    return RequestHistory(last_for_list=last, count_last_day=int(count))


_ANYWHERE = subscriptions.alias("anywhere")
_CONFIRMED_ANYWHERE = (
    select(_ANYWHERE.c.id)
    .where(
        _ANYWHERE.c.subscriber_id == outbox.c.subscriber_id,
        _ANYWHERE.c.status == SubscriptionStatus.CONFIRMED.value,
    )
    .limit(1)
    .scalar_subquery()
    .is_not(None)
    .label("confirmed_anywhere")
)
"""Whether the recipient is confirmed on any list: what a policy announcement needs.

A scalar subquery, not ``EXISTS``: PostgreSQL may plan an ``EXISTS`` as a hashed subplan,
which reads every confirmed subscription once per query. On tables not yet analysed (a list
imported just before its campaign) it chose that for the several-message probe, and the
probe read all 30,000 subscriptions to check eight messages: 1.5 ms of server CPU per
message. A subquery with ``LIMIT`` is always looked up per row, by index."""

_CLAIM_COLS = (
    outbox.c.id,
    outbox.c.kind,
    outbox.c.attempts,
    subscribers.c.email,
    subscribers.c.email_hash,
    subscribers.c.name,
    lists.c.uid,
    lists.c.slug,
    lists.c.name,
    lists.c.from_addr,
    subscriptions.c.status,
    suppressions.c.reason,
    outbox.c.created_at,
    outbox.c.campaign_id,
    _CONFIRMED_ANYWHERE,
    outbox.c.fence,
)


_CONSENT = (
    outbox.join(subscribers, subscribers.c.id == outbox.c.subscriber_id)
    .outerjoin(
        subscriptions,
        and_(
            subscriptions.c.subscriber_id == outbox.c.subscriber_id,
            subscriptions.c.list_id == outbox.c.list_id,
        ),
    )
    .outerjoin(suppressions, suppressions.c.email_hash == subscribers.c.email_hash)
)
"""An outbox row with what decides its consent: the recipient's subscription to the row's
list and their suppression. Both the claim and the probe read through it."""

_CANDIDATES = select(*_CLAIM_COLS).select_from(
    _CONSENT.outerjoin(lists, lists.c.id == outbox.c.list_id)
)
DIRECT_KINDS = (MessageKind.CONFIRM.value, MessageKind.PREVIEW.value)
CAMPAIGN_KINDS = (MessageKind.CAMPAIGN.value, MessageKind.ANNOUNCEMENT.value)
_DUE_DIRECT = (
    _CANDIDATES.where(
        # Literals, as in the partial index ``ix_outbox_direct_due``: with bound values a
        # planner cannot prove the index applies, and PostgreSQL read every queued campaign
        # row to find none here (about 1 ms per claim at 20,000 queued).
        outbox.c.status == literal_column(f"'{OutboxStatus.QUEUED.value}'"),
        outbox.c.kind.in_([literal_column(f"'{kind}'") for kind in DIRECT_KINDS]),
        outbox.c.next_attempt_at <= bindparam("now"),
    )
    .order_by(outbox.c.next_attempt_at, outbox.c.id)
    .limit(bindparam("limit"))
)
_DUE_CAMPAIGN = (
    _CANDIDATES.join(campaigns, campaigns.c.id == outbox.c.campaign_id)
    .where(
        outbox.c.campaign_id == bindparam("cid"),
        outbox.c.status == OutboxStatus.QUEUED.value,
        outbox.c.next_attempt_at <= bindparam("now"),
        outbox.c.kind.in_(CAMPAIGN_KINDS),
        campaigns.c.status == CampaignStatus.RUNNING.value,
    )
    .order_by(outbox.c.next_attempt_at, outbox.c.id)
    .limit(bindparam("limit"))
)
_ONE_ROW = outbox.c.id == bindparam("b_id")
_MOVE_QUEUED = (
    update(outbox)
    .where(outbox.c.id.in_(bindparam("ids", expanding=True)))
    .values(fence=outbox.c.fence + 1)
)
"""Rows the same transaction just selected (and locked): by primary key alone. A ``status``
term invited both planners, with statistics that lag a fan-out, to walk the status index
over every queued row instead."""
_SENDING = (
    _ONE_ROW,
    outbox.c.status == OutboxStatus.SENDING.value,
    outbox.c.fence == bindparam("b_fence"),
)
"""Compare-and-set: still in hand-off, under the fence of the claim that took it."""
_CHECKED = func.coalesce(
    bindparam("b_checked", type_=outbox.c.checked_at.type), outbox.c.checked_at
)
_FINISH = (
    update(outbox).where(*_SENDING).values(attempts=outbox.c.attempts + 1, checked_at=_CHECKED)
)
_RETRY = (
    update(outbox)
    .where(*_SENDING)
    .values(status=OutboxStatus.QUEUED.value, attempts=outbox.c.attempts + 1, checked_at=_CHECKED)
)
_REQUEUE = (
    update(outbox).where(*_SENDING).values(status=OutboxStatus.QUEUED.value, checked_at=_CHECKED)
)


def claim(
    conn: Connection,
    now: datetime,
    campaign_id: int | None,
    limit: int,
    lease: Lease,
    until: datetime,
) -> tuple[list[Claimed], int]:
    """Claim up to ``limit`` due messages, each only if its recipient's consent holds *now*.

    ``campaign_id`` picks the lane: one running campaign (the campaign must still be
    running, checked in this same transaction, so a pause stops claims at once), or with
    ``None`` the direct lane of confirmation requests and previews. Lanes use separate
    indexes, so a paused campaign's queued rows never slow anyone else's claim.

    Runs inside one short write transaction: a row whose check fails becomes ``skipped`` with
    the reason; a row whose check passes becomes ``sending``, leased to ``lease.owner`` until
    ``until`` under a new fence. Returns the claimed messages and
    how many rows were settled either way (0: nothing was due). No network I/O happens here.
    The selected rows cannot change before they are updated: SQLite's write lock is held
    (``BEGIN IMMEDIATE``), and PostgreSQL locks them (``FOR UPDATE SKIP LOCKED``).
    """
    q = claim_statement(campaign_id, conn)
    claimed: list[Claimed] = []
    moves: dict[tuple[str, str | None], list[int]] = {}
    rows = conn.execute(q, {"now": now, "limit": limit, "cid": campaign_id}).all()
    for r in rows:
        kind = MessageKind(r[1])
        skip = may_send(kind, r[10], r[11], bool(r[14]))
        move: tuple[str, str | None]
        if skip is None:
            fields = (r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9], r[12], r[13], r[15] + 1)
            claimed.append(Claimed(r[0], kind, *fields))
            move = (OutboxStatus.SENDING.value, None)
        else:
            move = (OutboxStatus.SKIPPED.value, skip.value)
        moves.setdefault(move, []).append(r[0])
    # One statement per outcome, not per row: every selected row is locked (or the database
    # is), so each row's fence is the one just read and goes up by one.
    for (status, reason), ids in moves.items():
        conn.execute(
            _MOVE_QUEUED,
            {
                "ids": ids,
                "status": status,
                "reason": reason,
                "updated_at": now,
                "checked_at": now if reason is None else None,
                "lease_owner": lease.owner,
                "lease_until": until,
            },
        )
    return claimed, len(rows)


_LOCKING = {q: q.with_for_update(of=outbox, skip_locked=True) for q in (_DUE_DIRECT, _DUE_CAMPAIGN)}
"""Each claim SELECT as PostgreSQL runs it, built once (a statement built per claim has its
cache key worked out afresh at every execution)."""


def claim_statement(campaign_id: int | None, conn: Connection) -> Select[Any]:
    """The SELECT a claim of this lane runs on ``conn`` (locking the rows on PostgreSQL)."""
    q = _DUE_DIRECT if campaign_id is None else _DUE_CAMPAIGN
    return _LOCKING[q] if _locks(conn) else q


def _locks(conn: Connection) -> bool:
    return conn.dialect.name == "postgresql"


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one claimed message: a final status, or ``queued`` again for ``retry_at``.

    ``charged`` is False when the relay could not be used at all: the attempt is not counted.
    ``bounced_hash`` names an address the relay said does not exist, to suppress as bounced.
    """

    outbox_id: int
    fence: int
    status: OutboxStatus
    reason: str | None
    retry_at: datetime | None
    charged: bool = True
    bounced_hash: str | None = None
    checked_at: datetime | None = None
    """When the consent check right before hand-off passed or failed (``None``: no check)."""


BOUNCE_EVIDENCE = Evidence(channel=Channel.BOUNCE.value, actor="relay")


def record(conn: Connection, outcomes: list[Outcome], now: datetime) -> None:
    """Write outcomes, each only over ``sending`` under its fence (compare-and-set).

    An outcome whose row was reaped or claimed again since (its lease expired) lands nowhere.
    """
    finals: list[dict[str, object]] = []
    retries: list[dict[str, object]] = []
    requeues: list[dict[str, object]] = []
    for o in outcomes:
        row: dict[str, object] = {
            "b_id": o.outbox_id,
            "b_fence": o.fence,
            "reason": o.reason,
            "updated_at": now,
            "b_checked": o.checked_at,
        }
        if o.retry_at is None:
            finals.append({**row, "status": o.status.value})
        else:
            (retries if o.charged else requeues).append({**row, "next_attempt_at": o.retry_at})
        if o.bounced_hash and suppression.put(conn, o.bounced_hash, SuppressionReason.BOUNCED, now):
            ledger.append(
                conn,
                event="suppressed",
                subject_hash=o.bounced_hash,
                evidence=BOUNCE_EVIDENCE,
                now=now,
            )
    for statement, params in ((_FINISH, finals), (_RETRY, retries), (_REQUEUE, requeues)):
        if params:
            conn.execute(statement, params)


def claim_batch(
    conn: Connection,
    now: datetime,
    lanes: list[int | None],
    limit: int,
    lease: Lease,
    outcomes: list[Outcome] | None = None,
) -> list[Claimed]:
    """Claim up to ``limit`` due messages, taking ``lanes`` in order (``None``: direct lane),
    after writing the sender's pending ``outcomes`` (as ``record`` does) in the same
    transaction.

    The lease runs from the database's clock read before the claim (so it ends no later than
    ``lease.seconds`` after the claim commits).
    """
    if outcomes:
        record(conn, outcomes, now)
    until = database_now(conn, now) + timedelta(seconds=lease.seconds)
    claimed: list[Claimed] = []
    for lane in lanes:
        while len(claimed) < limit:
            got, settled = claim(conn, now, lane, limit - len(claimed), lease, until)
            claimed.extend(got)
            if not settled:  # this lane has nothing due
                break
        if len(claimed) >= limit:
            break
    return claimed


_PROBE_COLS = (
    subscriptions.c.status,
    suppressions.c.reason,
    campaigns.c.status,
    _CONFIRMED_ANYWHERE,
    outbox.c.status,
    outbox.c.fence,
    outbox.c.lease_until,
)
_PROBED = _CONSENT.outerjoin(campaigns, campaigns.c.id == outbox.c.campaign_id)

PROBE = select(*_PROBE_COLS).select_from(_PROBED).where(outbox.c.id == bindparam("oid"))
"""The per-message check right before hand-off: the recipient's subscription to the
message's list, their suppression, and the campaign's status, as of now; and the row's own
status, fence and lease end, so a sender whose claim was taken away never hands it off.
No row: the person was erased since the claim."""

PROBES = (
    select(*_PROBE_COLS, func.clock_timestamp(), outbox.c.id)
    .select_from(_PROBED)
    .where(outbox.c.id == any_(bindparam("oids", type_=ARRAY(Integer))))
)
"""``PROBE`` for several messages in one round trip (PostgreSQL), each row followed by the
database's clock as the row was read and the row's id: checks that start while another is
in flight share the next one."""


INTERRUPTED = (
    "interrupted: the sender stopped while this message was claimed or in hand-off; "
    "not retried (it may or may not have been delivered)"
)


_INTERRUPT = update(outbox).values(
    status=OutboxStatus.FAILED.value, reason=INTERRUPTED, updated_at=bindparam("now")
)
_IN_HAND = outbox.c.status == OutboxStatus.SENDING.value


def fail_interrupted(conn: Connection, now: datetime) -> int:
    """At start of the one SQLite sender: every row left ``sending`` by a crash is reported
    failed, never resent (G6). Several senders share a database only on PostgreSQL, where
    ``reap_expired`` takes this role."""
    return int(conn.execute(_INTERRUPT.where(_IN_HAND), {"now": now}).rowcount)


def reap_expired(conn: Connection, now: datetime) -> int:
    """Report rows whose claim expired (database time) failed, never resent (G6).

    The holder refuses to hand a row off unless its lease still has a margin to run, so a
    row past its lease end may have been handed off only by a hand-off already under way:
    it can never go again. Rows from before leases existed (no end) count as expired.
    """
    clock = database_now(conn, now)
    expired = _IN_HAND & (outbox.c.lease_until.is_(None) | (outbox.c.lease_until < clock))
    return int(conn.execute(_INTERRUPT.where(expired), {"now": now}).rowcount)


def renew(conn: Connection, lease: Lease, now: datetime) -> int:
    """Extend this sender's unexpired claims by ``lease.seconds`` (database time).

    An expired claim is never renewed: it may already be reaped, and its holder refuses it.
    """
    clock = database_now(conn, now)
    result = conn.execute(
        update(outbox)
        .where(_IN_HAND, outbox.c.lease_owner == lease.owner, outbox.c.lease_until > clock)
        .values(lease_until=clock + timedelta(seconds=lease.seconds))
    )
    return int(result.rowcount)
