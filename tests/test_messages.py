"""What every outgoing message carries (G3), checked on the bytes the SMTP sink received."""

import email
import email.policy
import html
import re
import shutil
import time
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from mailer.bootstrap import Mailer, open_mailer
from mailer.config import PACKAGE_TEMPLATES, Settings
from mailer.domain.compose import (
    ONE_CLICK,
    Envelope,
    Rendered,
    check_stoppable,
    compose,
    list_id_header,
)
from mailer.domain.consent import OptInOutcome
from mailer.domain.ledger import Evidence
from mailer.domain.tokens import TokenCodec
from mailer.errors import InvalidAddress, InvalidInput, MissingUnsubscribe
from mailer.render import Renderer
from mailer.services.messages import MessageConfig, MessageFactory
from mailer.statuses import MessageKind
from mailer.store.campaigns import CampaignRow
from mailer.store.outbox import Claimed
from tests.conftest import BASE_URL, init_db, links, make_settings, path_of
from tests.harness import Captured, MutableClock, SinkServer, query, wait_until

EVIDENCE = Evidence(channel="api", actor="tests")
ORG = {
    "org_name": "Föreningen Exempel & Co",
    "org_address": "Storgatan 1, 111 22 Stockholm",
    "privacy_contact": "dpo@forening.example",
    "from_addr": "hello@forening.example",
}
UNICODE_NAME = "Café Zürich — Nachrichten ✉"
# slug -> (list name, From address or None for the default)
LISTS: dict[str, tuple[str, str | None]] = {
    "news": ("Example News", None),
    "letters": (UNICODE_NAME, "letters@lists.example.net"),
    "buecher": ("Bücher", "news@bücher.example"),
}
REQUESTS = [
    ("ann@example.org", "news"),
    ("ann@example.org", "letters"),
    ("bob@example.org", "letters"),
    ("bob@example.org", "buecher"),
    ("jörg@example.org", "news"),
]
UNSUBSCRIBE_HEADER = re.compile(rb"<(https?://[!-~]+/unsubscribe/[A-Za-z0-9_.~-]+)>")


@pytest.fixture
def settings(tmp_path: Path, sink: SinkServer) -> Settings:
    """The conftest settings with a distinctive organisation footer and default sender."""
    return make_settings(tmp_path, smtp_host="127.0.0.1", smtp_port=sink.port, **ORG)


def raw_headers(raw: bytes) -> list[tuple[str, bytes]]:
    """The header fields exactly as sent: (lower-case name, unfolded raw value)."""
    head = raw.split(b"\r\n\r\n", 1)[0]
    fields = []
    for line in re.sub(rb"\r\n(?=[ \t])", b"", head).split(b"\r\n"):
        name, colon, value = line.partition(b":")
        assert colon, line
        fields.append((name.decode("ascii").lower(), value.strip()))
    return fields


def raw_header(raw: bytes, name: str) -> bytes:
    values = [v for n, v in raw_headers(raw) if n == name.lower()]
    assert len(values) == 1, (name, values)
    return values[0]


def parsed(c: Captured) -> EmailMessage:
    """The message parsed with ``email.policy.default``, reading raw header bytes as UTF-8.

    RFC 6532 (SMTPUTF8) headers are UTF-8; ``message_from_bytes`` would read them as ASCII with
    surrogate escapes. For an all-ASCII message both readings are the same.
    """
    msg = email.message_from_string(c.raw.decode("utf-8"), policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def parts(message: EmailMessage) -> tuple[str, str]:
    """The decoded text and HTML parts."""
    text, page = message.get_body(("plain",)), message.get_body(("html",))
    assert text is not None and page is not None
    return str(text.get_content()), str(page.get_content())


async def request_all(mailer: Mailer, sink: SinkServer) -> list[Captured]:
    for slug, (name, sender) in LISTS.items():
        await mailer.lists.create(slug, name, from_addr=sender)
    for address, slug in REQUESTS:
        outcome = await mailer.consent.request_opt_in(address, slug, None, EVIDENCE)
        assert outcome is OptInOutcome.REQUESTED
    await wait_until(lambda: len(sink.messages) == len(REQUESTS), what="every request sent")
    return list(sink.messages)


def list_slug_of(message: EmailMessage) -> str:
    found = re.search(r"<([a-z0-9-]+)\.[^<>]+>$", str(message["List-Id"]))
    assert found is not None
    return found.group(1)


async def test_every_message_carries_the_contract_headers_and_footer(
    mailer: Mailer, sink: SinkServer, settings: Settings
) -> None:
    """G3: each confirmation request has the one-click headers, both parts and the footer."""
    captured = await request_all(mailer, sink)
    seen: set[tuple[str, str]] = set()
    message_ids: set[str] = set()
    for c in captured:
        msg = parsed(c)
        [rcpt] = c.rcpt_tos
        slug = list_slug_of(msg)
        seen.add((rcpt, slug))
        name, sender = LISTS[slug]

        # One https?-URL in List-Unsubscribe, as plain bytes (no RFC 2047 encoded-word).
        value = raw_header(c.raw, "List-Unsubscribe")
        found = UNSUBSCRIBE_HEADER.fullmatch(value)
        assert found is not None, value
        assert b"=?" not in value
        url = found.group(1).decode("ascii")
        assert url.startswith(f"{BASE_URL}/unsubscribe/")
        assert raw_header(c.raw, "List-Unsubscribe-Post") == ONE_CLICK.encode()
        for field in ("List-Id", "Message-ID", "Date", "From", "To", "Subject"):
            assert raw_header(c.raw, field)

        # Parsed back: exactly one To, the right sender, subject and list.
        assert msg.get_all("To") is not None and len(msg.get_all("To", [])) == 1
        assert [a.addr_spec for a in msg["To"].addresses] == [rcpt]
        [author] = msg["From"].addresses
        assert (author.display_name, author.addr_spec) == (name, sender or ORG["from_addr"])
        assert msg["Subject"] == f"Confirm your subscription to {name}"
        assert str(msg["List-Id"]).startswith(f'"{name}" <{slug}.')
        date = msg["Date"].datetime
        assert date is not None and date.tzinfo is not None
        message_ids.add(str(msg["Message-ID"]))
        assert re.fullmatch(r"<[^<>@\s]+@[^<>\s]+>", str(msg["Message-ID"]))

        # multipart/alternative: text then HTML, both showing the link and the footer.
        assert msg.get_content_type() == "multipart/alternative"
        assert [p.get_content_type() for p in msg.iter_parts()] == ["text/plain", "text/html"]
        text, page = parts(msg)
        assert links(c)["unsubscribe"] == url
        assert f'href="{url}"' in page
        for part in (text, html.unescape(page)):
            assert url in part
            for key in ("org_name", "org_address", "privacy_contact"):
                assert getattr(settings, key) in part

        # Wire form: no line over 998 octets, CRLF line ends only.
        assert all(len(line) <= 998 for line in c.raw.split(b"\r\n"))
        assert c.raw.count(b"\n") == c.raw.count(b"\r\n")
        assert c.raw.count(b"\r") == c.raw.count(b"\r\n")
    assert seen == set(REQUESTS)
    assert len(message_ids) == len(captured)


async def test_unicode_names_are_encoded_and_read_back(mailer: Mailer, sink: SinkServer) -> None:
    """A Unicode list name goes out RFC 2047 encoded to an ASCII address and parses back equal."""
    await request_all(mailer, sink)
    [c] = [m for m in sink.to("ann@example.org") if list_slug_of(parsed(m)) == "letters"]
    head = c.raw.split(b"\r\n\r\n", 1)[0]
    assert head.isascii()
    assert raw_header(c.raw, "Subject").startswith(b"Confirm your subscription to =?utf-8?")
    assert b"=?utf-8?" in raw_header(c.raw, "From")
    msg = parsed(c)
    assert msg["Subject"] == f"Confirm your subscription to {UNICODE_NAME}"
    assert msg["From"].addresses[0].display_name == UNICODE_NAME
    assert str(msg["List-Id"]) == f'"{UNICODE_NAME}" <letters.lists.example.net>'
    # An internationalised address travels as UTF-8 (SMTPUTF8), not encoded words.
    [intl] = sink.to("jörg@example.org")
    assert raw_header(intl.raw, "To") == "jörg@example.org".encode()


async def test_header_unsubscribe_url_works_by_one_click(
    client: TestClient[Any, Any], mailer: Mailer, sink: SinkServer
) -> None:
    """POSTing the List-Unsubscribe URL with the RFC 8058 body answers 200 and unsubscribes."""
    await request_all(mailer, sink)
    before = await mailer.people.show("bob@example.org")
    assert sorted(s.status for s in before.subscriptions) == ["pending", "pending"]
    assert before.suppression is None
    [first, *_] = sink.to("bob@example.org")
    url = UNSUBSCRIBE_HEADER.fullmatch(raw_header(first.raw, "List-Unsubscribe"))
    assert url is not None
    r = await client.post(
        path_of(url.group(1).decode()),
        data={"List-Unsubscribe": "One-Click"},
        allow_redirects=False,
    )
    assert r.status == 200
    after = await mailer.people.show("bob@example.org")
    assert sorted(s.status for s in after.subscriptions) == ["unsubscribed", "unsubscribed"]
    assert after.suppression == "unsubscribed"
    ann = await mailer.people.show("ann@example.org")  # nobody else is touched
    assert sorted(s.status for s in ann.subscriptions) == ["pending", "pending"]


@pytest.mark.parametrize(("part", "label"), [("txt", "text"), ("html", "HTML")])
async def test_template_without_unsubscribe_link_is_refused(
    tmp_path: Path, sink: SinkServer, part: str, label: str
) -> None:
    """G3: if a template drops the unsubscribe link, nothing is sent and the row says why."""
    templates = tmp_path / "templates"
    shutil.copytree(PACKAGE_TEMPLATES, templates)
    base = templates / "email" / f"base.{part}.j2"
    original = base.read_text()
    assert "unsubscribe_url" in original
    base.write_text(
        "\n".join(line for line in original.splitlines() if "unsubscribe_url" not in line)
    )
    settings = make_settings(
        tmp_path, smtp_host="127.0.0.1", smtp_port=sink.port, templates_dir=templates
    )
    await init_db(settings)
    db = tmp_path / "mailer.db"
    async with open_mailer(settings, sending=True) as m:
        await m.lists.create("news", "Example News")
        await m.consent.request_opt_in("ann@example.org", "news", None, EVIDENCE)
        await wait_until(
            lambda: query(db, "SELECT status FROM outbox") == [("failed",)], what="refusal"
        )
    [(reason,)] = query(db, "SELECT reason FROM outbox")
    assert reason == f"not sent: the {label} part does not show the unsubscribe link"
    assert sink.messages == []


def envelope(**changes: Any) -> Envelope:
    values: dict[str, Any] = {
        "from_name": "Example News",
        "from_addr": "news@example.org",
        "to_addr": "ann@example.org",
        "list_id": list_id_header("Example News", "news", "example.org"),
        "unsubscribe_url": f"{BASE_URL}/unsubscribe/abc.def",
        "message_id": "<1.inst@example.org>",
        "date": datetime(2026, 11, 24, 12, tzinfo=UTC),
    }
    values.update(changes)
    return Envelope(**values)


URL = f"{BASE_URL}/unsubscribe/abc.def"


def test_compose_refuses_parts_without_the_link() -> None:
    """check_stoppable and compose raise MissingUnsubscribe naming the part that lacks the link."""
    good = Rendered("Hi", f"text {URL}", f'<a href="{URL}">x</a>')
    check_stoppable(good, URL)
    assert URL.encode() in compose(envelope(), good)
    cases = [
        (Rendered("Hi", "text", good.html), URL, "the text part does not show"),
        (Rendered("Hi", good.text, "<p>x</p>"), URL, "the HTML part does not show"),
        (good, "", "the message has no unsubscribe link"),
    ]
    for rendered, url, message in cases:
        with pytest.raises(MissingUnsubscribe, match=message):
            check_stoppable(rendered, url)
        with pytest.raises(MissingUnsubscribe, match=message):
            compose(envelope(unsubscribe_url=url), rendered)


@pytest.mark.parametrize("evil", ["News\r\nBcc: x@example.org", "News\nBcc: x", "News\rBcc: x"])
async def test_list_name_with_line_break_is_refused(mailer: Mailer, evil: str) -> None:
    """A list name that could smuggle a header (CR/LF) is refused and no list is created."""
    with pytest.raises(InvalidInput, match="control characters"):
        await mailer.lists.create("evil", evil)
    with pytest.raises(InvalidAddress):
        await mailer.lists.create("evil", "News", from_addr="a@example.org\r\nBcc: x@example.org")
    assert await mailer.lists.summaries() == []


@pytest.mark.parametrize("field", ["from_name", "list_id"])
def test_compose_refuses_line_breaks_in_headers(field: str) -> None:
    """Defence in depth: even if a CR/LF reached compose, it raises rather than add a header."""
    with pytest.raises(ValueError, match=r"CR|LF|linefeed|carriage"):
        compose(envelope(**{field: "News\r\nBcc: x@example.org"}), Rendered("Hi", URL, URL))
    with pytest.raises(ValueError, match=r"linefeed|carriage"):
        compose(envelope(), Rendered("Hi\r\nBcc: x@example.org", URL, URL))


async def test_list_name_is_escaped_in_html_and_raw_in_text(
    mailer: Mailer, sink: SinkServer
) -> None:
    """Jinja2 autoescaping: markup in a list name is inert in the HTML part, verbatim in text."""
    name = "<script>alert(1)</script> & Co"
    await mailer.lists.create("news", name)
    await mailer.consent.request_opt_in("ann@example.org", "news", None, EVIDENCE)
    await wait_until(lambda: len(sink.messages) == 1, what="the confirmation request")
    msg = parsed(sink.messages[0])
    text, page = parts(msg)
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; Co" in page
    assert name in text
    assert msg["Subject"] == f"Confirm your subscription to {name}"


def test_each_copy_is_dated_when_it_is_built() -> None:
    """The Date header is formatted once a second, yet every copy carries its own second."""
    clock = MutableClock()
    factory = MessageFactory(
        Renderer(
            PACKAGE_TEMPLATES,
            {
                "org_name": "Org",
                "org_address": "1 Street",
                "privacy_contact": "p@example.org",
                "base_url": BASE_URL,
            },
        ),
        TokenCodec(["k" * 32], clock=time.time),
        clock,
        MessageConfig(BASE_URL, "news@example.org", "test"),
    )
    campaign = CampaignRow(
        1, 1, "news", "News", "u" * 32, None, "Hello", "Body", "campaign", "running", None, True,
        clock.now(), clock.now(), None,
    )  # fmt: skip
    row = Claimed(
        1, MessageKind.CAMPAIGN, 0, "a@example.org", "h" * 32, None, "u" * 32, "news", "News",
        None, clock.now(), 1, 1,
    )  # fmt: skip
    dates = []
    for step in (0.0, 0.4, 0.7, 5.0):
        clock.advance(step)
        message = email.message_from_bytes(factory.campaign(row, campaign).data)
        dates.append(message["Date"])
        assert email.utils.parsedate_to_datetime(message["Date"]) == clock.now().replace(
            microsecond=0
        )
    assert len(set(dates)) >= 2
