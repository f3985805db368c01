"""Benchmark `mailer subscriber import`: a generated N-row CSV into a fresh installation.

Generates the file the issue describes (BOM, CRLF, quoted names with commas, ~5 % invalid rows,
~2 % suppressed addresses of every reason, exact duplicates and case variants, people already
confirmed or pending), runs `mailer subscriber import FILE --list news --json` as its own
process, and prints rows/s and that process's peak RSS (`ru_maxrss` from wait4). It checks
every count against what the generator put in the file, then the database (one pending
subscription and one queued confirmation request per new address, nobody newly confirmed),
then runs the import again (a re-run must queue nothing). A baseline run on a header-only file
gives the RSS of the CLI itself, so the import's own memory shows. Nothing leaves 127.0.0.1
(no mail is sent: there is no worker).

    .venv/bin/python bench/import_csv.py                  # 100,000 rows
    .venv/bin/python bench/import_csv.py --rows 1000000   # memory at 10x
"""

import argparse
import json
import os
import random
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mailer.domain.addresses import address_hash, parse_address

MAILER = [sys.executable, "-m", "mailer.cli.main"]
REASONS = ("unsubscribed", "bounced", "complained", "erased", "manual")
INVALID = ("not-an-address", "two@@example.org", "@", "space in@example.org", "x@-bad-.org")


def mailer(env: dict[str, str], *args: str) -> str:
    done = subprocess.run([*MAILER, *args], env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"mailer {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


def timed_import(
    env: dict[str, str], csv_path: Path, out: Path
) -> tuple[float, int, dict[str, Any]]:
    """Run the import as a child; return (seconds, peak RSS in KiB, the --json report)."""
    start = time.perf_counter()
    with out.open("w") as sink:
        proc = subprocess.Popen(
            [*MAILER, "subscriber", "import", str(csv_path), "--list", "news", "--json"],
            env=env,
            stdout=sink,
            stderr=subprocess.PIPE,
        )
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode() if proc.stderr else ""
    if proc.returncode != 0:
        raise SystemExit(f"import failed ({proc.returncode}): {err.strip()}")
    return seconds, usage.ru_maxrss, json.loads(out.read_text())


def seed(db: Path, key: bytes, n: int) -> tuple[list[str], dict[str, list[str]]]:
    """Pre-existing state: people confirmed/pending on the list, and suppressed addresses.

    Returns (addresses already confirmed or pending, {status: addresses}); suppressions are
    keyed hashes only, as after an erasure.
    """
    now = datetime.now(UTC).isoformat(sep=" ")
    conn = sqlite3.connect(db)
    list_id = conn.execute("SELECT id FROM mailing_list WHERE slug = 'news'").fetchone()[0]
    existing: dict[str, list[str]] = {"confirmed": [], "pending": []}
    for status, count in (("confirmed", n // 100), ("pending", n // 200)):
        for i in range(count):
            email = f"{status}{i}@old.example.org"
            h = address_hash(key, parse_address(email))
            cur = conn.execute(
                "INSERT INTO subscriber(email, email_hash, name, created_at) VALUES (?,?,?,?)",
                (email, h, None, now),
            )
            conn.execute(
                "INSERT INTO subscription(subscriber_id, list_id, status, created_at, updated_at,"
                " confirmed_at) VALUES (?,?,?,?,?,?)",
                (cur.lastrowid, list_id, status, now, now, now if status == "confirmed" else None),
            )
            existing[status].append(email)
    suppressed: list[str] = []
    for i in range(n // 50):
        email = f"gone{i}@old.example.org"
        h = address_hash(key, parse_address(email))
        conn.execute(
            "INSERT INTO suppression(email_hash, reason, created_at) VALUES (?,?,?)",
            (h, REASONS[i % len(REASONS)], now),
        )
        suppressed.append(email)
    conn.commit()
    conn.close()
    return suppressed, existing


def generate(
    path: Path, rows: int, rng: random.Random, suppressed: list[str], existing: dict[str, list[str]]
) -> dict[str, int]:
    """Write the CSV (streamed); return the counts a correct import must report."""
    expected = dict.fromkeys(
        (
            "new",
            "already_confirmed",
            "already_pending",
            "rate_limited",
            "unsubscribed_from_list",
            "suppressed",
            "duplicate",
            "invalid",
        ),
        0,
    )
    fresh: list[str] = []
    pools = {
        "suppressed": iter(suppressed),
        "already_confirmed": iter(existing["confirmed"]),
        "already_pending": iter(existing["pending"]),
    }
    with path.open("w", encoding="utf-8-sig", newline="") as f:
        f.write("email,name\r\n")
        for i in range(rows):
            roll = rng.random()
            name = rng.choice(["", "Ada", '"Lovelace, Ada"', '"Grace ""Amazing"" Hopper"', "Zoë"])
            if roll < 0.05:
                email, kind = rng.choice(INVALID), "invalid"
            elif roll < 0.07:
                email, kind = next(pools["suppressed"], ""), "suppressed"
            elif roll < 0.08:
                email, kind = next(pools["already_confirmed"], ""), "already_confirmed"
            elif roll < 0.085:
                email, kind = next(pools["already_pending"], ""), "already_pending"
            elif roll < 0.095 and fresh:
                email, kind = rng.choice(fresh), "duplicate"
            elif roll < 0.105 and fresh:
                email, kind = rng.choice(fresh).upper().replace("@EXAMPLE", "@example"), "duplicate"
            else:
                email, kind = f"person{i}.{rng.randrange(10**6)}@example{i % 97}.org", "new"
                fresh.append(email)
                if len(fresh) > 1000:
                    fresh.pop(rng.randrange(len(fresh)))
            if not email:  # a pool ran dry
                email, kind = "nobody-left", "invalid"
            expected[kind] += 1
            f.write(f"{email},{name}\r\n")
    return expected


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=4)
    parser.add_argument("--keep", action="store_true", help="keep the temp directory")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="mailer-import-bench-"))
    env = {
        **os.environ,
        "MAILER_DATABASE_URL": f"sqlite+aiosqlite:///{tmp / 'mailer.db'}",
        "MAILER_VAR_DIR": str(tmp / "var"),
    }
    env.pop("MAILER_CONFIG", None)
    env.pop("MAILER_SECRET_KEYS", None)
    mailer(env, "init")
    mailer(env, "list", "create", "news", "--name", "News")
    db = tmp / "mailer.db"
    conn = sqlite3.connect(db)
    key = bytes.fromhex(
        conn.execute(
            "SELECT value FROM instance_setting WHERE name = 'address_hash_key'"
        ).fetchone()[0]
    )
    conn.close()
    suppressed, existing = seed(db, key, args.rows)
    csv_path = tmp / "import.csv"
    t = time.perf_counter()
    expected = generate(csv_path, args.rows, rng, suppressed, existing)
    print(
        f"generated {args.rows:,} rows ({csv_path.stat().st_size / 1e6:.1f} MB) "
        f"in {time.perf_counter() - t:.1f} s: {expected}"
    )

    header_only = tmp / "empty.csv"
    header_only.write_text("email,name\r\n")
    _, base_rss, _ = timed_import(env, header_only, tmp / "empty.json")

    seconds, rss, report = timed_import(env, csv_path, tmp / "report.json")
    counts = report["counts"]
    print(f"\nRESULT  {args.rows:,} rows into list 'news'")
    at_100k = 100_000 * seconds / args.rows
    verdict = "PASS" if at_100k < 60 else "FAIL"
    print(
        f"time                    {seconds:.1f} s (process start to exit)  < 60 s at 100k {verdict}"
    )
    print(f"rows/s                  {args.rows / seconds:,.0f}")
    print(f"peak RSS (ru_maxrss)     {rss / 1024:.0f} MB (header-only: {base_rss / 1024:.0f} MB)")
    print(f"counts                  {counts}")
    print(f"suppressed by reason    {report['suppressed_by_reason']}")
    problems = [f"{k}: {counts[k]}, expected {v}" for k, v in expected.items() if counts[k] != v]
    if len(report["invalid_rows"]) != expected["invalid"]:
        problems.append(f"invalid_rows lists {len(report['invalid_rows'])}")

    conn = sqlite3.connect(db)
    pending = conn.execute("SELECT count(*) FROM subscription WHERE status = 'pending'").fetchone()
    confirmed = conn.execute("SELECT count(*) FROM subscription WHERE status = 'confirmed'")
    queued = conn.execute("SELECT count(*) FROM outbox WHERE kind = 'confirm'").fetchone()
    ledger = conn.execute("SELECT count(*) FROM consent_event WHERE channel = 'import'").fetchone()
    n_confirmed = confirmed.fetchone()[0]
    conn.close()
    print(
        f"database                pending {pending[0]:,}  confirmed {n_confirmed:,}  "
        f"confirm requests {queued[0]:,}  import ledger entries {ledger[0]:,}"
    )
    new = expected["new"]
    if (pending[0], queued[0], ledger[0]) != (new + len(existing["pending"]), new, new):
        problems.append("database rows do not match the new addresses")
    if n_confirmed != len(existing["confirmed"]):
        problems.append("an import changed who is confirmed")

    again_s, again_rss, again = timed_import(env, csv_path, tmp / "again.json")
    print(
        f"re-run                  {again_s:.1f} s, {again_rss / 1024:.0f} MB: new "
        f"{again['counts']['new']}, already_pending {again['counts']['already_pending']:,}"
    )
    if again["counts"]["new"] != 0:
        problems.append("the re-run queued new requests")
    if again["counts"]["already_pending"] != new + expected["already_pending"]:
        problems.append("the re-run did not find every address pending")
    print("checks                  " + ("PASS" if not problems else "FAIL: " + "; ".join(problems)))
    if args.keep:
        print(f"kept {tmp}")
    else:
        for p in sorted(tmp.rglob("*"), reverse=True):
            p.rmdir() if p.is_dir() else p.unlink()
        tmp.rmdir()
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
