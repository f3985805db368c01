"""DKIM: every outgoing message is signed (RSA, Ed25519 or both) and verifies with dkimpy."""

import re
from pathlib import Path

import dkim
import pytest
from dkim.util import parse_tag_value

from mailer.bootstrap import open_mailer
from mailer.cli.main import main
from mailer.transport.dkim import DkimSigner, load_keys
from tests.conftest import DKIM_DOMAIN, dkim_settings, init_db, send_every_kind
from tests.harness import SinkServer

COVERED = (
    "from",
    "to",
    "subject",
    "date",
    "message-id",
    "list-id",
    "list-unsubscribe",
    "list-unsubscribe-post",
)
DNS: dict[str, bytes] = {}


def dns(name: bytes, timeout: int = 5) -> bytes:
    """A stub resolver: the TXT records the tests 'published'."""
    return DNS.get(name.decode("ascii").rstrip("."), b"")


def publish(records: dict[str, str]) -> None:
    DNS.update((name, value.encode()) for name, value in records.items())


def signatures(raw: bytes) -> list[dict[bytes, bytes]]:
    d = dkim.DKIM(raw)
    return [parse_tag_value(v) for n, v in d.headers if n.lower() == b"dkim-signature"]


def verifies(raw: bytes) -> list[bool]:
    """dkimpy's verdict on each DKIM-Signature of a message, in order."""
    d = dkim.DKIM(raw)
    verdicts = []
    for i in range(len(signatures(raw))):
        try:
            verdicts.append(bool(d.verify(idx=i, dnsfunc=dns)))
        except dkim.DKIMException:
            verdicts.append(False)
    return verdicts


def header_count(raw: bytes, name: str) -> int:
    head = raw.split(b"\r\n\r\n", 1)[0].decode("ascii", "replace")
    return len(re.findall(rf"^{re.escape(name)}:", head, flags=re.IGNORECASE | re.MULTILINE))


@pytest.mark.parametrize("algorithms", [("rsa",), ("ed25519",), ("rsa", "ed25519")])
async def test_every_kind_of_message_is_signed_and_verifies(
    tmp_path: Path, sink: SinkServer, algorithms: tuple[str, ...]
) -> None:
    """Each message carries one verifying signature per key, covering and over-signing h=."""
    selectors = [f"{a}sel" for a in algorithms]
    settings, records = dkim_settings(tmp_path, sink, algorithms)
    publish(records)
    await init_db(settings)
    async with open_mailer(settings, sending=True) as m:
        sent = await send_every_kind(m, sink)
    expected_a = [b"rsa-sha256" if a == "rsa" else b"ed25519-sha256" for a in algorithms]
    for kind, captured in sent.items():
        raw = captured.raw
        tags = signatures(raw)
        assert [t[b"a"] for t in tags] == expected_a, kind
        assert [t[b"s"].decode() for t in tags] == selectors, kind
        assert all(t[b"d"] == DKIM_DOMAIN.encode() and t[b"c"] == b"relaxed/relaxed" for t in tags)
        assert verifies(raw) == [True] * len(algorithms), kind
        for t in tags:
            listed = [h.strip().lower() for h in t[b"h"].decode().split(":")]
            for name in COVERED:
                assert listed.count(name) == header_count(raw, name) + 1, (kind, name)
        assert header_count(raw, "list-unsubscribe") == 1 or kind == "confirm"


async def test_tampering_with_signed_headers_breaks_the_signature(
    tmp_path: Path, sink: SinkServer
) -> None:
    """A changed List-Unsubscribe, or one added below or above it, no longer verifies; above
    is caught only by over-signing (verifiers read the bottom-most copy first)."""
    settings, records = dkim_settings(tmp_path, sink, ("rsa",))
    publish(records)
    await init_db(settings)
    async with open_mailer(settings, sending=True) as m:
        raw = (await send_every_kind(m, sink))["campaign"].raw
    assert verifies(raw) == [True]
    changed = re.sub(rb"(List-Unsubscribe: <)https?://", rb"\1https://evil.example/", raw)
    assert changed != raw
    assert verifies(changed) == [False]
    head, body = raw.split(b"\r\n\r\n", 1)
    evil = b"List-Unsubscribe: <https://evil.example/u>"
    assert verifies(head + b"\r\n" + evil + b"\r\n\r\n" + body) == [False]
    assert verifies(evil + b"\r\n" + raw) == [False], "not over-signed"
    assert verifies(raw.replace(b"Hello", b"Hullo")) == [False]


@pytest.mark.parametrize("algorithm", ["rsa", "ed25519"])
def test_keygen_writes_a_private_key_and_prints_its_dns_record(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], algorithm: str
) -> None:
    """`mailer dkim keygen` writes a 0600 key and a TXT record under which its signatures verify."""
    out = tmp_path / "keys" / "k.pem"
    argv = ["dkim", "keygen", "--selector", "s2026", "--algorithm", algorithm]
    assert main([*argv, "--domain", DKIM_DOMAIN, "--out", str(out)]) == 0
    line = capsys.readouterr().out.strip()
    name, _, rest = line.partition(" IN TXT ")
    assert name == f"s2026._domainkey.{DKIM_DOMAIN}"
    record = "".join(re.findall(r'"([^"]*)"', rest))
    assert record.startswith(f"v=DKIM1; k={algorithm}; p=")
    assert out.stat().st_mode & 0o777 == 0o600
    DNS[name] = record.encode()
    signer = DkimSigner(DKIM_DOMAIN, load_keys([out], ["s2026"]))
    message = b"From: a@example.org\r\nTo: b@example.net\r\nSubject: hi\r\n\r\nHello\r\n"
    assert verifies(signer.sign(message)) == [True]
    before = out.read_bytes()
    assert main([*argv, "--domain", DKIM_DOMAIN, "--out", str(out)]) != 0
    assert out.read_bytes() == before
