"""The composition root: the one place that builds real adapters and wires the services."""

import os
import secrets
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta

from mailer.config import Settings
from mailer.domain.feedback import SoftBounceRule
from mailer.domain.inbound import InboundAddresses
from mailer.domain.tokens import RowTokens, TokenCodec
from mailer.render import Renderer
from mailer.services.apikeys import ApiKeys
from mailer.services.campaigns import Campaigns
from mailer.services.feedback import FeedbackService
from mailer.services.importing import Importer
from mailer.services.inbound import InboundMail
from mailer.services.lists import Lists
from mailer.services.messages import MessageConfig, MessageFactory
from mailer.services.metrics import Metrics
from mailer.services.people import People
from mailer.services.policy import Policy
from mailer.services.ports import Clock, NoSigner, Signer, SystemClock
from mailer.services.scheduling import Scheduler
from mailer.services.sending import PREFETCH_PER_CONNECTION, Sender, SendPolicy
from mailer.services.setup import instance_secrets, secret_keys
from mailer.services.subscriptions import Subscriptions
from mailer.services.throttle import LocalThrottle, SharedThrottle, Throttle
from mailer.store.db import Database, open_database
from mailer.transport.capture import CaptureServer
from mailer.transport.dkim import DkimSigner, load_keys
from mailer.transport.inbound import InboundServer
from mailer.transport.smtp import RelayConfig, SmtpPool
from mailer.worker import Worker


@dataclass
class Mailer:
    """Everything a running mailer is made of; built by ``open_mailer``."""

    settings: Settings
    db: Database
    clock: Clock
    metrics: Metrics
    renderer: Renderer
    lists: Lists
    api_keys: ApiKeys
    consent: Subscriptions
    people: People
    campaigns: Campaigns
    policy: Policy
    imports: Importer
    feedback: FeedbackService
    inbound: InboundMail | None = None
    """Set when inbound mail is configured (``MAILER_INBOUND_PORT``)."""
    worker: Worker | None = None
    capture: CaptureServer | None = None
    listener: InboundServer | None = None


def _relay(settings: Settings, capture: CaptureServer | None) -> RelayConfig:
    if capture is not None:
        return RelayConfig(host=capture.host, port=capture.port, timeout=settings.smtp_timeout)
    assert settings.smtp_host is not None
    default_port = {"none": 25, "starttls": 587, "tls": 465}[settings.smtp_tls]
    return RelayConfig(
        host=settings.smtp_host,
        port=settings.smtp_port or default_port,
        tls=settings.smtp_tls,
        username=settings.smtp_username,
        password=settings.smtp_password.get_secret_value() if settings.smtp_password else None,
        timeout=settings.smtp_timeout,
    )


def sender_identity() -> str:
    """``host:pid:random``: names this process on the rows it claims (unique per start)."""
    return f"{socket.gethostname()[:60]}:{os.getpid()}:{secrets.token_hex(3)}"


def _throttle(settings: Settings, db: Database, clock: Clock) -> Throttle | None:
    if settings.smtp_rate <= 0:
        return None
    if db.dialect == "postgresql":
        return SharedThrottle(db, clock, settings.smtp_rate)
    return LocalThrottle(settings.smtp_rate, clock)


def _signer(settings: Settings) -> Signer:
    if not settings.dkim_domain:
        return NoSigner()
    keys = load_keys(settings.dkim_key_file, settings.dkim_selector)
    return DkimSigner(settings.dkim_domain, keys)


@asynccontextmanager
async def open_mailer(
    settings: Settings,
    *,
    sending: bool = False,
    listening: bool = False,
    clock: Clock | None = None,
) -> AsyncIterator[Mailer]:
    """Build a mailer from settings; with ``sending``, also start the worker and transport;
    with ``listening`` (and inbound mail configured), the inbound SMTP listener."""
    clock = clock or SystemClock()
    async with AsyncExitStack() as stack:
        db = open_database(settings.database_url)
        stack.push_async_callback(db.close)
        keys = secret_keys(settings)
        secrets = await instance_secrets(db)
        codec = TokenCodec(keys, clock=lambda: clock.now().timestamp())
        metrics = Metrics()
        renderer = Renderer(
            settings.templates_dir,
            {
                "org_name": settings.org_name,
                "org_address": settings.org_address,
                "privacy_contact": settings.privacy_contact,
                "base_url": settings.base_url,
            },
        )
        wake: list[Callable[[], None]] = []
        reschedule: list[Callable[[], None]] = []

        def wake_senders() -> None:
            for hook in wake:
                hook()

        def campaigns_changed() -> None:
            for hook in reschedule:
                hook()

        addresses = (
            InboundAddresses(RowTokens(keys), settings.inbound_domain)
            if settings.inbound_enabled
            else None
        )
        factory = MessageFactory(
            renderer,
            codec,
            clock,
            MessageConfig(
                settings.base_url, settings.from_addr, secrets.instance_id, settings.org_name
            ),
            addresses,
        )

        consent = Subscriptions(
            db,
            codec,
            secrets.hash_key,
            clock,
            metrics,
            timedelta(minutes=settings.confirm_resend_minutes),
            on_enqueued=wake_senders,
        )
        campaign_service = Campaigns(
            db, clock, renderer, factory, secrets.hash_key, on_change=campaigns_changed
        )
        mailer = Mailer(
            settings=settings,
            db=db,
            clock=clock,
            metrics=metrics,
            renderer=renderer,
            lists=Lists(db, clock),
            api_keys=ApiKeys(db, clock),
            consent=consent,
            people=People(db, clock, consent, captured=settings.outbox_dir),
            campaigns=campaign_service,
            policy=Policy(db, clock, campaign_service, on_change=campaigns_changed),
            imports=Importer(
                db,
                secrets.hash_key,
                clock,
                timedelta(minutes=settings.confirm_resend_minutes),
                on_enqueued=wake_senders,
            ),
            feedback=FeedbackService(
                db,
                consent,
                clock,
                metrics,
                SoftBounceRule(
                    settings.soft_bounce_limit, timedelta(days=settings.soft_bounce_days)
                ),
            ),
        )
        if addresses is not None:
            mailer.inbound = InboundMail(addresses, codec, settings.base_url, mailer.feedback)
        if listening and mailer.inbound is not None and settings.inbound_port is not None:
            listener = InboundServer(
                mailer.inbound,
                settings.inbound_host,
                settings.inbound_port,
                settings.inbound_domain,
            )
            await listener.start()
            stack.push_async_callback(listener.stop)
            mailer.listener = listener
        if sending:
            capture = None
            if settings.uses_capture:
                capture = CaptureServer(settings.outbox_dir)
                await capture.start()
                stack.push_async_callback(capture.stop)
            pool = SmtpPool(_relay(settings, capture), size=settings.smtp_connections)
            stack.push_async_callback(pool.close)
            shared = db.dialect == "postgresql"
            policy = SendPolicy(
                give_up_after=timedelta(hours=settings.smtp_give_up_hours),
                lease_seconds=settings.lease_seconds,
                shared=shared,
            )
            sender = Sender(
                db,
                pool,
                factory,
                clock,
                metrics,
                policy,
                sender_identity(),
                prefetch=PREFETCH_PER_CONNECTION * settings.smtp_connections,
                signer=_signer(settings),
                throttle=_throttle(settings, db, clock),
            )
            scheduler = Scheduler(db, clock, sender.set_lanes, on_queued=wake_senders)
            worker = Worker(
                sender,
                scheduler,
                metrics,
                settings.smtp_connections,
                settings.worker_poll_seconds,
                lease_every=policy.lease_margin if shared else None,
            )
            await worker.start()
            stack.push_async_callback(worker.stop)
            wake.append(worker.wake)
            reschedule.append(worker.reschedule)
            mailer.worker, mailer.capture = worker, capture
        yield mailer
