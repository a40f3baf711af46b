"""One stage at a time per workspace, however it was started (``dvc repro``, ``wsss stage``,
``python -m stages.<name>``): a second run refuses at once, naming the run that holds the lock.

DVC locks its own runs (``.dvc/tmp/rwlock``); a direct run of a stage is not covered by it, and two
runs of a stage writing the same ``.partial`` store would mix their results. The lock is an
``flock`` on ``.wsss.lock`` in the workspace root, held until the stage's process exits (the kernel
releases it when a process dies, so a killed run never leaves a stale lock); the file's text says
who holds it. Workers the stage starts (dask, data loaders) do not inherit it.
"""
from __future__ import annotations

import datetime as _dt
import fcntl
import os
from pathlib import Path

LOCK_FILE = Path(".wsss.lock")
_held: dict[str, object] = {}  # resolved lock path -> the open file that holds it (this process)


class WorkspaceBusy(RuntimeError):
    """Another run holds the workspace lock (the message names it)."""


def hold_workspace_lock(stage: str, path: str | Path = LOCK_FILE) -> None:
    """Take the workspace lock for ``stage`` until this process exits, or raise WorkspaceBusy naming
    the holder. Taking it again in the same process (a stage run in-process after another) only
    updates the holder's description."""
    path = Path(path).resolve()
    key = str(path)
    handle = _held.get(key)
    if handle is None:
        handle = open(path, "a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "a run that has not written its name yet"
            handle.close()
            raise WorkspaceBusy(f"another stage is running in this workspace ({path.parent}): {holder}. Wait for it "
                                f"to finish or stop it; two runs at once would write into the same partial "
                                f"results (lock file {path})") from None
        _held[key] = handle
    handle.seek(0)
    handle.truncate()
    started = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    handle.write(f"stage {stage}, pid {os.getpid()}, started {started}\n")
    handle.flush()


def release_workspace_lock(path: str | Path = LOCK_FILE) -> None:
    """Give the lock back before the process ends (tests, long-lived callers)."""
    handle = _held.pop(str(Path(path).resolve()), None)
    if handle is not None:
        handle.close()
