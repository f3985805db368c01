"""Operations routes: health and Prometheus metrics. No personal data appears here."""

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from mailer.store.db import ping
from mailer.web.context import mailer_of

routes = web.RouteTableDef()


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    try:
        ok = await mailer_of(request).db.read(ping)
    except Exception:
        ok = False
    if not ok:
        return web.json_response({"status": "unavailable", "database": "down"}, status=503)
    return web.json_response({"status": "ok", "database": "ok"})


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    body = mailer_of(request).metrics.exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
