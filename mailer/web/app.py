"""``create_app``: routes, error translation, security headers and a redacting access log."""

import logging
import re
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from mailer.bootstrap import Mailer
from mailer.domain.ratelimit import KeyedLimiter
from mailer.errors import (
    BadToken,
    Conflict,
    InvalidAddress,
    InvalidInput,
    MailerError,
    NotFound,
    RateLimited,
    TooLarge,
    Unauthorized,
)
from mailer.web import api, ops, public, webhooks
from mailer.web.context import LIMITER, MAILER

log = logging.getLogger("mailer.web")

STATUS = {
    InvalidInput: 400,
    BadToken: 400,
    Unauthorized: 401,
    NotFound: 404,
    Conflict: 409,
    TooLarge: 413,
    InvalidAddress: 422,
    RateLimited: 429,
}
PAGE_HEADERS = {
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; "
        "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}
_TOKEN_PATH = re.compile(r"/(confirm|unsubscribe)/([^/]{0,6})[^/]*", re.IGNORECASE)
"""Anywhere in the path: near misses (``//unsubscribe/…``, other case) carry whole tokens too."""

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_body(code: str, message: str) -> dict[str, dict[str, str]]:
    return {"error": {"code": code, "message": message}}


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn ``MailerError`` into the documented JSON error; never leak a traceback."""
    try:
        return await handler(request)
    except MailerError as exc:
        status = next((s for cls, s in STATUS.items() if isinstance(exc, cls)), 500)
        headers = {}
        if isinstance(exc, RateLimited):
            headers["Retry-After"] = str(max(1, round(exc.retry_after + 0.5)))
        return web.json_response(error_body(exc.code, exc.message), status=status, headers=headers)
    except web.HTTPException as exc:
        if exc.status >= 400 and request.path.startswith("/api/"):
            return web.json_response(
                error_body(exc.reason.lower().replace(" ", "_"), exc.reason), status=exc.status
            )
        raise
    except Exception:
        log.exception("web.unhandled path=%s", redact(request.path))
        return web.json_response(error_body("internal", "internal error"), status=500)


@web.middleware
async def security_headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    response = await handler(request)
    if response.content_type == "text/html":
        response.headers.update(PAGE_HEADERS)
    return response


def redact(path: str) -> str:
    """Keep at most the first six characters of a link token in anything logged."""
    return _TOKEN_PATH.sub(lambda m: f"/{m.group(1)}/{m.group(2)}…", path)


class RedactingAccessLogger(AbstractAccessLogger):
    """One line per request, with tokens shortened and query strings left out."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info(
            '"%s %s" %s %.1fms',
            request.method,
            redact(request.path),
            response.status,
            time * 1000,
        )


def create_app(mailer: Mailer) -> web.Application:
    """The aiohttp application for a running mailer."""
    app = web.Application(middlewares=[errors, security_headers], client_max_size=64 * 1024)
    app[MAILER] = mailer
    app[LIMITER] = KeyedLimiter(mailer.settings.api_rate_per_minute)
    app.add_routes(api.routes)
    app.add_routes(webhooks.routes)
    app.add_routes(public.routes)
    app.add_routes(ops.routes)
    return app


def create_ops_app(mailer: Mailer) -> web.Application:
    """Only ``/healthz`` and ``/metrics``: what a standalone ``mailer worker`` exposes."""
    app = web.Application(middlewares=[errors, security_headers], client_max_size=1024)
    app[MAILER] = mailer
    app.add_routes(ops.routes)
    return app
