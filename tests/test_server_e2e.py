"""``kensho up`` as a real subprocess, spoken to with the official ``openai`` client and httpx."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import httpx
import openai
import pytest

from _http_support import (
    assert_shutting_down,
    metric,
    sse_events,
    wait_for_metric,
    wait_for_queue_depth,
)
from _server_support import Server, kensho_env, kensho_up, run_kensho

pytestmark = pytest.mark.slow

DEMO = "kensho-demo"
MOCK_ENV = {
    "KENSHO_MODEL_ENGINE": "mock",
    "KENSHO_MODEL_ID": "mock",
    "KENSHO_MODEL_MOCK_TIME_TO_FIRST_TOKEN": "0.01",
    "KENSHO_MODEL_MOCK_TIME_PER_TOKEN": "0.005",
}


def test_demo_model_with_the_openai_client(tmp_path: Path) -> None:
    with kensho_up(env=kensho_env(tmp_path), cwd=tmp_path) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
        assert [m.id for m in client.models.list()] == [DEMO]
        reply = client.chat.completions.create(
            model=DEMO,
            messages=[{"role": "user", "content": "Say hello."}],
            max_tokens=80,
            temperature=0,
        )
        assert reply.choices[0].message.content is not None
        assert "Hello!" in reply.choices[0].message.content
        assert reply.choices[0].finish_reason == "stop"
        stream = client.chat.completions.create(
            model=DEMO,
            messages=[{"role": "user", "content": "Where did they eat?"}],
            max_tokens=40,
            temperature=0,
            stream=True,
        )
        pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
        # The opening delta, the first token alone (time to first token), then the
        # rest as fast as this client reads: tokens that wait for it come merged.
        assert len(pieces) >= 3 and pieces[0] == ""
        assert "".join(pieces) == " In the café by the river. They had crème brûlée."
        text = client.completions.create(model=DEMO, prompt="The GPU", max_tokens=8, temperature=0)
        assert text.choices[0].text.startswith(" is fast.")
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(
                model="gpt-4", messages=[{"role": "user", "content": "hi"}]
            )
        with pytest.raises(openai.BadRequestError) as too_long:
            client.completions.create(model=DEMO, prompt="word " * 400, max_tokens=4)
        assert too_long.value.code == "context_length_exceeded"
        metrics = httpx.get(server.url + "/metrics").text
        assert metric(metrics, 'kensho_breaker_state{engine="cpu",state="closed"}') == 1.0
        ready = httpx.get(server.url + "/readyz").json()
        assert ready["integrity"]["status"] == "ok"
        assert ready["integrity"]["files"] == {"ok": 8}
        # No CUDA here: the service says so and serves on the CPU fallback.
        assert ready["active_engine"] == "cpu"


def test_api_key_and_raw_bodies(tmp_path: Path) -> None:
    env = kensho_env(tmp_path, **MOCK_ENV, KENSHO_API_KEY="k-1234567")
    with kensho_up(env=env, cwd=tmp_path) as server:
        assert httpx.get(server.url + "/healthz").status_code == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.url + "/v1", api_key="wrong").models.list()
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="k-1234567")
        reply = client.chat.completions.create(
            model="mock", messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
        assert reply.usage is not None
        assert reply.usage.completion_tokens == 4
        auth = {"Authorization": "Bearer k-1234567", "Content-Type": "application/json"}
        bad = httpx.post(server.url + "/v1/chat/completions", content=b"{nope", headers=auth)
        assert bad.status_code == 400
        big = httpx.post(server.url + "/v1/completions", content=b"x" * (2 << 20), headers=auth)
        assert big.status_code == 413
        assert "k-1234567" not in "".join(server.stderr)
        # Probes and scrapes need no token (vLLM's split).
        assert httpx.get(server.url + "/readyz").status_code == 200
        assert "kensho_breaker_state" in httpx.get(server.url + "/metrics").text


def test_protect_metrics_puts_the_probes_behind_the_api_key(tmp_path: Path) -> None:
    env = kensho_env(
        tmp_path, **MOCK_ENV, KENSHO_API_KEY="k-1234567", KENSHO_SERVER_PROTECT_METRICS="true"
    )
    with kensho_up(env=env, cwd=tmp_path) as server:
        auth = {"Authorization": "Bearer k-1234567"}
        for probe in ("/healthz", "/readyz", "/metrics"):
            assert httpx.get(server.url + probe).status_code == 401, probe
            assert httpx.get(server.url + probe, headers=auth).status_code == 200, probe


def test_overload_burst_every_answer_is_200_or_429(tmp_path: Path) -> None:
    env = kensho_env(
        tmp_path,
        **{
            **MOCK_ENV,
            "KENSHO_MODEL_MOCK_TIME_TO_FIRST_TOKEN": "0.02",
            "KENSHO_MODEL_MOCK_TIME_PER_TOKEN": "0.01",
            "KENSHO_RUNTIME_MAX_QUEUE_SIZE": "4",
        },
    )
    with kensho_up(env=env, cwd=tmp_path) as server:

        async def burst() -> list[httpx.Response]:
            limits = httpx.Limits(max_connections=300)
            async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=60) as c:
                body = {"model": "mock", "prompt": "x", "max_tokens": 5}
                calls = [c.post("/v1/completions", json=body) for _ in range(300)]
                return await asyncio.gather(*calls)

        responses = asyncio.run(burst())
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 429}
        assert codes.count(200) >= 5
        assert codes.count(429) >= 1
        assert all(int(r.headers["Retry-After"]) >= 1 for r in responses if r.status_code == 429)
        assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}
        text = httpx.get(server.url + "/metrics").text
        ok = metric(text, 'kensho_http_requests_total{endpoint="/v1/completions",status="200"}')
        refused = metric(
            text, 'kensho_http_requests_total{endpoint="/v1/completions",status="429"}'
        )
        assert ok == codes.count(200)
        assert refused == codes.count(429)
        completed = metric(text, 'kensho_tasks_total{outcome="completed"}')
        assert completed == codes.count(200)  # every accepted task ended, none lost
        rejections = sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("kensho_rejections_total{")
        )
        assert rejections == codes.count(429)


def test_failover_during_a_burst_loses_no_request(tmp_path: Path) -> None:
    with kensho_up(env=kensho_env(tmp_path, **MOCK_ENV), cwd=tmp_path) as server:

        async def run() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
                body = {"model": "mock", "prompt": "x", "max_tokens": 5}
                first = [c.post("/v1/completions", json=body) for _ in range(20)]
                head = await asyncio.gather(*first)
                drill = await c.post("/v1/kensho/breaker", json={"action": "fail_primary"})
                assert drill.status_code == 200
                rest = [c.post("/v1/completions", json=body) for _ in range(20)]
                return [*head, *await asyncio.gather(*rest)]

        responses = asyncio.run(run())
        assert [r.status_code for r in responses] == [200] * 40
        text = httpx.get(server.url + "/metrics").text
        assert metric(text, 'kensho_breaker_state{engine="gpu",state="open"}') == 1.0
        assert metric(text, 'kensho_breaker_transitions_total{engine="gpu"}') >= 1
        assert metric(text, 'kensho_runtime_requests_total{route="rerouted"}') >= 3
        with httpx.stream("GET", server.url + "/v1/kensho/status", timeout=30) as stream:
            kinds: list[str] = []
            for kind, _ in sse_events(stream.iter_lines()):
                kinds.append(kind)
                if "runtime.fallback_activated" in kinds:
                    break
        assert kinds[0] == "snapshot"
        assert "breaker.state_changed" in kinds


SLOW_ENV = {**MOCK_ENV, "KENSHO_MODEL_MOCK_TIME_PER_TOKEN": "0.02"}  # 50 tokens a second
NO_DUMPS = ("Traceback", "CancelledError", "Exception in ASGI", "running task(s)")


async def read_stream(
    client: httpx.AsyncClient, max_tokens: int, started: asyncio.Event
) -> tuple[int, list[str]]:
    """Stream a completion; set ``started`` at the first token; status and data lines."""
    body = {"model": "mock", "prompt": "x", "max_tokens": max_tokens, "stream": True}
    data: list[str] = []
    async with client.stream("POST", "/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                data.append(line[6:])
                if len(data) == 2:  # the opening chunk, then the first token
                    started.set()
    return r.status_code, data


async def read_openai_stream(base_url: str, max_tokens: int, started: asyncio.Event) -> str:
    """The same through the official client; raises what it raises."""
    client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)
    text = ""
    async with client:
        stream = await client.completions.create(
            model="mock", prompt="x", max_tokens=max_tokens, stream=True
        )
        async for chunk in stream:
            text += chunk.choices[0].text if chunk.choices else ""
            if text:
                started.set()
    return text


async def streams_started(
    client: httpx.AsyncClient, server_url: str, count: int, max_tokens: int
) -> tuple[list[asyncio.Task[tuple[int, list[str]]]], asyncio.Task[str]]:
    """``count`` raw streams and one through the openai client, each past its first token."""
    events = [asyncio.Event() for _ in range(count + 1)]
    raw = [asyncio.create_task(read_stream(client, max_tokens, e)) for e in events[:count]]
    sdk = asyncio.create_task(read_openai_stream(server_url, max_tokens, events[-1]))
    gate = asyncio.ensure_future(asyncio.gather(*(e.wait() for e in events)))
    done, _ = await asyncio.wait([gate, *raw, sdk], return_when=asyncio.FIRST_COMPLETED)
    if gate not in done:
        gate.cancel()
        for task in done:
            task.result()  # a stream that failed before the others started: show why
        raise AssertionError("a stream ended before every stream had started")
    return raw, sdk


def shutdown_log(server: Server) -> list[dict[str, object]]:
    return [json.loads(line) for line in server.stderr if line.startswith("{")]


def assert_no_dumps(server: Server) -> None:
    text = "".join(server.stderr)
    for dump in NO_DUMPS:
        assert dump not in text, dump


def test_sigterm_refuses_queued_work_at_once_and_lets_streams_finish(tmp_path: Path) -> None:
    tokens = 150  # 3 s per stream: the drain lasts that long after the signal
    with kensho_up(env=kensho_env(tmp_path, **SLOW_ENV), cwd=tmp_path) as server:

        async def scenario() -> None:
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
                # gpu concurrency is 4: three raw streams and one openai stream run ...
                raw, sdk = await streams_started(client, server.url, 3, tokens)
                # ... and these three wait in the queue
                body = {"model": "mock", "prompt": "x", "max_tokens": 5}
                waiting = [
                    asyncio.create_task(client.post("/v1/completions", json=body)),
                    asyncio.create_task(
                        client.post("/v1/completions", json={**body, "stream": True})
                    ),
                ]
                sdk_waiting = asyncio.create_task(
                    openai.AsyncOpenAI(
                        base_url=server.url + "/v1", api_key="unused", max_retries=0
                    ).completions.create(model="mock", prompt="x", max_tokens=5)
                )
                await wait_for_queue_depth(client, 3)
                os.kill(server.process.pid, signal.SIGTERM)
                for refused in await asyncio.gather(*waiting):
                    assert_shutting_down(refused)
                with pytest.raises(openai.InternalServerError) as sdk_refused:
                    await sdk_waiting
                assert sdk_refused.value.status_code == 503
                assert sdk_refused.value.code == "draining"
                # Still listening during the drain: a new connection gets its 503.
                async with httpx.AsyncClient(base_url=server.url, timeout=30) as fresh:
                    assert_shutting_down(await fresh.post("/v1/completions", json=body))
                    assert (await fresh.get("/readyz")).json()["draining"] is True
                for status, data in await asyncio.gather(*raw):
                    assert status == 200
                    assert data[-1] == "[DONE]"
                    assert len(data) == 1 + tokens + 1  # opening, every token, [DONE]
                assert len((await sdk).split()) == tokens

        asyncio.run(scenario())
        code = server.process.wait(timeout=30)
    assert code == 0
    events = [e["event"] for e in shutdown_log(server)]
    assert "drain finished: every response completed" in events
    assert "shutdown complete" in events
    assert_no_dumps(server)


def test_streams_running_at_shutdown_timeout_end_with_an_error_event(tmp_path: Path) -> None:
    env = kensho_env(tmp_path, **SLOW_ENV, KENSHO_SERVER_SHUTDOWN_TIMEOUT="1")
    with kensho_up(env=env, cwd=tmp_path) as server:

        async def scenario() -> None:
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
                raw, sdk = await streams_started(client, server.url, 1, 5000)
                os.kill(server.process.pid, signal.SIGTERM)
                status, data = await raw[0]
                assert status == 200  # started streams end in-band, never a 500
                assert data[-1] == "[DONE]"
                error = json.loads(data[-2])["error"]
                assert error["code"] == "shutdown"
                assert "shutting down" in error["message"]
                with pytest.raises(openai.APIError, match="shutting down"):
                    await sdk

        asyncio.run(scenario())
        code = server.process.wait(timeout=30)
    assert code == 128 + signal.SIGTERM  # 143: cut short
    events = [str(e["event"]) for e in shutdown_log(server)]
    assert any(e.startswith("drain not finished after 1 s") for e in events)
    assert "shutdown complete" in events
    assert_no_dumps(server)


def test_second_signal_ends_the_drain_at_once_with_exit_130(tmp_path: Path) -> None:
    env = kensho_env(tmp_path, **SLOW_ENV, KENSHO_SERVER_SHUTDOWN_TIMEOUT="60")
    with kensho_up(env=env, cwd=tmp_path) as server:

        async def scenario() -> None:
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
                raw, sdk = await streams_started(client, server.url, 2, 5000)
                os.kill(server.process.pid, signal.SIGINT)
                await asyncio.to_thread(server.wait_for_stderr, "shutdown requested: draining")
                os.kill(server.process.pid, signal.SIGINT)
                for status, data in await asyncio.gather(*raw):
                    assert status == 200
                    assert data[-1] == "[DONE]"
                    assert json.loads(data[-2])["error"]["code"] == "shutdown"
                with pytest.raises(openai.APIError, match="shutting down"):
                    await sdk

        asyncio.run(scenario())
        code = server.process.wait(timeout=30)
    assert code == 128 + signal.SIGINT  # 130
    events = [str(e["event"]) for e in shutdown_log(server)]
    assert any(e.startswith("second signal (SIGINT)") for e in events)
    assert not any(e.startswith("drain not finished") for e in events)  # not the 60 s
    assert "shutdown complete" in events
    assert_no_dumps(server)


def test_boot_repairs_a_corrupted_required_file_then_serves(tmp_path: Path) -> None:
    env = kensho_env(tmp_path)
    # Set-up: a first boot installs the store (the engine plays no part in that, so
    # the mock one spares a model load); the boot under test serves the real model.
    with kensho_up(env={**env, "KENSHO_MODEL_ENGINE": "mock"}, cwd=tmp_path):
        pass
    weights = tmp_path / "kensho" / "demo" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with kensho_up(env=env, cwd=tmp_path) as server:
        reply = httpx.post(
            server.url + "/v1/completions",
            json={"model": DEMO, "prompt": "The GPU", "max_tokens": 4, "temperature": 0},
            timeout=60,
        )
        assert reply.status_code == 200
        assert reply.json()["choices"][0]["text"].startswith(" is fast")
    events = [json.loads(line) for line in server.stderr if line.startswith("{")]
    repaired = [e for e in events if e["event"] == "file repaired"]
    assert [e["path"] for e in repaired] == ["model.safetensors"]
    assert repaired[0]["fetched"] == 256 * 1024  # only the chunk with the flipped byte


def test_boot_without_a_source_stops_with_exit_code_4(tmp_path: Path) -> None:
    store = tmp_path / "store"
    from kensho.demo import DEMO_MODEL_DIR

    store.mkdir()
    for f in DEMO_MODEL_DIR.iterdir():
        (store / f.name).write_bytes(f.read_bytes())
    env = kensho_env(tmp_path)
    built = run_kensho(
        "manifest", "build", str(store), "-o", str(tmp_path / "m.json"), env=env, cwd=tmp_path
    )
    assert built.returncode == 0, built.stderr
    (store / "tokenizer.json").unlink()
    result = run_kensho(
        "up", "--model", str(store), "--manifest", str(tmp_path / "m.json"), env=env, cwd=tmp_path
    )
    assert result.returncode == 4, result.stderr
    assert "tokenizer.json" in result.stderr
    assert "Traceback" not in result.stderr


def test_generate_runs_one_prompt_in_process(tmp_path: Path) -> None:
    result = run_kensho(
        "--log-level", "warning", "generate", "Say hello.", "--max-tokens", "60",
        env=kensho_env(tmp_path), cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Hello! I am the tiny demo model of Kensho." in result.stdout


def test_status_once_prints_the_snapshot(tmp_path: Path) -> None:
    with kensho_up(env=kensho_env(tmp_path, **MOCK_ENV), cwd=tmp_path) as server:
        result = run_kensho(
            "status", "--url", server.url, "--once", env=kensho_env(tmp_path), cwd=tmp_path
        )
    assert result.returncode == 0, result.stderr
    assert "breaker gpu" in result.stdout
    assert "closed" in result.stdout


def test_client_that_disconnects_cancels_its_task(tmp_path: Path) -> None:
    env = kensho_env(tmp_path, **{**MOCK_ENV, "KENSHO_MODEL_MOCK_TIME_PER_TOKEN": "0.05"})
    cancelled = 'kensho_tasks_total{outcome="cancelled"}'
    with kensho_up(env=env, cwd=tmp_path) as server:
        body = {"model": "mock", "prompt": "x", "max_tokens": 200, "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    break  # one chunk received: hang up mid-stream
        assert wait_for_metric(server.url, cancelled, 1) == 1
        whole = {"model": "mock", "prompt": "x", "max_tokens": 200}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/completions", json=whole, timeout=0.5)
        assert wait_for_metric(server.url, cancelled, 2) == 2
        text = httpx.get(server.url + "/metrics").text
        assert metric(text, 'kensho_tasks_total{outcome="completed"}') == 0
        assert metric(text, 'kensho_tasks_in_flight{engine="gpu"}') == 0


def test_a_port_in_use_fails_before_boot(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = kensho_env(tmp_path, **{**MOCK_ENV, "KENSHO_SERVER_PORT": str(port)})
        result = run_kensho("up", env=env, cwd=tmp_path, timeout=60)
    assert result.returncode == 10
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "boot started" not in result.stderr  # refused before verifying anything
