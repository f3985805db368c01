"""SMTP replies read in order however they arrive: what command pipelining needs (RFC 2920).

aiosmtplib reads one reply per command it awaits and drops any that arrive before it asks,
so it cannot pipeline. Once aiosmtplib has connected (TLS, EHLO, AUTH), ``Replies`` takes
over the connection's transport: commands are written straight to it and their replies
queue up here, parsed as aiosmtplib parses them and raising aiosmtplib's exceptions, so a
fault reads the same either way.
"""

import asyncio
from collections import deque

import aiosmtplib

MAX_LINE = 8192
"""Longest reply line accepted (aiosmtplib's limit)."""
MAX_REPLY = 4 * MAX_LINE
"""Longest reply (continuation lines included) accepted (aiosmtplib's limit)."""


class Replies(asyncio.Protocol):
    """The replies of one SMTP connection, in the order the server sent them.

    The protocol it took over still hears of the connection's loss, so the aiosmtplib
    client it belongs to knows that it is closed.
    """

    def __init__(
        self, transport: asyncio.Transport, previous: asyncio.BaseProtocol, timeout: float | None
    ) -> None:
        self.transport = transport
        self._previous = previous
        self._timeout = timeout
        self._buffer = bytearray()
        self._queue: deque[aiosmtplib.SMTPResponse] = deque()
        self._error: aiosmtplib.SMTPException | None = None
        """Set once the stream is unusable: lost, or a reply that cannot be parsed."""
        self._waiter: asyncio.Future[None] | None = None

    @classmethod
    def take_over(cls, transport: asyncio.Transport, timeout: float | None) -> "Replies":
        """Read this transport's replies from now on (nothing may be in flight); ``read``
        waits up to ``timeout`` seconds for each."""
        replies = cls(transport, transport.get_protocol(), timeout)
        transport.set_protocol(replies)
        return replies

    @property
    def in_step(self) -> bool:
        """Whether the connection is usable and no reply is waiting that nobody asked for
        (say a relay's 421 before it closes an idle connection)."""
        return not self._queue and not self._buffer and self._error is None

    def write(self, data: bytes) -> None:
        """Send commands or message content; raises if the connection is gone."""
        if self._error is not None:
            raise self._error
        if self.transport.is_closing():
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        self.transport.write(data)

    async def read(self) -> aiosmtplib.SMTPResponse:
        """The next reply; raises when the connection is lost, the reply is malformed, or
        none arrives in time."""
        if not self._queue and self._error is None:
            try:
                async with asyncio.timeout(self._timeout):
                    while not self._queue and self._error is None:  # a part may come first
                        self._waiter = asyncio.get_running_loop().create_future()
                        await self._waiter
            except TimeoutError:
                raise aiosmtplib.SMTPReadTimeoutError(
                    "Timed out waiting for server response"
                ) from None
            finally:
                self._waiter = None
        if self._queue:
            return self._queue.popleft()
        assert self._error is not None
        raise self._error

    def data_received(self, data: bytes) -> None:
        if self._error is not None:
            return
        self._buffer += data
        while (reply := self._parse()) is not None:
            self._queue.append(reply)
        self._wake()

    def eof_received(self) -> bool:
        self._fail(aiosmtplib.SMTPServerDisconnected("Unexpected EOF received"))
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(aiosmtplib.SMTPServerDisconnected("Connection lost"))
        self._previous.connection_lost(exc)

    def _fail(self, error: aiosmtplib.SMTPException) -> None:
        if self._error is None:
            self._error = error
            self._buffer.clear()
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _parse(self) -> aiosmtplib.SMTPResponse | None:
        """Take one whole reply off the front of the buffer, if one is there."""
        lines: list[bytes] = []
        offset = 0
        while (end := self._buffer.find(b"\n", offset)) != -1:
            line = bytes(self._buffer[offset : end + 1])
            offset = end + 1
            if len(line) > MAX_LINE:
                self._malformed("Response too long")
                return None
            try:
                code = int(line[:3])
            except ValueError:
                text = line.decode("utf-8", errors="ignore")
                self._malformed(f"Malformed SMTP response line: {text}")
                return None
            lines.append(line[4:].strip(b" \t\r\n"))
            if line[3:4] != b"-":
                del self._buffer[:offset]
                text = b"\n".join(lines).decode("utf-8", "surrogateescape")
                return aiosmtplib.SMTPResponse(code, text)
        if len(self._buffer) > MAX_REPLY:
            self._malformed("Response too long")
        return None

    def _malformed(self, message: str) -> None:
        self._fail(aiosmtplib.SMTPResponseException(-1, message))
