"""Tensor parallelism (Megatron-style) for the language models: one set of layers every family uses.

A tensor-parallel group is ``size`` consecutive ranks of the msrun world (rank r belongs to group
r // size), so a group sits inside one node and groups are the data-parallel replicas. Within a
group:

- :class:`ColumnParallelLinear` keeps a slice of the output features (q/k/v, gate/up, fc1, a
  vocabulary head). Its bias is sliced the same way.
- :class:`RowParallelLinear` keeps the matching slice of the input features, sums the partial
  products with an all-reduce, then adds its bias once (o_proj, down_proj, fc2).
- :class:`VocabParallelEmbedding` keeps a slice of the vocabulary; ids outside it look up zeros
  and an all-reduce completes the row. A vocabulary the group size does not divide stays whole.
- :func:`vocab_head` and :func:`tied_logits` gather the vocabulary slices of the logits, so ``forward``
  and ``generate`` see full logits, bit-identical on every rank, and make identical decisions.
- :func:`split_heads` gives a rank its query heads and the key/value heads they read; the KV cache
  holds only those. A Gated DeltaNet (``models.linear_attention``) splits by key heads with their value heads.

Layers are built inside :func:`building`; with no group (or size 1) they are the plain layers, with
the same parameter names, so checkpoints and single-device code do not change. Each sliced cell
declares ``checkpoint_slices`` (:func:`slice_spec`: one range of a dimension, or several concatenated, such
as a rank's q, k and v rows of one fused projection) and the loader (``models.checkpoint``) reads only that part
of each tensor, so a rank's host memory is about the model's size divided by the group size.

Collectives: ``mindspore.communication`` (HCCL groups on Ascend; on CPU MindSpore 2.7 to 2.9 reduce only
over the world group, so a group that is the whole world uses it there too). A CPU group smaller
than the world (tp x dp on one machine) uses :class:`HostCommunicator`, a Unix-socket exchange run
from inside the compiled graphs as a Python custom op.
"""
from __future__ import annotations

import logging
import os
import socket
import struct
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from models.layers import Embedding, Linear

logger = logging.getLogger(__name__)

CONNECT_SECONDS = 600.0  # how long a rank waits for the rest of its group to come up


class TensorParallelError(ValueError):
    """A model or world that cannot be split as asked (sizes that do not divide, no process group)."""


@dataclass(frozen=True)
class TensorParallelGroup:
    """This rank's place in its tensor-parallel group and the collectives the layers call."""

    size: int = 1
    rank: int = 0
    first_rank: int = 0
    comm: Optional["Communicator"] = None

    def split(self, total: int, what: str) -> tuple[int, int]:
        """This rank's [start, stop) of ``total`` items split evenly; ``what`` names them in the error."""
        if total % self.size:
            raise TensorParallelError(f"{what} ({total}) is not divisible by tp_size {self.size}; "
                                      f"use a tp_size that divides it")
        part = total // self.size
        return self.rank * part, (self.rank + 1) * part

    def reducer(self) -> Optional[nn.Cell]:
        """A cell summing its input over the group (None for one rank)."""
        return None if self.size == 1 else self.comm.reducer()

    def gatherer(self) -> Optional[nn.Cell]:
        """A cell concatenating the ranks' inputs along the last axis, in group order (None for one rank)."""
        return None if self.size == 1 else self.comm.gatherer()


SINGLE = TensorParallelGroup()
_STATE = {"group": SINGLE}


def current() -> TensorParallelGroup:
    """The group layers are being built for (:data:`SINGLE` outside :func:`building`)."""
    return _STATE["group"]


@contextmanager
def building(group: TensorParallelGroup) -> Iterator[TensorParallelGroup]:
    """Build layers for ``group`` inside this block."""
    previous = _STATE["group"]
    _STATE["group"] = group
    try:
        yield group
    finally:
        _STATE["group"] = previous


def require_unsplit(what: str) -> None:
    """Raise for a model part that has no tensor-parallel version when one is asked for."""
    if current().size > 1:
        raise TensorParallelError(f"{what} has no tensor-parallel version; run it with tp_size 1 "
                                  f"(data parallel: one replica per device)")


_GROUPS: dict[int, TensorParallelGroup] = {}


def init_group(tp_size: int) -> TensorParallelGroup:
    """This rank's group of ``tp_size`` consecutive ranks; the msrun process group must be up."""
    if tp_size == 1:
        return SINGLE
    if tp_size in _GROUPS:
        return _GROUPS[tp_size]
    from mindspore.communication import get_group_size, get_local_rank_size, get_rank

    try:
        world, rank = get_group_size(), get_rank()
    except RuntimeError as exc:
        raise TensorParallelError(f"tp_size {tp_size} needs the msrun process group (launch with msrun and call "
                                  f"mindspore.communication.init() first): {exc}") from exc
    if tp_size < 1 or world % tp_size:
        raise TensorParallelError(f"tp_size {tp_size} must divide the number of workers ({world}): the world is "
                                  f"tp_size x data-parallel groups; launch a multiple of {tp_size} workers with "
                                  f"msrun (msrun --worker_num={tp_size} ... for one group)")
    local = get_local_rank_size()
    if local % tp_size:
        raise TensorParallelError(f"tp_size {tp_size} must divide the workers per node ({local}), so that a "
                                  f"group sits inside one node: set msrun's --local_worker_num to a multiple of it")
    first = rank - rank % tp_size
    if tp_size == world:
        comm: Communicator = MindSporeCommunicator("hccl_world_group" if _on_ascend() else None, tp_size)
    elif _on_ascend():
        from mindspore.communication import create_group

        name = f"tp{tp_size}_{first}"
        create_group(name, list(range(first, first + tp_size)))
        comm = MindSporeCommunicator(name, tp_size)
    else:
        comm = HostCommunicator(rank - first, tp_size, f"{first}")
    group = TensorParallelGroup(tp_size, rank - first, first, comm)
    _GROUPS[tp_size] = group
    logger.info("rank %d: tensor-parallel rank %d of %d (ranks %d..%d)", rank, group.rank, tp_size, first,
                first + tp_size - 1)
    return group


def _on_ascend() -> bool:
    return ms.get_context("device_target") == "Ascend"


def _gather_order(ndim: int) -> tuple[int, ...]:
    """Axes that move the stacked group axis (0) of (size, ..., n) to just before the last axis."""
    return tuple(range(1, ndim)) + (0, ndim)


class Communicator:
    """Builds the collective cells of one group; they run inside ``ms.jit`` graphs and in PyNative."""

    def reducer(self) -> nn.Cell:
        raise NotImplementedError

    def gatherer(self) -> nn.Cell:
        raise NotImplementedError


class _Apply(nn.Cell):
    """One collective primitive as a cell."""

    def __init__(self, op):
        super().__init__()
        self.op = op

    def construct(self, x: Tensor) -> Tensor:
        return self.op(x)


class _GatherLast(nn.Cell):
    """AllGather stacks the ranks' inputs on a new leading block; move it next to the last axis."""

    def __init__(self, op, size: int):
        super().__init__()
        self.op, self.size = op, size

    def construct(self, x: Tensor) -> Tensor:
        stacked = self.op(x).reshape((self.size,) + x.shape)
        return ops.transpose(stacked, _gather_order(x.ndim)).reshape(x.shape[:-1] + (self.size * x.shape[-1],))


class MindSporeCommunicator(Communicator):
    """``mindspore.ops`` collectives over a named group (None: the world group)."""

    def __init__(self, group: Optional[str], size: int):
        self.kwargs = {} if group is None else {"group": group}
        self.size = size

    def reducer(self) -> nn.Cell:
        return _Apply(ops.AllReduce(**self.kwargs))

    def gatherer(self) -> nn.Cell:
        return _GatherLast(ops.AllGather(**self.kwargs), self.size)


class HostCommunicator(Communicator):
    """Group collectives over Unix sockets, for CPU groups smaller than the world.

    The group's first rank listens at a socket path named after the msrun job (the workers' parent
    process and the scheduler port) and the group; the others connect. Every call sends each rank's
    array to the first rank, which combines them in group order and sends the one result back, so
    every rank holds the same bits. The exchange runs inside compiled graphs as a ``pyfunc`` custom
    op; a group's collectives lie on one dependency chain, so every rank calls them in one order.
    """

    def __init__(self, rank: int, size: int, name: str):
        self.rank, self.size = rank, size
        job = f"{os.getppid()}-{os.environ.get('MS_SCHED_PORT', '0')}"
        self.path = os.path.join(tempfile.gettempdir(), f"mscaption-tp-{job}-{name}.sock")
        self.peers: list[socket.socket] = []
        self.leader: Optional[socket.socket] = None
        if rank == 0:
            self._accept()
        else:
            self._connect()

    def reducer(self) -> nn.Cell:
        return _Apply(ops.Custom(self._reduce, out_shape=lambda shape: shape, out_dtype=lambda dtype: dtype,
                                 func_type="pyfunc"))

    def gatherer(self) -> nn.Cell:
        size = self.size
        return _Apply(ops.Custom(self._gather, out_shape=lambda shape: shape[:-1] + [shape[-1] * size],
                                 out_dtype=lambda dtype: dtype, func_type="pyfunc"))

    def _accept(self) -> None:
        if os.path.exists(self.path):
            os.unlink(self.path)  # a crashed run's leftover
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(self.path)
        server.listen(self.size)
        server.settimeout(CONNECT_SECONDS)
        peers: dict[int, socket.socket] = {}
        try:
            while len(peers) < self.size - 1:
                conn, _ = server.accept()
                conn.settimeout(None)
                (peer,) = struct.unpack("<i", _receive(conn, 4))
                peers[peer] = conn
        except socket.timeout as exc:
            raise TensorParallelError(f"tensor-parallel rank 0 waited {CONNECT_SECONDS:.0f}s at {self.path} for "
                                      f"ranks {sorted(set(range(1, self.size)) - set(peers))}") from exc
        finally:
            server.close()
            os.unlink(self.path)
        self.peers = [peers[r] for r in range(1, self.size)]

    def _connect(self) -> None:
        deadline = time.monotonic() + CONNECT_SECONDS
        while True:
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                conn.connect(self.path)
                conn.sendall(struct.pack("<i", self.rank))
                self.leader = conn
                return
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                conn.close()
                if time.monotonic() > deadline:
                    raise TensorParallelError(f"tensor-parallel rank {self.rank} found no group leader at "
                                              f"{self.path} after {CONNECT_SECONDS:.0f}s") from exc
                time.sleep(0.05)

    def _exchange(self, x: np.ndarray, gather: bool) -> np.ndarray:
        """Each message starts with its byte count; the first rank answers a count that differs from its own
        (ranks that reached a collective with different inputs) with -1, and every rank raises."""
        x = np.ascontiguousarray(x)
        shape = x.shape[:-1] + (x.shape[-1] * self.size,) if gather else x.shape
        if self.rank:
            self.leader.sendall(struct.pack("<q", x.nbytes) + x.tobytes())
            (size,) = struct.unpack("<q", _receive(self.leader, 8))
            if size < 0:
                raise TensorParallelError(_MISMATCH)
            return np.frombuffer(_receive(self.leader, size), x.dtype).reshape(shape)
        parts, sizes = [x], [x.nbytes]
        for peer in self.peers:
            (size,) = struct.unpack("<q", _receive(peer, 8))
            sizes.append(size)
            parts.append(np.frombuffer(_receive(peer, size), x.dtype))
        if len(set(sizes)) > 1:
            for peer in self.peers:
                peer.sendall(struct.pack("<q", -1))
            raise TensorParallelError(f"{_MISMATCH} (bytes per rank: {sizes})")
        parts = [parts[0]] + [part.reshape(x.shape) for part in parts[1:]]
        out = np.ascontiguousarray(np.concatenate(parts, axis=-1) if gather else _sum(parts))
        for peer in self.peers:
            peer.sendall(struct.pack("<q", out.nbytes) + out.tobytes())
        return out

    def _reduce(self, x: np.ndarray) -> np.ndarray:
        return self._exchange(x, gather=False)

    def _gather(self, x: np.ndarray) -> np.ndarray:
        return self._exchange(x, gather=True)


_MISMATCH = ("the ranks of a tensor-parallel group reached a collective with inputs of different sizes (a batch "
             "that differs between them, e.g. a video that failed to decode on one rank only)")


def _sum(parts: list[np.ndarray]) -> np.ndarray:
    out = parts[0].copy()
    for part in parts[1:]:
        out += part
    return out


def _receive(conn: socket.socket, size: int) -> bytes:
    data = bytearray(size)
    view, got = memoryview(data), 0
    while got < size:
        n = conn.recv_into(view[got:], size - got)
        if n == 0:
            raise TensorParallelError("a tensor-parallel peer closed its connection (it stopped or crashed)")
        got += n
    return bytes(data)


# --- layers


Ranges = Sequence[tuple[int, int]]


def _merged(ranges: Ranges) -> list[tuple[int, int]]:
    """``ranges`` in their order, each joined to the one before where it starts at that one's stop."""
    out: list[tuple[int, int]] = []
    for start, stop in ranges:
        if out and out[-1][1] == start:
            out[-1] = (out[-1][0], stop)
        else:
            out.append((int(start), int(stop)))
    return out


def slice_spec(dim: int, ranges: Ranges, full: int) -> Optional[tuple]:
    """The ``checkpoint_slices`` entry (``models.checkpoint``) of a parameter holding ``ranges`` [(start, stop), ...]
    of the ``full`` entries along ``dim``, concatenated in that order: ``(dim, start, stop, full)`` for one range,
    ``(dim, ((start, stop), ...), full)`` for several; None when that is the whole tensor."""
    merged = _merged(ranges)
    if merged == [(0, full)]:
        return None
    if len(merged) == 1:
        return (dim, merged[0][0], merged[0][1], full)
    return (dim, tuple(merged), full)


class ColumnParallelLinear(Linear):
    """A Linear holding output features [start, stop) of this rank (default: an even split), or several such
    ranges concatenated (``rows`` a list of them: a fused projection whose rank part lies in several places).

    ``gather_output`` concatenates the ranks' outputs (a vocabulary head); otherwise the output stays
    sliced for a following :class:`RowParallelLinear`.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 rows: Optional[tuple[int, int] | Ranges] = None, gather_output: bool = False,
                 what: str = "output features"):
        group = current()
        if rows is None:
            ranges = [group.split(out_features, what)]
        else:
            ranges = list(rows) if isinstance(rows[0], (tuple, list)) else [tuple(rows)]
        super().__init__(in_features, sum(stop - start for start, stop in ranges), bias)
        self.gather = group.gatherer() if gather_output else None
        spec = slice_spec(0, ranges, out_features)
        if spec is not None:
            self.checkpoint_slices = {"weight": spec, "bias": spec}

    def construct(self, x: Tensor) -> Tensor:
        y = super().construct(x)
        return y if self.gather is None else self.gather(y)


class RowParallelLinear(Linear):
    """A Linear holding input features [start, stop) of this rank: partial products summed over the group,
    then the (whole) bias added once."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 cols: Optional[tuple[int, int]] = None, what: str = "input features"):
        group = current()
        start, stop = cols or group.split(in_features, what)
        super().__init__(stop - start, out_features, bias)
        self.reduce = group.reducer()
        if (start, stop) != (0, in_features):
            self.checkpoint_slices = {"weight": (1, start, stop, in_features)}

    def construct(self, x: Tensor) -> Tensor:
        shape = x.shape
        y = self.matmul(x.reshape(-1, shape[-1]), self.weight)
        if self.reduce is not None:
            y = self.reduce(y)
        if self.has_bias:
            y = y + self.bias
        return y.reshape(shape[:-1] + (self.out_features,))


class VocabParallelEmbedding(Embedding):
    """An Embedding holding token rows [start, stop); whole when the group size does not divide the vocabulary.

    ``gather_logits`` completes logits computed against this (sliced) table (None: not sliced).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int):
        group = current()
        split = group.size > 1 and num_embeddings % group.size == 0
        start, stop = group.split(num_embeddings, "vocab_size") if split else (0, num_embeddings)
        super().__init__(stop - start, embedding_dim)
        self.start, self.rows = start, stop - start
        self.reduce = group.reducer() if split else None
        self.gather_logits = group.gatherer() if split else None
        if split:
            self.checkpoint_slices = {"weight": (0, start, stop, num_embeddings)}

    def construct(self, ids: Tensor) -> Tensor:
        if self.reduce is None:
            return super().construct(ids)
        local = ids.astype(ms.int32) - self.start
        inside = ops.logical_and(local >= 0, local < self.rows)
        rows = self.gather(self.weight, ops.where(inside, local, ops.zeros_like(local)), 0)
        return self.reduce(rows * inside[..., None].astype(rows.dtype))


def vocab_head(hidden_size: int, vocab_size: int) -> Linear:
    """An untied LM head giving full-vocabulary logits: vocabulary-split and gathered where the group divides it."""
    group = current()
    if group.size > 1 and vocab_size % group.size == 0:
        return ColumnParallelLinear(hidden_size, vocab_size, bias=False, gather_output=True, what="vocab_size")
    return Linear(hidden_size, vocab_size, bias=False)


_matmul_t = ops.MatMul(transpose_b=True)


def tied_logits(hidden: Tensor, embedding: VocabParallelEmbedding) -> Tensor:
    """(B, T, D) hidden states times the input embedding's table: full-vocabulary logits on every rank."""
    b, t, d = hidden.shape
    logits = _matmul_t(hidden.reshape(b * t, d), embedding.weight).reshape(b, t, -1)
    return logits if embedding.gather_logits is None else embedding.gather_logits(logits)


@dataclass(frozen=True)
class HeadSplit:
    """A rank's attention heads: query heads [q_start, q_start + heads) and the key/value heads they read."""

    heads: int
    kv_heads: int
    q_rows: tuple[int, int]
    kv_rows: tuple[int, int]


def split_heads(num_heads: int, num_kv_heads: int, head_dim: int) -> HeadSplit:
    """Query heads split evenly; key/value heads too, or, with fewer of them than ranks, each rank keeps
    (a copy of) the one its query heads read (grouped-query attention)."""
    group = current()
    q0, q1 = group.split(num_heads, "num_attention_heads")
    if num_kv_heads >= group.size:
        k0, k1 = group.split(num_kv_heads, "num_key_value_heads")
    elif group.size % num_kv_heads:
        raise TensorParallelError(f"num_key_value_heads ({num_kv_heads}) must divide tp_size {group.size} "
                                  f"when it is smaller")
    else:
        k0 = group.rank * num_kv_heads // group.size
        k1 = k0 + 1
    return HeadSplit(q1 - q0, k1 - k0, (q0 * head_dim, q1 * head_dim), (k0 * head_dim, k1 * head_dim))
