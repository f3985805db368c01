"""Turn a relay's bounce/complaint payload into mailer's webhook format, sign it, and POST it.

Standard library only, so it runs anywhere next to a relay integration. Reads one payload
(a file, or ``-`` for stdin) from Amazon SES (an SNS notification, or the bare SES JSON),
Postmark (one bounce / spam-complaint webhook, or a list of them) or SendGrid (the event
webhook's list of events). Without ``--url`` it prints the converted batch; with it, it signs
with ``$WEBHOOK_FORWARD_SECRET`` (one of the server's ``MAILER_WEBHOOK_SECRETS``) and POSTs in
batches of at most 100. An event whose address the server refuses (422) is dropped and
reported, and the rest of its batch is sent again. See docs/webhooks.md.

    python contrib/webhook_forward.py --from sendgrid events.json
    WEBHOOK_FORWARD_SECRET=... python contrib/webhook_forward.py --from ses \\
        --url https://lists.example.org/api/v1/events sns-message.json
"""

import argparse
import hashlib
import hmac
import json
import os
import re
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

Event = dict[str, Any]
BATCH = 100
STATUS = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}")
INDEX = re.compile(r"^events\[(\d+)\]")


class ForwardError(Exception):
    """A payload or a server answer this script cannot handle; one line for the user."""


def bounce(email: str, kind: str, status: object = None, diagnostic: object = None) -> Event:
    """A bounce event; a status that is not an RFC 3463 code (``550``) is left out."""
    event: Event = {"type": "bounce", "email": email, "bounce": kind}
    if isinstance(status, str) and STATUS.fullmatch(status.strip()):
        event["status"] = status.strip()
    if isinstance(diagnostic, str) and diagnostic:
        event["diagnostic"] = diagnostic
    return event


def complaint(email: str, feedback_type: object = None) -> Event:
    event: Event = {"type": "complaint", "email": email}
    if isinstance(feedback_type, str) and feedback_type:
        event["feedback_type"] = feedback_type[:64]
    return event


def from_ses(payload: Any) -> list[Event]:
    """An SES notification, bare or inside an SNS ``Notification`` envelope.

    Bounce: ``bounceType`` Permanent is hard; Transient and Undetermined are soft (counted).
    Complaint: every ``complainedRecipients`` address, except ``not-spam`` feedback.
    """
    if isinstance(payload, dict) and payload.get("Type") == "SubscriptionConfirmation":
        raise ForwardError("an SNS subscription confirmation: visit its SubscribeURL once")
    if isinstance(payload, dict) and payload.get("Type") == "Notification":
        payload = json.loads(payload["Message"])
    if not isinstance(payload, dict):
        raise ForwardError("an SES notification is a JSON object")
    kind = payload.get("notificationType") or payload.get("eventType")
    if kind == "Bounce":
        info = payload["bounce"]
        strength = "hard" if info.get("bounceType") == "Permanent" else "soft"
        return [
            bounce(r["emailAddress"], strength, r.get("status"), r.get("diagnosticCode"))
            for r in info.get("bouncedRecipients", [])
        ]
    if kind == "Complaint":
        info = payload["complaint"]
        feedback = info.get("complaintFeedbackType")
        if feedback == "not-spam":
            return []
        return [
            complaint(r["emailAddress"], feedback) for r in info.get("complainedRecipients", [])
        ]
    return []  # Delivery, Send, Open...: nothing to do


POSTMARK_HARD = {"HardBounce", "BadEmailAddress"}
POSTMARK_SOFT = {"SoftBounce", "Transient", "DnsError", "Blocked"}


def from_postmark(payload: Any) -> list[Event]:
    """Postmark bounce and spam-complaint webhooks (``RecordType`` Bounce / SpamComplaint).

    Bounce ``Type`` HardBounce and BadEmailAddress are hard; SoftBounce, Transient, DnsError
    and Blocked are soft; other types (AutoResponder, Unsubscribe, ...) are not bounces.
    """
    events = []
    for record in payload if isinstance(payload, list) else [payload]:
        email, kind = record.get("Email"), record.get("Type")
        detail = record.get("Details") or record.get("Description")
        if record.get("RecordType") == "SpamComplaint":
            events.append(complaint(email))
        elif record.get("RecordType") == "Bounce" and kind in POSTMARK_HARD:
            events.append(bounce(email, "hard", None, detail))
        elif record.get("RecordType") == "Bounce" and kind in POSTMARK_SOFT:
            events.append(bounce(email, "soft", None, detail))
    return events


def from_sendgrid(payload: Any) -> list[Event]:
    """SendGrid event webhook: ``bounce`` (``type`` bounce is hard, blocked is soft),
    ``dropped`` for a bounced or spam-reporting address, and ``spamreport``."""
    if not isinstance(payload, list):
        raise ForwardError("a SendGrid event webhook payload is a JSON list")
    events = []
    for record in payload:
        email, event, reason = record.get("email"), record.get("event"), record.get("reason")
        if event == "bounce":
            kind = "soft" if record.get("type") == "blocked" else "hard"
            events.append(bounce(email, kind, record.get("status"), reason))
        elif event == "dropped" and reason == "Bounced Address":
            events.append(bounce(email, "hard", None, reason))
        elif event == "dropped" and reason == "Spam Reporting Address":
            events.append(complaint(email))
        elif event == "spamreport":
            events.append(complaint(email, "abuse"))
    return events


CONVERTERS: dict[str, Callable[[Any], list[Event]]] = {
    "ses": from_ses,
    "postmark": from_postmark,
    "sendgrid": from_sendgrid,
}


def signed_request(url: str, secret: str, events: list[Event]) -> urllib.request.Request:
    """A POST of ``{"events": events}`` with the X-Mailer-Timestamp/-Signature headers."""
    body = json.dumps({"events": events}).encode("utf-8")
    timestamp = str(int(time.time()))
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    headers = {
        "Content-Type": "application/json",
        "X-Mailer-Timestamp": timestamp,
        "X-Mailer-Signature": f"v1={digest.hexdigest()}",
    }
    return urllib.request.Request(url, data=body, headers=headers, method="POST")  # noqa: S310


def post(url: str, secret: str, events: list[Event]) -> Iterator[str]:
    """Send one batch; yield a line per event (what it did, or why it was dropped)."""
    events = list(events)
    while True:
        try:
            with urllib.request.urlopen(signed_request(url, secret, events), timeout=30) as r:  # noqa: S310
                results = json.load(r)["results"]
        except urllib.error.HTTPError as exc:
            error = _error_of(exc)
            message = f"{exc.code} {error.get('code')}: {error.get('message')}"
            found = INDEX.match(str(error.get("message", "")))
            if exc.code != 422 or not found:
                raise ForwardError(message) from None
            dropped = events.pop(int(found.group(1)))
            yield f"dropped {dropped['type']}: {message}"
            continue
        for event, result in zip(events, results, strict=True):
            yield f"{event['type']}: {result['applied']}"
        return


def _error_of(exc: urllib.error.HTTPError) -> dict[str, Any]:
    """mailer's ``{"error": {"code", "message"}}``, or the status line from anything else."""
    try:
        error = json.load(exc)["error"]
    except (ValueError, KeyError, TypeError):
        return {"code": "http", "message": exc.reason}
    return error if isinstance(error, dict) else {"code": "http", "message": exc.reason}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--from", dest="relay", choices=sorted(CONVERTERS), required=True)
    parser.add_argument("--url", help="mailer's /api/v1/events URL; without it, just print")
    parser.add_argument("payload", help="a saved payload file, or - for stdin")
    args = parser.parse_args(argv)
    try:
        if args.payload == "-":
            payload = json.load(sys.stdin)
        else:
            with open(args.payload, encoding="utf-8") as fh:
                payload = json.load(fh)
        events = CONVERTERS[args.relay](payload)
        if not args.url:
            print(json.dumps({"events": events}, indent=2))
            return 0
        if not args.url.startswith(("https://", "http://")):
            raise ForwardError("--url must be an http:// or https:// URL")
        secret = os.environ.get("WEBHOOK_FORWARD_SECRET")
        if not secret:
            raise ForwardError("set WEBHOOK_FORWARD_SECRET to one of MAILER_WEBHOOK_SECRETS")
        for start in range(0, len(events), BATCH):
            for line in post(args.url, secret, events[start : start + BATCH]):
                print(line)
    except (ForwardError, OSError) as exc:
        return _fail(str(exc))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        return _fail(f"not a {args.relay} payload ({type(exc).__name__}: {exc})")
    return 0


def _fail(message: str) -> int:
    print(f"webhook_forward: error: {message}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
