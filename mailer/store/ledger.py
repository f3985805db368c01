"""The consent ledger: append-only, hash-chained (the chain rules live in ``domain.ledger``)."""

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, func, insert, select, update

from mailer.domain.ledger import GENESIS, Entry, Evidence, entry_hash, evidence_digest
from mailer.store import policy
from mailer.store.tables import consent_events as t


@dataclass(frozen=True, slots=True)
class LedgerRecord:
    entry: Entry
    hash: str
    ip: str | None
    user_agent: str | None


_HEAD = select(t.c.seq, t.c.hash).order_by(t.c.seq.desc()).limit(1)
_APPENDERS_TAKE_TURNS = select(func.pg_advisory_xact_lock(0x6C6564676572))  # "ledger"
_INSERT = insert(t)


def append(
    conn: Connection,
    *,
    event: str,
    subject_hash: str,
    evidence: Evidence,
    now: datetime,
    list_uid: str | None = None,
) -> int:
    """Append one entry linked to the current head; return its sequence number.

    The scope is the list named by ``list_uid``, or ``global`` without one. Callers run
    inside a write transaction, so the head cannot move underneath (SQLite has one writer;
    on PostgreSQL appenders take turns on a transaction-scoped advisory lock); the primary
    key on ``seq`` refuses a fork should two writers ever race. The entry records the privacy-policy
    version in force at ``now`` (changes apply going forward only).
    """
    if conn.dialect.name == "postgresql":
        conn.execute(_APPENDERS_TAKE_TURNS)
    head = conn.execute(_HEAD).first()
    seq, prev = (1, GENESIS) if head is None else (int(head[0]) + 1, str(head[1]))
    entry = Entry(
        seq=seq,
        at=now,
        event=event,
        subject_hash=subject_hash,
        list_uid=list_uid,
        scope="global" if list_uid is None else "list",
        channel=evidence.channel,
        actor=evidence.actor,
        policy_version=policy.in_force(conn, now.date()),
        evidence_digest=evidence_digest(evidence.ip, evidence.user_agent),
        prev_hash=prev,
    )
    conn.execute(
        _INSERT,
        {
            "seq": entry.seq,
            "at": entry.at,
            "event": entry.event,
            "subject_hash": entry.subject_hash,
            "list_uid": entry.list_uid,
            "scope": entry.scope,
            "channel": entry.channel,
            "actor": entry.actor,
            "ip": evidence.ip,
            "user_agent": evidence.user_agent,
            "policy_version": entry.policy_version,
            "evidence_digest": entry.evidence_digest,
            "prev_hash": entry.prev_hash,
            "hash": entry_hash(entry),
        },
    )
    return seq


def _records(conn: Connection, where: object | None = None) -> Iterator[LedgerRecord]:
    q = select(t).order_by(t.c.seq)
    if where is not None:
        q = q.where(where)  # type: ignore[arg-type]
    for m in conn.execute(q).mappings():
        yield LedgerRecord(
            Entry(
                seq=m["seq"],
                at=m["at"],
                event=m["event"],
                subject_hash=m["subject_hash"],
                list_uid=m["list_uid"],
                scope=m["scope"],
                channel=m["channel"],
                actor=m["actor"],
                policy_version=m["policy_version"],
                evidence_digest=m["evidence_digest"],
                prev_hash=m["prev_hash"],
            ),
            m["hash"],
            m["ip"],
            m["user_agent"],
        )


def chain(conn: Connection) -> Iterator[LedgerRecord]:
    """Every entry in order, streamed."""
    return _records(conn)


def for_subject(conn: Connection, subject_hash: str) -> list[LedgerRecord]:
    return list(_records(conn, t.c.subject_hash == subject_hash))


def blank_evidence(conn: Connection, subject_hash: str) -> int:
    """Erase the ip and user agent of a person's entries. The chain keeps their digest, so it
    still verifies; this is the only change ever made to a written entry."""
    result = conn.execute(
        update(t).where(t.c.subject_hash == subject_hash).values(ip=None, user_agent=None)
    )
    return int(result.rowcount)


def count_for_subject(conn: Connection, subject_hash: str) -> int:
    """How many entries name a person (their keyed hash)."""
    q = select(func.count()).select_from(t).where(t.c.subject_hash == subject_hash)
    return int(conn.execute(q).scalar_one())
