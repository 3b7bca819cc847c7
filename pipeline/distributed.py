"""Device selection and the few collectives the pipeline needs (msrun-aware).

A plain ``python`` run is rank 0 of 1. Under ``msrun`` every worker calls
``mindspore.communication.init()`` and binds its local device. The barrier is a
one-element all-reduce, because the Barrier op has no CPU kernel.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import mindspore as ms
import numpy as np

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_STATE: dict = {"info": None}


def launched_by_msrun() -> bool:
    """True in msrun's workers and in its scheduler process (which must call init() too)."""
    return os.environ.get("MS_ROLE") in ("MS_WORKER", "MS_SCHED")


def default_device() -> str:
    """Ascend where MindSpore can load it, else CPU."""
    try:
        if ms.hal.is_available("Ascend"):
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
    info = DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)
    _STATE["info"] = info
    logger.info("device %s, rank %d of %d", device, rank, world)
    return info


def barrier() -> None:
    """Block until every rank arrives (no-op for a single process)."""
    info = _STATE["info"]
    if info is None or info.world_size == 1:
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
