"""Inbound mail: VERP bounces, ARF complaints and ``mailto:`` unsubscribes, end to end.

Real campaign mail goes out through the sink first, so every token is one the mailer minted.
Then realistic reports (``tests/data/inbound/``: Postfix, Exim, Exchange Online and Gmail
DSNs, a Yahoo-style and the RFC 5965 ARF report, an auto-reply, a forged report) are sent
with aiosmtplib to the real listener of the real mailer, and the state is read back.
"""

import email
import email.policy
import re
from pathlib import Path
from string import Template
from typing import Any

import aiosmtplib
import pytest
from aiohttp.test_utils import TestClient

from mailer.bootstrap import Mailer
from mailer.config import Settings
from mailer.domain.bounces import classify_bounce, parse
from mailer.domain.complaints import Delivery, Person, complained_about, read_report
from mailer.domain.feedback import FeedbackKind
from mailer.domain.inbound import (
    BounceBox,
    FeedbackLoopBox,
    InboundAddresses,
    Refusal,
    UnsubscribeBox,
)
from mailer.domain.ledger import Evidence
from mailer.domain.tokens import LinkClaim, RowTokens, TokenCodec
from mailer.statuses import Channel
from mailer.transport.inbound import MAX_MESSAGE_BYTES
from tests.conftest import BASE_URL, SECRET, Cli, make_settings, path_of, seed_confirmed
from tests.databases import Db
from tests.harness import Captured, SinkServer, query, wait_until

DOMAIN = "bounces.example.org"
SAMPLES = Path(__file__).parent / "data" / "inbound"
CLI = Evidence(channel=Channel.CLI.value, actor="test")
_MAILTO = re.compile(r"<mailto:([^?>]+)\?subject=unsubscribe>")


@pytest.fixture
def settings(tmp_path: Path, sink: SinkServer) -> Settings:
    return make_settings(
        tmp_path,
        smtp_host="127.0.0.1",
        smtp_port=sink.port,
        inbound_port=0,
        bounce_domain=DOMAIN,
        soft_bounce_limit=2,
    )


# -- helpers ----------------------------------------------------------------------------------


def db_of(settings: Settings) -> Db:
    return settings.database_url


async def subscribed(m: Mailer, settings: Settings, emails: list[str]) -> None:
    """A list "news" with ``emails`` as confirmed subscribers."""
    db = db_of(settings)
    await m.lists.create("news", "Example News")
    list_id = query(db, "SELECT id FROM mailing_list WHERE slug = 'news'")[0][0]
    await seed_confirmed(m, list_id, emails)


async def campaign_to(
    m: Mailer, sink: SinkServer, emails: list[str], subject: str = "November"
) -> dict[str, Captured]:
    """Send a campaign on "news"; wait for ``emails`` to get it and return each one's copy."""
    before = {e: len(sink.to(e)) for e in emails}
    campaign = await m.campaigns.create("news", subject, "Hello **you**.", "campaign")
    await m.campaigns.send(campaign)
    await wait_until(
        lambda: all(len(sink.to(e)) > before[e] for e in emails), what="the campaign to arrive"
    )
    return {e: sink.to(e)[-1] for e in emails}


def fill(sample: str, copy: Captured, **extra: str) -> bytes:
    """A sample report about ``copy``, with the real addresses and the real message quoted."""
    original = copy.raw.decode("utf-8").replace("\r\n", "\n")
    values = {
        "verp": copy.mail_from,
        "recipient": copy.rcpt_tos[0],
        "original": original,
        "original_headers": original.split("\n\n", 1)[0] + "\n",
        "fbl": f"fbl@{DOMAIN}",
        "domain": DOMAIN,
        "base_url": BASE_URL,
        **extra,
    }
    text = Template((SAMPLES / f"{sample}.eml").read_text()).substitute(values)
    return text.replace("\n", "\r\n").encode("utf-8")


async def deliver(m: Mailer, rcpt: str, data: bytes, mail_from: str = "") -> None:
    """Send ``data`` to the listener over SMTP, as a remote MTA would; it must be accepted."""
    assert m.listener is not None
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=m.listener.port) as smtp:
        refused, reply = await smtp.sendmail(mail_from, [rcpt], data)
    assert not refused and reply.startswith("2.0.0"), reply


async def rcpt_reply(m: Mailer, rcpt: str) -> tuple[int, str]:
    """The listener's answer to ``RCPT TO:<rcpt>``."""
    assert m.listener is not None
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=m.listener.port) as smtp:
        await smtp.mail("")
        try:
            reply = await smtp.rcpt(rcpt)
        except aiosmtplib.SMTPRecipientRefused as exc:
            return exc.code, exc.message
        return reply.code, reply.message


async def export_of(m: Mailer, address: str) -> dict[str, Any]:
    return await m.people.export(address, CLI)


def outbox_id(m: Mailer, copy: Captured) -> int:
    """The outbox row a copy's VERP envelope sender names (checked by the mailer's own rules)."""
    rows = InboundAddresses(RowTokens([SECRET]), DOMAIN)
    box = rows.resolve(copy.mail_from)
    assert isinstance(box, BounceBox), copy.mail_from
    return box.outbox_id


def mailto_of(copy: Captured) -> str:
    found = _MAILTO.search(str(copy.message["List-Unsubscribe"]))
    assert found is not None, copy.message["List-Unsubscribe"]
    return found.group(1)


def feedback_state(settings: Settings) -> list[tuple[Any, ...]]:
    """Everything feedback could change: ledger, suppressions, soft-bounce counts, marks."""
    return query(
        db_of(settings),
        "SELECT (SELECT count(*) FROM consent_event), (SELECT count(*) FROM suppression),"
        " (SELECT count(*) FROM bounce_score),"
        " (SELECT count(*) FROM outbox WHERE feedback IS NOT NULL),"
        " (SELECT count(*) FROM subscription WHERE status = 'confirmed'),"
        " (SELECT count(*) FROM subscription WHERE status = 'unsubscribed')",
    )


def suppressed_events(export: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        (e["channel"], e["actor"]) for e in export["consent_events"] if e["event"] == "suppressed"
    ]


# -- what goes out ------------------------------------------------------------------------------


async def test_each_message_has_its_own_verp_sender_and_a_mailto_after_the_https_link(
    mailer: Mailer, sink: SinkServer, settings: Settings
) -> None:
    await subscribed(mailer, settings, ["ann@example.com", "ben@example.com"])
    copies = await campaign_to(mailer, sink, ["ann@example.com", "ben@example.com"])
    await mailer.consent.request_opt_in("cat@example.com", "news", None, CLI)
    await wait_until(lambda: bool(sink.to("cat@example.com")), what="a confirmation request")
    copies["cat@example.com"] = sink.to("cat@example.com")[0]
    rows = set()
    for address, copy in copies.items():
        assert re.fullmatch(
            rf"bounces\+[0-9a-f]+-[0-9a-f]{{20}}@{re.escape(DOMAIN)}", copy.mail_from
        )
        rows.add(outbox_id(mailer, copy))
        assert copy.message["From"].addresses[0].addr_spec == "news@example.org"
        https, mailto = str(copy.message["List-Unsubscribe"]).split(", ")
        assert https.startswith(f"<{BASE_URL}/unsubscribe/")
        assert re.fullmatch(
            rf"<mailto:unsubscribe\+[0-9a-f]+-[0-9a-f]{{20}}@{re.escape(DOMAIN)}"
            r"\?subject=unsubscribe>",
            mailto,
        )
        assert copy.message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        export = await export_of(mailer, address)
        assert outbox_id(mailer, copy) in [d["id"] for d in export["deliveries"]]
    assert len(rows) == 3


# -- bounces ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sample", "kind", "status", "suppression"),
    [
        ("postfix-hard", "hard-bounce", "5.1.1", "bounced"),
        ("exim-hard", "hard-bounce", "5.1.1", "bounced"),
        ("exchange-hard", "hard-bounce", "5.1.10", "bounced"),
        ("gmail-hard", "hard-bounce", "5.1.1", "bounced"),
        ("postfix-delayed", "soft-bounce", "4.2.2", None),
        ("postfix-expired", "soft-bounce", "4.4.1", None),
        ("vacation", None, None, None),
    ],
)
async def test_a_report_to_the_verp_address_marks_its_delivery(
    mailer: Mailer,
    sink: SinkServer,
    settings: Settings,
    sample: str,
    kind: str | None,
    status: str | None,
    suppression: str | None,
) -> None:
    """Hard bounces suppress as bounced; soft ones count; an auto-reply changes nothing."""
    await subscribed(mailer, settings, ["dan@example.com", "eve@example.com"])
    copies = await campaign_to(mailer, sink, ["dan@example.com", "eve@example.com"])
    sent = len(sink.messages)
    copy = copies["dan@example.com"]
    await deliver(mailer, copy.mail_from, fill(sample, copy))

    dan = await export_of(mailer, "dan@example.com")
    assert dan["suppression"] == suppression
    [mark] = [d for d in dan["deliveries"] if d["id"] == outbox_id(mailer, copy)]
    assert mark["feedback"] == kind
    if status is not None:
        assert mark["feedback_detail"].startswith(f"{kind} {status}: ")
    assert suppressed_events(dan) == ([("bounce", "dsn")] if suppression else [])
    eve = await export_of(mailer, "eve@example.com")
    assert eve["suppression"] is None
    assert {d["feedback"] for d in eve["deliveries"]} == {None}
    assert len(sink.messages) == sent  # the listener never sends anything


async def test_a_report_the_parsers_choke_on_is_accepted_and_changes_nothing(
    mailer: Mailer, sink: SinkServer, settings: Settings
) -> None:
    """flufl.bounce raises on some malformed mail (here: an empty From); retrying cannot help,
    so it is taken (250) and dropped, and later reports still work."""
    await subscribed(mailer, settings, ["ivy@example.com"])
    copy = (await campaign_to(mailer, sink, ["ivy@example.com"]))["ivy@example.com"]
    before = feedback_state(settings)
    await deliver(mailer, copy.mail_from, b"From: \r\nSubject: x\r\n\r\nhello\r\n")
    assert feedback_state(settings) == before
    await deliver(mailer, copy.mail_from, fill("exim-hard", copy))
    assert (await mailer.people.show("ivy@example.com")).suppression == "bounced"


async def test_soft_bounces_suppress_at_the_limit_and_a_repeated_dsn_counts_once(
    mailer: Mailer, sink: SinkServer, settings: Settings
) -> None:
    await subscribed(mailer, settings, ["fay@example.com"])
    first = (await campaign_to(mailer, sink, ["fay@example.com"]))["fay@example.com"]
    second = (await campaign_to(mailer, sink, ["fay@example.com"], "December"))["fay@example.com"]
    await deliver(mailer, first.mail_from, fill("postfix-delayed", first))
    await deliver(mailer, first.mail_from, fill("postfix-delayed", first))  # the same, again
    assert (await export_of(mailer, "fay@example.com"))["suppression"] is None
    # MTAs may case-fold the local part: the token reads the same
    await deliver(mailer, second.mail_from.upper(), fill("postfix-expired", second))
    fay = await export_of(mailer, "fay@example.com")
    assert fay["suppression"] == "bounced"  # soft_bounce_limit = 2
    assert suppressed_events(fay) == [("bounce", "dsn")]
    assert (await mailer.people.show("fay@example.com")).suppression == "bounced"


async def test_a_suppressed_address_gets_no_more_campaign_mail(
    mailer: Mailer, sink: SinkServer, settings: Settings
) -> None:
    await subscribed(mailer, settings, ["gus@example.com", "hal@example.com"])
    copies = await campaign_to(mailer, sink, ["gus@example.com", "hal@example.com"])
    copy = copies["gus@example.com"]
    await deliver(mailer, copy.mail_from, fill("gmail-hard", copy))
    await campaign_to(mailer, sink, ["hal@example.com"], "December")
    assert len(sink.to("gus@example.com")) == 1
    assert len(sink.to("hal@example.com")) == 2


# -- complaints ---------------------------------------------------------------------------------


@pytest.mark.parametrize("sample", ["arf-rfc5965", "arf-yahoo"])
async def test_an_arf_complaint_with_our_signed_token_suppresses_as_complained(
    mailer: Mailer, sink: SinkServer, settings: Settings, sample: str
) -> None:
    await subscribed(mailer, settings, ["ida@example.com", "jon@example.com"])
    copies = await campaign_to(mailer, sink, ["ida@example.com", "jon@example.com"])
    copy = copies["ida@example.com"]
    await deliver(mailer, f"fbl@{DOMAIN}", fill(sample, copy), "feedback@arf.example.net")
    ida = await export_of(mailer, "ida@example.com")
    assert ida["suppression"] == "complained"
    [mark] = [d for d in ida["deliveries"] if d["id"] == outbox_id(mailer, copy)]
    assert mark["feedback"] == "complaint"
    [event] = [e for e in ida["consent_events"] if e["event"] == "suppressed"]
    assert (event["channel"], event["actor"]) == ("complaint", "feedback-loop")
    assert event["user_agent"] in ("SomeGenerator/1.0", "Yahoo!-Mail-Feedback/2.0")
    assert (await export_of(mailer, "jon@example.com"))["suppression"] is None


async def test_a_complaint_naming_the_person_only_by_the_https_link_suppresses(
    mailer: Mailer, sink: SinkServer, settings: Settings
) -> None:
    """Without a row token (no VERP, no mailto), the signed https link still identifies them."""
    await subscribed(mailer, settings, ["kim@example.com"])
    copy = (await campaign_to(mailer, sink, ["kim@example.com"]))["kim@example.com"]
    https_only = re.sub(rb", <mailto:[^>]*>", b"", copy.raw)
    report = fill(
        "arf-rfc5965", Captured(copy.mail_from, copy.rcpt_tos, https_only), verp="news@example.org"
    )
    assert b"mailto:unsubscribe" not in report and b"bounces+" not in report
    await deliver(mailer, f"fbl@{DOMAIN}", report, "abuse@example.com")
    kim = await export_of(mailer, "kim@example.com")
    assert kim["suppression"] == "complained"
    assert {d["feedback"] for d in kim["deliveries"]} == {None}  # no message was named


async def test_a_complaint_sent_to_the_verp_address_is_about_that_message(
    mailer: Mailer, sink: SinkServer, settings: Settings
) -> None:
    """Some feedback loops report to the envelope sender: its signed token names the message
    even when the enclosed copy carries no genuine token."""
    await subscribed(mailer, settings, ["joy@example.com"])
    copy = (await campaign_to(mailer, sink, ["joy@example.com"]))["joy@example.com"]
    await deliver(mailer, copy.mail_from, fill("arf-forged", copy), "abuse@example.com")
    joy = await export_of(mailer, "joy@example.com")
    assert joy["suppression"] == "complained"
    assert [d["feedback"] for d in joy["deliveries"]] == ["complaint"]


async def test_forged_or_unsigned_reports_suppress_nobody(
    mailer: Mailer, sink: SinkServer, settings: Settings
) -> None:
    """A report naming an address, with made-up tokens, changes nothing; so does a
    report whose type is not a complaint, even with genuine tokens."""
    await subscribed(mailer, settings, ["lea@example.com"])
    copy = (await campaign_to(mailer, sink, ["lea@example.com"]))["lea@example.com"]
    before = feedback_state(settings)
    await deliver(mailer, f"fbl@{DOMAIN}", fill("arf-forged", copy), "abuse@example.com")
    not_spam = fill("arf-rfc5965", copy).replace(
        b"Feedback-Type: abuse", b"Feedback-Type: not-spam"
    )
    await deliver(mailer, f"fbl@{DOMAIN}", not_spam, "abuse@example.com")
    await deliver(
        mailer, f"fbl@{DOMAIN}", b"Subject: hello\r\n\r\nnot a report\r\n", "x@example.com"
    )
    assert feedback_state(settings) == before
    lea = await export_of(mailer, "lea@example.com")
    assert lea["suppression"] is None
    assert [s["status"] for s in lea["subscriptions"]] == ["confirmed"]
    assert {d["feedback"] for d in lea["deliveries"]} == {None}


# -- no relay, no backscatter -------------------------------------------------------------------


async def test_only_our_inbound_addresses_are_accepted(
    mailer: Mailer, sink: SinkServer, settings: Settings
) -> None:
    await subscribed(mailer, settings, ["max@example.com"])
    copy = (await campaign_to(mailer, sink, ["max@example.com"]))["max@example.com"]
    verp, mailto = copy.mail_from, mailto_of(copy)
    verp_local, mailto_local = verp.split("@")[0], mailto.split("@")[0]
    token = verp_local.partition("+")[2]
    relay = "550 5.7.1 Relaying denied"
    unknown = "550 5.1.1 No such mailbox here"
    cases = {
        "max@example.com": relay,  # the subscriber: we are nobody's relay
        "someone@gmail.com": relay,
        "news@example.org": relay,  # the From domain is not the bounce domain
        f"{verp_local}@example.org": relay,  # a genuine token at another domain
        f"postmaster@{DOMAIN}": unknown,
        f"bounces@{DOMAIN}": unknown,
        f"bounces+{token[:-1]}a@{DOMAIN}": unknown,  # tampered
        f"unsubscribe+{token}@{DOMAIN}": unknown,  # a bounce token for the other purpose
        f"bounces+{mailto_local.partition('+')[2]}@{DOMAIN}": unknown,
        f"fbl+x@{DOMAIN}": unknown,
    }
    for rcpt, want in cases.items():
        code, message = await rcpt_reply(mailer, rcpt)
        assert f"{code} {message}" == want, rcpt
    for rcpt in (verp, verp.upper(), mailto, f"FBL@{DOMAIN.upper()}"):
        assert (await rcpt_reply(mailer, rcpt))[0] == 250, rcpt
    assert mailer.listener is not None
    port = mailer.listener.port
    with pytest.raises(aiosmtplib.SMTPRecipientsRefused):
        await aiosmtplib.send(
            b"Subject: relay me\r\n\r\nhi\r\n",
            sender="spammer@example.net",
            recipients=["victim@example.net"],
            hostname="127.0.0.1",
            port=port,
        )
    assert len(sink.messages) == 1  # only the campaign copy: nothing relayed, nothing bounced
    assert (await export_of(mailer, "max@example.com"))["suppression"] is None


async def test_the_listener_offers_no_auth_and_refuses_oversized_mail(
    mailer: Mailer, sink: SinkServer, settings: Settings
) -> None:
    await subscribed(mailer, settings, ["pat@example.com"])
    copy = (await campaign_to(mailer, sink, ["pat@example.com"]))["pat@example.com"]
    assert mailer.listener is not None
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=mailer.listener.port) as smtp:
        await smtp.ehlo()
        assert not smtp.supports_extension("auth")
        assert not smtp.supports_extension("starttls")
        assert smtp.esmtp_extensions["size"] == str(MAX_MESSAGE_BYTES)
        huge = fill("postfix-hard", copy) + (b"x" * 76 + b"\r\n") * (MAX_MESSAGE_BYTES // 78)
        with pytest.raises(aiosmtplib.SMTPResponseException) as refused:
            await smtp.sendmail("", [copy.mail_from], huge)
        assert refused.value.code == 552
    assert (await export_of(mailer, "pat@example.com"))["suppression"] is None


# -- mailto unsubscribe -------------------------------------------------------------------------


async def test_mailto_unsubscribe_does_what_the_one_click_post_does(
    mailer: Mailer, sink: SinkServer, settings: Settings, client: TestClient[Any, Any]
) -> None:
    """Twins get the same campaign; one writes to the mailto address, the other one-clicks."""
    await subscribed(mailer, settings, ["nia@example.com", "ola@example.com", "ref@example.com"])
    copies = await campaign_to(mailer, sink, ["nia@example.com", "ola@example.com"])
    by_mail, by_post = copies["nia@example.com"], copies["ola@example.com"]
    request = (
        "From: nia@example.com\r\nTo: " + mailto_of(by_mail) + "\r\nSubject: unsubscribe\r\n\r\n"
    ).encode("ascii")
    await deliver(mailer, mailto_of(by_mail).upper(), request, "nia@example.com")
    url = str(by_post.message["List-Unsubscribe"]).split(", ")[0].strip("<>")
    response = await client.post(path_of(url), data={"List-Unsubscribe": "One-Click"})
    assert response.status == 200

    nia, ola = (
        await export_of(mailer, "nia@example.com"),
        await export_of(mailer, "ola@example.com"),
    )
    assert nia["suppression"] == ola["suppression"] is None  # list scope, as the header's link
    assert [s["status"] for s in nia["subscriptions"]] == ["unsubscribed"]
    assert [s["status"] for s in ola["subscriptions"]] == ["unsubscribed"]

    def unsubscribed(export: dict[str, Any]) -> list[tuple[Any, ...]]:
        return [
            (e["event"], e["scope"], e["list_uid"])
            for e in export["consent_events"]
            if e["event"] not in ("exported",)
        ]

    assert unsubscribed(nia) == unsubscribed(ola)
    [last] = [e for e in nia["consent_events"] if e["channel"] == "mail"]
    assert (last["actor"], last["ip"]) == ("subscriber", "127.0.0.1")
    # a second campaign reaches neither
    await campaign_to(mailer, sink, ["ref@example.com"], "December")
    assert len(sink.to("nia@example.com")) == len(sink.to("ola@example.com")) == 1


async def test_mailto_unsubscribe_of_a_confirmation_request_is_global(
    mailer: Mailer, sink: SinkServer, news: str
) -> None:
    await mailer.consent.request_opt_in("pam@example.com", news, None, CLI)
    await wait_until(lambda: bool(sink.to("pam@example.com")), what="a confirmation request")
    copy = sink.to("pam@example.com")[0]
    await deliver(mailer, mailto_of(copy), b"Subject: unsubscribe\r\n\r\n", "pam@example.com")
    assert (await mailer.people.show("pam@example.com")).suppression == "unsubscribed"


# -- the pure parts -------------------------------------------------------------------------------


def test_recipients_resolve_to_mailboxes_or_refusals() -> None:
    rows = RowTokens(["k"])
    inbound = InboundAddresses(rows, "Bounces.Example.org")
    assert inbound.resolve(inbound.bounce(7)) == BounceBox(7)
    assert inbound.resolve(inbound.bounce(7).upper() + ".") == BounceBox(7)
    mailto = inbound.unsubscribe_mailto(7)
    assert mailto.startswith("mailto:unsubscribe+") and mailto.endswith("?subject=unsubscribe")
    assert inbound.resolve(mailto.removeprefix("mailto:").split("?")[0]) == UnsubscribeBox(7)
    assert inbound.resolve("fbl@bounces.example.org") == FeedbackLoopBox()
    assert inbound.resolve("fbl@example.org") is Refusal.NOT_OUR_DOMAIN
    assert inbound.resolve("no-at-sign") is Refusal.NOT_OUR_DOMAIN
    assert inbound.resolve("bounces+@bounces.example.org") is Refusal.NO_SUCH_MAILBOX
    other_key = InboundAddresses(RowTokens(["other"]), "bounces.example.org")
    assert inbound.resolve(other_key.bounce(7)) is Refusal.NO_SUCH_MAILBOX
    assert len(inbound.unsubscribe_mailto(16**16 - 1).split("@")[0]) <= len("mailto:") + 64


def test_a_dsn_that_reports_delivery_is_not_a_bounce() -> None:
    dsn = (SAMPLES / "postfix-hard.eml").read_text()
    delivered = Template(
        dsn.replace("Action: failed", "Action: delivered").replace("Status: 5.1.1", "Status: 2.0.0")
    ).substitute(
        verp="bounces+1-aaaaaaaaaaaaaaaaaaaa@x.org",
        recipient="a@example.com",
        original_headers="Subject: hi\n",
    )
    assert classify_bounce(parse(delivered.encode())) is None
    failed = Template(dsn).substitute(
        verp="bounces+1-aaaaaaaaaaaaaaaaaaaa@x.org",
        recipient="a@example.com",
        original_headers="Subject: hi\n",
    )
    bounce = classify_bounce(parse(failed.encode()))
    assert bounce is not None and bounce.kind is FeedbackKind.HARD_BOUNCE


def test_complaint_tokens_are_read_in_order_and_only_when_genuine() -> None:
    rows = RowTokens(["k"])
    links = TokenCodec(["k"], clock=lambda: 0.0)
    inbound = InboundAddresses(rows, DOMAIN)
    https = f"{BASE_URL}/unsubscribe/" + links.unsubscribe_token(LinkClaim("a" * 32, "list1"))

    def report(mail_from: str, return_path: str, unsubscribe: str) -> bytes:
        return (
            "Content-Type: multipart/report; report-type=feedback-report; boundary=b\r\n\r\n"
            "--b\r\nContent-Type: message/feedback-report\r\n\r\n"
            f"Feedback-Type: Abuse\r\nOriginal-Mail-From: <{mail_from}>\r\n\r\n"
            "--b\r\nContent-Type: text/rfc822-headers\r\n\r\n"
            f"Return-Path: <{return_path}>\r\nList-Unsubscribe: {unsubscribe}\r\n\r\n"
            "--b--\r\n"
        ).encode()

    def target(data: bytes) -> object:
        parsed = read_report(email.message_from_bytes(data, policy=email.policy.compat32))
        assert parsed is not None and parsed.is_complaint
        return complained_about(parsed, inbound, links, BASE_URL)

    forged = f"bounces+1-{'a' * 20}@{DOMAIN}"
    mailto = f"<{inbound.unsubscribe_mailto(3)}>"
    assert target(report(inbound.bounce(1), inbound.bounce(2), mailto)) == Delivery(1)
    assert target(report(forged, inbound.bounce(2), mailto)) == Delivery(2)
    assert target(report(forged, forged, f"<{https}>, {mailto}")) == Delivery(3)
    folded = f"<{https[:40]}\r\n {https[40:]}>"
    assert target(report(forged, forged, folded)) == Person("a" * 32)
    assert target(report(forged, forged, f"<{https}x>")) is None
    assert (
        target(report(forged, forged, f"<{https.replace(BASE_URL, 'https://evil.test')}>")) is None
    )


def test_inbound_cli_says_when_it_is_off(cli: Cli) -> None:
    code, _, err = cli("inbound")
    assert code == 1
    assert err.strip() == "mailer: error: inbound mail is off: set MAILER_INBOUND_PORT to listen"
