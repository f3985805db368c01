"""Benchmark the campaign send path: one campaign to N confirmed subscribers, end to end.

Creates a fresh instance in a temp directory (``mailer init``, list ``news``), bulk-inserts N
confirmed subscribers with sqlite3 (real keyed address hashes), starts an SMTP sink on
loopback (Postfix's C ``smtp-sink``, or an aiosmtpd sink in its own process) and ``mailer
serve`` (worker on) pointed at it, then runs ``mailer campaign create`` + ``campaign send``.
While the campaign sends, it POSTs RFC 8058 one-click unsubscribes to real links of sampled
recipients at a fixed rate. At the end it prints one summary block: messages/s,
check-to-hand-off p50/p99 (from the ``/metrics`` histogram), one-click p50/p99, peak RSS of
the serve process, fan-out time, CPU per message, and the targets of issue 3.

Nothing leaves 127.0.0.1. See bench/README.md for how to read the output.

    .venv/bin/python bench/send.py --recipients 100000
    .venv/bin/python bench/send.py --recipients 1000000 --fanout-only
    .venv/bin/python bench/send.py --recipients 100000 --profile /tmp/send.pyspy.txt
    .venv/bin/python bench/send.py --database postgres --workers 1,2,4 --recipients 50000
"""

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import os
import random
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import aiohttp

from mailer.domain.addresses import address_hash, parse_address
from mailer.domain.tokens import LinkClaim, TokenCodec

MAILER = [sys.executable, "-m", "mailer.cli.main"]
BATCH = 20_000
"""Subscribers inserted per transaction while seeding."""

# Targets from issue 3 ("Speed"), on the project's 2-core machine.
TARGET_RATE = 2_500.0  # msgs/s, one process, 100,000 recipients
TARGET_RATE_DKIM = 1_200.0  # the same with RSA-2048 DKIM signing on (issue 5)
TARGET_HANDOFF_P99_MS = 50.0
TARGET_UNSUB_P99_MS = 25.0
TARGET_RSS_MB_AT_1M = 150.0
TARGET_FANOUT_S_AT_1M = 20.0

# GNU Mailman 3.3.8 on the same machine, personalised delivery (one SMTP transaction and one
# rendered copy per member), from /work/shared/bench/mailman3-peer-results.md.
MAILMAN3_PERSONALISED = {10_000: 111.0, 50_000: 72.7}

BODY = """\
# The November issue

Hello, and welcome to this month's letter. Here is what happened since the last one:

* We shipped **campaigns**: newsletters from the command line, sent fast.
* Every message carries its own one-click unsubscribe link (RFC 8058).
* Unsubscribing takes effect *at once*, even in the middle of a send.

## Coming up

We are working on bounce handling and on PostgreSQL support. If you want to help test it,
reply to this message. Read [the changelog](https://example.org/changelog) for the details.

Thanks for reading,
the Example team
"""


# --------------------------------------------------------------------------- helpers --


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise SystemExit(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f} s")


def mailer_cli(cwd: Path, env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [*MAILER, *args], cwd=cwd, env=env, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"mailer {' '.join(args)} failed ({done.returncode}):\n{done.stderr}")
    return done.stdout.strip()


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))]


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process, from /proc (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def postgres_cpu_seconds() -> float:
    """utime + stime of every process named ``postgres`` (server and backends), from /proc."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == "postgres":
                    total += cpu_seconds(int(entry.name))
            except OSError:
                continue
    return total


def proc_status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def utc_naive(text: str) -> datetime:
    """Parse a timestamp as the mailer stores it in SQLite (UTC, no offset)."""
    return datetime.fromisoformat(text).replace(tzinfo=None)


def stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------------------ seed --


def fast_hash(key: bytes, email: str) -> str:
    """address_hash() for an ASCII address whose identity is the address itself."""
    return hmac.new(key, email.encode("ascii"), hashlib.sha256).digest()[:16].hex()


def email_of(i: int) -> str:
    return f"reader{i:07d}@example.net"


def seed(db_path: Path, n: int) -> tuple[bytes, str, float]:
    """Insert N confirmed subscribers of list ``news``; return (hash key, list uid, seconds)."""
    started = time.perf_counter()
    conn = sqlite3.connect(db_path)
    try:
        key = bytes.fromhex(
            conn.execute(
                "SELECT value FROM instance_setting WHERE name = 'address_hash_key'"
            ).fetchone()[0]
        )
        list_id, list_uid = conn.execute(
            "SELECT id, uid FROM mailing_list WHERE slug = 'news'"
        ).fetchone()
        for i in (1, 2, n):  # the shortcut must give the mailer's own hash
            real = address_hash(key, parse_address(email_of(i)))
            if fast_hash(key, email_of(i)) != real:
                raise SystemExit("fast_hash() disagrees with mailer.domain.addresses")
        now = datetime.now(UTC).replace(tzinfo=None).isoformat(sep=" ")
        conn.execute("PRAGMA synchronous = OFF")  # this connection only; seeding is not timed
        for lo in range(1, n + 1, BATCH):
            ids = range(lo, min(n, lo + BATCH - 1) + 1)
            conn.executemany(
                "INSERT INTO subscriber (id, email, email_hash, name, created_at) "
                "VALUES (?, ?, ?, ?, ?)",
                [(i, email_of(i), fast_hash(key, email_of(i)), f"Reader {i}", now) for i in ids],
            )
            conn.executemany(
                "INSERT INTO subscription "
                "(subscriber_id, list_id, status, created_at, updated_at, confirmed_at) "
                "VALUES (?, ?, 'confirmed', ?, ?, ?)",
                [(i, list_id, now, now, now) for i in ids],
            )
            conn.commit()
    finally:
        conn.close()
    return key, str(list_uid), time.perf_counter() - started


# ------------------------------------------------------------------------------ sink --


@dataclass
class Sink:
    kind: str
    port: int
    proc: subprocess.Popen[bytes]
    count_file: Path

    def count(self) -> int:
        """Messages the sink has accepted so far."""
        try:
            with self.count_file.open("rb") as fh:
                fh.seek(max(0, self.count_file.stat().st_size - 200))
                tail = fh.read()
        except OSError:
            return 0
        if self.kind == "aiosmtpd":
            return int(tail.strip() or 0)
        found = re.findall(rb"mesg=(\d+)", tail)
        return int(found[-1]) if found else 0


def start_sink(kind: str, workdir: Path) -> Sink:
    port = free_port()
    count_file = workdir / f"sink-{kind}.out"
    if kind == "smtp-sink":
        exe = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
        user = ["-u", "root"] if os.geteuid() == 0 else []
        # -c: running counters on stdout ("sess=.. quit=.. mesg=N\r"); backlog 1000.
        cmd = [exe, "-c", *user, f"127.0.0.1:{port}", "1000"]
        out = count_file.open("wb")
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        out.close()
    else:
        cmd = [sys.executable, __file__, "--_aiosmtpd-sink", str(port), str(count_file)]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    wait_port(port, 15, kind)
    return Sink(kind, port, proc, count_file)


def run_aiosmtpd_sink(port: int, count_file: Path) -> None:
    """A counting aiosmtpd server, run in its own process so it never steals the sender's CPU."""
    from aiosmtpd.smtp import SMTP, Envelope, Session

    class Count:
        n = 0

        async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
            self.n += 1
            return "250 2.0.0 Ok: queued"

    async def main() -> None:
        handler = Count()
        loop = asyncio.get_running_loop()
        await loop.create_server(
            lambda: SMTP(handler, hostname="sink.test", enable_SMTPUTF8=True), "127.0.0.1", port
        )
        while True:
            count_file.write_text(f"{handler.n}\n")
            await asyncio.sleep(0.2)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())


# ------------------------------------------------------------------------- measuring --


@dataclass
class Timeline:
    sent_cmd: float = 0.0  # `campaign send` launched
    send_returned: float = 0.0
    running: float | None = None  # the bench saw status 'running'
    fanned_out: float | None = None  # fanout_done seen true
    finished: float | None = None  # status 'sent' (or cancelled)
    status: str = ""
    cpu_serve_at_running: float = 0.0
    cpu_sink_at_running: float = 0.0
    cpu_serve_at_end: float = 0.0
    cpu_sink_at_end: float = 0.0


@dataclass
class Unsubs:
    latencies: list[float] = field(default_factory=list)
    answered: dict[int, datetime] = field(default_factory=dict)
    errors: Counter[str] = field(default_factory=Counter)


def histogram_quantiles(text: str, name: str, qs: tuple[float, ...]) -> tuple[int, list[str]]:
    """Quantiles of a Prometheus histogram: (count, ["<= bound (interp x)" per q])."""
    buckets: list[tuple[float, float]] = []
    for m in re.finditer(rf'^{name}_bucket\{{le="([^"]+)"\}} (\S+)$', text, re.M):
        buckets.append((float(m.group(1)), float(m.group(2))))
    buckets.sort()
    if not buckets or buckets[-1][1] == 0:
        return 0, ["n/a" for _ in qs]
    total = buckets[-1][1]
    out = []
    for q in qs:
        rank = q * total
        lower, below = 0.0, 0.0
        for bound, cum in buckets:
            if cum >= rank:
                if bound == float("inf"):
                    out.append(f"> {lower * 1000:g} ms")
                else:
                    inside = cum - below
                    est = lower + (bound - lower) * ((rank - below) / inside if inside else 1)
                    out.append(f"<= {bound * 1000:g} ms (interp. {est * 1000:.1f})")
                break
            lower, below = bound, cum
    return int(total), out


def bucket_bound_ms(text: str, name: str, q: float) -> float | None:
    """The upper bound (ms) of the bucket holding quantile q; None when empty or +Inf."""
    buckets = sorted(
        (float(m.group(1)), float(m.group(2)))
        for m in re.finditer(rf'^{name}_bucket\{{le="([^"]+)"\}} (\S+)$', text, re.M)
    )
    if not buckets or buckets[-1][1] == 0:
        return None
    for bound, cum in buckets:
        if cum >= q * buckets[-1][1]:
            return None if bound == float("inf") else bound * 1000
    return None


async def unsubscriber(
    base: str,
    codec: TokenCodec,
    key: bytes,
    list_uid: str,
    n: int,
    rate: float,
    stop: asyncio.Event,
    result: Unsubs,
) -> None:
    """POST one-click unsubscribes to real links of random recipients, open loop, at ``rate``."""
    if rate <= 0:
        return
    order = random.Random(42).sample(range(1, n + 1), min(n, 200_000))
    tasks: set[asyncio.Task[None]] = set()

    async def one(http: aiohttp.ClientSession, sub_id: int) -> None:
        email = email_of(sub_id)
        real = address_hash(key, parse_address(email))  # the mailer's own keyed hash
        token = codec.unsubscribe_token(LinkClaim(real, list_uid))
        started = time.perf_counter()
        try:
            async with http.post(
                f"{base}/unsubscribe/{token}", data={"List-Unsubscribe": "One-Click"}
            ) as r:
                body = await r.read()
                took = time.perf_counter() - started
                if r.status != 200:
                    result.errors[f"HTTP {r.status}"] += 1
                    return
                if b"nsubscribed" not in body:
                    result.errors["200 without the unsubscribed page"] += 1
        except aiohttp.ClientError as exc:
            result.errors[type(exc).__name__] += 1
            return
        result.latencies.append(took)
        result.answered[sub_id] = datetime.now(UTC).replace(tzinfo=None)

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        interval = 1.0 / rate
        due = time.perf_counter()
        for sub_id in order:
            if stop.is_set():
                break
            task = asyncio.create_task(one(http, sub_id))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            due += interval
            delay = due - time.perf_counter()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
        if tasks:
            await asyncio.gather(*tasks)


def read_campaign(db: sqlite3.Connection, campaign_id: int) -> tuple[str, bool, int]:
    row = db.execute(
        "SELECT status, fanout_done, fanout_cursor FROM campaign WHERE id = ?", (campaign_id,)
    ).fetchone()
    return str(row[0]), bool(row[1]), int(row[2])


async def watch(
    db: sqlite3.Connection,
    campaign_id: int,
    serve: subprocess.Popen[bytes],
    sink: Sink,
    tl: Timeline,
    running: asyncio.Event,
    fanout_only: bool,
    limit_s: float,
) -> None:
    """Poll the campaign row every 100 ms; note when it runs, is fanned out and is done."""
    last_print = time.perf_counter()
    last_count, last_t = 0, time.perf_counter()
    while True:
        now = time.perf_counter()
        if serve.poll() is not None:
            raise SystemExit(f"mailer serve exited with {serve.returncode} during the send")
        if now - tl.sent_cmd > limit_s:
            raise SystemExit(f"no finish within --timeout {limit_s:.0f} s")
        try:
            status, fanned, cursor = read_campaign(db, campaign_id)
        except sqlite3.OperationalError:  # busy: try again in 100 ms
            await asyncio.sleep(0.1)
            continue
        if tl.running is None and status != "scheduled" and status != "draft":
            tl.running = now
            tl.cpu_serve_at_running = cpu_seconds(serve.pid)
            tl.cpu_sink_at_running = cpu_seconds(sink.proc.pid)
            running.set()
        if fanned and tl.fanned_out is None:
            tl.fanned_out = now
            if fanout_only:
                tl.status = status
                return
        if status in ("sent", "cancelled"):
            tl.finished = now
            tl.status = status
            return
        if now - last_print >= 5:
            count = sink.count()
            rate = (count - last_count) / (now - last_t)
            print(
                f"  {now - tl.sent_cmd:6.1f} s  {status:<8} fan-out cursor {cursor:>9,}  "
                f"sink has {count:>9,}  ({rate:,.0f}/s)",
                flush=True,
            )
            last_print, last_count, last_t = now, count, now
        await asyncio.sleep(0.1)


def sign_with_dkim(algorithm: str, cwd: Path, env: dict[str, str]) -> None:
    """A fresh DKIM key under ``cwd``, and the settings that make mailer sign with it."""
    key = cwd / "var" / "dkim.pem"
    mailer_cli(cwd, env, "dkim", "keygen", "--selector", "bench", "--algorithm", algorithm,
               "--domain", "example.org", "--out", str(key))  # fmt: skip
    env.update(
        MAILER_DKIM_DOMAIN="example.org",
        MAILER_DKIM_SELECTOR="bench",
        MAILER_DKIM_KEY_FILE=str(key),
    )
    print(f"  DKIM signing on: {algorithm}", flush=True)


def start_serve(cwd: Path, env: dict[str, str], log_file: Path) -> subprocess.Popen[bytes]:
    with log_file.open("wb") as log:
        return subprocess.Popen([*MAILER, "serve"], cwd=cwd, env=env, stdout=log, stderr=log)


def start_worker(cwd: Path, env: dict[str, str], log_file: Path) -> subprocess.Popen[bytes]:
    with log_file.open("wb") as log:
        return subprocess.Popen([*MAILER, "worker"], cwd=cwd, env=env, stdout=log, stderr=log)


def start_profiler(pid: int, out: Path, rate: int) -> subprocess.Popen[bytes] | None:
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(exe).exists():
        print("  (py-spy not found: `.venv/bin/pip install py-spy`; no profile taken)")
        return None
    cmd = [exe, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw"]
    cmd += ["--threads", "--nonblocking", "-o", str(out)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


WRAPPERS = re.compile(
    r"\((threading|runpy|<frozen runpy>|asyncio/(runners|base_events|events)|typer/|click/"
    r"|mailer/cli/(main|server))"
)
"""Frames every sample passes through (thread start, event loop, CLI): left out of 'total'."""


def child_env() -> dict[str, str]:
    """The environment of every mailer process the bench starts: no MAILER_* settings of the
    caller's, and this checkout's package first on the path, so that a second worktree sharing
    one virtualenv measures its own code (the one ``code_state`` names), not the editable
    install's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILER_")}
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def code_state() -> str:
    """The git commit of the code measured, and whether mailer/ has uncommitted changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "mailer"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "unknown (no git)"
    return f"{head or '?'}" + (" + uncommitted changes in mailer/" if dirty else "")


def summarise_profile(path: Path, top: int = 20) -> str:
    """Top functions by own time and by total time from py-spy's raw (collapsed) output."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    samples = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        frames = stack.split(";")
        if frames and frames[0].startswith("thread ("):
            threads[frames[0]] += count
            frames = frames[1:]
        samples += count
        names = [re.sub(r":\d+\)$", ")", f) for f in frames]  # by function, not by line
        if names:
            own[names[-1]] += count
        for name in set(names):
            if not WRAPPERS.search(name):
                total[name] += count
    if not samples:
        return "  (the profile holds no samples)"
    lines = [f"  {samples:,} active samples; by thread:"]
    lines += [f"    {n / samples:6.1%}  {t}" for t, n in threads.most_common()]
    lines.append(f"  top {top} functions by OWN time:")
    lines += [f"    {n / samples:6.1%}  {f}" for f, n in own.most_common(top)]
    lines.append(f"  top {top} functions by TOTAL time (self + callees):")
    lines += [f"    {n / samples:6.1%}  {f}" for f, n in total.most_common(top)]
    return "\n".join(lines)


def server_side_unsub_ms(log_file: Path) -> list[float]:
    """Server-side one-click times from the access log lines ``"POST /unsubscribe/..." 200``."""
    pattern = re.compile(r'"POST /unsubscribe/\S+" 200 ([\d.]+)ms')
    try:
        return [float(m.group(1)) for m in pattern.finditer(log_file.read_text(errors="replace"))]
    except OSError:
        return []


# ------------------------------------------------------------------------------ main --


@dataclass
class Options:
    recipients: int
    connections: int
    sink: str
    unsubscribe_rate: float
    fanout_only: bool
    database: str
    poll: float | None
    profile: Path | None
    profile_rate: int
    timeout: float
    keep: bool
    dkim: str | None = None
    inbound: bool = False
    workers: tuple[int, ...] = (1,)
    postgres_url: str = ""


async def run(o: Options) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="mailer-send-bench-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        return await _run(o, tmp, procs)
    finally:
        for p in reversed(procs):
            stop_process(p)
        if o.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


async def _run(o: Options, cwd: Path, procs: list[subprocess.Popen[bytes]]) -> int:
    n = o.recipients
    http_port = free_port()
    base = f"http://127.0.0.1:{http_port}"
    print(
        f"mailer send benchmark: {n:,} recipients, {o.connections} connections, "
        f"sink {o.sink}, {o.database}{', fan-out only' if o.fanout_only else ''}  ({cwd})",
        flush=True,
    )

    sink = start_sink(o.sink, cwd)
    procs.append(sink.proc)
    env = child_env()
    env.update(
        MAILER_HTTP_PORT=str(http_port),
        MAILER_BASE_URL=base,
        MAILER_SMTP_HOST="127.0.0.1",
        MAILER_SMTP_PORT=str(sink.port),
        MAILER_SMTP_TLS="none",
        MAILER_SMTP_CONNECTIONS=str(o.connections),
    )
    if o.poll is not None:
        env["MAILER_WORKER_POLL_SECONDS"] = str(o.poll)
    if o.fanout_only:
        env["MAILER_SMTP_RATE"] = "0.001"  # the worker fans out but (almost) never sends

    if o.inbound:  # per message: a VERP sender and a mailto: unsubscribe (two HMACs)
        env.update(MAILER_INBOUND_PORT=str(free_port()), MAILER_BOUNCE_DOMAIN="bounces.example.org")
        print("  inbound mail on: VERP senders and mailto: unsubscribe", flush=True)
    if o.dkim:
        sign_with_dkim(o.dkim, cwd, env)
    mailer_cli(cwd, env, "init")
    mailer_cli(cwd, env, "list", "create", "news", "--name", "News")
    db_path = cwd / "var" / "mailer.db"
    key, list_uid, seeded = seed(db_path, n)
    print(f"  seeded {n:,} confirmed subscribers in {seeded:.1f} s", flush=True)
    (cwd / "november.md").write_text(BODY)
    campaign_id = int(
        mailer_cli(
            cwd, env, "campaign", "create", "--list", "news", "--subject",
            "November issue", "--body", "november.md",
        ).split()[-1]
    )  # fmt: skip

    serve_log = cwd / "serve.log"
    serve = start_serve(cwd, env, serve_log)
    procs.append(serve)
    wait_port(http_port, 30, "mailer serve")
    async with aiohttp.ClientSession() as http:
        for _ in range(100):
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(f"{base}/healthz") as r:
                    if r.status == 200:
                        break
            await asyncio.sleep(0.1)
    rss_idle_kb = proc_status_kb(serve.pid, "VmRSS")

    secret = [
        line.strip() for line in (cwd / "var" / "secret_keys").read_text().splitlines() if line
    ]
    codec = TokenCodec(secret, time.time)
    reader = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5)
    tl = Timeline()
    unsubs = Unsubs()
    running, stop = asyncio.Event(), asyncio.Event()

    tl.sent_cmd = time.perf_counter()
    mailer_cli(cwd, env, "campaign", "send", str(campaign_id))
    tl.send_returned = time.perf_counter()
    watcher = asyncio.create_task(
        watch(reader, campaign_id, serve, sink, tl, running, o.fanout_only, o.timeout)
    )

    async def unsub_when_running() -> None:
        await running.wait()
        await unsubscriber(base, codec, key, list_uid, n, o.unsubscribe_rate, stop, unsubs)

    rate = 0.0 if o.fanout_only else o.unsubscribe_rate
    profiler: subprocess.Popen[bytes] | None = None
    unsub_task = None
    if rate > 0:
        unsub_task = asyncio.create_task(unsub_when_running())
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(running.wait()), o.timeout)
    if o.profile is not None:
        profiler = start_profiler(serve.pid, o.profile, o.profile_rate)
    try:
        await watcher
    finally:
        stop.set()
        if unsub_task is not None:
            await unsub_task
    tl.cpu_serve_at_end = cpu_seconds(serve.pid)
    tl.cpu_sink_at_end = cpu_seconds(sink.proc.pid)
    if profiler is not None:
        profiler.send_signal(signal.SIGINT)
        try:
            profiler.wait(60)
        except subprocess.TimeoutExpired:
            profiler.kill()

    async with aiohttp.ClientSession() as http, http.get(f"{base}/metrics") as r:
        metrics = await r.text()
    peak_kb = proc_status_kb(serve.pid, "VmHWM")
    rss_end_kb = proc_status_kb(serve.pid, "VmRSS")
    await asyncio.sleep(0.3)  # the sink's counter line lands when the sessions end
    if o.fanout_only:
        with contextlib.suppress(SystemExit):
            mailer_cli(cwd, env, "campaign", "cancel", str(campaign_id))
    stop_process(serve)
    states = dict(
        reader.execute(
            "SELECT status, count(*) FROM outbox WHERE campaign_id = ? GROUP BY status",
            (campaign_id,),
        ).fetchall()
    )
    first_check, last_check = reader.execute(
        "SELECT min(checked_at), max(checked_at) FROM outbox "
        "WHERE campaign_id = ? AND status = 'sent'",
        (campaign_id,),
    ).fetchone()
    violations, skipped_unsub = g2_audit(reader, campaign_id, unsubs.answered)
    reader.close()
    sink_count = sink.count()

    print_summary(
        o, tl, states, first_check, last_check, metrics, unsubs, serve_log,
        peak_kb, rss_idle_kb, rss_end_kb, sink_count, violations, skipped_unsub,
    )  # fmt: skip
    if o.profile is not None and o.profile.exists():
        print(f"\nprofile of `mailer serve` during the send (py-spy, raw: {o.profile}):")
        print(summarise_profile(o.profile))
    return 0


def g2_audit(
    db: sqlite3.Connection, campaign_id: int, answered: dict[int, datetime]
) -> tuple[int, int]:
    """(messages sent after their consent check post-dated the unsubscribe answer, skipped)."""
    violations = skipped = 0
    ids = list(answered)
    for lo in range(0, len(ids), 500):
        chunk = ids[lo : lo + 500]
        marks = ",".join("?" * len(chunk))
        rows = db.execute(
            f"SELECT subscriber_id, status, checked_at FROM outbox "  # noqa: S608
            f"WHERE campaign_id = ? AND subscriber_id IN ({marks})",
            (campaign_id, *chunk),
        ).fetchall()
        for sub_id, status, checked in rows:
            if status == "skipped":
                skipped += 1
            elif status == "sent" and checked and utc_naive(checked) > answered[sub_id]:
                violations += 1
    return violations, skipped


def print_summary(
    o: Options,
    tl: Timeline,
    states: dict[str, int],
    first_check: str | None,
    last_check: str | None,
    metrics: str,
    unsubs: Unsubs,
    serve_log: Path,
    peak_kb: int,
    rss_idle_kb: int,
    rss_end_kb: int,
    sink_count: int,
    violations: int,
    skipped_unsub: int,
) -> None:
    n = o.recipients
    sent = states.get("sent", 0)
    end = tl.finished or tl.fanned_out or time.perf_counter()
    rows: list[tuple[str, str, str, str]] = []

    def verdict(ok: bool | None) -> str:
        return "n/a" if ok is None else ("PASS" if ok else "FAIL")

    fan = None if tl.fanned_out is None else tl.fanned_out - tl.sent_cmd
    fan_from_running = (
        None if tl.fanned_out is None or tl.running is None else tl.fanned_out - tl.running
    )
    scale = 1_000_000 / n
    rate_window = 0.0
    if not o.fanout_only:
        e2e = end - tl.sent_cmd
        window = None
        if first_check and last_check:
            window = (utc_naive(last_check) - utc_naive(first_check)).total_seconds()
        rate_window = sent / window if window else 0.0
        rate_e2e = sent / e2e if e2e else 0.0
        at_100k = n >= 100_000
        target = TARGET_RATE_DKIM if o.dkim else TARGET_RATE
        rows.append(
            (
                "messages/s, first to last consent check",
                f"{rate_window:,.0f} msg/s ({sent:,} in {window or 0:.1f} s)",
                f">= {target:,.0f} at 100k",
                verdict(rate_window >= target if at_100k else None),
            )
        )
        rows.append(
            (
                "messages/s, `campaign send` to 'sent'",
                f"{rate_e2e:,.0f} msg/s ({e2e:.1f} s)",
                f">= {target:,.0f} at 100k",
                verdict(rate_e2e >= target if at_100k else None),
            )
        )
        name = "mailer_check_to_handoff_seconds"
        _count, (p50, p99) = histogram_quantiles(metrics, name, (0.5, 0.99))
        p99_bound = bucket_bound_ms(metrics, name, 0.99)
        rows.append(("check-to-hand-off p50 (bucket res.)", p50, "", ""))
        rows.append(
            (
                "check-to-hand-off p99 (bucket res.)",
                p99,
                f"<= {TARGET_HANDOFF_P99_MS:g} ms",
                verdict(None if p99_bound is None else p99_bound <= TARGET_HANDOFF_P99_MS),
            )
        )
        lat = unsubs.latencies
        if lat:
            u50, u99 = statistics.median(lat) * 1000, percentile(lat, 0.99) * 1000
            rows.append(
                (
                    f"one-click p50 / p99 / max ({len(lat)} POSTs)",
                    f"{u50:.1f} / {u99:.1f} / {max(lat) * 1000:.1f} ms",
                    f"p99 <= {TARGET_UNSUB_P99_MS:g} ms",
                    verdict(u99 <= TARGET_UNSUB_P99_MS),
                )
            )
            server = server_side_unsub_ms(serve_log)
            if server:
                rows.append(
                    (
                        "  same, server side (access log)",
                        f"{statistics.median(server):.1f} / {percentile(server, 0.99):.1f} / "
                        f"{max(server):.1f} ms",
                        "",
                        "",
                    )
                )
        elif o.unsubscribe_rate > 0:
            rows.append(("one-click unsubscribe", "no POST answered", "", "FAIL"))
    peak_mb = peak_kb / 1024
    rows.append(
        (
            "peak RSS of `mailer serve` (VmHWM)",
            f"{peak_mb:.0f} MB (idle {rss_idle_kb / 1024:.0f}, end {rss_end_kb / 1024:.0f})",
            f"<= {TARGET_RSS_MB_AT_1M:g} MB at 1M",
            verdict(peak_mb <= TARGET_RSS_MB_AT_1M if n >= 1_000_000 else None),
        )
    )
    if fan is not None:
        base = fan_from_running if fan_from_running is not None else fan
        extra = "" if n >= 1_000_000 else f"; x{scale:g} = {base * scale:.1f} s"
        rows.append(
            (
                f"fan-out of {n:,} rows",
                f"{fan:.1f} s from `send` ({base:.1f} s from running{extra})",
                f"<= {TARGET_FANOUT_S_AT_1M:g} s at 1M",
                verdict(fan <= TARGET_FANOUT_S_AT_1M if n >= 1_000_000 else None),
            )
        )
    if tl.running is not None:
        serve_cpu = tl.cpu_serve_at_end - tl.cpu_serve_at_running
        sink_cpu = tl.cpu_sink_at_end - tl.cpu_sink_at_running
        busy = (tl.finished or tl.fanned_out or end) - tl.running
        per = f", {serve_cpu / sent * 1e6:,.0f} µs/msg" if sent else ""
        rows.append(
            (
                "CPU: serve / sink, while running",
                f"{serve_cpu:.1f} s ({serve_cpu / busy:.0%}{per}) / {sink_cpu:.1f} s",
                "",
                "",
            )
        )
    if rate_window:
        peer = max((k for k in MAILMAN3_PERSONALISED if k <= n), default=10_000)
        mm = MAILMAN3_PERSONALISED[peer]
        rows.append(
            (
                "vs Mailman 3, personalised",
                f"x{rate_window / mm:,.0f} (Mailman: {mm:g} msg/s at {peer:,}, peer results)",
                "faster",
                verdict(rate_window > mm),
            )
        )
    width = max(len(r[0]) for r in rows)
    mwidth = max(len(r[1]) for r in rows)
    twidth = max(len(r[2]) for r in rows)
    bar = "=" * (width + mwidth + twidth + 12)
    print(f"\n{bar}\nRESULT  {n:,} recipients, {o.connections} connections, sink {o.sink}, "
          f"{o.database}, unsubscribe rate {o.unsubscribe_rate:g}/s")  # fmt: skip
    print(bar)
    for label, value, target, ok in rows:
        print(f"{label:<{width}}  {value:<{mwidth}}  {target:<{twidth}}  {ok}")
    print(bar)
    outbox = ", ".join(f"{k} {v:,}" for k, v in sorted(states.items()))
    print(f"campaign status {tl.status or '?'}; outbox: {outbox}; sink accepted {sink_count:,}")
    queued = sum(states.values())
    if queued < n and not o.fanout_only:
        print(f"  {n - queued:,} never queued: unsubscribed before the fan-out reached them")
    print(f"code measured: {code_state()}")
    if not o.fanout_only:
        print(
            f"one-click: {len(unsubs.answered):,} answered, {skipped_unsub:,} of them were "
            f"skipped by the send-time check; sent after the answer (G2 violations): "
            f"{violations}" + (f"; errors: {dict(unsubs.errors)}" if unsubs.errors else "")
        )
    print(
        "notes: hand-off quantiles are read from histogram buckets (bounds 1, 2.5, 5, 10, 25, "
        "50, 100 ms ...), so they are bucket-resolution; 'first to last consent check' uses "
        "outbox.checked_at of sent rows."
    )


def parse_args(argv: list[str]) -> Options:
    default_sink = "smtp-sink" if shutil.which("smtp-sink") else "aiosmtpd"
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--recipients", type=int, default=100_000)
    p.add_argument("--connections", type=int, default=16, help="MAILER_SMTP_CONNECTIONS")
    p.add_argument("--sink", choices=("smtp-sink", "aiosmtpd"), default=default_sink)
    p.add_argument(
        "--unsubscribe-rate", type=float, default=50.0, help="one-click POSTs per second"
    )
    p.add_argument("--fanout-only", action="store_true", help="measure only the fan-out")
    p.add_argument("--database", choices=("sqlite", "postgres"), default="sqlite")
    p.add_argument(
        "--workers",
        default="1",
        help="postgres: comma-separated worker-process counts to measure, e.g. 1,2,4",
    )
    p.add_argument(
        "--postgres-url",
        default=os.environ.get(
            "MAILER_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
        ),
        help="postgres: a database whose user may create databases (one fresh one per count)",
    )
    p.add_argument(
        "--poll", type=float, default=None, help="MAILER_WORKER_POLL_SECONDS (default: unset)"
    )
    p.add_argument("--profile", type=Path, default=None, help="py-spy raw output file")
    p.add_argument("--profile-rate", type=int, default=200, help="py-spy samples per second")
    p.add_argument("--timeout", type=float, default=3600.0, help="give up after this long")
    p.add_argument("--keep", action="store_true", help="keep the temp directory")
    p.add_argument(
        "--dkim", choices=("rsa", "ed25519"), default=None, help="sign with a fresh DKIM key"
    )
    p.add_argument(
        "--inbound",
        action="store_true",
        help="MAILER_INBOUND_PORT set: VERP and mailto: per message",
    )
    a = p.parse_args(argv)
    if a.sink == "smtp-sink" and not shutil.which("smtp-sink"):
        raise SystemExit(
            "smtp-sink is not installed. On Debian: apt-get update && "
            "DEBIAN_FRONTEND=noninteractive apt-get install -y postfix "
            "(or use --sink aiosmtpd, which saturates near 3,800 msgs/s)"
        )
    if a.recipients < 1:
        raise SystemExit("--recipients must be at least 1")
    return Options(
        a.recipients,
        a.connections,
        a.sink,
        a.unsubscribe_rate,
        a.fanout_only,
        a.database,
        a.poll,
        a.profile,
        a.profile_rate,
        a.timeout,
        a.keep,
        a.dkim,
        a.inbound,
        tuple(int(w) for w in a.workers.split(",")),
        a.postgres_url,
    )


# ------------------------------------------------------------------------ postgres --


async def run_postgres(o: Options) -> int:
    """Messages/s of one campaign sent by 1, 2, 4... ``mailer worker`` processes, each count
    on a fresh PostgreSQL database, all against the same sink."""
    import asyncpg  # only this mode needs it

    tmp = Path(tempfile.mkdtemp(prefix="mailer-pg-bench-"))
    admin_dsn = o.postgres_url.replace("postgresql+asyncpg://", "postgresql://")
    sink = start_sink(o.sink, tmp)
    results: list[tuple[int, int, float, Cpu]] = []
    try:
        for count in o.workers:
            name = f"mailer_bench_{os.getpid()}_{count}"
            admin = await asyncpg.connect(admin_dsn)
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await admin.execute(f'CREATE DATABASE "{name}"')
            try:
                url = admin_dsn.rsplit("/", 1)[0] + "/" + name
                results.append((count, *await _pg_round(o, tmp / name, url, sink, count)))
            finally:
                await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                await admin.close()
    finally:
        stop_process(sink.proc)
        if not o.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    base = results[0][2] / results[0][0] if results and results[0][0] == 1 else None
    print(f"\nRESULT  {o.recipients:,} recipients, {o.connections} connections per worker, "
          f"sink {o.sink}, postgres" + (f", DKIM {o.dkim}" if o.dkim else ""))  # fmt: skip
    print("workers  sent      messages/s  vs one worker   CPU µs/msg while sending:"
          " workers + postgres + sink = all")  # fmt: skip
    for count, sent, rate, cpu in results:
        ratio = f"x{rate / base:.2f}" if base else ""
        us = cpu.per_message(sent)
        print(f"{count:>7}  {sent:>8,}  {rate:>10,.0f}  {ratio:>13}   "
              f"{us[0]:>8,.0f} + {us[1]:>8,.0f} + {us[2]:>4,.0f} = {sum(us):,.0f}")  # fmt: skip
    cores = os.cpu_count() or 1
    for count, sent, _rate, cpu in results[1:] if base else []:
        # Whatever the design, N workers cannot go faster than the machine's cores divided
        # by the CPU that every process together spends per message at that count.
        all_us = sum(cpu.per_message(sent))
        if all_us:
            ceiling = cores * 1e6 / all_us
            print(f"ceiling for {count} workers here: {cores} cores / {all_us:,.0f} µs per message"
                  f" = {ceiling:,.0f} msg/s = x{ceiling / base:.2f} one worker")  # fmt: skip
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("targets (issue 6): two workers >= 1.6 x one; >= 4,000 msg/s with two workers")
    print(f"code measured: {code_state()}")
    return 0


async def _pg_round(
    o: Options, cwd: Path, url: str, sink: Sink, count: int
) -> tuple[int, float, "Cpu"]:
    """One count: init, seed, N workers, send; return (sent, msgs/s, CPU while sending)."""
    import asyncpg

    cwd.mkdir()
    env = child_env()
    env.update(
        MAILER_DATABASE_URL=url,
        MAILER_SMTP_HOST="127.0.0.1",
        MAILER_SMTP_PORT=str(sink.port),
        MAILER_SMTP_CONNECTIONS=str(o.connections),
    )
    if o.dkim:
        sign_with_dkim(o.dkim, cwd, env)
    mailer_cli(cwd, env, "init")
    env["MAILER_SECRET_KEYS"] = (cwd / "var" / "secret_keys").read_text().split()[0]
    mailer_cli(cwd, env, "list", "create", "news", "--name", "News")
    db = await asyncpg.connect(url)
    try:
        key = bytes.fromhex(
            await db.fetchval("SELECT value FROM instance_setting WHERE name = 'address_hash_key'")
        )
        list_id = await db.fetchval("SELECT id FROM mailing_list WHERE slug = 'news'")
        now = datetime.now(UTC)
        ids = range(1, o.recipients + 1)
        await db.copy_records_to_table(
            "subscriber",
            records=[(i, email_of(i), fast_hash(key, email_of(i)), None, now) for i in ids],
            columns=["id", "email", "email_hash", "name", "created_at"],
        )
        await db.copy_records_to_table(
            "subscription",
            records=[(i, list_id, "confirmed", now, now, now) for i in ids],
            columns=["subscriber_id", "list_id", "status", "created_at", "updated_at",
                     "confirmed_at"],
        )  # fmt: skip
        await db.execute("SELECT setval('subscriber_id_seq', $1)", o.recipients)
        (cwd / "november.md").write_text(BODY)
        campaign_id = int(
            mailer_cli(cwd, env, "campaign", "create", "--list", "news", "--subject", "Nov",
                       "--body", "november.md").split()[-1]
        )  # fmt: skip
        workers = [start_worker(cwd, env, cwd / f"worker-{i}.log") for i in range(count)]
        profile = None if o.profile is None else o.profile.with_suffix(f".w{count}.txt")
        profiler = None
        try:
            await asyncio.sleep(2.0)  # let them start
            if profile is not None:  # the first worker only
                profiler = start_profiler(workers[0].pid, profile, o.profile_rate)
            before = Cpu.now(workers, sink)
            mailer_cli(cwd, env, "campaign", "send", str(campaign_id))
            started = time.perf_counter()
            while await db.fetchval(
                "SELECT status FROM campaign WHERE id = $1", campaign_id
            ) not in ("sent", "cancelled"):
                if time.perf_counter() - started > o.timeout:
                    raise SystemExit("no finish within --timeout")
                if any(w.poll() is not None for w in workers):
                    raise SystemExit(f"a worker exited; see {cwd}/worker-*.log")
                await asyncio.sleep(0.2)
            cpu = Cpu.now(workers, sink).minus(before)
        finally:
            if profiler is not None:
                stop_process(profiler, signal.SIGINT)
            for w in workers:
                stop_process(w)
        sent, first, last = await db.fetchrow(
            "SELECT count(*), min(checked_at), max(checked_at) FROM outbox "
            "WHERE campaign_id = $1 AND status = 'sent'",
            campaign_id,
        )
    finally:
        await db.close()
    window = (last - first).total_seconds() if sent else 0.0
    rate = sent / window if window else 0.0
    print(f"  {count} worker(s): {sent:,} sent, {rate:,.0f} msg/s", flush=True)
    if profile is not None and profile.exists():
        print(f"  profile of worker 0 (py-spy, raw: {profile}):\n{summarise_profile(profile)}")
    return int(sent), rate, cpu


@dataclass
class Cpu:
    """CPU seconds spent while a campaign sent, from ``campaign send`` to its last message."""

    workers: float
    postgres: float
    sink: float

    @classmethod
    def now(cls, workers: list[subprocess.Popen[bytes]], sink: Sink) -> "Cpu":
        """The CPU seconds these processes (and every ``postgres`` process) have used so far."""
        return cls(
            sum(cpu_seconds(w.pid) for w in workers),
            postgres_cpu_seconds(),
            cpu_seconds(sink.proc.pid),
        )

    def minus(self, earlier: "Cpu") -> "Cpu":
        return Cpu(
            self.workers - earlier.workers,
            self.postgres - earlier.postgres,
            self.sink - earlier.sink,
        )

    def per_message(self, sent: int) -> tuple[float, float, float]:
        """Microseconds per sent message: workers, postgres, sink."""
        if not sent:
            return 0.0, 0.0, 0.0
        return self.workers / sent * 1e6, self.postgres / sent * 1e6, self.sink / sent * 1e6


def main(argv: list[str]) -> int:
    if argv[:1] == ["--_aiosmtpd-sink"]:
        run_aiosmtpd_sink(int(argv[1]), Path(argv[2]))
        return 0
    options = parse_args(argv)
    if options.database == "postgres":
        return asyncio.run(run_postgres(options))
    return asyncio.run(run(options))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
