"""The HTTP API in process (httpx over ASGI), on fault-injecting engines and virtual time.

End-to-end tests against a real ``kensho up`` subprocess are in test_server_e2e.py.
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from starlette.types import ASGIApp, Message

from _http_support import assert_shutting_down, metric, sse_data
from _otlp_support import Collector
from kensho.config import LogSettings, TelemetrySettings
from kensho.runtime.clock import VirtualClock
from kensho.runtime.engines.faulty import MockCPUEngine, MockGPUEngine
from kensho.runtime.executor import TaskExecutor
from kensho.runtime.manager import RuntimeManager
from kensho.server import Drain, IntegrityState, ServerContext, create_app
from kensho.telemetry import LoggerService

MODEL = "mock-model"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 5}


@dataclass
class Stack:
    client: httpx.AsyncClient
    ctx: ServerContext
    gpu: MockGPUEngine
    cpu: MockCPUEngine
    clock: VirtualClock
    app: ASGIApp


async def make_stack(**ctx_options: object) -> tuple[Stack, RuntimeManager, TaskExecutor]:
    clock = VirtualClock()
    gpu = MockGPUEngine(clock=clock, time_to_first_token=0, time_per_token=0)
    cpu = MockCPUEngine(clock=clock, time_to_first_token=0, time_per_token=0)
    runtime = RuntimeManager(gpu, cpu, clock=clock)
    await runtime.start()
    executor = TaskExecutor(
        runtime, clock=clock, max_queue_size=2, concurrency={"gpu": 1, "cpu": 1}
    )
    ctx = ServerContext(
        runtime=runtime,
        executor=executor,
        hub=executor.hub,
        model_id=MODEL,
        drain=Drain(clock=clock),
        **ctx_options,  # type: ignore[arg-type]
    )
    app = create_app(ctx)
    client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://localhost:8000"
    )
    return Stack(client, ctx, gpu, cpu, clock, app), runtime, executor


@pytest.fixture
async def stack() -> AsyncIterator[Stack]:
    s, runtime, executor = await make_stack()
    yield s
    await s.client.aclose()
    await executor.aclose()
    await runtime.close()


@pytest.fixture
async def keyed() -> AsyncIterator[Stack]:
    s, runtime, executor = await make_stack(api_key="sekrit", host="0.0.0.0")
    yield s
    await s.client.aclose()
    await executor.aclose()
    await runtime.close()


async def test_chat_completion(stack: Stack) -> None:
    r = await stack.client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == MODEL
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert len(body["choices"][0]["message"]["content"].split()) == 5
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 5


async def test_text_completion_stream_ends_with_done(stack: Stack) -> None:
    r = await stack.client.post(
        "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 3, "stream": True}
    )
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    data = sse_data(r.text)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks).split().__len__() == 3
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


async def test_chat_stream_with_usage(stack: Stack) -> None:
    payload = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    r = await stack.client.post("/v1/chat/completions", json=payload)
    chunks = [json.loads(d) for d in sse_data(r.text)[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 5


async def test_models_lists_the_served_model(stack: Stack) -> None:
    r = await stack.client.get("/v1/models")
    assert [m["id"] for m in r.json()["data"]] == [MODEL]


async def test_unknown_model_is_404_openai_style(stack: Stack) -> None:
    r = await stack.client.post("/v1/chat/completions", json={**CHAT, "model": "gpt-9"})
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "model_not_found"


async def test_invalid_json_is_400(stack: Stack) -> None:
    r = await stack.client.post(
        "/v1/chat/completions", content=b'{"model": ', headers={"content-type": "application/json"}
    )
    assert r.status_code == 400
    assert "not valid JSON" in r.json()["error"]["message"]


async def test_invalid_field_is_400_naming_it(stack: Stack) -> None:
    r = await stack.client.post("/v1/chat/completions", json={**CHAT, "temperature": 9})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "temperature"


async def test_n_greater_than_one_is_refused(stack: Stack) -> None:
    r = await stack.client.post("/v1/chat/completions", json={**CHAT, "n": 2})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "n"


async def test_non_text_content_is_refused(stack: Stack) -> None:
    message = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
    r = await stack.client.post("/v1/chat/completions", json={**CHAT, "messages": [message]})
    assert r.status_code == 400
    assert "image_url" in r.json()["error"]["message"]


async def test_oversize_body_is_413(stack: Stack) -> None:
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * (2 << 20)}]}
    r = await stack.client.post("/v1/chat/completions", json=big)
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "body_too_large"


async def test_bad_priority_header_is_400(stack: Stack) -> None:
    r = await stack.client.post(
        "/v1/chat/completions", json=CHAT, headers={"X-Kensho-Priority": "urgent"}
    )
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "x-kensho-priority"


async def test_full_queue_is_429_with_retry_after(stack: Stack) -> None:
    stack.gpu.hang()  # every task now waits forever: the queue fills up
    pending = [
        asyncio.create_task(stack.client.post("/v1/chat/completions", json=CHAT)) for _ in range(3)
    ]
    await stack.clock.settle()
    r = await stack.client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 429
    assert int(r.headers["Retry-After"]) >= 1
    assert r.json()["error"]["type"] == "rate_limit_error"
    assert r.json()["error"]["code"] == "queue_rejected"
    stack.gpu.heal()
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    metrics = (await stack.client.get("/metrics")).text
    assert 'kensho_rejections_total{reason="rejected"} 1.0' in metrics


async def test_critical_request_sheds_a_queued_low_one(stack: Stack) -> None:
    stack.gpu.hang()
    low = {"X-Kensho-Priority": "low"}
    running = asyncio.create_task(stack.client.post("/v1/chat/completions", json=CHAT))
    await stack.clock.settle()
    queued = [
        asyncio.create_task(stack.client.post("/v1/chat/completions", json=CHAT, headers=low))
        for _ in range(2)
    ]
    await stack.clock.settle()
    critical = asyncio.create_task(
        stack.client.post(
            "/v1/chat/completions", json=CHAT, headers={"X-Kensho-Priority": "critical"}
        )
    )
    await stack.clock.settle()
    done, waiting = await asyncio.wait(queued, return_when=asyncio.FIRST_COMPLETED)
    assert len(done) == 1  # exactly one LOW task made room for the CRITICAL one
    shed = done.pop().result()
    assert shed.status_code == 429
    assert shed.json()["error"]["code"] == "queue_shed"
    assert not critical.done()  # the CRITICAL task was accepted and waits its turn
    others = [running, critical, *waiting]
    for task in others:
        task.cancel()
    await asyncio.gather(*others, return_exceptions=True)


async def test_no_engine_available_is_503(stack: Stack) -> None:
    stack.ctx.runtime.primary_breaker.force_open()
    assert stack.ctx.runtime.fallback_breaker is not None
    stack.ctx.runtime.fallback_breaker.force_open()
    r = await stack.client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 503
    assert "Retry-After" in r.headers


async def test_primary_failure_is_invisible_and_counted(stack: Stack) -> None:
    stack.gpu.force_failure(times=1)
    r = await stack.client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200
    metrics = (await stack.client.get("/metrics")).text
    assert 'kensho_breaker_calls_total{engine="gpu",kind="failed"} 1.0' in metrics
    assert 'kensho_runtime_requests_total{route="rerouted"} 1.0' in metrics


async def test_healthz_and_readyz(stack: Stack) -> None:
    assert (await stack.client.get("/healthz")).json() == {"status": "ok"}
    ready = await stack.client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["ready"] is True
    assert ready.json()["breakers"] == {"gpu": "closed", "cpu": "closed"}
    stack.ctx.integrity = IntegrityState(status="degraded", problems={"extra.bin": "missing"})
    assert (await stack.client.get("/readyz")).json()["degraded"] is True


async def test_readyz_is_503_when_no_engine_admits(stack: Stack) -> None:
    stack.ctx.runtime.primary_breaker.force_open()
    assert stack.ctx.runtime.fallback_breaker is not None
    stack.ctx.runtime.fallback_breaker.force_open()
    assert (await stack.client.get("/readyz")).status_code == 503


async def test_metrics_expose_state_and_counters(stack: Stack) -> None:
    await stack.client.post("/v1/chat/completions", json=CHAT)
    text = (await stack.client.get("/metrics")).text
    assert 'kensho_breaker_state{engine="gpu",state="closed"} 1.0' in text
    assert 'kensho_queue_depth{priority="critical"} 0.0' in text
    assert 'kensho_tokens_generated_total{engine="gpu"} 5.0' in text
    assert "kensho_time_to_first_token_seconds_bucket" in text
    assert "kensho_request_latency_seconds_count" in text
    assert 'kensho_tasks_total{outcome="completed"} 1.0' in text


async def test_metrics_count_otlp_export_per_signal(tmp_path: Path) -> None:
    """A real collector: what reached it, then what was spooled once it went away."""
    service = LoggerService()
    collector = Collector()
    collector.start()
    service.configure(
        LogSettings(),
        stream=io.StringIO(),
        capture_stdlib=False,
        telemetry=TelemetrySettings(
            endpoint=collector.endpoint, spool_dir=tmp_path, retry_interval=60
        ),
    )
    s, runtime, executor = await make_stack(export_stats=service.export_stats)
    try:
        with service.span("kensho.test"):
            service.get_logger("x").info("sent")
        service.flush_export()
        collector.stop()
        service.get_logger("x").info("spooled")
        service.flush_export()
        text = (await s.client.get("/metrics")).text
    finally:
        collector.stop()
        service.close()
        await s.client.aclose()
        await executor.aclose()
        await runtime.close()
    assert 'kensho_otlp_exported_total{signal="logs"} 1.0' in text
    assert 'kensho_otlp_exported_total{signal="traces"} 1.0' in text
    assert 'kensho_otlp_spooled_total{signal="logs"} 1.0' in text
    assert 'kensho_otlp_export_errors_total{signal="logs"} 1.0' in text
    assert 'kensho_otlp_dropped_total{reason="queue_full",signal="logs"} 0.0' in text
    assert 'kensho_otlp_queue_depth{signal="logs"} 0.0' in text


async def test_metrics_leave_out_otlp_series_while_export_is_off() -> None:
    s, runtime, executor = await make_stack(export_stats=LoggerService().export_stats)
    try:
        text = (await s.client.get("/metrics")).text
    finally:
        await s.client.aclose()
        await executor.aclose()
        await runtime.close()
    assert "kensho_otlp_" not in text


async def test_admin_breaker_force_open_and_reset(stack: Stack) -> None:
    r = await stack.client.post("/v1/kensho/breaker", json={"action": "force_open"})
    assert r.json() == {"engine": "primary", "state": "forced_open"}
    served = await stack.client.post("/v1/chat/completions", json=CHAT)
    assert served.status_code == 200
    assert stack.cpu.stats().completed == 1
    r = await stack.client.post("/v1/kensho/breaker", json={"action": "reset"})
    assert r.json()["state"] == "closed"


async def test_admin_inject_primary_failures(stack: Stack) -> None:
    r = await stack.client.post("/v1/kensho/breaker", json={"action": "fail_primary", "times": 3})
    assert r.status_code == 200
    for _ in range(3):
        assert (await stack.client.post("/v1/chat/completions", json=CHAT)).status_code == 200
    assert str(stack.ctx.runtime.primary_breaker.state) == "open"


async def test_verify_without_store_is_404(stack: Stack) -> None:
    r = await stack.client.post("/v1/kensho/verify")
    assert r.status_code == 404


async def test_api_key_guards_the_api_and_admin_but_not_the_probes(keyed: Stack) -> None:
    # vLLM's split: orchestrator probes and Prometheus scrapes need no token.
    for probe in ("/healthz", "/readyz", "/metrics"):
        assert (await keyed.client.get(probe)).status_code == 200, probe
    denied = await keyed.client.get("/v1/models")
    assert denied.status_code == 401
    assert denied.json()["error"]["code"] == "invalid_api_key"
    wrong = await keyed.client.get("/v1/models", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    ok = await keyed.client.get("/v1/models", headers={"Authorization": "Bearer sekrit"})
    assert ok.status_code == 200
    for admin in ("/v1/kensho/breaker", "/v1/kensho/verify"):
        assert (await keyed.client.post(admin, json={"action": "reset"})).status_code == 401
    assert (await keyed.client.get("/v1/kensho/status")).status_code == 401
    assert (await keyed.client.post("/v1/chat/completions", json=CHAT)).status_code == 401


async def test_protect_metrics_puts_the_probes_behind_the_key_too() -> None:
    s, runtime, executor = await make_stack(api_key="sekrit", protect_metrics=True)
    auth = {"Authorization": "Bearer sekrit"}
    try:
        for probe in ("/healthz", "/readyz", "/metrics"):
            denied = await s.client.get(probe)
            assert denied.status_code == 401, probe
            assert denied.json()["error"]["code"] == "invalid_api_key"
            assert (await s.client.get(probe, headers=auth)).status_code == 200, probe
    finally:
        await s.client.aclose()
        await executor.aclose()
        await runtime.close()


async def test_admin_refused_on_public_address_without_key() -> None:
    s, runtime, executor = await make_stack(host="0.0.0.0")
    try:
        r = await s.client.post("/v1/kensho/breaker", json={"action": "reset"})
        assert r.status_code == 403
        assert r.json()["error"]["code"] == "admin_disabled"
    finally:
        await s.client.aclose()
        await executor.aclose()
        await runtime.close()


async def test_draining_server_refuses_new_completions(stack: Stack) -> None:
    stack.ctx.begin_shutdown()
    r = await stack.client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "draining"
    assert (await stack.client.get("/readyz")).status_code == 503


async def test_drain_refuses_waiting_work_at_once_and_lets_the_stream_finish(
    stack: Stack,
) -> None:
    stack.gpu.time_per_token = 1.0  # virtual seconds: nothing moves until the test says
    stream = asyncio.create_task(
        stack.client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    )
    await stack.clock.settle()
    queued = asyncio.create_task(stack.client.post("/v1/chat/completions", json=CHAT))
    await stack.clock.settle()
    assert stack.ctx.executor.statistics().queued_total == 1
    before = stack.clock.monotonic()
    finishing = asyncio.create_task(stack.ctx.drain.finish(30.0, grace=1.0))
    await stack.clock.settle()
    # Refused at once: no virtual time passed, the stream has not moved.
    assert queued.done()
    assert_shutting_down(queued.result(), "draining")
    assert stack.clock.monotonic() == before
    assert not stream.done()
    late = await stack.client.post("/v1/completions", json={"model": MODEL, "prompt": "x"})
    assert_shutting_down(late, "draining")
    assert (
        await stack.client.post("/v1/kensho/breaker", json={"action": "reset"})
    ).status_code == 503
    assert (await stack.client.get("/healthz")).status_code == 200
    ready = await stack.client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["draining"] is True
    assert (await stack.client.get("/metrics")).status_code == 200
    await stack.clock.advance(5.0)  # the stream's remaining 4 tokens
    data = sse_data((await stream).text)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert "error" not in chunks[-1]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert await finishing is True  # a clean drain
    assert stack.ctx.executor.statistics().completed == 1


async def test_drain_timeout_ends_a_stream_with_an_error_event_then_done(stack: Stack) -> None:
    stack.gpu.time_per_token = 1.0
    long = {**CHAT, "max_tokens": 100, "stream": True}
    stream = asyncio.create_task(stack.client.post("/v1/chat/completions", json=long))
    await stack.clock.settle()
    finishing = asyncio.create_task(stack.ctx.drain.finish(3.0, grace=1.0))
    await stack.clock.advance(3.0)
    r = await stream
    assert r.status_code == 200  # the stream had started: it ends in-band
    data = sse_data(r.text)
    assert data[-1] == "[DONE]"
    last = json.loads(data[-2])
    assert last["error"]["code"] == "shutdown"
    assert "shutting down" in last["error"]["message"]
    tokens = [json.loads(d) for d in data[1:-2]]
    assert 1 <= len(tokens) < 100  # the tokens produced before the cut were delivered
    assert await finishing is False  # cut short: kensho up exits 128 + signal
    assert stack.ctx.executor.statistics().cancelled == 1


async def test_drain_timeout_answers_a_whole_answer_in_progress_with_503(stack: Stack) -> None:
    stack.gpu.time_per_token = 1.0
    whole = asyncio.create_task(
        stack.client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 100})
    )
    await stack.clock.settle()
    finishing = asyncio.create_task(stack.ctx.drain.finish(3.0, grace=1.0))
    await stack.clock.advance(3.0)
    assert_shutting_down(await whole, "shutdown")
    assert await finishing is False


async def test_second_signal_cut_off_ends_streams_without_waiting(stack: Stack) -> None:
    stack.gpu.time_per_token = 1.0
    long = {**CHAT, "max_tokens": 100, "stream": True}
    stream = asyncio.create_task(stack.client.post("/v1/chat/completions", json=long))
    await stack.clock.settle()
    finishing = asyncio.create_task(stack.ctx.drain.finish(60.0, grace=1.0))
    await stack.clock.settle()
    stack.ctx.drain.cut_off("second signal (SIGINT)")
    await stack.clock.settle()
    data = sse_data((await stream).text)
    assert data[-1] == "[DONE]"
    assert json.loads(data[-2])["error"]["code"] == "shutdown"
    assert await finishing is False
    assert stack.clock.monotonic() < 60.0


async def test_request_cancelled_at_a_forced_exit_gets_503_not_a_dump(stack: Stack) -> None:
    never = asyncio.Event()

    async def stuck_verify() -> IntegrityState:
        await never.wait()
        return IntegrityState()

    stack.ctx.verify = stuck_verify
    call = asyncio.create_task(stack.client.post("/v1/kensho/verify"))
    await stack.clock.settle()
    stack.ctx.drain.cut_off("second signal (SIGTERM)")
    call.cancel()  # what uvicorn does to the tasks still running after its grace
    assert_shutting_down(await call, "draining")


async def test_keyless_server_refuses_other_web_origins(stack: Stack) -> None:
    evil = await stack.client.post("/v1/kensho/verify", headers={"Origin": "http://evil.example"})
    assert evil.status_code == 403
    assert evil.json()["error"]["code"] == "origin_refused"
    local_ui = await stack.client.get("/v1/models", headers={"Origin": "http://localhost:3000"})
    assert local_ui.status_code == 200


async def test_keyless_loopback_server_refuses_rebound_host_names(stack: Stack) -> None:
    rebound = await stack.client.get("/v1/models", headers={"Host": "attacker.example:8000"})
    assert rebound.status_code == 403
    assert "Host" in rebound.json()["error"]["message"]
    for host in ("127.0.0.1:8000", "[::1]:8000", "localhost"):
        assert (await stack.client.get("/v1/models", headers={"Host": host})).status_code == 200
    assert (await stack.client.get("/healthz", headers={"Host": "x.example"})).status_code == 200


async def test_wrong_method_is_405_with_allow(stack: Stack) -> None:
    r = await stack.client.get("/v1/chat/completions")
    assert r.status_code == 405
    assert r.json()["error"]["code"] == "method_not_allowed"
    assert r.headers["allow"] == "POST"


class AsgiCall:
    """One request straight to the app (ASGI), recording what it sends; it can hang up
    when it likes (httpx over ASGI waits for the end of a response first)."""

    def __init__(self, app: ASGIApp, method: str, path: str, body: object = None) -> None:
        self.sent: asyncio.Queue[Message] = asyncio.Queue()
        self.gone = asyncio.Event()
        self._body = b"" if body is None else json.dumps(body).encode()
        self._asked = False
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
            "method": method, "scheme": "http", "path": path, "raw_path": path.encode(),
            "query_string": b"", "root_path": "", "headers": [(b"host", b"localhost")],
            "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000),
        }  # fmt: skip
        self.task = asyncio.ensure_future(app(scope, self._receive, self.sent.put))

    async def _receive(self) -> Message:
        if not self._asked:
            self._asked = True
            return {"type": "http.request", "body": self._body, "more_body": False}
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def hang_up(self) -> None:
        self.gone.set()
        await self.task  # the app ends the request without an error


class StatusClient(AsgiCall):
    """A status-stream client on the app itself."""

    def __init__(self, app: ASGIApp) -> None:
        super().__init__(app, "GET", "/v1/kensho/status")

    async def next_event(self, kind: str) -> dict[str, object]:
        """The data of the next event of ``kind`` (earlier ones are skipped)."""
        while True:
            message = await self.sent.get()
            body = message.get("body", b"").decode()
            if body.startswith(f"event: {kind}\n"):
                return json.loads(sse_data(body)[0])  # type: ignore[no-any-return]


async def test_stream_opening_event_goes_out_with_the_first_token(stack: Stack) -> None:
    stack.gpu.time_per_token = 1.0  # virtual seconds: only the first token comes now
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 3, "stream": True}
    call = AsgiCall(stack.app, "POST", "/v1/completions", body)
    start = await call.sent.get()
    assert start["type"] == "http.response.start"
    assert start["status"] == 200
    first = sse_data((await call.sent.get())["body"].decode())
    assert [json.loads(d)["choices"][0]["text"] for d in first] == ["", "token "]
    await call.hang_up()


async def test_client_leaving_mid_stream_cancels_its_task_and_frees_the_slot(
    stack: Stack,
) -> None:
    stack.gpu.time_per_token = 1.0
    long = {**CHAT, "max_tokens": 100, "stream": True}
    call = AsgiCall(stack.app, "POST", "/v1/chat/completions", long)
    assert (await call.sent.get())["status"] == 200
    await call.sent.get()  # the opening event and the first token
    await call.hang_up()
    await stack.clock.settle()
    stats = stack.ctx.executor.statistics()
    assert (stats.cancelled, stats.completed, stats.in_flight_total) == (1, 0, 0)
    assert stack.ctx.drain._requests == 0
    stack.gpu.time_per_token = 0
    r = await stack.client.post("/v1/chat/completions", json=CHAT)  # the slot is free
    assert r.status_code == 200


async def test_client_leaving_before_its_first_token_cancels_its_queued_task(
    stack: Stack,
) -> None:
    stack.gpu.time_per_token = 1.0
    long = {**CHAT, "max_tokens": 100, "stream": True}
    running = AsgiCall(stack.app, "POST", "/v1/chat/completions", long)
    assert (await running.sent.get())["status"] == 200
    waiting = AsgiCall(stack.app, "POST", "/v1/chat/completions", {**CHAT, "stream": True})
    await stack.clock.settle()
    assert stack.ctx.executor.statistics().queued_total == 1
    await waiting.hang_up()
    assert (await waiting.sent.get())["status"] == 499  # in the access log; nobody reads it
    stats = stack.ctx.executor.statistics()
    assert (stats.queued_total, stats.cancelled, stats.in_flight_total) == (0, 1, 1)
    text = (await stack.client.get("/metrics")).text
    gone = 'kensho_http_requests_total{endpoint="/v1/chat/completions",status="499"}'
    assert metric(text, gone) == 1
    await running.hang_up()


async def test_client_leaving_a_whole_answer_cancels_its_task(stack: Stack) -> None:
    stack.gpu.time_per_token = 1.0
    call = AsgiCall(stack.app, "POST", "/v1/chat/completions", {**CHAT, "max_tokens": 100})
    await stack.clock.settle()
    assert stack.ctx.executor.statistics().in_flight_total == 1
    await call.hang_up()
    await stack.clock.settle()
    stats = stack.ctx.executor.statistics()
    assert (stats.cancelled, stats.in_flight_total) == (1, 0)
    start = await call.sent.get()
    assert start["status"] == 499  # in the access log and metrics; nobody reads it


async def test_status_stream_replays_follows_and_unsubscribes_when_the_client_leaves(
    stack: Stack,
) -> None:
    forced = await stack.client.post("/v1/kensho/breaker", json={"action": "force_open"})
    assert forced.status_code == 200
    before = stack.ctx.hub.subscribers
    client = StatusClient(stack.app)
    assert (await client.next_event("snapshot"))["model"] == MODEL
    replayed = await client.next_event("breaker.state_changed")  # emitted before it came
    assert replayed["to_state"] == "forced_open"
    assert stack.ctx.hub.subscribers == before + 1
    await stack.client.post("/v1/kensho/breaker", json={"action": "reset"})
    live = await client.next_event("breaker.state_changed")
    assert live["from_state"] == "forced_open"
    await client.hang_up()
    await stack.clock.settle()
    assert stack.ctx.hub.subscribers == before  # the hub subscription ended with it


async def test_status_stream_ends_with_a_shutdown_event_when_the_server_stops(
    stack: Stack,
) -> None:
    before = stack.ctx.hub.subscribers
    client = StatusClient(stack.app)
    await client.next_event("snapshot")
    stack.ctx.drain.begin()
    assert (await client.next_event("shutdown"))["kind"] == "shutdown"
    await client.hang_up()
    await stack.clock.settle()
    assert stack.ctx.hub.subscribers == before


async def test_cut_off_responses_get_the_grace_to_write_their_end() -> None:
    """After the cut-off, ``finish`` waits up to ``grace`` for the cut responses to end
    (their final SSE event), whether the drain timed out or a second signal cut it."""
    for second_signal in (False, True):
        clock = VirtualClock()
        drain = Drain(clock=clock)
        request = drain.request()
        request.__enter__()  # one response still writing
        finishing = asyncio.ensure_future(drain.finish(10, grace=2))
        await clock.advance(0)
        if second_signal:
            drain.cut_off("second signal")
        else:
            await clock.advance(10)  # shutdown_timeout passed
        await clock.advance(1)
        assert not finishing.done(), "finish() stopped waiting for the cut-off response"
        request.__exit__(None, None, None)  # it wrote its error event and [DONE]
        await clock.advance(0)
        assert finishing.done() and finishing.result() is False


async def test_a_stream_read_behind_its_engine_counts_every_token(stack: Stack) -> None:
    # The mock engine never waits, so its tokens pile up in the task's buffer before
    # the response reads them: they go out merged, in fewer events, none lost.
    payload = {**CHAT, "max_tokens": 40, "stream": True, "stream_options": {"include_usage": True}}
    r = await stack.client.post("/v1/chat/completions", json=payload)
    events = [json.loads(d) for d in sse_data(r.text)[:-1]]
    deltas = [e["choices"][0]["delta"].get("content", "") for e in events if e["choices"]]
    whole = await stack.client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 40})
    assert "".join(deltas) == whole.json()["choices"][0]["message"]["content"]
    assert events[-1]["usage"]["completion_tokens"] == 40
    assert whole.json()["usage"]["completion_tokens"] == 40
    assert len(deltas) < 40  # merged: one event per token read, not per token made
