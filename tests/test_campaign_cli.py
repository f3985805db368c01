"""`mailer campaign ...` in-process: ids, --json shapes, one-line errors. The CLI only queues."""

import email
import email.policy
import json
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from mailer.statuses import OutboxStatus
from tests.conftest import Cli, Run
from tests.harness import query

SUBJECT = "November issue — Grüße"
BODY = "# Hello\n\nThis is the *November* issue.\n"
STATUS_KEYS = {
    "id",
    "list",
    "subject",
    "status",
    "scheduled_at",
    "started_at",
    "finished_at",
    "fanned_out",
    "total",
    "states",
    "reasons",
}


@pytest.fixture
def draft(cli: Cli, tmp_path: Path) -> int:
    """List "news" and one draft campaign; returns its id."""
    assert cli("list", "create", "news", "--name", "Example News")[0] == 0
    body = tmp_path / "november.md"
    body.write_text(BODY, encoding="utf-8")
    code, out, err = cli(
        "campaign", "create", "--list", "news", "--subject", SUBJECT, "--body", str(body)
    )
    assert (code, err) == (0, "")
    return int(out.strip())


def rows(tmp_path: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    return query(tmp_path / "cli.db", sql, *params)


def confirm(tmp_path: Path, email_address: str, list_slug: str = "news") -> None:
    """Mark a pending subscription confirmed behind the CLI's back (as the confirm page would)."""
    done = rows(
        tmp_path,
        "UPDATE subscription SET status = 'confirmed', confirmed_at = updated_at"
        " WHERE subscriber_id = (SELECT id FROM subscriber WHERE email = ?)"
        " AND list_id = (SELECT id FROM mailing_list WHERE slug = ?) RETURNING id",
        email_address,
        list_slug,
    )
    assert len(done) == 1


def one_line_error(result: Run, *needles: str) -> None:
    code, _, err = result
    assert code == 1, result
    assert err.count("\n") == 1 and err.startswith("mailer: error: "), err
    for needle in needles:
        assert needle in err, (needle, err)


def status_json(cli: Cli, campaign_id: int) -> dict[str, Any]:
    code, out, _ = cli("campaign", "status", str(campaign_id), "--json")
    assert code == 0
    data: dict[str, Any] = json.loads(out)
    return data


def test_create_prints_the_id_and_refuses_bad_input(cli: Cli, tmp_path: Path) -> None:
    """create prints the new id; a missing or non-UTF-8 body file, a bad subject, an unknown
    list or template are one-line errors that create nothing."""
    assert cli("list", "create", "news", "--name", "Example News")[0] == 0
    body = tmp_path / "november.md"
    body.write_text(BODY, encoding="utf-8")
    base = ("campaign", "create", "--list", "news", "--subject", SUBJECT, "--body")
    assert cli(*base, str(body)) == (0, "1\n", "")
    assert cli(*base, str(body)) == (0, "2\n", "")
    one_line_error(cli(*base, str(tmp_path / "missing.md")), "missing.md")
    latin = tmp_path / "latin1.md"
    latin.write_bytes("Café crème\n".encode("latin-1"))
    one_line_error(cli(*base, str(latin)), "latin1.md", "not UTF-8")
    one_line_error(
        cli("campaign", "create", "--list", "news", "--subject", " ", "--body", str(body)),
        "subject",
    )
    one_line_error(
        cli("campaign", "create", "--list", "nope", "--subject", "S", "--body", str(body)),
        "no list named 'nope'",
    )
    one_line_error(cli(*base, str(body), "--template", "nope"), "no email template")
    empty = tmp_path / "empty.md"
    empty.write_text("\n\n", encoding="utf-8")
    one_line_error(cli(*base, str(empty)), "body is empty")
    assert rows(tmp_path, "SELECT id, subject, body, status FROM campaign ORDER BY id") == [
        (1, SUBJECT, BODY, "draft"),
        (2, SUBJECT, BODY, "draft"),
    ]


def test_ls_and_status_json(cli: Cli, draft: int) -> None:
    """ls --json lists every campaign; status --json has the documented shape and zero counts."""
    code, out, _ = cli("campaign", "ls", "--json")
    assert code == 0
    [listed] = json.loads(out)
    assert {k: listed[k] for k in ("id", "list", "subject", "status", "scheduled_at")} == {
        "id": draft,
        "list": "news",
        "subject": SUBJECT,
        "status": "draft",
        "scheduled_at": None,
    }
    assert listed["created_at"].endswith("+00:00")
    code, out, _ = cli("campaign", "ls")
    assert code == 0 and "November issue" in out and "draft" in out
    shown = status_json(cli, draft)
    assert set(shown) == STATUS_KEYS
    assert shown["states"] == {s.value: 0 for s in OutboxStatus}
    assert (shown["id"], shown["list"], shown["subject"], shown["status"]) == (
        draft,
        "news",
        SUBJECT,
        "draft",
    )
    assert (shown["total"], shown["fanned_out"], shown["reasons"]) == (0, False, {})
    assert shown["started_at"] is None and shown["finished_at"] is None
    code, out, _ = cli("campaign", "status", str(draft))
    assert code == 0 and "is draft" in out
    one_line_error(cli("campaign", "status", "99"), "no campaign 99")


def test_audience_counts_by_reason(cli: Cli, tmp_path: Path, draft: int) -> None:
    """audience --json counts who would get it and, by reason, who would not."""
    people = ["ann", "bob", "cid", "dan", "eve", "fay", "gus"]
    for name in people:
        assert cli("subscriber", "add", f"{name}@example.org", "--list", "news")[0] == 0
    for name in ["ann", "bob", "cid", "dan", "eve", "fay"]:
        confirm(tmp_path, f"{name}@example.org")
    assert cli("subscriber", "unsubscribe", "dan@example.org", "--list", "news")[0] == 0
    assert cli("subscriber", "unsubscribe", "eve@example.org")[0] == 0
    assert cli("suppression", "add", "fay@example.org")[0] == 0
    code, out, _ = cli("campaign", "audience", str(draft), "--json")
    assert code == 0
    assert json.loads(out) == {
        "will-receive": 3,
        "unconfirmed": 1,
        "unsubscribed": 2,
        "suppressed-manual": 1,
    }
    code, out, _ = cli("campaign", "audience", str(draft))
    assert code == 0 and out.startswith("3 will get it; not: ")
    assert "1 unconfirmed" in out and "2 unsubscribed" in out and "1 suppressed-manual" in out
    one_line_error(cli("campaign", "audience", "99"), "no campaign 99")


def test_preview_prints_a_message_and_queues_only_to_confirmed(
    cli: Cli, tmp_path: Path, draft: int
) -> None:
    """preview prints a parseable, stoppable message; --to queues one copy for a confirmed
    subscriber and refuses anyone else with one line (G1)."""
    code, out, err = cli("campaign", "preview", str(draft))
    assert (code, err) == (0, "")
    msg = email.message_from_string(out, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    assert str(msg["Subject"]) == SUBJECT
    assert str(msg["List-Unsubscribe-Post"]) == "List-Unsubscribe=One-Click"
    url = str(msg["List-Unsubscribe"]).strip("<>")
    assert "/unsubscribe/" in url
    text = msg.get_body(("plain",))
    page = msg.get_body(("html",))
    assert text is not None and page is not None
    assert "November" in text.get_content() and url in text.get_content()
    assert "<em>November</em>" in page.get_content() and url in page.get_content()
    assert rows(tmp_path, "SELECT count(*) FROM outbox WHERE campaign_id IS NOT NULL") == [(0,)]

    assert cli("subscriber", "add", "me@example.org", "--list", "news")[0] == 0
    assert cli("subscriber", "add", "later@example.org", "--list", "news")[0] == 0
    confirm(tmp_path, "me@example.org")
    one_line_error(cli("campaign", "preview", str(draft), "--to", "later@example.org"), "G1")
    one_line_error(cli("campaign", "preview", str(draft), "--to", "nobody@example.org"), "G1")
    one_line_error(cli("campaign", "preview", "99", "--to", "me@example.org"), "no campaign 99")
    code, out, _ = cli("campaign", "preview", str(draft), "--to", "me@example.org")
    assert code == 0 and "preview queued for me@example.org" in out
    assert rows(
        tmp_path,
        "SELECT o.kind, o.status, s.email FROM outbox o JOIN subscriber s ON s.id = o.subscriber_id"
        " WHERE o.campaign_id = ?",
        draft,
    ) == [("preview", "queued", "me@example.org")]
    assert status_json(cli, draft)["status"] == "draft"


def test_schedule_takes_an_iso_time_with_offset(cli: Cli, draft: int) -> None:
    """schedule --at stores the instant in UTC; bad, naive or past times are one-line errors."""
    one_line_error(
        cli("campaign", "schedule", str(draft), "--at", "next tuesday"), "not an ISO 8601 time"
    )
    one_line_error(cli("campaign", "schedule", str(draft), "--at", "2099-12-01T09:00"), "offset")
    one_line_error(
        cli("campaign", "schedule", str(draft), "--at", "2001-12-01T09:00+01:00"), "passed"
    )
    assert status_json(cli, draft)["status"] == "draft"
    code, out, _ = cli("campaign", "schedule", str(draft), "--at", "2099-12-01T09:00+01:00")
    assert code == 0 and "scheduled" in out
    shown = status_json(cli, draft)
    assert (shown["status"], shown["scheduled_at"]) == ("scheduled", "2099-12-01T08:00:00+00:00")
    code, _, _ = cli("campaign", "schedule", str(draft), "--at", "2099-12-02T00:00Z")
    assert code == 0
    assert status_json(cli, draft)["scheduled_at"] == "2099-12-02T00:00:00+00:00"
    one_line_error(cli("campaign", "schedule", "99", "--at", "2099-12-01T09:00+01:00"), "99")


def test_send_pause_resume_cancel_exit_codes(cli: Cli, tmp_path: Path, draft: int) -> None:
    """send/pause/resume/cancel follow the status table; a move it forbids is a one-line
    Conflict; send only starts the campaign (the worker sends)."""
    one_line_error(cli("campaign", "resume", str(draft)), "cannot resume a campaign that is draft")
    one_line_error(cli("campaign", "pause", str(draft)), "cannot pause a campaign that is draft")
    code, out, _ = cli("campaign", "send", str(draft))
    assert code == 0 and f"campaign {draft} is sending" in out
    shown = status_json(cli, draft)
    assert shown["status"] == "running" and shown["started_at"] is not None
    assert rows(tmp_path, "SELECT count(*) FROM outbox") == [(0,)]  # nothing sent by the CLI
    one_line_error(cli("campaign", "send", str(draft)), "cannot send a campaign that is running")
    one_line_error(cli("campaign", "resume", str(draft)), "running")
    assert cli("campaign", "pause", str(draft))[:2] == (0, f"campaign {draft} paused\n")
    assert status_json(cli, draft)["status"] == "paused"
    one_line_error(cli("campaign", "pause", str(draft)), "cannot pause a campaign that is paused")
    assert cli("campaign", "resume", str(draft))[:2] == (0, f"campaign {draft} resumed\n")
    assert status_json(cli, draft)["status"] == "running"
    code, out, _ = cli("campaign", "cancel", str(draft))
    assert code == 0 and f"campaign {draft} cancelled; 0 messages will not be sent" in out
    shown = status_json(cli, draft)
    assert shown["status"] == "cancelled" and shown["finished_at"] is not None
    for verb in ("cancel", "resume", "pause", "send"):
        one_line_error(cli("campaign", verb, str(draft)), "cancelled")
    one_line_error(cli("campaign", "send", "99"), "no campaign 99")
    code, _, err = cli("campaign", "send", "seven")
    assert code == 2 and err.count("\n") == 1


def test_cancel_reports_queued_messages_as_skipped(cli: Cli, tmp_path: Path, draft: int) -> None:
    """cancel of a fanned-out campaign marks its queued messages skipped and says how many."""
    for name in ("ann", "bob", "cid"):
        assert cli("subscriber", "add", f"{name}@example.org", "--list", "news")[0] == 0
        confirm(tmp_path, f"{name}@example.org")
    assert cli("campaign", "send", str(draft))[0] == 0
    # what the worker's fan-out would have queued, written directly (the CLI never sends)
    rows(
        tmp_path,
        "INSERT INTO outbox (kind, campaign_id, list_id, subscriber_id, status, attempts,"
        " next_attempt_at, created_at, updated_at)"
        " SELECT 'campaign', ?, list_id, subscriber_id, 'queued', 0, updated_at, updated_at,"
        " updated_at FROM subscription WHERE status = 'confirmed'",
        draft,
    )
    code, out, _ = cli("campaign", "cancel", str(draft))
    assert code == 0 and "3 messages will not be sent" in out
    shown = status_json(cli, draft)
    assert shown["states"]["skipped"] == 3 and shown["states"]["queued"] == 0
    assert shown["reasons"] == {"skipped: cancelled": 3}
    assert shown["total"] == 3
