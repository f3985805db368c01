"""kill -9 of `mailer serve` in the middle of a campaign, then a restart (G6, G1, G2).

The SMTP sink lives in this test process, so it outlives the killed sender and sees every
copy that ever reached it. `serve` runs as a real subprocess on a copy of a database holding
1,000 confirmed subscribers of "news" and 100 people who must never get the campaign.
"""

import asyncio
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from email import policy
from email.parser import BytesHeaderParser
from pathlib import Path
from typing import Any

import pytest

from mailer.domain.addresses import address_hash, parse_address
from mailer.services.sending import PREFETCH_PER_CONNECTION
from mailer.store import outbox
from tests.databases import active
from tests.harness import SinkServer, query, wait_until

pytestmark = pytest.mark.slow

MAILER = [sys.executable, "-m", "mailer.cli.main"]
CONNECTIONS = 4
CONSENTING = 1000
REFUSING = 100
DATA_DELAY = 0.004
"""Seconds the sink waits before each DATA reply, so a kill lands mid-campaign."""
WITHDRAWN = 10
"""People whose still-queued message is suppressed while `serve` is dead."""
INTERRUPTED = outbox.INTERRUPTED
HASH_KEY = "SELECT value FROM instance_setting WHERE name = 'address_hash_key'"

PREFETCH = PREFETCH_PER_CONNECTION * CONNECTIONS
"""Claimed rows the sender keeps buffered (``prefetch`` in mailer/bootstrap.py)."""

# How many messages can one kill leave `sending` (reported failed "interrupted" at restart)?
# (mailer/services/sending.py) A row is `sending` from the commit of the claim that reserved
# it to the commit of its outcome. The sender has one write of outcomes in flight at a time:
# the Recorder's own, or a claim, which writes every outcome pending when it starts. Take the
# last such write T that committed before the kill, begun at t: every outcome handed over
# before t is on disk, and no claim after T committed. So the `sending` rows are those that
# at t were buffered (at most PREFETCH minus T's own rows, since a claim asks for PREFETCH
# minus what is still buffered), claimed by T, or in one of the C send tasks' hands. Hence
# <= C + PREFETCH, on either engine, however long a write takes or waits (PostgreSQL's
# Recorder waits up to 10 ms for more outcomes). A killed process records nothing more, so it
# leaves no `unknown` rows, and the restarted one talks to a healthy sink.
CRASH_BOUND = CONNECTIONS + PREFETCH


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("MAILER_")}


LEASE_SECONDS = "2"
"""On PostgreSQL a restarted sender takes over a killed one's claims only once their leases
end (another live worker may hold them); short leases keep these tests quick."""


def reported_interrupted(log: str) -> int:
    """How many messages a restarted mailer's log says it reported interrupted (on
    PostgreSQL expired leases may be reaped in more than one pass)."""
    return sum(int(n) for n in re.findall(r"outbox\.interrupted count=(\d+)", log))


def mailer_env(home: Path) -> dict[str, str]:
    """The environment of a mailer installed in ``home``, on this run's database engine."""
    return {
        **clean_env(),
        "MAILER_DATABASE_URL": active.url(home / "var" / "mailer.db"),
        "MAILER_LEASE_SECONDS": LEASE_SECONDS,
    }


def sending_env(home: Path, sink: SinkServer) -> dict[str, str]:
    """``mailer_env`` for a mailer that sends to ``sink`` over ``CONNECTIONS`` connections."""
    return {
        **mailer_env(home),
        "MAILER_SMTP_HOST": "127.0.0.1",
        "MAILER_SMTP_PORT": str(sink.port),
        "MAILER_SMTP_CONNECTIONS": str(CONNECTIONS),
        "MAILER_WORKER_POLL_SECONDS": "0.05",
    }


def copy_home(template: Path, home: Path) -> None:
    """A copy of an installation's var/ and database; the copy is independent."""
    ignore = shutil.ignore_patterns("mailer.db*")
    shutil.copytree(template / "var", home / "var", ignore=ignore)
    active.copy(template / "var" / "mailer.db", home / "var" / "mailer.db")


def stamp() -> str:
    """A timestamp the way the UTCDateTime columns store it in SQLite."""
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


@dataclass(frozen=True)
class Population:
    home: Path
    campaign_id: int
    consenting: frozenset[str]
    refusing: frozenset[str]


def _mailer(cwd: Path, *args: str) -> str:
    done = subprocess.run(
        [*MAILER, *args], cwd=cwd, env=mailer_env(cwd), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def population(tmp_path_factory: pytest.TempPathFactory) -> Population:
    """`mailer init`, list "news", 1,100 people and a draft campaign; each test copies var/."""
    home = tmp_path_factory.mktemp("crash-template")
    _mailer(home, "init")
    _mailer(home, "list", "create", "news", "--name", "Crash News")
    active.keep(home / "var" / "mailer.db")
    with active.connect(home / "var" / "mailer.db") as db, db:
        (key_hex,) = db.execute(HASH_KEY).fetchone()
        (list_id,) = db.execute("SELECT id FROM mailing_list WHERE slug = 'news'").fetchone()
        key = bytes.fromhex(key_hex)
        consenting: set[str] = set()
        refusing: set[str] = set()
        now = stamp()
        for i in range(CONSENTING + REFUSING):
            email = f"reader{i:04d}@example.org"
            hashed = address_hash(key, parse_address(email))
            (sid,) = db.execute(
                "INSERT INTO subscriber (email, email_hash, name, created_at) "
                "VALUES (?, ?, ?, ?) RETURNING id",
                (email, hashed, f"Reader {i}", now),
            ).fetchone()
            # Every 11th person, spread through the id range, must not get the campaign.
            kind = i // 11 % 4 if i % 11 == 10 else None
            status = {0: "pending", 1: "unsubscribed"}.get(-1 if kind is None else kind)
            status = status or "confirmed"
            db.execute(
                "INSERT INTO subscription (subscriber_id, list_id, status, created_at, "
                "updated_at, confirmed_at) VALUES (?, ?, ?, ?, ?, ?)",
                (sid, list_id, status, now, now, None if status == "pending" else now),
            )
            if kind in (2, 3):  # confirmed on the list, but suppressed
                reason = "unsubscribed" if kind == 2 else "bounced"
                db.execute(
                    "INSERT INTO suppression (email_hash, reason, created_at) VALUES (?, ?, ?)",
                    (hashed, reason, now),
                )
            (consenting if kind is None else refusing).add(email)
    assert (len(consenting), len(refusing)) == (CONSENTING, REFUSING)
    body = home / "issue.md"
    body.write_text("# The crash issue\n\nEvery reader gets *one* copy, even if we crash.\n")
    campaign_id = int(
        _mailer(
            home, "campaign", "create", "--list", "news", "--subject", "Crash", "--body", str(body)
        )
    )
    return Population(home, campaign_id, frozenset(consenting), frozenset(refusing))


class DataHook:
    """The sink's ``before_data_reply``: slows every DATA reply; can hold them, or kill.

    ``hold``: each DATA reply waits for ``release`` and is then refused (never captured).
    ``kill_pid``: the next DATA kills that process, then the sink accepts and keeps the
    message, so its 250 goes to a dead sender.
    """

    def __init__(self) -> None:
        self.hold = False
        self.held: list[str] = []
        self.release = asyncio.Event()
        self.kill_pid: int | None = None
        self.killed_during: str | None = None

    async def __call__(self, rcpt: str) -> str | None:
        if self.kill_pid is not None:
            pid, self.kill_pid = self.kill_pid, None
            os.kill(pid, signal.SIGKILL)
            self.killed_during = rcpt
            return None
        if self.hold:
            self.held.append(rcpt)
            await self.release.wait()
            return "451 4.3.0 held until the sender died"
        await asyncio.sleep(DATA_DELAY)
        return None


class Serve:
    """`mailer serve` as a subprocess, its output in a file (a full pipe would stall it)."""

    def __init__(self, cwd: Path, env: dict[str, str], log: Path) -> None:
        self.cwd = cwd
        self.env = {**env, "MAILER_HTTP_PORT": str(free_port())}
        self.log = log
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with self.log.open("wb") as out:
            self.proc = await asyncio.create_subprocess_exec(
                *MAILER, "serve", cwd=self.cwd, env=self.env, stdout=out, stderr=out
            )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        assert self.proc is not None
        assert self.proc.returncode is None, self.log.read_text()
        return True

    async def wait(self) -> int:
        assert self.proc is not None
        return await asyncio.wait_for(self.proc.wait(), timeout=20)

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


async def mailer_cli(cwd: Path, env: dict[str, str], *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        *MAILER, *args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return out.decode()


def outbox_rows(db_path: Path, campaign_id: int) -> list[tuple[Any, ...]]:
    return query(
        db_path,
        "SELECT o.id, s.email, o.status, o.reason FROM outbox o "
        "JOIN subscriber s ON s.id = o.subscriber_id WHERE o.campaign_id = ? AND o.kind = ?",
        campaign_id,
        "campaign",
    )


def count_status(db_path: Path, campaign_id: int, status: str) -> int:
    return int(
        query(
            db_path,
            "SELECT count(*) FROM outbox WHERE campaign_id = ? AND status = ?",
            campaign_id,
            status,
        )[0][0]
    )


KILL_POINTS = ["right after fan-out", "30% sent", "DATA reply held", "accepted, 250 unseen"]


async def restart_until_sent(
    second: Serve, cwd: Path, env: dict[str, str], db_path: Path, cid: int, what: str
) -> dict[str, Any]:
    """Start the second serve, wait until the campaign is sent; return `campaign status --json`."""
    await second.start()
    await wait_until(
        lambda: (
            second.alive()
            and query(db_path, "SELECT status FROM campaign WHERE id = ?", cid)[0][0] == "sent"
        ),
        timeout=30,
        what=what,
    )
    report: dict[str, Any] = json.loads(
        await mailer_cli(cwd, env, "campaign", "status", str(cid), "--json")
    )
    return report


async def stop_both(first: Serve, second: Serve) -> None:
    """Make sure neither serve outlives the test; the second one gets a clean SIGTERM."""
    await first.kill()
    if second.proc is not None and second.proc.returncode is None:
        second.proc.send_signal(signal.SIGTERM)
        await second.wait()
    await second.kill()


def clean_restart_log(second: Serve) -> str:
    """The restarted serve stopped cleanly and logged no traceback; returns its log."""
    assert second.proc is not None
    assert second.proc.returncode == 0
    log = second.log.read_text()
    assert "Traceback" not in log
    return log


@pytest.mark.parametrize("kill_at", KILL_POINTS)
async def test_kill_9_mid_campaign_then_restart(
    kill_at: str, population: Population, sink: SinkServer, tmp_path: Path
) -> None:
    """After kill -9 and a restart: one copy at most per person, everyone sent or reported."""
    copy_home(population.home, tmp_path)
    db_path = tmp_path / "var" / "mailer.db"
    cid = population.campaign_id
    hook = DataHook()
    sink.before_data_reply = hook
    env = sending_env(tmp_path, sink)
    first = Serve(tmp_path, env, tmp_path / "serve-1.log")
    second = Serve(tmp_path, env, tmp_path / "serve-2.log")
    try:
        await first.start()
        await mailer_cli(tmp_path, env, "campaign", "send", str(cid))

        if kill_at == "right after fan-out":
            await wait_until(
                lambda: first.alive() and count_status(db_path, cid, "queued") > 0,
                timeout=20,
                what="fan-out",
            )
            os.kill(first.pid, signal.SIGKILL)
        elif kill_at == "30% sent":
            await wait_until(
                lambda: first.alive() and len(sink.messages) >= CONSENTING * 3 // 10,
                timeout=20,
                what="30% captured",
            )
            os.kill(first.pid, signal.SIGKILL)
        elif kill_at == "DATA reply held":
            await wait_until(
                lambda: first.alive() and len(sink.messages) >= CONSENTING // 3,
                timeout=20,
                what="a third captured",
            )
            hook.hold = True
            # Every connection is inside DATA and every outcome before that is on disk, so
            # only the held messages and the prefetched ones are left `sending`.
            await wait_until(
                lambda: (
                    len(hook.held) == CONNECTIONS
                    and count_status(db_path, cid, "sent") == len(sink.messages)
                ),
                timeout=10,
                what="all connections held in DATA",
            )
            os.kill(first.pid, signal.SIGKILL)
        else:
            await wait_until(
                lambda: first.alive() and len(sink.messages) >= CONSENTING // 5,
                timeout=20,
                what="a fifth captured",
            )
            hook.kill_pid = first.pid
        assert await first.wait() == -signal.SIGKILL
        hook.hold = False
        hook.release.set()
        copies_at_kill = len(sink.messages)
        left_sending = count_status(db_path, cid, "sending")

        # While nobody runs, a few people whose message is still queued opt out (G2).
        queued = sorted(
            email for _, email, status, _ in outbox_rows(db_path, cid) if status == "queued"
        )
        withdrawn = set(queued[:: max(1, len(queued) // WITHDRAWN)][:WITHDRAWN])
        assert len(withdrawn) == WITHDRAWN
        key = bytes.fromhex(query(db_path, HASH_KEY)[0][0])
        for email in withdrawn:
            query(
                db_path,
                "INSERT INTO suppression (email_hash, reason, created_at) VALUES (?, ?, ?)",
                address_hash(key, parse_address(email)),
                "unsubscribed",
                stamp(),
            )

        report = await restart_until_sent(
            second, tmp_path, env, db_path, cid, "the campaign to finish after the restart"
        )
    finally:
        await stop_both(first, second)
    restart_log = clean_restart_log(second)

    # Copies: by Message-ID (<outbox id>.<instance>@domain) and by recipient.
    headers = BytesHeaderParser(policy=policy.default)
    mids = [str(headers.parsebytes(m.raw)["Message-ID"]) for m in sink.messages]
    recipients = [m.rcpt_tos[0] for m in sink.messages]
    assert all(len(m.rcpt_tos) == 1 for m in sink.messages)
    dup_ids = [mid for mid, n in Counter(mids).items() if n > 1]
    dup_people = [r for r, n in Counter(recipients).items() if n > 1]
    assert (dup_ids, dup_people) == ([], [])
    outbox_of = {
        int(mid.strip("<").partition(".")[0]): r for mid, r in zip(mids, recipients, strict=True)
    }

    # Nobody without consent got a copy, before or after the crash.
    assert set(recipients) & (population.refusing | withdrawn) == set()

    rows = outbox_rows(db_path, cid)
    by_email = {email: (oid, status, reason) for oid, email, status, reason in rows}
    assert len(by_email) == len(rows) == CONSENTING  # fanned out once, to consenting people only
    assert set(by_email) == population.consenting
    for email in withdrawn:
        assert by_email[email][1:] == ("skipped", "suppressed"), email

    states = Counter(status for _, _, status, _ in rows)
    assert states["queued"] == states["sending"] == 0
    assert set(states) <= {"sent", "failed", "unknown", "skipped"}
    assert states["skipped"] == WITHDRAWN
    for _, email, status, reason in rows:
        if status in ("failed", "unknown"):
            assert reason, email
    interrupted = {
        oid for oid, _, status, reason in rows if (status, reason) == ("failed", INTERRUPTED)
    }
    unknown = {oid for oid, _, status, _ in rows if status == "unknown"}
    other_failures = [r for r in rows if r[2] == "failed" and r[3] != INTERRUPTED]
    assert other_failures == []

    # What was sent is what the sink holds, except crash victims, which have 0 or 1 copy.
    sent = {oid for oid, _, status, _ in rows if status == "sent"}
    assert sent == set(outbox_of) - interrupted - unknown
    for oid, email, _, _ in rows:
        if oid in outbox_of:
            assert outbox_of[oid] == email

    # Exactly the rows the kill left `sending` (in hand or prefetched) are reported interrupted.
    assert len(interrupted) == left_sending
    assert unknown == set()
    assert len(interrupted) + len(unknown) <= CRASH_BOUND
    if interrupted:
        assert reported_interrupted(restart_log) == len(interrupted)
    assert len(sink.messages) > copies_at_kill  # the restart really sent the rest

    if kill_at == "DATA reply held":
        held = {by_email[email][0] for email in hook.held}
        assert held <= interrupted
        assert len(interrupted - held) <= PREFETCH
        assert interrupted.isdisjoint(outbox_of)  # no interrupted message got through
    if kill_at == "accepted, 250 unseen":
        assert hook.killed_during is not None
        victim = by_email[hook.killed_during][0]
        assert victim in interrupted
        assert victim in outbox_of

    assert report["status"] == "sent"
    assert report["states"] == {s: states.get(s, 0) for s in report["states"]}


# --- Policy announcement (issue 4): one copy per person, not per list, across a kill -9 ---

LISTS = 5
PEOPLE = 600
UNSUBSCRIBED_ALL = 60
PENDING_ONLY = 40
SUPPRESSED = 40
ELIGIBLE = PEOPLE - UNSUBSCRIBED_ALL - PENDING_ONLY - SUPPRESSED
SUBSCRIPTIONS = "SELECT * FROM subscription ORDER BY id"
SETUP = """
import sys
from mailer.cli.main import main
codes = [main(["init"])]
codes += [main(["list", "create", f"topic{i}", "--name", f"Topic {i}"]) for i in range(1, 6)]
sys.exit(max(codes))
"""
"""`mailer init` and five `mailer list create` in one interpreter (each start costs ~1 s)."""


@dataclass(frozen=True)
class People:
    home: Path
    eligible: frozenset[str]
    ineligible: dict[str, str]
    """Address -> why it must get no announcement."""


@pytest.fixture(scope="module")
def people(tmp_path_factory: pytest.TempPathFactory) -> People:
    """600 people on one to five of five lists; 140 of them must get no announcement."""
    home = tmp_path_factory.mktemp("announce-template")
    done = subprocess.run(
        [sys.executable, "-c", SETUP],
        cwd=home,
        env=mailer_env(home),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    rng = random.Random(4)
    kinds = (
        ["unsubscribed-from-all"] * UNSUBSCRIBED_ALL
        + ["pending-only"] * PENDING_ONLY
        + ["suppressed"] * SUPPRESSED
        + ["eligible"] * ELIGIBLE
    )
    rng.shuffle(kinds)  # spread every kind through the subscriber-id range
    reasons = ["unsubscribed", "bounced", "complained", "manual"]
    eligible: set[str] = set()
    ineligible: dict[str, str] = {}
    on_all_lists = 0
    active.keep(home / "var" / "mailer.db")
    with active.connect(home / "var" / "mailer.db") as db, db:
        (key_hex,) = db.execute(HASH_KEY).fetchone()
        key = bytes.fromhex(key_hex)
        list_ids = [r[0] for r in db.execute("SELECT id FROM mailing_list ORDER BY id")]
        assert len(list_ids) == LISTS
        now = stamp()
        for i, kind in enumerate(kinds):
            email = f"person{i:04d}@example.net"
            hashed = address_hash(key, parse_address(email))
            (sid,) = db.execute(
                "INSERT INTO subscriber (email, email_hash, name, created_at) "
                "VALUES (?, ?, ?, ?) RETURNING id",
                (email, hashed, f"Person {i}", now),
            ).fetchone()
            mine = rng.sample(list_ids, rng.randint(1, LISTS))
            on_all_lists += len(mine) == LISTS
            if kind == "unsubscribed-from-all":
                statuses = ["unsubscribed"] * len(mine)
            elif kind == "pending-only":
                statuses = ["pending"] * len(mine)
            else:  # confirmed on at least one list; the others in any state
                statuses = ["confirmed"] + [
                    rng.choice(["confirmed", "pending", "unsubscribed"]) for _ in mine[1:]
                ]
            for list_id, status in zip(mine, statuses, strict=True):
                db.execute(
                    "INSERT INTO subscription (subscriber_id, list_id, status, created_at, "
                    "updated_at, confirmed_at) VALUES (?, ?, ?, ?, ?, ?)",
                    (sid, list_id, status, now, now, None if status == "pending" else now),
                )
            if kind == "suppressed":
                db.execute(
                    "INSERT INTO suppression (email_hash, reason, created_at) VALUES (?, ?, ?)",
                    (hashed, reasons[i % len(reasons)], now),
                )
            if kind == "eligible":
                eligible.add(email)
            else:
                ineligible[email] = kind
    assert (len(eligible), len(ineligible)) == (ELIGIBLE, PEOPLE - ELIGIBLE)
    assert on_all_lists > 50  # many people could get five copies if fan-out went per list
    return People(home, frozenset(eligible), ineligible)


class GatedHook(DataHook):
    """A :class:`DataHook` whose DATA replies wait until ``go`` is set.

    The running `serve` starts the announcement as soon as `policy publish` commits; the gate
    keeps every copy uncaptured until the test is watching, so the kill lands mid-send.
    """

    def __init__(self) -> None:
        super().__init__()
        self.go = asyncio.Event()

    async def __call__(self, rcpt: str) -> str | None:
        await self.go.wait()
        return await super().__call__(rcpt)


async def test_kill_9_mid_announcement_then_restart(
    people: People, sink: SinkServer, tmp_path: Path
) -> None:
    """A policy announcement killed at 30% reaches each eligible person once, nobody else."""
    copy_home(people.home, tmp_path)
    db_path = tmp_path / "var" / "mailer.db"
    subscriptions_before = query(db_path, SUBSCRIPTIONS)
    summary = tmp_path / "changes.md"
    summary.write_text("# What changes\n\nWe now keep delivery logs for 90 days, not 180.\n")
    version = "2026-crash"
    hook = GatedHook()
    sink.before_data_reply = hook
    env = sending_env(tmp_path, sink)
    first = Serve(tmp_path, env, tmp_path / "serve-1.log")
    second = Serve(tmp_path, env, tmp_path / "serve-2.log")
    try:
        await first.start()
        today = datetime.now(UTC).date().isoformat()
        said = await mailer_cli(
            tmp_path,
            env,
            *("policy", "publish", "--version", version),
            *("--effective", today, "--summary", str(summary)),
        )
        (cid,) = query(
            db_path, "SELECT campaign_id FROM policy_version WHERE version = ?", version
        )[0]
        assert f"announcement is campaign {cid} " in said
        hook.go.set()
        await wait_until(
            lambda: first.alive() and len(sink.messages) >= ELIGIBLE * 3 // 10,
            timeout=20,
            what="30% of the announcement captured",
        )
        os.kill(first.pid, signal.SIGKILL)
        assert await first.wait() == -signal.SIGKILL
        copies_at_kill = len(sink.messages)
        left_sending = count_status(db_path, cid, "sending")
        assert copies_at_kill < ELIGIBLE  # the kill really landed mid-send

        report = await restart_until_sent(
            second, tmp_path, env, db_path, cid, "the announcement to finish after the restart"
        )
    finally:
        await stop_both(first, second)
    restart_log = clean_restart_log(second)

    # Copies: by Message-ID (<outbox id>.<instance>@domain) and by recipient.
    headers = BytesHeaderParser(policy=policy.default)
    parsed = [headers.parsebytes(m.raw) for m in sink.messages]
    mids = [str(h["Message-ID"]) for h in parsed]
    recipients = [m.rcpt_tos[0] for m in sink.messages]
    assert all(len(m.rcpt_tos) == 1 for m in sink.messages)
    assert all(version in str(h["Subject"]) for h in parsed)
    dup_ids = [mid for mid, n in Counter(mids).items() if n > 1]
    dup_people = [r for r, n in Counter(recipients).items() if n > 1]
    assert (dup_ids, dup_people) == ([], [])
    outbox_of = {
        int(mid.strip("<").partition(".")[0]): r for mid, r in zip(mids, recipients, strict=True)
    }

    # Nobody who is unsubscribed everywhere, only pending, or suppressed got a copy.
    assert {r: people.ineligible[r] for r in recipients if r in people.ineligible} == {}
    assert set(recipients) <= people.eligible

    # One announcement row per eligible person (not per list), none for anyone else.
    rows = query(
        db_path,
        "SELECT o.id, s.email, o.kind, o.list_id, o.status, o.reason FROM outbox o "
        "JOIN subscriber s ON s.id = o.subscriber_id WHERE o.campaign_id = ?",
        cid,
    )
    assert {(kind, list_id) for _, _, kind, list_id, _, _ in rows} == {("announcement", None)}
    by_email = {email: (oid, status, reason) for oid, email, _, _, status, reason in rows}
    assert len(by_email) == len(rows) == ELIGIBLE
    assert set(by_email) == people.eligible
    assert query(db_path, "SELECT count(*) FROM outbox")[0][0] == ELIGIBLE

    # Every row is terminal: sent with its one copy, or interrupted by the kill (0 or 1 copy).
    states = Counter((status, reason) for _, status, reason in by_email.values())
    assert set(states) <= {("sent", None), ("failed", INTERRUPTED)}, states
    sent = {oid for oid, status, _ in by_email.values() if status == "sent"}
    interrupted = {oid for oid, status, _ in by_email.values() if status == "failed"}
    assert sent == set(outbox_of) - interrupted
    for email, (oid, _, _) in by_email.items():
        if oid in outbox_of:
            assert outbox_of[oid] == email
    assert len(interrupted) == left_sending <= CRASH_BOUND
    if interrupted:
        assert reported_interrupted(restart_log) == len(interrupted)
    assert len(sink.messages) > copies_at_kill  # the restart really sent the rest

    # An announcement never changes anyone's subscriptions.
    assert query(db_path, SUBSCRIPTIONS) == subscriptions_before

    assert report["status"] == "sent"
    assert report["states"] == {
        s: sum(n for (status, _), n in states.items() if status == s) for s in report["states"]
    }
