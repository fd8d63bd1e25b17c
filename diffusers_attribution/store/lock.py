"""One writer per store folder: an exclusive `filelock` on `<folder>/.diffusers-attribution.lock`.

The holder records which run it is (`.diffusers-attribution.writer.json`: pid and run identity). A second writer
of another run fails at once, naming the folder and what differs; a second writer of the same run waits for the
first and then finds its shards (resuming, or the finished store). Under accelerate only the main process takes
the lock; the other processes wait for its outcome (`ProcessGroup.broadcast`) and write only while it holds it.
The lock file stays in the folder (removing a lock file races with its next holder); it is never uploaded.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Iterator

from filelock import FileLock, Timeout

from .errors import StoreBusyError
from .files import atomic_write, identity_difference, load_json_bounded

LOCK_NAME = ".diffusers-attribution.lock"
WRITER_NAME = ".diffusers-attribution.writer.json"
HOLDER_WAIT_S = 5.0  # how long to wait for a new holder to record itself before reporting it unnamed


@contextlib.contextmanager
def writer_lock(directory: Path, run: dict[str, Any]) -> Iterator[None]:
    """Hold `directory`'s writer lock for run `run` inside the block (module docstring)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(directory / LOCK_NAME))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        holder = _holder(directory)
        difference = identity_difference(holder["run"], run) if holder else ("?", "unknown")
        if difference is not None:
            who = f"process {holder['pid']} on {holder['host']}" if holder else "another process"
            detail = f"{', '.join(difference[0])} differ: {difference[1]}" if holder else "it has not said which run"
            raise StoreBusyError(f"{directory} is being written by another featurization ({who}; {detail}). "
                                 "Wait for it to finish, or use another output_dir") from None
        lock.acquire()  # the same run in another process: wait, then resume from (or return) what it wrote
    try:
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "run": run}, sort_keys=True)
        atomic_write(directory / WRITER_NAME, lambda path: Path(path).write_text(record))
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(directory / WRITER_NAME)
        lock.release()


def _holder(directory: Path) -> dict[str, Any] | None:
    """The lock holder's record, waiting up to HOLDER_WAIT_S for a holder that has just taken the lock."""
    deadline = time.monotonic() + HOLDER_WAIT_S
    while True:
        try:
            record = load_json_bounded(directory / WRITER_NAME, 1 << 20)
            if isinstance(record, dict) and isinstance(record.get("run"), dict):
                return record
        except (OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)
