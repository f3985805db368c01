"""Address validation, normalisation and the keyed identity hash used for suppression."""

import hashlib
import hmac
import unicodedata
from dataclasses import dataclass

from email_validator import EmailNotValidError, validate_email

from mailer.errors import InvalidAddress

MAX_INPUT_LENGTH = 320
LOCAL_PART_MAX_OCTETS = 64


@dataclass(frozen=True, slots=True)
class Address:
    """A validated address: ``email`` is what we store and send to; ``identity`` is what we hash."""

    email: str
    identity: str
    needs_smtputf8: bool


def parse_address(raw: str) -> Address:
    """Validate and normalise ``raw``; raise ``InvalidAddress`` with a readable reason.

    Quoted local parts and domain literals are refused; the 64-octet local-part limit of
    RFC 5321 is enforced (``strict``) because relays refuse longer local parts anyway.
    """
    text = raw.strip()
    if not text:
        raise InvalidAddress("the address is empty")
    if len(text) > MAX_INPUT_LENGTH:
        raise InvalidAddress(f"the address is longer than {MAX_INPUT_LENGTH} characters")
    try:
        result = validate_email(
            text,
            check_deliverability=False,
            allow_quoted_local=False,
            allow_domain_literal=False,
            allow_display_name=False,
            allow_empty_local=False,
            allow_smtputf8=True,
            strict=True,
        )
    except EmailNotValidError as exc:
        raise InvalidAddress(str(exc)) from None
    # email-validator counts the local part in characters; RFC 5321/6531 limit it in octets.
    octets = len(result.local_part.encode("utf-8"))
    if octets > LOCAL_PART_MAX_OCTETS:
        raise InvalidAddress(
            f"The email address is too long before the @-sign "
            f"({octets - LOCAL_PART_MAX_OCTETS} bytes too many in UTF-8)."
        )
    local = unicodedata.normalize("NFC", result.local_part).casefold()
    return Address(
        email=result.normalized,
        identity=f"{local}@{result.ascii_domain}",
        needs_smtputf8=bool(result.smtputf8),
    )


def address_hash(key: bytes, address: Address) -> str:
    """The keyed hash of an address identity: 128 bits of HMAC-SHA256, as 32 hex digits.

    Case of the local part, Unicode normalisation and IDN form of the domain all map to
    the same hash, so a suppression holds across those variants (G5).
    """
    digest = hmac.new(key, address.identity.encode("utf-8"), hashlib.sha256).digest()
    return digest[:16].hex()
