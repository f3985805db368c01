"""``mailer doctor``: the compliance self-test passes on a configured installation, names the
failing row otherwise, and never touches the live data or relay."""

import asyncio
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import dkim
import pytest

from mailer.cli import doctor as doctor_cli
from mailer.cli.main import main
from mailer.config import PACKAGE_TEMPLATES, Settings, load_settings
from mailer.domain.compose import Envelope, Rendered, compose
from mailer.domain.inbound import InboundAddresses
from mailer.domain.tokens import RowTokens
from mailer.services import doctor as doctor_checks
from mailer.services.doctor import (
    DKIM_COVERS,
    Expected,
    TxtLookup,
    dkim_keys,
    dkim_problems,
    dns_records,
    inbound_problems,
    message_problems,
)
from mailer.transport.dkim import DkimSigner, key_from_pem, load_keys, new_private_key
from mailer.transport.dns import DnsUnavailable
from tests.conftest import DKIM_DOMAIN, dkim_key, sqlite_only
from tests.databases import active
from tests.harness import SinkServer, query, snapshot

ORG = {
    "MAILER_ORG_NAME": "Föreningen Exempel & Co",
    "MAILER_ORG_ADDRESS": "Storgatan 1, 111 22 Stockholm",
    "MAILER_PRIVACY_CONTACT": "dpo@forening.se",
    "MAILER_FROM": "nyheter@forening.se",
}
BASE_URL = "https://lists.example.net"
ANNOUNCES = (PACKAGE_TEMPLATES / "email" / "announcement.txt.j2").is_file()
ALWAYS_PASS = [
    "configuration",
    "organisation details",
    "sender address",
    "base URL",
    "signing keys",
    "secret key file",
    "data directory",
    "database",
    "templates",
    "message: confirmation request",
    "confirm link: GET changes nothing",
    "confirm link: POST confirms",
    "message: campaign",
    *(["message: announcement"] if ANNOUNCES else []),
    "unsubscribe link: GET changes nothing",
    "one-click POST (urlencoded)",
    "one-click POST (multipart)",
]

Rows = dict[str, tuple[str, str]]


@dataclass
class Live:
    """A live installation in a temporary directory, driven through the real CLI."""

    root: Path
    capsys: pytest.CaptureFixture[str]

    @property
    def var(self) -> Path:
        return self.root / "var"

    @property
    def db(self) -> Path:
        return self.var / "mailer.db"

    async def run(self, *args: str) -> tuple[int, str, str]:
        """``mailer ARGS`` in-process, on a thread of its own (it runs its own event loop)."""
        code = await asyncio.to_thread(main, list(args))
        out = self.capsys.readouterr()
        return code, out.out, out.err

    async def doctor(self) -> tuple[int, Rows]:
        code, out, _ = await self.run("doctor", "--json")
        report = json.loads(out)
        assert report["ok"] is (code == 0)
        rows = {c["name"]: (c["status"], c["detail"]) for c in report["checks"]}
        assert len(rows) == len(report["checks"]), "row names are unique"
        return code, rows


def failing(rows: Rows) -> list[str]:
    return [name for name, (status, _) in rows.items() if status == "fail"]


@pytest.fixture
async def live(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Live:
    """An initialised installation with organisation settings of its own and some data."""
    for name in [k for k in os.environ if k.startswith("MAILER_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MAILER_VAR_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("MAILER_DATABASE_URL", active.url(tmp_path / "var" / "mailer.db"))
    monkeypatch.setenv("MAILER_BASE_URL", BASE_URL)
    for name, value in ORG.items():
        monkeypatch.setenv(name, value)
    installation = Live(tmp_path, capsys)
    for args in (
        ("init",),
        ("list", "create", "news", "--name", "News"),
        ("subscriber", "add", "ann@forening.se", "--list", "news"),
        ("apikey", "create", "website"),
    ):
        code, _, err = await installation.run(*args)
        assert code == 0, err
    return installation


async def test_passes_and_leaves_the_live_installation_alone(
    live: Live, sink: SinkServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A configured installation passes every row; live rows and the live relay stay untouched."""
    monkeypatch.setenv("MAILER_SMTP_HOST", "127.0.0.1")
    monkeypatch.setenv("MAILER_SMTP_PORT", str(sink.port))
    before = snapshot(live.db)
    assert query(live.db, "SELECT kind, status FROM outbox") == [("confirm", "queued")]

    code, rows = await live.doctor()

    assert code == 0, rows
    assert {name: rows[name][0] for name in ALWAYS_PASS} == dict.fromkeys(ALWAYS_PASS, "pass")
    assert rows["DKIM"] == ("skip", rows["DKIM"][1]) and "not configured" in rows["DKIM"][1]
    assert set(rows) == {*ALWAYS_PASS, "DKIM"}
    assert snapshot(live.db) == before
    assert sink.events == [], "the live relay was contacted"
    assert not (live.var / "outbox").exists()
    assert sorted(p.name for p in live.var.iterdir() if not p.name.startswith("mailer.db")) == [
        "secret_keys"
    ]


async def test_table_output_names_each_check(live: Live) -> None:
    """Without --json: a table with one line per check and the verdict; exit 0 when all pass."""
    code, out, err = await live.run("doctor")
    assert code == 0, out + err
    assert out.startswith("mailer doctor\n")
    for name in ALWAYS_PASS:
        [line] = [line for line in out.splitlines() if f"│ {name} " in line]
        assert "│ pass " in line, line
    assert "all checks passed" in out.splitlines()[-1]


async def test_templates_without_the_unsubscribe_link_fail(
    live: Live, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Templates whose text footer lacks the link fail the templates row, and the live send
    path refuses the message (G3), which the confirmation-request row reports."""
    templates = tmp_path / "templates"
    shutil.copytree(PACKAGE_TEMPLATES, templates)
    base = templates / "email" / "base.txt.j2"
    kept = [line for line in base.read_text().splitlines() if "unsubscribe_url" not in line]
    base.write_text("\n".join(kept) + "\n")
    monkeypatch.setenv("MAILER_TEMPLATES_DIR", str(templates))

    code, rows = await live.doctor()

    assert code == 1
    status, detail = rows["templates"]
    assert status == "fail"
    assert "confirm: the text part does not show the unsubscribe link" in detail
    assert "campaign: the text part does not show the unsubscribe link" in detail
    status, detail = rows["message: confirmation request"]
    assert status == "fail"
    assert "not sent: the text part does not show the unsubscribe link" in detail
    assert failing(rows) == ["templates", "message: confirmation request", "message: campaign"]
    assert "refused: the text part does not show" in rows["message: campaign"][1]
    assert rows["organisation details"][0] == rows["database"][0] == "pass"


@pytest.mark.parametrize(
    ("unset", "row"),
    [
        ("MAILER_ORG_NAME", "organisation details"),
        ("MAILER_PRIVACY_CONTACT", "organisation details"),
        ("MAILER_FROM", "sender address"),
    ],
)
async def test_example_values_fail(
    live: Live, monkeypatch: pytest.MonkeyPatch, unset: str, row: str
) -> None:
    """A setting left at its example value fails its row, named in the detail; nothing else."""
    monkeypatch.delenv(unset)
    code, rows = await live.doctor()
    assert code == 1
    assert failing(rows) == [row]
    assert unset in rows[row][1] and "example value" in rows[row][1]
    assert rows["message: confirmation request"][0] == "pass"


async def test_all_example_org_values_fail_in_the_table(
    live: Live, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shipped example organisation fails its row in the table, and the exit code is 1."""
    for name in ("MAILER_ORG_NAME", "MAILER_ORG_ADDRESS", "MAILER_PRIVACY_CONTACT"):
        monkeypatch.delenv(name)
    code, out, _ = await live.run("doctor")
    assert code == 1
    [line] = [line for line in out.splitlines() if "│ organisation details " in line]
    assert "│ fail " in line and "MAILER_ORG_NAME" in line
    assert out.splitlines()[-1].startswith("FAILED")


async def test_group_readable_key_file_fails(live: Live) -> None:
    """A secret key file others can read fails its row (the keys themselves still work)."""
    key_file = live.var / "secret_keys"
    key_file.chmod(0o640)
    code, rows = await live.doctor()
    assert code == 1
    assert failing(rows) == ["secret key file"]
    assert "0640" in rows["secret key file"][1] and "chmod 600" in rows["secret key file"][1]
    assert rows["signing keys"][0] == "pass"


@sqlite_only
async def test_database_readable_by_others_fails(live: Live) -> None:
    """Personal data in a database file others can read fails the data directory row."""
    live.db.chmod(0o644)
    code, rows = await live.doctor()
    assert code == 1
    assert failing(rows) == ["data directory"]
    assert f"{live.db} (0644)" in rows["data directory"][1]


@pytest.mark.parametrize(
    ("base_url", "status", "code"),
    [
        ("http://lists.example.net", "fail", 1),
        ("http://127.0.0.1:8080", "warn", 0),
        ("https://example.net/lists", "pass", 0),
    ],
)
async def test_base_url_must_be_https_unless_loopback(
    live: Live, monkeypatch: pytest.MonkeyPatch, base_url: str, status: str, code: int
) -> None:
    """Plain http fails unless on loopback (a warning); a path prefix works end to end."""
    monkeypatch.setenv("MAILER_BASE_URL", base_url)
    got, rows = await live.doctor()
    assert (got, rows["base URL"][0]) == (code, status)
    assert failing(rows) == (["base URL"] if status == "fail" else [])
    assert rows["one-click POST (urlencoded)"][0] == "pass"


async def test_with_inbound_mail_on_each_message_offers_mailto_and_a_verp_sender(
    live: Live, sink: SinkServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The message rows also check the mailto: entry and the envelope sender; the private
    instance does not bind the live inbound port."""
    monkeypatch.setenv("MAILER_SMTP_HOST", "127.0.0.1")
    monkeypatch.setenv("MAILER_SMTP_PORT", str(sink.port))
    monkeypatch.setenv("MAILER_INBOUND_PORT", str(sink.port))  # taken: doctor must not bind it
    monkeypatch.setenv("MAILER_BOUNCE_DOMAIN", "bounces.forening.se")
    code, rows = await live.doctor()
    assert code == 0, rows
    for name in ("message: confirmation request", "message: campaign"):
        assert rows[name][0] == "pass" and "mailto:" in rows[name][1], rows[name]


async def test_several_signing_keys_pass(live: Live, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keys from MAILER_SECRET_KEYS: the first signs, every key verifies; no key file needed."""
    monkeypatch.setenv("MAILER_SECRET_KEYS", f"{'n' * 40},{'o' * 40}")
    code, rows = await live.doctor()
    assert code == 0, rows
    assert rows["signing keys"] == ("pass", rows["signing keys"][1])
    assert "all 2 verify" in rows["signing keys"][1]
    assert rows["secret key file"][0] == "skip"


async def test_missing_database_fails_and_is_not_created(
    live: Live, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database that does not exist fails the database row; the doctor does not create it."""
    missing = tmp_path / "elsewhere" / "mailer.db"
    monkeypatch.setenv("MAILER_DATABASE_URL", f"sqlite+aiosqlite:///{missing}")
    code, rows = await live.doctor()
    assert code == 1
    assert failing(rows) == ["database"]
    assert "mailer init" in rows["database"][1]
    assert not missing.parent.exists()


async def test_bad_configuration_is_one_failing_row(
    live: Live, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Settings that do not load give one failing configuration row naming the setting."""
    monkeypatch.setenv("MAILER_HTTP_PORT", "eighty")
    code, rows = await live.doctor()
    assert code == 1
    assert list(rows) == ["configuration"]
    assert rows["configuration"][0] == "fail" and "MAILER_HTTP_PORT" in rows["configuration"][1]


# -- the message checks themselves, on bytes from the real compose step --------------------

FOOTER = {
    "org_name": "Föreningen Exempel & Co",
    "org_address": "Storgatan 1",
    "privacy_contact": "dpo@forening.se",
}
UNSUBSCRIBE = f"{BASE_URL}/unsubscribe/abc.def"


def footer_settings() -> Settings:
    return load_settings(environ={}, base_url=BASE_URL, **FOOTER)


def message_bytes(html_footer: bool = True) -> bytes:
    footer = f"{FOOTER['org_name']}, {FOOTER['org_address']}, {FOOTER['privacy_contact']}"
    html_tail = footer.replace("&", "&amp;") if html_footer else FOOTER["org_name"]
    rendered = Rendered(
        subject="Hello",
        text=f"Hello.\n--\n{footer}\nUnsubscribe: {UNSUBSCRIBE}\n",
        html=f'<p>Hello.</p><p>{html_tail}</p><a href="{UNSUBSCRIBE}">{UNSUBSCRIBE}</a>',
    )
    envelope = Envelope(
        from_name="News",
        from_addr="nyheter@forening.se",
        to_addr="ann@forening.se",
        list_id='"News" <news.forening.se>',
        unsubscribe_url=UNSUBSCRIBE,
        message_id="<1.abc@forening.se>",
        date="Mon, 01 Jun 2026 10:00:00 +0000",
    )
    return compose(envelope, rendered)


def problems_of(raw: bytes) -> list[str]:
    return message_problems(raw, Expected(BASE_URL, "ann@forening.se", footer_settings()))


def test_a_composed_message_has_no_problems() -> None:
    """What compose produces passes every check of the message rows."""
    assert problems_of(message_bytes()) == []


@pytest.mark.parametrize(
    ("old", "new", "problem"),
    [
        (b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n", b"", "0 List-Unsubscribe-Post"),
        (
            f"<{UNSUBSCRIBE}>".encode(),
            f"=?utf-8?q?<{UNSUBSCRIBE}>?=".encode(),
            "List-Unsubscribe is RFC 2047-encoded",
        ),
        (
            f"List-Unsubscribe: <{UNSUBSCRIBE}>".encode(),
            b"List-Unsubscribe: <http://elsewhere.example/unsubscribe/x>",
            f"List-Unsubscribe has no <{BASE_URL}/unsubscribe/...> URL",
        ),
        (b"List-Id: ", b"X-List-Id: ", "0 List-Id headers"),
        (b"To: ann@forening.se", b"To: bob@forening.se", "To is ['bob@forening.se']"),
        (b"multipart/alternative", b"multipart/mixed", "not multipart/alternative"),
    ],
)
def test_each_missing_part_is_named(old: bytes, new: bytes, problem: str) -> None:
    """A message lacking a required header or part is reported with what is wrong."""
    raw = message_bytes()
    assert old in raw
    found = problems_of(raw.replace(old, new, 1))
    assert any(p.startswith(problem) for p in found), found


def test_footer_missing_from_html_is_named() -> None:
    """An HTML part without the postal address and privacy contact fails, naming both."""
    assert problems_of(message_bytes(html_footer=False)) == [
        "the HTML part does not show the postal address",
        "the HTML part does not show the privacy contact",
    ]


# -- DKIM and the DNS records ----------------------------------------------------------------

SELECTORS = ("rsasel", "ed25519sel")


def dkim_footer_settings(tmp_path: Path, **overrides: str) -> tuple[Settings, dict[str, str]]:
    """Footer settings that sign with an RSA and an Ed25519 key; and their TXT records."""
    keys = [dkim_key(tmp_path, a, s) for a, s in zip(("rsa", "ed25519"), SELECTORS, strict=True)]
    values = {
        "base_url": BASE_URL,
        **FOOTER,
        "dkim_domain": DKIM_DOMAIN,
        "dkim_selector": ",".join(SELECTORS),
        "dkim_key_file": ",".join(str(path) for path, _, _ in keys),
    }
    settings = load_settings(environ={}, **(values | overrides))
    return settings, {name: record for _, name, record in keys}


def signed_by(tmp_path: Path, settings: Settings) -> bytes:
    """A composed message signed by the mailer's own signer with the configured key files."""
    keys = load_keys(settings.dkim_key_file, settings.dkim_selector)
    return DkimSigner(DKIM_DOMAIN, keys).sign(message_bytes())


def test_dkim_check_verifies_each_signature_with_the_key_files(tmp_path: Path) -> None:
    """Dual-signed by the configured keys: no problem. Signed by other keys under the same
    selectors (the key file is not the signing key), or by one key only: each is named."""
    settings, _ = dkim_footer_settings(tmp_path)
    keys = dkim_keys(settings)
    good = signed_by(tmp_path, settings)
    assert dkim_problems(good, settings, keys) == []
    assert doctor_checks.dkim(settings, {"campaign": good}).status == "pass"

    other = tmp_path / "other"
    other.mkdir()
    impostor, _ = dkim_footer_settings(other)
    wrong = signed_by(other, impostor)
    assert dkim_problems(wrong, settings, keys) == [
        f"DKIM s={s}: does not verify with the public key of its key file" for s in SELECTORS
    ]
    row = doctor_checks.dkim(settings, {"campaign": good, "announcement": wrong})
    assert row.status == "fail" and row.detail.startswith("announcement: DKIM s=rsasel")

    one = DkimSigner(DKIM_DOMAIN, load_keys(settings.dkim_key_file[:1], SELECTORS[:1]))
    assert dkim_problems(one.sign(message_bytes()), settings, keys) == [
        "no DKIM signature for selector ed25519sel"
    ]
    assert dkim_problems(message_bytes(), settings, keys) == ["no DKIM-Signature"]


OVER_SIGN = "h= does not over-sign {} (a copy could be added after signing)"


@pytest.mark.parametrize(
    ("include", "problems"),
    [
        (
            DKIM_COVERS[:-1],
            [
                "h= does not cover list-unsubscribe-post",
                OVER_SIGN.format(", ".join(DKIM_COVERS[:-1])),
            ],
        ),
        (DKIM_COVERS, [OVER_SIGN.format(", ".join(DKIM_COVERS))]),
        (DKIM_COVERS + DKIM_COVERS, []),
    ],
)
def test_dkim_check_wants_every_header_covered_and_over_signed(
    tmp_path: Path, include: tuple[str, ...], problems: list[str]
) -> None:
    """A signature (here dkimpy's own) that verifies but leaves a header out, or signs each
    only once so a copy could be added after signing, is named; listing each twice passes."""
    settings, _ = dkim_footer_settings(tmp_path)
    keys = {"rsasel": dkim_keys(settings)["rsasel"]}
    pem = settings.dkim_key_file[0].read_bytes()
    headers = [h.encode() for h in include]
    raw = message_bytes()
    signature = dkim.sign(raw, b"rsasel", DKIM_DOMAIN.encode(), pem, include_headers=headers)
    assert dkim_problems(signature + raw, settings, keys) == [
        f"DKIM s=rsasel: {p}" for p in problems
    ]


def test_inbound_problems_are_named() -> None:
    """With inbound mail on: a genuine mailto: after the https URL, a genuine VERP sender,
    both naming the same message."""
    inbound = InboundAddresses(RowTokens(["k"]), "bounces.forening.se")
    mailto = inbound.unsubscribe_mailto(5)
    raw = message_bytes().replace(
        f"List-Unsubscribe: <{UNSUBSCRIBE}>".encode(),
        f"List-Unsubscribe: <{UNSUBSCRIBE}>, <{mailto}>".encode(),
    )
    assert inbound_problems(raw, inbound.bounce(5), inbound) == []
    assert inbound_problems(message_bytes(), inbound.bounce(5), inbound) == [
        "List-Unsubscribe offers no mailto: address"
    ]
    assert inbound_problems(raw, "nyheter@forening.se", inbound) == [
        "the envelope sender is not a genuine bounces+TOKEN@bounces.forening.se"
    ]
    assert inbound_problems(raw, inbound.bounce(6), inbound) == [
        "the mailto: address and the envelope sender name different messages"
    ]
    forged = raw.replace(mailto.encode(), mailto.replace("-", "-x", 1).encode())
    assert inbound_problems(forged, inbound.bounce(5), inbound) == [
        "the mailto: entry is not a genuine unsubscribe+TOKEN@bounces.forening.se"
        "?subject=unsubscribe"
    ]
    swapped = message_bytes().replace(
        f"List-Unsubscribe: <{UNSUBSCRIBE}>".encode(),
        f"List-Unsubscribe: <{mailto}>, <{UNSUBSCRIBE}>".encode(),
    )
    assert inbound_problems(swapped, inbound.bounce(5), inbound) == [
        "List-Unsubscribe lists the mailto: address before the https URL"
    ]


def stub_dns(published: dict[str, str] | None) -> TxtLookup:
    """A TXT resolver serving ``published``; ``None``: DNS cannot be reached at all."""

    async def lookup(name: str) -> str | None:
        if published is None:
            raise DnsUnavailable("Timeout: no answer")
        return published.get(name)

    return lookup


async def test_published_dkim_records_are_compared_with_the_keys(tmp_path: Path) -> None:
    """The same keys published: pass; another key: fail; nothing: warn; no DNS: skip, with
    "could not look up" (never a failure)."""
    settings, records = dkim_footer_settings(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    _, others = dkim_footer_settings(other)
    rsa_name = f"rsasel._domainkey.{DKIM_DOMAIN}"
    cases = [
        (records, "pass", f"{rsa_name}, ed25519sel._domainkey.example.org: published, the key"),
        (
            {**records, rsa_name: others[rsa_name]},
            "fail",
            f"another key than the key file's is published at {rsa_name}:",
        ),
        (
            {rsa_name: records[rsa_name]},
            "warn",
            "not published yet: ed25519sel._domainkey.example.org;",
        ),
        (None, "skip", f"could not look up {rsa_name} (Timeout: no answer)"),
    ]
    for published, status, detail in cases:
        row = await doctor_checks.dkim_dns(settings, stub_dns(published))
        assert (row.name, row.status) == ("DKIM DNS records", status), row
        assert row.detail.startswith(detail), row.detail
    # the same key with other spacing and extra tags (t=y: testing) still matches
    spaced = {n: v.replace(";", " ; ").replace("p=", "p= ") + "; t=y" for n, v in records.items()}
    assert (await doctor_checks.dkim_dns(settings, stub_dns(spaced))).status == "pass"


@pytest.mark.parametrize(
    ("relay", "spf"),
    [
        ("smtp.relay.example", "v=spf1 mx a:smtp.relay.example ~all"),
        ("192.0.2.25", "v=spf1 mx ip4:192.0.2.25 ~all"),
        ("2001:db8::25", "v=spf1 mx ip6:2001:db8::25 ~all"),
        ("127.0.0.1", "v=spf1 mx ~all"),
    ],
)
def test_dns_records_to_publish(tmp_path: Path, relay: str, spf: str) -> None:
    """The DKIM record per selector exactly as the key file's, SPF naming the relay, DMARC
    starting at p=none; a DKIM domain that does not align with From is pointed out."""
    settings, records = dkim_footer_settings(tmp_path, smtp_host=relay)
    found = dns_records(settings)
    assert [(r.name, r.type) for r in found] == [
        (f"rsasel._domainkey.{DKIM_DOMAIN}", "TXT"),
        (f"ed25519sel._domainkey.{DKIM_DOMAIN}", "TXT"),
        ("example.org", "TXT"),
        ("_dmarc.example.org", "TXT"),
    ]
    assert {r.name: r.value for r in found[:2]} == records
    assert found[0].value.startswith("v=DKIM1; k=rsa; p=")
    assert found[1].value.startswith("v=DKIM1; k=ed25519; p=")
    assert found[2].value == spf and found[2].note.startswith("advice: SPF")
    assert (relay != "127.0.0.1") == (relay in found[2].note)
    assert found[3].value == "v=DMARC1; p=none; rua=mailto:postmaster@example.org"
    assert "p=quarantine, then p=reject" in found[3].note
    assert "DKIM d=example.org aligns with From example.org" in found[3].note
    (tmp_path / "elsewhere").mkdir()
    elsewhere, _ = dkim_footer_settings(tmp_path / "elsewhere", dkim_domain="forening.se")
    assert "d=forening.se does not align with From example.org" in dns_records(elsewhere)[3].note


@pytest.mark.parametrize("published", ["same", "other", "unreachable"])
async def test_doctor_with_dkim_checks_signatures_and_prints_the_records(
    live: Live, monkeypatch: pytest.MonkeyPatch, published: str
) -> None:
    """Dual DKIM configured: every captured message verifies (DKIM passes); the published
    records are compared through the (stubbed) resolver; the records are in the JSON and table."""
    keys = [dkim_key(live.root, a, s) for a, s in zip(("rsa", "ed25519"), SELECTORS, strict=True)]
    monkeypatch.setenv("MAILER_DKIM_DOMAIN", DKIM_DOMAIN)
    monkeypatch.setenv("MAILER_DKIM_SELECTOR", ",".join(SELECTORS))
    monkeypatch.setenv("MAILER_DKIM_KEY_FILE", ",".join(str(path) for path, _, _ in keys))
    records = {name: record for _, name, record in keys}
    other = key_from_pem(new_private_key("rsa"), "x").public_record
    served = {"same": records, "other": dict.fromkeys(records, other), "unreachable": None}
    monkeypatch.setattr(doctor_cli, "lookup_txt", stub_dns(served[published]))

    code, out, _ = await live.run("doctor", "--json")
    report = json.loads(out)
    rows = {c["name"]: (c["status"], c["detail"]) for c in report["checks"]}

    assert rows["DKIM"][0] == "pass", rows["DKIM"]
    assert "s=rsasel, s=ed25519sel" in rows["DKIM"][1]
    dns_status = {"same": "pass", "other": "fail", "unreachable": "skip"}[published]
    assert rows["DKIM DNS records"][0] == dns_status
    assert code == (1 if published == "other" else 0)
    assert failing(rows) == (["DKIM DNS records"] if published == "other" else [])
    by_name = {r["name"]: r for r in report["dns_records"]}
    assert {n: by_name[n]["value"] for n in records} == records
    assert by_name["_dmarc.forening.se"]["value"].startswith("v=DMARC1; p=none;")
    assert set(by_name["forening.se"]) == {"name", "type", "value", "note"}

    code, out, _ = await live.run("doctor")
    for name, value in records.items():
        assert f'{name} IN TXT "{value[:255]}"' in out
    assert 'forening.se IN TXT "v=spf1 mx ~all"' in out
    assert out.splitlines()[-1].startswith("FAILED" if published == "other" else "all checks")
