"""The command line: every verb of the opt-in loop, --json output, one-line errors."""

import io
import json
from pathlib import Path

import pytest

from mailer.cli.main import main
from tests.conftest import Cli
from tests.databases import SQLITE, active
from tests.harness import query, snapshot


def test_init_is_idempotent_and_keeps_keys_private(cli: Cli, tmp_path: Path) -> None:
    """init can run twice; the generated key file is readable by its owner only."""
    key_file = tmp_path / "var" / "secret_keys"
    first = key_file.read_text()
    code, out, _ = cli("init")
    assert code == 0 and "initialised" in out
    assert key_file.read_text() == first
    assert key_file.stat().st_mode & 0o077 == 0
    code, out, _ = cli("db", "upgrade")
    assert code == 0 and "already current" in out


def test_lists(cli: Cli) -> None:
    """list create / ls, including --json and a duplicate slug error."""
    assert (
        cli("list", "create", "news", "--name", "Example News", "--from", "n@example.org")[0] == 0
    )
    code, _, err = cli("list", "create", "news", "--name", "Again")
    assert code == 1 and err.count("\n") == 1 and "already exists" in err
    code, _, err = cli("list", "create", "Bad Slug", "--name", "x")
    assert code == 1 and "slug" in err
    code, out, _ = cli("list", "ls", "--json")
    listed = json.loads(out)
    assert [(item["slug"], item["name"], item["from"]) for item in listed] == [
        ("news", "Example News", "n@example.org")
    ]
    assert listed[0]["subscriptions"] == {"pending": 0, "confirmed": 0, "unsubscribed": 0}


def test_api_keys(cli: Cli, tmp_path: Path) -> None:
    """apikey create prints the key once and stores only its hash; revoke and ls work."""
    code, out, _ = cli("apikey", "create", "website")
    key = out.strip()
    assert code == 0 and key.startswith("mk_") and len(key) > 40
    assert key not in repr(snapshot(tmp_path / "cli.db"))
    if active.name == SQLITE:  # nor anywhere in the file, say in a free page
        raw = (tmp_path / "cli.db").read_bytes()
        wal = tmp_path / "cli.db-wal"
        assert key.encode() not in raw + (wal.read_bytes() if wal.exists() else b"")
    code, out, _ = cli("apikey", "ls", "--json")
    [listed] = json.loads(out)
    assert listed["name"] == "website" and listed["revoked_at"] is None
    assert key.startswith(listed["prefix"]) and len(listed["prefix"]) < 12
    assert cli("apikey", "revoke", "website")[0] == 0
    assert json.loads(cli("apikey", "ls", "--json")[1])[0]["revoked_at"] is not None
    code, _, err = cli("apikey", "revoke", "website")
    assert code == 1 and "no active API key" in err


def test_subscriber_lifecycle(cli: Cli, tmp_path: Path) -> None:
    """add queues a request (never subscribes), show/export tell the truth, unsubscribe acts."""
    cli("list", "create", "news", "--name", "News")
    cli("list", "create", "tips", "--name", "Tips")
    code, out, _ = cli("subscriber", "add", "Eve@Example.org", "--list", "news", "--name", "Eve")
    assert code == 0 and "confirmation request queued" in out
    code, out, _ = cli("subscriber", "add", "eve@example.org", "--list", "news")
    assert code == 0 and "recently" in out
    shown = json.loads(cli("subscriber", "show", "eve@example.org", "--json")[1])
    assert shown["email"] == "Eve@example.org"
    assert [(s["list"], s["status"]) for s in shown["subscriptions"]] == [("news", "pending")]
    assert query(tmp_path / "cli.db", "SELECT kind, status FROM outbox") == [("confirm", "queued")]
    code, out, _ = cli("subscriber", "unsubscribe", "eve@example.org", "--list", "news")
    assert code == 0
    shown = json.loads(cli("subscriber", "show", "eve@example.org", "--json")[1])
    assert shown["subscriptions"][0]["status"] == "unsubscribed"
    assert shown["suppression"] is None
    cli("subscriber", "unsubscribe", "eve@example.org")
    exported = json.loads(cli("subscriber", "export", "eve@example.org")[1])
    assert exported["suppression"] == "unsubscribed"
    assert [e["event"] for e in exported["consent_events"]] == [
        "opt-in-requested",
        "unsubscribed",
        "unsubscribed",
    ]
    assert {e["channel"] for e in exported["consent_events"]} == {"cli"}
    code, _, err = cli("subscriber", "show", "nobody@example.org")
    assert code == 1 and "no data" in err


def test_suppression_commands(cli: Cli) -> None:
    """Manual suppression blocks add; remove lifts it; an unsubscribe cannot be lifted by staff."""
    cli("list", "create", "news", "--name", "News")
    assert cli("suppression", "add", "sam@example.org")[0] == 0
    code, out, _ = cli("subscriber", "add", "sam@example.org", "--list", "news")
    assert code == 1 and "suppressed" in out
    listed = json.loads(cli("suppression", "ls", "--json")[1])
    assert [(r["reason"], len(r["hash"])) for r in listed] == [("manual", 32)]
    assert cli("suppression", "remove", "SAM@example.org")[0] == 0
    assert json.loads(cli("suppression", "ls", "--json")[1]) == []
    cli("subscriber", "unsubscribe", "uma@example.org")
    code, _, err = cli("suppression", "remove", "uma@example.org")
    assert code == 1 and "only the person" in err


def test_erase(cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """erase --yes removes the person and keeps only the hash; without --yes it asks."""
    cli("list", "create", "news", "--name", "News")
    cli("subscriber", "add", "zoe@example.org", "--list", "news")
    monkeypatch.setattr("sys.stdin", io.StringIO("n\n"))
    code, _, err = cli("subscriber", "erase", "zoe@example.org")
    assert code == 130 and "aborted" in err
    assert "zoe@example.org" in cli("subscriber", "show", "zoe@example.org")[1]
    assert cli("subscriber", "erase", "zoe@example.org", "--yes")[0] == 0
    listed = json.loads(cli("suppression", "ls", "--json")[1])
    assert [(r["email"], r["reason"]) for r in listed] == [(None, "erased")]
    assert "zoe@example.org" not in repr(snapshot(tmp_path / "cli.db"))
    if active.name == SQLITE:  # nor anywhere in the file (secure_delete, checkpoint)
        assert b"zoe@example.org" not in (tmp_path / "cli.db").read_bytes()


def test_ledger_verify(cli: Cli, tmp_path: Path) -> None:
    """ledger verify passes on an intact chain and exits non-zero after a direct edit."""
    cli("list", "create", "news", "--name", "News")
    cli("subscriber", "add", "a@example.org", "--list", "news")
    cli("subscriber", "add", "b@example.org", "--list", "news")
    code, out, _ = cli("ledger", "verify", "--json")
    assert code == 0 and json.loads(out) == {
        "ok": True,
        "entries": 2,
        "broken_at": None,
        "problem": None,
    }
    query(tmp_path / "cli.db", "UPDATE consent_event SET actor='someone else' WHERE seq=1")
    code, out, err = cli("ledger", "verify")
    assert code == 1 and "entry 1" in err


@pytest.mark.parametrize(
    ("args", "fragment", "code"),
    [
        (("list", "create", "x"), "--name", 2),
        (("nosuchverb",), "No such command", 2),
        (("subscriber", "add", "not-an-address", "--list", "news"), "error", 1),
        (("subscriber", "add", "a@example.org", "--list", "nolist"), "no list named", 1),
    ],
)
def test_errors_are_one_line(cli: Cli, args: tuple[str, ...], fragment: str, code: int) -> None:
    """Bad input gives one readable stderr line and a non-zero exit, never a traceback."""
    cli("list", "create", "news", "--name", "News")
    got, out, err = cli(*args)
    assert got == code
    assert err.startswith("mailer: error:") and err.count("\n") == 1
    assert fragment in err and "Traceback" not in err + out


def test_uninitialised_database_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Commands before `mailer init` say what to run."""
    monkeypatch.setenv("MAILER_DATABASE_URL", active.empty(tmp_path / "new.db"))
    monkeypatch.setenv("MAILER_SECRET_KEYS", "k")
    assert main(["list", "ls"]) == 1
    assert "mailer init" in capsys.readouterr().err
