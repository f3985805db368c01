"""The subscriber's pages. GET shows a button and changes nothing; POST acts (G1, RFC 8058)."""

from typing import Any

from aiohttp import web
from markupsafe import Markup

from mailer.domain.ledger import Evidence
from mailer.errors import BadToken
from mailer.statuses import Channel
from mailer.web.context import mailer_of, request_ip, request_user_agent

routes = web.RouteTableDef()
SUBSCRIBER = "subscriber"


def page(request: web.Request, name: str, status: int = 200, **context: Any) -> web.Response:
    html = mailer_of(request).renderer.page(name, context)
    return web.Response(text=html, status=status, content_type="text/html", charset="utf-8")


def _evidence(request: web.Request, channel: Channel) -> Evidence:
    return Evidence(
        channel=channel.value,
        actor=SUBSCRIBER,
        ip=request_ip(request),
        user_agent=request_user_agent(request),
    )


def _bad_link(request: web.Request, exc: BadToken) -> web.Response:
    return page(request, "error", status=400, title="This link does not work", message=exc.message)


@routes.get("/confirm/{token}")
async def confirm_page(request: web.Request) -> web.Response:
    try:
        info = await mailer_of(request).consent.describe_confirm(request.match_info["token"])
    except BadToken as exc:
        return _bad_link(request, exc)
    return page(request, "confirm", list_name=info.list_name)


@routes.post("/confirm/{token}")
async def confirm(request: web.Request) -> web.Response:
    try:
        list_name = await mailer_of(request).consent.confirm(
            request.match_info["token"], _evidence(request, Channel.PAGE)
        )
    except BadToken as exc:
        return _bad_link(request, exc)
    return page(request, "confirmed", list_name=list_name)


@routes.get("/unsubscribe/{token}")
async def unsubscribe_page(request: web.Request) -> web.Response:
    try:
        info = await mailer_of(request).consent.describe_unsubscribe(request.match_info["token"])
    except BadToken as exc:
        return _bad_link(request, exc)
    return page(request, "unsubscribe", list_name=info.list_name, is_global=info.is_global)


@routes.post("/unsubscribe/{token}")
async def unsubscribe(request: web.Request) -> web.Response:
    """One-click (RFC 8058 body, urlencoded or multipart) or the page's form. Always 200."""
    form = await request.post()
    one_click = form.get("List-Unsubscribe") == "One-Click"
    everything = form.get("scope") == "all"
    channel = Channel.ONE_CLICK if one_click else Channel.PAGE
    try:
        done = await mailer_of(request).consent.unsubscribe_link(
            request.match_info["token"], everything, _evidence(request, channel)
        )
    except BadToken as exc:
        return _bad_link(request, exc)
    return page(request, "unsubscribed", list_name=done.list_name, is_global=done.is_global)


@routes.get("/privacy")
async def privacy(request: web.Request) -> web.Response:
    """The policy in force and the public history of every change (seed policy: changes are
    publicly announced and apply going forward only)."""
    mailer = mailer_of(request)
    history = await mailer.policy.history()
    today = mailer.clock.now().date()
    versions = [
        {
            "version": v.version,
            "effective_on": v.effective_on,
            "upcoming": v.effective_on > today,
            "summary_html": Markup(mailer.renderer.markdown(v.summary)),  # noqa: S704
            "url": v.url,
        }
        for v in reversed(history)
    ]
    current = next((v for v in versions if not v["upcoming"]), None)
    return page(request, "privacy", current=current, versions=versions)
