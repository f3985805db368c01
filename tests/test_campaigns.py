"""Campaigns through a running mailer, a real SQLite file and a real SMTP sink (G1, G2, G3, G6)."""

import asyncio
import email
import email.policy
import html
import re
import shutil
import string
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta, timezone
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, assume, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from markupsafe import Markup

from mailer.bootstrap import Mailer, open_mailer
from mailer.config import PACKAGE_TEMPLATES
from mailer.domain.addresses import parse_address
from mailer.domain.compose import Envelope, Rendered, compose, list_id_header
from mailer.domain.ledger import Evidence
from mailer.domain.skeleton import Skeleton, placeholder
from mailer.errors import Conflict, InvalidAddress, InvalidInput, MissingUnsubscribe, NotFound
from mailer.services.campaigns import MAX_SUBJECT
from mailer.services.messages import DATE_SENTINEL
from mailer.store import campaigns
from mailer.web.app import create_app
from tests.conftest import BASE_URL, init_db, make_settings, path_of, sqlite_only
from tests.databases import Db, active
from tests.harness import MutableClock, SinkServer, query, wait_until

EVIDENCE = Evidence(channel="cli", actor="tests")
STAMP = "%Y-%m-%d %H:%M:%S.%f"  # how SQLAlchemy stores DateTime in SQLite
SUBJECT = "Novembre — l’été à Zürich"
BODY = (
    "# Grüße aus Zürich\n\n"
    "Ein *langer* Absatz mit Umlauten: äöü ÄÖÜ ß, und noch mehr Text, damit die Zeile "
    "deutlich länger als sechsundsiebzig Zeichen wird und quoted-printable umbrechen muss.\n\n"
    "- eins\n- zwei\n\n[Mehr lesen](https://example.org/artikel)\n"
)
FINAL = {"sent", "cancelled"}


# --- helpers ---------------------------------------------------------------------------------


@asynccontextmanager
async def running(
    tmp_path: Path, sink: SinkServer, *, clock: MutableClock | None = None, **overrides: Any
) -> AsyncIterator[Mailer]:
    """A fresh installation with its worker sending to the sink."""
    settings = make_settings(tmp_path, smtp_host="127.0.0.1", smtp_port=sink.port, **overrides)
    await init_db(settings)
    async with open_mailer(settings, sending=True, clock=clock) as m:
        yield m


def db_of(m: Mailer) -> Db:
    return m.settings.database_url


def insert_people(m: Mailer, people: dict[str, dict[int, str]]) -> dict[str, int]:
    """Insert subscribers and their subscription status per list id straight into the database.

    Returns subscriber ids by (normalised) address; ids grow in the order given.
    """
    now = datetime.now(UTC).strftime(STAMP)
    ids: dict[str, int] = {}
    with active.connect(db_of(m)) as conn, conn:
        for raw, subscriptions in people.items():
            address, digest = m.consent.identify(raw)
            (sid,) = conn.execute(
                "INSERT INTO subscriber (email, email_hash, name, created_at)"
                " VALUES (?, ?, NULL, ?) RETURNING id",
                (address.email, digest, now),
            ).fetchone()
            ids[address.email] = sid
            conn.executemany(
                "INSERT INTO subscription"
                " (subscriber_id, list_id, status, created_at, updated_at, confirmed_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (sid, list_id, status, now, now, now)
                    for list_id, status in subscriptions.items()
                ],
            )
    return ids


def insert_suppressions(m: Mailer, reasons: dict[str, str]) -> None:
    """Put addresses on the suppression list straight into the database (reason per address)."""
    now = datetime.now(UTC).strftime(STAMP)
    rows = [(m.consent.identify(raw)[1], reason, now) for raw, reason in reasons.items()]
    with active.connect(db_of(m)) as conn, conn:
        conn.executemany(
            "INSERT INTO suppression (email_hash, reason, created_at) VALUES (?, ?, ?)", rows
        )


def addresses(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i:04d}@example.org" for i in range(n)]


def per_recipient(sink: SinkServer) -> Counter[str]:
    return Counter(r for c in sink.messages for r in c.rcpt_tos)


def message_ids(sink: SinkServer) -> list[str]:
    return [str(c.message["Message-ID"]) for c in sink.messages]


async def progress(sink: SinkServer, before: int) -> None:
    """Wait until the sink has more than ``before`` messages."""
    await wait_until(lambda: len(sink.messages) > before, what="more messages")


async def status_of(m: Mailer, campaign_id: int) -> str:
    return (await m.campaigns.get(campaign_id)).status


async def finished(m: Mailer, campaign_id: int, timeout: float = 15.0) -> str:
    """Wait until the campaign is sent or cancelled; return which."""

    async def done() -> bool:
        return await status_of(m, campaign_id) in FINAL

    await wait_until(done, timeout=timeout, what=f"campaign {campaign_id} to finish")
    return await status_of(m, campaign_id)


def parts(message: EmailMessage) -> tuple[str, str]:
    """The decoded text and HTML parts."""
    text = message.get_body(("plain",))
    page = message.get_body(("html",))
    assert text is not None and page is not None
    return str(text.get_content()), str(page.get_content())


def unsubscribe_url(message: EmailMessage) -> str:
    header = str(message["List-Unsubscribe"])
    assert header.startswith("<") and header.endswith(">"), header
    return header[1:-1]


def parse(raw: bytes) -> EmailMessage:
    """Parse wire bytes as the harness does (UTF-8 headers read back intact)."""
    parsed = email.message_from_string(
        raw.decode("utf-8", errors="surrogateescape"), policy=email.policy.default
    )
    assert isinstance(parsed, EmailMessage)
    return parsed


def headers(message: EmailMessage) -> list[tuple[str, object]]:
    """Every header, decoded, in order; the MIME boundary (random per compose) left out."""
    found: list[tuple[str, object]] = []
    for name, value in message.items():
        if name.lower() == "content-type":
            params = {k: v for k, v in value.params.items() if k != "boundary"}
            found.append((name, (value.content_type, params)))
        else:
            found.append((name, str(value)))
    return found


def same_message(a: EmailMessage, b: EmailMessage) -> None:
    """Assert two parsed messages carry the same headers (in order) and decoded parts."""
    assert headers(a) == headers(b)
    assert parts(a) == parts(b)
    for x, y in zip(a.iter_parts(), b.iter_parts(), strict=True):
        assert x.get_content_type() == y.get_content_type()
        assert x["Content-Transfer-Encoding"] == y["Content-Transfer-Encoding"]


# --- create: validation and G3 ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("subject", "body", "template"),
    [
        ("", "Hello", "campaign"),
        ("   ", "Hello", "campaign"),
        ("two\nlines", "Hello", "campaign"),
        ("carriage\rreturn", "Hello", "campaign"),
        ("line\u2028separator", "Hello", "campaign"),
        ("x" * (MAX_SUBJECT + 1), "Hello", "campaign"),
        ("Hello", "", "campaign"),
        ("Hello", " \n\t\n", "campaign"),
        ("Hello", "Hello", "no-such-template"),
        ("Hello", "Hello", "../email/campaign"),
        ("Hello", "Hello", "confirm.txt"),
        ("Hello", "Hello", "confirm"),  # exists, but needs values a campaign does not have
    ],
    ids=[
        "empty-subject",
        "blank-subject",
        "multi-line-subject",
        "cr-subject",
        "u2028-subject",
        "long-subject",
        "empty-body",
        "blank-body",
        "unknown-template",
        "path-template",
        "file-template",
        "confirm-template",
    ],
)
async def test_create_refuses_what_could_not_be_sent(
    mailer: Mailer, news: str, subject: str, body: str, template: str
) -> None:
    """A bad subject, body or template is refused at create and leaves no campaign behind."""
    with pytest.raises(InvalidInput):
        await mailer.campaigns.create(news, subject, body, template)
    assert await mailer.campaigns.all() == []


async def test_create_accepts_limits_and_needs_a_list(mailer: Mailer, news: str) -> None:
    """A subject of exactly the limit is kept (stripped); an unknown list is NotFound."""
    cid = await mailer.campaigns.create(news, "  " + "s" * MAX_SUBJECT + " ", "Hi", "campaign")
    row = await mailer.campaigns.get(cid)
    assert (row.subject, row.status, row.list_slug) == ("s" * MAX_SUBJECT, "draft", news)
    with pytest.raises(NotFound):
        await mailer.campaigns.create("nope", "Hello", "Hi", "campaign")
    assert [c.id for c in await mailer.campaigns.all()] == [cid]


async def test_layout_without_unsubscribe_link_is_refused_at_create(
    tmp_path: Path, sink: SinkServer
) -> None:
    """G3: a layout that drops the unsubscribe link is refused when the campaign is created."""
    templates = tmp_path / "templates"
    shutil.copytree(PACKAGE_TEMPLATES, templates)
    for name in ("base.txt.j2", "base.html.j2"):
        layout = templates / "email" / name
        text = layout.read_text()
        assert "{{ unsubscribe_url }}" in text
        layout.write_text(text.replace("{{ unsubscribe_url }}", ""))
    async with running(tmp_path, sink, templates_dir=templates) as m:
        news = await m.lists.create("news", "Example News")
        insert_people(m, {"ann@example.org": {news.id: "confirmed"}})
        with pytest.raises(MissingUnsubscribe):
            await m.campaigns.create("news", "Hello", "Hello *world*", "campaign")
        assert await m.campaigns.all() == []
        assert query(db_of(m), "SELECT count(*) FROM outbox") == [(0,)]
    assert sink.messages == []


# --- the body is data --------------------------------------------------------------------------


async def test_markdown_body_is_data_not_a_template(
    mailer: Mailer, news: str, sink: SinkServer
) -> None:
    """Template syntax and HTML in the body arrive literally; HTML is escaped; links get CSS."""
    target = (await mailer.lists.summaries())[0].list
    insert_people(mailer, {"ann@example.org": {target.id: "confirmed"}})
    body = (
        "Total: {{ 7*7 }} and {{ settings }}\n\n"
        "{% for x in range(3) %}loop{% endfor %}\n\n"
        "<script>alert(1)</script>\n\n"
        "See [link](https://example.org) now.\n"
    )
    cid = await mailer.campaigns.create(news, "Data, not code", body, "campaign")
    await mailer.campaigns.send(cid)
    assert await finished(mailer, cid) == "sent"
    [captured] = sink.messages
    url = unsubscribe_url(captured.message)
    text, page = parts(captured.message)
    for literal in ("{{ 7*7 }}", "{{ settings }}", "{% for x in range(3) %}loop{% endfor %}"):
        assert literal in text and literal in page
    assert "<script>alert(1)</script>" in text  # the text part is not HTML-escaped
    assert "&lt;" not in text
    assert "<script" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "49" not in text.replace(url, "") and "49" not in page.replace(url, "")
    assert "looploop" not in text + page
    assert re.search(r'<a href="https://example\.org" style="[^"]*color:[^"]*">link</a>', page)


# --- a full send ---------------------------------------------------------------------------


async def test_full_send_reaches_exactly_the_audience_once(
    tmp_path: Path, sink: SinkServer
) -> None:
    """Exactly the confirmed, unsuppressed subscribers of the list get one copy each; the
    campaign is 'sent' only once every message is recorded; audience and report add up."""
    async with running(tmp_path, sink, smtp_connections=4) as m:
        news = await m.lists.create("news", "Example News")
        tips = await m.lists.create("tips", "Example Tips")
        audience = addresses("ok", 300)
        both = audience[:20]
        pending = addresses("pending", 15)
        left_list = addresses("left", 10)
        manual = addresses("manual", 8)
        bounced = addresses("bounced", 4)
        left_all = addresses("gone", 6)
        other_list = addresses("tips", 25)
        people: dict[str, dict[int, str]] = {}
        for addr in other_list[:12]:
            people[addr] = {tips.id: "confirmed"}
        for addr in audience:
            people[addr] = {news.id: "confirmed"} | ({tips.id: "confirmed"} if addr in both else {})
        for addr in pending:
            people[addr] = {news.id: "pending", tips.id: "confirmed"}
        for addr in left_list:
            people[addr] = {news.id: "unsubscribed", tips.id: "confirmed"}
        for addr in manual + bounced:
            people[addr] = {news.id: "confirmed"}
        for addr in left_all:
            people[addr] = {news.id: "confirmed", tips.id: "confirmed"}
        for addr in other_list[12:]:
            people[addr] = {tips.id: "confirmed"}
        insert_people(m, people)
        for addr in manual:
            assert await m.people.suppress(addr, EVIDENCE)
        insert_suppressions(m, dict.fromkeys(bounced, "bounced"))
        for addr in left_all:
            await m.consent.unsubscribe_address(addr, None, EVIDENCE)

        cid = await m.campaigns.create("news", SUBJECT, BODY, "campaign")
        assert await m.campaigns.audience(cid) == {
            "will-receive": 300,
            "unconfirmed": 15,
            "unsubscribed": 10 + 6,
            "suppressed-manual": 8,
            "suppressed-bounced": 4,
        }
        await m.campaigns.send(cid)
        seen_running = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while True:
            report = await m.campaigns.report(cid)
            if report.campaign.status == "sent":
                break
            assert report.campaign.status == "running"
            seen_running = True
            assert loop.time() < deadline, "the campaign did not finish"
            await asyncio.sleep(0.01)
        # the moment it says 'sent', every message is recorded and at the sink
        assert report.states == {
            "queued": 0,
            "sending": 0,
            "sent": 300,
            "failed": 0,
            "skipped": 0,
            "unknown": 0,
        }
        assert report.reasons == {}
        assert report.campaign.fanout_done and report.campaign.finished_at is not None
        assert report.as_json()["total"] == 300
        assert seen_running
        got = per_recipient(sink)
        assert set(got) == set(audience)
        assert set(got.values()) == {1}
        assert len(sink.messages) == 300
        assert len(set(message_ids(sink))) == 300
        for c in sink.messages:
            assert str(c.message["Subject"]) == SUBJECT
        with pytest.raises(Conflict):
            await m.campaigns.cancel(cid)
        await asyncio.sleep(0.2)
        assert len(sink.messages) == 300


async def test_every_campaign_message_is_stoppable_and_well_formed(
    tmp_path: Path, sink: SinkServer
) -> None:
    """Each copy carries the RFC 8058/2369/2919 headers, its own Message-ID and To, the link in
    both parts and the footer; the skeleton copy equals a full compose; one-click is list-scoped."""
    async with running(tmp_path, sink, smtp_connections=3) as m:
        news = await m.lists.create("news", "Nachrichten für alle")
        tips = await m.lists.create("tips", "Example Tips")
        audience = [*addresses("ok", 30), "zoë@example.org"]
        insert_people(m, {addr: {news.id: "confirmed", tips.id: "confirmed"} for addr in audience})
        cid = await m.campaigns.create("news", SUBJECT, BODY, "campaign")
        campaign = await m.campaigns.get(cid)
        await m.campaigns.send(cid)
        assert await finished(m, cid) == "sent"
        assert sorted(per_recipient(sink)) == sorted(audience)
        assert len(set(message_ids(sink))) == len(audience)

        s = m.settings
        for captured in sink.messages:
            msg = captured.message
            [rcpt] = captured.rcpt_tos
            url = unsubscribe_url(msg)
            assert url.startswith(f"{BASE_URL}/unsubscribe/")
            assert str(msg["To"]) == rcpt
            assert str(msg["List-Unsubscribe-Post"]) == "List-Unsubscribe=One-Click"
            assert str(msg["List-Id"]) == '"Nachrichten für alle" <news.example.org>'
            assert re.fullmatch(r"<[^<>@\s]+@example\.org>", str(msg["Message-ID"]))
            assert str(msg["Subject"]) == SUBJECT
            text, page = parts(msg)
            assert url in text and f'href="{url}"' in page
            for footer in (s.org_name, s.org_address, s.privacy_contact):
                assert footer in text and footer in page
            assert "Grüße aus Zürich" in text and "Grüße aus Zürich" in page
            # quoted-printable soft breaks fall inside the URL in both bodies: the URL appears
            # whole only in the header, and the parsed parts still contain it whole
            assert captured.raw.count(url.encode()) == 1
            assert all(len(line) <= 998 for line in captured.raw.split(b"\r\n"))
        assert len({unsubscribe_url(c.message) for c in sink.messages}) == len(audience)

        for captured in (sink.messages[0], *sink.to("zoë@example.org")):
            msg = captured.message
            [rcpt] = captured.rcpt_tos
            url = unsubscribe_url(msg)
            rendered = m.renderer.email(
                campaign.template,
                campaign.subject,
                {
                    "list_name": campaign.list_name,
                    "body_text": campaign.body,
                    "body_html": Markup(m.renderer.markdown(campaign.body)),  # noqa: S704
                    "unsubscribe_url": url,
                },
            )
            envelope = Envelope(
                from_name=campaign.list_name,
                from_addr=s.from_addr,
                to_addr=rcpt,
                list_id=list_id_header(campaign.list_name, "news", "example.org"),
                unsubscribe_url=url,
                message_id=str(msg["Message-ID"]),
                date=str(msg["Date"]),
                smtputf8=not rcpt.isascii(),
            )
            same_message(msg, parse(compose(envelope, rendered)))

        # one-click on one copy: that list only, for that person only, no global suppression
        first = sink.messages[0]
        [who] = first.rcpt_tos
        async with TestClient(TestServer(create_app(m))) as http:
            r = await http.post(
                path_of(unsubscribe_url(first.message)), data={"List-Unsubscribe": "One-Click"}
            )
            assert r.status == 200
        person = await m.people.show(who)
        assert {s.list_slug: s.status for s in person.subscriptions} == {
            "news": "unsubscribed",
            "tips": "confirmed",
        }
        assert person.suppression is None
        rows = query(
            db_of(m),
            "SELECT l.slug, count(*) FROM subscription s JOIN mailing_list l ON l.id = s.list_id"
            " WHERE s.status = 'confirmed' GROUP BY l.slug ORDER BY l.slug",
        )
        assert rows == [("news", len(audience) - 1), ("tips", len(audience))]
        assert query(db_of(m), "SELECT count(*) FROM suppression") == [(0,)]


# --- the skeleton, property-based --------------------------------------------------------


LOCAL_CHARS = string.ascii_letters + string.digits + "!#$%&'*+-/=?^_`{|}~" + "äöüßéñøçžł"
TOKEN_CHARS = string.ascii_letters + string.digits + "_.~-"
TEXT = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=400)
LONG_LINES = st.builds(
    lambda word, n, tail: (word * n) + tail,
    st.text(st.characters(exclude_categories=["Cs", "Cc", "Zl", "Zp"]), min_size=1, max_size=8),
    st.integers(min_value=10, max_value=200),
    TEXT,
)
ONE_LINE = st.text(
    st.characters(exclude_categories=["Cs", "Cc", "Zl", "Zp"]), min_size=1, max_size=MAX_SUBJECT
).map(str.strip)
RECIPIENTS = st.builds(
    lambda local, domain: f"{local}@{domain}",
    st.text(st.sampled_from(LOCAL_CHARS), min_size=1, max_size=30),
    st.sampled_from(["example.org", "mail.example.com", "xn--bcher-kva.example", "bücher.example"]),
)


def _rendered(subject: str, body: str, url: str) -> Rendered:
    return Rendered(
        subject=subject,
        text=f"{body}\n\n--\nUnsubscribe with one click: {url}\n",
        html=f'<p>{html.escape(body)}</p>\n<p><a href="{url}">Unsubscribe</a>: {url}</p>\n',
    )


def _envelope(list_name: str, to: str, url: str, mid: str, date: str, utf8: bool) -> Envelope:
    return Envelope(
        from_name=list_name,
        from_addr="news@example.org",
        to_addr=to,
        list_id=list_id_header(list_name, "news", "example.org"),
        unsubscribe_url=url,
        message_id=f"<{mid}@example.org>",
        date=date,
        smtputf8=utf8,
    )


@hypothesis_settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    body=st.one_of(TEXT, LONG_LINES),
    subject=ONE_LINE,
    list_name=ONE_LINE,
    recipient=RECIPIENTS,
    token=st.text(st.sampled_from(TOKEN_CHARS), min_size=20, max_size=200),
    mid=st.from_regex(r"[0-9]{1,9}\.[a-z0-9]{8,24}", fullmatch=True),
)
def test_skeleton_fill_equals_full_compose(
    body: str, subject: str, list_name: str, recipient: str, token: str, mid: str
) -> None:
    """Skeleton.split/fill gives, for any body, subject and recipient, what compose gives."""
    assume(subject and list_name.strip())
    try:
        rcpt = parse_address(recipient).email
    except InvalidAddress:
        assume(False)
        raise
    url = f"{BASE_URL}/unsubscribe/{token}"
    date = "Tue, 03 Nov 2026 09:00:00 +0100"
    slots = {
        "to": placeholder("to", 32) + "@skeleton.invalid",
        "mid": placeholder("mid", 32),
        "date": DATE_SENTINEL,
        "unsub": placeholder("unsub", len(url)),
    }
    prototype = compose(
        _envelope(list_name, slots["to"], slots["unsub"], slots["mid"], DATE_SENTINEL, False),
        _rendered(subject, body, slots["unsub"]),
    )
    skeleton = Skeleton.split(prototype, slots, fixed={"unsub": len(url)})
    values = {
        "to": rcpt.encode("utf-8"),
        "mid": mid.encode("ascii"),
        "date": date.encode("ascii"),
        "unsub": url.encode("ascii"),
    }
    assert skeleton.fits(values)
    filled = skeleton.fill(values)
    full = compose(
        _envelope(list_name, rcpt, url, mid, date, not rcpt.isascii()),
        _rendered(subject, body, url),
    )
    a, b = parse(filled), parse(full)
    same_message(a, b)
    assert str(a["To"]) == rcpt and unsubscribe_url(a) == url
    text, page = parts(a)
    assert url in text and url in page
    if rcpt.isascii():  # same policy on both sides: byte for byte, but for the MIME boundary
        boundaries = [m.get_boundary() for m in (a, b)]
        assert all(boundaries)
        assert filled == full.replace(str(boundaries[1]).encode(), str(boundaries[0]).encode())
    assert all(len(line) <= 998 for line in filled.split(b"\r\n"))


# --- sparse audience, pause/resume, cancel --------------------------------------------------


async def test_sparse_audience_sends_the_last_percent_and_only_then_finishes(
    tmp_path: Path, sink: SinkServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """2,000 subscribers, the first 99% unconfirmed or suppressed: the last 1% all get mail,
    fanned out over many small chunks, and the campaign is 'sent' only after the last one."""
    monkeypatch.setattr("mailer.services.scheduling.FANOUT_CHUNK", 3)
    async with running(tmp_path, sink, smtp_connections=2) as m:
        news = await m.lists.create("news", "Example News")
        everyone = addresses("p", 2000)
        ineligible, eligible = everyone[:1980], everyone[1980:]
        people = {
            addr: {news.id: "pending" if i % 2 else "confirmed"}
            for i, addr in enumerate(ineligible)
        }
        people |= {addr: {news.id: "confirmed"} for addr in eligible}
        ids = insert_people(m, people)
        insert_suppressions(
            m, {addr: ("bounced", "manual")[i % 4 == 0] for i, addr in enumerate(ineligible[::2])}
        )
        assert max(ids[a] for a in ineligible) < min(ids[a] for a in eligible)
        last = eligible[-1]
        release = asyncio.Event()

        async def hold_last(rcpt: str) -> None:
            if rcpt == last:
                await release.wait()

        sink.before_data_reply = hold_last
        cid = await m.campaigns.create("news", "Sparse", "Hello", "campaign")
        assert (await m.campaigns.audience(cid))["will-receive"] == 20
        await m.campaigns.send(cid)
        await wait_until(
            lambda: set(per_recipient(sink)) == set(eligible[:-1]), what="all but the last"
        )
        await asyncio.sleep(0.3)  # the scheduler has had many ticks to finish early
        report = await m.campaigns.report(cid)
        assert report.campaign.status == "running"
        assert report.campaign.fanout_done
        assert report.states["sending"] == 1 and report.states["sent"] == 19
        release.set()
        assert await finished(m, cid) == "sent"
        got = per_recipient(sink)
        assert set(got) == set(eligible) and set(got.values()) == {1}
        report = await m.campaigns.report(cid)
        assert report.states["sent"] == 20 and sum(report.states.values()) == 20
        chunks = query(db_of(m), "SELECT count(DISTINCT created_at) FROM outbox")[0][0]
        assert chunks >= 5  # 20 recipients in chunks of 3: fanned out over several ticks


async def test_pause_and_resume_twenty_times_without_duplicates(
    tmp_path: Path, sink: SinkServer
) -> None:
    """After pause() returns at most C claimed messages still arrive, then none until resume;
    20 pause/resume cycles in one send give every recipient exactly one copy."""
    connections = 4
    async with running(tmp_path, sink, smtp_connections=connections) as m:
        news = await m.lists.create("news", "Example News")
        audience = addresses("r", 400)
        insert_people(m, {addr: {news.id: "confirmed"} for addr in audience})

        async def slow(rcpt: str) -> None:
            await asyncio.sleep(0.005)

        sink.before_data_reply = slow
        cid = await m.campaigns.create("news", "Stop and go", "Hello", "campaign")

        async def nothing_in_hand() -> bool:
            return (await m.campaigns.report(cid)).states["sending"] == 0

        await m.campaigns.send(cid)
        for cycle in range(20):
            await progress(sink, len(sink.messages))
            await m.campaigns.pause(cid)
            at_pause = len(sink.messages)
            await wait_until(nothing_in_hand, what="claimed messages handed off or put back")
            settled = len(sink.messages)
            assert settled - at_pause <= connections, (cycle, at_pause, settled)
            if cycle % 7 == 0:
                await asyncio.sleep(0.3)
                assert len(sink.messages) == settled, "a message left while paused"
            assert await status_of(m, cid) == "paused"
            assert len(sink.messages) < len(audience), "finished too early for the test"
            await m.campaigns.resume(cid)
        assert await finished(m, cid) == "sent"
        got = per_recipient(sink)
        assert set(got) == set(audience) and set(got.values()) == {1}
        assert len(set(message_ids(sink))) == len(audience)
        report = await m.campaigns.report(cid)
        assert report.states["sent"] == len(audience) and sum(report.states.values()) == 400


async def test_cancel_mid_send_skips_the_rest(tmp_path: Path, sink: SinkServer) -> None:
    """Cancel: in-flight messages finish, the rest end 'skipped: cancelled', nothing more leaves;
    a cancelled campaign cannot be cancelled, resumed or sent again."""
    connections = 3
    async with running(tmp_path, sink, smtp_connections=connections) as m:
        news = await m.lists.create("news", "Example News")
        audience = addresses("r", 200)
        insert_people(m, {addr: {news.id: "confirmed"} for addr in audience})

        async def slow(rcpt: str) -> None:
            await asyncio.sleep(0.01)

        sink.before_data_reply = slow
        cid = await m.campaigns.create("news", "Soon gone", "Hello", "campaign")
        await m.campaigns.send(cid)
        await wait_until(lambda: len(sink.messages) >= 20, what="some messages")
        skipped = await m.campaigns.cancel(cid)
        at_cancel = len(sink.messages)
        assert await status_of(m, cid) == "cancelled"

        async def nothing_in_hand() -> bool:
            return (await m.campaigns.report(cid)).states["sending"] == 0

        await wait_until(nothing_in_hand, what="in-flight messages to be recorded")
        await asyncio.sleep(0.3)
        sent = len(sink.messages)
        assert sent - at_cancel <= connections
        assert sent < len(audience)
        report = await m.campaigns.report(cid)
        assert report.states == {
            "queued": 0,
            "sending": 0,
            "sent": sent,
            "failed": 0,
            "skipped": len(audience) - sent,
            "unknown": 0,
        }
        # rows still queued at the cancel are counted in its answer; rows a sender had already
        # claimed are skipped by its check before hand-off, a moment later
        assert 0 < skipped <= len(audience) - sent
        assert report.reasons == {"skipped: cancelled": len(audience) - sent}
        assert report.campaign.finished_at is not None
        got = per_recipient(sink)
        assert set(got.values()) == {1}
        skipped_to = {
            row[0]
            for row in query(
                db_of(m),
                "SELECT s.email FROM outbox o JOIN subscriber s ON s.id = o.subscriber_id"
                " WHERE o.campaign_id = ? AND o.status = 'skipped' AND o.reason = 'cancelled'",
                cid,
            )
        }
        assert skipped_to == set(audience) - set(got)
        actions: list[Callable[[int], Awaitable[object]]] = [
            m.campaigns.cancel,
            m.campaigns.resume,
            m.campaigns.send,
        ]
        for action in actions:
            with pytest.raises(Conflict):
                await action(cid)
        await asyncio.sleep(0.2)
        assert len(sink.messages) == sent


async def test_lifecycle_conflicts(mailer: Mailer, news: str, sink: SinkServer) -> None:
    """Only the transitions of the status table are allowed; the rest are Conflict."""
    target = (await mailer.lists.summaries())[0].list
    insert_people(mailer, {"ann@example.org": {target.id: "confirmed"}})
    cid = await mailer.campaigns.create(news, "Hello", "Hi", "campaign")
    for not_yet in (mailer.campaigns.pause, mailer.campaigns.resume):
        with pytest.raises(Conflict, match="draft"):
            await not_yet(cid)
    with pytest.raises(NotFound):
        await mailer.campaigns.send(cid + 1)
    await mailer.campaigns.send(cid)
    assert await finished(mailer, cid) == "sent"
    actions: list[Callable[[int], Awaitable[object]]] = [
        mailer.campaigns.cancel,
        mailer.campaigns.pause,
        mailer.campaigns.resume,
        mailer.campaigns.send,
    ]
    for action in actions:
        with pytest.raises(Conflict, match="sent"):
            await action(cid)
    with pytest.raises(Conflict):
        await mailer.campaigns.schedule(cid, datetime.now(UTC) + timedelta(hours=1))
    assert await status_of(mailer, cid) == "sent"
    assert per_recipient(sink) == Counter({"ann@example.org": 1})


# --- scheduling ---------------------------------------------------------------------------


async def test_scheduled_campaign_starts_on_time_and_rechecks_consent(
    tmp_path: Path, sink: SinkServer
) -> None:
    """A scheduled campaign waits for its time; whoever unsubscribes before it starts gets
    nothing; a past or naive time is refused."""
    clock = MutableClock()
    async with running(tmp_path, sink, clock=clock) as m:
        news = await m.lists.create("news", "Example News")
        audience = addresses("r", 10)
        insert_people(m, {addr: {news.id: "confirmed"} for addr in audience})
        cid = await m.campaigns.create("news", "Later", "Hello", "campaign")
        with pytest.raises(InvalidInput):
            await m.campaigns.schedule(cid, clock.now() - timedelta(seconds=1))
        with pytest.raises(InvalidInput):
            await m.campaigns.schedule(cid, clock.now())
        with pytest.raises(InvalidInput):
            await m.campaigns.schedule(cid, (clock.now() + timedelta(hours=1)).replace(tzinfo=None))
        assert await status_of(m, cid) == "draft"
        at = clock.now() + timedelta(hours=1)
        await m.campaigns.schedule(cid, at.astimezone(timezone(timedelta(hours=-5))))
        row = await m.campaigns.get(cid)
        assert (row.status, row.scheduled_at) == ("scheduled", at)
        await asyncio.sleep(0.3)  # several scheduler ticks
        clock.advance(59 * 60)
        await asyncio.sleep(0.3)
        assert await status_of(m, cid) == "scheduled"
        assert query(db_of(m), "SELECT count(*) FROM outbox") == [(0,)]
        assert sink.messages == []
        await m.consent.unsubscribe_address(audience[3], "news", EVIDENCE)
        await m.consent.unsubscribe_address(audience[7], None, EVIDENCE)
        clock.advance(61)
        assert await finished(m, cid) == "sent"
        row = await m.campaigns.get(cid)
        assert row.started_at is not None and row.started_at >= at
        got = per_recipient(sink)
        assert set(got) == set(audience) - {audience[3], audience[7]}
        assert set(got.values()) == {1}


# --- preview, sample ---------------------------------------------------------------------


async def test_preview_goes_only_to_a_confirmed_subscriber(
    mailer: Mailer, news: str, sink: SinkServer
) -> None:
    """preview_to sends one real copy per call to a confirmed subscriber of the list and leaves
    the campaign a draft; anyone else is a Conflict and gets nothing (G1)."""
    news_id = (await mailer.lists.summaries())[0].list.id
    other = await mailer.lists.create("tips", "Example Tips")
    insert_people(
        mailer,
        {
            "me@example.org": {news_id: "confirmed"},
            "pending@example.org": {news_id: "pending"},
            "left@example.org": {news_id: "unsubscribed"},
            "blocked@example.org": {news_id: "confirmed"},
            "elsewhere@example.org": {other.id: "confirmed"},
            "audience@example.org": {news_id: "confirmed"},
        },
    )
    assert await mailer.people.suppress("blocked@example.org", EVIDENCE)
    cid = await mailer.campaigns.create(news, "Preview me", "Hello **you**", "campaign")
    in_hand, release = asyncio.Event(), asyncio.Event()

    async def hold(rcpt: str) -> None:
        in_hand.set()
        await release.wait()

    sink.before_data_reply = hold
    await mailer.campaigns.preview_to(cid, " Me@Example.org ")
    await wait_until(in_hand.is_set, what="the preview in hand")
    with pytest.raises(Conflict, match="being sent"):  # not a second row, not a database error
        await mailer.campaigns.preview_to(cid, "me@example.org")
    release.set()
    await wait_until(lambda: len(sink.messages) == 1, what="the preview")
    preview_row = "SELECT kind, status FROM outbox WHERE campaign_id = ?"
    await wait_until(
        lambda: query(db_of(mailer), preview_row, cid) == [("preview", "sent")], what="recorded"
    )
    [first] = sink.messages
    assert first.rcpt_tos == ["me@example.org"]
    assert str(first.message["Subject"]) == "Preview me"
    assert str(first.message["To"]) == "me@example.org"
    text, page = parts(first.message)
    assert unsubscribe_url(first.message) in text and "<strong>you</strong>" in page
    assert await status_of(mailer, cid) == "draft"
    await mailer.campaigns.preview_to(cid, "me@example.org")
    await wait_until(lambda: len(sink.messages) == 2, what="the second preview")
    for refused in (
        "nobody@example.org",
        "pending@example.org",
        "left@example.org",
        "blocked@example.org",
        "elsewhere@example.org",
    ):
        with pytest.raises(Conflict, match="G1"):
            await mailer.campaigns.preview_to(cid, refused)
    with pytest.raises(InvalidAddress):
        await mailer.campaigns.preview_to(cid, "not an address")
    await asyncio.sleep(0.3)
    assert per_recipient(sink) == Counter({"me@example.org": 2})
    assert await status_of(mailer, cid) == "draft"
    assert (await mailer.campaigns.report(cid)).states["sent"] == 0  # previews are not counted
    assert query(db_of(mailer), preview_row, cid) == [("preview", "sent")]


async def test_sample_shows_the_message_without_queueing(mailer: Mailer, news: str) -> None:
    """sample() renders a stoppable message for a made-up recipient and queues nothing."""
    cid = await mailer.campaigns.create(news, SUBJECT, BODY, "campaign")
    raw = mailer.campaigns.sample(await mailer.campaigns.get(cid))
    msg = parse(raw)
    url = unsubscribe_url(msg)
    assert url.startswith(f"{BASE_URL}/unsubscribe/")
    text, page = parts(msg)
    assert url in text and url in page
    assert str(msg["Subject"]) == SUBJECT
    assert str(msg["List-Unsubscribe-Post"]) == "List-Unsubscribe=One-Click"
    assert query(db_of(mailer), "SELECT count(*) FROM outbox") == [(0,)]
    assert await status_of(mailer, cid) == "draft"


async def test_batches_of_opted_out_rows_do_not_stall_the_sender(
    tmp_path: Path, sink: SinkServer
) -> None:
    """When most queued rows were opted out after fan-out, the rest go at once (no idle poll)."""
    settings = make_settings(
        tmp_path,
        smtp_host="127.0.0.1",
        smtp_port=sink.port,
        smtp_connections=2,
        worker_poll_seconds=30.0,
    )
    await init_db(settings)
    db = tmp_path / "mailer.db"
    async with open_mailer(settings, sending=False) as m:
        list_id = (await m.lists.create("news", "News")).id
        emails = [f"q{i:03d}@example.org" for i in range(300)]
        insert_people(m, {e: {list_id: "confirmed"} for e in emails})
        cid = await m.campaigns.create("news", "Subject", "Body", "campaign")
        await m.campaigns.send(cid)
        queued, done = await m.db.write(campaigns.fan_out, cid, 10_000, m.clock.now())
        assert (queued, done) == (300, True)
    keep = emails[-10:]
    placeholders = ",".join("?" * len(keep))
    query(
        db,
        "UPDATE subscription SET status='unsubscribed' WHERE subscriber_id IN "
        f"(SELECT id FROM subscriber WHERE email NOT IN ({placeholders}))",
        *keep,
    )
    started = time.monotonic()
    async with open_mailer(settings, sending=True):
        await wait_until(lambda: len(sink.messages) == 10, timeout=10, what="the 10 left")
    assert time.monotonic() - started < 5  # a stall would wait out the 30 s poll
    assert sorted(r for m in sink.messages for r in m.rcpt_tos) == sorted(keep)


@sqlite_only  # on PostgreSQL the rate is the deployment's, by the database clock: test_leases
async def test_smtp_rate_limits_messages_per_second(tmp_path: Path, sink: SinkServer) -> None:
    """MAILER_SMTP_RATE: with the clock frozen only the burst goes; each second adds that many."""
    clock = MutableClock()
    settings = make_settings(
        tmp_path, smtp_host="127.0.0.1", smtp_port=sink.port, smtp_connections=4, smtp_rate=5
    )
    await init_db(settings)
    async with open_mailer(settings, sending=True, clock=clock) as m:
        list_id = (await m.lists.create("news", "News")).id
        insert_people(m, {e: {list_id: "confirmed"} for e in addresses("rate", 12)})
        cid = await m.campaigns.create("news", "Subject", "Body", "campaign")
        await m.campaigns.send(cid)
        await wait_until(lambda: len(sink.messages) == 5, what="the first burst")
        await asyncio.sleep(0.3)
        assert len(sink.messages) == 5  # the clock stands still: no more tokens
        clock.advance(1.0)
        await wait_until(lambda: len(sink.messages) == 10, what="one second's worth")
        await asyncio.sleep(0.3)
        assert len(sink.messages) == 10
        clock.advance(1.0)
        await wait_until(lambda: len(sink.messages) == 12, what="the rest")
