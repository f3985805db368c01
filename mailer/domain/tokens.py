"""Signed tokens, the one module that mints and reads them.

Link tokens (``TokenCodec``): a payload is ``<address hash>~<list uid or '-'>``: no address
and no row id that erasure could delete (G4). Each purpose has its own salt, so a confirm
token is refused at the unsubscribe route and vice versa. The *first* configured key signs;
every key verifies (itsdangerous itself signs with the *last* key of its list, so the list is
reversed).

Row tokens (``RowTokens``): compact tokens naming one outbox row, for the local parts of
the VERP bounce address and the ``mailto:`` unsubscribe address. Same key rule, one salt
per purpose.
"""

import hmac
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from itsdangerous import BadSignature, SignatureExpired, Signer, TimestampSigner

from mailer.errors import BadToken

CONFIRM_MAX_AGE_SECONDS = 7 * 24 * 3600
GLOBAL = "-"
"""Stands for "every list"; list uids are 11 characters, so it never clashes."""
_PAYLOAD = re.compile(r"([0-9a-f]{32})~([A-Za-z0-9_-]{1,16})")


@dataclass(frozen=True, slots=True)
class LinkClaim:
    """What a token says: whose link it is, and for which list (``None`` means every list)."""

    subject_hash: str
    list_uid: str | None

    @property
    def is_global(self) -> bool:
        return self.list_uid is None


class _ClockedSigner(TimestampSigner):
    clock: Callable[[], float]

    def get_timestamp(self) -> int:
        return int(self.clock())


class TokenCodec:
    """Mints and verifies confirm (timed, 7 days) and unsubscribe (never expires) tokens."""

    def __init__(self, keys: Sequence[str], clock: Callable[[], float]) -> None:
        if not keys:
            raise ValueError("at least one secret key is needed")
        ordered = list(reversed(keys))  # itsdangerous signs with the last key
        self._unsubscribe = Signer(ordered, salt="mailer.unsubscribe.v1")
        self._confirm = _ClockedSigner(ordered, salt="mailer.confirm.v1")
        self._confirm.clock = clock

    def unsubscribe_token(self, claim: LinkClaim) -> str:
        return self._unsubscribe.sign(_encode(claim)).decode("ascii")

    def confirm_token(self, claim: LinkClaim) -> str:
        return self._confirm.sign(_encode(claim)).decode("ascii")

    def read_unsubscribe(self, token: str) -> LinkClaim:
        """Return the claim of a genuine unsubscribe token; raise ``BadToken`` otherwise."""
        try:
            return _decode(self._unsubscribe.unsign(_ascii(token)))
        except BadSignature:
            raise BadToken("this unsubscribe link is not valid") from None

    def read_confirm(self, token: str) -> LinkClaim:
        """Return the claim of a genuine, unexpired confirm token; raise ``BadToken`` otherwise."""
        try:
            payload = self._confirm.unsign(_ascii(token), max_age=CONFIRM_MAX_AGE_SECONDS)
        except SignatureExpired:
            raise BadToken("this confirmation link has expired") from None
        except BadSignature:
            raise BadToken("this confirmation link is not valid") from None
        return _decode(payload)


def _encode(claim: LinkClaim) -> str:
    return f"{claim.subject_hash}~{claim.list_uid or GLOBAL}"


def _ascii(token: str) -> bytes:
    try:
        return token.encode("ascii")
    except UnicodeEncodeError:
        raise BadToken("this link is not valid") from None


def _decode(payload: bytes) -> LinkClaim:
    match = _PAYLOAD.fullmatch(payload.decode("ascii"))
    if match is None:
        raise BadToken("this link is not valid")
    subject, list_uid = match.groups()
    return LinkClaim(subject, None if list_uid == GLOBAL else list_uid)


ROW_MAC_BYTES = 10
"""80 bits of HMAC-SHA256: 20 hex digits."""
_ROW_TOKEN = re.compile(r"([0-9a-f]{1,16})-([0-9a-f]{20})")


class RowPurpose(StrEnum):
    """What a row token is for; a token minted for one is refused for the other."""

    BOUNCE = "bounce"
    UNSUBSCRIBE = "unsubscribe"


class RowTokens:
    """Mints and verifies ``<row id in hex>-<80-bit MAC in hex>`` tokens naming an outbox row.

    Local parts are at most 64 octets and some MTAs case-fold them, so the alphabet is hex
    digits (at most 37 characters), and reading ignores case. Hex rather than base32: a token
    is minted twice per message on the send path, and ``bytes.hex`` is ~60 times faster than
    ``base64.b32encode``. The MAC is compared in constant time. Tokens never expire: a bounce
    can arrive days later, and a ``mailto:`` unsubscribe must keep working like the link (G4).
    """

    def __init__(self, keys: Sequence[str]) -> None:
        if not keys:
            raise ValueError("at least one secret key is needed")
        self._keys = {
            purpose: [
                hmac.digest(key.encode("utf-8"), f"mailer.row.{purpose}.v1".encode(), "sha256")
                for key in keys
            ]
            for purpose in RowPurpose
        }

    def mint(self, purpose: RowPurpose, row_id: int) -> str:
        """A token naming ``row_id``, signed with the first key."""
        if row_id < 0:
            raise ValueError("row ids are not negative")
        ident = f"{row_id:x}"
        return f"{ident}-{_row_mac(self._keys[purpose][0], ident)}"

    def read(self, purpose: RowPurpose, token: str) -> int:
        """The row id of a genuine token for ``purpose``, whatever its case; ``BadToken`` else."""
        match = _ROW_TOKEN.fullmatch(token.lower()) if token.isascii() else None
        if match is None:
            raise BadToken("this token is not valid")
        ident, mac = match.groups()
        if not any(hmac.compare_digest(_row_mac(key, ident), mac) for key in self._keys[purpose]):
            raise BadToken("this token is not valid")
        return int(ident, 16)


def _row_mac(key: bytes, ident: str) -> str:
    return hmac.digest(key, ident.encode("ascii"), "sha256")[:ROW_MAC_BYTES].hex()
