"""What ``kensho up`` prints while it boots, on a terminal and off one.

On a terminal the bytes go through a tiny terminal model (enough of VT100 for rich:
carriage return, cursor up, erase line), so the test reads the screen a person sees
at the end, not the stream of redraws.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from _server_support import kensho_env, kensho_up
from test_status_view import Terminal

_CSI = re.compile(r"\x1b\[([0-9;?]*)([A-Za-z])|\x1b\][^\x07]*\x07")
_LOG_LINE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d")


def screen(raw: str) -> list[str]:
    """The lines left on a terminal after ``raw`` (text with rich's control codes)."""
    lines: list[str] = [""]
    row = col = 0
    pos = 0
    for match in [*_CSI.finditer(raw), None]:
        end = match.start() if match else len(raw)
        for char in raw[pos:end]:
            if char == "\r":
                col = 0
            elif char == "\n":
                row += 1
                if row == len(lines):
                    lines.append("")
            elif char >= " ":
                line = lines[row].ljust(col)
                lines[row] = line[:col] + char + line[col + 1 :]
                col += 1
        if match is None:
            break
        pos = match.end()
        arg, op = match.group(1), match.group(2)
        if op == "A":
            row = max(0, row - int(arg or 1))
        elif op == "K":
            lines[row] = "" if arg == "2" else lines[row][:col]
    return [line.rstrip() for line in lines]


def test_a_first_boot_on_a_terminal_says_installing_once_and_leaves_no_bar(
    tmp_path: Path,
) -> None:
    env = kensho_env(tmp_path, port="0", KENSHO_MODEL_ENGINE="mock")
    term = Terminal(["up"], env, tmp_path)
    try:
        term.read_until(r"status: kensho status")
        raw = term.raw
    finally:
        term.close()
    shown = screen(raw)
    text = "\n".join(shown)
    installing = [line for line in shown if line.startswith("installing ")]
    assert len(installing) == 1, text
    assert re.fullmatch(r"installing 8 files \(2\.1 MiB\) from .*demo/model", installing[0])
    assert shown.count("store ready") == 1, text
    assert "missing" not in text  # a first install is not a repair
    assert "boot started" not in text  # info logs stay off a terminal unless asked
    assert not any("━" in line for line in shown), text  # the bars finished and left
    for line in shown:  # a log line starts its own line, never glued to a bar
        found = _LOG_LINE.search(line)
        assert found is None or found.start() == 0, line
    assert any(line.startswith("kensho: listening on http://127.0.0.1:") for line in shown)


def test_off_a_terminal_boot_writes_json_lines_only(tmp_path: Path) -> None:
    env = kensho_env(tmp_path, KENSHO_MODEL_ENGINE="mock")
    env.pop("KENSHO_LOG_FORMAT")  # auto: JSON because stderr is a pipe
    with kensho_up(env=env, cwd=tmp_path) as server:
        server.wait_for_stderr('"event":"listening"')
        lines = [line for line in server.stderr if line.strip()]
    records = [json.loads(line) for line in lines]  # every line is JSON
    events = [r["event"] for r in records]
    assert "boot started" in events  # the level stays info off a terminal
    assert any(e.startswith("installing 8 files (") for e in events), events
    assert events.count("store ready") == 1
    assert not any("missing" in e for e in events), events


def test_asked_for_info_logs_on_a_terminal_they_print_above_the_bars(tmp_path: Path) -> None:
    env = kensho_env(tmp_path, port="0", KENSHO_MODEL_ENGINE="mock")
    term = Terminal(["--log-level", "info", "up"], env, tmp_path)
    try:
        term.read_until(r"status: kensho status")
    finally:
        term.close()
    shown = screen(term.raw)
    logged = [line for line in shown if _LOG_LINE.search(line)]
    assert any("file repaired" in line for line in logged), shown  # logged while bars ran
    for line in logged:
        assert _LOG_LINE.match(line), f"a log line glued to something: {line!r}"
    assert not any("━" in line for line in shown)
