"""The body of a relay webhook: a batch of bounce and complaint events. Pure parsing.

``{"events": [{"type": "bounce", "email": ..., "bounce": "hard"|"soft", "status"?, "diagnostic"?},
{"type": "complaint", "email": ..., "feedback_type"?}]}``, at most ``MAX_EVENTS``. The whole
batch is checked here before anything is applied; a problem names the event by its index.
Addresses are checked by the caller (``parse_address``), which turns them into identities.
"""

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from mailer.domain.feedback import Feedback, FeedbackKind
from mailer.domain.json_body import dotted, validated
from mailer.statuses import Channel

MAX_EVENTS = 100
STATUS_PATTERN = r"^[245]\.[0-9]{1,3}\.[0-9]{1,3}$"
"""An RFC 3463 enhanced status code, e.g. ``5.1.1``."""
FEEDBACK_TYPE_MAX = 64


class _Bounce(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["bounce"]
    email: str
    bounce: Literal["hard", "soft"]
    status: str | None = Field(None, pattern=STATUS_PATTERN)
    diagnostic: str | None = None


class _Complaint(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["complaint"]
    email: str
    feedback_type: str | None = Field(None, max_length=FEEDBACK_TYPE_MAX)


class _Batch(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    events: list[Annotated[_Bounce | _Complaint, Field(discriminator="type")]] = Field(
        max_length=MAX_EVENTS
    )


@dataclass(frozen=True, slots=True)
class RelayEvent:
    """One report from a relay: the address as sent and what happened to mail for it."""

    email: str
    feedback: Feedback

    @property
    def channel(self) -> Channel:
        """The ledger channel of the suppression this event may cause."""
        if self.feedback.kind is FeedbackKind.COMPLAINT:
            return Channel.COMPLAINT
        return Channel.BOUNCE


def parse_events(raw: bytes) -> list[RelayEvent]:
    """The events of a webhook body; ``InvalidInput`` naming the first bad event otherwise."""
    batch = validated(raw, _Batch, _where)
    return [_event(e) for e in batch.events]


def _event(event: _Bounce | _Complaint) -> RelayEvent:
    if isinstance(event, _Complaint):
        return RelayEvent(event.email, Feedback(FeedbackKind.COMPLAINT, None, event.feedback_type))
    kind = FeedbackKind.HARD_BOUNCE if event.bounce == "hard" else FeedbackKind.SOFT_BOUNCE
    return RelayEvent(event.email, Feedback(kind, event.status, event.diagnostic))


def _where(loc: tuple[int | str, ...]) -> str:
    """``events[3].status`` for pydantic's ``('events', 3, 'bounce', 'status')``.

    The third part is the discriminator's tag, which is not a field of the body.
    """
    if len(loc) >= 2 and loc[0] == "events" and isinstance(loc[1], int):
        return ".".join([f"events[{loc[1]}]", *(str(p) for p in loc[3:])])
    return dotted(loc)
