"""Privacy-policy versions: announced once to every confirmed person, public, going forward."""

import json
from collections import Counter
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from mailer.bootstrap import Mailer, open_mailer
from mailer.domain.ledger import Evidence
from mailer.domain.tokens import TokenCodec
from mailer.errors import Conflict, InvalidInput
from mailer.web.app import create_app
from tests.conftest import SECRET, init_db, make_settings
from tests.databases import active
from tests.harness import MutableClock, SinkServer, query, wait_until

STAFF = Evidence(channel="cli", actor="cli:test")
STAMP = "%Y-%m-%d %H:%M:%S.%f"


def populate(m: Mailer, db: Path, lists: list[int]) -> dict[str, str]:
    """People on one to five lists in every state; returns address -> expected ('yes'/'no')."""
    now = datetime.now(UTC).strftime(STAMP)
    expected: dict[str, str] = {}
    with active.connect(db) as conn, conn:
        for i in range(60):
            email = f"person{i:02d}@example.org"
            _, digest = m.consent.identify(email)
            (sid,) = conn.execute(
                "INSERT INTO subscriber (email, email_hash, name, created_at) VALUES (?,?,NULL,?)"
                " RETURNING id",
                (email, digest, now),
            ).fetchone()
            on = lists[: 1 + i % 5]
            kind = i % 4  # 0, 1: confirmed somewhere; 2: only unsubscribed; 3: only pending
            for n, list_id in enumerate(on):
                status = (
                    "confirmed"
                    if kind in (0, 1) and n == 0
                    else "unsubscribed"
                    if kind == 2
                    else "pending"
                    if kind == 3
                    else "unsubscribed"
                )
                conn.execute(
                    "INSERT INTO subscription (subscriber_id, list_id, status, created_at,"
                    " updated_at, confirmed_at) VALUES (?,?,?,?,?,?)",
                    (sid, list_id, status, now, now, now),
                )
            expected[email] = "yes" if kind in (0, 1) else "no"
    return expected


async def test_announcement_reaches_each_confirmed_person_exactly_once(
    tmp_path: Path, sink: SinkServer
) -> None:
    """One copy per person confirmed on any list (not per list), none to the others (G1)."""
    settings = make_settings(tmp_path, smtp_host="127.0.0.1", smtp_port=sink.port)
    await init_db(settings)
    db = tmp_path / "mailer.db"
    async with open_mailer(settings, sending=True) as m:
        lists = [(await m.lists.create(f"l{i}", f"List {i}")).id for i in range(5)]
        expected = populate(m, db, lists)
        suppressed = "person00@example.org"  # confirmed, but then suppressed
        await m.people.suppress(suppressed, STAFF)
        expected[suppressed] = "no"
        before = query(db, "SELECT subscriber_id, list_id, status FROM subscription")
        published = await m.policy.publish(
            "2026-12", date.today() + timedelta(days=30), "We shorten retention.", None
        )

        async def done() -> bool:
            return (await m.campaigns.get(published.campaign_id)).status == "sent"

        await wait_until(done, timeout=15, what="the announcement")
        assert query(db, "SELECT subscriber_id, list_id, status FROM subscription") == before
    copies = Counter(r for msg in sink.messages for r in msg.rcpt_tos)
    should = {e for e, v in expected.items() if v == "yes"}
    assert set(copies) == should
    assert set(copies.values()) == {1}
    message = sink.messages[0].message
    assert message["List-Id"] == '"Example Org" <announcements.example.org>'
    token = str(message["List-Unsubscribe"]).strip("<>").rsplit("/", 1)[1]
    claim = TokenCodec([SECRET], clock=lambda: 0.0).read_unsubscribe(token)
    assert claim.is_global  # an announcement's unsubscribe link is global
    text = message.get_body(("plain",))
    assert text is not None
    assert "We shorten retention." in text.get_content()


async def test_publish_rules(mailer: Mailer) -> None:
    """Going forward only; a version is published once; the version name is checked."""
    today = date.today()
    with pytest.raises(InvalidInput, match="going forward only"):
        await mailer.policy.publish("v1", today - timedelta(days=1), "text", None)
    with pytest.raises(InvalidInput, match="version"):
        await mailer.policy.publish("bad version!", today, "text", None)
    with pytest.raises(InvalidInput, match="http"):
        await mailer.policy.publish("v1", today, "text", "ftp://example.org/p")
    await mailer.policy.publish("v1", today, "text", None)
    with pytest.raises(Conflict, match="already published"):
        await mailer.policy.publish("v1", today + timedelta(days=1), "other", None)
    assert [v.version for v in await mailer.policy.history()] == ["v1"]


async def test_consent_events_record_the_version_in_force(tmp_path: Path, sink: SinkServer) -> None:
    """Each ledger entry names the version in force when it happened, never a later one."""
    clock = MutableClock()
    settings = make_settings(tmp_path, smtp_host="127.0.0.1", smtp_port=sink.port)
    await init_db(settings)
    async with open_mailer(settings, clock=clock) as m:
        await m.lists.create("news", "News")
        await m.consent.request_opt_in("a@example.org", "news", None, STAFF)
        today = clock.now().date()
        await m.policy.publish("v1", today, "first", None)
        await m.policy.publish("v2", today + timedelta(days=10), "second", None)
        await m.consent.request_opt_in("b@example.org", "news", None, STAFF)
        clock.advance(timedelta(days=11).total_seconds())
        await m.consent.request_opt_in("c@example.org", "news", None, STAFF)
        versions = {
            email: (await m.people.export(email, STAFF))["consent_events"][0]["policy_version"]
            for email in ("a@example.org", "b@example.org", "c@example.org")
        }
    assert versions == {"a@example.org": None, "b@example.org": "v1", "c@example.org": "v2"}


async def test_privacy_page_shows_the_policy_in_force_and_its_history(
    tmp_path: Path, sink: SinkServer
) -> None:
    """GET /privacy: the version in force, upcoming changes, and every summary, to anyone."""
    clock = MutableClock()
    settings = make_settings(tmp_path, smtp_host="127.0.0.1", smtp_port=sink.port)
    await init_db(settings)
    async with open_mailer(settings, clock=clock) as m:
        today = clock.now().date()
        await m.policy.publish("2026-11", today, "Data is *never* sold.", "https://example.org/p")
        await m.policy.publish("2027-01", today + timedelta(days=40), "Shorter retention.", None)
        async with TestClient(TestServer(create_app(m))) as http:
            r = await http.get("/privacy")
            page = await r.text()
    assert r.status == 200
    assert "Version <strong>2026-11</strong> is in force since" in page
    assert f"takes effect on {(today + timedelta(days=40)).isoformat()}" in page
    assert "<em>never</em>" in page
    assert 'href="https://example.org/p"' in page
    assert page.index("2027-01") < page.index("Data is")  # newest first


def test_policy_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    """policy publish prints the announcement campaign; policy ls --json lists versions."""
    from mailer.cli.main import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MAILER_DATABASE_URL", active.url(tmp_path / "p.db"))
    monkeypatch.setenv("MAILER_VAR_DIR", str(tmp_path / "var"))
    assert main(["init"]) == 0
    summary = tmp_path / "changes.md"
    summary.write_text("What changes.\n")
    effective = (date.today() + timedelta(days=5)).isoformat()
    capsys.readouterr()
    code = main(
        [
            "policy",
            "publish",
            "--version",
            "v9",
            "--effective",
            effective,
            "--summary",
            str(summary),
        ]
    )
    assert code == 0
    assert "announcement is campaign 1" in capsys.readouterr().out
    assert main(["policy", "ls", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(v["version"], v["effective_on"], v["announcement_campaign"]) for v in listed] == [
        ("v9", effective, 1)
    ]
    assert (
        main(
            [
                "policy",
                "publish",
                "--version",
                "v10",
                "--effective",
                "yesterday",
                "--summary",
                str(summary),
            ]
        )
        == 1
    )
    assert "is not a date" in capsys.readouterr().err
