"""Device selection, msrun process group, and how ranks meet (msrun-aware).

A plain ``python`` run is rank 0 of 1. Under ``msrun`` every worker calls
``mindspore.communication.init()`` and binds its local device.

Ranks that may arrive far apart (one merging a million-row CSV, one loading a model
slowly) meet through marker files, not collectives: a CPU all-reduce fails when
ranks arrive ~30 s apart, and HCCL has its own timeouts. The one collective is an
all-reduce right after ``init()`` (a rendezvous, so ranks are aligned) that agrees
on a run id naming this run's marker files.
"""
from __future__ import annotations

import glob
import logging
import os
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import mindspore as ms
import numpy as np

from pipeline import environment

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: str
    run_id: str = "local"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_STATE: dict = {"info": None}


def launched_by_msrun() -> bool:
    """True in msrun's workers and in its scheduler process (which must call init() too)."""
    return os.environ.get("MS_ROLE") in ("MS_WORKER", "MS_SCHED")


def default_device() -> str:
    """Ascend where MindSpore can load it, else CPU (without MindSpore's warnings that it cannot)."""
    try:
        with environment.quiet_device_probe():
            if ms.device_context.ascend.is_available():
                return "Ascend"
    except Exception:  # noqa: BLE001 - a missing plugin just means no Ascend
        pass
    return "CPU"


def setup(device: str | None = None) -> DistInfo:
    """Select the device and, under msrun, join the process group. Idempotent."""
    if _STATE["info"] is not None:
        return _STATE["info"]
    device = device or default_device()
    if device not in ("Ascend", "CPU", "GPU"):
        raise ValueError(f"--device must be Ascend or CPU (got {device!r})")
    rank, world, local_rank = 0, 1, 0
    if launched_by_msrun():
        from mindspore.communication import get_group_size, get_local_rank, get_rank, init

        local_rank = int(os.environ.get("DEVICE_ID", "0"))
        ms.set_device(device, local_rank if device != "CPU" else None)
        init()
        rank, world, local_rank = get_rank(), get_group_size(), get_local_rank()
    else:
        ms.set_device(device)
    run_id = _agree_run_id(rank) if world > 1 else secrets.token_hex(6)
    info = DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device, run_id=run_id)
    _STATE["info"] = info
    logger.info("device %s, rank %d of %d", device, rank, world)
    return info


def _agree_run_id(rank: int) -> str:
    """Rank 0's random id, shared through one all-reduce while the ranks are still aligned."""
    from mindspore import ops

    mine = np.array([secrets.randbelow(2**23) if rank == 0 else 0], np.float32)
    return f"{int(ops.AllReduce()(ms.Tensor(mine)).asnumpy()[0]):06x}"


def info() -> DistInfo:
    if _STATE["info"] is None:
        raise RuntimeError("call pipeline.distributed.setup() first")
    return _STATE["info"]


class RunAborted(RuntimeError):
    """Another rank stopped the run before it began (e.g. the output is locked); carries its message."""


class FileBarrier:
    """Ranks meet by writing marker files in a folder beside the output, which every rank can see.

    ``wait(stage)`` returns once all ranks have reached ``stage``; ``arrive(stage)`` marks
    this rank without waiting; ``abort(message)`` makes every waiting rank raise
    RunAborted. The folder, ``.<output name>.sync-<run id>``, carries the run id, so a
    crashed run's leftovers never count (``stale_folders`` finds them).
    """

    def __init__(self, output: str | Path, poll_seconds: float = 0.2):
        self.info = info()
        self.prefix = f".{Path(output).name}.sync-"
        self.folder = Path(output).with_name(f"{self.prefix}{self.info.run_id}")
        self.poll_seconds = poll_seconds

    def arrive(self, stage: str) -> None:
        if self.info.world_size == 1:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"{stage}.{self.info.rank}").touch()

    def abort(self, message: str) -> None:
        if self.info.world_size == 1:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "abort").write_text(message, encoding="utf-8")

    def wait(self, stage: str, ranks: range | None = None) -> None:
        """Arrive at ``stage`` and block until every rank (or those in ``ranks``) has."""
        if self.info.world_size == 1:
            return
        self.arrive(stage)
        expected = [self.folder / f"{stage}.{r}" for r in (ranks or range(self.info.world_size))]
        aborted = self.folder / "abort"
        logged = False
        while not all(p.exists() for p in expected):
            if aborted.exists():
                raise RunAborted(aborted.read_text(encoding="utf-8"))
            if not logged:
                logger.info("rank %d waiting for the other ranks at %s", self.info.rank, stage)
                logged = True
            time.sleep(self.poll_seconds)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def stale_folders(self) -> list[Path]:
        """Sync folders of earlier runs on this output (only safe to remove while holding its lock)."""
        return [p for p in self.folder.parent.glob(f"{glob.escape(self.prefix)}*") if p.is_dir() and p != self.folder]


def barrier() -> None:
    """Collective barrier for ranks that run in lockstep (training steps); no-op for one process.

    A one-element all-reduce (Barrier has no CPU kernel). It fails on CPU when ranks arrive
    ~30 s apart, so work of uneven length meets through :class:`FileBarrier` instead.
    """
    if _STATE["info"] is None or _STATE["info"].world_size == 1:
        return
    from mindspore import ops

    ops.AllReduce()(ms.Tensor(np.ones(1, np.float32))).asnumpy()


def all_reduce_sum(values: np.ndarray) -> np.ndarray:
    """Sum a small float array over ranks (summary counters, gradient means)."""
    info = _STATE["info"]
    if info is None or info.world_size == 1:
        return np.asarray(values)
    from mindspore import ops

    return ops.AllReduce()(ms.Tensor(np.asarray(values, np.float32))).asnumpy()
