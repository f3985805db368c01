"""SQLModel tables. Data only: no queries, no rules.

Timestamps are aware UTC. Statuses are plain strings in the database (portable, no enum
types to migrate); ``mailer.statuses`` holds the only values code writes.
"""

from datetime import date, datetime

from sqlalchemy import Column, Index, String, Text, UniqueConstraint, text
from sqlmodel import Field, SQLModel

from mailer.statuses import MessageKind, OutboxStatus

SQLModel.metadata.naming_convention = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
"""Every constraint gets a known name, so later migrations can alter it (SQLite included)."""


class MailingList(SQLModel, table=True):
    __tablename__ = "mailing_list"

    id: int | None = Field(default=None, primary_key=True)
    uid: str = Field(sa_column=Column(String(16), unique=True, nullable=False))
    slug: str = Field(sa_column=Column(String(64), unique=True, nullable=False))
    name: str = Field(max_length=200)
    description: str = Field(default="", max_length=2000)
    from_addr: str | None = Field(default=None, max_length=320)
    created_at: datetime


class Subscriber(SQLModel, table=True):
    __tablename__ = "subscriber"

    id: int | None = Field(default=None, primary_key=True)
    email: str = Field(sa_column=Column(String(320), unique=True, nullable=False))
    email_hash: str = Field(sa_column=Column(String(32), unique=True, nullable=False))
    name: str | None = Field(default=None, max_length=200)
    created_at: datetime


class Subscription(SQLModel, table=True):
    __tablename__ = "subscription"
    __table_args__ = (
        UniqueConstraint("subscriber_id", "list_id"),
        Index("ix_subscription_audience", "list_id", "status", "subscriber_id"),
    )

    id: int | None = Field(default=None, primary_key=True)
    subscriber_id: int = Field(foreign_key="subscriber.id", ondelete="CASCADE", index=True)
    list_id: int = Field(foreign_key="mailing_list.id", ondelete="CASCADE", index=True)
    status: str = Field(max_length=16)
    created_at: datetime
    updated_at: datetime
    confirmed_at: datetime | None = None


class Suppression(SQLModel, table=True):
    __tablename__ = "suppression"

    email_hash: str = Field(sa_column=Column(String(32), primary_key=True))
    reason: str = Field(max_length=16)
    created_at: datetime


class ConsentEvent(SQLModel, table=True):
    """One entry of the append-only, hash-chained consent ledger.

    ``ip`` and ``user_agent`` are personal data and may be blanked on erasure; the chain
    covers them through ``evidence_digest``, so blanking them never breaks verification.
    """

    __tablename__ = "consent_event"

    seq: int = Field(primary_key=True)
    at: datetime
    event: str = Field(max_length=32)
    subject_hash: str = Field(sa_column=Column(String(32), index=True, nullable=False))
    list_uid: str | None = Field(default=None, max_length=16)
    scope: str = Field(max_length=16)
    channel: str = Field(max_length=16)
    actor: str = Field(max_length=120)
    ip: str | None = Field(default=None, max_length=64)
    user_agent: str | None = Field(default=None, max_length=512)
    policy_version: str | None = Field(default=None, max_length=64)
    evidence_digest: str = Field(max_length=64)
    prev_hash: str = Field(max_length=64)
    hash: str = Field(max_length=64)


class ApiKey(SQLModel, table=True):
    __tablename__ = "api_key"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(sa_column=Column(String(64), unique=True, nullable=False))
    prefix: str = Field(max_length=16)
    key_hash: str = Field(sa_column=Column(String(64), unique=True, nullable=False))
    created_at: datetime
    revoked_at: datetime | None = None


class Campaign(SQLModel, table=True):
    """A newsletter to one list, or a policy announcement to every confirmed person (no list).

    The Markdown body is data, never a template.
    """

    __tablename__ = "campaign"

    id: int | None = Field(default=None, primary_key=True)
    kind: str = Field(default="newsletter", max_length=16)
    list_id: int | None = Field(
        default=None, foreign_key="mailing_list.id", ondelete="CASCADE", index=True
    )
    subject: str = Field(max_length=998)
    body: str = Field(sa_column=Column(Text, nullable=False))
    template: str = Field(default="campaign", max_length=64)
    status: str = Field(max_length=16)
    scheduled_at: datetime | None = None
    fanout_cursor: int = 0
    """The highest subscriber id already fanned out into the outbox."""
    fanout_done: bool = False
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None


class PolicyVersion(SQLModel, table=True):
    """A published version of the privacy policy; it applies from ``effective_on``, never before."""

    __tablename__ = "policy_version"

    id: int | None = Field(default=None, primary_key=True)
    version: str = Field(sa_column=Column(String(64), unique=True, nullable=False))
    effective_on: date
    summary: str = Field(sa_column=Column(Text, nullable=False))
    url: str | None = Field(default=None, max_length=2000)
    published_at: datetime
    campaign_id: int | None = Field(default=None, foreign_key="campaign.id", ondelete="SET NULL")


DIRECT_LANE_DUE = (
    f"status = '{OutboxStatus.QUEUED.value}' AND kind IN "
    f"('{MessageKind.CONFIRM.value}', '{MessageKind.PREVIEW.value}')"
)
"""The direct lane's queued rows (confirmation requests, previews), spelled with literals so
that a claim written the same way provably matches the partial index over them."""


class Outbox(SQLModel, table=True):
    """One message to one person: the unit the sender claims, checks, sends and records."""

    __tablename__ = "outbox"
    __table_args__ = (
        UniqueConstraint("campaign_id", "subscriber_id", "kind", name="uq_outbox_once"),
        Index("ix_outbox_direct", "status", "kind", "next_attempt_at"),
        Index(
            "ix_outbox_direct_due",
            "next_attempt_at",
            "id",
            postgresql_where=text(DIRECT_LANE_DUE),
            sqlite_where=text(DIRECT_LANE_DUE),
        ),
        Index("ix_outbox_campaign", "campaign_id", "status", "next_attempt_at", "id"),
        Index("ix_outbox_recipient", "subscriber_id", "kind", "created_at"),
    )

    id: int | None = Field(default=None, primary_key=True)
    kind: str = Field(max_length=16)
    campaign_id: int | None = Field(default=None, foreign_key="campaign.id", ondelete="CASCADE")
    list_id: int | None = Field(default=None, foreign_key="mailing_list.id", ondelete="CASCADE")
    subscriber_id: int = Field(foreign_key="subscriber.id", ondelete="CASCADE")
    status: str = Field(max_length=16)
    reason: str | None = Field(default=None, max_length=500)
    attempts: int = 0
    next_attempt_at: datetime
    checked_at: datetime | None = None
    """When the last send-time consent check passed (the claim): G2 audits compare it with
    the time an unsubscribe was answered."""
    created_at: datetime
    updated_at: datetime
    lease_owner: str | None = Field(default=None, max_length=80)
    """The sender process that claimed the row (``host:pid:random``), while ``sending``."""
    lease_until: datetime | None = None
    """Until when that claim holds (database time); after it, the row is reaped, never resent."""
    fence: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
    """Incremented at every claim: outcomes are written only under the fence they were
    claimed with, so a sender whose lease was taken away cannot overwrite the row."""
    feedback: str | None = Field(default=None, max_length=16)
    """The strongest report about this delivery after it left: hard-bounce, soft-bounce,
    complaint (``mailer.domain.feedback.FeedbackKind``)."""
    feedback_detail: str | None = Field(default=None, max_length=400)
    feedback_at: datetime | None = None


class RateBucket(SQLModel, table=True):
    """A token bucket shared by every sender of the deployment (``MAILER_SMTP_RATE``)."""

    __tablename__ = "rate_bucket"

    name: str = Field(sa_column=Column(String(32), primary_key=True))
    tokens: float
    updated_at: datetime
    """When ``tokens`` was last refilled (database time)."""


class BounceScore(SQLModel, table=True):
    """Soft bounces counted for one address (by hash) within the current window."""

    __tablename__ = "bounce_score"

    email_hash: str = Field(sa_column=Column(String(32), primary_key=True))
    soft_count: int
    since: datetime


class InstanceSetting(SQLModel, table=True):
    """Per-installation values generated once, e.g. the address-hash key (never rotates)."""

    __tablename__ = "instance_setting"

    name: str = Field(sa_column=Column(String(64), primary_key=True))
    value: str = Field(max_length=200)
