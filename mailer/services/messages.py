"""Building the bytes of each message: confirmation requests, and campaigns from skeletons."""

import secrets
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime
from email.utils import format_datetime

from markupsafe import Markup

from mailer.domain.compose import Envelope, Rendered, compose, list_id_header
from mailer.domain.inbound import InboundAddresses
from mailer.domain.skeleton import Filled, Skeleton, placeholder
from mailer.domain.tokens import LinkClaim, TokenCodec
from mailer.render import Renderer
from mailer.services.ports import Clock
from mailer.statuses import MessageKind
from mailer.store.campaigns import CampaignRow
from mailer.store.outbox import Claimed

DATE_SENTINEL = "Thu, 01 Jan 1970 00:00:00 +0000"
SKELETONS_KEPT = 8


@dataclass(frozen=True, slots=True)
class MessageConfig:
    base_url: str
    from_addr: str
    instance_id: str
    org_name: str = "mailer"


@dataclass(frozen=True, slots=True)
class Built:
    data: bytes
    smtputf8: bool
    sender: str
    """The envelope sender (MAIL FROM): the VERP bounce address when inbound mail is on."""
    filled: Filled | None = None
    """How ``data`` was made from the campaign's skeleton, when it was."""


@dataclass(frozen=True, slots=True)
class _Prepared:
    skeleton: Skeleton | None
    """``None`` when a skeleton cannot be made safely; every copy is then composed in full."""
    sender: str


class MessageFactory:
    """Turns claimed outbox rows into wire bytes. Campaign layouts are rendered once.

    With ``inbound`` (inbound mail configured), each message gets its own VERP envelope
    sender and a ``mailto:`` unsubscribe address, both naming its outbox row.
    """

    def __init__(
        self,
        renderer: Renderer,
        codec: TokenCodec,
        clock: Clock,
        config: MessageConfig,
        inbound: InboundAddresses | None = None,
    ) -> None:
        self._renderer = renderer
        self._codec = codec
        self._clock = clock
        self._config = config
        self._inbound = inbound
        self._prepared: OrderedDict[tuple[object, ...], _Prepared] = OrderedDict()
        self._date_of: tuple[datetime, str] | None = None

    def _date(self) -> str:
        """The Date header for now; formatted once a second (it has no finer resolution)."""
        second = self._clock.now().replace(microsecond=0)
        if self._date_of is None or self._date_of[0] != second:
            self._date_of = (second, format_datetime(second))
        return self._date_of[1]

    def unsubscribe_url(self, subject_hash: str, list_uid: str | None) -> str:
        token = self._codec.unsubscribe_token(LinkClaim(subject_hash, list_uid))
        return f"{self._config.base_url}/unsubscribe/{token}"

    def _envelope_sender(self, m: Claimed, from_addr: str) -> str:
        return from_addr if self._inbound is None else self._inbound.bounce(m.outbox_id)

    def _mailto(self, m: Claimed) -> str | None:
        return None if self._inbound is None else self._inbound.unsubscribe_mailto(m.outbox_id)

    def _message_id_left(self, m: Claimed) -> str:
        """Stable per outbox row (a retry keeps it); each preview copy gets a new one."""
        left = f"{m.outbox_id}.{self._config.instance_id}"
        if m.kind is MessageKind.PREVIEW:
            left = f"{left}.{secrets.token_hex(4)}"
        return left

    def _envelope(
        self, m: Claimed, sender: str, list_name: str, list_slug: str, unsubscribe: str
    ) -> Envelope:
        domain = sender.rpartition("@")[2]
        return Envelope(
            from_name=list_name,
            from_addr=sender,
            to_addr=m.email,
            list_id=list_id_header(list_name, list_slug, domain),
            unsubscribe_url=unsubscribe,
            message_id=f"<{self._message_id_left(m)}@{domain}>",
            date=self._date(),
            smtputf8=not (m.email.isascii() and sender.isascii()),
            unsubscribe_mailto=self._mailto(m),
        )

    def confirm(self, m: Claimed) -> Built:
        """A double opt-in confirmation request; its unsubscribe link is global."""
        sender = m.list_from or self._config.from_addr
        claim = LinkClaim(m.email_hash, m.list_uid)
        confirm_url = f"{self._config.base_url}/confirm/{self._codec.confirm_token(claim)}"
        unsubscribe = self.unsubscribe_url(m.email_hash, None)
        list_name = m.list_name or ""
        rendered = self._renderer.email(
            "confirm",
            f"Confirm your subscription to {list_name}",
            {"list_name": list_name, "confirm_url": confirm_url, "unsubscribe_url": unsubscribe},
        )
        envelope = self._envelope(m, sender, list_name, m.list_slug or "mail", unsubscribe)
        return Built(
            compose(envelope, rendered), envelope.smtputf8, self._envelope_sender(m, sender)
        )

    def campaign(self, m: Claimed, campaign: CampaignRow) -> Built:
        """One recipient's copy of a campaign (or its preview), filled into the skeleton."""
        prepared = self._prepare(campaign)
        unsubscribe = self.unsubscribe_url(m.email_hash, campaign.list_uid)
        smtputf8 = not (m.email.isascii() and prepared.sender.isascii())
        envelope_sender = self._envelope_sender(m, prepared.sender)
        if prepared.skeleton is not None:
            values = {
                "to": m.email.encode("utf-8"),
                "mid": self._message_id_left(m).encode("ascii"),
                "date": self._date().encode("ascii"),
                "unsub": unsubscribe.encode("ascii"),
            }
            mailto = self._mailto(m)
            if mailto is not None:
                values["mailto"] = mailto.encode("ascii")
            if prepared.skeleton.fits(values):
                filled = Filled(prepared.skeleton, values)
                return Built(prepared.skeleton.fill(values), smtputf8, envelope_sender, filled)
        rendered = self._render_campaign(campaign, unsubscribe)
        name, slug = self._identity(campaign)
        envelope = self._envelope(m, prepared.sender, name, slug, unsubscribe)
        return Built(compose(envelope, rendered), envelope.smtputf8, envelope_sender)

    def _identity(self, campaign: CampaignRow) -> tuple[str, str]:
        """Display name and List-Id label: the list's, or the organisation's for announcements."""
        if campaign.list_name is None or campaign.list_slug is None:
            return self._config.org_name, "announcements"
        return campaign.list_name, campaign.list_slug

    def _render_campaign(self, campaign: CampaignRow, unsubscribe: str) -> Rendered:
        return self._renderer.email(
            campaign.template,
            campaign.subject,
            {
                "list_name": self._identity(campaign)[0],
                "body_text": campaign.body,
                "body_html": Markup(self._renderer.markdown(campaign.body)),  # noqa: S704
                "unsubscribe_url": unsubscribe,
            },
        )

    def _prepare(self, campaign: CampaignRow) -> _Prepared:
        key = (campaign.id, campaign.subject, campaign.body, campaign.template, campaign.list_name)
        found = self._prepared.get(key)
        if found is not None:
            self._prepared.move_to_end(key)
            return found
        prepared = self._make_skeleton(campaign)
        self._prepared[key] = prepared
        if len(self._prepared) > SKELETONS_KEPT:
            self._prepared.popitem(last=False)
        return prepared

    def _make_skeleton(self, campaign: CampaignRow) -> _Prepared:
        sender = campaign.list_from or self._config.from_addr
        domain = sender.rpartition("@")[2]
        length = len(self.unsubscribe_url("0" * 32, campaign.list_uid))
        slots = {
            "to": placeholder("to", 32),
            "mid": placeholder("mid", 32),
            "date": DATE_SENTINEL,
            "unsub": placeholder("unsub", length),
        }
        if self._inbound is not None:
            slots["mailto"] = placeholder("mailto", 32)  # a header slot: any length fits
        rendered = self._render_campaign(campaign, slots["unsub"])
        name, slug = self._identity(campaign)
        envelope = Envelope(
            from_name=name,
            from_addr=sender,
            to_addr=f"{slots['to']}@skeleton.invalid",
            list_id=list_id_header(name, slug, domain),
            unsubscribe_url=slots["unsub"],
            message_id=f"<{slots['mid']}@{domain}>",
            date=DATE_SENTINEL,
            smtputf8=not sender.isascii(),
            unsubscribe_mailto=slots.get("mailto"),
        )
        prototype = compose(envelope, rendered)
        if prototype.count(DATE_SENTINEL.encode("ascii")) != 1:
            return _Prepared(None, sender)  # the body quotes the sentinel date
        slots["to"] = envelope.to_addr
        skeleton = Skeleton.split(prototype, slots, fixed={"unsub": length})
        return _Prepared(skeleton, sender)
