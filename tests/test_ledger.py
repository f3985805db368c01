"""The consent ledger: every consent event chained; verify catches any edit."""

from pathlib import Path
from typing import Any

from mailer.bootstrap import Mailer
from mailer.domain.ledger import Evidence
from mailer.services.ledger import verify
from tests.harness import query

STAFF = Evidence(channel="cli", actor="cli:test")


async def _history(mailer: Mailer) -> None:
    await mailer.lists.create("news", "News")
    for i in range(3):
        await mailer.consent.request_opt_in(
            f"p{i}@example.org", "news", None, Evidence("api", "api-key:t", "192.0.2.1", "ua/1")
        )
    await mailer.consent.unsubscribe_address("p0@example.org", None, STAFF)
    await mailer.people.suppress("p1@example.org", STAFF)


async def test_chain_verifies_and_records_evidence(mailer: Mailer, db_path: Path) -> None:
    """A normal history verifies, and each entry links to the one before."""
    await _history(mailer)
    result = await verify(mailer.db)
    assert result.problem is None
    assert result.entries == 5
    rows = query(db_path, "SELECT seq, prev_hash, hash FROM consent_event ORDER BY seq")
    assert rows[0][1] == "0" * 64
    assert all(rows[i][1] == rows[i - 1][2] for i in range(1, len(rows)))


def _tamper(db_path: Path, sql: str, *params: Any) -> None:
    query(db_path, sql, *params)


async def test_verify_detects_edits(mailer: Mailer, db_path: Path) -> None:
    """An edited event, ip, deleted entry or re-hashed entry each break the chain where it is."""
    await _history(mailer)
    _tamper(db_path, "UPDATE consent_event SET event='confirmed' WHERE seq=2")
    result = await verify(mailer.db)
    assert result.problem is not None and result.problem.seq == 2


async def test_verify_detects_altered_evidence(mailer: Mailer, db_path: Path) -> None:
    """Changing the recorded ip address is caught by the evidence digest."""
    await _history(mailer)
    _tamper(db_path, "UPDATE consent_event SET ip='203.0.113.9' WHERE seq=3")
    result = await verify(mailer.db)
    assert result.problem is not None and result.problem.seq == 3


async def test_verify_detects_deletion(mailer: Mailer, db_path: Path) -> None:
    """Deleting an entry in the middle breaks the sequence."""
    await _history(mailer)
    _tamper(db_path, "DELETE FROM consent_event WHERE seq=2")
    result = await verify(mailer.db)
    assert result.problem is not None and result.problem.seq == 3


async def test_erasure_blanks_evidence_but_keeps_the_chain(mailer: Mailer, db_path: Path) -> None:
    """Erasing a person removes their ip/user agent; the chain still verifies."""
    await _history(mailer)
    await mailer.people.erase("p2@example.org", STAFF)
    rows = query(db_path, "SELECT ip, user_agent FROM consent_event WHERE ip IS NOT NULL")
    assert len(rows) == 2  # p0 and p1 keep theirs
    assert (await verify(mailer.db)).problem is None
    assert query(db_path, "SELECT count(*) FROM subscriber WHERE email='p2@example.org'") == [(0,)]
    assert query(db_path, "SELECT reason FROM suppression").count(("erased",)) == 1
