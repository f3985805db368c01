"""contrib/webhook_forward.py: relay payloads become mailer's webhook format, signed and sent.

Payload shapes follow the relays' documented field names (SES notification contents, SNS HTTP
notifications, Postmark bounce/spam-complaint webhooks, SendGrid's event webhook). The script
runs as a real subprocess against the real app on loopback.
"""

import asyncio
import importlib.util
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.test_webhooks import NEW, RETIRED, Hooked, hooked_mailer

SCRIPT = Path(__file__).resolve().parent.parent / "contrib" / "webhook_forward.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("webhook_forward", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


forward = _load()


def ses_bounce(kind: str, *recipients: dict[str, Any]) -> dict[str, Any]:
    return {
        "notificationType": "Bounce",
        "bounce": {
            "bounceType": kind,
            "bounceSubType": "General",
            "bouncedRecipients": list(recipients),
            "timestamp": "2026-11-20T11:05:06.477Z",
            "feedbackId": "0102015fd91a6479-ae22395c",
        },
        "mail": {"messageId": "0102015fd91a5ca3", "destination": ["alice@example.org"]},
    }


def sns(message: dict[str, Any]) -> dict[str, Any]:
    """An SNS HTTP notification: the SES JSON is a string in ``Message``."""
    return {
        "Type": "Notification",
        "MessageId": "22b80b92-fdea-4c2c-8f9d-bdfb0c7bf324",
        "TopicArn": "arn:aws:sns:us-west-2:123456789012:MyTopic",
        "Message": json.dumps(message),
        "Timestamp": "2026-11-20T11:05:07.000Z",
        "SignatureVersion": "2",
    }


SES_COMPLAINT = {
    "notificationType": "Complaint",
    "complaint": {
        "complainedRecipients": [{"emailAddress": "bob@example.org"}],
        "complaintFeedbackType": "abuse",
        "feedbackId": "0100015a5387d801",
    },
    "mail": {"messageId": "0100015a52e555c5"},
}


def test_ses_bounces_and_complaints() -> None:
    permanent = ses_bounce(
        "Permanent",
        {
            "emailAddress": "alice@example.org",
            "action": "failed",
            "status": "5.1.1",
            "diagnosticCode": "smtp; 550 5.1.1 user unknown",
        },
        {"emailAddress": "carol@example.org", "status": "550"},  # not an RFC 3463 code
    )
    assert forward.from_ses(sns(permanent)) == [
        {
            "type": "bounce",
            "email": "alice@example.org",
            "bounce": "hard",
            "status": "5.1.1",
            "diagnostic": "smtp; 550 5.1.1 user unknown",
        },
        {"type": "bounce", "email": "carol@example.org", "bounce": "hard"},
    ]
    for kind in ["Transient", "Undetermined"]:
        [event] = forward.from_ses(ses_bounce(kind, {"emailAddress": "a@example.org"}))
        assert event["bounce"] == "soft"
    assert forward.from_ses(sns(SES_COMPLAINT)) == [
        {"type": "complaint", "email": "bob@example.org", "feedback_type": "abuse"}
    ]
    not_spam = {**SES_COMPLAINT, "complaint": {**SES_COMPLAINT["complaint"]}}
    not_spam["complaint"]["complaintFeedbackType"] = "not-spam"
    assert forward.from_ses(not_spam) == []
    assert forward.from_ses({"eventType": "Delivery", "delivery": {}}) == []
    with pytest.raises(forward.ForwardError, match="SubscribeURL"):
        forward.from_ses({"Type": "SubscriptionConfirmation", "SubscribeURL": "https://x"})


def postmark(record_type: str, kind: str, email: str) -> dict[str, Any]:
    return {
        "RecordType": record_type,
        "ID": 42,
        "Type": kind,
        "TypeCode": 1,
        "Name": "Hard bounce",
        "MessageID": "883953f4-6105-42a2-a16a-77a8eac79483",
        "Description": "The server was unable to deliver your message",
        "Details": "smtp;550 5.1.1 The email account does not exist",
        "Email": email,
        "BouncedAt": "2026-08-01T13:28:10.2735393-04:00",
        "Inactive": True,
    }


def test_postmark_bounces_and_spam_complaints() -> None:
    records = [
        postmark("Bounce", "HardBounce", "a@example.org"),
        postmark("Bounce", "SoftBounce", "b@example.org"),
        postmark("Bounce", "AutoResponder", "c@example.org"),
        postmark("SpamComplaint", "SpamComplaint", "d@example.org"),
        postmark("Delivery", "", "e@example.org"),
    ]
    detail = "smtp;550 5.1.1 The email account does not exist"
    assert forward.from_postmark(records) == [
        {"type": "bounce", "email": "a@example.org", "bounce": "hard", "diagnostic": detail},
        {"type": "bounce", "email": "b@example.org", "bounce": "soft", "diagnostic": detail},
        {"type": "complaint", "email": "d@example.org"},
    ]
    assert forward.from_postmark(records[0]) == forward.from_postmark(records[:1])


SENDGRID = [
    {"email": "a@example.org", "event": "processed", "timestamp": 1513299569},
    {
        "email": "b@example.org",
        "event": "bounce",
        "type": "bounce",
        "status": "5.0.0",
        "reason": "550 5.1.1 unknown user",
        "bounce_classification": "Invalid Address",
    },
    {
        "email": "c@example.org",
        "event": "bounce",
        "type": "blocked",
        "reason": "unable to get mx info",
        "bounce_classification": "Unclassified",
    },
    {"email": "d@example.org", "event": "dropped", "reason": "Bounced Address"},
    {"email": "e@example.org", "event": "dropped", "reason": "Unsubscribed Address"},
    {"email": "f@example.org", "event": "dropped", "reason": "Spam Reporting Address"},
    {"email": "g@example.org", "event": "spamreport", "timestamp": 1513299569},
    {"email": "h@example.org", "event": "deferred", "response": "400 try again later"},
]


def test_sendgrid_events() -> None:
    assert forward.from_sendgrid(SENDGRID) == [
        {
            "type": "bounce",
            "email": "b@example.org",
            "bounce": "hard",
            "status": "5.0.0",
            "diagnostic": "550 5.1.1 unknown user",
        },
        {
            "type": "bounce",
            "email": "c@example.org",
            "bounce": "soft",
            "diagnostic": "unable to get mx info",
        },
        {
            "type": "bounce",
            "email": "d@example.org",
            "bounce": "hard",
            "diagnostic": "Bounced Address",
        },
        {"type": "complaint", "email": "f@example.org"},
        {"type": "complaint", "email": "g@example.org", "feedback_type": "abuse"},
    ]


# -- the script, end to end -------------------------------------------------------------------


@pytest.fixture
async def hooked(tmp_path: Path) -> AsyncIterator[Hooked]:
    """The same running mailer as tests/test_webhooks.py uses."""
    async for running in hooked_mailer(tmp_path):
        yield running


async def run(*args: str, secret: str | None = NEW) -> tuple[int, str, str]:
    env = {} if secret is None else {"WEBHOOK_FORWARD_SECRET": secret}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(SCRIPT),
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_a_saved_ses_notification_is_forwarded_and_applied(
    hooked: Hooked, tmp_path: Path
) -> None:
    payload = tmp_path / "sns.json"
    payload.write_text(
        json.dumps(sns(ses_bounce("Permanent", {"emailAddress": "alice@example.org"})))
    )
    url = str(hooked.client.make_url("/api/v1/events"))
    code, out, err = await run("--from", "ses", "--url", url, str(payload))
    assert (code, err) == (0, "")
    assert out == "bounce: suppressed\n"
    assert hooked.suppressed() == {"alice@example.org": "bounced"}


async def test_an_invalid_address_is_dropped_and_the_rest_applied(
    hooked: Hooked, tmp_path: Path
) -> None:
    records = [
        {"email": "bob@", "event": "spamreport"},
        {"email": "bob@example.org", "event": "spamreport"},
    ]
    payload = tmp_path / "sendgrid.json"
    payload.write_text(json.dumps(records))
    url = str(hooked.client.make_url("/api/v1/events"))
    code, out, err = await run("--from", "sendgrid", "--url", url, str(payload))
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].startswith("dropped complaint: 422 invalid_address: events[0].email")
    assert lines[1:] == ["complaint: suppressed"]
    assert hooked.suppressed() == {"bob@example.org": "complained"}


async def test_a_wrong_secret_is_one_line_and_a_non_zero_exit(
    hooked: Hooked, tmp_path: Path
) -> None:
    payload = tmp_path / "postmark.json"
    payload.write_text(json.dumps(postmark("Bounce", "HardBounce", "alice@example.org")))
    url = str(hooked.client.make_url("/api/v1/events"))
    code, out, err = await run("--from", "postmark", "--url", url, str(payload), secret=RETIRED)
    assert (code, out) == (1, "")
    assert err == (
        "webhook_forward: error: 401 bad_signature: "
        "no signature matches the body with a configured secret\n"
    )
    assert hooked.suppressed() == {}
    code, _, err = await run("--from", "postmark", "--url", url, str(payload), secret=None)
    assert code == 1 and "WEBHOOK_FORWARD_SECRET" in err


async def test_without_url_it_prints_the_batch_and_bad_payloads_are_one_line(
    tmp_path: Path,
) -> None:
    payload = tmp_path / "sendgrid.json"
    payload.write_text(json.dumps(SENDGRID))
    code, out, _ = await run("--from", "sendgrid", str(payload), secret=None)
    assert code == 0
    assert json.loads(out) == {"events": forward.from_sendgrid(SENDGRID)}
    payload.write_text(json.dumps({"event": "bounce"}))
    code, out, err = await run("--from", "sendgrid", str(payload), secret=None)
    assert (code, out) == (1, "")
    assert err == "webhook_forward: error: a SendGrid event webhook payload is a JSON list\n"
    payload.write_text(json.dumps({"notificationType": "Bounce"}))
    code, _, err = await run("--from", "ses", str(payload), secret=None)
    assert code == 1 and err.startswith("webhook_forward: error: not a ses payload (KeyError")
