"""The subscriber's confirm and unsubscribe pages and their signed link tokens (G1, G3, G4).

Everything goes through the real aiohttp server on loopback, the real SQLite file and, where
a confirmation request is involved, the real worker and SMTP sink.
"""

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from mailer.bootstrap import Mailer, open_mailer
from mailer.config import Settings
from mailer.domain.ledger import Evidence
from mailer.domain.tokens import CONFIRM_MAX_AGE_SECONDS, LinkClaim, TokenCodec
from mailer.errors import BadToken
from mailer.services.ports import Clock
from mailer.web.app import RedactingAccessLogger, create_app, redact
from tests.conftest import SECRET, init_db, links, make_settings, path_of
from tests.harness import MutableClock, SinkServer, query, snapshot, wait_until

Client = TestClient[Any, Any]

CODEC = TokenCodec([SECRET], clock=time.time)
STAFF = Evidence(channel="cli", actor="tests")
SCANNERS = [
    "Mozilla/5.0 (compatible; Microsoft Office Protocol Discovery)",
    "Microsoft Office/16.0 (Windows NT 10.0; Microsoft Outlook 16.0.17328; Pro)",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Safe Links",
    "BarracudaCentral/1.0 (+http://www.barracudacentral.org)",
    "Mimecast-URL-Protect/1.0",
    "Proofpoint URL Defense",
    "Slackbot-LinkExpanding 1.0 (+https://api.slack.com/robots)",
    "facebookexternalhit/1.1",
    "curl/8.5.0",
    "python-requests/2.32.3",
]
ONE_CLICK = "List-Unsubscribe=One-Click"
MULTIPART_BOUNDARY = "----mailer-test-boundary-7MA4YWxkTrZu0gW"
MULTIPART_BODY = (
    f"--{MULTIPART_BOUNDARY}\r\n"
    'Content-Disposition: form-data; name="List-Unsubscribe"\r\n'
    "\r\n"
    "One-Click\r\n"
    f"--{MULTIPART_BOUNDARY}--\r\n"
).encode("ascii")
MAX_ONE_CLICK_BODY = 2048
SEVEN_DAYS = 7 * 24 * 3600
TEN_YEARS = 10 * 365 * 24 * 3600


# --- helpers -------------------------------------------------------------------------------


def subject_of(mailer: Mailer, email: str) -> str:
    return mailer.consent.identify(email)[1]


async def request(mailer: Mailer, email: str, slug: str) -> None:
    """An opt-in request as the API would record it (queues a confirmation request)."""
    await mailer.consent.request_opt_in(email, slug, None, Evidence(channel="api", actor="tests"))


async def confirmed(client: Client, mailer: Mailer, email: str, *slugs: str) -> str:
    """Subscribe ``email`` to each list and confirm through the page; return its hash."""
    subject = subject_of(mailer, email)
    for slug in slugs:
        await request(mailer, email, slug)
        uid = uid_of(mailer, slug)
        r = await client.post(f"/confirm/{CODEC.confirm_token(LinkClaim(subject, uid))}")
        assert r.status == 200, await r.text()
    return subject


def uid_of(mailer: Mailer, slug: str) -> str:
    """A list's uid, read from the mailer's database."""
    return str(
        query(mailer.settings.database_url, "SELECT uid FROM mailing_list WHERE slug = ?", slug)[0][
            0
        ]
    )


async def make_list(mailer: Mailer, slug: str, name: str) -> str:
    return (await mailer.lists.create(slug, name)).uid


def statuses(db_path: Path, subject: str) -> dict[str, str]:
    """The subject's subscription status per list slug."""
    rows = query(
        db_path,
        "SELECT l.slug, s.status FROM subscription s"
        " JOIN subscriber p ON p.id = s.subscriber_id"
        " JOIN mailing_list l ON l.id = s.list_id WHERE p.email_hash = ?",
        subject,
    )
    return dict(rows)


def suppression(db_path: Path, subject: str) -> str | None:
    rows = query(db_path, "SELECT reason FROM suppression WHERE email_hash = ?", subject)
    return rows[0][0] if rows else None


def ledger(db_path: Path, subject: str, event: str | None = None) -> list[tuple[Any, ...]]:
    """``(event, channel, scope, list_uid)`` of the subject's consent events, in order."""
    rows = query(
        db_path,
        "SELECT event, channel, scope, list_uid FROM consent_event"
        " WHERE subject_hash = ? ORDER BY seq",
        subject,
    )
    return [r for r in rows if event is None or r[0] == event]


def in_flight(db_path: Path) -> int:
    return int(
        query(db_path, "SELECT count(*) FROM outbox WHERE status IN ('queued', 'sending')")[0][0]
    )


async def settled(db_path: Path, sink: SinkServer | None = None, count: int = 0) -> None:
    """Wait until no outbox row is in flight (and the sink holds ``count`` messages)."""

    def done() -> bool:
        return in_flight(db_path) == 0 and (sink is None or len(sink.messages) == count)

    await wait_until(done, what="the worker to finish the outbox")


def token_of(url: str) -> str:
    return url.rsplit("/", 1)[1]


@asynccontextmanager
async def running(
    settings: Settings, *, sending: bool = False, clock: Clock | None = None
) -> AsyncIterator[tuple[Mailer, Client]]:
    """A mailer on ``settings`` (initialised if needed) and a client on its real server."""
    await init_db(settings)
    async with (
        open_mailer(settings, sending=sending, clock=clock) as mailer,
        TestClient(TestServer(create_app(mailer))) as http,
    ):
        yield mailer, http


def assert_token_page_headers(response: aiohttp.ClientResponse) -> None:
    assert response.headers.get("Referrer-Policy") == "no-referrer"
    csp = response.headers.get("Content-Security-Policy", "")
    assert "frame-ancestors 'none'" in csp, csp


async def assert_bad_link(response: aiohttp.ClientResponse, what: str) -> None:
    body = await response.text()
    assert response.status == 400, f"{what}: {response.status} {body[:200]}"
    assert response.content_type == "text/html", what
    assert "This link does not work" in body, what
    assert_token_page_headers(response)


# --- GET changes nothing (G1, link scanners) ---------------------------------------------


async def test_scanner_fetches_change_nothing(
    client: Client, mailer: Mailer, sink: SinkServer, news: str, db_path: Path
) -> None:
    """GET/HEAD/OPTIONS of confirm and unsubscribe links by scanners change no row, send no mail."""
    await request(mailer, "scan@example.org", news)
    await settled(db_path, sink, 1)
    found = links(sink.messages[0])
    confirm, unsubscribe = path_of(found["confirm"]), path_of(found["unsubscribe"])
    before = snapshot(db_path)
    assert before["subscription"] and before["consent_event"]

    for path in (confirm, unsubscribe):
        r = await client.get(path)
        assert r.status == 200
        assert snapshot(db_path) == before, f"one GET of {path} changed the database"

    for i in range(50):
        agent = SCANNERS[i % len(SCANNERS)]
        headers = {"User-Agent": agent, "X-Forwarded-For": f"203.0.113.{i}"}
        for path in (confirm, unsubscribe):
            r = await client.get(path, headers=headers)
            assert r.status == 200, (path, agent)
            await r.read()
    for method, status in (("HEAD", 200), ("OPTIONS", 405)):
        for path in (confirm, unsubscribe):
            r = await client.request(method, path, headers={"User-Agent": SCANNERS[0]})
            assert r.status == status, (method, path, r.status)
            await r.read()

    await asyncio.sleep(0.3)  # several worker polls: anything queued by a GET would be sent
    assert snapshot(db_path) == before
    assert len(sink.messages) == 1
    subject = subject_of(mailer, "scan@example.org")
    assert statuses(db_path, subject) == {"news": "pending"}
    assert suppression(db_path, subject) is None


async def test_head_is_answered_like_get_and_options_is_refused(
    client: Client, mailer: Mailer, news: str
) -> None:
    """aiohttp answers HEAD on the token pages (200, page headers) and OPTIONS with 405."""
    await request(mailer, "head@example.org", news)
    claim = LinkClaim(subject_of(mailer, "head@example.org"), uid_of(mailer, news))
    for path in (
        f"/confirm/{CODEC.confirm_token(claim)}",
        f"/unsubscribe/{CODEC.unsubscribe_token(claim)}",
    ):
        r = await client.head(path)
        assert r.status == 200
        assert_token_page_headers(r)
        r = await client.options(path)
        assert r.status == 405
        assert set(r.headers["Allow"].split(",")) == {"GET", "HEAD", "POST"}


# --- POST /confirm ----------------------------------------------------------------------------


async def test_confirm_post_confirms_once(
    client: Client, mailer: Mailer, sink: SinkServer, news: str, db_path: Path
) -> None:
    """POST /confirm confirms with a 'page' ledger event; repeating it is a harmless 200."""
    await request(mailer, "ann@example.org", news)
    await settled(db_path, sink, 1)
    confirm = path_of(links(sink.messages[0])["confirm"])
    subject = subject_of(mailer, "ann@example.org")
    assert statuses(db_path, subject) == {"news": "pending"}

    r = await client.post(confirm, headers={"User-Agent": "Firefox"})
    body = await r.text()
    assert r.status == 200
    assert "You are subscribed to Example News" in body
    assert_token_page_headers(r)
    assert statuses(db_path, subject) == {"news": "confirmed"}
    uid = uid_of(mailer, news)
    assert ledger(db_path, subject, "confirmed") == [("confirmed", "page", "list", uid)]
    evidence = query(
        db_path,
        "SELECT ip, user_agent FROM consent_event WHERE subject_hash = ? AND event = 'confirmed'",
        subject,
    )
    assert evidence == [("127.0.0.1", "Firefox")]

    after_first = snapshot(db_path)
    for _ in range(3):
        r = await client.post(confirm)
        assert r.status == 200
        assert "You are subscribed to Example News" in await r.text()
    assert snapshot(db_path) == after_first
    assert len(ledger(db_path, subject, "confirmed")) == 1


# --- POST /unsubscribe: RFC 8058 one-click ----------------------------------------------------


async def post_one_click(client: Client, path: str, encoding: str) -> aiohttp.ClientResponse:
    if encoding == "urlencoded":
        return await client.post(path, data={"List-Unsubscribe": "One-Click"})
    if encoding == "urlencoded-raw":
        return await client.post(
            path,
            data=ONE_CLICK.encode("ascii"),
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
    if encoding == "multipart-formdata":
        form = aiohttp.FormData()
        form.add_field("List-Unsubscribe", "One-Click", content_type="text/plain")
        assert form.is_multipart
        return await client.post(path, data=form)
    assert encoding == "multipart-raw"
    return await client.post(
        path,
        data=MULTIPART_BODY,
        headers={"Content-Type": f"multipart/form-data; boundary={MULTIPART_BOUNDARY}"},
    )


@pytest.mark.parametrize(
    "encoding", ["urlencoded", "urlencoded-raw", "multipart-formdata", "multipart-raw"]
)
async def test_one_click_post(
    client: Client, mailer: Mailer, news: str, db_path: Path, encoding: str
) -> None:
    """RFC 8058 POST: 200, no Location/Set-Cookie, < 2 KB, flips state; repeats change nothing."""
    await make_list(mailer, "tech", "Tech Notes")
    subject = await confirmed(client, mailer, "bob@example.org", news, "tech")
    token = CODEC.unsubscribe_token(LinkClaim(subject, uid_of(mailer, news)))

    r = await post_one_click(client, f"/unsubscribe/{token}", encoding)
    body = await r.read()
    assert r.status == 200
    assert "Location" not in r.headers
    assert "Set-Cookie" not in r.headers
    assert len(body) < MAX_ONE_CLICK_BODY, f"one-click answer is {len(body)} bytes"
    assert "You are unsubscribed from Example News" in body.decode("utf-8")
    assert_token_page_headers(r)
    assert statuses(db_path, subject) == {"news": "unsubscribed", "tech": "confirmed"}
    assert suppression(db_path, subject) is None  # the header one-click is list-scoped
    uid = uid_of(mailer, news)
    assert ledger(db_path, subject, "unsubscribed") == [("unsubscribed", "one-click", "list", uid)]

    await settled(db_path)
    after_first = snapshot(db_path)
    for _ in range(10):
        r = await post_one_click(client, f"/unsubscribe/{token}", encoding)
        assert r.status == 200
        assert "Location" not in r.headers and "Set-Cookie" not in r.headers
        await r.read()
    assert snapshot(db_path) == after_first
    assert len(ledger(db_path, subject, "unsubscribed")) == 1


async def test_one_click_never_redirects_even_when_asked(
    client: Client, mailer: Mailer, news: str, db_path: Path
) -> None:
    """Redirect-looking query parameters on a one-click POST still get a 200, never a 3xx."""
    subject = await confirmed(client, mailer, "red@example.org", news)
    token = CODEC.unsubscribe_token(LinkClaim(subject, uid_of(mailer, news)))
    r = await client.post(
        f"/unsubscribe/{token}?next=https://evil.example/&redirect=//evil.example",
        data={"List-Unsubscribe": "One-Click"},
        allow_redirects=False,
    )
    assert r.status == 200
    assert "Location" not in r.headers
    assert statuses(db_path, subject) == {"news": "unsubscribed"}


# --- the page's form: scope --------------------------------------------------------------


async def test_page_form_scope_all_unsubscribes_everything(
    client: Client, mailer: Mailer, news: str, db_path: Path
) -> None:
    """A list-scoped link posted with scope=all unsubscribes every list and suppresses."""
    await make_list(mailer, "tech", "Tech Notes")
    subject = await confirmed(client, mailer, "cat@example.org", news, "tech")
    other = await confirmed(client, mailer, "dan@example.org", news, "tech")
    token = CODEC.unsubscribe_token(LinkClaim(subject, uid_of(mailer, news)))

    r = await client.post(f"/unsubscribe/{token}", data={"scope": "all"})
    assert r.status == 200
    assert "You are unsubscribed from all mail from Example Org" in await r.text()
    assert statuses(db_path, subject) == {"news": "unsubscribed", "tech": "unsubscribed"}
    assert suppression(db_path, subject) == "unsubscribed"
    assert ledger(db_path, subject, "unsubscribed") == [("unsubscribed", "page", "global", None)]
    assert statuses(db_path, other) == {"news": "confirmed", "tech": "confirmed"}
    assert suppression(db_path, other) is None


async def test_page_form_scope_list_unsubscribes_only_that_list(
    client: Client, mailer: Mailer, news: str, db_path: Path
) -> None:
    """A list-scoped link posted with scope=list unsubscribes that list only, no suppression."""
    await make_list(mailer, "tech", "Tech Notes")
    subject = await confirmed(client, mailer, "eve@example.org", news, "tech")
    token = CODEC.unsubscribe_token(LinkClaim(subject, uid_of(mailer, "tech")))

    r = await client.post(f"/unsubscribe/{token}", data={"scope": "list"})
    assert r.status == 200
    assert "You are unsubscribed from Tech Notes" in await r.text()
    assert statuses(db_path, subject) == {"news": "confirmed", "tech": "unsubscribed"}
    assert suppression(db_path, subject) is None
    uid = uid_of(mailer, "tech")
    assert ledger(db_path, subject, "unsubscribed") == [("unsubscribed", "page", "list", uid)]


async def test_confirmation_request_unsubscribe_link_is_global(
    client: Client, mailer: Mailer, sink: SinkServer, news: str, db_path: Path
) -> None:
    """The "this wasn't me" link of a confirmation request (body and header) is global."""
    await make_list(mailer, "tech", "Tech Notes")
    subject = await confirmed(client, mailer, "fay@example.org", "tech")
    await request(mailer, "fay@example.org", news)
    await settled(db_path)  # tech's request may be skipped: it was confirmed before it went
    message = next(m for m in sink.messages if "Example News" in m.message["Subject"])
    body_link = token_of(links(message)["unsubscribe"])
    header = str(message.message["List-Unsubscribe"])
    header_link = header.strip("<>").rsplit("/", 1)[1]
    for token in (body_link, header_link):
        assert CODEC.read_unsubscribe(token) == LinkClaim(subject, None)

    page = await client.get(f"/unsubscribe/{body_link}")
    html = await page.text()
    assert "Unsubscribe from all mail from Example Org" in html
    assert 'type="radio"' not in html

    r = await client.post(f"/unsubscribe/{body_link}", data={"scope": "all"})
    assert r.status == 200
    assert statuses(db_path, subject) == {"news": "unsubscribed", "tech": "unsubscribed"}
    assert suppression(db_path, subject) == "unsubscribed"


async def test_global_link_one_click_is_global(
    client: Client, mailer: Mailer, sink: SinkServer, news: str, db_path: Path
) -> None:
    """A one-click POST of a confirmation request's link stops every list (it is global)."""
    await make_list(mailer, "tech", "Tech Notes")
    subject = await confirmed(client, mailer, "gus@example.org", "tech")
    await request(mailer, "gus@example.org", news)
    await settled(db_path)  # tech's request may be skipped: it was confirmed before it went
    message = next(m for m in sink.messages if "Example News" in m.message["Subject"])
    r = await client.post(
        path_of(links(message)["unsubscribe"]), data={"List-Unsubscribe": "One-Click"}
    )
    assert r.status == 200
    assert statuses(db_path, subject) == {"news": "unsubscribed", "tech": "unsubscribed"}
    assert suppression(db_path, subject) == "unsubscribed"
    assert ledger(db_path, subject, "unsubscribed") == [
        ("unsubscribed", "one-click", "global", None)
    ]


# --- tampered and cross-purpose tokens --------------------------------------------------------


def _other(char: str) -> str:
    """A different character of the same alphabet (hex digit, base64url, or separator)."""
    for candidate in "0123456789abcdefABCDEF_-":
        if candidate != char and (char.isalnum() == candidate.isalnum()):
            return candidate
    raise AssertionError(char)


def _replace(token: str, index: int) -> str:
    return token[:index] + _other(token[index]) + token[index + 1 :]


def tampered(token: str) -> dict[str, str]:
    """Single mutations of a genuine token, by name."""
    signature_at = token.rindex(".") + 1
    signature = token[signature_at:]
    cases = {
        "payload first char": _replace(token, 0),
        "payload hash last char": _replace(token, 31),
        "payload list part": _replace(token, 33),
        "signature first char": _replace(token, signature_at),
        "signature middle char": _replace(token, signature_at + len(signature) // 2),
        "truncated by one": token[:-1],
        "truncated to half": token[: len(token) // 2],
        "signature removed": token[: signature_at - 1],
        "appended char": token + "A",
        "appended segment": token + ".AAAA",
        "upper case": token.upper(),
        "swapped case": token.swapcase(),
        "one char case changed": token[:signature_at] + signature[0].swapcase() + signature[1:]
        if signature[0].isalpha()
        else _replace(token, signature_at),
        "non-ascii appended": token + "é",
        "invalid utf-8 escape": token + "%FF",
        "separator dropped": token.replace("~", "", 1),
    }
    if token.count(".") == 2:  # timed (confirm) token: payload.timestamp.signature
        cases["timestamp char"] = _replace(token, token.index(".") + 2)
    return {name: t for name, t in cases.items() if t != token}


async def test_tampered_tokens_get_a_400_page(
    client: Client, mailer: Mailer, news: str, db_path: Path
) -> None:
    """Every single mutation of a confirm or unsubscribe token -> 400 page, never 5xx, no change."""
    await request(mailer, "hal@example.org", news)
    claim = LinkClaim(subject_of(mailer, "hal@example.org"), uid_of(mailer, news))
    genuine = {
        "confirm": CODEC.confirm_token(claim),
        "unsubscribe": CODEC.unsubscribe_token(claim),
    }
    await settled(db_path)
    before = snapshot(db_path)
    for route, token in genuine.items():
        cases = tampered(token)
        assert len(cases) >= 14
        for name, bad in cases.items():
            for method in ("GET", "POST"):
                data = {"List-Unsubscribe": "One-Click"} if route == "unsubscribe" else None
                r = await client.request(method, f"/{route}/{bad}", data=data)
                await assert_bad_link(r, f"{method} /{route} {name}: {bad}")
    assert snapshot(db_path) == before
    for route, token in genuine.items():  # the genuine ones still work afterwards
        assert (await client.get(f"/{route}/{token}")).status == 200


async def test_tokens_are_refused_at_the_other_route(
    client: Client, mailer: Mailer, news: str, db_path: Path
) -> None:
    """A confirm token at /unsubscribe and an unsubscribe token at /confirm -> 400, no change."""
    await request(mailer, "ida@example.org", news)
    subject = subject_of(mailer, "ida@example.org")
    uid = uid_of(mailer, news)
    await settled(db_path)
    before = snapshot(db_path)
    for claim in (LinkClaim(subject, uid), LinkClaim(subject, None)):
        confirm, unsubscribe = CODEC.confirm_token(claim), CODEC.unsubscribe_token(claim)
        for method in ("GET", "POST"):
            r = await client.request(
                method, f"/unsubscribe/{confirm}", data={"List-Unsubscribe": "One-Click"}
            )
            await assert_bad_link(r, f"{method} confirm token at /unsubscribe")
            r = await client.request(method, f"/confirm/{unsubscribe}")
            await assert_bad_link(r, f"{method} unsubscribe token at /confirm")
    assert snapshot(db_path) == before
    assert statuses(db_path, subject) == {"news": "pending"}


# --- key rotation ------------------------------------------------------------------------


async def test_first_configured_key_signs(tmp_path: Path, sink: SinkServer, db_path: Path) -> None:
    """With MAILER_SECRET_KEYS="K2,K1" mailed tokens verify under K2 alone and not under K1."""
    settings = make_settings(
        tmp_path, smtp_host="127.0.0.1", smtp_port=sink.port, secret_keys="K2,K1"
    )
    async with running(settings, sending=True) as (mailer, _):
        await mailer.lists.create("news", "Example News")
        await request(mailer, "jo@example.org", "news")
        await settled(db_path, sink, 1)
    found = links(sink.messages[0])
    only_k2 = TokenCodec(["K2"], clock=time.time)
    only_k1 = TokenCodec(["K1"], clock=time.time)
    confirm, unsubscribe = token_of(found["confirm"]), token_of(found["unsubscribe"])
    assert only_k2.read_confirm(confirm).list_uid is not None
    assert only_k2.read_unsubscribe(unsubscribe).is_global
    with pytest.raises(BadToken):
        only_k1.read_confirm(confirm)
    with pytest.raises(BadToken):
        only_k1.read_unsubscribe(unsubscribe)


async def test_old_key_tokens_verify_after_rotation(
    tmp_path: Path, sink: SinkServer, db_path: Path
) -> None:
    """Tokens minted under K1 keep working at a server configured "K2,K1" (and "K3,K2,K1")."""
    old = TokenCodec(["K1"], clock=time.time)
    async with running(make_settings(tmp_path, secret_keys="K1")) as (mailer, _):
        uid = await make_list(mailer, "news", "Example News")
        await request(mailer, "kim@example.org", "news")
        await request(mailer, "lou@example.org", "news")
        kim, lou = subject_of(mailer, "kim@example.org"), subject_of(mailer, "lou@example.org")
    kim_confirm = old.confirm_token(LinkClaim(kim, uid))
    lou_confirm = old.confirm_token(LinkClaim(lou, uid))
    kim_unsubscribe = old.unsubscribe_token(LinkClaim(kim, uid))
    lou_unsubscribe = old.unsubscribe_token(LinkClaim(lou, None))

    async with running(make_settings(tmp_path, secret_keys="K2,K1")) as (_, http):
        assert (await http.get(f"/confirm/{kim_confirm}")).status == 200
        assert (await http.post(f"/confirm/{kim_confirm}")).status == 200
        assert statuses(db_path, kim) == {"news": "confirmed"}
        assert (await http.get(f"/unsubscribe/{kim_unsubscribe}")).status == 200
        r = await http.post(
            f"/unsubscribe/{kim_unsubscribe}", data={"List-Unsubscribe": "One-Click"}
        )
        assert r.status == 200
        assert statuses(db_path, kim) == {"news": "unsubscribed"}

    async with running(make_settings(tmp_path, secret_keys="K3,K2,K1")) as (_, http):
        assert (await http.post(f"/confirm/{lou_confirm}")).status == 200
        assert statuses(db_path, lou) == {"news": "confirmed"}
        r = await http.post(
            f"/unsubscribe/{lou_unsubscribe}", data={"List-Unsubscribe": "One-Click"}
        )
        assert r.status == 200
        assert statuses(db_path, lou) == {"news": "unsubscribed"}
        assert suppression(db_path, lou) == "unsubscribed"


async def test_tokens_of_a_removed_key_are_refused(tmp_path: Path, db_path: Path) -> None:
    """A key dropped from MAILER_SECRET_KEYS no longer verifies anything, unsubscribe included.

    G4 holds only while retired keys stay in the list (after the signing one); this pins what
    the code does when a key is removed entirely: its links answer the 400 page.
    """
    old = TokenCodec(["K1"], clock=time.time)
    async with running(make_settings(tmp_path, secret_keys="K1")) as (mailer, _):
        uid = await make_list(mailer, "news", "Example News")
        await request(mailer, "max@example.org", "news")
        subject = subject_of(mailer, "max@example.org")
    before = snapshot(db_path)
    async with running(make_settings(tmp_path, secret_keys="K2")) as (_, http):
        for route, token in (
            ("confirm", old.confirm_token(LinkClaim(subject, uid))),
            ("unsubscribe", old.unsubscribe_token(LinkClaim(subject, uid))),
            ("unsubscribe", old.unsubscribe_token(LinkClaim(subject, None))),
        ):
            await assert_bad_link(await http.get(f"/{route}/{token}"), f"GET {route}")
            await assert_bad_link(await http.post(f"/{route}/{token}"), f"POST {route}")
    assert snapshot(db_path) == before


# --- expiry ----------------------------------------------------------------------------------


async def test_confirm_token_expires_after_seven_days(
    tmp_path: Path, sink: SinkServer, db_path: Path
) -> None:
    """A mailed confirm link works at 7 days - 1 s and answers 400 at 7 days + 1 s."""
    assert CONFIRM_MAX_AGE_SECONDS == SEVEN_DAYS
    clock = MutableClock()
    settings = make_settings(tmp_path, smtp_host="127.0.0.1", smtp_port=sink.port)
    async with running(settings, sending=True, clock=clock) as (mailer, http):
        await mailer.lists.create("news", "Example News")
        await request(mailer, "ned@example.org", "news")
        await request(mailer, "ola@example.org", "news")
        await settled(db_path, sink, 2)
        by_recipient = {m.rcpt_tos[0]: links(m)["confirm"] for m in sink.messages}
        ned, ola = (
            path_of(by_recipient["ned@example.org"]),
            path_of(by_recipient["ola@example.org"]),
        )

        clock.advance(SEVEN_DAYS - 1)
        r = await http.get(ned)
        assert r.status == 200
        assert_token_page_headers(r)
        assert (await http.post(ned)).status == 200
        assert statuses(db_path, subject_of(mailer, "ned@example.org")) == {"news": "confirmed"}

        clock.advance(2)
        before = snapshot(db_path)
        for path in (ola, ned):
            await assert_bad_link(await http.get(path), f"GET {path} after 7 days + 1 s")
            await assert_bad_link(await http.post(path), f"POST {path} after 7 days + 1 s")
        assert "expired" in await (await http.post(ola)).text()
        assert snapshot(db_path) == before
        assert statuses(db_path, subject_of(mailer, "ola@example.org")) == {"news": "pending"}


async def test_unsubscribe_token_never_expires(
    tmp_path: Path, sink: SinkServer, db_path: Path
) -> None:
    """A mailed unsubscribe link still unsubscribes ten years later (G4)."""
    clock = MutableClock()
    settings = make_settings(tmp_path, smtp_host="127.0.0.1", smtp_port=sink.port)
    async with running(settings, sending=True, clock=clock) as (mailer, http):
        await mailer.lists.create("news", "Example News")
        await request(mailer, "pia@example.org", "news")
        await settled(db_path, sink, 1)
        unsubscribe = path_of(links(sink.messages[0])["unsubscribe"])
        clock.advance(TEN_YEARS)
        assert (await http.get(unsubscribe)).status == 200
        r = await http.post(unsubscribe, data={"List-Unsubscribe": "One-Click"})
        assert r.status == 200
        subject = subject_of(mailer, "pia@example.org")
        assert statuses(db_path, subject) == {"news": "unsubscribed"}
        assert suppression(db_path, subject) == "unsubscribed"


# --- G4: after erasure, after list deletion --------------------------------------------------


async def test_unsubscribe_link_works_after_erasure(
    client: Client, mailer: Mailer, sink: SinkServer, news: str, db_path: Path
) -> None:
    """An erased person's unsubscribe link still answers 200 and the suppression stays."""
    await request(mailer, "quinn@example.org", news)
    await settled(db_path, sink, 1)
    unsubscribe = path_of(links(sink.messages[0])["unsubscribe"])
    subject = subject_of(mailer, "quinn@example.org")
    assert (await client.post(path_of(links(sink.messages[0])["confirm"]))).status == 200
    await mailer.people.erase("quinn@example.org", STAFF)
    assert query(db_path, "SELECT count(*) FROM subscriber") == [(0,)]
    assert suppression(db_path, subject) == "erased"

    ledger_before = query(db_path, "SELECT count(*) FROM consent_event")
    r = await client.get(unsubscribe)
    assert r.status == 200
    for _ in range(2):
        r = await client.post(unsubscribe, data={"List-Unsubscribe": "One-Click"})
        assert r.status == 200
        assert "You are unsubscribed" in await r.text()
    # still suppressed as erased, and no new record (no ip, no user agent) about the person
    assert suppression(db_path, subject) == "erased"
    assert query(db_path, "SELECT count(*) FROM consent_event") == ledger_before
    assert query(db_path, "SELECT count(*) FROM subscriber") == [(0,)]
    assert query(db_path, "SELECT count(*) FROM subscription") == [(0,)]


async def test_list_scoped_link_works_after_list_deletion(
    client: Client, mailer: Mailer, news: str, db_path: Path
) -> None:
    """A list-scoped unsubscribe link answers 200 after the list row was deleted (G4)."""
    await make_list(mailer, "tech", "Tech Notes")
    subject = await confirmed(client, mailer, "ray@example.org", news, "tech")
    token = CODEC.unsubscribe_token(LinkClaim(subject, uid_of(mailer, news)))

    query(db_path, "DELETE FROM mailing_list WHERE slug = 'news'")
    assert statuses(db_path, subject) == {"tech": "confirmed"}

    r = await client.get(f"/unsubscribe/{token}")
    assert r.status == 200
    assert_token_page_headers(r)
    for data in ({"List-Unsubscribe": "One-Click"}, {"scope": "list"}):
        r = await client.post(f"/unsubscribe/{token}", data=data)
        assert r.status == 200, data
        assert "You are unsubscribed" in await r.text()
    assert statuses(db_path, subject) == {"tech": "confirmed"}

    r = await client.post(f"/unsubscribe/{token}", data={"scope": "all"})
    assert r.status == 200
    assert statuses(db_path, subject) == {"tech": "unsubscribed"}
    assert suppression(db_path, subject) == "unsubscribed"


# --- security headers -------------------------------------------------------------------


async def test_security_headers_on_every_token_page(
    client: Client, mailer: Mailer, news: str
) -> None:
    """Referrer-Policy no-referrer and frame-ancestors 'none' on GET/POST, 200 and 400 pages."""
    uid = uid_of(mailer, news)
    await request(mailer, "sue@example.org", news)
    subject = subject_of(mailer, "sue@example.org")
    confirm = CODEC.confirm_token(LinkClaim(subject, uid))
    unsubscribe = CODEC.unsubscribe_token(LinkClaim(subject, uid))
    seen: set[tuple[str, int]] = set()
    for method, path, data in (
        ("GET", f"/confirm/{confirm}", None),
        ("POST", f"/confirm/{confirm}", None),
        ("GET", f"/unsubscribe/{unsubscribe}", None),
        ("POST", f"/unsubscribe/{unsubscribe}", {"scope": "list"}),
        ("GET", f"/confirm/{confirm}x", None),
        ("POST", f"/confirm/{confirm}x", None),
        ("GET", f"/unsubscribe/{unsubscribe}x", None),
        ("POST", f"/unsubscribe/{unsubscribe}x", {"List-Unsubscribe": "One-Click"}),
    ):
        r = await client.request(method, path, data=data)
        await r.read()
        assert r.status in (200, 400)
        assert_token_page_headers(r)
        seen.add((method, r.status))
    assert seen == {("GET", 200), ("POST", 200), ("GET", 400), ("POST", 400)}


# --- access log --------------------------------------------------------------------------


def test_redact_keeps_at_most_six_token_characters() -> None:
    """``redact`` shortens confirm and unsubscribe tokens and leaves other paths alone."""
    token = CODEC.unsubscribe_token(LinkClaim("0123456789abcdef0123456789abcdef", None))
    assert redact(f"/unsubscribe/{token}") == f"/unsubscribe/{token[:6]}…"
    assert redact(f"/confirm/{token}") == f"/confirm/{token[:6]}…"
    assert redact(f"/confirm/{token}/") == f"/confirm/{token[:6]}…/"
    assert redact("/unsubscribe/abc") == "/unsubscribe/abc…"
    assert token not in redact(f"/unsubscribe/{token}")
    for path in ("/privacy", "/healthz", "/api/v1/subscriptions", "/"):
        assert redact(path) == path


def test_redact_also_shortens_tokens_in_near_miss_paths() -> None:
    """A whole token in a path that misses the route (doubled slash, case, prefix) is cut too."""
    token = CODEC.unsubscribe_token(LinkClaim("0123456789abcdef0123456789abcdef", None))
    for path in (
        f"//unsubscribe/{token}",
        f"/Unsubscribe/{token}",
        f"/CONFIRM/{token}",
        f"/mailer/unsubscribe/{token}",
    ):
        shortened = redact(path)
        assert token not in shortened, path
        assert shortened.endswith(f"/{token[:6]}…"), shortened


async def test_access_log_never_holds_a_whole_token(
    mailer: Mailer, news: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A real server with RedactingAccessLogger logs tokens shortened and no query string."""
    caplog.set_level(logging.INFO, logger="aiohttp.access")
    await request(mailer, "tim@example.org", news)
    claim = LinkClaim(subject_of(mailer, "tim@example.org"), uid_of(mailer, news))
    confirm, unsubscribe = CODEC.confirm_token(claim), CODEC.unsubscribe_token(claim)
    runner = web.AppRunner(create_app(mailer), access_log_class=RedactingAccessLogger)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        base = f"http://{host}:{port}"
        async with aiohttp.ClientSession() as session:
            for method, path in (
                ("GET", f"/confirm/{confirm}?email=tim@example.org"),
                ("GET", f"/unsubscribe/{unsubscribe}"),
                ("POST", f"/unsubscribe/{unsubscribe}x"),
                ("POST", f"/confirm/{confirm}"),
                ("GET", f"/Unsubscribe/{unsubscribe}"),
            ):
                async with session.request(method, base + path) as r:
                    await r.read()
                    assert r.status in (200, 400, 404)

        def logged() -> list[str]:
            return [r.getMessage() for r in caplog.records if r.name == "aiohttp.access"]

        await wait_until(lambda: len(logged()) >= 5, what="five access log lines")
    finally:
        await runner.cleanup()
    lines = logged()
    assert len(lines) == 5, lines
    for line in lines:
        for secret in (confirm, unsubscribe, claim.subject_hash, "tim@example.org", "email="):
            assert secret not in line, line
    assert any(f"/confirm/{confirm[:6]}…" in line for line in lines), lines
    assert any(f"/unsubscribe/{unsubscribe[:6]}…" in line for line in lines), lines


# --- accessible HTML ---------------------------------------------------------------------


class PageAudit(HTMLParser):
    """Collects what the accessibility checks need from one page."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.lang: str | None = None
        self.title = ""
        self.viewport = False
        self.controls: list[tuple[str, dict[str, str | None], bool]] = []
        self.label_for: set[str] = set()
        self.label_texts: list[str] = []
        self.buttons: list[str] = []
        self.legends: list[str] = []
        self._stack: list[str] = []
        self._text: dict[str, list[str]] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "html":
            self.lang = found.get("lang")
        elif tag == "meta" and found.get("name") == "viewport":
            self.viewport = bool(found.get("content"))
        elif tag == "label" and found.get("for"):
            self.label_for.add(str(found["for"]))
        elif tag in ("input", "select", "textarea"):
            self.controls.append((tag, found, "label" in self._stack))
        if tag in ("title", "label", "button", "legend"):
            self._text[tag] = []
        if tag not in ("meta", "input", "br", "link", "img"):
            self._stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in self._stack:
            while self._stack.pop() != tag:
                pass
        text = " ".join("".join(self._text.pop(tag, [])).split())
        if tag == "title":
            self.title = text
        elif tag == "label":
            self.label_texts.append(text)
        elif tag == "button":
            self.buttons.append(text)
        elif tag == "legend":
            self.legends.append(text)

    def handle_data(self, data: str) -> None:
        for parts in self._text.values():
            parts.append(data)


def audit(html: str) -> PageAudit:
    parser = PageAudit()
    parser.feed(html)
    parser.close()
    return parser


def assert_accessible(html: str, page: str) -> PageAudit:
    found = audit(html)
    assert found.lang, f"{page}: <html> has no lang"
    assert found.title.strip(" ·"), f"{page}: empty <title>"
    assert found.viewport, f"{page}: no viewport meta"
    for tag, attrs, in_label in found.controls:
        if tag == "input" and attrs.get("type") in ("hidden", "submit"):
            continue
        labelled = in_label or attrs.get("id") in found.label_for or attrs.get("aria-label")
        assert labelled, f"{page}: unlabelled <{tag} {attrs}>"
        if attrs.get("type") == "radio":
            assert in_label, f"{page}: radio input outside a <label>"
    assert all(found.label_texts), f"{page}: empty label"
    assert all(found.buttons), f"{page}: a button without text"
    return found


async def test_pages_are_accessible_html(
    client: Client, mailer: Mailer, news: str, db_path: Path
) -> None:
    """Every page has <html lang>, a non-empty title, a viewport meta and labelled controls."""
    uid = uid_of(mailer, news)
    await request(mailer, "uma@example.org", news)
    subject = subject_of(mailer, "uma@example.org")
    confirm = CODEC.confirm_token(LinkClaim(subject, uid))
    pages: dict[str, tuple[str, str, dict[str, str] | None]] = {
        "confirm": ("GET", f"/confirm/{confirm}", None),
        "confirmed": ("POST", f"/confirm/{confirm}", None),
        "unsubscribe (list)": (
            "GET",
            f"/unsubscribe/{CODEC.unsubscribe_token(LinkClaim(subject, uid))}",
            None,
        ),
        "unsubscribe (global)": (
            "GET",
            f"/unsubscribe/{CODEC.unsubscribe_token(LinkClaim(subject, None))}",
            None,
        ),
        "unsubscribed": (
            "POST",
            f"/unsubscribe/{CODEC.unsubscribe_token(LinkClaim(subject, uid))}",
            {"scope": "list"},
        ),
        "error": ("GET", f"/unsubscribe/{confirm}", None),
        "privacy": ("GET", "/privacy", None),
    }
    audits: dict[str, PageAudit] = {}
    for name, (method, path, data) in pages.items():
        r = await client.request(method, path, data=data)
        assert r.status == (400 if name == "error" else 200), name
        assert r.content_type == "text/html", name
        audits[name] = assert_accessible(await r.text(), name)

    assert audits["confirm"].buttons == ["Confirm"]
    listed = audits["unsubscribe (list)"]
    radios = [a for t, a, _ in listed.controls if a.get("type") == "radio"]
    assert {a.get("value") for a in radios} == {"list", "all"}
    assert listed.legends == ["What should stop?"]
    assert listed.buttons == ["Unsubscribe"]
    everything = audits["unsubscribe (global)"]
    assert [a.get("type") for _, a, _ in everything.controls] == ["hidden"]
    assert everything.buttons == ["Unsubscribe"]
    assert statuses(db_path, subject) == {"news": "unsubscribed"}


def test_page_audit_catches_unlabelled_controls() -> None:
    """The accessibility audit itself fails pages that lack lang, title, viewport or labels."""
    good = (
        '<!doctype html><html lang="en"><head><meta name="viewport" content="width=device-width">'
        "<title>T</title></head><body><form><label><input type=radio name=s> One</label>"
        "<button>Go</button></form></body></html>"
    )
    assert_accessible(good, "good")
    for broken in (
        good.replace(' lang="en"', ""),
        good.replace("<title>T</title>", "<title> </title>"),
        good.replace('<meta name="viewport" content="width=device-width">', ""),
        good.replace("<label><input type=radio name=s> One</label>", "<input type=radio name=s>"),
        good.replace("<button>Go</button>", "<button></button>"),
    ):
        with pytest.raises(AssertionError):
            assert_accessible(broken, "broken")
