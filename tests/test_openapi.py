"""The OpenAPI description is kept true: same routes as the app, real answers match it."""

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient, TestServer
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from mailer.bootstrap import open_mailer
from mailer.web.app import create_app
from mailer.web.openapi import SPEC
from tests.conftest import auth, init_db, make_settings
from tests.harness import SinkServer

Client = TestClient[Any, Any]
API = "/api/v1/subscriptions"
OPENAPI = "/api/v1/openapi.json"
# The description does not list the route that serves it; every other /api/ route must appear.
SELF = {(OPENAPI, "get")}
SPEC_URI = "urn:mailer:openapi"
REGISTRY: Registry[Any] = Registry().with_resource(
    SPEC_URI, Resource.from_contents(SPEC, default_specification=DRAFT202012)
)


def _pointer(*parts: str) -> str:
    return "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts)


def documented(path: str, method: str, status: int, media: str) -> Draft202012Validator:
    """The validator for what SPEC documents; fails the test if SPEC documents nothing."""
    operation = SPEC["paths"].get(path, {}).get(method.lower())
    if operation is None:
        pytest.fail(f"{method.upper()} {path} is not in the OpenAPI description")
    response = operation["responses"].get(str(status))
    if response is None:
        pytest.fail(f"{method.upper()} {path} answered {status}, which the SPEC does not document")
    if media not in response.get("content", {}):
        pytest.fail(f"{method.upper()} {path} {status} answered {media}, which is not documented")
    where = _pointer("paths", path, method.lower(), "responses", str(status))
    ref = f"{SPEC_URI}#/{where}/content/{_pointer(media)}/schema"
    return Draft202012Validator({"$ref": ref}, registry=REGISTRY)


async def check(r: ClientResponse, path: str, method: str) -> Any:
    """Validate a real response against the SPEC and return its JSON body."""
    body = await r.json()
    documented(path, method, r.status, r.content_type).validate(body)
    return body


def request_schema(method: str) -> Draft202012Validator:
    where = _pointer("paths", API, method, "requestBody", "content", "application/json")
    return Draft202012Validator({"$ref": f"{SPEC_URI}#/{where}/schema"}, registry=REGISTRY)


@asynccontextmanager
async def slow_mailer(tmp_path: Path, sink: SinkServer) -> AsyncIterator[tuple[Client, str]]:
    """A mailer that allows one API request per minute per key (burst 2)."""
    settings = make_settings(
        tmp_path, smtp_host="127.0.0.1", smtp_port=sink.port, api_rate_per_minute=1
    )
    await init_db(settings)
    async with open_mailer(settings, sending=True) as running:
        await running.lists.create("news", "Example News")
        key = await running.api_keys.create("tests")
        async with TestClient(TestServer(create_app(running))) as http:
            yield http, key


def api_routes(client: Client) -> set[tuple[str, str]]:
    """(path, method) of every route under /api/; HEAD, which aiohttp adds for GET, left out."""
    found = set()
    for route in client.app.router.routes():
        path = route.resource.canonical if route.resource is not None else ""
        if path.startswith("/api/") and route.method != "HEAD":
            found.add((path, route.method.lower()))
    return found


# --- the document itself -----------------------------------------------------------------------


async def test_openapi_json_serves_the_spec(client: Client) -> None:
    """GET /api/v1/openapi.json answers 200 JSON equal to SPEC, an OpenAPI 3.1 document."""
    r = await client.get(OPENAPI)
    assert r.status == 200
    assert r.content_type == "application/json"
    assert await r.json() == json.loads(json.dumps(SPEC))
    assert SPEC["openapi"].startswith("3.1.")
    for schema in SPEC["components"]["schemas"].values():
        Draft202012Validator.check_schema(schema)


async def test_spec_paths_match_the_app_routes(client: Client) -> None:
    """Every /api/ route of the app is in SPEC['paths'] with its methods, and nothing else is."""
    in_app = api_routes(client) - SELF
    in_spec = {
        (path, method)
        for path, item in SPEC["paths"].items()
        for method in item
        if method in {"get", "put", "post", "delete", "patch", "head", "options", "trace"}
    }
    assert in_app, "no /api/ routes found: the walk over the router is broken"
    assert in_app == in_spec


async def test_the_schema_lookup_can_fail(client: Client, api_key: str) -> None:
    """The checks bite: wrong bodies fail their schema, undocumented answers fail the test."""
    with pytest.raises(ValidationError):
        documented(API, "post", 202, "application/json").validate({"status": "done"})
    with pytest.raises(ValidationError):  # through the $ref to components/schemas/Error
        documented(API, "post", 400, "application/json").validate({"error": {"code": "x"}})
    with pytest.raises(pytest.fail.Exception, match="does not document"):
        documented(API, "post", 500, "application/json")
    r = await client.put(API, json={}, headers=auth(api_key))  # a real 405
    assert r.status == 405
    with pytest.raises(pytest.fail.Exception, match="not in the OpenAPI description"):
        await check(r, API, "put")


# --- real answers against the documented schemas -----------------------------------------------

Call = Callable[[Client, str], Awaitable[ClientResponse]]
GOOD = {"email": "ann@example.org", "list": "news"}
JSON = {"Content-Type": "application/json"}


def _call(method: str, **kwargs: Any) -> Call:
    async def call(client: Client, key: str) -> ClientResponse:
        extra = dict(kwargs)
        headers = {**auth(key), **extra.pop("headers", {})}
        r: ClientResponse = await getattr(client, method)(API, headers=headers, **extra)
        return r

    return call


def _no_key(method: str, header: str | None) -> Call:
    async def call(client: Client, key: str) -> ClientResponse:
        headers = {} if header is None else {"Authorization": header}
        r: ClientResponse = await getattr(client, method)(API, json=GOOD, headers=headers)
        return r

    return call


SCENARIOS: dict[str, tuple[str, int, Call]] = {
    "opt-in": ("post", 202, _call("post", json=GOOD)),
    "opt-in-all-fields": (
        "post",
        202,
        _call(
            "post",
            json={**GOOD, "name": "Ann", "source": "form", "ip": "::1", "user_agent": "UA/1"},
        ),
    ),
    "opt-out-list": ("delete", 200, _call("delete", json=GOOD)),
    "opt-out-global": ("delete", 200, _call("delete", json={"email": "ann@example.org"})),
    "opt-in-not-json": ("post", 400, _call("post", data=b"{", headers=JSON)),
    "opt-in-array": ("post", 400, _call("post", json=[GOOD])),
    "opt-in-unknown-field": ("post", 400, _call("post", json={**GOOD, "x": 1})),
    "opt-in-text-plain": ("post", 400, _call("post", data=json.dumps(GOOD))),
    "opt-in-too-large": ("post", 400, _call("post", json={**GOOD, "source": "x" * 20_000})),
    "opt-out-missing-email": ("delete", 400, _call("delete", json={"list": "news"})),
    "opt-out-not-json": ("delete", 400, _call("delete", data=b"[[", headers=JSON)),
    "opt-in-no-key": ("post", 401, _no_key("post", None)),
    "opt-in-malformed-key": ("post", 401, _no_key("post", "Basic abc")),
    "opt-in-unknown-key": ("post", 401, _no_key("post", "Bearer mk_unknown")),
    "opt-out-no-key": ("delete", 401, _no_key("delete", None)),
    "opt-out-unknown-key": ("delete", 401, _no_key("delete", "Bearer mk_unknown")),
    "opt-in-unknown-list": ("post", 404, _call("post", json={**GOOD, "list": "nope"})),
    "opt-out-unknown-list": ("delete", 404, _call("delete", json={**GOOD, "list": "nope"})),
    "opt-in-bad-address": ("post", 422, _call("post", json={**GOOD, "email": "ann@"})),
    "opt-out-bad-address": ("delete", 422, _call("delete", json={"email": "not an address"})),
}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
async def test_real_answers_match_the_spec(
    client: Client, news: str, api_key: str, name: str
) -> None:
    """Each real answer's status is documented for its operation and its body fits the schema."""
    method, status, call = SCENARIOS[name]
    r = await call(client, api_key)
    assert r.status == status, await r.text()
    await check(r, API, method)


@pytest.mark.parametrize("method", ["post", "delete"])
async def test_rate_limited_answer_matches_the_spec(
    tmp_path: Path, sink: SinkServer, method: str
) -> None:
    """The 429 answer (with Retry-After) is documented and its body fits the Error schema."""
    async with slow_mailer(tmp_path, sink) as (client, key):
        call = _call(method, json=GOOD)
        for _ in range(2):  # the burst
            r = await call(client, key)
            assert r.status == {"post": 202, "delete": 200}[method]
            await check(r, API, method)
        r = await call(client, key)
        assert r.status == 429
        assert int(r.headers["Retry-After"]) >= 1
        body = await check(r, API, method)
        assert body["error"]["code"] == "rate_limited"


# --- the documented request schema agrees with the server --------------------------------------

REQUESTS: dict[str, tuple[str, Any]] = {
    "in-minimal": ("post", GOOD),
    "in-nulls": ("post", {**GOOD, "name": None, "source": None, "ip": None, "user_agent": None}),
    "in-longest": ("post", {**GOOD, "name": "N" * 200, "user_agent": "u" * 512, "ip": "192.0.2.1"}),
    "in-name-too-long": ("post", {**GOOD, "name": "N" * 201}),
    "in-source-too-long": ("post", {**GOOD, "source": "s" * 61}),
    "in-agent-too-long": ("post", {**GOOD, "user_agent": "u" * 513}),
    "in-list-empty": ("post", {**GOOD, "list": ""}),
    "in-list-too-long": ("post", {**GOOD, "list": "l" * 65}),
    "in-email-too-long": ("post", {**GOOD, "email": "a" * 1001}),
    "in-extra-field": ("post", {**GOOD, "extra": True}),
    "in-no-list": ("post", {"email": "ann@example.org"}),
    "in-email-number": ("post", {**GOOD, "email": 7}),
    "in-name-number": ("post", {**GOOD, "name": 7}),
    "out-global": ("delete", {"email": "ann@example.org"}),
    "out-list": ("delete", GOOD),
    "out-list-null": ("delete", {"email": "ann@example.org", "list": None}),
    "out-no-email": ("delete", {"list": "news"}),
    "out-extra-field": ("delete", {**GOOD, "name": "Ann"}),
    "out-email-array": ("delete", {"email": ["ann@example.org"]}),
}


@pytest.mark.parametrize("name", sorted(REQUESTS))
async def test_request_schema_agrees_with_the_server(
    client: Client, news: str, api_key: str, name: str
) -> None:
    """A body the SPEC forbids gets 400; a body the server accepts is one the SPEC allows."""
    method, body = REQUESTS[name]
    r = await getattr(client, method)(API, json=body, headers=auth(api_key))
    await check(r, API, method)
    spec_valid = request_schema(method).is_valid(body)
    if not spec_valid:
        assert r.status == 400, f"SPEC forbids {body!r} but the server answered {r.status}"
    if r.status < 300:
        assert spec_valid, f"the server accepted {body!r}, which the SPEC forbids"
