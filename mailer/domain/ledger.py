"""The consent ledger's hash chain: how an entry's hash is computed, and how to check a run."""

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

GENESIS = "0" * 64


@dataclass(frozen=True, slots=True)
class Evidence:
    """Who did it and from where; the personal part of an entry, erasable on its own."""

    channel: str
    actor: str
    ip: str | None = None
    user_agent: str | None = None


@dataclass(frozen=True, slots=True)
class Entry:
    seq: int
    at: datetime
    event: str
    subject_hash: str
    list_uid: str | None
    scope: str
    channel: str
    actor: str
    policy_version: str | None
    evidence_digest: str
    prev_hash: str


def evidence_digest(ip: str | None, user_agent: str | None) -> str:
    """The digest that stands in the chain for the erasable ip and user agent."""
    return hashlib.sha256(json.dumps([ip, user_agent]).encode("utf-8")).hexdigest()


def entry_hash(entry: Entry) -> str:
    """SHA-256 over a canonical JSON form of every chained field."""
    body = [
        entry.seq,
        entry.at.isoformat(),
        entry.event,
        entry.subject_hash,
        entry.list_uid,
        entry.scope,
        entry.channel,
        entry.actor,
        entry.policy_version,
        entry.evidence_digest,
        entry.prev_hash,
    ]
    return hashlib.sha256(json.dumps(body, separators=(",", ":")).encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class Break:
    seq: int
    problem: str


def first_break(rows: Iterable[tuple[Entry, str, str | None, str | None]]) -> Break | None:
    """Walk ``(entry, stored_hash, ip, user_agent)`` in ``seq`` order; return the first break."""
    prev = GENESIS
    expected_seq = 1
    for entry, stored, ip, user_agent in rows:
        if entry.seq != expected_seq:
            return Break(entry.seq, f"expected entry {expected_seq}, found {entry.seq}")
        if entry.prev_hash != prev:
            return Break(entry.seq, "does not link to the previous entry")
        if entry_hash(entry) != stored:
            return Break(entry.seq, "its content does not match its hash")
        if (ip is not None or user_agent is not None) and evidence_digest(
            ip, user_agent
        ) != entry.evidence_digest:
            return Break(entry.seq, "its ip or user agent was altered")
        prev = stored
        expected_seq += 1
    return None
