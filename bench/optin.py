"""Benchmark the HTTP write path: API opt-ins and one-click unsubscribes against `mailer serve`.

Runs `mailer init` and `mailer serve` (SQLite + embedded capture SMTP, worker on) in a temp
directory, posts N opt-ins with C concurrent clients, waits until every confirmation request
has been captured, then one-click-unsubscribes a sample while more opt-ins keep the sender busy.
Prints requests/s and latency percentiles. Nothing leaves 127.0.0.1.

    .venv/bin/python bench/optin.py --requests 5000 --concurrency 64
"""

import argparse
import asyncio
import os
import re
import socket
import statistics
import sys
import tempfile
import time
from asyncio.subprocess import DEVNULL, PIPE
from pathlib import Path

import aiohttp

MAILER = [sys.executable, "-m", "mailer.cli.main"]
UNSUB = re.compile(rb"<(http://[^>]+/unsubscribe/[^>]+)>")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def mailer(cwd: Path, env: dict[str, str], *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(*MAILER, *args, cwd=cwd, env=env, stdout=PIPE)
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"mailer {' '.join(args)} failed")
    return out.decode().strip()


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))]


async def hammer(
    http: aiohttp.ClientSession, jobs: list[tuple[str, dict[str, object]]], concurrency: int
) -> tuple[float, list[float]]:
    """POST every job with ``concurrency`` workers; return (seconds, per-request latencies)."""
    queue: asyncio.Queue[tuple[str, dict[str, object]]] = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)
    latencies: list[float] = []

    async def client() -> None:
        while not queue.empty():
            url, kwargs = queue.get_nowait()
            start = time.perf_counter()
            async with http.post(url, **kwargs) as r:  # type: ignore[arg-type]
                await r.read()
                if r.status not in (200, 202):
                    raise SystemExit(f"{url} answered {r.status}")
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return time.perf_counter() - start, latencies


def report(name: str, seconds: float, latencies: list[float]) -> None:
    print(
        f"{name:<34} {len(latencies):>6} req  {len(latencies) / seconds:>8.0f} req/s  "
        f"p50 {statistics.median(latencies) * 1000:6.1f} ms  "
        f"p99 {percentile(latencies, 0.99) * 1000:6.1f} ms  "
        f"max {max(latencies) * 1000:6.1f} ms"
    )


async def main(requests: int, concurrency: int, unsubscribes: int) -> None:
    with tempfile.TemporaryDirectory(prefix="mailer-bench-") as tmp:
        cwd = Path(tmp)
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("MAILER_")}
        env.update(
            MAILER_HTTP_PORT=str(port),
            MAILER_BASE_URL=f"http://127.0.0.1:{port}",
            MAILER_API_RATE_PER_MINUTE="10000000",
        )
        await mailer(cwd, env, "init")
        await mailer(cwd, env, "list", "create", "news", "--name", "News")
        key = await mailer(cwd, env, "apikey", "create", "bench")
        server = await asyncio.create_subprocess_exec(
            *MAILER, "serve", cwd=cwd, env=env, stdout=DEVNULL, stderr=DEVNULL
        )
        base = f"http://127.0.0.1:{port}"
        headers = {"Authorization": f"Bearer {key}"}
        try:
            async with aiohttp.ClientSession() as http:
                for _ in range(200):
                    try:
                        async with http.get(f"{base}/healthz") as r:
                            if r.status == 200:
                                break
                    except aiohttp.ClientError:
                        await asyncio.sleep(0.1)
                jobs = [
                    (
                        f"{base}/api/v1/subscriptions",
                        {
                            "json": {"email": f"p{i}@example.org", "list": "news"},
                            "headers": headers,
                        },
                    )
                    for i in range(requests)
                ]
                started = time.perf_counter()
                seconds, latencies = await hammer(http, jobs, concurrency)
                report("API opt-in (202, queues a mail)", seconds, latencies)
                outbox = cwd / "var" / "outbox" / "new"
                while len(list(outbox.iterdir())) < requests:
                    await asyncio.sleep(0.05)
                done = time.perf_counter() - started
                print(
                    f"{'all confirmation requests captured':<34} {requests:>6} msg  "
                    f"{requests / done:>8.0f} msg/s end to end ({done:.1f} s)"
                )
                links = [UNSUB.search(f.read_bytes()) for f in sorted(outbox.iterdir())]
                urls = [m.group(1).decode() for m in links if m][:unsubscribes]
                more = [
                    (
                        f"{base}/api/v1/subscriptions",
                        {
                            "json": {"email": f"q{i}@example.org", "list": "news"},
                            "headers": headers,
                        },
                    )
                    for i in range(requests)
                ]
                one_click = [(u, {"data": {"List-Unsubscribe": "One-Click"}}) for u in urls]
                background = asyncio.create_task(hammer(http, more, concurrency))
                seconds, latencies = await hammer(http, one_click, 8)
                report("one-click unsubscribe, under load", seconds, latencies)
                await background
        finally:
            server.terminate()
            await server.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--unsubscribes", type=int, default=500)
    args = parser.parse_args()
    asyncio.run(main(args.requests, args.concurrency, args.unsubscribes))
