"""Operations routes: health and metrics tell the truth and hold no personal data."""

from typing import Any

from aiohttp.test_utils import TestClient

from mailer.bootstrap import Mailer
from tests.conftest import auth
from tests.harness import SinkServer, wait_until


async def test_healthz(client: TestClient[Any, Any], mailer: Mailer) -> None:
    """200 while the database answers, 503 once it does not."""
    r = await client.get("/healthz")
    assert r.status == 200
    assert await r.json() == {"status": "ok", "database": "ok"}
    await mailer.db.close()
    r = await client.get("/healthz")
    assert r.status == 503
    assert (await r.json())["database"] == "down"


async def test_metrics_count_the_loop_without_addresses(
    client: TestClient[Any, Any], sink: SinkServer, news: str, api_key: str
) -> None:
    """Opt-ins, sent messages and the hand-off histogram show up; no address ever does."""
    r = await client.post(
        "/api/v1/subscriptions",
        json={"email": "metric-person@example.org", "list": news},
        headers=auth(api_key),
    )
    assert r.status == 202
    await wait_until(lambda: len(sink.messages) == 1, what="confirmation request")

    async def sent_counted() -> bool:
        text = await (await client.get("/metrics")).text()
        return 'mailer_messages_total{kind="confirm",state="sent"} 1.0' in text

    await wait_until(sent_counted, what="metrics to count the sent message")
    r = await client.get("/metrics")
    assert r.status == 200
    assert r.content_type == "text/plain"
    text = await r.text()
    assert 'mailer_opt_in_requests_total{outcome="confirmation-requested"} 1.0' in text
    assert "mailer_check_to_handoff_seconds_count 1.0" in text
    assert "metric-person" not in text
    assert "example.org" not in text
