"""The one worker of a data directory: an flock that dies with its process, and who holds it."""
from __future__ import annotations

import contextlib
import fcntl
import time
from pathlib import Path
from typing import Iterator


class WorkerLock:
    """The worker lock: a part of ``kdcore.store.Store``, built on its ``Database``."""

    @property
    def worker_lock_path(self) -> Path:
        return self.root / "worker.lock"

    @contextlib.contextmanager
    def hold_worker_lock(self, pid: int, wait_seconds: float = 3.0) -> Iterator[bool]:
        """Try to become the one worker of this directory; yields whether it succeeded.

        An flock dies with its process, so a killed worker never leaves a stale lock behind. It is retried for
        ``wait_seconds`` because ``worker_pid`` briefly takes a shared lock to look.
        """
        with open(self.worker_lock_path, "a+") as fh:
            deadline = time.monotonic() + wait_seconds
            while True:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        yield False
                        return
                    time.sleep(0.1)
            fh.seek(0)
            fh.truncate()
            fh.write(str(pid))
            fh.flush()
            try:
                yield True
            finally:
                fh.truncate(0)
                fcntl.flock(fh, fcntl.LOCK_UN)

    def worker_pid(self) -> int | None:
        """Pid of the worker holding the lock, or None if no worker is running."""
        try:
            fh = open(self.worker_lock_path, "r")
        except FileNotFoundError:
            return None
        with fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                text = fh.read().strip()
                return int(text) if text.isdigit() else -1  # -1: locked, pid not written yet
            fcntl.flock(fh, fcntl.LOCK_UN)
            return None
