"""Every ``kensho … --help`` is read by people: nothing lost, nothing undocumented.

Help goes through click's plain formatter (``rich_markup_mode=None``): rich markup
would eat any bracketed word such as ``[trust]`` or ``[redacted]``.
"""

from __future__ import annotations

import re
import shlex
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer
from typer.testing import CliRunner

from _server_support import kensho_env, kensho_up
from kensho.cli import app

runner = CliRunner()
_BRACKETED = re.compile(r"\[[^\]\s][^\]]*\]")


def _commands(command: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Every command of the tree (typer vendors click: its classes are not click's)."""
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from _commands(sub, (*path, name))


COMMANDS = [
    pytest.param(path, command, id=" ".join(path) or "kensho")
    for path, command in _commands(typer.main.get_command(app))
]


def _help(path: tuple[str, ...]) -> str:
    result = runner.invoke(app, [*path, "--help"], terminal_width=100)
    assert result.exit_code == 0, result.output
    return result.output


def _flat(text: str) -> str:
    return " ".join(text.split())


def _written(command: Any) -> list[str]:
    """The help texts the code wrote for this command and its parameters."""
    texts = [command.help or ""]
    texts += [getattr(p, "help", None) or "" for p in command.params]
    return texts


def test_the_tree_has_every_command() -> None:
    names = {" ".join(p.values[0]) for p in COMMANDS}  # type: ignore[arg-type]
    assert {"up", "status", "keygen", "config show", "manifest build", "sync"} <= names


@pytest.mark.parametrize(("path", "command"), COMMANDS)
def test_help_keeps_every_bracketed_word(path: tuple[str, ...], command: Any) -> None:
    shown = _flat(_help(path))
    for text in _written(command):
        for word in _BRACKETED.findall(text):
            assert word in shown, f"{word} lost from `kensho {' '.join(path)} --help`"


def test_the_known_bracketed_words_are_shown() -> None:
    assert "the [trust] keys list" in _flat(_help(("keygen",)))
    assert "shown as [redacted]" in _flat(_help(("config", "show")))


@pytest.mark.parametrize(("path", "command"), COMMANDS)
def test_flags_are_shown_as_flags_and_every_option_is_documented(
    path: tuple[str, ...], command: Any
) -> None:
    shown = _help(path)
    assert "<bool>" not in shown
    for param in command.params:
        if param.param_type_name == "option" and param.name != "help":
            assert (param.help or "").strip(), f"kensho {' '.join(path)} {param.opts[0]}: no help"
            if param.is_flag and not param.secondary_opts:
                assert re.search(rf"{re.escape(param.opts[-1])}\s{{2,}}\S", shown), param.opts


def _example(text: str, starts: str) -> str:
    """The line of the Examples block that starts with ``starts``."""
    for line in text.splitlines():
        if line.strip().startswith(starts):
            return line.strip()
    raise AssertionError(f"no example starting with {starts!r} in:\n{text}")


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_the_curl_example_of_up_works_as_printed(tmp_path: Path) -> None:
    curl = _example(_help(("up",)), "curl ")
    with kensho_up(env=kensho_env(tmp_path, KENSHO_MODEL_ENGINE="mock"), cwd=tmp_path) as server:
        args = [a.replace("http://127.0.0.1:8000", server.url) for a in shlex.split(curl)]
        result = subprocess.run([*args, "-s", "-w", "\n%{http_code}"], capture_output=True,
                                text=True, timeout=60, check=False)  # fmt: skip
    body, _, code = result.stdout.rpartition("\n")
    assert code == "200", body
    assert '"object":"chat.completion"' in body


def _raw_post(url: str, body: bytes, content_type: str | None) -> tuple[int, bytes]:
    """A hand-written HTTP/1.1 POST: exactly the headers given, nothing added."""
    host, port = url.removeprefix("http://").split(":")
    head = f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n"
    if content_type is not None:
        head += f"Content-Type: {content_type}\r\n"
    head += f"Content-Length: {len(body)}\r\n\r\n"
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head.encode() + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, data.partition(b"\r\n\r\n")[2]


def test_a_json_body_is_read_as_json_whatever_its_content_type(tmp_path: Path) -> None:
    body = b'{"model": "kensho-demo", "prompt": "x", "max_tokens": 3}'
    with kensho_up(env=kensho_env(tmp_path, KENSHO_MODEL_ENGINE="mock"), cwd=tmp_path) as server:
        answers = {
            ct: _raw_post(server.url, body, ct)
            for ct in (None, "application/x-www-form-urlencoded", "text/plain", "application/json")
        }
        bad = _raw_post(server.url, b"model=kensho-demo", "application/x-www-form-urlencoded")
        listed = httpx.get(server.url + "/v1/models").json()
        metrics = httpx.get(server.url + "/metrics").text
    for ct, (status, text) in answers.items():
        assert status == 200, (ct, text)
        assert b'"object":"text_completion"' in text
    assert bad[0] == 400
    assert b"not valid JSON" in bad[1]
    assert listed["data"][0]["id"] == "kensho-demo"
    # Still counted under their route (the content type is fixed in the request itself).
    assert 'kensho_http_requests_total{endpoint="/v1/completions",status="200"} 4.0' in metrics
