"""Video decoding in worker processes, with a time limit per video.

Why processes: decord can deadlock holding the GIL (its issue 373), a damaged file can
keep a demuxer busy for minutes, and a thread cannot be stopped; a process can be
killed. A request over its time limit kills its worker (SIGKILL) and raises
``DecodeTimeoutError``; a worker that dies (a crash, the kernel's OOM killer) raises
``DecoderDiedError``. Both are ``VideoReadError``s naming the file, so the runner
writes them as error rows like any unreadable video, and the next request gets a
fresh worker. Any other exception in a worker comes back with its own type and message.

Workers are fresh interpreters (``python -m pipeline.datasets.decode_pool``), never
forks of a process that runs MindSpore. They are not multiprocessing's "spawn"
processes because those re-import the parent's main script, and with it MindSpore,
in every worker; these import only the video reader. Each serves one request at a
time over a Unix socket.

Frames come back in a memfd (anonymous shared memory) whose descriptor is passed over
the socket: the worker copies the decoded frames into it once, and the parent's array
is a mapping of it, not a copy. The memory has no name, so a killed worker or parent
leaves nothing in /dev/shm; the kernel frees it with the last mapping. Workers also
die with their parent (Linux's parent-death signal), even in a decode that holds the GIL.
"""
from __future__ import annotations

import ctypes
import logging
import mmap
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
from multiprocessing.connection import Connection
from multiprocessing.reduction import recv_handle, send_handle
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline.datasets.video import VideoReadError, probe_duration, sample_frames

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 120.0  # seconds for one video of up to FRAMES_PER_TIMEOUT requested frames
FRAMES_PER_TIMEOUT = 32
STARTUP_TIMEOUT = 60.0  # a worker's interpreter start and imports, not counted in any request's limit
_PR_SET_PDEATHSIG = 1
_PROJECT_ROOT = Path(__file__).resolve().parents[2]
_OPERATIONS: dict[str, Callable[..., Any]] = {"sample_frames": sample_frames, "probe_duration": probe_duration}


def default_timeout(num_frames: int | None) -> float:
    """120 s per video, and 120 s more per further 32 requested frames (decoding grows with the count)."""
    return DEFAULT_TIMEOUT * max(1.0, (num_frames or 1) / FRAMES_PER_TIMEOUT)


class DecodeTimeoutError(VideoReadError):
    """Decoding one video took longer than its time limit, so its worker process was killed."""


class DecoderDiedError(VideoReadError):
    """The worker process died while it decoded this video (a crash, or killed for memory)."""


# ----------------------------------------------------------------------------- worker side

def _portable_error(exc: Exception) -> tuple[str, bytes | None]:
    """The exception as (message, pickled type/args/attributes); the pickle is None where it cannot be made."""
    message = f"{type(exc).__name__}: {exc}"
    try:
        return message, pickle.dumps((type(exc), exc.args, vars(exc)))
    except Exception:  # noqa: BLE001 - an attribute that does not pickle: the message alone
        return message, None


def _to_memfd(frames: np.ndarray) -> int:
    """A memfd holding ``frames``' bytes (one copy); the caller closes it."""
    fd = os.memfd_create("decoded-frames", os.MFD_CLOEXEC)
    view = memoryview(np.ascontiguousarray(frames)).cast("B")
    written = 0
    while written < len(view):
        written += os.write(fd, view[written:])
    return fd


def _serve(conn: Connection) -> None:
    """Answer requests until the parent closes the socket."""
    conn.send(("ready", os.getpid()))
    while True:
        try:
            operation, args, kwargs = conn.recv()
        except EOFError:
            return
        try:
            result = _OPERATIONS[operation](*args, **kwargs)
            fd = _to_memfd(result[0]) if operation == "sample_frames" else None
        except Exception as exc:  # noqa: BLE001 - every failure goes back to the parent as itself
            conn.send(("error", _portable_error(exc)))
            continue
        if fd is None:
            conn.send(("value", result))
            continue
        frames, indices = result
        try:
            conn.send(("frames", frames.shape, frames.dtype.str, indices))
            send_handle(conn, fd, os.getppid())
        finally:
            os.close(fd)


def _die_with_parent(parent: int) -> None:
    """Have the kernel SIGKILL this worker when its parent goes (Linux; elsewhere the socket's EOF ends it).

    The signal follows the parent *thread* that started the worker, so a worker started
    from a thread that has ended is gone too; the pool replaces it at its next request.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the call above
        os._exit(0)


def _worker_main(fd: int, parent: int) -> None:
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops the workers
    with Connection(fd) as conn:
        try:
            _serve(conn)
        except (BrokenPipeError, ConnectionResetError):  # the parent went away mid-answer
            pass


# ----------------------------------------------------------------------------- parent side

class _RemoteError:
    """An exception raised in a worker, to be raised again in the caller once the worker is back in the pool."""

    def __init__(self, message: str, pickled: bytes | None):
        self.message = message
        self.pickled = pickled

    def rebuild(self) -> Exception:
        """The same type, args and attributes (its ``__init__`` is not run again), else a RuntimeError."""
        if self.pickled is not None:
            try:
                cls, args, state = pickle.loads(self.pickled)
                exc = cls.__new__(cls, *args)
                exc.args = args
                exc.__dict__.update(state)
                return exc
            except Exception:  # noqa: BLE001 - a type this process cannot rebuild: keep the message
                logger.debug("cannot rebuild the decoder's exception %s", self.message, exc_info=True)
        return RuntimeError(self.message)


def _map_frames(fd: int, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """The worker's frames as an array over a shared mapping of its memfd (no copy; freed with the array)."""
    try:
        size = int(np.prod(shape)) * np.dtype(dtype).itemsize
        return np.frombuffer(mmap.mmap(fd, size), dtype=dtype).reshape(shape)
    finally:
        os.close(fd)


def _worker_env() -> dict[str, str]:
    """The parent's environment, with this project importable from any working directory."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_PROJECT_ROOT), env.get("PYTHONPATH")) if p)
    return env


class _Worker:
    """One decoding process and its socket; used by one thread at a time."""

    def __init__(self) -> None:
        parent_end, child_end = socket.socketpair()
        with parent_end, child_end:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pipeline.datasets.decode_pool", str(child_end.fileno()), str(os.getpid())],
                pass_fds=(child_end.fileno(),), stdin=subprocess.DEVNULL, env=_worker_env())
            self.conn = Connection(parent_end.detach())
        self.ready = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def call(self, path: str, request: tuple, timeout: float) -> Any:
        """The worker's answer (a _RemoteError for an exception it raised); raises if it hangs or dies."""
        try:
            if not self.ready:
                if not self.conn.poll(STARTUP_TIMEOUT):
                    self.kill()
                    raise DecoderDiedError(path, f"the decoder process did not start within {STARTUP_TIMEOUT:g} s")
                self.conn.recv()
                self.ready = True
            self.conn.send(request)
            if not self.conn.poll(timeout):
                self.kill()
                raise DecodeTimeoutError(path, f"decoding took longer than {timeout:g} s (--decode_timeout); "
                                               f"the decoder was stopped")
            kind, *answer = self.conn.recv()
            fd = recv_handle(self.conn) if kind == "frames" else None
        except (EOFError, ConnectionError) as exc:
            raise self._died(path) from exc
        if fd is not None:
            shape, dtype, indices = answer
            return _map_frames(fd, shape, dtype), indices
        return _RemoteError(*answer[0]) if kind == "error" else answer[0]

    def _died(self, path: str) -> DecoderDiedError:
        try:
            code = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # its socket broke but it lives on: it cannot be trusted
            self.kill()
            code = self.proc.wait()
        how = f"signal {-code}" if code < 0 else f"exit status {code}"
        return DecoderDiedError(path, f"the decoder process died ({how})")

    def kill(self) -> None:
        """SIGKILL the process (any thread may call this; the socket stays open for its user)."""
        if self.alive():
            self.proc.kill()

    def stop(self) -> None:
        """Kill, reap and close; only the thread using this worker, or the pool for an idle one, calls it."""
        self.kill()
        self.proc.wait()
        self.conn.close()


class DecodePool:
    """``num_workers`` decoding processes; any number of threads call it, each request gets a free worker.

    ``sample_frames`` and ``probe_duration`` take the same arguments as their
    ``pipeline.datasets.video`` namesakes, plus ``timeout`` seconds. Close the pool
    (or use it as a context manager) to stop the workers; closing also stops decodes
    in flight, whose callers get ``DecoderDiedError``.
    """

    def __init__(self, num_workers: int) -> None:
        if num_workers < 1:
            raise ValueError(f"a decode pool needs at least one worker, got {num_workers}")
        self._lock = threading.Condition()
        self._closed = False
        self._idle: list[_Worker | None] = []  # None: a lost worker's slot; its replacement starts on next use
        self._workers: set[_Worker] = set()
        try:
            with self._lock:  # all start at once; each is met (its "ready") at its first request
                self._idle = [self._start_worker() for _ in range(num_workers)]
        except BaseException:
            self.close()
            raise

    def _start_worker(self) -> _Worker:
        """A new worker, registered so close() stops it (called with the lock held)."""
        if self._closed:
            raise RuntimeError("the decode pool is closed")
        worker = _Worker()
        self._workers.add(worker)
        return worker

    def pids(self) -> list[int]:
        """The worker processes' ids (for monitoring and tests)."""
        with self._lock:
            return [worker.pid for worker in self._workers]

    def _acquire(self) -> _Worker:
        with self._lock:
            while not self._idle and not self._closed:
                self._lock.wait()
            if self._closed:
                raise RuntimeError("the decode pool is closed")
            worker = self._idle.pop()
            if worker is not None and not worker.alive():
                logger.warning("decoder process %d died while idle (exit %s); starting another",
                               worker.pid, worker.proc.returncode)
                worker.stop()
                self._workers.discard(worker)
                worker = None
            return self._start_worker() if worker is None else worker

    def _release(self, worker: _Worker | None) -> None:
        """Give the slot back; None: its worker was lost and a new one starts on the slot's next use."""
        with self._lock:
            if self._closed:
                if worker is not None:
                    worker.stop()
                return
            self._idle.append(worker)
            self._lock.notify()

    def _call(self, path: str | os.PathLike, operation: str, args: tuple, kwargs: dict, timeout: float) -> Any:
        path = str(path)
        worker = self._acquire()
        try:
            answer = worker.call(path, (operation, (path, *args), kwargs), timeout)
        except BaseException:
            with self._lock:
                self._workers.discard(worker)
            worker.stop()
            worker = None
            raise
        finally:
            self._release(worker)
        if isinstance(answer, _RemoteError):
            raise answer.rebuild()
        return answer

    def sample_frames(self, path: str | os.PathLike, timeout: float, **kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
        """``video.sample_frames`` in a worker; the frames are a shared mapping, not a copy."""
        return self._call(path, "sample_frames", (), kwargs, timeout)

    def probe_duration(self, path: str | os.PathLike, timeout: float, **kwargs: Any) -> float:
        """``video.probe_duration`` in a worker (the PyAV fallback decodes the whole video)."""
        return self._call(path, "probe_duration", (), kwargs, timeout)

    def close(self) -> None:
        """Stop every worker now, busy or idle, and reap them; later requests raise RuntimeError."""
        with self._lock:
            self._closed = True
            idle = [worker for worker in self._idle if worker is not None]
            self._idle.clear()
            busy = self._workers.difference(idle)
            self._workers.clear()
            self._lock.notify_all()
        for worker in busy:  # their threads see the socket close and stop them
            worker.kill()
            worker.proc.wait()
        for worker in idle:
            worker.stop()

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


if __name__ == "__main__":
    _worker_main(int(sys.argv[1]), int(sys.argv[2]))
