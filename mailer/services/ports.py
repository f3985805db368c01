"""The small interfaces services depend on, so tests can pass hand-written fakes."""

import time
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime
from typing import Protocol

from mailer.domain.skeleton import Filled
from mailer.transport.outcomes import Outcome


class Clock(Protocol):
    def now(self) -> datetime:
        """Aware UTC wall time."""
        ...

    def monotonic(self) -> float: ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()


class MailConnection(Protocol):
    async def send(self, sender: str, recipient: str, data: bytes, smtputf8: bool) -> Outcome: ...


class MailTransport(Protocol):
    def connection(self) -> AbstractAsyncContextManager[MailConnection]: ...


class Signer(Protocol):
    def sign(self, data: bytes, filled: Filled | None = None) -> bytes:
        """The message with its signature header(s) prepended.

        ``filled``, when given, is how ``data`` was made from a skeleton: a signer may reuse
        work it did once for that skeleton, and must give the same signature as without it.
        """
        ...


class NoSigner:
    def sign(self, data: bytes, filled: Filled | None = None) -> bytes:
        return data
