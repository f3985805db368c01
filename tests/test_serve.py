"""`mailer init` + `mailer serve` as real processes, the way `make run` starts them."""

import asyncio
import os
import signal
import socket
import subprocess
import sys
from asyncio.subprocess import PIPE
from pathlib import Path

import aiohttp
import pytest

from tests.harness import wait_until

pytestmark = pytest.mark.slow
MAILER = [sys.executable, "-m", "mailer.cli.main"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MAILER_")}
    return {**clean, "MAILER_HTTP_PORT": str(free_port())}


async def run_mailer(cwd: Path, env: dict[str, str], *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        *MAILER, *args, cwd=cwd, env=env, stdout=PIPE, stderr=PIPE
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def test_serve_on_embedded_defaults(tmp_path: Path, env: dict[str, str]) -> None:
    """serve answers /healthz, captures mail in var/outbox/, and stops cleanly on SIGTERM."""
    await run_mailer(tmp_path, env, "init")
    await run_mailer(tmp_path, env, "list", "create", "news", "--name", "News")
    key = (await run_mailer(tmp_path, env, "apikey", "create", "site")).strip()
    proc = await asyncio.create_subprocess_exec(
        *MAILER, "serve", cwd=tmp_path, env=env, stdout=PIPE, stderr=PIPE
    )
    base = f"http://127.0.0.1:{env['MAILER_HTTP_PORT']}"
    try:
        async with aiohttp.ClientSession() as http:

            async def healthy() -> bool:
                try:
                    async with http.get(f"{base}/healthz") as r:
                        return r.status == 200 and (await r.json())["status"] == "ok"
                except aiohttp.ClientError:
                    return False

            await wait_until(healthy, timeout=20, what="/healthz")
            async with http.post(
                f"{base}/api/v1/subscriptions",
                json={"email": "new@example.org", "list": "news"},
                headers={"Authorization": f"Bearer {key}"},
            ) as r:
                assert r.status == 202
        outbox = tmp_path / "var" / "outbox" / "new"
        await wait_until(
            lambda: outbox.is_dir() and len(list(outbox.iterdir())) == 1, what="captured mail"
        )
        captured = next(outbox.iterdir()).read_bytes()
        assert b"To: new@example.org" in captured
        assert b"List-Unsubscribe-Post: List-Unsubscribe=One-Click" in captured
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), timeout=20)
    assert proc.returncode == 0, err.decode()
    assert b"Traceback" not in err
    assert b"new@example.org" not in err  # access logs hold no addresses


def test_serve_refuses_an_uninitialised_database(tmp_path: Path, env: dict[str, str]) -> None:
    """Without `mailer init`, serve exits non-zero with one line saying what to do."""
    result = subprocess.run(
        [*MAILER, "serve"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "mailer: error: no secret key: set MAILER_SECRET_KEYS or run `mailer init`"
    ]
