"""A person's rights: ``subscriber export`` shows all held on them, ``subscriber erase`` leaves
no trace of the address (database file, WAL, captured mail) but the keyed suppression hash.

Everything is real: a SQLite file, the embedded capture server writing ``var/outbox/`` (no
``smtp_host``), the aiohttp app on loopback, and the ``mailer`` CLI run in-process (in a thread,
against the same files, while the mailer serves).
"""

import asyncio
import base64
import getpass
import json
import quopri
import sqlite3
import unicodedata
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.header import Header
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from mailer.bootstrap import Mailer, open_mailer
from mailer.cli.main import main
from mailer.config import Settings
from mailer.domain.addresses import parse_address
from mailer.domain.ledger import Evidence
from mailer.errors import Conflict
from mailer.services.erasure import AddressMatcher, scrub_maildir
from mailer.web.app import create_app
from tests.conftest import (
    BASE_URL,
    SECRET,
    Run,
    auth,
    init_db,
    links,
    make_settings,
    path_of,
    sqlite_only,
)
from tests.databases import active
from tests.harness import Captured, query, wait_until

API = "/api/v1/subscriptions"
NAME = "Quixote Namesake"
IP = "203.0.113.77"
AGENT = "QuixoteBrowser/7.1"
BOB = "bob@example.org"
BULK = 300
"""Other people on a third list, so the person's rows share pages with theirs (page splits,
index entries on both sides): freed cells must be zeroed, not only unlinked."""


@dataclass
class World:
    mailer: Mailer
    client: TestClient[Any, Any]
    settings: Settings
    db_path: Path
    root: Path
    key: str
    cli: Callable[..., Awaitable[Run]]


@pytest.fixture
async def world(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> AsyncIterator[World]:
    """A serving mailer whose mail goes to the capture Maildir, and a CLI on the same files."""
    settings = make_settings(tmp_path)
    assert settings.uses_capture
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MAILER_CONFIG", raising=False)
    monkeypatch.delenv("MAILER_SMTP_HOST", raising=False)
    monkeypatch.setenv("MAILER_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("MAILER_VAR_DIR", str(settings.var_dir))
    monkeypatch.setenv("MAILER_SECRET_KEYS", SECRET)
    monkeypatch.setenv("MAILER_BASE_URL", BASE_URL)

    async def cli(*args: str) -> Run:
        code = await asyncio.to_thread(main, list(args))
        out = capsys.readouterr()
        return code, out.out, out.err

    await init_db(settings)
    async with open_mailer(settings, sending=True) as mailer:
        for slug, name in (("news", "Example News"), ("tips", "Tips"), ("other", "Other")):
            await mailer.lists.create(slug, name)
        key = await mailer.api_keys.create("site")
        async with TestClient(TestServer(create_app(mailer))) as client:
            yield World(mailer, client, settings, tmp_path / "mailer.db", tmp_path, key, cli)


def stored_files(world: World) -> dict[Path, bytes]:
    """Every captured message file, by path."""
    return {p: p.read_bytes() for p in world.settings.outbox_dir.rglob("*") if p.is_file()}


def files_to(world: World, email: str) -> set[Path]:
    """Captured message files whose To is ``email`` (compared case-insensitively)."""
    return {
        p
        for p, raw in stored_files(world).items()
        if str(Captured("", [], raw).message["To"]).casefold() == email.casefold()
    }


def mail_to(world: World, email: str) -> list[Captured]:
    """Captured messages whose To is ``email`` (compared case-insensitively)."""
    found = []
    for raw in stored_files(world).values():
        parsed = Captured("", [], raw).message
        if str(parsed["To"]).casefold() == email.casefold():
            found.append(Captured(str(parsed["From"]), [str(parsed["To"])], raw))
    return sorted(found, key=lambda c: str(c.message["Date"]) + str(c.message["Message-ID"]))


def spellings(raw: str) -> list[bytes]:
    """The address as typed, lower-cased, normalised, NFD, and with its domain in punycode."""
    local, _, domain = raw.partition("@")
    stored = parse_address(raw).email
    puny_domain = domain.lower().encode("idna").decode("ascii")
    forms = {raw, stored, f"{local}@{puny_domain}", f"{local}@{domain.lower()}"}
    forms |= {f.lower() for f in forms} | {unicodedata.normalize("NFD", f) for f in forms}
    return sorted({f.encode("utf-8") for f in forms})


def traces(path: Path, needles: list[bytes]) -> list[str]:
    """Which of ``needles`` a file holds, byte for byte or ASCII-case-insensitively."""
    data = path.read_bytes()
    lowered = data.lower()
    return [f"{path.name}: {n!r}" for n in needles if n in data or n.lower() in lowered]


def all_traces(root: Path, needles: list[bytes]) -> list[str]:
    return [t for p in sorted(root.rglob("*")) if p.is_file() for t in traces(p, needles)]


def bulk_insert(db_path: Path, prefix: str, n: int) -> None:
    """Confirmed people on the list ``other`` (not mailed by these tests), inserted directly."""
    now = datetime.now(UTC).isoformat(sep=" ")
    with active.connect(db_path) as conn, conn:
        (list_id,) = conn.execute("SELECT id FROM mailing_list WHERE slug='other'").fetchone()
        for i in range(n):
            email = f"{prefix}{i:04d}@example.net"
            (sid,) = conn.execute(
                "INSERT INTO subscriber(email, email_hash, name, created_at)"
                " VALUES (?, ?, ?, ?) RETURNING id",
                (email, f"{prefix}{i:04d}".ljust(32, "0")[:32], f"Person {i}", now),
            ).fetchone()
            conn.execute(
                "INSERT INTO subscription(subscriber_id, list_id, status, created_at,"
                " updated_at, confirmed_at) VALUES (?, ?, 'confirmed', ?, ?, ?)",
                (sid, list_id, now, now, now),
            )


async def opt_in_and_confirm(
    world: World,
    email: str,
    slug: str,
    *,
    name: str = "Someone",
    ip: str | None = None,
    agent: str = "Test/1",
) -> dict[str, str]:
    """API opt-in, wait for the captured request, POST its confirm button; return its links."""
    before = len(mail_to(world, parse_address(email).email))
    body: dict[str, str] = {"email": email, "list": slug, "name": name}
    if ip is not None:
        body |= {"ip": ip, "user_agent": agent}
    r = await world.client.post(API, json=body, headers=auth(world.key))
    assert r.status == 202, await r.text()
    stored = parse_address(email).email
    await wait_until(lambda: len(mail_to(world, stored)) > before, what=f"request to {email}")
    found = links(mail_to(world, stored)[-1])
    r = await world.client.post(path_of(found["confirm"]), headers={"User-Agent": agent})
    assert r.status == 200
    return found


def others(db_path: Path, table: str, person_id: int) -> list[tuple[Any, ...]]:
    """Every row of ``table`` (subscriber, subscription or outbox) not about ``person_id``."""
    column = "id" if table == "subscriber" else "subscriber_id"
    found = query(db_path, f"SELECT * FROM {table} WHERE {column} != ?", person_id)
    return sorted(found, key=repr)


def ledger_rows(db_path: Path) -> list[tuple[Any, ...]]:
    """The consent ledger in order: seq, at, event, subject_hash, ..., ip, user_agent, ..."""
    return query(db_path, "SELECT * FROM consent_event ORDER BY seq")


def suppression_of(db_path: Path, subject: str) -> str | None:
    found = query(db_path, "SELECT reason FROM suppression WHERE email_hash=?", subject)
    return found[0][0] if found else None


def all_sent(db_path: Path) -> bool:
    return not query(db_path, "SELECT id FROM outbox WHERE status NOT IN ('sent')")


@dataclass
class Person:
    """Someone on two lists, with consent events and three captured messages (two confirmation
    requests and a campaign); bob and BULK others are there too."""

    address: str
    stored: str
    subject: str
    campaign: int
    global_link: str
    list_link: str
    needles: list[bytes]
    """The address's spellings, the person's name, IP and user agent: all must go."""


@pytest.fixture(params=["Ann.Lee@Bücher.Example", "Zoë.Quist@Example.ORG"])
async def person(world: World, request: pytest.FixtureRequest) -> Person:
    """One run with an IDN domain in mixed case, one with a non-ASCII local part."""
    address: str = request.param
    m, db = world.mailer, world.db_path
    stored = parse_address(address).email
    bulk_insert(db, "before", BULK // 2)
    first = await opt_in_and_confirm(world, address, "news", name=NAME, ip=IP, agent=AGENT)
    await opt_in_and_confirm(world, address.upper(), "tips", ip=IP, agent=AGENT)
    bulk_insert(db, "after", BULK // 2)
    await opt_in_and_confirm(world, BOB, "news")
    campaign = await m.campaigns.create("news", "Quixote quarterly", "Hello **all**.", "campaign")
    await m.campaigns.send(campaign)
    await wait_until(lambda: len(mail_to(world, stored)) == 3, what="the campaign to the person")
    await wait_until(lambda: len(mail_to(world, BOB)) == 2, what="the campaign to bob")
    await wait_until(lambda: all_sent(db), what="every outbox row recorded as sent")
    assert all_traces(world.root, spellings(address))  # the check sees what it looks for
    return Person(
        address=address,
        stored=stored,
        subject=m.consent.identify(address)[1],
        campaign=campaign,
        global_link=first["unsubscribe"],
        list_link=links(mail_to(world, stored)[-1])["unsubscribe"],
        needles=[*spellings(address), NAME.encode(), IP.encode(), AGENT.encode()],
    )


async def test_export_holds_every_category_and_is_recorded(world: World, person: Person) -> None:
    """`subscriber export` prints subscriber, subscriptions, suppression, events, deliveries."""
    code, out, err = await world.cli("subscriber", "export", person.address.lower())
    assert code == 0, err
    data = json.loads(out)
    assert (data["email"], data["email_hash"], data["erased"], data["note"]) == (
        person.stored,
        person.subject,
        False,
        None,
    )
    assert data["subscriber"]["name"] == NAME and data["subscriber"]["created_at"]
    assert [(s["list"], s["status"]) for s in data["subscriptions"]] == [
        ("news", "confirmed"),
        ("tips", "confirmed"),
    ]
    assert all(s["confirmed_at"] for s in data["subscriptions"])
    assert data["suppression"] is None
    events = data["consent_events"]
    assert [(e["event"], e["channel"]) for e in events] == [
        ("opt-in-requested", "api"),
        ("confirmed", "page"),
        ("opt-in-requested", "api"),
        ("confirmed", "page"),
    ]
    assert {(e["ip"], e["user_agent"]) for e in events if e["channel"] == "api"} == {(IP, AGENT)}
    assert {e["user_agent"] for e in events if e["channel"] == "page"} == {AGENT}
    deliveries = data["deliveries"]
    assert [(d["kind"], d["list"], d["campaign_subject"]) for d in deliveries] == [
        ("confirm", "news", None),
        ("confirm", "tips", None),
        ("campaign", "news", "Quixote quarterly"),
    ]
    assert [d["campaign_id"] for d in deliveries] == [None, None, person.campaign]
    for d in deliveries:
        assert (d["status"], d["reason"], d["attempts"]) == ("sent", None, 1)
        assert d["created_at"] <= d["checked_at"] <= d["updated_at"]
    actor = f"cli:{getpass.getuser()}"
    assert (data["export"]["channel"], data["export"]["actor"]) == ("cli", actor)
    recorded = query(
        world.db_path,
        "SELECT seq, channel, actor FROM consent_event WHERE event='exported' AND subject_hash=?",
        person.subject,
    )
    assert recorded == [(data["export"]["seq"], "cli", actor)]
    again = json.loads((await world.cli("subscriber", "export", person.address))[1])
    assert [e["event"] for e in again["consent_events"]][-1] == "exported"


async def test_erase_leaves_no_copy_of_the_address(world: World, person: Person) -> None:
    """No file (database, -wal, -shm, var/outbox) holds the address; others are untouched."""
    db = world.db_path
    files_before = stored_files(world)
    theirs = files_to(world, person.stored)
    [(person_id,)] = query(db, "SELECT id FROM subscriber WHERE email_hash=?", person.subject)
    others_before = {t: others(db, t, person_id) for t in ("subscriber", "subscription", "outbox")}
    events_before = ledger_rows(db)
    code, out, err = await world.cli("subscriber", "erase", person.address, "--yes", "--json")
    assert code == 0, err
    assert json.loads(out) == {
        "already_erased": False,
        "subscriptions": 2,
        "deliveries": 3,
        "ledger_entries": 4,
        "captured_files": 3,
        "suppression": "erased",
    }
    # the address, the name, the IP and the user agent are in no file of the installation
    assert all_traces(world.root, person.needles) == []
    for suffix in ("", "-wal", "-shm"):
        f = db.with_name(db.name + suffix)
        assert not f.exists() or traces(f, person.needles) == [], suffix
    # nobody else's data or captured mail changed
    assert len(theirs) == 3
    assert stored_files(world) == {p: raw for p, raw in files_before.items() if p not in theirs}
    assert len(mail_to(world, BOB)) == 2
    for table, kept in others_before.items():
        assert sorted(query(db, f"SELECT * FROM {table}"), key=repr) == kept, table
    assert sum(len(kept) for kept in others_before.values()) > BULK
    # the ledger keeps its entries, without IP and user agent, plus who erased and when
    events_after = ledger_rows(db)
    assert len(events_after) == len(events_before) + 1
    assert events_after[-1][2:4] == ("erased", person.subject)
    assert events_after[-1][7] == f"cli:{getpass.getuser()}"
    for before, after in zip(events_before, events_after, strict=False):
        if before[3] == person.subject:
            assert after[8:10] == (None, None)
            assert after[:8] + after[10:] == before[:8] + before[10:]
        else:
            assert after == before
    assert suppression_of(db, person.subject) == "erased"


async def test_after_erase_only_the_hash_answers(world: World, person: Person) -> None:
    """Export says only the hash is held, the ledger verifies, old unsubscribe links answer 200."""
    assert (await world.cli("subscriber", "erase", person.address, "--yes"))[0] == 0
    code, out, err = await world.cli("subscriber", "export", person.address)
    assert code == 0 and "only its keyed suppression hash" in err
    data = json.loads(out)
    assert (data["email"], data["erased"], data["suppression"]) == (None, True, "erased")
    assert data["note"] is not None and "no personal data" in data["note"]
    assert (data["subscriber"], data["subscriptions"], data["deliveries"]) == (None, [], [])
    assert {(e["ip"], e["user_agent"]) for e in data["consent_events"]} == {(None, None)}
    assert [e["event"] for e in data["consent_events"]][-1] == "erased"
    assert not any(n.decode().casefold() in out.casefold() for n in person.needles)
    code, out, err = await world.cli("ledger", "verify", "--json")
    assert code == 0 and json.loads(out)["ok"] is True, err
    for link in (person.global_link, person.list_link):
        r = await world.client.get(path_of(link))
        assert r.status == 200
        r = await world.client.post(path_of(link), data={"List-Unsubscribe": "One-Click"})
        assert r.status == 200
    assert suppression_of(world.db_path, person.subject) == "erased"
    assert query(
        world.db_path, "SELECT count(*) FROM subscriber WHERE email_hash=?", person.subject
    ) == [(0,)]
    assert all_traces(world.root, person.needles) == []


async def test_re_adding_after_erase_needs_the_persons_confirmation(
    world: World, person: Person
) -> None:
    """CLI add and API opt-in each send a new request; only the confirm POST lifts 'erased'."""
    db = world.db_path
    assert (await world.cli("subscriber", "erase", person.address, "--yes"))[0] == 0
    code, out, err = await world.cli("subscriber", "add", person.address, "--list", "news")
    assert code == 0 and "confirmation request queued" in out, err
    r = await world.client.post(
        API, json={"email": person.address, "list": "tips"}, headers=auth(world.key)
    )
    assert r.status == 202
    await wait_until(lambda: len(mail_to(world, person.stored)) == 2, what="two new requests")
    assert suppression_of(db, person.subject) == "erased"
    confirms = {
        str(c.message["Subject"]): links(c)["confirm"] for c in mail_to(world, person.stored)
    }
    news_confirm = confirms["Confirm your subscription to Example News"]
    assert (await world.client.get(path_of(news_confirm))).status == 200
    assert suppression_of(db, person.subject) == "erased"
    assert (await world.client.post(path_of(news_confirm))).status == 200
    assert suppression_of(db, person.subject) is None
    shown = await world.mailer.people.show(person.address)
    assert [(s.list_slug, s.status) for s in shown.subscriptions] == [
        ("news", "confirmed"),
        ("tips", "pending"),
    ]
    assert shown.subscriber is not None and shown.subscriber.name is None
    assert (await world.cli("ledger", "verify"))[0] == 0


async def test_erase_again_and_unknown_addresses(world: World) -> None:
    """Erasing an erased person says so and is recorded; unknown addresses are a clear error."""
    address = "Kim@Example.org"
    await opt_in_and_confirm(world, address, "news")
    _, subject = world.mailer.consent.identify(address)
    code, out, _ = await world.cli("subscriber", "erase", address, "--yes")
    assert code == 0 and "erased Kim@Example.org: 1 subscription(s)" in out
    assert "1 captured message(s)" in out
    code, out, _ = await world.cli("subscriber", "erase", "kim@EXAMPLE.org", "--yes")
    assert code == 0 and "was already erased: only its suppression hash is held" in out
    code, out, _ = await world.cli("subscriber", "erase", address, "--yes", "--json")
    assert json.loads(out)["already_erased"] is True
    erased = query(
        world.db_path,
        "SELECT actor FROM consent_event WHERE event='erased' AND subject_hash=?",
        subject,
    )
    assert erased == [(f"cli:{getpass.getuser()}",)] * 3
    assert suppression_of(world.db_path, subject) == "erased"
    for args in (("erase", "nobody@example.org", "--yes"), ("export", "nobody@example.org")):
        code, _, err = await world.cli("subscriber", *args)
        assert code == 1 and err.count("\n") == 1 and "no data is held" in err, args
    assert query(world.db_path, "SELECT count(*) FROM suppression") == [(1,)]


async def test_erase_keeps_a_stricter_suppression(world: World) -> None:
    """Erasing a bounced address deletes it but keeps 'bounced': a new opt-in sends nothing."""
    address = "gone@example.org"
    await opt_in_and_confirm(world, address, "news")
    _, subject = world.mailer.consent.identify(address)
    now = datetime.now(UTC).isoformat(sep=" ")
    query(world.db_path, "INSERT INTO suppression VALUES (?, 'bounced', ?)", subject, now)
    code, out, err = await world.cli("subscriber", "erase", address, "--yes", "--json")
    assert code == 0, err
    assert json.loads(out)["suppression"] == "bounced"
    assert suppression_of(world.db_path, subject) == "bounced"
    assert mail_to(world, address) == []
    data = json.loads((await world.cli("subscriber", "export", address))[1])
    assert (data["erased"], data["suppression"], data["email"]) == (True, "bounced", None)
    r = await world.client.post(
        API, json={"email": address, "list": "news"}, headers=auth(world.key)
    )
    assert r.status == 202
    assert query(world.db_path, "SELECT count(*) FROM outbox") == [(0,)]
    assert suppression_of(world.db_path, subject) == "bounced"


# --- the captured-mail scrubber on hand-made Maildir files -------------------------------------


def message(to: str, body: str, *, cte: str = "7bit", subject: str = "Hello") -> bytes:
    """A raw single-part message with the given body transfer encoding."""
    if cte == "base64":
        encoded = base64.encodebytes(body.encode()).decode()
    elif cte == "quoted-printable":
        encoded = quopri.encodestring(body.encode()).decode()
    else:
        encoded = body
    return (
        f"From: n@example.org\r\nTo: {to}\r\nSubject: {subject}\r\nMIME-Version: 1.0\r\n"
        f'Content-Type: text/plain; charset="utf-8"\r\nContent-Transfer-Encoding: {cte}\r\n'
        f"\r\n{encoded}"
    ).encode()


def test_scrubber_finds_every_spelling_and_only_that_address(tmp_path: Path) -> None:
    """Every spelling and MIME encoding of the address goes; other people's look-alikes stay."""
    long_line = "x" * 66 + " ann.lee@bücher.example"  # a soft line break cuts the address
    encoded_word = Header("Für Ann.Lee@Bücher.Example", "utf-8").encode()
    goes = {
        "plain": message("Ann.Lee@bücher.example", "hi"),
        "upper-puny": message("ANN.LEE@XN--BCHER-KVA.EXAMPLE", "hi"),
        "nfd": message("x@example.org", unicodedata.normalize("NFD", "to ann.lee@bücher.example")),
        "base64": message("x@example.org", "to Ann.Lee@Bücher.Example.", cte="base64"),
        "qp": message("x@example.org", long_line, cte="quoted-printable"),
        "encoded-word": message("x@example.org", "hi", subject=encoded_word),
        "html-entity": message("x@example.org", "<p>ann.lee@b&uuml;cher.example</p>"),
    }
    stays = {
        "other-local": message("lee@bücher.example", "hi"),
        "longer-local": message("joann.lee@bücher.example", "hi"),
        "longer-domain": message("ann.lee@bücher.example.net", "hi"),
        "subdomain": message("ann.lee@mail.bücher.example", "hi"),
        "unrelated": message("bob@example.org", "hello bob"),
    }
    root = tmp_path / "outbox"
    for folder in ("new", "cur", "tmp"):
        (root / folder).mkdir(parents=True)
    for i, (name, raw) in enumerate({**goes, **stays}.items()):
        (root / ("new", "cur", "tmp")[i % 3] / name).write_bytes(raw)
    for hidden in ("base64", "qp", "encoded-word", "html-entity"):  # no plain copy in these
        assert "ann.lee@bücher.example" not in goes[hidden].decode().casefold(), hidden
    address = parse_address("ann.lee@BÜCHER.example")
    removed = scrub_maildir(root, AddressMatcher("ann.lee@BÜCHER.example", address))
    left = {p.name: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    assert left == stays
    assert removed == len(goes)
    assert (
        scrub_maildir(tmp_path / "missing", AddressMatcher("a@b.org", parse_address("a@b.org")))
        == 0
    )


@sqlite_only
async def test_erase_is_not_reported_done_while_a_reader_pins_the_wal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader pinning old pages in the WAL makes erase fail loudly; a re-run leaves no copy."""
    monkeypatch.setattr("mailer.store.sqlite.BUSY_TIMEOUT_MS", 200)
    settings = make_settings(tmp_path)
    await init_db(settings)
    db = tmp_path / "mailer.db"
    wal = db.with_name(db.name + "-wal")
    staff = Evidence(channel="cli", actor="cli:tests")
    async with open_mailer(settings) as m:
        await m.lists.create("news", "News")
        await m.consent.request_opt_in("Pinned@Example.org", "news", None, staff)
        reader = sqlite3.connect(db)
        try:
            reader.execute("BEGIN")
            assert reader.execute("SELECT count(*) FROM subscriber").fetchone() == (1,)
            with pytest.raises(Conflict, match="run the erase again"):
                await m.people.erase("pinned@example.org", staff)
            assert b"Pinned@example.org" in wal.read_bytes()
        finally:
            reader.close()
        again = await m.people.erase("pinned@example.org", staff)
        assert again.already_erased
        assert wal.read_bytes() == b""
        assert b"pinned@example.org" not in db.read_bytes().lower()
