"""DKIM: every outgoing message is signed (RSA, Ed25519 or both) and verifies with dkimpy."""

import re
from pathlib import Path

import dkim
import pytest
from dkim.util import parse_tag_value
from hypothesis import HealthCheck, example, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from mailer import bootstrap
from mailer.bootstrap import open_mailer
from mailer.cli.main import main
from mailer.config import Settings
from mailer.domain.skeleton import Filled, Skeleton, placeholder
from mailer.services.messages import DATE_SENTINEL
from mailer.services.ports import Signer
from mailer.transport.dkim import DkimSigner, key_from_pem, load_keys, new_private_key
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


# --- campaign copies: canonicalised once per skeleton ------------------------------------

RSA_KEY = key_from_pem(new_private_key("rsa"), "plan")
ED_KEY = key_from_pem(new_private_key("ed25519"), "planed")
SLOTS = {
    "to": placeholder("to", 32) + "@skeleton.invalid",
    "mid": placeholder("mid", 32),
    "date": DATE_SENTINEL,
    "unsub": placeholder("unsub", 40),
}
# Whitespace of every kind relaxed canonicalisation looks at, and QP soft breaks.
WHITESPACE_TEXT = st.lists(
    st.sampled_from(["a", "b", "=", " ", "  ", "\t", "\r\n", "\r\n\r\n"]), max_size=30
).map("".join)
# No CR or LF: slot values in headers are validated to hold none. Mostly values the shortcut
# takes; the rest put whitespace (or nothing) at the start, the end or the middle of one.
CLEAN_VALUE = st.from_regex(r"[xY7@.]+( [xY7@.]+)*", fullmatch=True)
ODD_VALUE = st.builds(
    lambda before, space, after: before + space + after,
    st.sampled_from(["", "x", "x.y"]),
    st.sampled_from(["", " ", "  ", "\t", "\x0b", "\x0c", " \t"]),
    st.sampled_from(["", "Y", "7 Y"]),
)
VALUE = st.one_of(CLEAN_VALUE, CLEAN_VALUE, ODD_VALUE)


def _signer() -> DkimSigner:
    return DkimSigner(DKIM_DOMAIN, [RSA_KEY, ED_KEY], clock=lambda: 1_790_000_000.0)


def _prototype(subject: str, pieces: list[str]) -> bytes:
    """A message with every slot in its headers and the unsubscribe slot around the body."""
    body = SLOTS["unsub"].join(pieces) if len(pieces) > 1 else pieces[0] + SLOTS["unsub"]
    head = (
        f"From: News <news@{DKIM_DOMAIN}>\r\nTo: {SLOTS['to']}\r\nSubject: {subject}\r\n"
        f"Date: {SLOTS['date']}\r\nMessage-ID: <{SLOTS['mid']}@{DKIM_DOMAIN}>\r\n"
        f"List-Unsubscribe: <{SLOTS['unsub']}>\r\nList-Unsubscribe-Post: "
        "List-Unsubscribe=One-Click\r\nX-Mailer:   folded\r\n\tcontinued  \r\n"
    )
    return (head + "\r\n" + body).encode("ascii")


@hypothesis_settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    subject=st.from_regex(r"[A-Za-z][A-Za-z \t]{0,20}", fullmatch=True),
    pieces=st.lists(WHITESPACE_TEXT, min_size=1, max_size=5),
    to=VALUE,
    mid=VALUE,
    unsub=VALUE,
)
@example(subject="A", pieces=["a ", " b"], to="x", mid="y", unsub="")  # "a  b" once filled
@example(subject="A", pieces=["a"], to="x\ty", mid="y", unsub="z")  # a tab becomes a space
def test_a_copy_signed_from_its_skeleton_gets_the_full_signature(
    subject: str, pieces: list[str], to: str, mid: str, unsub: str
) -> None:
    """Whatever the whitespace around the slots and in their values: signing a copy through
    its skeleton gives exactly the bytes of canonicalising it in full (RSA and Ed25519 are
    deterministic), and the shortcut is taken whenever the values allow it."""
    skeleton = Skeleton.split(_prototype(subject, pieces), SLOTS, fixed={})
    values = {
        "to": to.encode(),
        "mid": mid.encode(),
        "date": b"Wed, 25 Nov 2026 03:00:00 +0000",
        "unsub": unsub.encode(),
    }
    data = skeleton.fill(values)
    signer = _signer()
    full = signer.sign(data)
    assert signer.sign(data, Filled(skeleton, values)) == full
    if all(re.fullmatch(rb"[^\s]+( [^\s]+)*", v) for v in values.values()):
        # The shortcut never reads the message bytes: proof that it was taken.
        assert signer.sign(b"", Filled(skeleton, values)) + data == full


async def test_campaign_copies_are_signed_through_the_skeleton_and_verify(
    tmp_path: Path, sink: SinkServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a real send, campaign copies reach the signer with their skeleton, the shortcut is
    taken (it signs without reading the bytes) and the copies verify."""
    shortcuts: list[bool] = []

    def recording(settings: Settings) -> Signer:
        assert settings.dkim_domain
        keys = load_keys(settings.dkim_key_file, settings.dkim_selector)
        real = DkimSigner(settings.dkim_domain, keys, clock=lambda: 1_790_000_000.0)  # one t=
        sign = real.sign

        def sign_and_record(data: bytes, filled: Filled | None = None) -> bytes:
            signed = sign(data, filled)
            if filled is not None:
                shortcuts.append(sign(b"", filled) + data == signed)
            return signed

        real.sign = sign_and_record  # type: ignore[method-assign]
        return real

    monkeypatch.setattr(bootstrap, "_signer", recording)
    settings, records = dkim_settings(tmp_path, sink, ("rsa", "ed25519"))
    publish(records)
    await init_db(settings)
    async with open_mailer(settings, sending=True) as m:
        sent = await send_every_kind(m, sink)
    assert verifies(sent["campaign"].raw) == [True, True]
    assert shortcuts and all(shortcuts)
