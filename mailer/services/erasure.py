"""Erasing a person from captured mail: the embedded capture server's Maildir (``var/outbox/``).

The database forgets a person through row deletion, ``secure_delete`` and a truncating WAL
checkpoint (``Database.compact_erased``). Captured messages are whole copies of mail sent to
them, so every file that mentions the address in any of its forms is overwritten and removed.

Forms looked for, compared case-insensitively after Unicode NFC normalisation: the address as
typed, as stored, and with its domain in Unicode and in IDNA (``xn--``) form. A file is also
decoded (MIME encoded words, base64 and quoted-printable parts) when it carries such
encodings, so an address hidden by a transfer encoding is found as well.
"""

import email
import email.policy
import html
import os
import re
import unicodedata
from collections.abc import Iterable
from pathlib import Path

from mailer.domain.addresses import Address

_ENCODED_MARKERS = (b"=?", b"base64", b"quoted-printable")


def _fold(text: str) -> str:
    return unicodedata.normalize("NFC", unicodedata.normalize("NFC", text).casefold())


class AddressMatcher:
    """Finds one address in raw messages, in any of its spellings (see the module docstring).

    A match must stand alone: ``lee@example.org`` is not found inside ``ann.lee@example.org``
    or ``lee@example.org.uk``, so nobody else's captured mail is deleted.
    """

    def __init__(self, raw: str, address: Address) -> None:
        self.forms = address_forms(raw, address)
        alternatives = "|".join(re.escape(f) for f in sorted(self.forms, key=len, reverse=True))
        self._pattern = re.compile(f"{_BEFORE}(?:{alternatives}){_AFTER}")

    def mentions(self, data: bytes) -> bool:
        """True when a raw message holds the address, plainly or behind a MIME encoding."""
        if self._found(data.decode("utf-8", errors="replace")):
            return True
        lowered = data.lower()
        if not any(marker in lowered for marker in _ENCODED_MARKERS):
            return False
        return any(self._found(text) for text in _decoded_texts(data))

    def _found(self, text: str) -> bool:
        if self._pattern.search(_fold(text)):
            return True
        # an HTML part may spell characters as entities
        return "&" in text and self._pattern.search(_fold(html.unescape(text))) is not None


_BEFORE = r"(?<![\w.!#$%&'*+/=?^`{|}~-])"
"""Not preceded by a character that could continue the local part."""
_AFTER = r"(?![\w-]|\.[\w-])"
"""Not followed by more of a domain name (a full stop ending a sentence is fine)."""


def address_forms(raw: str, address: Address) -> frozenset[str]:
    """Every spelling of one address to look for, folded (see ``_fold``).

    ``address.email`` carries the domain in Unicode, ``address.identity`` in IDNA form; each
    local part spelling is combined with each domain spelling.
    """
    locals_: set[str] = set()
    domains: set[str] = set()
    for spelling in (raw.strip(), address.email, address.identity):
        local, _, domain = spelling.rpartition("@")
        if local and domain:
            locals_.add(local)
            domains.add(domain)
    return frozenset(_fold(f"{local}@{domain}") for local in locals_ for domain in domains)


def _decoded_texts(data: bytes) -> Iterable[str]:
    try:
        message = email.message_from_bytes(data, policy=email.policy.default)
        for part in message.walk():
            for _, value in part.items():
                yield str(value)
            if part.is_multipart():
                continue
            payload = part.get_payload(decode=True)
            if isinstance(payload, bytes):
                charset = part.get_content_charset() or "utf-8"
                try:
                    yield payload.decode(charset, errors="replace")
                except LookupError:  # an unknown charset name
                    yield payload.decode("utf-8", errors="replace")
    except Exception:  # a malformed message: what was searched plainly has to do
        return


def scrub_maildir(root: Path, matcher: AddressMatcher) -> int:
    """Overwrite and delete every file under ``root`` that holds the address; return how many.

    Overwriting first (then ``fsync``) is the file-level counterpart of SQLite's
    ``secure_delete``: the bytes are gone from the file system's view, not only unlinked.
    """
    if not root.is_dir():
        return 0
    removed = 0
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.is_symlink():
            continue
        try:
            data = path.read_bytes()
        except FileNotFoundError:  # moved from tmp/ to new/ meanwhile: seen under its new name
            continue
        if not matcher.mentions(data):
            continue
        _shred(path, len(data))
        removed += 1
    return removed


def _shred(path: Path, size: int) -> None:
    try:
        with path.open("r+b") as f:
            f.write(b"\0" * size)
            f.flush()
            os.fsync(f.fileno())
        path.unlink()
    except FileNotFoundError:
        return
    _sync_dir(path.parent)


def _sync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
