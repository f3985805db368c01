"""Per-campaign message skeletons: flatten a message once, then fill in each recipient.

Building and encoding an ``EmailMessage`` costs about a millisecond; a campaign sends the
same message to everyone but for a few values (To, Message-ID, Date, the unsubscribe URL).
So the message is composed once with *placeholders* in those places and split into literal
byte segments and slots; filling a slot is a byte join.

Encodings stay correct because a placeholder has exactly the length of the value that will
replace it wherever a transfer encoding could wrap lines (the bodies): a quoted-printable
soft break (``=\\r\\n``) then falls at the same offset for the real value, and the skeleton
keeps it there. Placeholder characters are letters and digits, which every encoding keeps
literally. Header slots may vary in length: headers are never folded (lines are limited
only by RFC 5322's 998 octets), and slot values are validated to hold no CR or LF.
"""

import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

SOFT_BREAK = b"=\r\n"


@dataclass(frozen=True, slots=True)
class Cut:
    """Bytes ``start:end`` of the value of slot ``name``."""

    name: str
    start: int
    end: int | None


Segment = bytes | Cut


def placeholder(name: str, length: int) -> str:
    """A string of ``length`` letters and digits that cannot occur by accident."""
    stem = f"SLOT{name.upper()}{secrets.token_hex(8).upper()}"
    if length < len(stem):
        raise ValueError(f"slot {name!r} needs at least {len(stem)} characters")
    return (stem + "Q" * length)[:length]


def _pattern(text: str) -> re.Pattern[bytes]:
    soft = b"(?:" + re.escape(SOFT_BREAK) + b")?"
    return re.compile(soft.join(re.escape(ch.encode("ascii")) for ch in text))


class Skeleton:
    """A flattened message with holes; ``fill`` makes one recipient's copy."""

    def __init__(
        self, segments: list[Segment], fixed: Mapping[str, int], placeholders: Mapping[str, str]
    ) -> None:
        self.segments = tuple(segments)
        self.fixed = dict(fixed)
        self.placeholders = dict(placeholders)
        """What each slot held in the prototype (filled in, ASCII-encoded, they give it back)."""

    @classmethod
    def split(
        cls,
        prototype: bytes,
        placeholders: Mapping[str, str],
        fixed: Mapping[str, int],
        *,
        every: bool = True,
    ) -> "Skeleton":
        """Cut ``prototype`` at every occurrence of each placeholder.

        ``fixed`` names the slots whose values must keep the placeholder's length (those that
        appear inside encoded bodies). With ``every``, each placeholder must occur at least once.
        """
        spans: list[tuple[int, int, str]] = []
        for name, text in placeholders.items():
            found = [(m.start(), m.end(), name) for m in _pattern(text).finditer(prototype)]
            if not found and every:
                raise ValueError(f"placeholder for {name!r} does not occur in the message")
            spans.extend(found)
        spans.sort()
        segments: list[Segment] = []
        at = 0
        for start, end, name in spans:
            if start < at:
                raise ValueError("placeholders overlap")
            if start > at:
                segments.append(prototype[at:start])
            segments.extend(_cuts(prototype[start:end], name))
            at = end
        if at < len(prototype):
            segments.append(prototype[at:])
        return cls(segments, fixed, placeholders)

    def fits(self, values: Mapping[str, bytes]) -> bool:
        """True when every fixed-length slot gets a value of exactly its length."""
        return all(len(values[name]) == length for name, length in self.fixed.items())

    def fill(self, values: Mapping[str, bytes]) -> bytes:
        """One recipient's message. Call ``fits`` first for values of uncertain length."""
        return b"".join(
            seg if isinstance(seg, bytes) else values[seg.name][seg.start : seg.end]
            for seg in self.segments
        )


@dataclass(frozen=True, slots=True)
class Filled:
    """How a message was made: ``skeleton.fill(values)``. Work done once per skeleton (a DKIM
    signer's canonical forms) can be reused for every copy."""

    skeleton: Skeleton
    values: Mapping[str, bytes]


def _cuts(matched: bytes, name: str) -> list[Segment]:
    """Turn one placeholder occurrence (maybe with soft breaks inside) into cuts and breaks."""
    pieces = matched.split(SOFT_BREAK)
    if len(pieces) == 1:
        return [Cut(name, 0, None)]
    out: list[Segment] = []
    offset = 0
    for i, piece in enumerate(pieces):
        if i:
            out.append(SOFT_BREAK)
        out.append(Cut(name, offset, offset + len(piece)))
        offset += len(piece)
    return out
