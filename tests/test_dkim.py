"""DKIM: every outgoing message is signed (RSA, Ed25519 or both) and verifies with dkimpy."""

import re
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import dkim
import pytest
from dkim.util import parse_tag_value

from mailer.bootstrap import Mailer, open_mailer
from mailer.cli.main import main
from mailer.domain.ledger import Evidence
from mailer.transport.dkim import DkimSigner, key_from_pem, load_keys, new_private_key
from tests.conftest import init_db, make_settings
from tests.databases import active
from tests.harness import Captured, SinkServer, wait_until

DOMAIN = "example.org"
STAFF = Evidence(channel="cli", actor="cli:test")
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


def make_key(tmp_path: Path, algorithm: str, selector: str) -> Path:
    """A 0600 private key file, its public record published in the stub DNS."""
    pem = new_private_key(algorithm)
    path = tmp_path / f"{selector}.pem"
    path.write_bytes(pem)
    path.chmod(0o600)
    DNS[f"{selector}._domainkey.{DOMAIN}"] = key_from_pem(pem, selector).public_record.encode()
    return path


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


async def send_every_kind(m: Mailer, db: Path, sink: SinkServer) -> dict[str, Captured]:
    """A confirmation request, a campaign and a policy announcement, as captured at the sink."""
    list_id = (await m.lists.create("news", "Example News")).id
    await m.consent.request_opt_in("new@example.org", "news", None, STAFF)
    now = datetime.now(UTC).isoformat(sep=" ")
    with active.connect(db) as conn, conn:
        (sid,) = conn.execute(
            "INSERT INTO subscriber (email, email_hash, name, created_at) VALUES (?,?,NULL,?)"
            " RETURNING id",
            ("reader@example.org", m.consent.identify("reader@example.org")[1], now),
        ).fetchone()
        conn.execute(
            "INSERT INTO subscription (subscriber_id, list_id, status, created_at, updated_at,"
            " confirmed_at) VALUES (?,?,'confirmed',?,?,?)",
            (sid, list_id, now, now, now),
        )
    await wait_until(lambda: len(sink.messages) == 1, 10, "the confirmation request")
    cid = await m.campaigns.create("news", "The November issue", "Hello *world*", "campaign")
    await m.campaigns.send(cid)
    await wait_until(lambda: len(sink.messages) == 2, 10, "the campaign")
    await m.policy.publish("2026-12", date.today() + timedelta(days=30), "Shorter.", None)
    await wait_until(lambda: len(sink.messages) == 3, 10, "the announcement")
    return dict(zip(("confirm", "campaign", "announcement"), sink.messages, strict=True))


@pytest.mark.parametrize("algorithms", [("rsa",), ("ed25519",), ("rsa", "ed25519")])
async def test_every_kind_of_message_is_signed_and_verifies(
    tmp_path: Path, sink: SinkServer, algorithms: tuple[str, ...]
) -> None:
    """Each message carries one verifying signature per key, covering and over-signing h=."""
    selectors = [f"{a}sel" for a in algorithms]
    keys = [make_key(tmp_path, a, s) for a, s in zip(algorithms, selectors, strict=True)]
    settings = make_settings(
        tmp_path,
        smtp_host="127.0.0.1",
        smtp_port=sink.port,
        dkim_domain=DOMAIN,
        dkim_selector=",".join(selectors),
        dkim_key_file=",".join(str(k) for k in keys),
    )
    await init_db(settings)
    async with open_mailer(settings, sending=True) as m:
        sent = await send_every_kind(m, tmp_path / "mailer.db", sink)
    expected_a = [b"rsa-sha256" if a == "rsa" else b"ed25519-sha256" for a in algorithms]
    for kind, captured in sent.items():
        raw = captured.raw
        tags = signatures(raw)
        assert [t[b"a"] for t in tags] == expected_a, kind
        assert [t[b"s"].decode() for t in tags] == selectors, kind
        assert all(t[b"d"] == DOMAIN.encode() and t[b"c"] == b"relaxed/relaxed" for t in tags)
        assert verifies(raw) == [True] * len(algorithms), kind
        for t in tags:
            listed = [h.strip().lower() for h in t[b"h"].decode().split(":")]
            for name in COVERED:
                assert listed.count(name) == header_count(raw, name) + 1, (kind, name)
        assert header_count(raw, "list-unsubscribe") == 1 or kind == "confirm"


async def test_tampering_with_signed_headers_breaks_the_signature(
    tmp_path: Path, sink: SinkServer
) -> None:
    """A changed List-Unsubscribe, or one added on top, no longer verifies (over-signing)."""
    key = make_key(tmp_path, "rsa", "tamper")
    settings = make_settings(
        tmp_path,
        smtp_host="127.0.0.1",
        smtp_port=sink.port,
        dkim_domain=DOMAIN,
        dkim_selector="tamper",
        dkim_key_file=str(key),
    )
    await init_db(settings)
    async with open_mailer(settings, sending=True) as m:
        raw = (await send_every_kind(m, tmp_path / "mailer.db", sink))["campaign"].raw
    assert verifies(raw) == [True]
    changed = re.sub(rb"(List-Unsubscribe: <)https?://", rb"\1https://evil.example/", raw)
    assert changed != raw
    assert verifies(changed) == [False]
    head, body = raw.split(b"\r\n\r\n", 1)
    added = head + b"\r\nList-Unsubscribe: <https://evil.example/u>\r\n\r\n" + body
    assert verifies(added) == [False]
    assert verifies(raw.replace(b"Hello", b"Hullo")) == [False]


@pytest.mark.parametrize("algorithm", ["rsa", "ed25519"])
def test_keygen_writes_a_private_key_and_prints_its_dns_record(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], algorithm: str
) -> None:
    """`mailer dkim keygen` writes a 0600 key and a TXT record under which its signatures verify."""
    out = tmp_path / "keys" / "k.pem"
    argv = ["dkim", "keygen", "--selector", "s2026", "--algorithm", algorithm]
    assert main([*argv, "--domain", DOMAIN, "--out", str(out)]) == 0
    line = capsys.readouterr().out.strip()
    name, _, rest = line.partition(" IN TXT ")
    assert name == f"s2026._domainkey.{DOMAIN}"
    record = "".join(re.findall(r'"([^"]*)"', rest))
    assert record.startswith(f"v=DKIM1; k={algorithm}; p=")
    assert out.stat().st_mode & 0o777 == 0o600
    DNS[name] = record.encode()
    signer = DkimSigner(DOMAIN, load_keys([out], ["s2026"]))
    message = b"From: a@example.org\r\nTo: b@example.net\r\nSubject: hi\r\n\r\nHello\r\n"
    assert verifies(signer.sign(message)) == [True]
    before = out.read_bytes()
    assert main([*argv, "--domain", DOMAIN, "--out", str(out)]) != 0
    assert out.read_bytes() == before
