"""What handlers share: the running mailer, the API rate limiter, and request evidence."""

from aiohttp import web

from mailer.bootstrap import Mailer
from mailer.domain.clientip import client_ip
from mailer.domain.ratelimit import KeyedLimiter

MAILER = web.AppKey("mailer", Mailer)
LIMITER = web.AppKey("limiter", KeyedLimiter)

MAX_USER_AGENT = 512


def mailer_of(request: web.Request) -> Mailer:
    return request.app[MAILER]


def request_ip(request: web.Request) -> str | None:
    settings = mailer_of(request).settings
    return client_ip(
        request.remote, request.headers.get("X-Forwarded-For"), settings.trusted_proxies
    )


def request_user_agent(request: web.Request) -> str | None:
    agent = request.headers.get("User-Agent")
    return agent[:MAX_USER_AGENT] if agent else None
