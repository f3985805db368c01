"""The JSON API for other services: opt-in and opt-out by address, with bearer keys."""

import ipaddress

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, field_validator

from mailer.domain.json_body import M, validated
from mailer.domain.ledger import Evidence
from mailer.errors import InvalidInput, RateLimited
from mailer.statuses import Channel
from mailer.store.apikeys import ApiKeyRow
from mailer.web.context import (
    LIMITER,
    MAX_USER_AGENT,
    mailer_of,
    request_ip,
    request_user_agent,
)
from mailer.web.openapi import SPEC

routes = web.RouteTableDef()
MAX_BODY = 16 * 1024


class OptInBody(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    email: str  # no length cap here: an over-long address is an invalid address (422)
    list: str = Field(min_length=1, max_length=64)
    name: str | None = Field(None, max_length=200)
    source: str | None = Field(None, max_length=60)
    ip: str | None = None
    user_agent: str | None = Field(None, max_length=MAX_USER_AGENT)

    @field_validator("ip")
    @classmethod
    def _ip(cls, value: str | None) -> str | None:
        return None if value is None else str(ipaddress.ip_address(value))


class OptOutBody(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    email: str  # no length cap here: an over-long address is an invalid address (422)
    list: str | None = Field(None, min_length=1, max_length=64)


async def _body(request: web.Request, model: type[M]) -> M:
    too_large = InvalidInput(f"the body is larger than {MAX_BODY} bytes")
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise too_large
    if request.content_type != "application/json":
        raise InvalidInput("the body must be JSON (Content-Type: application/json)")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:  # chunked, past the app's client_max_size
        raise too_large from None
    if len(raw) > MAX_BODY:  # a chunked body has no Content-Length to check up front
        raise too_large
    return validated(raw, model)


async def _authorised(request: web.Request) -> ApiKeyRow:
    mailer = mailer_of(request)
    key = await mailer.api_keys.authenticate(request.headers.get("Authorization"))
    wait = request.app[LIMITER].take(key.id, mailer.clock.monotonic())
    if wait > 0:
        mailer.metrics.rate_limited.inc()
        raise RateLimited("too many requests for this API key", retry_after=wait)
    return key


def _actor(key: ApiKeyRow, source: str | None = None) -> str:
    return f"api-key:{key.name}" + (f" ({source})" if source else "")


@routes.post("/api/v1/subscriptions")
async def opt_in(request: web.Request) -> web.Response:
    key = await _authorised(request)
    body = await _body(request, OptInBody)
    evidence = Evidence(
        channel=Channel.API.value,
        actor=_actor(key, body.source),
        ip=body.ip or request_ip(request),
        user_agent=body.user_agent or request_user_agent(request),
    )
    await mailer_of(request).consent.request_opt_in(body.email, body.list, body.name, evidence)
    return web.json_response({"status": "pending"}, status=202)


@routes.delete("/api/v1/subscriptions")
async def opt_out(request: web.Request) -> web.Response:
    key = await _authorised(request)
    body = await _body(request, OptOutBody)
    evidence = Evidence(
        channel=Channel.API.value,
        actor=_actor(key),
        ip=request_ip(request),
        user_agent=request_user_agent(request),
    )
    await mailer_of(request).consent.unsubscribe_address(body.email, body.list, evidence)
    return web.json_response({"status": "unsubscribed"})


@routes.get("/api/v1/openapi.json")
async def openapi(_request: web.Request) -> web.Response:
    return web.json_response(SPEC)
