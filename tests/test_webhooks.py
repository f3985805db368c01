"""Relay webhooks, ``POST /api/v1/events``: signed batches of bounces and complaints (G5).

The signature and body rules are tested directly; the route runs in the real aiohttp app
against a real SQLite file, and every refusal is checked to leave the database as it was.
"""

import asyncio
import io
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient, TestServer
from jsonschema import Draft202012Validator

from mailer.bootstrap import Mailer, open_mailer
from mailer.domain.feedback import Feedback, FeedbackKind
from mailer.domain.webhook_events import MAX_EVENTS, RelayEvent, parse_events
from mailer.domain.webhook_signature import REPLAY_WINDOW, sign, verify
from mailer.errors import BadWebhookSignature, InvalidInput
from mailer.statuses import Channel
from mailer.web.app import create_app
from mailer.web.webhooks import MAX_BODY
from tests.conftest import auth, init_db, make_settings, seed_confirmed
from tests.harness import MutableClock, query, snapshot
from tests.test_api import error_of
from tests.test_openapi import REGISTRY, SPEC_URI, _pointer, check

EVENTS = "/api/v1/events"
NEW = "new-webhook-secret-0123456789"
OLD = "old-webhook-secret-0123456789"
RETIRED = "retired-webhook-secret-012345"
Client = TestClient[Any, Any]
KNOWN = ["alice@example.org", "bob@example.org"]


def hard(email: str, **extra: Any) -> dict[str, Any]:
    return {"type": "bounce", "email": email, "bounce": "hard", **extra}


def soft(email: str) -> dict[str, Any]:
    return {"type": "bounce", "email": email, "bounce": "soft", "status": "4.2.2"}


def complaint(email: str) -> dict[str, Any]:
    return {"type": "complaint", "email": email, "feedback_type": "abuse"}


def body_of(*events: object) -> bytes:
    return json.dumps({"events": list(events)}).encode()


# -- the signature rule ---------------------------------------------------------------------

NOW = 1_767_225_600
BODY = body_of(hard("alice@example.org"))


def header(*secrets: str, timestamp: int = NOW, body: bytes = BODY) -> str:
    return ", ".join(f"v1={sign(s.encode(), str(timestamp), body)}" for s in secrets)


def test_a_signature_by_any_configured_secret_verifies() -> None:
    keys = [NEW.encode(), OLD.encode()]
    verify(keys, str(NOW), header(NEW), BODY, NOW)
    verify(keys, str(NOW), header(OLD), BODY, NOW)
    verify(keys, str(NOW), header(RETIRED, OLD), BODY, NOW)  # a sender mid-rotation
    verify(keys, str(NOW), header(NEW).upper().replace("V1=", "v1="), BODY, NOW)
    verify(keys, f" {NOW} ", f"v2=abc, {header(NEW)}", BODY, NOW)  # other schemes ignored
    verify(keys, str(NOW - REPLAY_WINDOW), header(NEW, timestamp=NOW - 300), BODY, NOW)
    verify(keys, str(NOW + REPLAY_WINDOW), header(NEW, timestamp=NOW + 300), BODY, NOW)


def test_the_signature_is_over_timestamp_dot_body() -> None:
    """The documented construction, spelled out: a sender in any language can follow it."""
    import hashlib
    import hmac

    expected = hmac.new(NEW.encode(), f"{NOW}.".encode() + BODY, hashlib.sha256).hexdigest()
    assert sign(NEW.encode(), str(NOW), BODY) == expected


@pytest.mark.parametrize(
    ("timestamp", "signature", "body", "now", "reason"),
    [
        (None, header(NEW), BODY, NOW, "headers are required"),
        (str(NOW), None, BODY, NOW, "headers are required"),
        ("", header(NEW), BODY, NOW, "Unix time"),
        ("1.7e9", header(NEW), BODY, NOW, "Unix time"),
        ("-5", header(NEW), BODY, NOW, "Unix time"),
        (str(NOW), header(NEW), BODY, NOW + REPLAY_WINDOW + 1, "seconds away"),
        (str(NOW), header(NEW), BODY, NOW - REPLAY_WINDOW - 1, "seconds away"),
        (str(NOW), header(RETIRED), BODY, NOW, "no signature matches"),
        (str(NOW), header(NEW), BODY + b" ", NOW, "no signature matches"),
        (str(NOW + 1), header(NEW), BODY, NOW, "no signature matches"),
        (str(NOW), header(NEW)[:-1], BODY, NOW, "no v1="),
        (str(NOW), header(NEW).replace("v1=", "v2="), BODY, NOW, "no v1="),
        (str(NOW), "", BODY, NOW, "no v1="),
    ],
)
def test_bad_signatures_are_refused_with_the_reason(
    timestamp: str | None, signature: str | None, body: bytes, now: int, reason: str
) -> None:
    with pytest.raises(BadWebhookSignature, match=reason) as caught:
        verify([NEW.encode(), OLD.encode()], timestamp, signature, body, now)
    assert caught.value.code == "bad_signature"


# -- the body rule --------------------------------------------------------------------------


def test_a_batch_becomes_feedback_with_its_channel() -> None:
    events = parse_events(
        body_of(
            hard("a@example.org", status="5.1.1", diagnostic="550 no such user"),
            soft("b@example.org"),
            complaint("c@example.org"),
            {"type": "complaint", "email": "d@example.org"},
        )
    )
    assert events == [
        RelayEvent(
            "a@example.org", Feedback(FeedbackKind.HARD_BOUNCE, "5.1.1", "550 no such user")
        ),
        RelayEvent("b@example.org", Feedback(FeedbackKind.SOFT_BOUNCE, "4.2.2")),
        RelayEvent("c@example.org", Feedback(FeedbackKind.COMPLAINT, None, "abuse")),
        RelayEvent("d@example.org", Feedback(FeedbackKind.COMPLAINT)),
    ]
    channels = [e.channel for e in events]
    assert channels == [Channel.BOUNCE, Channel.BOUNCE, Channel.COMPLAINT, Channel.COMPLAINT]
    assert parse_events(b'{"events": []}') == []


OK = hard("a@example.org")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"{", "not valid JSON"),
        (b"\xff\xfe{", "not valid JSON"),
        (b"[" * 100_000, "not valid JSON"),
        (b"[]", "must be a JSON object"),
        (b"{}", "events: Field required"),
        (b'{"events": {}}', "events: Input should be a valid list"),
        (json.dumps({"events": [], "extra": 1}).encode(), "extra: Extra inputs"),
        (body_of(OK, {**OK, "bounce": "medium"}), "events[1].bounce: Input should be"),
        (body_of(OK, OK, {**OK, "type": "delivery"}), "events[2]: Input tag 'delivery'"),
        (body_of({"email": "a@example.org"}), "events[0]: Unable to extract tag"),
        (body_of(OK, "a@example.org"), "events[1]: Input should be a valid dictionary"),
        (body_of({**OK, "status": "550"}), "events[0].status: String should match"),
        (body_of({**OK, "email": 7}), "events[0].email: Input should be a valid string"),
        (body_of({"type": "complaint"}), "events[0].email: Field required"),
        (body_of({**complaint("a@example.org"), "bounce": "hard"}), "events[0].bounce: Extra"),
        (body_of({**complaint("a@x.org"), "feedback_type": "x" * 65}), "events[0].feedback_type"),
        (body_of(*[OK] * (MAX_EVENTS + 1)), "at most 100 items"),
    ],
)
def test_a_malformed_batch_is_refused_naming_the_first_bad_event(raw: bytes, message: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_events(raw)
    assert message in caught.value.message


# -- the route, against a real mailer --------------------------------------------------------


@dataclass
class Hooked:
    mailer: Mailer
    client: Client
    clock: MutableClock
    db: Path

    async def post(
        self,
        raw: bytes,
        *,
        secrets: tuple[str, ...] = (NEW,),
        timestamp: int | None = None,
        skew: int = 0,
        signed: bytes | None = None,
        content_type: str = "application/json",
        drop: tuple[str, ...] = (),
    ) -> ClientResponse:
        """POST ``raw`` signed with ``secrets`` (over ``signed`` if given, to tamper).

        The timestamp is the mailer's clock moved by ``skew`` seconds, unless given.
        """
        stamp = int(self.clock.now().timestamp()) + skew if timestamp is None else timestamp
        headers = {
            "Content-Type": content_type,
            "X-Mailer-Timestamp": str(stamp),
            "X-Mailer-Signature": header(
                *secrets, timestamp=stamp, body=raw if signed is None else signed
            ),
        }
        for name in drop:
            del headers[name]
        # BytesIO: aiohttp warns about sending a large bytes body in one piece
        r: ClientResponse = await self.client.post(EVENTS, data=io.BytesIO(raw), headers=headers)
        return r

    async def applied(self, r: ClientResponse) -> list[str]:
        assert r.status == 200, await r.text()
        body = await check(r, EVENTS, "post")
        return [result["applied"] for result in body["results"]]

    def suppressed(self) -> dict[str, str]:
        """Address -> reason, for suppressed addresses that are still held."""
        rows = query(
            self.db,
            "SELECT s.email, x.reason FROM suppression x JOIN subscriber s"
            " ON s.email_hash = x.email_hash",
        )
        return dict(rows)


async def hooked_mailer(tmp_path: Path, **settings: Any) -> AsyncIterator[Hooked]:
    values: dict[str, Any] = {"webhook_secrets": f"{NEW},{OLD}", "soft_bounce_limit": 2}
    config = make_settings(tmp_path, **{**values, **settings})
    await init_db(config)
    clock = MutableClock()
    async with open_mailer(config, clock=clock) as m:
        news = await m.lists.create("news", "Example News")
        await seed_confirmed(m, news.id, KNOWN)
        async with TestClient(TestServer(create_app(m))) as http:
            yield Hooked(m, http, clock, tmp_path / "mailer.db")


@pytest.fixture
async def hooked(tmp_path: Path) -> AsyncIterator[Hooked]:
    """A mailer with two webhook secrets, two confirmed subscribers and a mutable clock."""
    async for running in hooked_mailer(tmp_path):
        yield running


async def test_a_signed_hard_bounce_suppresses_with_webhook_evidence(hooked: Hooked) -> None:
    r = await hooked.post(body_of(hard("Alice@Example.org", status="5.1.1")))
    assert await hooked.applied(r) == ["suppressed"]
    assert hooked.suppressed() == {"alice@example.org": "bounced"}
    events = query(
        hooked.db, "SELECT event, channel, actor, ip FROM consent_event WHERE event = 'suppressed'"
    )
    assert events == [("suppressed", "bounce", "webhook", "127.0.0.1")]
    again = await hooked.post(body_of(hard("alice@example.org")))
    assert await hooked.applied(again) == ["already"]


async def test_a_complaint_suppresses_as_complained(hooked: Hooked) -> None:
    r = await hooked.post(body_of(complaint("bob@example.org")), secrets=(OLD,))
    assert await hooked.applied(r) == ["suppressed"]
    assert hooked.suppressed() == {"bob@example.org": "complained"}
    assert query(hooked.db, "SELECT channel FROM consent_event") == [("complaint",)]


async def test_soft_bounces_count_then_suppress_at_the_limit(hooked: Hooked) -> None:
    r = await hooked.post(body_of(soft("alice@example.org"), soft("bob@example.org")))
    assert await hooked.applied(r) == ["counted", "counted"]
    assert hooked.suppressed() == {}
    r = await hooked.post(body_of(soft("alice@example.org"), soft("alice@example.org")))
    assert await hooked.applied(r) == ["suppressed", "already"]
    assert hooked.suppressed() == {"alice@example.org": "bounced"}


async def test_unknown_addresses_are_answered_unknown_and_nothing_is_recorded(
    hooked: Hooked,
) -> None:
    before = snapshot(hooked.db)
    r = await hooked.post(body_of(hard("stranger@example.org"), complaint("nobody@example.net")))
    assert await hooked.applied(r) == ["unknown", "unknown"]
    assert snapshot(hooked.db) == before


async def test_an_empty_batch_tests_the_signature(hooked: Hooked) -> None:
    assert await hooked.applied(await hooked.post(b'{"events": []}')) == []


async def test_a_secret_kept_for_rotation_verifies(hooked: Hooked) -> None:
    r = await hooked.post(body_of(hard("bob@example.org")), secrets=(RETIRED, OLD))
    assert await hooked.applied(r) == ["suppressed"]


async def _refused(hooked: Hooked, r: ClientResponse, status: int, code: str, before: Any) -> str:
    error = await error_of(r, status)
    assert error["code"] == code
    await check(r, EVENTS, "post")
    assert snapshot(hooked.db) == before
    return error["message"]


GOOD = body_of(hard("alice@example.org"), complaint("bob@example.org"))
REFUSALS: dict[str, dict[str, Any]] = {
    "no-headers": {"drop": ("X-Mailer-Timestamp", "X-Mailer-Signature")},
    "no-signature": {"drop": ("X-Mailer-Signature",)},
    "no-timestamp": {"drop": ("X-Mailer-Timestamp",)},
    "wrong-secret": {"secrets": (RETIRED,)},
    "secret-of-another-instance": {"secrets": ("x" * 32,)},
    "tampered-body": {"signed": body_of(hard("alice@example.org"))},
    "stale": {"skew": -REPLAY_WINDOW - 1},
    "from-the-future": {"skew": REPLAY_WINDOW + 1},
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
async def test_a_bad_or_missing_signature_gets_401_and_changes_nothing(
    hooked: Hooked, case: str
) -> None:
    before = snapshot(hooked.db)
    r = await hooked.post(GOOD, **REFUSALS[case])
    await _refused(hooked, r, 401, "bad_signature", before)
    assert hooked.suppressed() == {}


async def test_a_request_replayed_after_the_window_is_refused(hooked: Hooked) -> None:
    stamp = int(hooked.clock.now().timestamp())
    hooked.clock.advance(REPLAY_WINDOW + 1)
    before = snapshot(hooked.db)
    message = await _refused(
        hooked, await hooked.post(GOOD, timestamp=stamp), 401, "bad_signature", before
    )
    assert "seconds away" in message


async def test_a_batch_with_one_bad_event_applies_nothing(hooked: Hooked) -> None:
    before = snapshot(hooked.db)
    r = await hooked.post(body_of(hard("alice@example.org"), {**soft("bob@example.org"), "x": 1}))
    assert "events[1].x" in await _refused(hooked, r, 400, "bad_request", before)


async def test_an_invalid_address_anywhere_is_422_and_applies_nothing(hooked: Hooked) -> None:
    before = snapshot(hooked.db)
    r = await hooked.post(body_of(hard("alice@example.org"), hard("bob@"), hard("not valid")))
    assert "events[1].email" in await _refused(hooked, r, 422, "invalid_address", before)


async def test_the_body_must_be_declared_json(hooked: Hooked) -> None:
    before = snapshot(hooked.db)
    r = await hooked.post(GOOD, content_type="text/plain")
    assert "Content-Type" in await _refused(hooked, r, 400, "bad_request", before)


async def test_an_oversized_body_gets_413(hooked: Hooked) -> None:
    padding = MAX_BODY - len(GOOD) + 1
    raw = GOOD[:-1] + b" " * padding + b"}"
    assert len(raw) == MAX_BODY + 1
    before = snapshot(hooked.db)
    await _refused(hooked, await hooked.post(raw), 413, "too_large", before)

    async def chunks() -> AsyncIterator[bytes]:  # chunked: no Content-Length to check first
        for start in range(0, len(raw), 64 * 1024):
            yield raw[start : start + 64 * 1024]

    stamp = str(int(hooked.clock.now().timestamp()))
    headers = {
        "Content-Type": "application/json",
        "X-Mailer-Timestamp": stamp,
        "X-Mailer-Signature": f"v1={sign(NEW.encode(), stamp, raw)}",
    }
    r = await hooked.client.post(EVENTS, data=chunks(), headers=headers)
    await _refused(hooked, r, 413, "too_large", before)


async def test_a_declared_oversized_body_is_refused_before_it_is_read(hooked: Hooked) -> None:
    """Content-Length over the limit: 413 at once, without waiting for (or buffering) a byte."""
    assert hooked.client.server.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", hooked.client.server.port)
    stamp = int(hooked.clock.now().timestamp())
    writer.write(
        f"POST {EVENTS} HTTP/1.1\r\nHost: mailer.test\r\nContent-Type: application/json\r\n"
        f"Content-Length: {MAX_BODY + 1}\r\nX-Mailer-Timestamp: {stamp}\r\n"
        f"X-Mailer-Signature: {header(NEW, timestamp=stamp)}\r\n\r\n".encode()
    )
    await writer.drain()
    try:
        status = await asyncio.wait_for(reader.readline(), timeout=5)
    finally:
        writer.close()
    assert status.startswith(b"HTTP/1.1 413 "), status


async def test_a_body_at_the_limit_is_accepted(hooked: Hooked) -> None:
    raw = GOOD[:-1] + b" " * (MAX_BODY - len(GOOD)) + b"}"
    assert len(raw) == MAX_BODY
    assert await hooked.applied(await hooked.post(raw)) == ["suppressed", "suppressed"]


async def test_webhooks_are_off_until_secrets_are_configured(tmp_path: Path) -> None:
    async for running in hooked_mailer(tmp_path, webhook_secrets=""):
        before = snapshot(running.db)
        r = await running.post(GOOD)
        message = await _refused(running, r, 404, "not_found", before)
        assert message == "webhooks are not configured (set MAILER_WEBHOOK_SECRETS)"


async def test_webhooks_do_not_spend_the_api_rate_limit(tmp_path: Path) -> None:
    async for running in hooked_mailer(tmp_path, api_rate_per_minute=1):
        for _ in range(5):  # past the API burst of 2
            assert await running.applied(await running.post(body_of(soft("x@example.org")))) == [
                "unknown"
            ]
        key = await running.mailer.api_keys.create("site")
        optin = {"email": "new@example.org", "list": "news"}
        r = await running.client.post("/api/v1/subscriptions", json=optin, headers=auth(key))
        assert r.status == 202, await r.text()


async def test_addresses_never_reach_the_log(
    hooked: Hooked, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    r = await hooked.post(body_of(hard("alice@example.org"), soft("stranger@example.org")))
    assert await hooked.applied(r) == ["suppressed", "unknown"]
    await hooked.post(body_of(hard("bob@")))
    lines = [record.getMessage() for record in caplog.records]
    assert "webhook.events n=2 suppressed=1 unknown=1" in lines
    assert not [line for line in lines if "example.org" in line or "bob@" in line]


# -- the documented request schema agrees with the server ------------------------------------

REQUESTS: dict[str, Any] = {
    "minimal": {"events": [hard("alice@example.org")]},
    "every-field": {
        "events": [hard("alice@example.org", status="5.1.1", diagnostic="d"), complaint("b@x.org")]
    },
    "nulls": {"events": [hard("alice@example.org", status=None, diagnostic=None)]},
    "empty": {"events": []},
    "too-many": {"events": [hard("alice@example.org")] * (MAX_EVENTS + 1)},
    "bad-status": {"events": [hard("alice@example.org", status="5.1")]},
    "unknown-type": {"events": [{"type": "open", "email": "alice@example.org"}]},
    "complaint-with-bounce": {"events": [{**complaint("alice@example.org"), "bounce": "hard"}]},
    "no-events": {},
    "extra-top-level": {"events": [], "source": "ses"},
    "email-number": {"events": [{**hard("x@y.org"), "email": 1}]},
}


@pytest.mark.parametrize("name", sorted(REQUESTS))
async def test_request_schema_agrees_with_the_server(hooked: Hooked, name: str) -> None:
    """A body the SPEC forbids gets 400; a body the server accepts is one the SPEC allows."""
    body = REQUESTS[name]
    r = await hooked.post(json.dumps(body).encode())
    await check(r, EVENTS, "post")
    where = _pointer("paths", EVENTS, "post", "requestBody", "content", "application/json")
    schema = Draft202012Validator({"$ref": f"{SPEC_URI}#/{where}/schema"}, registry=REGISTRY)
    if not schema.is_valid(body):
        assert r.status == 400, f"SPEC forbids {body!r} but the server answered {r.status}"
    if r.status < 300:
        assert schema.is_valid(body), f"the server accepted {body!r}, which the SPEC forbids"
