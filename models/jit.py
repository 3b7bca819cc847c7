"""Compiled calls, and a count of the graphs they build.

``ms.jit`` compiles a new graph for every new combination of input shapes (and Python constants).
:func:`call` runs a compiled function and records the first call of each such signature, so a
run can report how many graphs it compiled and how long those first calls took (compile plus
one execution).

A graph whose run raised stays unusable in MindSpore (seen with 2.10): the outputs of the failed run are never
released, so every later run of that graph fails with "Invalid output number for flatten stub output nodes"
(expecting its outputs, finding those of every failed run too), and a new ``ms.jit`` of the same method
finds the same cached graph. :func:`discard_graphs` is the way out after a failure.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import mindspore as ms
from mindspore import Tensor

from models import attention


@dataclass
class CompileLog:
    graphs: int = 0
    seconds: float = 0.0
    seen: set = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def snapshot(self) -> tuple[int, float]:
        return self.graphs, self.seconds


COMPILES = CompileLog()


def _signature(value: Any) -> Any:
    if isinstance(value, Tensor):
        return ("T", tuple(value.shape), str(value.dtype))
    if isinstance(value, (tuple, list)):
        return tuple(_signature(v) for v in value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return type(value).__name__


def call(name: str, fn: Callable, *args: Any) -> Any:
    """``fn(*args)``; the first call of each (name, input signature) counts as one compiled graph."""
    key = (name, id(fn), _signature(args))
    with COMPILES.lock:
        new = key not in COMPILES.seen
        COMPILES.seen.add(key)
    if not new:
        return fn(*args)
    attention.refresh_device()
    start = time.perf_counter()
    out = fn(*args)
    with COMPILES.lock:
        COMPILES.graphs += 1
        COMPILES.seconds += time.perf_counter() - start
    return out


def discard_graphs() -> None:
    """Drop every compiled graph, so that later calls compile afresh: after a compiled call raised. Runs are
    asynchronous, so a graph's failure may surface in a later call, and which graph failed is not known."""
    ms.ms_memory_recycle()
    with COMPILES.lock:
        COMPILES.seen.clear()
