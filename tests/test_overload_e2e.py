"""Overload recovery as users meet it: a ``kensho up`` subprocess hit by a burst."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import openai
import pytest

from _http_support import metric, status_events_until
from _server_support import kensho_env, kensho_up

pytestmark = pytest.mark.slow

# One slot, a queue of 2, ~0.25 s per 5-token task on the mock GPU, and a hard open
# whose upper bound (600 s) is far beyond the test's life: only the drain can end it.
OVERLOAD_ENV = {
    "KENSHO_MODEL_ENGINE": "mock",
    "KENSHO_MODEL_ID": "mock",
    "KENSHO_MODEL_MOCK_TIME_TO_FIRST_TOKEN": "0.05",
    "KENSHO_MODEL_MOCK_TIME_PER_TOKEN": "0.05",
    "KENSHO_RUNTIME_MAX_QUEUE_SIZE": "2",
    "KENSHO_RUNTIME_CONCURRENCY": "gpu=1,cpu=1",
    "KENSHO_RUNTIME_HARD_OPEN_DURATION": "600",
}
BODY = {"model": "mock", "prompt": "x", "max_tokens": 5}


def test_after_a_burst_drains_new_requests_are_admitted_at_once(tmp_path: Path) -> None:
    with kensho_up(env=kensho_env(tmp_path, **OVERLOAD_ENV), cwd=tmp_path) as server:

        async def burst() -> list[httpx.Response]:
            limits = httpx.Limits(max_connections=40)
            async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=60) as c:
                return await asyncio.gather(
                    *(c.post("/v1/completions", json=BODY) for _ in range(40))
                )

        responses = asyncio.run(burst())
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 429}
        refused = [r for r in responses if r.status_code == 429]
        overloaded = [r for r in refused if r.json()["error"]["code"] == "queue_overloaded"]
        assert overloaded, "the burst should have put the executor in its hard open"
        # Honest estimates (a few queued tasks of well under a second), never the
        # 600 s upper bound nor a fixed cool-down.
        assert max(int(r.headers["Retry-After"]) for r in refused) <= 3

        events = status_events_until(server.url, "executor.recovered")
        kinds = [e["kind"] for e in events]
        assert "executor.overloaded" in kinds
        assert "queue down to 0" in str(events[-1]["reason"])
        text = httpx.get(server.url + "/metrics").text
        assert metric(text, "kensho_executor_overloaded") == 0.0

        # The queue has drained: a new request is served, not refused for 600 s.
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        reply = client.completions.create(model="mock", prompt="x", max_tokens=5)
        assert reply.usage is not None
        assert reply.usage.completion_tokens == 5
        assert codes.count(200) >= 3


def test_forced_open_engines_answer_503_with_a_short_retry_after(tmp_path: Path) -> None:
    with kensho_up(env=kensho_env(tmp_path, **OVERLOAD_ENV), cwd=tmp_path) as server:
        for engine in ("primary", "fallback"):
            forced = httpx.post(
                server.url + "/v1/kensho/breaker", json={"action": "force_open", "engine": engine}
            )
            assert forced.json()["state"] == "forced_open"
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.InternalServerError) as refused:
            client.completions.create(model="mock", prompt="x", max_tokens=5)
        assert refused.value.status_code == 503
        # No probe is due on a forced-open breaker: no made-up 60 s sleep per retry.
        assert refused.value.response.headers["Retry-After"] == "1"
        assert "until an operator resets one" in refused.value.message
        httpx.post(
            server.url + "/v1/kensho/breaker", json={"action": "reset", "engine": "fallback"}
        )
        reply = client.completions.create(model="mock", prompt="x", max_tokens=5)
        assert reply.usage is not None
        assert reply.usage.completion_tokens == 5
