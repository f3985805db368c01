"""`mailer subscriber import`: exact counts, confirmation requests only, idempotent re-runs."""

import asyncio
import json
import os
import signal
import sys
import time
from asyncio.subprocess import DEVNULL
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from mailer.bootstrap import Mailer, open_mailer
from mailer.config import Settings
from mailer.domain.addresses import address_hash, parse_address
from mailer.domain.ledger import Evidence
from mailer.errors import InvalidInput, MailerError, NotFound
from mailer.services.importing import MAX_LINE, Importer, ImportReport, RowResult
from mailer.services.ledger import verify
from mailer.services.setup import instance_secrets
from tests.conftest import (
    SECRET,
    Cli,
    init_db,
    links,
    make_cli,
    make_settings,
    path_of,
    sqlite_only,
)
from tests.databases import active
from tests.harness import MutableClock, SinkServer, query, wait_until

EVIDENCE = Evidence(channel="import", actor="cli:test")
STAFF = Evidence(channel="cli", actor="cli:test")
BOM = b"\xef\xbb\xbf"


@pytest.fixture
async def quiet(settings: Settings) -> AsyncIterator[Mailer]:
    """A mailer without a worker (queued rows stay queued), with the list ``news``."""
    await init_db(settings)
    async with open_mailer(settings) as running:
        await running.lists.create("news", "Example News")
        yield running


def write_csv(path: Path, lines: list[bytes], bom: bool = True) -> Path:
    """Write raw CSV lines joined by CRLF (the last one without a line ending)."""
    path.write_bytes((BOM if bom else b"") + b"\r\n".join(lines))
    return path


def counts(report: ImportReport) -> dict[str, int]:
    """The non-zero counts of a report."""
    return {k.value: v for k, v in report.counts.items() if v}


def hash_of(m: Mailer, email: str) -> str:
    return m.consent.identify(email)[1]


async def seed_people(m: Mailer, db_path: Path) -> None:
    """Someone confirmed, someone pending, someone who left the list, five suppressions."""
    for email in ("confirmed@example.org", "pending@example.org", "left@example.org"):
        await m.consent.request_opt_in(email, "news", None, STAFF)
    query(
        db_path,
        "UPDATE subscription SET status = 'confirmed', confirmed_at = updated_at"
        " WHERE subscriber_id = (SELECT id FROM subscriber WHERE email = ?)",
        "confirmed@example.org",
    )
    await m.consent.unsubscribe_address("left@example.org", "news", STAFF)
    await m.consent.unsubscribe_address("unsub@example.org", None, STAFF)
    await m.people.suppress("manual@example.org", STAFF)
    await m.consent.request_opt_in("erased@example.org", "news", None, STAFF)
    await m.people.erase("erased@example.org", STAFF)
    for email, reason in (("bounced@example.org", "bounced"), ("compl@example.org", "complained")):
        query(
            db_path,
            "INSERT INTO suppression(email_hash, reason, created_at) VALUES (?, ?, '2026-01-01')",
            hash_of(m, email),
            reason,
        )


MIXED = [
    b"Email,Name",  # 1: a header, in any case
    b'new1@example.org,"Lovelace, Ada"',  # 2
    b"NEW1@example.org,Case Variant",  # 3: duplicate
    b"new1@example.org,",  # 4: duplicate
    b"not-an-address,Bob",  # 5: invalid
    b"new2@example.org,Name,extra",  # 6: invalid, three columns
    b"",  # 7: blank, not a row
    b'"new3@example.org","Two',  # 8: invalid name (a line break), spans 8-9
    b'lines"',  # 9
    b"new4@example.org," + b"n" * 201,  # 10: invalid, name too long
    b"new5@example.org,Bad \xff\xfe bytes",  # 11: invalid, not UTF-8
    b"confirmed@example.org,C",  # 12
    b"pending@example.org,P",  # 13
    b"left@example.org",  # 14: unsubscribed from this list
    b"unsub@example.org",  # 15
    b"BOUNCED@example.org,Case Of Bounced",  # 16
    b"compl@example.org",  # 17
    b"erased@example.org,Back Again",  # 18
    b"manual@example.org",  # 19
    b'new6@example.org,"Quote ""Q"" Name"',  # 20
    "new7@bücher.example,Unicode domain".encode(),  # 21
    b"new7@xn--bcher-kva.example,Punycode",  # 22: duplicate
    b"new8@example.org,Eight,,",  # 23: trailing empty columns are fine
    b"x" * (MAX_LINE + 500) + b"@example.org,Long",  # 24: invalid, over-long line
    b"new9@example.org",  # 25, no line ending
]
MIXED_COUNTS = {
    "new": 5,
    "already_confirmed": 1,
    "already_pending": 1,
    "unsubscribed_from_list": 1,
    "suppressed": 5,
    "duplicate": 3,
    "invalid": 6,
}
NEW = [
    "new1@example.org",
    "new6@example.org",
    "new7@bücher.example",
    "new8@example.org",
    "new9@example.org",
]


async def test_mixed_file_exact_counts_and_state(
    quiet: Mailer, db_path: Path, tmp_path: Path
) -> None:
    """BOM, CRLF, quoting, duplicates, invalid and suppressed rows: exact counts, requests only."""
    await seed_people(quiet, db_path)
    tables = ("outbox", "subscriber")
    before = {t: query(db_path, f"SELECT count(*) FROM {t}")[0][0] for t in tables}
    report = await quiet.imports.import_csv(write_csv(tmp_path / "in.csv", MIXED), "news", EVIDENCE)

    assert counts(report) == MIXED_COUNTS and report.rows == 22
    assert report.suppressed_by_reason == {
        "unsubscribed": 1,
        "bounced": 1,
        "complained": 1,
        "erased": 1,
        "manual": 1,
    }
    invalid = report.invalid_rows()
    assert [line for line, _ in invalid] == [5, 6, 8, 10, 11, 24]
    reasons = [reason for _, reason in invalid]
    assert "@-sign" in reasons[0] and reasons[1] == "3 columns; expected email[,name]"
    assert "control characters" in reasons[2] and "longer than 200" in reasons[3]
    assert reasons[4] == "not valid UTF-8 text" and f"longer than {MAX_LINE}" in reasons[5]

    rows = query(
        db_path,
        "SELECT s.email, s.name, sub.status, o.kind, o.status FROM subscriber s"
        " JOIN subscription sub ON sub.subscriber_id = s.id"
        " JOIN outbox o ON o.subscriber_id = s.id"
        " WHERE s.email LIKE 'new%' ORDER BY s.email",
    )
    assert rows == [
        ("new1@example.org", "Lovelace, Ada", "pending", "confirm", "queued"),
        ("new6@example.org", 'Quote "Q" Name', "pending", "confirm", "queued"),
        ("new7@bücher.example", "Unicode domain", "pending", "confirm", "queued"),
        ("new8@example.org", "Eight", "pending", "confirm", "queued"),
        ("new9@example.org", None, "pending", "confirm", "queued"),
    ]
    after = {t: query(db_path, f"SELECT count(*) FROM {t}")[0][0] for t in tables}
    assert after == {"outbox": before["outbox"] + 5, "subscriber": before["subscriber"] + 5}
    statuses = query(
        db_path,
        "SELECT s.email, sub.status FROM subscription sub JOIN subscriber s"
        " ON s.id = sub.subscriber_id WHERE s.email NOT LIKE 'new%' ORDER BY s.email",
    )
    assert statuses == [
        ("confirmed@example.org", "confirmed"),
        ("left@example.org", "unsubscribed"),
        ("pending@example.org", "pending"),
    ]
    suppressed = ("unsub", "bounced", "compl", "erased", "manual")
    where = " OR ".join("lower(email) LIKE ?" for _ in suppressed)
    assert (
        query(
            db_path, f"SELECT email FROM subscriber WHERE {where}", *(f"{s}@%" for s in suppressed)
        )
        == []
    )

    entries = query(
        db_path, "SELECT event, subject_hash, scope FROM consent_event WHERE channel = 'import'"
    )
    assert entries == [("opt-in-requested", hash_of(quiet, e), "list") for e in NEW]
    assert (await verify(quiet.db)).problem is None


async def test_rerun_sends_nothing_twice(quiet: Mailer, db_path: Path, tmp_path: Path) -> None:
    """The same file again: everyone new the first time is now already pending; nothing queued."""
    await seed_people(quiet, db_path)
    path = write_csv(tmp_path / "in.csv", MIXED)
    await quiet.imports.import_csv(path, "news", EVIDENCE)
    snapshot = {t: query(db_path, f"SELECT * FROM {t}") for t in ("outbox", "consent_event")}
    again = await quiet.imports.import_csv(path, "news", EVIDENCE)
    expected = {k: v for k, v in MIXED_COUNTS.items() if k != "new"}
    assert counts(again) == {**expected, "already_pending": 6}
    assert {t: query(db_path, f"SELECT * FROM {t}") for t in snapshot} == snapshot


async def test_rerun_after_partial_import(quiet: Mailer, db_path: Path, tmp_path: Path) -> None:
    """After a crash that left the first chunks committed, a re-run finishes the rest, once."""
    lines = [f"p{i}@example.org,Person {i}".encode() for i in range(23)]
    half = write_csv(tmp_path / "half.csv", lines[:10])
    whole = write_csv(tmp_path / "whole.csv", lines)
    secrets = await instance_secrets(quiet.db)
    importer = Importer(
        quiet.db, secrets.hash_key, quiet.clock, timedelta(minutes=10), lambda: None, chunk_rows=4
    )
    assert counts(await importer.import_csv(half, "news", EVIDENCE)) == {"new": 10}
    assert counts(await importer.import_csv(whole, "news", EVIDENCE)) == {
        "new": 13,
        "already_pending": 10,
    }
    per_person = query(db_path, "SELECT subscriber_id, count(*) FROM outbox GROUP BY 1")
    assert len(per_person) == 23 and {n for _, n in per_person} == {1}


async def test_daily_cap_rate_limits_and_later_import_sends(
    tmp_path: Path, sink: SinkServer
) -> None:
    """Someone asked three times today is counted rate-limited, and gets a request a day later."""
    clock = MutableClock()
    settings = make_settings(tmp_path, smtp_host="127.0.0.1", smtp_port=sink.port)
    await init_db(settings)
    db_path = tmp_path / "mailer.db"
    async with open_mailer(settings, clock=clock) as m:
        for slug in ("a", "b", "c", "news"):
            await m.lists.create(slug, slug.upper())
        for slug in ("a", "b", "c"):
            await m.consent.request_opt_in("busy@example.org", slug, None, STAFF)
        path = write_csv(tmp_path / "in.csv", [b"busy@example.org", b"fresh@example.org"])
        first = await m.imports.import_csv(path, "news", EVIDENCE)
        assert counts(first) == {"rate_limited": 1, "new": 1}
        news_rows = (
            "SELECT s.email FROM subscription sub JOIN subscriber s ON s.id = sub.subscriber_id"
        )
        news_rows += " JOIN mailing_list l ON l.id = sub.list_id WHERE l.slug = 'news'"
        assert query(db_path, news_rows) == [("fresh@example.org",)]
        clock.advance(24 * 3600 + 1)
        later = await m.imports.import_csv(path, "news", EVIDENCE)
        assert counts(later) == {"new": 1, "already_pending": 1}
        assert sorted(query(db_path, news_rows)) == [("busy@example.org",), ("fresh@example.org",)]


async def test_worker_woken_only_for_chunks_that_queued(quiet: Mailer, tmp_path: Path) -> None:
    """The enqueue hook fires once per chunk that queued a request, never for the others."""
    await quiet.people.suppress("s1@example.org", STAFF)
    await quiet.people.suppress("s2@example.org", STAFF)
    calls: list[int] = []
    secrets = await instance_secrets(quiet.db)
    importer = Importer(
        quiet.db,
        secrets.hash_key,
        quiet.clock,
        timedelta(minutes=10),
        lambda: calls.append(1),
        chunk_rows=2,
    )
    rows = [b"n1@example.org", b"n2@example.org", b"s1@example.org", b"s2@example.org"]
    rows.append(b"n3@example.org")
    report = await importer.import_csv(write_csv(tmp_path / "in.csv", rows), "news", EVIDENCE)
    assert counts(report) == {"new": 3, "suppressed": 2}
    assert len(calls) == 2


async def test_other_writes_interleave_with_an_import(quiet: Mailer, tmp_path: Path) -> None:
    """An unsubscribe is answered while a long import is still running (chunked transactions)."""
    path = write_csv(tmp_path / "in.csv", [f"u{i}@example.org".encode() for i in range(5000)])
    secrets = await instance_secrets(quiet.db)
    importer = Importer(
        quiet.db, secrets.hash_key, quiet.clock, timedelta(minutes=10), lambda: None, chunk_rows=100
    )
    first_chunk = asyncio.Event()
    task = asyncio.create_task(
        importer.import_csv(path, "news", EVIDENCE, progress=lambda _: first_chunk.set())
    )
    await first_chunk.wait()
    await quiet.consent.unsubscribe_address("someone@example.org", None, STAFF)
    assert not task.done()
    assert counts(await task) == {"new": 5000}


async def test_imported_people_get_a_request_and_only_confirming_subscribes(
    mailer: Mailer, client: TestClient[Any, Any], sink: SinkServer, news: str, tmp_path: Path
) -> None:
    """Via the worker: one request per new address, without the imported name; POST confirms."""
    path = write_csv(
        tmp_path / "in.csv",
        [b"email,name", b'ann@example.org,"Secret, Name"', b"bo@example.org", b"ANN@example.org"],
    )
    report = await mailer.imports.import_csv(path, news, EVIDENCE)
    assert counts(report) == {"new": 2, "duplicate": 1}
    await wait_until(lambda: len(sink.messages) == 2, what="two confirmation requests")
    await asyncio.sleep(0.2)
    assert sorted(m.rcpt_tos[0] for m in sink.messages) == ["ann@example.org", "bo@example.org"]
    ann = sink.to("ann@example.org")[0]
    assert b"Secret" not in ann.raw
    assert (await client.post(path_of(links(ann)["confirm"]))).status == 200
    shown = {
        e: [s.status for s in (await mailer.people.show(e)).subscriptions]
        for e in ("ann@example.org", "bo@example.org")
    }
    assert shown == {"ann@example.org": ["confirmed"], "bo@example.org": ["pending"]}


async def test_not_csv_and_bad_header_are_refused_before_anything_is_written(
    quiet: Mailer, db_path: Path, tmp_path: Path
) -> None:
    """Binary, UTF-16, a header naming other columns, a missing file, an unknown list."""
    cases = {
        "binary.csv": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary data"),
        "utf16.csv": ("email\r\na@example.org\r\n".encode("utf-16"), "UTF-16"),
        "header.csv": (b"email,phone\r\na@example.org,123\r\n", "expected email[,name]"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(MailerError) as caught:
            await quiet.imports.import_csv(tmp_path / name, "news", EVIDENCE)
        assert message in str(caught.value), name
    with pytest.raises(InvalidInput, match="no such file"):
        await quiet.imports.import_csv(tmp_path / "missing.csv", "news", EVIDENCE)
    write_csv(tmp_path / "ok.csv", [b"a@example.org"])
    with pytest.raises(NotFound, match="no list named"):
        await quiet.imports.import_csv(tmp_path / "ok.csv", "nope", EVIDENCE)
    assert query(db_path, "SELECT count(*) FROM subscriber") == [(0,)]


async def test_unclosed_quote_and_header_only_files(quiet: Mailer, tmp_path: Path) -> None:
    """A quote never closed makes one invalid row; a file with only a header imports nothing."""
    report = await quiet.imports.import_csv(
        write_csv(tmp_path / "q.csv", [b"a@example.org", b'b@example.org,"open', b"c@example.org"]),
        "news",
        EVIDENCE,
    )
    assert counts(report) == {"new": 1, "invalid": 1}
    assert report.invalid_rows() == [(2, "name contains control characters")]
    empty = await quiet.imports.import_csv(
        write_csv(tmp_path / "h.csv", [b"email"], bom=False), "news", EVIDENCE
    )
    assert empty.rows == 0


# -- the command line ---------------------------------------------------------------------


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Cli:
    """Run ``mailer ARGS`` in-process against a fresh installation with list ``news``."""
    run = make_cli(tmp_path, monkeypatch, capsys, secret_keys=SECRET)
    assert run("list", "create", "news", "--name", "News")[0] == 0
    return run


def big_file(path: Path, key: bytes, db: Path) -> dict[str, int]:
    """5,000 rows: 5 % invalid, 2 % suppressed, exact and case duplicates; the counts expected."""
    suppress = []
    lines = [b"email,name"]
    expected = dict.fromkeys(("new", "invalid", "suppressed", "duplicate"), 0)
    for i in range(5000):
        if i % 20 == 0:
            lines.append(f"broken{i}@,Invalid".encode())
            expected["invalid"] += 1
        elif i % 50 == 1:
            lines.append(f"gone{i}@example.org".encode())
            suppress.append(address_hash(key, parse_address(f"gone{i}@example.org")))
            expected["suppressed"] += 1
        elif i % 100 == 5:
            lines.append(f"Person{i - 1}@Example.ORG,Case".encode())
            expected["duplicate"] += 1
        elif i % 100 == 7:
            lines.append(f"person{i - 1}@example.org".encode())
            expected["duplicate"] += 1
        else:
            lines.append(f'person{i}@example.org,"Last{i}, First"'.encode())
            expected["new"] += 1
    write_csv(path, lines)
    with active.connect(db) as conn, conn:
        conn.executemany(
            "INSERT INTO suppression(email_hash, reason, created_at)"
            " VALUES (?, 'bounced', '2026-01-01')",
            [(h,) for h in suppress],
        )
    return expected


def hash_key(db: Path) -> bytes:
    [(value,)] = query(db, "SELECT value FROM instance_setting WHERE name = 'address_hash_key'")
    return bytes.fromhex(value)


def test_cli_json_and_summary_on_5000_rows(cli: Cli, tmp_path: Path) -> None:
    """--json prints the exact counts and every invalid line; the summary prints the same."""
    db = tmp_path / "cli.db"
    expected = big_file(tmp_path / "big.csv", hash_key(db), db)
    assert expected == {"new": 4550, "invalid": 250, "suppressed": 100, "duplicate": 100}
    code, out, err = cli("subscriber", "import", "big.csv", "--list", "news", "--json")
    assert code == 0 and err == ""
    report = json.loads(out)
    assert report["rows"] == 5000
    assert {k: v for k, v in report["counts"].items() if v} == expected
    assert report["suppressed_by_reason"]["bounced"] == 100
    assert [r["line"] for r in report["invalid_rows"]] == list(range(2, 5002, 20))
    state = query(
        db,
        "SELECT (SELECT count(*) FROM subscription WHERE status = 'pending'),"
        " (SELECT count(*) FROM subscription WHERE status != 'pending'),"
        " (SELECT count(*) FROM outbox WHERE kind = 'confirm' AND status = 'queued'),"
        " (SELECT count(DISTINCT subscriber_id) FROM outbox),"
        " (SELECT count(*) FROM consent_event WHERE channel = 'import')",
    )
    assert state == [(4550, 0, 4550, 4550, 4550)]

    code, out, err = cli("subscriber", "import", "big.csv", "--list", "news")
    assert code == 0 and err == ""
    table = {
        line.split("│")[1].strip(): line.split("│")[2].strip()
        for line in out.splitlines()
        if line.count("│") == 3
    }
    assert "5,000 rows" in out
    assert table["new: confirmation request queued"] == "0"
    assert table["already pending (asked before): nothing sent"] == "4,550"
    assert table["invalid"] == "250" and table["duplicates in the file"] == "100"
    assert "suppressed by reason: bounced 100" in out
    assert "line 2: " in out and "line 182: " in out and "line 202: " not in out
    assert "--json lists all" in out
    assert query(db, "SELECT count(*) FROM outbox") == [(4550,)]


def test_cli_errors_are_one_line(cli: Cli, tmp_path: Path) -> None:
    """Missing file, a directory, binary content, unknown list: exit 1, one line, no traceback."""
    (tmp_path / "bin.csv").write_bytes(b"PK\x03\x04\x14\x00\x00\x00")
    (tmp_path / "ok.csv").write_text("a@example.org\n")
    (tmp_path / "dir.csv").mkdir()
    for args, message in (
        (["missing.csv", "--list", "news"], "missing.csv: no such file"),
        (["dir.csv", "--list", "news"], "is a directory"),
        (["bin.csv", "--list", "news"], "not a CSV file"),
        (["ok.csv", "--list", "nope"], "no list named 'nope'"),
    ):
        code, out, err = cli("subscriber", "import", *args)
        assert code == 1 and out == "", args
        assert err.startswith("mailer: error: ") and err.count("\n") == 1, err
        assert message in err and "Traceback" not in err


@pytest.mark.slow
async def test_killed_import_rerun_creates_no_duplicates(quiet: Mailer, tmp_path: Path) -> None:
    """kill -9 in the middle of a CLI import; the re-run completes it with one request each."""
    db = tmp_path / "mailer.db"
    lines = [f"k{i}@example.org,K {i}".encode() for i in range(15_000)]
    path = write_csv(tmp_path / "in.csv", lines)
    env = {
        **os.environ,
        "MAILER_DATABASE_URL": active.url(db),
        "MAILER_VAR_DIR": str(tmp_path / "var"),
        "MAILER_SECRET_KEYS": SECRET,
    }
    env.pop("MAILER_CONFIG", None)
    argv = ["-m", "mailer.cli.main", "subscriber", "import", str(path), "--list", "news"]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *argv, env=env, stdout=DEVNULL, stderr=DEVNULL
    )
    try:
        deadline = time.monotonic() + 30
        while not query(db, "SELECT count(*) FROM outbox")[0][0]:
            assert proc.returncode is None and time.monotonic() < deadline, "never committed"
            await asyncio.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        await proc.wait()
    done = query(db, "SELECT count(*) FROM outbox")[0][0]
    assert 0 < done < 15_000, "the kill should land mid-import"
    report = await quiet.imports.import_csv(path, "news", EVIDENCE)
    assert counts(report) == {"already_pending": done, "new": 15_000 - done}
    assert query(
        db,
        "SELECT count(*), count(DISTINCT subscriber_id), min(kind), max(kind) FROM outbox",
    ) == [(15_000, 15_000, "confirm", "confirm")]
    assert query(db, "SELECT count(*) FROM consent_event WHERE channel = 'import'") == [(15_000,)]
    assert (await verify(quiet.db)).problem is None
    assert report.counts[RowResult.NEW] + report.counts[RowResult.ALREADY_PENDING] == 15_000


@sqlite_only
async def test_long_import_keeps_the_wal_small(
    quiet: Mailer, db_path: Path, tmp_path: Path
) -> None:
    """Checkpoints between chunks keep the write-ahead log from growing with the file."""
    path = write_csv(tmp_path / "in.csv", [f"w{i}@example.org".encode() for i in range(5000)])
    secrets = await instance_secrets(quiet.db)
    importer = Importer(
        quiet.db, secrets.hash_key, quiet.clock, timedelta(minutes=10), lambda: None, chunk_rows=50
    )
    wal = db_path.with_name(db_path.name + "-wal")
    sizes: list[int] = []
    report = await importer.import_csv(
        path, "news", EVIDENCE, progress=lambda _: sizes.append(wal.stat().st_size)
    )
    assert counts(report) == {"new": 5000}
    assert max(sizes) < 12_000_000, max(sizes)  # ~4.5 MB; ~38 MB without the checkpoints


@sqlite_only
async def test_checkpoint_empties_the_wal(quiet: Mailer, db_path: Path) -> None:
    """Database.checkpoint folds the write-ahead log into the database and truncates it."""
    await quiet.lists.create("other", "Other")
    wal = db_path.with_name(db_path.name + "-wal")
    assert wal.stat().st_size > 0
    await quiet.db.checkpoint()
    assert wal.stat().st_size == 0
    assert query(db_path, "SELECT slug FROM mailing_list ORDER BY slug") == [("news",), ("other",)]
