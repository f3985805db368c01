"""HMAC signatures of relay webhooks (``POST /api/v1/events``). Pure: the caller passes the time.

A sender signs ``<timestamp>.<raw body>`` with HMAC-SHA256 and sends two headers::

    X-Mailer-Timestamp: 1767225600
    X-Mailer-Signature: v1=<64 hex digits>[, v1=<64 hex digits>...]

Several ``v1=`` values are allowed so a sender can sign with an old and a new secret while
they rotate; any configured secret verifying any value is enough. Values of other schemes
(``v2=``…) are ignored, so a future scheme can be introduced alongside. The timestamp must
be within ``REPLAY_WINDOW`` of the receiver's clock, in either direction.
"""

import hashlib
import hmac
import re
from collections.abc import Sequence

from mailer.errors import BadWebhookSignature

TIMESTAMP_HEADER = "X-Mailer-Timestamp"
SIGNATURE_HEADER = "X-Mailer-Signature"
SCHEME = "v1"
REPLAY_WINDOW = 300
"""Seconds a signed request stays acceptable (either way, for clock skew)."""
_TIMESTAMP = re.compile(r"[0-9]{1,12}")
_HEX = re.compile(r"[0-9a-f]{64}")


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """The ``v1`` signature (64 lower-case hex digits) of ``body`` sent at ``timestamp``."""
    message = timestamp.encode("ascii") + b"." + body
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def verify(
    secrets: Sequence[bytes],
    timestamp: str | None,
    signature: str | None,
    body: bytes,
    now: float,
) -> None:
    """Accept a request or raise ``BadWebhookSignature`` saying which check failed.

    ``timestamp`` and ``signature`` are the raw header values (``None`` when absent), ``body``
    the raw bytes as received, ``now`` the receiver's clock in Unix seconds. Digests are
    compared in constant time.
    """
    if timestamp is None or signature is None:
        raise BadWebhookSignature(
            f"the {TIMESTAMP_HEADER} and {SIGNATURE_HEADER} headers are required"
        )
    timestamp = timestamp.strip()
    if not _TIMESTAMP.fullmatch(timestamp):
        raise BadWebhookSignature(f"{TIMESTAMP_HEADER} must be Unix time in whole seconds")
    if abs(now - int(timestamp)) > REPLAY_WINDOW:
        raise BadWebhookSignature(
            f"{TIMESTAMP_HEADER} is more than {REPLAY_WINDOW} seconds away from the "
            f"receiver's clock (a replay, or a clock to fix)"
        )
    offered = _offered(signature)
    if not offered:
        raise BadWebhookSignature(f"{SIGNATURE_HEADER} holds no {SCHEME}=<64 hex digits> value")
    expected = [sign(secret, timestamp, body) for secret in secrets]
    if not any(hmac.compare_digest(e, o) for e in expected for o in offered):
        raise BadWebhookSignature("no signature matches the body with a configured secret")


def _offered(header: str) -> list[str]:
    """The well-formed ``v1`` digests of a signature header, lower-cased."""
    found = []
    for part in header.split(","):
        scheme, _, value = part.strip().partition("=")
        value = value.strip().lower()
        if scheme.strip() == SCHEME and _HEX.fullmatch(value):
            found.append(value)
    return found
