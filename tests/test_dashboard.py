"""The dashboard at ``/`` of ``kensho up``, driven in a real headless Chromium.

Chromium is controlled over the DevTools protocol on a pipe (``--remote-debugging-pipe``:
NUL-terminated JSON on file descriptors 3 and 4), so no extra package is needed. Waits
are on the page's own DOM (a MutationObserver inside the page), never on a timer.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
import pytest

from _server_support import kensho_env, kensho_up

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium is not installed (Debian: apt-get install chromium; `make pytest` "
    "installs it when run as root)",
)
MOCK_ENV = {"KENSHO_MODEL_ENGINE": "mock", "KENSHO_MODEL_ID": "mock"}
#: Set to a path to refresh the README's screenshot from a real run.
SCREENSHOT_ENV = "KENSHO_DASHBOARD_SCREENSHOT"


class Browser:
    """One headless Chromium page, driven over the DevTools pipe."""

    def __init__(self, profile: Path) -> None:
        assert CHROMIUM is not None
        args = [
            CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-extensions", "--disable-background-networking", "--mute-audio",
            f"--user-data-dir={profile}", "--window-size=1280,1100", "--remote-debugging-pipe",
            "about:blank",
        ]  # fmt: skip
        # The protocol reads fd 3 and writes fd 4: our stdin/stdout pipes, moved there.
        self.process = subprocess.Popen(
            ["sh", "-c", 'exec "$@" 3<&0 4>&1 0</dev/null 1>/dev/null', "sh", *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self._ids = itertools.count(1)
        self._buffer = b""
        self.errors: list[str] = []  # script exceptions and console/CSP errors
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]
        self.call("Page.enable", session=True)
        self.call("Runtime.enable", session=True)
        self.call("Log.enable", session=True)

    def _read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        while b"\0" not in self._buffer:
            chunk = os.read(self.process.stdout.fileno(), 1 << 16)
            if not chunk:
                raise AssertionError("chromium exited")
            self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        data: dict[str, Any] = json.loads(message)
        return data

    def call(self, method: str, *, session: bool = False, **params: Any) -> dict[str, Any]:
        assert self.process.stdin is not None
        ident = next(self._ids)
        message: dict[str, Any] = {"id": ident, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        self.process.stdin.write(json.dumps(message).encode() + b"\0")
        self.process.stdin.flush()
        while True:
            reply = self._read()
            self._note(reply)
            if reply.get("id") == ident:
                if "error" in reply:
                    raise AssertionError(f"{method}: {reply['error']}")
                result: dict[str, Any] = reply["result"]
                return result

    def _note(self, message: dict[str, Any]) -> None:
        method, params = message.get("method"), message.get("params", {})
        if method == "Runtime.exceptionThrown":
            self.errors.append(str(params["exceptionDetails"]))
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            entry = params["entry"]
            if "401" not in entry.get("text", ""):  # the key prompt's refused fetch
                self.errors.append(entry["text"])

    def open(self, url: str) -> None:
        self.call("Page.navigate", session=True, url=url)

    def evaluate(self, expression: str) -> Any:
        reply = self.call(
            "Runtime.evaluate", session=True, expression=expression,
            awaitPromise=True, returnByValue=True,
        )  # fmt: skip
        if "exceptionDetails" in reply:
            raise AssertionError(f"{expression}: {reply['exceptionDetails']}")
        return reply["result"].get("value")

    def wait_for(self, condition: str, timeout_ms: int = 20000) -> Any:
        """Wait until the JS expression ``condition`` is truthy on the page; its value.

        Checked again on every DOM change (a MutationObserver), so it returns as soon
        as the page shows it; a page that never does fails with its visible text.
        """
        script = f"""new Promise((resolve) => {{
          const check = () => {{ try {{ const v = ({condition}); if (v) {{
            observer.disconnect(); resolve(v); return true; }} }} catch (e) {{}} return false; }};
          const observer = new MutationObserver(check);
          if (!check()) {{
            observer.observe(document, {{subtree: true, childList: true, attributes: true,
                                          characterData: true}});
            setTimeout(() => {{ observer.disconnect();
              resolve("TIMEOUT: " + (document.body ? document.body.innerText : "")); }},
              {timeout_ms});
          }}
        }})"""
        value = self.evaluate(script)
        assert not (isinstance(value, str) and value.startswith("TIMEOUT: ")), (
            f"the page never showed {condition}:\n{value}"
        )
        return value

    def text(self, selector: str) -> str:
        value = self.evaluate(f"document.querySelector({json.dumps(selector)}).textContent")
        return str(value)

    def screenshot(self) -> bytes:
        data = self.call("Page.captureScreenshot", session=True, format="png")["data"]
        return base64.b64decode(data)

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        if self.process.stdout is not None:
            self.process.stdout.close()


@contextmanager
def browser(tmp_path: Path) -> Iterator[Browser]:
    page = Browser(tmp_path / "chromium-profile")
    try:
        yield page
    finally:
        page.close()


def _breaker_state(name: str) -> str:
    return f"document.querySelector('.breaker[data-breaker=\"{name}\"]')?.dataset.state"


@needs_chromium
def test_dashboard_shows_the_system_and_follows_a_forced_open_breaker(tmp_path: Path) -> None:
    env = kensho_env(tmp_path, **MOCK_ENV)
    with kensho_up(env=env, cwd=tmp_path) as server, browser(tmp_path) as page:
        page.open(server.url + "/")
        page.wait_for("document.body.dataset.live === 'yes'")
        assert page.wait_for(_breaker_state("gpu")) == "closed"
        assert page.evaluate(_breaker_state("cpu")) == "closed"
        assert re.fullmatch(r"0 waiting of \d+", page.text("#queue"))
        assert page.evaluate("document.querySelector('#integrity').dataset.status") == "ok"
        assert page.text("#integrity-files").startswith(
            "8 ok"
        )  # the demo: 6 files for torch, 2 GGUF
        assert "mock · engines gpu, cpu" in page.text("#model")
        assert page.text("#overall") == "OK"
        assert "store ready" in page.text("#events")  # boot events, replayed

        body = {"model": "mock", "prompt": "x", "max_tokens": 20}
        assert httpx.post(server.url + "/v1/completions", json=body).status_code == 200
        page.wait_for("document.querySelector('[data-outcome=completed] .n')?.textContent === '1'")
        page.wait_for("Number(document.querySelector('#tps-chart').dataset.points) > 0")

        forced = httpx.post(
            server.url + "/v1/kensho/breaker", json={"action": "force_open", "engine": "primary"}
        )
        assert forced.status_code == 200
        assert page.wait_for(f"{_breaker_state('gpu')} === 'forced_open'")
        why = page.text('.breaker[data-breaker="gpu"] .why')
        assert "forced open through the admin API" in why
        # The next snapshot (within a second) says where requests go now.
        page.wait_for(
            "document.querySelector('#active').textContent === 'serving on cpu (fallback)'"
        )
        assert page.text("#overall") == "DEGRADED"
        page.wait_for(
            "document.querySelector('#events').textContent.includes('gpu: closed -> forced_open')"
        )
        # A re-verification shows as integrity progress, then its verdict.
        assert httpx.post(server.url + "/v1/kensho/verify").status_code == 200
        page.wait_for(
            "document.querySelector('#progress-text').textContent.startsWith('verified in')"
        )
        shot = page.screenshot()
        assert page.errors == []
    assert shot.startswith(b"\x89PNG\r\n\x1a\n")
    target = os.environ.get(SCREENSHOT_ENV)
    if target:
        Path(target).write_bytes(shot)


@needs_chromium
def test_with_an_api_key_the_page_asks_once_and_sends_it_as_bearer(tmp_path: Path) -> None:
    key = "dash-key-12345"
    env = kensho_env(tmp_path, **MOCK_ENV, KENSHO_API_KEY=key)
    with kensho_up(env=env, cwd=tmp_path) as server, browser(tmp_path) as page:
        page.open(server.url + "/")
        assert page.wait_for("!document.querySelector('#key-form').hidden")
        assert "requires its API key" in page.text("#key-why")
        page.evaluate("document.querySelector('#key-input').value = 'wrong-key-000'")
        page.evaluate("document.querySelector('#key-form button').click()")
        page.wait_for("document.querySelector('#key-why').textContent.includes('refused')")
        page.evaluate(f"document.querySelector('#key-input').value = {json.dumps(key)}")
        page.evaluate("document.querySelector('#key-form button').click()")
        page.wait_for("document.body.dataset.live === 'yes'")
        assert page.evaluate(_breaker_state("gpu")) == "closed"
        page.open(server.url + "/")  # a reload does not ask again
        page.wait_for("document.body.dataset.live === 'yes'")
        assert page.evaluate("document.querySelector('#key-form').hidden") is True
        assert page.errors == []


def test_the_page_and_assets_are_served_without_the_key_and_the_data_is_not(
    tmp_path: Path,
) -> None:
    env = kensho_env(tmp_path, **MOCK_ENV, KENSHO_API_KEY="dash-key-12345")
    with kensho_up(env=env, cwd=tmp_path) as server:
        page = httpx.get(server.url + "/")
        script = httpx.get(server.url + "/dashboard/app.js")
        style = httpx.get(server.url + "/dashboard/style.css")
        data = httpx.get(server.url + "/v1/kensho/status")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert script.headers["content-type"].startswith("text/javascript")
    assert style.headers["content-type"].startswith("text/css")
    assert data.status_code == 401


def test_the_assets_ship_in_the_package_and_load_nothing_from_elsewhere() -> None:
    folder = resources.files("kensho.server") / "dashboard"
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["app.js", "favicon.svg", "index.html", "style.css"]
    for name in names:
        text = (folder / name).read_text()
        # The SVG namespace is a name, not a download.
        urls = re.findall(
            r"(?:https?:)?//[\w.-]+\.\w+", text.replace("http://www.w3.org/2000/svg", "")
        )
        assert urls == [], (name, urls)
        assert "@import" not in text
        assert "innerHTML" not in text  # server data is written as text, never as markup


# -- the Grafana dashboard of docs/ -------------------------------------------------------

GRAFANA = Path(__file__).parent.parent / "docs" / "grafana-kensho.json"
_SELECTOR = re.compile(r"\b(kensho_\w+)(?:\{([^}]*)\})?")
_SCRAPE_LABELS = {"instance", "job"}  # added by Prometheus when it scrapes


def _grafana_queries() -> list[str]:
    board = json.loads(GRAFANA.read_text())
    queries = [t["expr"] for p in board["panels"] for t in p["targets"]]
    queries += [v["definition"] for v in board["templating"]["list"]]
    return queries


def _exposed(text: str) -> dict[str, set[str]]:
    """Every series name a PromQL query can select in ``text``, with its label names."""
    from prometheus_client.parser import text_string_to_metric_families

    series: dict[str, set[str]] = {}
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
    for family in text_string_to_metric_families(text):
        for suffix in suffixes.get(family.type, [""]):
            series.setdefault(family.name + suffix, set())  # declared, maybe no sample yet
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    return series


def test_every_metric_the_grafana_dashboard_queries_exists_in_metrics(tmp_path: Path) -> None:
    with kensho_up(env=kensho_env(tmp_path, **MOCK_ENV), cwd=tmp_path) as server:
        body = {"model": "mock", "prompt": "x", "max_tokens": 5, "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            r.read()  # a streamed answer: latency, TTFT and tokens get samples
        text = httpx.get(server.url + "/metrics").text
    exposed = _exposed(text)
    used: set[str] = set()
    for query in _grafana_queries():
        for name, selector in _SELECTOR.findall(query):
            used.add(name)
            assert name in exposed, f"{name} (in {query!r}) is not in /metrics"
            for label in re.findall(r"(\w+)\s*=~?", selector):
                if label not in _SCRAPE_LABELS:
                    assert label in exposed[name], f"{name} has no label {label}"
            for group in re.findall(r"by \(([^)]*)\)", query):
                for label in (g.strip() for g in group.split(",")):
                    samples = exposed.get(name, set())
                    assert not samples or label in samples | _SCRAPE_LABELS, (name, label)
    # The dashboard covers every family Kensho exports (a new metric gets a panel).
    families = {n.removesuffix("_total") for n in exposed if not n.endswith(("_created",))}
    covered = {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in used}
    missing = {f for f in families if re.sub(r"_(bucket|sum|count)$", "", f) not in covered}
    assert missing == set(), missing
