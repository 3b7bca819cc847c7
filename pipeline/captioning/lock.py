"""One run per output: an exclusive lock file beside the output, ``<output>.lock``.

Two runs on one output would both be rank 0, write the same part file and delete
each other's parts after merging them, so rows would be lost. The lock is created
atomically (``O_CREAT | O_EXCL``) on the storage that holds the output, so it also
works between nodes of a cluster. It records the holder's host, pid, process start
time (which tells a reused pid apart), run id and start time, and its mtime is a
heartbeat the holder refreshes every few seconds.

A lock is taken over only when its holder is provably dead:
- on the same host, when its process is gone: automatically (a live one, never);
- elsewhere, with ``force``, once its heartbeat is older than ``STALE_SECONDS``
  (a live holder refreshes it every ``HEARTBEAT_SECONDS``).
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 5.0
STALE_SECONDS = 60.0


class OutputLockedError(RuntimeError):
    """Another run holds the output; the message names it and says what to do."""


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    pid_started: str  # the process's start time in clock ticks since boot ("" where unknown)
    run_id: str
    started: float  # seconds since the epoch


def lock_path(output: Path) -> Path:
    return output.with_name(f"{output.name}.lock")


def _process_started(pid: int) -> str:
    """Field 22 of /proc/<pid>/stat; "" when the process is gone or /proc is absent."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[-1].split()[19]


def _alive(holder: Holder) -> bool:
    """Whether the holder's process still runs (only answerable on its own host)."""
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    started = _process_started(holder.pid)
    return not (holder.pid_started and started and started != holder.pid_started)


def _read(path: Path) -> Holder | None:
    """The holder recorded in ``path``; None for a torn or foreign file."""
    try:
        return Holder(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _describe(holder: Holder | None, age: float) -> str:
    if holder is None:
        return f"an unreadable lock (last touched {age:.0f} s ago)"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.started))
    return (f"run {holder.run_id} (pid {holder.pid} on {holder.host}, started {started}, "
            f"heartbeat {age:.0f} s ago)")


def _takeover_reason(holder: Holder | None, age: float, force: bool) -> str | None:
    """Why this lock may be taken over, or None when its holder may be alive."""
    if holder is not None and holder.host == socket.gethostname():
        return None if _alive(holder) else f"its process {holder.pid} is gone"
    if age > STALE_SECONDS and (force or holder is None):
        return f"its heartbeat is {age:.0f} s old (a live run refreshes it every {HEARTBEAT_SECONDS:g} s)"
    return None


class OutputLock:
    """Held for one run; ``release()`` removes it. A daemon thread keeps its heartbeat fresh."""

    def __init__(self, path: Path, holder: Holder):
        self.path = path
        self.holder = holder
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="output-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                os.utime(self.path)
            except OSError as exc:
                logger.warning("cannot refresh the lock %s: %s", self.path, exc)

    def release(self) -> None:
        self._stop.set()
        self._thread.join()
        if _read(self.path) == self.holder:
            self.path.unlink(missing_ok=True)


def _create(path: Path, holder: Holder) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with open(fd, "w") as fh:
        json.dump(asdict(holder), fh)
        fh.flush()
        os.fsync(fh.fileno())
    return True


def _remove_stale(path: Path, seen: Holder | None) -> None:
    """Remove the stale lock we judged, and nothing else: rename it aside first (atomic,
    only one taker wins), then put it back if it turned out to be a newer lock."""
    aside = path.with_name(f"{path.name}.{uuid.uuid4().hex}.stale")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return  # another taker was faster
    if _read(aside) != seen:
        try:
            os.link(aside, path)
        except FileExistsError:
            pass
    aside.unlink(missing_ok=True)


def acquire(output: Path, run_id: str, force: bool = False) -> OutputLock:
    """Take the output's lock, or raise OutputLockedError naming the live holder."""
    path = lock_path(output)
    holder = Holder(socket.gethostname(), os.getpid(), _process_started(os.getpid()), run_id, time.time())
    for _ in range(5):
        if _create(path, holder):
            return OutputLock(path, holder)
        seen = _read(path)
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            continue
        reason = _takeover_reason(seen, age, force)
        if reason is None:
            advice = (f"wait for it, stop it, or delete {path} if you know it is dead"
                      if force else f"if it is dead (e.g. its node crashed), re-run with --force once its "
                                    f"heartbeat is over {STALE_SECONDS:g} s old")
            raise OutputLockedError(f"{output} is being written by {_describe(seen, age)}; two runs on one "
                                    f"output would lose rows. Use another --output, or {advice}")
        logger.warning("taking over %s from %s: %s", path, _describe(seen, age), reason)
        _remove_stale(path, seen)
    raise OutputLockedError(f"could not take {path}: other runs keep taking it; start one run per output")
