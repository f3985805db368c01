"""SMTP command pipelining (RFC 2920) against scripted servers on loopback.

``Replies`` must hand back replies in order however the bytes are split or joined, fail
the way aiosmtplib fails on a malformed, endless or missing reply, and let the protocol it
took over hear of the connection's loss. A relay that takes DATA after refusing the
recipient must never be sent the message. (The whole SMTP fault matrix runs pipelined and
one by one in ``test_faults``.)
"""

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import cast

import aiosmtplib
import pytest
import trustme

from mailer.transport.capture import CaptureServer
from mailer.transport.outcomes import Outcome, PermFail, Sent, TempFail
from mailer.transport.replies import MAX_LINE, MAX_REPLY, Replies
from mailer.transport.smtp import RelayConfig, SmtpPool
from tests.harness import SinkServer

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def serving(script: Script) -> AsyncIterator[int]:
    """A loopback server running ``script`` for each connection; yields its port."""
    tasks: list[asyncio.Task[None]] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tasks.append(asyncio.current_task())  # type: ignore[arg-type]
        try:
            await script(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()
        if tasks:  # let each script see the client's close, then stop what still runs
            await asyncio.wait(tasks, timeout=3.0)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class Plain(asyncio.Protocol):
    """The protocol ``Replies`` takes over: it records whether it heard of the loss."""

    lost = False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True


@asynccontextmanager
async def replies_from(
    chunks: list[bytes], then_close: bool = False, timeout: float = 2.0
) -> AsyncIterator[tuple[Replies, Plain]]:
    """``Replies`` on a connection whose server writes ``chunks`` one by one, pausing between
    them so that each arrives in a read of its own, and then stays open (or closes)."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for chunk in chunks:
            writer.write(chunk)
            await writer.drain()
            await asyncio.sleep(0.02)
        if then_close:
            writer.close()
            return
        await reader.read()

    async with serving(script) as port:
        plain = Plain()
        transport, _ = await asyncio.get_running_loop().create_connection(
            lambda: plain, "127.0.0.1", port
        )
        replies = Replies.take_over(cast(asyncio.Transport, transport), timeout)
        try:
            yield replies, plain
        finally:
            transport.close()


async def test_replies_come_back_in_order_however_the_bytes_are_cut() -> None:
    chunks = [b"2", b"50-first line\r\n25", b"0 second line\r\n251 forwarded\r\n354 go", b"\r\n"]
    async with replies_from(chunks) as (replies, _):
        got = [await replies.read() for _ in range(3)]
    assert got == [
        aiosmtplib.SMTPResponse(250, "first line\nsecond line"),
        aiosmtplib.SMTPResponse(251, "forwarded"),
        aiosmtplib.SMTPResponse(354, "go"),
    ]


async def test_replies_that_arrive_together_are_all_kept() -> None:
    async with replies_from([b"250 a\r\n250 b\r\n354 c\r\n"]) as (replies, _):
        await asyncio.sleep(0.1)  # all three are in before the first read
        got = [(r.code, r.message) for r in [await replies.read() for _ in range(3)]]
    assert got == [(250, "a"), (250, "b"), (354, "c")]


@pytest.mark.parametrize(
    ("chunks", "message"),
    [
        ([b"250 fine\r\n", b"hello there\r\n"], "Malformed SMTP response line: hello there"),
        ([b"250 fine\r\n", b"250 " + b"x" * MAX_LINE + b"\r\n"], "Response too long"),
        ([b"250 fine\r\n", b"250-" + b"x" * (MAX_REPLY + 1)], "Response too long"),
    ],
    ids=["gibberish", "line-too-long", "endless-reply"],
)
async def test_a_reply_that_cannot_be_read_fails_after_the_good_ones(
    chunks: list[bytes], message: str
) -> None:
    async with replies_from(chunks) as (replies, _):
        assert (await replies.read()).code == 250
        with pytest.raises(aiosmtplib.SMTPResponseException) as failed:
            await replies.read()
        assert failed.value.code == -1 and failed.value.message.startswith(message)
        with pytest.raises(aiosmtplib.SMTPResponseException):  # and stays failed
            await replies.read()


async def test_a_closed_connection_fails_reads_and_is_told_to_the_old_protocol() -> None:
    async with replies_from([b"250 last words\r\n"], then_close=True) as (replies, plain):
        assert (await replies.read()).message == "last words"
        with pytest.raises(aiosmtplib.SMTPServerDisconnected):
            await replies.read()
        await asyncio.sleep(0.05)
        assert plain.lost
        with pytest.raises(aiosmtplib.SMTPServerDisconnected):
            replies.write(b"NOOP\r\n")


async def test_silence_times_out() -> None:
    async with replies_from([b"250 one\r\n"], timeout=0.2) as (replies, _):
        await replies.read()
        started = asyncio.get_running_loop().time()
        with pytest.raises(aiosmtplib.SMTPReadTimeoutError):
            await replies.read()
        assert 0.15 < asyncio.get_running_loop().time() - started < 2.0


# --- a relay that gets out of step ---------------------------------------------------------


async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> list[bytes]:
    """Greet, answer EHLO offering PIPELINING, and read the client's MAIL, RCPT and DATA."""
    writer.write(b"220 scripted ESMTP\r\n")
    await reader.readline()  # EHLO
    writer.write(b"250-scripted\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
    return [await reader.readline() for _ in range(3)]


async def send_one(port: int, recipient: str) -> tuple[Outcome, bool]:
    """One message through a pool of one connection; its outcome, and whether the
    connection was left broken."""
    pool = SmtpPool(RelayConfig("127.0.0.1", port, timeout=2.0), size=1)
    try:
        async with pool.connection() as conn:
            outcome = await conn.send("list@example.org", recipient, MESSAGE, False)
            return outcome, conn.broken
    finally:
        await pool.close()


def relay(group_reply: bytes, seen: list[bytes], hang_up: bool = False) -> Script:
    """A relay that offers PIPELINING, answers the first transaction's MAIL, RCPT and DATA
    with ``group_reply``, then hangs up or records everything the client writes after."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.extend(await greet(reader, writer))
        writer.write(group_reply)
        if hang_up:
            return
        try:
            seen.append(await asyncio.wait_for(reader.read(), 2.0))  # until the client closes
        except TimeoutError:
            seen.append(b"(still open)")

    return script


MESSAGE = b"Subject: hi\r\n\r\n.a dot line\r\n"


async def test_a_relay_that_takes_data_after_refusing_the_recipient_gets_nothing() -> None:
    seen: list[bytes] = []
    reply = b"250 2.1.0 ok\r\n550 5.1.1 no such user\r\n354 go ahead anyway\r\n"
    async with serving(relay(reply, seen)) as port:
        outcome, broken = await send_one(port, "gone@example.org")
    assert broken
    assert outcome == PermFail(550, "RCPT TO: 550 5.1.1 no such user", "5.1.1")
    assert seen[:3] == [
        b"MAIL FROM:<list@example.org>\r\n",
        b"RCPT TO:<gone@example.org>\r\n",
        b"DATA\r\n",
    ]
    assert seen[3] == b""  # the connection was closed: not a byte of the message went


async def test_a_refused_sender_on_a_relay_that_hangs_up_is_still_the_refusal() -> None:
    seen: list[bytes] = []
    async with serving(relay(b"421 4.3.2 closing\r\n", seen, hang_up=True)) as port:
        # RCPT and DATA are never answered: the connection is gone after the 421
        outcome, _ = await send_one(port, "a@example.org")
    assert outcome == TempFail("MAIL FROM: 421 4.3.2 closing", relay_backoff=True)


async def test_a_pipelined_message_arrives_dot_stuffed_and_whole() -> None:
    got: list[bytes] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got.extend(await greet(reader, writer))
        writer.write(b"250 ok\r\n250 ok\r\n354 go\r\n")
        got.append(await reader.readuntil(b"\r\n.\r\n"))
        writer.write(b"250 2.0.0 queued as 42\r\n")
        await reader.read()

    async with serving(script) as port:
        outcome, _ = await send_one(port, "a@example.org")
    assert outcome == Sent("250 2.0.0 queued as 42")
    assert got[3] == b"Subject: hi\r\n\r\n..a dot line\r\n.\r\n"


async def test_a_reply_nobody_asked_for_is_not_taken_for_the_next_ones() -> None:
    """A relay that says 421 to an idle connection (and keeps it open, the worst case): the
    next message goes over a new connection, and is not refused by the stale 421."""
    connections: list[list[bytes]] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen = await greet(reader, writer)
        connections.append(seen)
        writer.write(b"250 ok\r\n250 ok\r\n354 go\r\n")
        await reader.readuntil(b"\r\n.\r\n")
        writer.write(b"250 2.0.0 queued\r\n")
        if len(connections) == 1:
            writer.write(b"421 4.4.2 idle timeout\r\n")
        seen.append(await reader.read())

    async with serving(script) as port:
        pool = SmtpPool(RelayConfig("127.0.0.1", port, timeout=2.0), size=1)
        outcomes = []
        for email in ("a@example.org", "b@example.org"):
            async with pool.connection() as conn:
                outcomes.append(await conn.send("list@example.org", email, MESSAGE, False))
                await asyncio.sleep(0.1)  # idle: the 421 arrives
        await pool.close()
    assert outcomes == [Sent("250 2.0.0 queued"), Sent("250 2.0.0 queued")]
    assert [c[1] for c in connections] == [
        b"RCPT TO:<a@example.org>\r\n",
        b"RCPT TO:<b@example.org>\r\n",
    ]


async def test_the_embedded_capture_server_takes_pipelined_mail(tmp_path: Path) -> None:
    """``make run``'s relay offers PIPELINING like a real one, and keeps what it is sent."""
    capture = CaptureServer(tmp_path / "outbox")
    await capture.start()
    pool = SmtpPool(RelayConfig("127.0.0.1", capture.port, timeout=5.0), size=1)
    try:
        async with pool.connection() as conn:
            outcome = await conn.send("list@example.org", "a@example.org", MESSAGE, False)
            assert conn.replies is not None  # the pipelined path was taken
    finally:
        await pool.close()
        await capture.stop()
    assert outcome == Sent("250 2.0.0 captured")
    kept = list((tmp_path / "outbox" / "new").iterdir())
    assert [p.read_bytes() for p in kept] == [b"Subject: hi\n\n.a dot line\n"]


# --- over STARTTLS -------------------------------------------------------------------------


@pytest.fixture
def relay_ca(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> trustme.CA:
    """A throwaway CA the client trusts (``SSL_CERT_FILE``, read by the default context)."""
    ca = trustme.CA()
    pem = tmp_path / "relay-ca.pem"
    ca.cert_pem.write_to_path(str(pem))
    monkeypatch.setenv("SSL_CERT_FILE", str(pem))
    return ca


async def three_over_starttls(ca: trustme.CA) -> SinkServer:
    """Three messages over one verified STARTTLS connection to a sink that pipelines."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    sink = SinkServer(tls_context=context)
    await sink.start()
    pool = SmtpPool(RelayConfig("127.0.0.1", sink.port, tls="starttls", timeout=5.0), size=1)
    try:
        for n in range(3):
            async with pool.connection() as conn:
                outcome = await conn.send("list@example.org", f"r{n}@example.org", MESSAGE, False)
                assert outcome == Sent("250 OK"), outcome
    finally:
        await pool.close()
        await sink.stop()
    return sink


async def test_pipelining_over_starttls(relay_ca: trustme.CA) -> None:
    """The replies reader takes over the TLS transport STARTTLS left, not the plain one."""
    sink = await three_over_starttls(relay_ca)
    assert [e.detail for e in sink.seen("read")] == ["MAIL,RCPT,DATA"] * 3
    assert len(sink.seen("connect")) == 1 and len(sink.seen("ehlo")) == 2  # before and after
    assert [m.raw for m in sink.messages] == [b"Subject: hi\r\n\r\n.a dot line\r\n"] * 3


def test_pipelining_over_starttls_on_uvloop(relay_ca: trustme.CA) -> None:
    uvloop = pytest.importorskip("uvloop")
    sink = uvloop.run(three_over_starttls(relay_ca))
    assert [e.detail for e in sink.seen("read")] == ["MAIL,RCPT,DATA"] * 3
    assert len(sink.messages) == 3


@pytest.mark.parametrize(
    "scenario",
    [
        test_replies_come_back_in_order_however_the_bytes_are_cut,
        test_replies_that_arrive_together_are_all_kept,
        test_a_closed_connection_fails_reads_and_is_told_to_the_old_protocol,
        test_silence_times_out,
        test_a_relay_that_takes_data_after_refusing_the_recipient_gets_nothing,
        test_a_pipelined_message_arrives_dot_stuffed_and_whole,
    ],
    ids=lambda f: f.__name__.removeprefix("test_"),
)
def test_on_uvloop(scenario: Callable[[], Awaitable[None]]) -> None:
    """The same on uvloop, as ``mailer serve`` and ``mailer worker`` run: its transports are
    no ``asyncio.Transport`` subclasses, and it has its own ``set_protocol``."""
    uvloop = pytest.importorskip("uvloop")
    uvloop.run(scenario())
