"""Relay webhooks: ``POST /api/v1/events`` reports bounces and complaints, signed with HMAC.

The order matters: the raw body is read (bounded) and its signature checked before any of it
is parsed; then the whole batch is validated, addresses included, before the first event is
applied. Addresses never reach the log. Webhooks do not spend the opt-in API's rate limit.
"""

import logging
from collections import Counter

from aiohttp import web

from mailer.bootstrap import Mailer
from mailer.domain.ledger import Evidence
from mailer.domain.webhook_events import RelayEvent, parse_events
from mailer.domain.webhook_signature import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify
from mailer.errors import InvalidAddress, InvalidInput, NotFound, TooLarge
from mailer.web.context import mailer_of, request_ip, request_user_agent

log = logging.getLogger("mailer.web.webhooks")
routes = web.RouteTableDef()
MAX_BODY = 1024 * 1024
ACTOR = "webhook"


@routes.post("/api/v1/events")
async def events(request: web.Request) -> web.Response:
    """Apply a signed batch of relay events; answer what each one did, in order."""
    mailer = mailer_of(request)
    secrets = [s.get_secret_value().encode("utf-8") for s in mailer.settings.webhook_secrets]
    if not secrets:
        raise NotFound("webhooks are not configured (set MAILER_WEBHOOK_SECRETS)")
    raw = await _read_bounded(request)
    verify(
        secrets,
        request.headers.get(TIMESTAMP_HEADER),
        request.headers.get(SIGNATURE_HEADER),
        raw,
        now=mailer.clock.now().timestamp(),
    )
    if request.content_type != "application/json":
        raise InvalidInput("the body must be JSON (Content-Type: application/json)")
    batch = parse_events(raw)
    subjects = _subjects(mailer, batch)
    ip, agent = request_ip(request), request_user_agent(request)
    applied = []
    for event, subject in zip(batch, subjects, strict=True):
        evidence = Evidence(channel=event.channel.value, actor=ACTOR, ip=ip, user_agent=agent)
        applied.append(await mailer.feedback.for_subject(subject, event.feedback, evidence))
    tally = " ".join(f"{k}={n}" for k, n in sorted(Counter(a.value for a in applied).items()))
    log.info("webhook.events n=%d %s", len(applied), tally)
    return web.json_response({"results": [{"applied": a.value} for a in applied]})


async def _read_bounded(request: web.Request) -> bytes:
    """The raw body, refused past ``MAX_BODY`` (the app's own limit is for smaller routes)."""
    too_large = TooLarge(f"the body is larger than {MAX_BODY} bytes")
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise too_large
    body = bytearray()
    async for chunk in request.content.iter_any():  # chunked bodies have no length up front
        body += chunk
        if len(body) > MAX_BODY:
            raise too_large
    return bytes(body)


def _subjects(mailer: Mailer, batch: list[RelayEvent]) -> list[str]:
    """Each event's address hash; ``InvalidAddress`` naming the first invalid one."""
    subjects = []
    for index, event in enumerate(batch):
        try:
            subjects.append(mailer.consent.identify(event.email)[1])
        except InvalidAddress as exc:
            raise InvalidAddress(f"events[{index}].email: {exc.message}") from None
    return subjects
