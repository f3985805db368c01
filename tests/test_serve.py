"""`mailer init` + `mailer serve` as real processes, the way `make run` starts them."""

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
from asyncio.subprocess import PIPE
from pathlib import Path

import aiohttp
import aiosmtplib
import pytest

from tests.harness import wait_healthy, wait_until

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
            await wait_healthy(http, base, "/healthz")
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


async def smtp_ready(port: int) -> bool:
    try:
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=2) as smtp:
            return (await smtp.noop()).code == 250
    except (aiosmtplib.SMTPException, OSError):
        return False


async def test_serve_with_inbound_port_unsubscribes_by_mail(
    tmp_path: Path, env: dict[str, str]
) -> None:
    """With MAILER_INBOUND_PORT, serve listens for mail too: the confirmation request offers
    a mailto: address, writing to it unsubscribes (globally), and SIGTERM stops both cleanly."""
    inbound = free_port()
    env = {**env, "MAILER_INBOUND_PORT": str(inbound), "MAILER_BOUNCE_DOMAIN": "bounces.test"}
    await run_mailer(tmp_path, env, "init")
    await run_mailer(tmp_path, env, "list", "create", "news", "--name", "News")
    await run_mailer(tmp_path, env, "subscriber", "add", "sam@example.org", "--list", "news")
    proc = await asyncio.create_subprocess_exec(
        *MAILER, "serve", cwd=tmp_path, env=env, stdout=PIPE, stderr=PIPE
    )
    try:
        outbox = tmp_path / "var" / "outbox" / "new"
        await wait_until(
            lambda: outbox.is_dir() and len(list(outbox.iterdir())) == 1,
            timeout=20,
            what="captured mail",
        )
        captured = next(outbox.iterdir()).read_bytes()
        found = re.search(rb"<mailto:(unsubscribe\+[0-9a-z-]+@bounces\.test)\?subject=", captured)
        assert found is not None, captured
        await wait_until(lambda: smtp_ready(inbound), timeout=20, what="the inbound listener")
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=inbound) as smtp:
            await smtp.sendmail(
                "sam@example.org", [found.group(1).decode()], b"Subject: unsubscribe\r\n\r\n"
            )
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(proc.communicate(), timeout=20)
    assert proc.returncode == 0, err.decode()
    assert f"inbound mail for bounces.test on 127.0.0.1:{inbound}".encode() in out
    assert b"inbound.message" in err and b"unsubscribe:unsubscribed" in err
    assert b"Traceback" not in err
    assert b"sam@example.org" not in err and found.group(1) not in err  # no addresses or tokens
    shown = await run_mailer(tmp_path, env, "subscriber", "show", "sam@example.org", "--json")
    assert json.loads(shown)["suppression"] == "unsubscribed"


async def test_mailer_inbound_runs_the_listener_alone(tmp_path: Path, env: dict[str, str]) -> None:
    """`mailer inbound` receives only for the bounce domain and stops cleanly on SIGTERM."""
    inbound = free_port()
    env = {**env, "MAILER_INBOUND_PORT": str(inbound), "MAILER_FROM": "news@example.net"}
    await run_mailer(tmp_path, env, "init")
    proc = await asyncio.create_subprocess_exec(
        *MAILER, "inbound", cwd=tmp_path, env=env, stdout=PIPE, stderr=PIPE
    )
    try:
        await wait_until(lambda: smtp_ready(inbound), timeout=20, what="the inbound listener")
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=inbound) as smtp:
            await smtp.mail("")
            with pytest.raises(aiosmtplib.SMTPRecipientRefused) as relay:
                await smtp.rcpt("someone@example.org")
            assert relay.value.code == 550
            assert (await smtp.rcpt("fbl@example.net")).code == 250
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(proc.communicate(), timeout=20)
    assert proc.returncode == 0, err.decode()
    assert f"inbound mail for example.net on 127.0.0.1:{inbound}".encode() in out
    assert b"Traceback" not in err


async def test_worker_serves_metrics_and_health_only(tmp_path: Path, env: dict[str, str]) -> None:
    """`mailer worker --metrics-port` exposes /metrics and /healthz, and nothing else."""
    await run_mailer(tmp_path, env, "init")
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        *MAILER, "worker", "--metrics-port", str(port), cwd=tmp_path, env=env, stdout=PIPE,
        stderr=PIPE,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            await wait_healthy(http, base, "the worker's /healthz")
            async with http.get(f"{base}/metrics") as r:
                assert r.status == 200
                assert "mailer_relay_backoff_seconds" in await r.text()
            async with http.post(f"{base}/api/v1/subscriptions", json={}) as r:
                assert r.status == 404  # the API is serve's, not the worker's
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(proc.communicate(), timeout=20)
    assert proc.returncode == 0, err.decode()
    assert f"/metrics on http://127.0.0.1:{port}" in out.decode()
