"""Folder fsyncs shared by the renames before them (``FolderSync``): never one too few."""

from __future__ import annotations

import itertools
import threading
from pathlib import Path

from kensho.storage._fs import FolderSync, fsync_dir


def test_a_call_during_a_running_fsync_waits_for_one_that_started_after_it(
    tmp_path: Path,
) -> None:
    """The fsync under way when b and c come may predate their renames: they wait for
    the next one, which they share (two fsyncs for three calls, not one, not three)."""
    calls: list[int] = []
    first_running, release_first = threading.Event(), threading.Event()

    def fsync(folder: Path) -> None:
        calls.append(len(calls) + 1)
        if len(calls) == 1:
            first_running.set()
            assert release_first.wait(10)

    sync = FolderSync(fsync)
    seen_at_return: dict[str, int] = {}

    def caller(name: str) -> None:
        sync.sync(tmp_path)
        seen_at_return[name] = len(calls)

    threads = {name: threading.Thread(target=caller, args=(name,)) for name in "abc"}
    threads["a"].start()
    assert first_running.wait(10)
    threads["b"].start()
    threads["c"].start()
    while sync.under_way(tmp_path) < 3:  # b and c are inside sync(), behind fsync 1
        assert threads["b"].is_alive() and threads["c"].is_alive()
    release_first.set()
    for thread in threads.values():
        thread.join(10)
    assert calls == [1, 2]
    assert seen_at_return["a"] >= 1
    assert seen_at_return["b"] == seen_at_return["c"] == 2  # only after fsync 2


def test_every_call_returns_after_an_fsync_that_started_after_it(tmp_path: Path) -> None:
    """Many threads placing files in two folders: each call is covered by a real folder
    fsync that began after it, whatever the interleaving."""
    folders = [tmp_path / "a", tmp_path / "b"]
    for folder in folders:
        folder.mkdir()
    clock = itertools.count()
    lock = threading.Lock()
    fsyncs: list[tuple[Path, int, int]] = []  # folder, start, end

    def tick() -> int:
        with lock:
            return next(clock)

    def fsync(folder: Path) -> None:
        start = tick()
        fsync_dir(folder)
        with lock:
            fsyncs.append((folder, start, next(clock)))

    sync = FolderSync(fsync)
    spans: list[tuple[Path, int, int]] = []  # folder, called, returned

    def caller(k: int) -> None:
        for i in range(20):
            folder = folders[(k + i) % 2]
            (folder / f"{k}-{i}").write_bytes(b"x")  # the "rename" this call must cover
            called = tick()
            sync.sync(folder)
            spans.append((folder, called, tick()))

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(spans) == 20 * len(threads)
    for folder, called, returned in spans:
        assert any(f == folder and called < start and end < returned for f, start, end in fsyncs), (
            folder,
            called,
            returned,
        )
    assert sync.under_way(folders[0]) == sync.under_way(folders[1]) == 0
