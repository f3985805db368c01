"""The status and reason vocabularies every layer shares. No dependencies, data only."""

from enum import StrEnum


class SubscriptionStatus(StrEnum):
    PENDING = "pending"
    CONFIRMED = "confirmed"
    UNSUBSCRIBED = "unsubscribed"


class SuppressionReason(StrEnum):
    UNSUBSCRIBED = "unsubscribed"
    BOUNCED = "bounced"
    COMPLAINED = "complained"
    ERASED = "erased"
    MANUAL = "manual"


class MessageKind(StrEnum):
    CONFIRM = "confirm"
    CAMPAIGN = "campaign"
    PREVIEW = "preview"
    ANNOUNCEMENT = "announcement"


class OutboxStatus(StrEnum):
    QUEUED = "queued"
    SENDING = "sending"
    SENT = "sent"
    FAILED = "failed"
    SKIPPED = "skipped"
    UNKNOWN = "unknown"


class Channel(StrEnum):
    API = "api"
    PAGE = "page"
    ONE_CLICK = "one-click"
    CLI = "cli"
    IMPORT = "import"
    BOUNCE = "bounce"
    COMPLAINT = "complaint"
    MAIL = "mail"
    """A mail to the ``mailto:`` unsubscribe address of a message."""


class CampaignStatus(StrEnum):
    DRAFT = "draft"
    SCHEDULED = "scheduled"
    RUNNING = "running"
    PAUSED = "paused"
    SENT = "sent"
    CANCELLED = "cancelled"


class CampaignKind(StrEnum):
    NEWSLETTER = "newsletter"
    ANNOUNCEMENT = "announcement"
