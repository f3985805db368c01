"""The compliance self-test's checks (``mailer doctor``): each one yields a row of the report.

Checks on the live configuration read it and change nothing. Checks on messages take the
bytes a private SMTP sink received: what would leave the machine, not what we meant to send.
Running the private instance itself (a scratch database, sink and web server) is the CLI's
job, since it needs the composition root and the web app.
"""

import asyncio
import email
import email.policy
import html
import ipaddress
import re
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from email.message import EmailMessage
from enum import StrEnum
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from dkim import DKIM, DKIMException
from dkim.util import InvalidTagValueList, parse_tag_value
from jinja2 import TemplateError
from markupsafe import Markup
from sqlalchemy.engine import make_url

from mailer.config import DEFAULT_CONFIG_FILE, ENV_PREFIX, Settings
from mailer.domain.compose import MAX_LINE, ONE_CLICK, check_stoppable
from mailer.domain.dns_advice import (
    DnsRecord,
    dkim_record,
    dmarc_advice,
    domain_of,
    same_dkim_key,
    spf_advice,
)
from mailer.domain.inbound import BounceBox, InboundAddresses, UnsubscribeBox
from mailer.domain.tokens import LinkClaim, TokenCodec
from mailer.errors import BadToken, MailerError
from mailer.render import Renderer
from mailer.services.setup import instance_secrets
from mailer.store import migrate
from mailer.store.db import open_database
from mailer.transport.dkim import DkimKey, load_keys
from mailer.transport.dns import DnsUnavailable

EXAMPLE_BASE = "https://doctor.invalid"
"""Base URL of links in the render-only template check (nothing is fetched)."""
SERVICE_TEMPLATES = frozenset({"base", "confirm"})
"""Email templates that are not campaign layouts."""
DKIM_COVERS = (
    "from",
    "to",
    "subject",
    "date",
    "message-id",
    "list-id",
    "list-unsubscribe",
    "list-unsubscribe-post",
)
"""Headers every DKIM signature must cover, each listed once more than it occurs."""
MIN_KEY_LENGTH = 32
REQUIRED_ONCE = (
    "From",
    "To",
    "Subject",
    "Date",
    "Message-ID",
    "List-Id",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
)
_UNSUBSCRIBE_ENTRY = re.compile(rb"<([^<>]*)>")
_MESSAGE_ID = re.compile(r"<[^<>@\s]+@[^<>\s]+>")
_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain"})


class Status(StrEnum):
    PASS = "pass"  # noqa: S105  (a status, not a password)
    WARN = "warn"
    """Works, but not as a public installation should; does not fail the run."""
    SKIP = "skip"
    """Not applicable here (not configured, or a step it needs did not happen)."""
    FAIL = "fail"


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    status: Status
    detail: str

    def as_json(self) -> dict[str, str]:
        return {k: str(v) for k, v in asdict(self).items()}


def passed(checks: Iterable[Check]) -> bool:
    """True unless some check failed (warnings and skips do not fail the run)."""
    return all(c.status is not Status.FAIL for c in checks)


# -- configuration ---------------------------------------------------------------------------


def configuration(settings: Settings, environ: Mapping[str, str]) -> Check:
    """Where the settings came from (they loaded, or there would be no ``settings``)."""
    sources = []
    if DEFAULT_CONFIG_FILE.is_file():
        sources.append(str(DEFAULT_CONFIG_FILE))
    if environ.get("MAILER_CONFIG"):
        sources.append(f"MAILER_CONFIG={environ['MAILER_CONFIG']}")
    env = sorted(k for k in environ if k.startswith(ENV_PREFIX) and k != "MAILER_CONFIG")
    if env:
        sources.append(f"{len(env)} MAILER_* environment variable{'s' * (len(env) != 1)}")
    return Check("configuration", Status.PASS, "loaded from " + (", ".join(sources) or "defaults"))


def _default(field: str) -> Any:
    return Settings.model_fields[field].default


def organisation(settings: Settings) -> Check:
    """The footer of every message names the organisation: no placeholders, nothing empty."""
    names = {
        "org_name": "MAILER_ORG_NAME",
        "org_address": "MAILER_ORG_ADDRESS",
        "privacy_contact": "MAILER_PRIVACY_CONTACT",
    }
    bad = []
    for field, env in names.items():
        value = str(getattr(settings, field)).strip()
        if not value:
            bad.append(f"{env} is empty")
        elif value == _default(field):
            bad.append(f"{env} is still the example value {value!r}")
    if bad:
        return Check(
            "organisation details",
            Status.FAIL,
            "; ".join(bad) + ": every footer must name your organisation, its postal address "
            "and a privacy contact",
        )
    return Check(
        "organisation details",
        Status.PASS,
        f"{settings.org_name}, {settings.org_address}; privacy: {settings.privacy_contact}",
    )


def sender(settings: Settings) -> Check:
    if settings.from_addr == _default("from_addr"):
        return Check(
            "sender address",
            Status.FAIL,
            f"MAILER_FROM is still the example value {settings.from_addr!r}: "
            "set it to an address of your own domain",
        )
    return Check("sender address", Status.PASS, f"mail is from {settings.from_addr}")


def _is_loopback(host: str) -> bool:
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def base_url(settings: Settings) -> Check:
    """Links in mail must be public HTTPS (RFC 8058 one-click requires an HTTPS URI)."""
    url = urlsplit(settings.base_url)
    name = "base URL"
    if url.query or url.fragment:
        return Check(name, Status.FAIL, f"{settings.base_url} has a query or fragment")
    if not url.hostname:
        return Check(name, Status.FAIL, f"{settings.base_url} names no host")
    if url.scheme == "https":
        return Check(name, Status.PASS, f"links point to {settings.base_url}")
    if _is_loopback(url.hostname):
        return Check(
            name,
            Status.WARN,
            f"{settings.base_url} is plain http on this machine: fine for a trial, but "
            "subscribers cannot reach it; set MAILER_BASE_URL to your public https address",
        )
    return Check(
        name,
        Status.FAIL,
        f"{settings.base_url} is plain http: RFC 8058 one-click unsubscribe needs https, "
        "and mail providers ignore http links; set MAILER_BASE_URL to an https address",
    )


# -- keys and files --------------------------------------------------------------------------


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def read_keys(settings: Settings) -> list[str]:
    """The signing keys, first one signs. Unlike ``setup.secret_keys`` this reads a key file
    whatever its permissions, so the other checks can still run; ``key_file`` judges those."""
    if settings.secret_keys:
        return [k.get_secret_value() for k in settings.secret_keys]
    path = settings.secret_keys_file
    if not path.is_file():
        return []
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def key_file(settings: Settings) -> Check:
    name = "secret key file"
    if settings.secret_keys:
        return Check(
            name,
            Status.SKIP,
            "the keys come from MAILER_SECRET_KEYS; keep that setting where only mailer reads it",
        )
    path = settings.secret_keys_file
    if not path.exists():
        return Check(name, Status.FAIL, f"{path} does not exist: run `mailer init`")
    mode = _mode(path)
    if mode & 0o077:
        return Check(
            name,
            Status.FAIL,
            f"{path} has mode {mode:04o}: others can read the signing keys; run chmod 600 {path}",
        )
    return Check(name, Status.PASS, f"{path} is readable by its owner only ({mode:04o})")


def data_files(settings: Settings) -> Check:
    """var/ and the SQLite files hold personal data: owner only."""
    name = "data directory"
    paths = [settings.var_dir]
    database = sqlite_path(settings.database_url)
    if database is not None:
        paths += [database, Path(f"{database}-wal"), Path(f"{database}-shm")]
    shared = [f"{p} ({_mode(p):04o})" for p in paths if p.exists() and _mode(p) & 0o077]
    if shared:
        return Check(
            name,
            Status.FAIL,
            "others can read personal data: " + ", ".join(shared) + "; chmod go-rwx them",
        )
    present = [str(p) for p in paths if p.exists()]
    if not present:
        return Check(name, Status.SKIP, f"{settings.var_dir} does not exist yet")
    return Check(name, Status.PASS, ", ".join(present) + ": owner only")


def signing(keys: Sequence[str], token: str | None) -> Check:
    """The first key signs (links minted now verify with it alone); every key still verifies.

    ``token`` is an unsubscribe token minted by the running mailer (from a captured message);
    without one, a fresh token is minted here with all the keys.
    """
    name = "signing keys"
    if not keys:
        return Check(
            name, Status.FAIL, "no secret key: set MAILER_SECRET_KEYS or run `mailer init`"
        )
    clock = lambda: 0.0  # noqa: E731  (unsubscribe tokens carry no time)
    claim = LinkClaim("0" * 32, None)
    minted = token or TokenCodec(keys, clock).unsubscribe_token(claim)
    try:
        TokenCodec(keys[:1], clock).read_unsubscribe(minted)
    except BadToken:
        return Check(name, Status.FAIL, "new links are not signed with the first key")
    everyone = TokenCodec(keys, clock)
    for i, key in enumerate(keys[1:], start=2):
        try:
            everyone.read_unsubscribe(TokenCodec([key], clock).unsubscribe_token(claim))
        except BadToken:
            return Check(name, Status.FAIL, f"links signed with key {i} no longer verify")
    if len(set(keys)) != len(keys):
        return Check(name, Status.WARN, "the same key is listed twice")
    short = [str(i) for i, k in enumerate(keys, start=1) if len(k) < MIN_KEY_LENGTH]
    if short:
        return Check(
            name,
            Status.WARN,
            f"key {', '.join(short)} is shorter than {MIN_KEY_LENGTH} characters; "
            "use long random keys (`mailer init` makes one)",
        )
    more = f"; all {len(keys)} verify, so older links keep working" if len(keys) > 1 else ""
    return Check(name, Status.PASS, f"the first key signs new links{more}")


def sqlite_path(url: str) -> Path | None:
    """The file of a SQLite database URL, or ``None`` for another database."""
    try:
        parsed = make_url(url)
    except Exception:
        return None
    if parsed.get_backend_name() != "sqlite" or not parsed.database:
        return None
    return Path(parsed.database)


async def database(settings: Settings) -> Check:
    """The live database answers and its schema is current. Only reads; never creates it."""
    name = "database"
    path = sqlite_path(settings.database_url)
    if path is not None and not path.is_file():
        return Check(name, Status.FAIL, f"no database at {path}: run `mailer init`")
    try:
        db = open_database(settings.database_url)
    except MailerError as exc:
        return Check(name, Status.FAIL, exc.message)
    try:
        await instance_secrets(db)
        revision = await migrate.revision(db)
    except MailerError as exc:
        return Check(name, Status.FAIL, exc.message)
    except Exception as exc:  # the driver's own errors: unreachable, refused, locked, ...
        first = str(exc).splitlines()[0] if str(exc) else ""
        return Check(name, Status.FAIL, f"cannot read it: {type(exc).__name__}: {first}")
    finally:
        await db.close()
    return Check(name, Status.PASS, f"reachable; schema at the current revision ({revision})")


# -- DKIM ------------------------------------------------------------------------------------


def dkim_configured(settings: Settings) -> bool:
    return bool(settings.dkim_domain and settings.dkim_selector and settings.dkim_key_file)


def dkim_keys(settings: Settings) -> dict[str, DkimKey]:
    """The configured signing keys by selector, read from their files."""
    keys = load_keys(settings.dkim_key_file, settings.dkim_selector)
    return {key.selector: key for key in keys}


def dkim_problems(raw: bytes, settings: Settings, keys: Mapping[str, DkimKey]) -> list[str]:
    """What is wrong with a message's DKIM signatures: one per configured key, by the configured
    domain, covering and over-signing ``DKIM_COVERS``, and verifying (dkimpy) under the public
    record computed from that key's file; no DNS is asked."""
    domain = str(settings.dkim_domain).lower()
    published = {
        f"{selector}._domainkey.{domain}": key.public_record.encode()
        for selector, key in keys.items()
    }

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        return published.get(name.decode("ascii", "replace").rstrip(".").lower(), b"")

    try:
        parsed = DKIM(raw)
        signatures = [
            parse_tag_value(v) for n, v in parsed.headers if n.lower() == b"dkim-signature"
        ]
    except (DKIMException, InvalidTagValueList) as exc:
        return [f"the DKIM-Signature cannot be read: {exc}"]
    if not signatures:
        return ["no DKIM-Signature"]
    present = Counter(name for name, _ in raw_headers(raw))
    problems = []
    for i, sig in enumerate(signatures):
        selector = sig.get(b"s", b"").decode("ascii", "replace")
        label = f"DKIM s={selector}"
        if sig.get(b"d", b"").decode("ascii", "replace").lower() != domain:
            problems.append(f"{label}: d={sig.get(b'd', b'').decode()} is not {domain}")
        listed = Counter(h.strip().lower() for h in sig.get(b"h", b"").decode().split(":"))
        missing = [h for h in DKIM_COVERS if listed[h] == 0]
        if missing:
            problems.append(f"{label}: h= does not cover " + ", ".join(missing))
        under = [h for h in DKIM_COVERS if 0 < listed[h] <= present[h]]
        if under:
            problems.append(
                f"{label}: h= does not over-sign " + ", ".join(under) + " (a copy could be "
                "added after signing)"
            )
        if selector not in keys:
            problems.append(f"{label}: not a configured selector ({', '.join(keys)})")
            continue
        try:
            verified = parsed.verify(idx=i, dnsfunc=dnsfunc)
        except DKIMException as exc:
            verified, why = False, f": {exc}"
        else:
            why = ""
        if not verified:
            problems.append(f"{label}: does not verify with the public key of its key file{why}")
    signed = {sig.get(b"s", b"").decode("ascii", "replace") for sig in signatures}
    unsigned = [s for s in keys if s not in signed]
    if unsigned:
        problems.append("no DKIM signature for selector " + ", ".join(unsigned))
    return problems


def dkim(settings: Settings, messages: Mapping[str, bytes]) -> Check:
    """Each captured message is signed once per key, and each signature verifies and covers
    ``DKIM_COVERS`` (over-signed)."""
    if not dkim_configured(settings):
        return Check(
            "DKIM",
            Status.SKIP,
            "not configured: mailer does not sign; have your relay sign with DKIM",
        )
    if not messages:
        return Check("DKIM", Status.SKIP, "no message was captured to check")
    try:
        keys = dkim_keys(settings)
    except (OSError, ValueError, MailerError) as exc:
        return Check("DKIM", Status.FAIL, f"cannot read the DKIM keys: {_describe(exc)}")
    problems = [
        f"{kind}: {p}" for kind, raw in messages.items() for p in dkim_problems(raw, settings, keys)
    ]
    if problems:
        return Check("DKIM", Status.FAIL, "; ".join(problems))
    return Check(
        "DKIM",
        Status.PASS,
        f"every message is signed by s={', s='.join(keys)} (d={settings.dkim_domain}) and "
        "verifies with the key file's public key; h= covers and over-signs "
        + ", ".join(DKIM_COVERS),
    )


TxtLookup = Callable[[str], Awaitable[str | None]]
"""A TXT look-up: the record at a name, ``None`` if there is none, ``DnsUnavailable`` if the
question cannot be answered (``mailer.transport.dns.lookup_txt``; tests pass a stub)."""


async def dkim_dns(settings: Settings, lookup: TxtLookup) -> Check:
    """Whether the DKIM records are published and carry the keys mailer signs with.

    Only for a configuration that signs. DNS that cannot be reached is not a failure
    (``skip``): the records are printed anyway.
    """
    name = "DKIM DNS records"
    try:
        keys = dkim_keys(settings)
    except (OSError, ValueError, MailerError) as exc:
        return Check(name, Status.FAIL, f"cannot read the DKIM keys: {_describe(exc)}")
    records = [
        dkim_record(k.selector, str(settings.dkim_domain), k.public_record) for k in keys.values()
    ]
    answers = await asyncio.gather(*(lookup(r.name) for r in records), return_exceptions=True)
    wrong, missing, unknown, good = [], [], [], []
    for record, found in zip(records, answers, strict=True):
        if isinstance(found, DnsUnavailable):
            unknown.append(f"{record.name} ({found})")
        elif isinstance(found, BaseException):
            raise found
        elif found is None:
            missing.append(record.name)
        elif same_dkim_key(found, record.value):
            good.append(record.name)
        else:
            wrong.append(record.name)
    if wrong:
        return Check(
            name,
            Status.FAIL,
            f"another key than the key file's is published at {', '.join(wrong)}: receivers "
            "will fail every signature; publish the record printed below",
        )
    if missing:
        return Check(
            name,
            Status.WARN,
            f"not published yet: {', '.join(missing)}; publish the record printed below",
        )
    if unknown:
        return Check(
            name,
            Status.SKIP,
            f"could not look up {', '.join(unknown)}; check that it holds the record below",
        )
    return Check(name, Status.PASS, f"{', '.join(good)}: published, the key files' own keys")


def dns_records(settings: Settings) -> list[DnsRecord]:
    """What to publish: the DKIM record per selector (exact), SPF and DMARC (advice)."""
    records = []
    if dkim_configured(settings):
        try:
            keys = dkim_keys(settings)
        except (OSError, ValueError, MailerError):
            keys = {}  # the DKIM rows report it
        domain = str(settings.dkim_domain)
        records += [dkim_record(k.selector, domain, k.public_record) for k in keys.values()]
    from_domain = domain_of(settings.from_addr)
    records.append(spf_advice(from_domain, settings.smtp_host))
    records.append(dmarc_advice(from_domain, settings.dkim_domain))
    return records


def _describe(exc: Exception) -> str:
    return exc.message if isinstance(exc, MailerError) else str(exc)


# -- templates -------------------------------------------------------------------------------


def email_templates(templates_dir: Path) -> list[str]:
    """Names with both a text and an HTML part in ``email/``, the base layout left out."""
    folder = templates_dir / "email"
    names = [p.name.removesuffix(".txt.j2") for p in folder.glob("*.txt.j2")]
    return sorted(n for n in names if n != "base" and (folder / f"{n}.html.j2").is_file())


def campaign_layouts(templates_dir: Path) -> list[str]:
    """Templates a campaign can use (``campaign`` and any custom ones, announcements too)."""
    return [n for n in email_templates(templates_dir) if n not in SERVICE_TEMPLATES]


def footer_problems(text: str, page: str, settings: Settings) -> list[str]:
    """The organisation's name, postal address and privacy contact in both parts."""
    problems = []
    shown = html.unescape(page)
    for field, label in (
        ("org_name", "organisation name"),
        ("org_address", "postal address"),
        ("privacy_contact", "privacy contact"),
    ):
        value = str(getattr(settings, field))
        for part, body in (("text", text), ("HTML", shown)):
            if value not in body:
                problems.append(f"the {part} part does not show the {label}")
    return problems


def templates(settings: Settings) -> Check:
    """Every email template renders, shows the unsubscribe link and the footer in both parts."""
    name = "templates"
    renderer = Renderer(
        settings.templates_dir,
        {
            "org_name": settings.org_name,
            "org_address": settings.org_address,
            "privacy_contact": settings.privacy_contact,
            "base_url": EXAMPLE_BASE,
        },
    )
    found = email_templates(settings.templates_dir)
    missing = [n for n in ("confirm", "campaign") if n not in found]
    problems = [f"{n}: no email/{n}.txt.j2 and .html.j2" for n in missing]
    for template in found:
        unsubscribe = f"{EXAMPLE_BASE}/unsubscribe/doctor-{template}"
        context: dict[str, Any] = {"list_name": "Doctor list", "unsubscribe_url": unsubscribe}
        if template == "confirm":
            context["confirm_url"] = f"{EXAMPLE_BASE}/confirm/doctor"
        else:
            body = "A **self-test** message."
            context |= {"body_text": body, "body_html": Markup(renderer.markdown(body))}  # noqa: S704
        try:
            rendered = renderer.email(template, "Doctor self-test", context)
            check_stoppable(rendered, unsubscribe)
        except MailerError as exc:
            problems.append(f"{template}: {exc.message}")
            continue
        except TemplateError as exc:
            problems.append(f"{template}: does not render: {type(exc).__name__}: {exc}")
            continue
        problems += [
            f"{template}: {p}" for p in footer_problems(rendered.text, rendered.html, settings)
        ]
    if problems:
        return Check(name, Status.FAIL, "; ".join(problems))
    return Check(
        name,
        Status.PASS,
        f"{', '.join(found)}: each shows the unsubscribe link and the footer in text and HTML",
    )


# -- messages --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Expected:
    """What a captured message must show."""

    base_url: str
    to_addr: str
    settings: Settings
    inbound: InboundAddresses | None = None
    """Set when inbound mail is on: every message must then offer a ``mailto:`` unsubscribe
    address and leave with a VERP envelope sender, both naming its outbox row."""


def raw_headers(raw: bytes) -> list[tuple[str, bytes]]:
    """Header fields as sent: (lower-case name, unfolded raw value)."""
    head = raw.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0]
    fields = []
    for line in re.sub(rb"\n(?=[ \t])", b"", head).split(b"\n"):
        name, colon, value = line.partition(b":")
        if colon:
            fields.append((name.decode("ascii", "replace").strip().lower(), value.strip()))
    return fields


def header_url(raw: bytes, base: str) -> str | None:
    """The http(s) ``List-Unsubscribe`` URL under ``base``, exactly as sent (or ``None``)."""
    for name, value in raw_headers(raw):
        if name == "list-unsubscribe":
            for entry in _UNSUBSCRIBE_ENTRY.findall(value):
                url: str = entry.decode("ascii", "replace")
                if url.startswith(f"{base}/unsubscribe/"):
                    return url
    return None


def parse(raw: bytes) -> EmailMessage:
    text = raw.decode("utf-8", errors="surrogateescape")
    message = email.message_from_string(text, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def parts(message: EmailMessage) -> tuple[str, str] | None:
    """The text and HTML parts of a ``multipart/alternative`` message, in that order."""
    if message.get_content_type() != "multipart/alternative":
        return None
    found = list(message.iter_parts())
    if [p.get_content_type() for p in found] != ["text/plain", "text/html"]:
        return None
    text, page = (p.get_content() for p in found)
    if not isinstance(text, str) or not isinstance(page, str):
        return None
    return text, page


def message_problems(raw: bytes, expected: Expected) -> list[str]:
    """Everything PRODUCT.md's "Every outgoing message" asks for, checked on the wire bytes."""
    problems = []
    fields = raw_headers(raw)
    for header in REQUIRED_ONCE:
        n = sum(1 for name, _ in fields if name == header.lower())
        if n != 1:
            problems.append(f"{n} {header} headers (want one)")
    base = expected.base_url
    listed = b" ".join(v for name, v in fields if name == "list-unsubscribe")
    url = header_url(raw, base)
    if b"=?" in listed:
        problems.append("List-Unsubscribe is RFC 2047-encoded (one-click clients cannot read it)")
    elif listed and url is None:
        problems.append(f"List-Unsubscribe has no <{base}/unsubscribe/...> URL")
    post = [v for name, v in fields if name == "list-unsubscribe-post"]
    if post and post[0] != ONE_CLICK.encode("ascii"):
        problems.append(f"List-Unsubscribe-Post is {post[0]!r}, not {ONE_CLICK}")
    if any(len(line) > MAX_LINE for line in raw.split(b"\r\n")):
        problems.append(f"a line is longer than {MAX_LINE} octets")
    try:
        message = parse(raw)
        to = [a.addr_spec for a in message["To"].addresses] if message["To"] else []
        if to != [expected.to_addr]:
            problems.append(f"To is {to}, not [{expected.to_addr!r}]")
        if message["From"] is None or len(message["From"].addresses) != 1:
            problems.append("From does not name one sender")
        if message["Date"] is not None and message["Date"].datetime is None:
            problems.append("Date cannot be read")
        mid = message["Message-ID"]
        if mid is not None and not _MESSAGE_ID.fullmatch(str(mid)):
            problems.append(f"Message-ID {str(mid)!r} is not <left@right>")
        bodies = parts(message)
    except Exception as exc:  # a message the email package cannot parse is itself the finding
        return [*problems, f"cannot be parsed: {type(exc).__name__}: {exc}"]
    if bodies is None:
        problems.append("not multipart/alternative with a text and an HTML part")
        return problems
    text, page = bodies
    if url is not None:
        if url not in text:
            problems.append("the text part does not show the List-Unsubscribe link")
        if url not in html.unescape(page):
            problems.append("the HTML part does not show the List-Unsubscribe link")
    problems += footer_problems(text, page, expected.settings)
    return problems


def inbound_problems(raw: bytes, sender: str, inbound: InboundAddresses) -> list[str]:
    """The ``mailto:`` entry after the https URL and the VERP envelope sender, both genuine
    and naming the same message."""
    entries = [
        entry.decode("ascii", "replace")
        for name, value in raw_headers(raw)
        if name == "list-unsubscribe"
        for entry in _UNSUBSCRIBE_ENTRY.findall(value)
    ]
    mailtos = [e for e in entries if e.startswith("mailto:")]
    bounce = inbound.resolve(sender)
    problems = []
    if not isinstance(bounce, BounceBox):
        problems.append(f"the envelope sender is not a genuine bounces+TOKEN@{inbound.domain}")
    if not mailtos:
        return [*problems, "List-Unsubscribe offers no mailto: address"]
    if entries[0].startswith("mailto:"):
        problems.append("List-Unsubscribe lists the mailto: address before the https URL")
    address, _, query = mailtos[0].removeprefix("mailto:").partition("?")
    box = inbound.resolve(address)
    if not isinstance(box, UnsubscribeBox) or query != "subject=unsubscribe":
        problems.append(
            f"the mailto: entry is not a genuine unsubscribe+TOKEN@{inbound.domain}"
            "?subject=unsubscribe"
        )
    elif isinstance(bounce, BounceBox) and bounce.outbox_id != box.outbox_id:
        problems.append("the mailto: address and the envelope sender name different messages")
    return problems


def message(kind: str, raw: bytes, expected: Expected, sender: str) -> Check:
    """The message check of one kind, on the bytes and envelope sender the sink received."""
    problems = message_problems(raw, expected)
    if expected.inbound is not None:
        problems += inbound_problems(raw, sender, expected.inbound)
    name = f"message: {kind}"
    if problems:
        return Check(name, Status.FAIL, "; ".join(problems))
    inbound = "" if expected.inbound is None else " + mailto: (and a VERP envelope sender)"
    return Check(
        name,
        Status.PASS,
        f"List-Unsubscribe (https? URL){inbound} + One-Click, List-Id, Message-ID, Date, From, "
        "To; text and HTML show the link, organisation, address and privacy contact",
    )
