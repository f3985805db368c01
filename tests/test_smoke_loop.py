"""The opt-in loop of the README, through the real API, worker, SMTP and pages."""

from typing import Any

from aiohttp.test_utils import TestClient

from mailer.bootstrap import Mailer
from tests.conftest import auth, links, path_of
from tests.harness import SinkServer, wait_until


async def test_opt_in_confirm_unsubscribe(
    client: TestClient[Any, Any], mailer: Mailer, sink: SinkServer, news: str, api_key: str
) -> None:
    """API opt-in -> confirmation mail -> POST confirm -> one-click unsubscribe."""
    r = await client.post(
        "/api/v1/subscriptions",
        json={"email": "Ann@Example.org", "list": news},
        headers=auth(api_key),
    )
    assert r.status == 202
    assert await r.json() == {"status": "pending"}
    await wait_until(lambda: len(sink.messages) == 1, what="confirmation request")
    found = links(sink.messages[0])
    assert (await client.post(path_of(found["confirm"]))).status == 200
    person = await mailer.people.show("ann@example.org")
    assert [s.status for s in person.subscriptions] == ["confirmed"]
    r = await client.post(path_of(found["unsubscribe"]), data={"List-Unsubscribe": "One-Click"})
    assert r.status == 200
    person = await mailer.people.show("ann@example.org")
    assert [s.status for s in person.subscriptions] == ["unsubscribed"]
    assert person.suppression == "unsubscribed"
