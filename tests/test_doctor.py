"""``mailer doctor``: the compliance self-test passes on a configured installation, names the
failing row otherwise, and never touches the live data or relay."""

import asyncio
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from mailer.cli.main import main
from mailer.config import PACKAGE_TEMPLATES, Settings, load_settings
from mailer.domain.compose import Envelope, Rendered, compose
from mailer.services.doctor import Expected, dkim_problems, message_problems
from tests.conftest import sqlite_only
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


def test_dkim_signature_must_cover_the_unsubscribe_headers() -> None:
    """When DKIM is configured, a signature that leaves out List-Unsubscribe-Post is named."""
    settings = footer_settings().model_copy(
        update={"dkim_domain": "forening.se", "dkim_selector": "mail", "dkim_key_file": Path("k")}
    )
    raw = message_bytes()
    signed = b"DKIM-Signature: v=1; a=rsa-sha256; d=forening.se; s=mail;\r\n h=%s; bh=x; b=y\r\n"
    full = signed % b"From:Subject:List-Unsubscribe:List-Unsubscribe-Post"
    assert dkim_problems(full + raw, settings) == []
    partial = signed % b"from:subject:list-unsubscribe"
    assert dkim_problems(partial + raw, settings) == ["DKIM does not cover list-unsubscribe-post"]
    assert dkim_problems(raw, settings) == ["no DKIM-Signature"]
