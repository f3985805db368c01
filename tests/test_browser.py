"""The subscriber pages in a real browser: Debian's Chromium, driven by Playwright.

A real `mailer serve` subprocess serves the pages; links come from the mail it captured in
var/outbox/. Every page is used with JavaScript disabled, at phone and desktop widths, by
pressing its real buttons; each is checked for a title, a language, named controls and text
contrast (WCAG 2.x AA, 4.5:1). Screenshots land in test-artifacts/browser/.

Nothing here downloads a browser: Playwright starts the system's `chromium`. Without it (or
without playwright) the module is skipped, unless BROWSER_TESTS=required (set by .ci/run).
"""

import asyncio
import email
import email.policy
import json
import os
import re
import shutil
import signal
import socket
import sys
from asyncio.subprocess import PIPE
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from tests.conftest import links
from tests.databases import active
from tests.harness import Captured, query, wait_healthy, wait_until

CHROMIUM = shutil.which("chromium")
REQUIRED = os.environ.get("BROWSER_TESTS") == "required"


def _unavailable(reason: str) -> None:
    if REQUIRED:
        pytest.fail(f"{reason} (BROWSER_TESTS=required)", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


try:
    from playwright.async_api import Browser, Locator, Page, Response, async_playwright
except ImportError:
    _unavailable("playwright is not installed: pip install -e '.[test]'")
if CHROMIUM is None:
    _unavailable("no `chromium` on PATH: apt-get install chromium")

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]
module_fixture = pytest_asyncio.fixture(scope="module", loop_scope="module")

MAILER = [sys.executable, "-m", "mailer.cli.main"]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "browser"
# As root, and on a closed network that refuses Chromium's background connections.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ORG = "Example Org"
LIST_NAME = "Example News"
CAMPAIGN_SUBJECT = "Browser test issue"
AA_TEXT = 4.5
AA_NON_TEXT = 3.0  # WCAG 1.4.11: focus indicators and other UI parts
CONTROLS = ("button", "radio", "checkbox", "textbox", "combobox", "listbox", "spinbutton")


@dataclass(frozen=True)
class Width:
    name: str
    width: int
    height: int
    mobile: bool


WIDTHS = [Width("phone", 390, 844, True), Width("desktop", 1280, 800, False)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Site:
    """A `mailer serve` subprocess on its own directory, port and embedded capture Maildir."""

    root: Path
    env: dict[str, str]
    base: str
    http: aiohttp.ClientSession
    key: str = ""
    _seen: dict[str, tuple[str, str, bytes]] = field(default_factory=dict)

    @property
    def db(self) -> Path:
        return self.root / "var" / "mailer.db"

    async def cli(self, *args: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            *MAILER, *args, cwd=self.root, env=self.env, stdout=PIPE, stderr=PIPE
        )
        out, err = await asyncio.wait_for(proc.communicate(), timeout=30)
        assert proc.returncode == 0, err.decode()
        return out.decode()

    async def person(self, address: str) -> dict[str, Any]:
        """What staff see: `mailer subscriber show EMAIL --json`."""
        shown: dict[str, Any] = json.loads(await self.cli("subscriber", "show", address, "--json"))
        return shown

    async def opt_in(self, address: str) -> None:
        async with self.http.post(
            f"{self.base}/api/v1/subscriptions",
            json={"email": address, "list": "news"},
            headers={"Authorization": f"Bearer {self.key}"},
        ) as r:
            assert r.status == 202, await r.text()

    async def mail_to(self, address: str, subject: str | None = None) -> Captured:
        """The one captured message to ``address`` (with that subject), once it has arrived."""
        new = self.root / "var" / "outbox" / "new"
        found: list[Captured] = []

        def arrived() -> bool:
            for path in new.iterdir() if new.is_dir() else []:
                if path.name not in self._seen:  # Maildir files are complete once in new/
                    raw = path.read_bytes()
                    parsed = email.message_from_bytes(raw, policy=email.policy.default)
                    assert isinstance(parsed, EmailMessage)
                    self._seen[path.name] = (str(parsed["To"]), str(parsed["Subject"]), raw)
            found[:] = [
                Captured("", [to], raw)
                for to, subj, raw in self._seen.values()
                if to == address and subject in (None, subj)
            ]
            return bool(found)

        await wait_until(arrived, timeout=15, what=f"mail to {address}")
        if subject is not None:
            assert len(found) == 1, f"{len(found)} copies of {subject!r} to {address}"
        return found[0]

    async def confirmation_links(self, address: str) -> dict[str, str]:
        """Ask for a subscription through the API; return the links its confirmation mail holds."""
        await self.opt_in(address)
        found = links(await self.mail_to(address))
        assert found["confirm"].startswith(f"{self.base}/confirm/")
        assert found["unsubscribe"].startswith(f"{self.base}/unsubscribe/")
        return found


@module_fixture
async def site(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Site]:
    root = tmp_path_factory.mktemp("site")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILER_")}
    env |= {"MAILER_HTTP_PORT": str(port), "MAILER_BASE_URL": f"http://127.0.0.1:{port}"}
    env["MAILER_DATABASE_URL"] = active.url(root / "var" / "mailer.db")
    active.keep(root / "var" / "mailer.db")  # the site lives as long as this module
    async with aiohttp.ClientSession() as http:
        s = Site(root, env, f"http://127.0.0.1:{port}", http)
        await s.cli("init")
        await s.cli("list", "create", "news", "--name", LIST_NAME)
        s.key = (await s.cli("apikey", "create", "browser-tests")).strip()
        log = root / "serve.log"
        with log.open("wb") as sink:
            proc = await asyncio.create_subprocess_exec(
                *MAILER, "serve", cwd=root, env=env, stdout=sink, stderr=sink
            )
        try:
            await wait_healthy(http, s.base, "mailer serve /healthz")
            yield s
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), timeout=20)
    output = log.read_text(errors="replace")
    assert proc.returncode == 0, output
    assert "Traceback" not in output, output


@module_fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        launched = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield launched
        await launched.close()


@dataclass
class Visitor:
    """One person's browser tab, JavaScript off, at one width; taps on a phone, clicks on a PC."""

    page: Page
    width: Width

    async def press(self, control: Locator) -> Response:
        """Press a form's button as a person would; return the response to the POST it sends."""
        async with self.page.expect_navigation() as navigated:
            if self.width.mobile:
                await control.tap()
            else:
                await control.click()
        response = await navigated.value
        assert response is not None and response.request.method == "POST"
        return response

    async def shot(self, name: str) -> None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}-{self.width.name}.png"
        await self.page.screenshot(path=path, full_page=True)
        assert path.stat().st_size > 1000


@pytest_asyncio.fixture(loop_scope="module", params=WIDTHS, ids=[w.name for w in WIDTHS])
async def visitor(request: pytest.FixtureRequest, browser: Browser) -> AsyncIterator[Visitor]:
    width: Width = request.param
    context = await browser.new_context(
        java_script_enabled=False,
        viewport={"width": width.width, "height": width.height},
        is_mobile=width.mobile,
        has_touch=width.mobile,
        device_scale_factor=2 if width.mobile else 1,
        locale="en-GB",
    )
    try:
        yield Visitor(await context.new_page(), width)
    finally:
        await context.close()


@module_fixture
async def subscribed(site: Site) -> dict[str, dict[str, str]]:
    """Confirmed subscribers of 'news', each with the links of both mails they were sent.

    Keys are ``<role>-<width>``; values hold ``email``, ``global`` (the confirmation mail's
    every-list unsubscribe link) and ``list`` (the campaign's list-scoped one).
    """
    people: dict[str, dict[str, str]] = {}
    for role in ("only", "all", "global"):
        for width in WIDTHS:
            address = f"{role}-{width.name}@example.org"
            found = await site.confirmation_links(address)
            async with site.http.post(found["confirm"]) as r:
                assert r.status == 200
            people[f"{role}-{width.name}"] = {"email": address, "global": found["unsubscribe"]}
    body = site.root / "issue.md"
    body.write_text("Hello from the **browser tests**.\n", encoding="utf-8")
    create = ["campaign", "create", "--list", "news", "--subject", CAMPAIGN_SUBJECT]
    campaign = (await site.cli(*create, "--body", str(body))).strip()
    await site.cli("campaign", "send", campaign)
    for person in people.values():
        mail = await site.mail_to(person["email"], CAMPAIGN_SUBJECT)
        person["list"] = links(mail)["unsubscribe"]
        assert person["list"] != person["global"]
    return people


# ---- what every page must have -------------------------------------------------------------

CONTRAST_JS = """() => {
  const rgba = (s) => {
    const m = s.match(/rgba?\\(([^)]*)\\)/);
    if (!m) return null;
    const p = m[1].split(/[\\s,\\/]+/).filter(Boolean).map(Number);
    return [p[0], p[1], p[2], p.length > 3 ? p[3] : 1];
  };
  const over = (top, under) => under.map((v, i) => top[i] * top[3] + v * (1 - top[3]));
  const backdrop = (el) => {
    const layers = [];
    for (let e = el; e; e = e.parentElement) {
      const c = rgba(getComputedStyle(e).backgroundColor);
      if (c && c[3] > 0) { layers.push(c); if (c[3] >= 1) break; }
    }
    return layers.reverse().reduce((under, top) => over(top, under), [255, 255, 255]);
  };
  const luminance = (rgb) => {
    const [r, g, b] = rgb.map((v) => {
      v /= 255;
      return v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4);
    });
    return 0.2126 * r + 0.7152 * g + 0.0722 * b;
  };
  const ratio = (a, b) => {
    const [hi, lo] = [luminance(a), luminance(b)].sort((x, y) => y - x);
    return (hi + 0.05) / (lo + 0.05);
  };
  window.__contrast = { rgba, backdrop, ratio, over };
  const seen = new Set();
  const out = [];
  const walk = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  for (let n = walk.nextNode(); n; n = walk.nextNode()) {
    const el = n.parentElement;
    if (!n.textContent.trim() || seen.has(el)) continue;
    seen.add(el);
    const style = getComputedStyle(el);
    if (style.visibility === "hidden" || el.getClientRects().length === 0) continue;
    const bg = backdrop(el);
    const fg = over(rgba(style.color), bg);
    out.push({ tag: el.tagName, text: n.textContent.trim().slice(0, 50), color: style.color,
               background: "rgb(" + bg.map(Math.round).join(", ") + ")", ratio: ratio(fg, bg) });
  }
  return out;
}"""

FOCUS_RING_JS = """(el) => {
  const rgba = (s) => {
    const m = s.match(/rgba?\\(([^)]*)\\)/);
    const p = m[1].split(/[\\s,\\/]+/).filter(Boolean).map(Number);
    return [p[0], p[1], p[2], p.length > 3 ? p[3] : 1];
  };
  const luminance = (rgb) => {
    const [r, g, b] = rgb.map((v) => {
      v /= 255;
      return v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4);
    });
    return 0.2126 * r + 0.7152 * g + 0.0722 * b;
  };
  let bg = [255, 255, 255];
  for (let e = el.parentElement; e; e = e.parentElement) {
    const c = rgba(getComputedStyle(e).backgroundColor);
    if (c[3] >= 1) { bg = c; break; }
  }
  const style = getComputedStyle(el);
  const ring = rgba(style.outlineColor);
  const [hi, lo] = [luminance(ring), luminance(bg)].sort((x, y) => y - x);
  return { focused: document.activeElement === el, style: style.outlineStyle,
           width: parseFloat(style.outlineWidth), color: style.outlineColor,
           ratio: (hi + 0.05) / (lo + 0.05) };
}"""


async def check_page(visitor: Visitor, shot: str) -> str:
    """Assert what every subscriber page needs; save a screenshot; return its ARIA snapshot."""
    page = visitor.page
    assert (await page.title()).strip().endswith(ORG), await page.title()
    lang = await page.locator("html").get_attribute("lang")
    assert lang is not None and re.fullmatch(r"[a-z]{2,3}(-[A-Za-z0-9]+)*", lang), lang
    assert await page.locator("script").count() == 0, "the pages must not need JavaScript"
    assert await page.get_by_role("heading", level=1).count() == 1
    # Every control has an accessible name, as a screen reader computes it.
    tree = await page.locator("body").aria_snapshot()
    controls = [
        line.strip()
        for line in tree.splitlines()
        if line.strip().removeprefix("- ").split(" ")[0].rstrip(":") in CONTROLS
    ]
    unnamed = [c for c in controls if not re.match(r'- \w+ "[^"]+"', c)]
    assert not unnamed, f"controls without an accessible name: {unnamed}\n{tree}"
    in_dom = await page.locator(
        "button, select, textarea, input:not([type=hidden]), [role=button]"
    ).count()
    assert len(controls) == in_dom, tree
    # Text contrast, from the colours the browser actually computed.
    texts = await page.evaluate(CONTRAST_JS)
    assert texts, "no visible text measured"
    low = [t for t in texts if t["ratio"] < AA_TEXT]
    assert not low, f"text below {AA_TEXT}:1 contrast: {low}"
    # Fits the screen: no sideways scrolling on a phone.
    overflow = await page.evaluate(
        "() => document.documentElement.scrollWidth - document.documentElement.clientWidth"
    )
    assert overflow <= 0, f"{overflow}px of sideways scrolling at {visitor.width.name} width"
    for button in await page.get_by_role("button").all():
        box = await button.bounding_box()
        assert box is not None and round(box["height"]) >= 44, f"button too small to tap: {box}"
    await visitor.shot(shot)
    return tree


async def assert_focus_ring(visitor: Visitor, control: Locator) -> None:
    """Tabbing to ``control`` shows an outline that contrasts 3:1 with what surrounds it."""
    page = visitor.page
    for _ in range(10):
        await page.keyboard.press("Tab")
        if await control.evaluate("(el) => document.activeElement === el"):
            break
    ring = await control.evaluate(FOCUS_RING_JS)
    assert ring["focused"], "the control cannot be reached with the Tab key"
    assert ring["style"] != "none" and ring["width"] >= 2, ring
    assert ring["ratio"] >= AA_NON_TEXT, f"focus outline contrast too low: {ring}"


def subject_of(url: str) -> str:
    """The keyed address hash a link's token names."""
    return url.rsplit("/", 1)[1].split("~", 1)[0]


def stored(site: Site, url: str) -> tuple[list[tuple[str, str]], list[str]]:
    """From the database: the person's (list slug, status) pairs and suppression reasons."""
    subject = subject_of(url)
    subscriptions = query(
        site.db,
        "SELECT l.slug, s.status FROM subscription s JOIN subscriber p ON p.id = s.subscriber_id"
        " JOIN mailing_list l ON l.id = s.list_id WHERE p.email_hash = ? ORDER BY l.slug",
        subject,
    )
    suppressed = query(site.db, "SELECT reason FROM suppression WHERE email_hash = ?", subject)
    return [(str(a), str(b)) for a, b in subscriptions], [str(r) for (r,) in suppressed]


def ledger(site: Site, url: str, event: str) -> list[tuple[Any, ...]]:
    """Consent events of one kind for the person a link belongs to."""
    return query(
        site.db,
        "SELECT scope, channel, actor, user_agent FROM consent_event"
        " WHERE subject_hash = ? AND event = ? ORDER BY seq",
        subject_of(url),
        event,
    )


# ---- the pages -----------------------------------------------------------------------------


async def test_confirm_page_subscribes_when_its_button_is_pressed(
    site: Site, visitor: Visitor
) -> None:
    """The confirm link opens a page that changes nothing; pressing Confirm subscribes."""
    address = f"confirm-{visitor.width.name}@example.org"
    found = await site.confirmation_links(address)
    page = visitor.page

    opened = await page.goto(found["confirm"])
    assert opened is not None and opened.status == 200
    await check_page(visitor, "confirm")
    assert (
        "Confirm your subscription to Example News"
        in await page.get_by_role("heading", level=1).inner_text()
    )
    confirm = page.get_by_role("button", name="Confirm")
    await assert_focus_ring(visitor, confirm)
    assert stored(site, found["confirm"]) == ([("news", "pending")], [])

    answer = await visitor.press(confirm)
    assert answer.status == 200 and answer.url == found["confirm"]  # no redirect
    assert page.url == found["confirm"]
    await check_page(visitor, "confirmed")
    assert await page.get_by_role("heading", name="You are subscribed to Example News").count()
    shown = await site.person(address)
    assert [(s["list"], s["status"]) for s in shown["subscriptions"]] == [("news", "confirmed")]
    assert shown["suppression"] is None
    events = ledger(site, found["confirm"], "confirmed")
    assert [e[:3] for e in events] == [("list", "page", "subscriber")]
    assert "HeadlessChrome" in events[0][3]


async def test_unsubscribe_page_stops_only_the_list_by_default(
    site: Site, subscribed: dict[str, dict[str, str]], visitor: Visitor
) -> None:
    """A campaign's link offers 'Only this list' (preselected) or all mail; the default stops
    only that list and suppresses nothing."""
    person = subscribed[f"only-{visitor.width.name}"]
    page = visitor.page
    opened = await page.goto(person["list"])
    assert opened is not None and opened.status == 200
    await check_page(visitor, "unsubscribe-list")
    choices = page.get_by_role("group", name="What should stop?")
    only = choices.get_by_role("radio", name=f"Only {LIST_NAME}")
    everything = choices.get_by_role("radio", name=f"All mail from {ORG}")
    assert await only.is_checked() and not await everything.is_checked()
    await assert_focus_ring(visitor, only)
    assert stored(site, person["list"]) == ([("news", "confirmed")], [])

    answer = await visitor.press(page.get_by_role("button", name="Unsubscribe"))
    assert answer.status == 200 and page.url == person["list"]
    await check_page(visitor, "unsubscribed-list")
    assert await page.get_by_role("heading", name=f"You are unsubscribed from {LIST_NAME}").count()
    assert stored(site, person["list"]) == ([("news", "unsubscribed")], [])
    events = ledger(site, person["list"], "unsubscribed")
    assert [e[:3] for e in events] == [("list", "page", "subscriber")]


async def test_unsubscribe_page_all_mail_choice_suppresses_the_address(
    site: Site, subscribed: dict[str, dict[str, str]], visitor: Visitor
) -> None:
    """Choosing 'All mail from ...' (by its label) on a list's page suppresses the address."""
    person = subscribed[f"all-{visitor.width.name}"]
    page = visitor.page
    await page.goto(person["list"])
    label = page.get_by_text(f"All mail from {ORG}")
    await (label.tap() if visitor.width.mobile else label.click())  # the label, not the dot
    everything = page.get_by_role("radio", name=f"All mail from {ORG}")
    assert await everything.is_checked()
    assert not await page.get_by_role("radio", name=f"Only {LIST_NAME}").is_checked()
    await visitor.shot("unsubscribe-all-chosen")

    answer = await visitor.press(page.get_by_role("button", name="Unsubscribe"))
    assert answer.status == 200
    await check_page(visitor, "unsubscribed-all")
    heading = f"You are unsubscribed from all mail from {ORG}"
    assert await page.get_by_role("heading", name=heading).count()
    assert stored(site, person["list"]) == ([("news", "unsubscribed")], ["unsubscribed"])
    events = ledger(site, person["list"], "unsubscribed")
    assert [e[:3] for e in events] == [("global", "page", "subscriber")]


async def test_global_unsubscribe_page_has_one_button_for_all_mail(
    site: Site, subscribed: dict[str, dict[str, str]], visitor: Visitor
) -> None:
    """The confirmation mail's link is global: one button, no list choice, and it suppresses."""
    person = subscribed[f"global-{visitor.width.name}"]
    page = visitor.page
    opened = await page.goto(person["global"])
    assert opened is not None and opened.status == 200
    await check_page(visitor, "unsubscribe-global")
    assert await page.get_by_role("heading", name=f"Unsubscribe from all mail from {ORG}").count()
    assert await page.get_by_role("radio").count() == 0
    assert stored(site, person["global"]) == ([("news", "confirmed")], [])

    answer = await visitor.press(page.get_by_role("button", name="Unsubscribe"))
    assert answer.status == 200 and page.url == person["global"]
    await check_page(visitor, "unsubscribed-global")
    assert stored(site, person["global"]) == ([("news", "unsubscribed")], ["unsubscribed"])
    assert [e[:2] for e in ledger(site, person["global"], "unsubscribed")] == [("global", "page")]

    # Pressing it again (a reload, a second tab) is harmless and still says done.
    again = await page.goto(person["global"])
    assert again is not None and again.status == 200
    answer = await visitor.press(page.get_by_role("button", name="Unsubscribe"))
    assert answer.status == 200
    assert await page.get_by_role("heading", name=re.compile("You are unsubscribed")).count()
    assert stored(site, person["global"]) == ([("news", "unsubscribed")], ["unsubscribed"])


@pytest.mark.parametrize("kind", ["confirm", "unsubscribe"])
async def test_a_broken_link_shows_an_error_page_that_leads_to_the_privacy_policy(
    site: Site, visitor: Visitor, kind: str
) -> None:
    """A damaged link answers 400 with a readable page; its footer link opens /privacy."""
    page = visitor.page
    opened = await page.goto(f"{site.base}/{kind}/0123456789abcdef0123456789abcdef~-.forged")
    assert opened is not None and opened.status == 400
    await check_page(visitor, f"error-{kind}")
    assert await page.get_by_role("heading", name="This link does not work").count()
    assert f"This {kind}" in await page.locator("main").inner_text()

    privacy = page.get_by_role("contentinfo").get_by_role("link", name="Privacy policy")
    await (privacy.tap() if visitor.width.mobile else privacy.click())
    await page.wait_for_url(f"{site.base}/privacy")
    await check_page(visitor, f"privacy-from-{kind}-error")
    assert "Privacy" in await page.get_by_role("heading", level=1).inner_text()
