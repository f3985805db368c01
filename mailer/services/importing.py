"""``mailer subscriber import``: bring a list in; each new address gets a confirmation request.

Nobody is subscribed by an import: every new address gets a double opt-in confirmation request
(through the outbox, like an opt-in) and stays ``pending`` until the person confirms (G1).

What each data row becomes (the categories of ``ImportReport``; every row lands in exactly one):

* ``new`` -- a confirmation request was queued (subscription ``pending``, ledger entry with
  channel ``import``).
* ``already_confirmed`` / ``already_pending`` -- the person already has that subscription.
  Nothing is sent: an import never re-sends a request someone already received. This is also
  what makes a re-run after a crash harmless: committed chunks come back as ``already_pending``.
* ``rate_limited`` -- the consent rules (``opt_in_outcome``: the per-list resend window, the
  daily cap across lists) withheld the request; nothing is recorded, a later import may send it.
* ``unsubscribed_from_list`` -- the person left this list: nothing is sent.
* ``suppressed`` -- the address is on the suppression list, for *any* reason, including
  ``unsubscribed`` and ``erased``: nothing is sent and nothing is stored. An API opt-in may
  send those people a confirmation request because it is the person asking again; an import
  is staff replaying an old list, and the person's "no more mail" must outlast it (G5).
* ``duplicate`` -- the same address (after normalisation, i.e. the same keyed hash) earlier in
  the file.
* ``invalid`` -- not an address, a bad name, too many columns, a line that is not UTF-8 or is
  too long; reported with its line number.

The file is streamed (``csv`` over a text stream) and written in chunks of ``chunk_rows`` rows,
one write transaction each, so the single SQLite writer keeps serving other work between
chunks; the next chunk is parsed while the writer thread writes the previous one, and chunks
are written strictly in file order. Memory does not grow with the file: the address hashes
already seen (for ``duplicate``) live in a temporary SQLite file; only the line numbers of
invalid rows stay in memory (16 bytes each, so the report can list them all).
"""

import asyncio
import codecs
import csv
import sqlite3
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any, TextIO

from sqlalchemy import Connection

from mailer.domain.addresses import address_hash, parse_address
from mailer.domain.consent import OptInOutcome, RequestHistory, opt_in_outcome
from mailer.domain.ledger import Evidence
from mailer.errors import InvalidAddress, InvalidInput, NotFound
from mailer.services.ports import Clock
from mailer.services.subscriptions import clean_name
from mailer.statuses import MessageKind, SubscriptionStatus, SuppressionReason
from mailer.store import importing, ledger, lists, outbox
from mailer.store.db import Database
from mailer.store.lists import ListRow

CHUNK_ROWS = 500
"""Rows per write transaction: ~0.1 s of the writer, then other work gets its turn."""
MAX_LINE = 8192
"""Characters per physical line; a longer line is invalid (and never held whole in memory)."""
SNIFF_BYTES = 64 * 1024
SEEN_CACHE_KIB = 2048
CHECKPOINT_CHUNKS = 10
"""Fold the WAL into the database every this many chunks: a writer that never pauses would
otherwise grow it without bound (gigabytes at 300,000 rows)."""
EMAIL_HEADERS = frozenset({"email", "e-mail", "email address", "e-mail address", "mail"})
NAME_HEADERS = frozenset({"name", "full name", "display name"})
_NO_HISTORY = RequestHistory(last_for_list=None, count_last_day=0)


class RowResult(StrEnum):
    NEW = "new"
    ALREADY_CONFIRMED = "already_confirmed"
    ALREADY_PENDING = "already_pending"
    RATE_LIMITED = "rate_limited"
    UNSUBSCRIBED_FROM_LIST = "unsubscribed_from_list"
    SUPPRESSED = "suppressed"
    DUPLICATE = "duplicate"
    INVALID = "invalid"


@dataclass
class ImportReport:
    """Exact counts per category; invalid rows kept compactly (line number, reason index)."""

    list_slug: str
    counts: dict[RowResult, int] = field(default_factory=lambda: dict.fromkeys(RowResult, 0))
    suppressed_by_reason: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(SuppressionReason, 0)
    )
    _invalid_lines: "array[int]" = field(default_factory=lambda: array("L"))
    _invalid_why: "array[int]" = field(default_factory=lambda: array("L"))
    _reasons: list[str] = field(default_factory=list)
    _reason_ids: dict[str, int] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        """Data rows read (the header and blank lines are not rows)."""
        return sum(self.counts.values())

    def add_invalid(self, line: int, reason: str) -> None:
        self.counts[RowResult.INVALID] += 1
        index = self._reason_ids.setdefault(reason, len(self._reasons))
        if index == len(self._reasons):
            self._reasons.append(reason)
        self._invalid_lines.append(line)
        self._invalid_why.append(index)

    def invalid_rows(self, limit: int | None = None) -> list[tuple[int, str]]:
        """``(line, reason)`` of invalid rows in file order, the first ``limit`` of them."""
        n = len(self._invalid_lines) if limit is None else min(limit, len(self._invalid_lines))
        return [(self._invalid_lines[i], self._reasons[self._invalid_why[i]]) for i in range(n)]

    def as_json(self) -> dict[str, Any]:
        return {
            "list": self.list_slug,
            "rows": self.rows,
            "counts": {k.value: v for k, v in self.counts.items()},
            "suppressed_by_reason": {str(k): v for k, v in self.suppressed_by_reason.items()},
            "invalid_rows": [{"line": n, "reason": r} for n, r in self.invalid_rows()],
        }


@dataclass(frozen=True, slots=True)
class _Candidate:
    email: str
    email_hash: str
    name: str | None


class Importer:
    """Imports a CSV of ``email[,name]`` into one list (see the module docstring)."""

    def __init__(
        self,
        db: Database,
        hash_key: bytes,
        clock: Clock,
        resend_window: timedelta,
        on_enqueued: Callable[[], None],
        chunk_rows: int = CHUNK_ROWS,
    ) -> None:
        self._db = db
        self._hash_key = hash_key
        self._clock = clock
        self._resend_window = resend_window
        self._on_enqueued = on_enqueued
        self._chunk_rows = chunk_rows

    async def import_csv(
        self,
        path: Path,
        list_slug: str,
        evidence: Evidence,
        progress: Callable[[ImportReport], None] | None = None,
    ) -> ImportReport:
        """Import ``path`` into ``list_slug``; ``progress`` is called after every chunk."""
        with _open_csv(path) as stream:
            target = await self._db.read(lists.by_slug, list_slug)
            if target is None:
                raise NotFound(f"no list named {list_slug!r}")
            report = ImportReport(list_slug)
            seen = _SeenHashes()
            chunk: list[_Candidate] = []
            writing: asyncio.Task[None] | None = None  # the previous chunk, written meanwhile
            chunks = 0
            try:
                for line, row in _CsvRows(stream, path):
                    if isinstance(row, str):
                        report.add_invalid(line, row)
                        continue
                    candidate = self._candidate(row)
                    if isinstance(candidate, str):
                        report.add_invalid(line, candidate)
                        continue
                    if not seen.add(candidate.email_hash):
                        report.counts[RowResult.DUPLICATE] += 1
                        continue
                    chunk.append(candidate)
                    if len(chunk) >= self._chunk_rows:
                        if writing is not None:
                            await writing
                            if progress is not None:
                                progress(report)
                        chunks += 1
                        fold = chunks % CHECKPOINT_CHUNKS == 0
                        writing = asyncio.create_task(
                            self._write_chunk(target, chunk, evidence, report, fold)
                        )
                        chunk = []
            finally:
                seen.close()
                if writing is not None:  # never leave a chunk unfinished behind an error
                    await writing
            if chunk:
                await self._write_chunk(target, chunk, evidence, report)
            if progress is not None:
                progress(report)
        return report

    def _candidate(self, row: list[str]) -> _Candidate | str:
        """A row as an address to look up, or the reason it is invalid."""
        while len(row) > 2 and not row[-1].strip():
            row.pop()  # trailing empty columns, as spreadsheets write them
        if len(row) > 2:
            return f"{len(row)} columns; expected email[,name]"
        try:
            address = parse_address(row[0])
            name = clean_name(row[1] if len(row) > 1 else None)
        except (InvalidAddress, InvalidInput) as exc:
            return exc.message
        return _Candidate(address.email, address_hash(self._hash_key, address), name)

    async def _write_chunk(
        self,
        target: ListRow,
        chunk: list[_Candidate],
        evidence: Evidence,
        report: ImportReport,
        fold: bool = False,
    ) -> None:
        """Decide and write one chunk in one transaction; with ``fold``, checkpoint after."""
        now = self._clock.now()
        window = self._resend_window

        def tx(conn: Connection) -> list[tuple[RowResult, str | None]]:
            found = importing.known(conn, target.id, [c.email_hash for c in chunk])
            decided = [_decide(conn, target, c, found, now, window) for c in chunk]
            joiners = [
                importing.Joiner(
                    c.email, c.email_hash, c.name, found.subscriber_ids.get(c.email_hash)
                )
                for c, (result, _) in zip(chunk, decided, strict=True)
                if result is RowResult.NEW
            ]
            ids = importing.add_pending(conn, target.id, joiners, now)
            for joiner, subscriber in zip(joiners, ids, strict=True):
                outbox.enqueue(
                    conn,
                    kind=MessageKind.CONFIRM,
                    list_id=target.id,
                    subscriber_id=subscriber,
                    now=now,
                )
                ledger.append(
                    conn,
                    event="opt-in-requested",
                    subject_hash=joiner.email_hash,
                    evidence=evidence,
                    now=now,
                    list_uid=target.uid,
                )
            return decided

        results = await self._db.write(tx)
        for result, reason in results:
            report.counts[result] += 1
            if reason is not None:
                report.suppressed_by_reason[reason] = report.suppressed_by_reason.get(reason, 0) + 1
        if any(result is RowResult.NEW for result, _ in results):
            self._on_enqueued()
        if fold:
            await self._db.checkpoint()


def _decide(
    conn: Connection,
    target: ListRow,
    c: _Candidate,
    found: importing.Known,
    now: datetime,
    window: timedelta,
) -> tuple[RowResult, str | None]:
    """What to do with one address (and the suppression reason when it is suppressed).

    ``NEW`` means: ask for confirmation, exactly as an opt-in would (the caller does it).
    """
    reason = found.suppressed.get(c.email_hash)
    if reason is not None:
        return RowResult.SUPPRESSED, reason
    person = found.subscriber_ids.get(c.email_hash)
    status = None if person is None else found.statuses.get(person)
    if status == SubscriptionStatus.CONFIRMED:
        return RowResult.ALREADY_CONFIRMED, None
    if status == SubscriptionStatus.PENDING:
        return RowResult.ALREADY_PENDING, None
    if status == SubscriptionStatus.UNSUBSCRIBED:
        return RowResult.UNSUBSCRIBED_FROM_LIST, None
    history = (
        _NO_HISTORY if person is None else outbox.confirm_history(conn, person, target.id, now)
    )
    outcome = opt_in_outcome(status, None, history, now, window)
    if outcome in (OptInOutcome.RECENTLY_REQUESTED, OptInOutcome.DAILY_CAP):
        return RowResult.RATE_LIMITED, None
    if outcome is not OptInOutcome.REQUESTED:  # only a status handled above leads here
        raise AssertionError(f"unexpected opt-in outcome {outcome} for status {status}")
    return RowResult.NEW, None


class _SeenHashes:
    """The address hashes met so far in one file, for ``duplicate``.

    Kept in a private temporary SQLite database (deleted when closed) with a small page cache,
    so memory stays flat however long the file: a Python set would cost ~80 bytes an address.
    """

    def __init__(self) -> None:
        self._conn = sqlite3.connect("", isolation_level=None)  # "": private, on disk if large
        self._conn.execute(f"PRAGMA cache_size=-{SEEN_CACHE_KIB}")
        self._conn.execute("CREATE TABLE seen (h BLOB PRIMARY KEY) WITHOUT ROWID")
        self._conn.execute("BEGIN")  # never committed: the database is thrown away

    def add(self, email_hash: str) -> bool:
        """Remember a hash; False if it was already there."""
        cursor = self._conn.execute(_REMEMBER, (bytes.fromhex(email_hash),))
        return cursor.rowcount == 1

    def close(self) -> None:
        self._conn.close()


_REMEMBER = "INSERT OR IGNORE INTO seen (h) VALUES (?)"


def _is_utf8(row: list[str]) -> bool:
    """False when the file's bytes were not UTF-8 (kept as surrogates by ``surrogateescape``)."""
    try:
        "".join(row).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _open_csv(path: Path) -> TextIO:
    """Open a CSV for streaming; refuse, in one line, what is not a text file at all.

    ``utf-8-sig`` drops a byte-order mark, ``newline=''`` lets ``csv`` see CRLF and quoted
    newlines as written. Bytes that are not UTF-8 are kept as surrogates, so the row holding
    them is reported invalid with its line number instead of the whole import failing.
    """
    try:
        with path.open("rb") as raw:
            head = raw.read(SNIFF_BYTES)
        stream = path.open(encoding="utf-8-sig", errors="surrogateescape", newline="")
    except FileNotFoundError:
        raise InvalidInput(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InvalidInput(f"{path}: is a directory, not a CSV file") from None
    except OSError as exc:
        raise InvalidInput(f"{path}: cannot read it: {exc.strerror or exc}") from None
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        stream.close()
        raise InvalidInput(f"{path}: is UTF-16 or UTF-32 text; save it as CSV in UTF-8")
    if b"\x00" in head:
        stream.close()
        raise InvalidInput(f"{path}: is not a CSV file (it holds binary data)")
    return stream


class _CsvRows:
    """The data records of a CSV as ``(first line number, fields)``, or ``(line, reason)``.

    Skips blank lines and a leading ``email[,name]`` header (refusing a header that names
    other columns). No physical line is ever held longer than ``MAX_LINE`` characters.
    """

    def __init__(self, stream: TextIO, path: Path) -> None:
        self._stream = stream
        self._path = path
        self._physical = 0
        self._overlong: list[int] = []

    def _lines(self) -> Iterator[str]:
        cut_cr = False
        while True:
            line = self._stream.readline(MAX_LINE)
            if not line:
                return
            if cut_cr and line == "\n":  # the rest of a CRLF that the limit split
                cut_cr = False
                continue
            self._physical += 1
            cut_cr = len(line) == MAX_LINE and line.endswith("\r")
            if len(line) == MAX_LINE and not line.endswith(("\n", "\r")):
                self._overlong.append(self._physical)
                while True:  # drop the rest of this line, MAX_LINE characters at a time
                    rest = self._stream.readline(MAX_LINE)
                    if not rest or rest.endswith(("\n", "\r")):
                        break
                line = "\n"
            yield line

    def __iter__(self) -> Iterator[tuple[int, list[str] | str]]:
        records = self._records()
        for line, row in records:  # only the first non-blank record may be a header
            if isinstance(row, str) or not self._is_header(row, line):
                yield line, row
            break
        yield from records

    def _records(self) -> Iterator[tuple[int, list[str] | str]]:
        reader = csv.reader(self._lines())
        end = 0
        while True:
            start = end + 1
            try:
                row: list[str] | str = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                row = f"not readable as CSV: {exc}"
            end = reader.line_num
            if self._overlong and self._overlong[-1] >= start:
                self._overlong.clear()
                yield start, f"line longer than {MAX_LINE} characters"
            elif isinstance(row, str):
                yield start, row
            elif not any(cell.strip() for cell in row):
                continue  # a blank line
            elif not _is_utf8(row):
                yield start, "not valid UTF-8 text"
            else:
                yield start, row

    def _is_header(self, row: list[str], line: int) -> bool:
        cells = [cell.strip().casefold() for cell in row]
        if cells[0] not in EMAIL_HEADERS:
            return False
        while len(cells) > 1 and not cells[-1]:
            cells.pop()
        if len(cells) > 2 or (len(cells) == 2 and cells[1] not in NAME_HEADERS):
            raise InvalidInput(
                f"{self._path}: line {line}: the header names the columns {', '.join(row)}; "
                "expected email[,name]"
            )
        return True
