"""LoRA on the language model's attention projections, and folding it back into the weights.

A wrapped projection keeps its frozen ``weight``/``bias`` Parameters under the same names
(``...q.weight``), so checkpoints still load by name, and adds ``lora_A`` (r, in) and
``lora_B`` (out, r): y = x W^T + b + (alpha / r) * dropout(x) A^T B^T. B starts at zero,
so training starts from the unchanged model.

Dropout runs on the device (``ops.Dropout``). Its random stream lives inside the primitive
and cannot be saved, but a new primitive with the same seeds replays the same stream, so
the trainer re-seeds every layer at each step from (seed, rank, step): a resumed run draws
exactly the masks of an uninterrupted one.
"""
from __future__ import annotations

import math
from typing import Iterable

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from models.layers import Linear


class LoRALinear(Linear):
    """``Linear`` plus a trainable low-rank update; ``base`` shares its weight and bias Parameters."""

    def __init__(self, base: Linear, rank: int, alpha: float, dropout: float, seed: int = 0):
        super().__init__(base.in_features, base.out_features, bias=base.has_bias)
        self.weight = base.weight
        self.bias = base.bias
        self.rank = rank
        self.scaling = alpha / rank
        self.dropout = dropout
        self.reseed(seed + 1)
        init = np.random.default_rng(seed)
        bound = 1.0 / math.sqrt(base.in_features)  # kaiming-uniform(a=sqrt(5)) as peft initialises A
        self.lora_A = Parameter(Tensor(init.uniform(-bound, bound, (rank, base.in_features)).astype(np.float32)))
        self.lora_B = Parameter(Tensor(np.zeros((base.out_features, rank), np.float32)))

    def construct(self, x: Tensor) -> Tensor:
        y = super().construct(x)
        h = x.astype(ms.float32)
        if self.training and self.dropout > 0:
            h = self.dropout_op(h)[0]
        shape = h.shape
        low = self.matmul(h.reshape(-1, shape[-1]), self.lora_A)
        delta = self.matmul(low, self.lora_B) * self.scaling
        return y + delta.reshape(shape[:-1] + (self.out_features,)).astype(y.dtype)

    def reseed(self, seed: int) -> None:
        """Restart the dropout stream at ``seed`` (> 0)."""
        self.dropout_op = ops.Dropout(keep_prob=1.0 - self.dropout, Seed0=seed, Seed1=seed)

    def merged_weight(self) -> Tensor:
        """W + (alpha / r) B A, in the base weight's dtype."""
        delta = ms.ops.matmul(self.lora_B, self.lora_A) * self.scaling
        return (self.weight.astype(ms.float32) + delta).astype(self.weight.dtype)


def _children(cell: nn.Cell, prefix: str) -> Iterable[tuple[str, nn.Cell, str, nn.Cell]]:
    """(full path, parent, attribute, child) for every sub-cell below ``cell``."""
    for name, child in list(cell.name_cells().items()):
        if child is None:
            continue
        path = f"{prefix}.{name}" if prefix else name
        yield path, cell, name, child
        yield from _children(child, path)


def apply_lora(model: nn.Cell, targets: Iterable[str], rank: int = 8, alpha: float = 16.0, dropout: float = 0.05,
               root: str = "language_model", seed: int = 0) -> list[str]:
    """Wrap every ``Linear`` under ``model.<root>`` whose attribute name is in ``targets`` (e.g. q, v or
    q_proj, v_proj). Returns the wrapped paths; raises if nothing matched (a typo never trains nothing)."""
    targets = set(targets)
    wrapped = []
    for i, (path, parent, name, child) in enumerate(list(_children(getattr(model, root), root))):
        if name in targets and _plain_linear(child):
            lora = LoRALinear(child, rank, alpha, dropout, seed=seed + i)
            setattr(parent, name, lora)
            _name_parameters(lora, path)
            wrapped.append(path)
    if not wrapped:
        raise ValueError(f"LoRA targets {sorted(targets)} match no Linear layer under {root}")
    return wrapped


def _plain_linear(cell: nn.Cell) -> bool:
    """A Linear LoRA can wrap: not wrapped yet, and whole (a tensor-parallel slice declares checkpoint_slices)."""
    if not isinstance(cell, Linear) or isinstance(cell, LoRALinear):
        return False
    return not getattr(cell, "checkpoint_slices", None)


def _name_parameters(cell: nn.Cell, path: str) -> None:
    """Full-path Parameter names: MindSpore renames parameters on assignment, and a compiled graph
    needs every name unique."""
    for name, param in cell.parameters_and_names(expand=False):
        param.name = f"{path}.{name}"


def lora_parameters(model: nn.Cell) -> list[tuple[str, Parameter]]:
    return [(n, p) for n, p in model.parameters_and_names() if n.endswith((".lora_A", ".lora_B"))]


def merge_lora(model: nn.Cell) -> int:
    """Fold every LoRA update into its base weight and zero ``lora_B``; returns the number of layers.

    The layers stay in place (computing W x + b exactly, as B = 0), so graphs compiled before the
    merge (generation caches them per model) stay correct; an export that leaves out the ``lora_*``
    tensors is an ordinary checkpoint of the original architecture.
    """
    count = 0
    for _, cell in model.cells_and_names():
        if isinstance(cell, LoRALinear):
            # in place (not set_data): compiled graphs keep reading the same parameter memory
            ms.ops.assign(cell.weight, cell.merged_weight())
            ms.ops.assign(cell.lora_B, ms.ops.zeros(cell.lora_B.shape, cell.lora_B.dtype))
            count += 1
    return count


def reseed_lora_dropout(model: nn.Cell, rng: np.random.Generator) -> None:
    """Give every LoRA layer a fresh dropout stream drawn from ``rng`` (the trainer's per-step generator)."""
    for _, cell in model.cells_and_names():
        if isinstance(cell, LoRALinear):
            cell.reseed(int(rng.integers(1, 2**31 - 1)))
