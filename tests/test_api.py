"""The JSON API contract of PRODUCT.md: POST and DELETE /api/v1/subscriptions."""

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient, TestServer

from mailer.bootstrap import Mailer, open_mailer
from mailer.domain.ledger import Evidence
from mailer.errors import NotFound
from mailer.services.ports import Clock
from mailer.statuses import SuppressionReason
from mailer.store import suppression
from mailer.web.app import create_app
from tests.conftest import auth, init_db, links, make_settings, path_of
from tests.harness import MutableClock, SinkServer, query, snapshot, wait_until

API = "/api/v1/subscriptions"
Client = TestClient[Any, Any]
STAFF = Evidence(channel="cli", actor="tests")

STAFF_EXPORT = Evidence(channel="cli", actor="cli:tests")


# --- helpers -------------------------------------------------------------------------------


async def opt_in(
    client: Client, key: str, email: str, slug: str = "news", **extra: Any
) -> ClientResponse:
    return await client.post(API, json={"email": email, "list": slug, **extra}, headers=auth(key))


async def opt_out(client: Client, key: str, email: str, slug: str | None = None) -> ClientResponse:
    body: dict[str, Any] = {"email": email}
    if slug is not None:
        body["list"] = slug
    return await client.delete(API, json=body, headers=auth(key))


async def error_of(r: ClientResponse, status: int) -> dict[str, str]:
    """Assert the documented error shape ``{"error": {"code", "message"}}`` and return it."""
    text = await r.text()
    assert r.status == status, text
    assert r.content_type == "application/json"
    body = await r.json()
    assert isinstance(body, dict)
    assert set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error, dict)
    assert set(error) == {"code", "message"}, body
    assert isinstance(error["code"], str) and error["code"]
    assert isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in error["message"]
    return error


async def accepted(r: ClientResponse) -> None:
    assert r.status == 202, await r.text()
    assert await r.json() == {"status": "pending"}


def outbox_rows(db_path: Path, email: str) -> list[tuple[Any, ...]]:
    return query(
        db_path,
        "SELECT o.kind, o.status, l.slug FROM outbox o JOIN subscriber s ON s.id = o.subscriber_id"
        " LEFT JOIN mailing_list l ON l.id = o.list_id WHERE s.email = ? ORDER BY o.id",
        email,
    )


async def drained(db_path: Path) -> None:
    """Wait until the worker has finished every queued message (sent, skipped or failed)."""
    await wait_until(
        lambda: not query(db_path, "SELECT 1 FROM outbox WHERE status IN ('queued', 'sending')"),
        what="the outbox to drain",
    )


async def next_message(sink: SinkServer, email: str, before: int) -> None:
    await wait_until(lambda: len(sink.to(email)) > before, what=f"a message to {email}")


async def subscribe(client: Client, sink: SinkServer, key: str, email: str, slug: str) -> None:
    """A confirmed subscription, the only way there is: API opt-in, then the confirm POST."""
    before = len(sink.to(email))
    await accepted(await opt_in(client, key, email, slug))
    await next_message(sink, email, before)
    r = await client.post(path_of(links(sink.to(email)[-1])["confirm"]))
    assert r.status == 200


async def suppress(mailer: Mailer, email: str, reason: str) -> None:
    """Put ``email`` on the suppression list the way each reason really arrives."""
    if reason == "manual":
        assert await mailer.people.suppress(email, STAFF)
    elif reason in ("unsubscribed", "erased"):
        await mailer.consent.unsubscribe_address(email, None, STAFF)
        if reason == "erased":
            await mailer.people.erase(email, STAFF)
    else:  # bounced / complained: what the bounce processor stores
        _, subject = mailer.consent.identify(email)
        now = mailer.clock.now()
        assert await mailer.db.write(suppression.put, subject, SuppressionReason(reason), now)
    assert (await mailer.people.show(email)).suppression == reason


async def statuses(mailer: Mailer, email: str) -> dict[str, str]:
    person = await mailer.people.show(email)
    return {s.list_slug: s.status for s in person.subscriptions}


@asynccontextmanager
async def own_mailer(
    tmp_path: Path, sink: SinkServer, clock: Clock | None = None, **overrides: Any
) -> AsyncIterator[tuple[Mailer, Client, str]]:
    """A running mailer with its own settings (and clock), a client, a list and a key."""
    settings = make_settings(tmp_path, smtp_host="127.0.0.1", smtp_port=sink.port, **overrides)
    await init_db(settings)
    async with open_mailer(settings, sending=True, clock=clock) as running:
        await running.lists.create("news", "Example News")
        key = await running.api_keys.create("tests")
        async with TestClient(TestServer(create_app(running))) as http:
            yield running, http, key


# --- 202 and "opt-in never subscribes" -------------------------------------------------------


async def test_opt_in_is_pending_until_the_confirm_post(
    client: Client, mailer: Mailer, sink: SinkServer, news: str, api_key: str
) -> None:
    """202 {"status":"pending"}; the subscription stays pending until the confirm POST."""
    r = await opt_in(client, api_key, "ann@example.org")
    assert r.status == 202
    assert r.content_type == "application/json"
    assert await r.read() == b'{"status": "pending"}'
    assert await statuses(mailer, "ann@example.org") == {"news": "pending"}
    await next_message(sink, "ann@example.org", 0)
    assert await statuses(mailer, "ann@example.org") == {"news": "pending"}
    confirm = path_of(links(sink.to("ann@example.org")[0])["confirm"])
    assert (await client.get(confirm)).status == 200
    assert await statuses(mailer, "ann@example.org") == {"news": "pending"}
    await accepted(await opt_in(client, api_key, "ann@example.org"))
    assert await statuses(mailer, "ann@example.org") == {"news": "pending"}
    assert (await client.post(confirm)).status == 200
    assert await statuses(mailer, "ann@example.org") == {"news": "confirmed"}


# --- 400 ---------------------------------------------------------------------------------------


async def _chunks(size: int) -> AsyncIterator[bytes]:
    yield b'{"email": "ann@example.org", "list": "news", "source": "'
    for _ in range(size // 1000):
        yield b"x" * 1000
    yield b'"}'


JSON = {"Content-Type": "application/json"}
BAD_BODIES: dict[str, Callable[[], dict[str, Any]]] = {
    "not-json": lambda: {"data": b'{"email": "ann@example.org", "list": ', "headers": JSON},
    "empty": lambda: {"data": b"", "headers": JSON},
    "array": lambda: {"json": [{"email": "ann@example.org", "list": "news"}]},
    "string": lambda: {"json": "ann@example.org"},
    "missing-email": lambda: {"json": {"list": "news"}},
    "unknown-field": lambda: {"json": {"email": "ann@example.org", "list": "news", "colour": 1}},
    "email-not-string": lambda: {"json": {"email": 5, "list": "news"}},
    "empty-list-slug": lambda: {"json": {"email": "ann@example.org", "list": ""}},
    "text-plain": lambda: {
        "data": b'{"email": "ann@example.org", "list": "news"}',
        "headers": {"Content-Type": "text/plain"},
    },
    "form": lambda: {"data": {"email": "ann@example.org", "list": "news"}},
    "too-large": lambda: {
        "json": {"email": "ann@example.org", "list": "news", "source": "x" * 20_000}
    },
    "too-large-chunked": lambda: {"data": _chunks(20_000), "headers": JSON},
    "too-large-chunked-past-client-max": lambda: {"data": _chunks(100_000), "headers": JSON},
    "deeply-nested": lambda: {"data": b"[" * 5000 + b"]" * 5000, "headers": JSON},
    "invalid-utf8": lambda: {
        "data": b'{"email": "\xff@example.org", "list": "news"}',
        "headers": JSON,
    },
}


@pytest.mark.parametrize("method", ["post", "delete"])
@pytest.mark.parametrize("case", sorted(BAD_BODIES))
async def test_bad_body_is_400_and_changes_nothing(
    client: Client, news: str, api_key: str, db_path: Path, case: str, method: str
) -> None:
    """Bad JSON, a non-object, a missing/unknown field, the wrong type or size -> 400."""
    kwargs = BAD_BODIES[case]()
    kwargs["headers"] = {**kwargs.get("headers", {}), **auth(api_key)}
    before = snapshot(db_path)
    r = await getattr(client, method)(API, **kwargs)
    error = await error_of(r, 400)
    assert error["code"] == "bad_request"
    assert snapshot(db_path) == before


async def test_opt_in_specific_400s(client: Client, news: str, api_key: str) -> None:
    """Fields only an opt-in has are checked too: ip, over-long and control-character names."""
    for extra in (
        {"ip": "not-an-ip"},
        {"name": "x" * 201},
        {"name": "Ann\r\nBcc: eve@example.org"},
        {"user_agent": "u" * 513},
    ):
        await error_of(await opt_in(client, api_key, "ann@example.org", **extra), 400)


# --- 401 ---------------------------------------------------------------------------------------


BAD_AUTH: dict[str, Callable[[str], dict[str, str]]] = {
    "no-header": lambda key: {},
    "basic-scheme": lambda key: {"Authorization": f"Basic {key}"},
    "no-scheme": lambda key: {"Authorization": key},
    "bearer-only": lambda key: {"Authorization": "Bearer"},
    "bearer-blank": lambda key: {"Authorization": "Bearer    "},
    "unknown-key": lambda key: {"Authorization": "Bearer mk_" + "A" * 43},
    "key-altered": lambda key: {
        "Authorization": f"Bearer {key[:-1]}{'B' if key[-1] != 'B' else 'C'}"
    },
}


@pytest.mark.parametrize("method", ["post", "delete"])
@pytest.mark.parametrize("case", sorted(BAD_AUTH))
async def test_bad_key_is_401_and_changes_nothing(
    client: Client, news: str, api_key: str, db_path: Path, case: str, method: str
) -> None:
    """No, malformed or unknown bearer key -> 401 with the error shape; nothing recorded."""
    before = snapshot(db_path)
    r = await getattr(client, method)(
        API, json={"email": "ann@example.org", "list": news}, headers=BAD_AUTH[case](api_key)
    )
    assert (await error_of(r, 401))["code"] == "unauthorized"
    assert snapshot(db_path) == before


async def test_revoked_key_is_refused_on_the_very_next_request(
    client: Client, mailer: Mailer, news: str, api_key: str
) -> None:
    """A revoked key gets 401 on the next request after revoke; other keys keep working."""
    other = await mailer.api_keys.create("other")
    await accepted(await opt_in(client, api_key, "ann@example.org"))
    await mailer.api_keys.revoke("tests")
    await error_of(await opt_in(client, api_key, "bob@example.org"), 401)
    await error_of(await opt_out(client, api_key, "ann@example.org"), 401)
    with pytest.raises(NotFound):
        await mailer.people.show("bob@example.org")
    await accepted(await opt_in(client, other, "bob@example.org"))


# --- 404 and 422 -------------------------------------------------------------------------------


async def test_unknown_list_is_404(
    client: Client, sink: SinkServer, news: str, api_key: str, db_path: Path
) -> None:
    """An unknown list slug -> 404 for POST and DELETE, known address or not; nothing changes."""
    await subscribe(client, sink, api_key, "ann@example.org", news)
    await drained(db_path)
    before = snapshot(db_path)
    for email in ("ann@example.org", "nobody@example.org"):
        error = await error_of(await opt_in(client, api_key, email, "no-such-list"), 404)
        assert error["code"] == "not_found"
        error = await error_of(await opt_out(client, api_key, email, "no-such-list"), 404)
        assert error["code"] == "not_found"
    assert snapshot(db_path) == before


INVALID_ADDRESSES = [
    "",
    "not-an-address",
    "ann@",
    "@example.org",
    "ann@example",
    '"ann smith"@example.org',
    "ann@[192.0.2.1]",
    "Ann <ann@example.org>",
    "ann@example.org\r\nBcc: eve@example.org",
    "a" * 65 + "@example.org",
    "ann@exa mple.org",
]


@pytest.mark.parametrize("address", INVALID_ADDRESSES)
async def test_invalid_address_is_422_with_a_readable_reason(
    client: Client, news: str, api_key: str, db_path: Path, address: str
) -> None:
    """An invalid address -> 422 invalid_address with a human sentence saying why."""
    before = snapshot(db_path)
    for r in (await opt_in(client, api_key, address), await opt_out(client, api_key, address)):
        error = await error_of(r, 422)
        assert error["code"] == "invalid_address"
        message = error["message"]
        assert " " in message and len(message) < 300, message
        assert "internal" not in message.lower()
    assert snapshot(db_path) == before


# --- 429 ---------------------------------------------------------------------------------------


async def test_rate_limit_is_per_key_with_retry_after(tmp_path: Path, sink: SinkServer) -> None:
    """Past the burst (2x the per-minute rate) a key gets 429 + Retry-After; others do not."""
    clock = MutableClock()
    async with own_mailer(tmp_path, sink, clock, api_rate_per_minute=2) as (mailer, client, key):
        other = await mailer.api_keys.create("other")
        for n in range(4):  # burst = 2 * 2
            await accepted(await opt_in(client, key, f"p{n}@example.org"))
        r = await opt_in(client, key, "late@example.org")
        assert (await error_of(r, 429))["code"] == "rate_limited"
        retry_after = int(r.headers["Retry-After"])
        assert 1 <= retry_after <= 60
        await error_of(await opt_out(client, key, "p0@example.org"), 429)
        with pytest.raises(NotFound):
            await mailer.people.show("late@example.org")
        await accepted(await opt_in(client, other, "other@example.org"))
        clock.advance(retry_after)
        await accepted(await opt_in(client, key, "late@example.org"))
        await error_of(await opt_in(client, key, "later@example.org"), 429)


# --- no enumeration ----------------------------------------------------------------------------


async def test_opt_in_answer_does_not_reveal_whether_an_address_is_known(
    client: Client, mailer: Mailer, sink: SinkServer, news: str, api_key: str
) -> None:
    """New, pending, confirmed, unsubscribed and suppressed addresses get byte-identical 202s."""
    await accepted(await opt_in(client, api_key, "pending@example.org"))
    await subscribe(client, sink, api_key, "confirmed@example.org", news)
    await subscribe(client, sink, api_key, "left-list@example.org", news)
    assert (await opt_out(client, api_key, "left-list@example.org", news)).status == 200
    await subscribe(client, sink, api_key, "left-all@example.org", news)
    assert (await opt_out(client, api_key, "left-all@example.org")).status == 200
    for reason in ("manual", "bounced", "complained", "erased"):
        await suppress(mailer, f"{reason}@example.org", reason)
    assert await statuses(mailer, "left-list@example.org") == {"news": "unsubscribed"}
    assert (await mailer.people.show("left-all@example.org")).suppression == "unsubscribed"

    async def answer(email: str) -> tuple[int, str, bytes, list[str]]:
        r = await opt_in(client, api_key, email)
        names = sorted(h for h in r.headers if h.lower() != "date")
        return r.status, r.headers["Content-Type"], await r.read(), names

    new = await answer("new@example.org")
    assert new[:3] == (202, "application/json; charset=utf-8", b'{"status": "pending"}')
    for email in (
        "pending@example.org",
        "confirmed@example.org",
        "left-list@example.org",
        "left-all@example.org",
        "manual@example.org",
        "bounced@example.org",
        "complained@example.org",
        "erased@example.org",
    ):
        assert await answer(email) == new, email


# --- confirmation request limits ----------------------------------------------------------------


async def test_resend_window_allows_one_confirmation_request(
    tmp_path: Path, sink: SinkServer, db_path: Path
) -> None:
    """Opt-ins within MAILER_CONFIRM_RESEND_MINUTES send one request; after the window, one more."""
    clock = MutableClock()
    async with own_mailer(tmp_path, sink, clock, confirm_resend_minutes=10) as (_, client, key):
        for _ in range(5):
            await accepted(await opt_in(client, key, "ann@example.org"))
        clock.advance(9 * 60)
        await accepted(await opt_in(client, key, "ann@example.org"))
        await drained(db_path)
        assert len(sink.to("ann@example.org")) == 1
        assert outbox_rows(db_path, "ann@example.org") == [("confirm", "sent", "news")]

        clock.advance(60 + 1)
        await accepted(await opt_in(client, key, "ann@example.org"))
        await next_message(sink, "ann@example.org", 1)
        await drained(db_path)
        assert len(sink.to("ann@example.org")) == 2
        assert [row[1] for row in outbox_rows(db_path, "ann@example.org")] == ["sent", "sent"]


async def test_daily_cap_across_lists(tmp_path: Path, sink: SinkServer, db_path: Path) -> None:
    """One address opting in to 5 lists within a day gets at most 3 confirmation requests."""
    clock = MutableClock()
    async with own_mailer(tmp_path, sink, clock) as (mailer, client, key):
        slugs = ["news", "l2", "l3", "l4", "l5"]
        for slug in slugs[1:]:
            await mailer.lists.create(slug, f"List {slug}")
        spellings = ["ann@example.org", "ANN@example.org", "Ann@EXAMPLE.org", "aNN@Example.Org"]
        for slug, email in zip(slugs, [*spellings, "ann@example.org"], strict=True):
            await accepted(await opt_in(client, key, email, slug))
            clock.advance(60)
        await drained(db_path)
        assert len(sink.messages) == 3
        assert [row[2] for row in outbox_rows(db_path, "ann@example.org")] == slugs[:3]
        assert "confirmed" not in (await statuses(mailer, "ann@example.org")).values()

        clock.advance(24 * 3600)
        await accepted(await opt_in(client, key, "ann@example.org", "l4"))
        await wait_until(lambda: len(sink.messages) == 4, what="a request the next day")
        assert [row[2] for row in outbox_rows(db_path, "ann@example.org")][-1] == "l4"


# --- suppressed addresses ------------------------------------------------------------------------


@pytest.mark.parametrize("reason", ["bounced", "complained", "manual"])
async def test_hard_suppression_gets_202_but_no_confirmation_request(
    client: Client,
    mailer: Mailer,
    sink: SinkServer,
    news: str,
    api_key: str,
    db_path: Path,
    reason: str,
) -> None:
    """Bounced, complained and manual suppressions answer 202 and send nothing."""
    await suppress(mailer, "held@example.org", reason)
    await accepted(await opt_in(client, api_key, "held@example.org"))
    await accepted(await opt_in(client, api_key, "control@example.org"))
    await next_message(sink, "control@example.org", 0)
    await drained(db_path)
    assert sink.to("held@example.org") == []
    assert outbox_rows(db_path, "held@example.org") == []
    assert (await mailer.people.show("held@example.org")).suppression == reason


@pytest.mark.parametrize("reason", ["unsubscribed", "erased"])
async def test_own_suppression_sends_a_request_and_only_the_confirm_post_lifts_it(
    client: Client,
    mailer: Mailer,
    sink: SinkServer,
    news: str,
    api_key: str,
    reason: str,
) -> None:
    """An unsubscribed/erased address gets a request; the suppression lifts only on confirm POST."""
    await suppress(mailer, "back@example.org", reason)
    await accepted(await opt_in(client, api_key, "back@example.org"))
    await next_message(sink, "back@example.org", 0)
    person = await mailer.people.show("back@example.org")
    assert person.suppression == reason
    assert [s.status for s in person.subscriptions] == ["pending"]
    confirm = path_of(links(sink.to("back@example.org")[0])["confirm"])
    assert (await client.get(confirm)).status == 200
    assert (await mailer.people.show("back@example.org")).suppression == reason
    assert (await client.post(confirm)).status == 200
    person = await mailer.people.show("back@example.org")
    assert person.suppression is None
    assert [s.status for s in person.subscriptions] == ["confirmed"]


# --- DELETE ------------------------------------------------------------------------------------


async def test_delete_with_list_unsubscribes_from_that_list_only(
    client: Client, mailer: Mailer, sink: SinkServer, news: str, api_key: str
) -> None:
    """DELETE with a list -> 200 {"status":"unsubscribed"}; other lists stay confirmed."""
    await mailer.lists.create("sports", "Sports")
    await subscribe(client, sink, api_key, "ann@example.org", news)
    await subscribe(client, sink, api_key, "ann@example.org", "sports")
    r = await opt_out(client, api_key, "ann@example.org", news)
    assert r.status == 200
    assert await r.json() == {"status": "unsubscribed"}
    assert await statuses(mailer, "ann@example.org") == {
        "news": "unsubscribed",
        "sports": "confirmed",
    }
    assert (await mailer.people.show("ann@example.org")).suppression is None


async def test_delete_without_list_is_global(
    client: Client, mailer: Mailer, sink: SinkServer, news: str, api_key: str
) -> None:
    """DELETE without a list unsubscribes every list and suppresses as 'unsubscribed'."""
    await mailer.lists.create("sports", "Sports")
    await subscribe(client, sink, api_key, "ann@example.org", news)
    await subscribe(client, sink, api_key, "ann@example.org", "sports")
    r = await opt_out(client, api_key, "ANN@example.org")
    assert r.status == 200
    assert await r.json() == {"status": "unsubscribed"}
    person = await mailer.people.show("ann@example.org")
    assert {s.list_slug: s.status for s in person.subscriptions} == {
        "news": "unsubscribed",
        "sports": "unsubscribed",
    }
    assert person.suppression == "unsubscribed"


async def test_delete_answer_does_not_reveal_whether_an_address_is_known(
    client: Client, sink: SinkServer, news: str, api_key: str
) -> None:
    """DELETE of an unknown address answers the same 200 body as for a subscribed one."""
    await subscribe(client, sink, api_key, "ann@example.org", news)
    for slug in (news, None):
        known = await opt_out(client, api_key, "ann@example.org", slug)
        unknown = await opt_out(client, api_key, f"nobody-{slug}@example.org", slug)
        assert known.status == unknown.status == 200
        assert await known.read() == await unknown.read() == b'{"status": "unsubscribed"}'


# --- evidence ----------------------------------------------------------------------------------


async def test_api_opt_in_evidence_in_the_ledger(
    client: Client, mailer: Mailer, news: str, api_key: str
) -> None:
    """The ledger records channel 'api', the key's name, and the person's ip/user agent."""
    r = await opt_in(
        client,
        api_key,
        "ann@example.org",
        source="signup-form",
        ip="203.0.113.7",
        user_agent="PersonBrowser/1.0",
    )
    await accepted(r)
    r = await client.post(
        API,
        json={"email": "bob@example.org", "list": news},
        headers={**auth(api_key), "User-Agent": "Service/2.0", "X-Forwarded-For": "198.51.100.9"},
    )
    await accepted(r)
    assert (await opt_out(client, api_key, "bob@example.org")).status == 200

    [ann] = (await mailer.people.export("ann@example.org", STAFF_EXPORT))["consent_events"]
    assert ann["event"] == "opt-in-requested"
    assert ann["channel"] == "api"
    assert ann["actor"].startswith("api-key:tests")
    assert "signup-form" in ann["actor"]
    assert (ann["ip"], ann["user_agent"]) == ("203.0.113.7", "PersonBrowser/1.0")

    bob_in, bob_out = (await mailer.people.export("bob@example.org", STAFF_EXPORT))[
        "consent_events"
    ]
    assert (bob_in["channel"], bob_in["actor"]) == ("api", "api-key:tests")
    # X-Forwarded-For is not believed from a peer outside MAILER_TRUSTED_PROXIES.
    assert (bob_in["ip"], bob_in["user_agent"]) == ("127.0.0.1", "Service/2.0")
    assert (bob_out["event"], bob_out["scope"], bob_out["channel"]) == (
        "unsubscribed",
        "global",
        "api",
    )
    assert bob_out["actor"] == "api-key:tests"


# --- the confirmation request carries nothing the submitter chose ------------------------------


async def test_confirmation_request_has_no_submitter_text(
    client: Client, mailer: Mailer, sink: SinkServer, news: str, api_key: str
) -> None:
    """A name or source with HTML and URLs never appears in the confirmation request."""
    name = "<b>http://evil.example</b> click here"
    r = await opt_in(client, api_key, "ann@example.org", name=name, source="https://evil2.example")
    await accepted(r)
    await next_message(sink, "ann@example.org", 0)
    assert (await mailer.people.export("ann@example.org", STAFF_EXPORT))["subscriber"][
        "name"
    ] == name
    message = sink.to("ann@example.org")[0].message
    text = message.get_body(("plain",))
    html = message.get_body(("html",))
    assert text is not None and html is not None
    headers = "\n".join(f"{k}: {v}" for k, v in message.items())
    for part in (text.get_content(), html.get_content(), headers):
        assert "Example News" in part
        for chosen in ("evil", "<b>", "&lt;b&gt;", "click here"):
            assert chosen not in part
