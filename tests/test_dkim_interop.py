"""DKIM interoperability: every kind of message, as the sink received it, verifies with an
independent implementation, OpenDKIM's libopendkim (see ``tests/libopendkim.py``).

The public keys come from a file the test writes (libopendkim's file query method), never
from DNS. Without libopendkim (Debian ``opendkim-tools`` / ``libopendkim11``) the module is
skipped, unless DKIM_INTEROP_TESTS=required (set by .ci/run).
"""

import os
import re
from pathlib import Path

import pytest

from mailer.bootstrap import open_mailer
from tests import libopendkim
from tests.conftest import dkim_key, dkim_settings, init_db, send_every_kind
from tests.harness import SinkServer

if libopendkim.LIBRARY is None:
    reason = "libopendkim is not installed: apt-get install opendkim-tools"
    if os.environ.get("DKIM_INTEROP_TESTS") == "required":
        pytest.fail(f"{reason} (DKIM_INTEROP_TESTS=required)", pytrace=False)
    pytest.skip(reason, allow_module_level=True)

EVIL = b"List-Unsubscribe: <https://evil.example/u>"
ALGORITHM = {"rsa": "rsa-sha256", "ed25519": "ed25519-sha256"}


@pytest.mark.parametrize("algorithms", [("rsa",), ("ed25519",), ("rsa", "ed25519")])
async def test_every_kind_of_message_verifies_with_opendkim(
    tmp_path: Path, sink: SinkServer, algorithms: tuple[str, ...]
) -> None:
    """RSA-2048, Ed25519 and dual signatures on the confirmation request, campaign, preview
    and announcement each pass libopendkim; tampering fails it (over-signed headers included),
    and so does a published record of another key, or none."""
    settings, records = dkim_settings(tmp_path, sink, algorithms)
    await init_db(settings)
    async with open_mailer(settings, sending=True) as m:
        sent = await send_every_kind(m, sink)
    assert list(sent) == ["confirm", "campaign", "preview", "announcement"]
    expected = sorted((f"{a}sel", ALGORITHM[a]) for a in algorithms)
    for kind, captured in sent.items():
        verdicts = libopendkim.verify(captured.raw, records, tmp_path)
        assert sorted((v.selector, v.algorithm) for v in verdicts) == expected, kind
        assert all(v.verified for v in verdicts), (kind, verdicts)

    raw = sent["campaign"].raw
    head, body = raw.split(b"\r\n\r\n", 1)
    tampered = {
        "a changed List-Unsubscribe": re.sub(
            rb"(List-Unsubscribe: <)https?://", rb"\1https://evil.example/", raw
        ),
        "a changed Subject": raw.replace(b"Subject: The November", b"Subject: The Nevember"),
        "a List-Unsubscribe added below": head + b"\r\n" + EVIL + b"\r\n\r\n" + body,
        # verifiers read the bottom-most copy first: only over-signing catches one above
        "a List-Unsubscribe added above": EVIL + b"\r\n" + raw,
        "a changed body": raw.replace(b"Hello", b"Hullo"),
    }
    for change, changed in tampered.items():
        assert changed != raw, change
        verdicts = libopendkim.verify(changed, records, tmp_path)
        assert len(verdicts) == len(algorithms), change
        assert not any(v.verified for v in verdicts), (change, verdicts)

    other = tmp_path / "other"
    other.mkdir()
    wrong = dict(dkim_key(other, a, f"{a}sel")[1:] for a in algorithms)
    assert wrong.keys() == records.keys() and wrong != records
    for published in (wrong, {}):
        verdicts = libopendkim.verify(raw, published, tmp_path)
        assert len(verdicts) == len(algorithms) and not any(v.verified for v in verdicts)
