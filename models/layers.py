"""Basic layers whose parameter names match Hugging Face checkpoint keys.

MindSpore's own nn.Dense / nn.LayerNorm name their parameters differently
(``gamma``/``beta``); keeping the transformers names (``weight``/``bias``) lets a
checkpoint load by plain name matching. Only ``mindspore.ops`` is used, so every
layer has CPU and Ascend kernels. On CPU the norms and activations run fused C++ kernels
(:mod:`models.kernels`) when those are built, in float32; elsewhere, and with ``CAPTION_KERNELS=0``,
the ``mindspore.ops`` versions below run, and they are what the kernels are tested against.

Parameters start as zeros (ones for norm scales), which MindSpore creates without
touching memory: a multi-billion-parameter model is built in a moment and the
checkpoint fills it. ``init_weights`` draws random values for training from scratch.
"""
from __future__ import annotations

from typing import Callable

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import One, Zero

from models import kernels


def zeros_parameter(shape: tuple, dtype=ms.float32) -> Parameter:
    return Parameter(Tensor(shape=shape, dtype=dtype, init=Zero()))


def ones_parameter(shape: tuple, dtype=ms.float32) -> Parameter:
    return Parameter(Tensor(shape=shape, dtype=dtype, init=One()))


def init_weights(model: nn.Cell, std: float = 0.02, seed: int = 0, fan_in: bool = False) -> None:
    """Random normal(0, std) for every matrix parameter (2-D and up), for training from scratch.

    Vectors (biases, norm scales) keep their zeros and ones. ``fan_in``: projections (``Linear`` and
    convolution weights, 4-D) take std 1/sqrt(fan in) instead, so a narrow model's layers keep their inputs'
    scale (0.02 suits widths near 2500; at width 128 it shrinks every layer's output about 4x); embeddings and
    other tables keep ``std``. The draws are the same either way, only scaled.
    """
    projections = set()
    if fan_in:
        for _, cell in model.cells_and_names():
            weight = getattr(cell, "weight", None)
            if isinstance(weight, Parameter) and (isinstance(cell, Linear) or len(weight.shape) == 4):
                projections.add(id(weight))
    rng = np.random.default_rng(seed)
    for _, param in model.parameters_and_names():
        if len(param.shape) >= 2:
            scale = float(np.prod(param.shape[1:])) ** -0.5 if id(param) in projections else std
            param.set_data(Tensor(rng.normal(0.0, scale, param.shape).astype(np.float32), param.dtype))


def sincos_positions(coordinates: np.ndarray, dim: int, base: float = 10000.0) -> np.ndarray:
    """(len(coordinates), dim) fixed sine-cosine values of 1-D positions, as the original Transformer's: sin
    and cos of each coordinate at dim / 2 frequencies from 1 down to 1 / base. Unit scale, and nearby
    positions get similar vectors."""
    if dim % 2:
        raise ValueError(f"sine-cosine positions need an even width, got {dim}")
    frequencies = base ** -(np.arange(dim // 2) / (dim // 2))
    angles = np.outer(np.asarray(coordinates, np.float64), frequencies)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1).astype(np.float32)


def sincos_grid_positions(grid: int, dim: int, base: float = 10000.0) -> np.ndarray:
    """(grid * grid, dim) fixed 2-D sine-cosine positions of a square patch grid, row by row (as MAE starts
    its ViT): the first half of the channels encodes the patch's column, the second half its row (each as
    ``sincos_positions`` of half the width), so where a patch lies weighs as much as what it shows."""
    if dim % 4:
        raise ValueError(f"2-D sine-cosine positions need a width divisible by 4, got {dim}")
    rows, cols = np.divmod(np.arange(grid * grid), grid)
    return np.concatenate([sincos_positions(cols, dim // 2, base), sincos_positions(rows, dim // 2, base)], axis=1)


class Linear(nn.Cell):
    """y = x @ W.T + b with W of shape (out, in), as in torch.nn.Linear."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = zeros_parameter((out_features, in_features))
        self.has_bias = bias
        self.bias = zeros_parameter((out_features,)) if bias else None
        self.matmul = ops.MatMul(transpose_b=True)

    def construct(self, x: Tensor) -> Tensor:
        shape = x.shape
        y = self.matmul(x.reshape(-1, shape[-1]), self.weight)
        if self.has_bias:
            y = y + self.bias
        return y.reshape(shape[:-1] + (self.out_features,))


class LayerNorm(nn.Cell):
    """Layer normalisation over the last axis, computed in float32: the fused CPU kernel (5x ops.LayerNorm at
    (2056, 1536)), or ops.LayerNorm (5x a hand-written one on CPU).

    In training mode (``set_train(True)``) it keeps ops.LayerNorm: the kernel's gradient equals the
    builtin's to 1e-6, but the training tests compare one-step Adam updates of near-zero gradients to
    1e-5, which that rounding difference was enough to tip.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-5, bias: bool = True):
        super().__init__()
        self.weight = ones_parameter((hidden_size,))
        self.has_bias = bias
        self.bias = zeros_parameter((hidden_size,)) if bias else None
        self.zero_bias = Tensor(np.zeros((hidden_size,), np.float32))
        self.norm = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=eps)
        self.eps = kernels.scalar(eps)
        kernels.refresh()

    def construct(self, x: Tensor) -> Tensor:
        bias = self.bias.astype(ms.float32) if self.has_bias else self.zero_bias
        if kernels.active() and not self.training:
            y = kernels.op("layer_norm")(x.astype(ms.float32), self.weight.astype(ms.float32), bias, self.eps)
        else:
            y, _, _ = self.norm(x.astype(ms.float32), self.weight.astype(ms.float32), bias)
        return y.astype(x.dtype)


class RMSNorm(nn.Cell):
    """Root-mean-square normalisation (T5 / Llama / Qwen2 style), no mean, no bias.

    ``unit_offset``: the scale is 1 + ``weight`` (weights stored centred on zero, as Gemma's and Qwen3.5's), applied
    in float32 before the cast back, as transformers does for those."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, unit_offset: bool = False):
        super().__init__()
        self.unit_offset = unit_offset
        self.weight = zeros_parameter((hidden_size,)) if unit_offset else ones_parameter((hidden_size,))
        self.eps = eps
        self.eps_tensor = kernels.scalar(eps)
        kernels.refresh()

    def construct(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        if kernels.runs_on(x) and self.weight.dtype == ms.float32:
            scale = 1.0 + self.weight if self.unit_offset else self.weight
            return kernels.op("rms_norm")(x, scale, self.eps_tensor)
        x32 = x.astype(ms.float32)
        var = ops.square(x32).mean(axis=-1, keep_dims=True)
        y = x32 * ops.rsqrt(var + self.eps)
        if self.unit_offset:
            return (y * (1.0 + self.weight.astype(ms.float32))).astype(dtype)
        return self.weight.astype(dtype) * y.astype(dtype)


def gelu(x: Tensor) -> Tensor:
    """Exact (erf) GELU, as torch.nn.GELU(); the builtin written out runs 3x faster than ops.gelu on CPU, same values."""
    if kernels.runs_on(x):
        return kernels.op("gelu")(x)
    return 0.5 * x * (1.0 + ops.erf(x * 0.7071067811865476))


def gelu_tanh(x: Tensor) -> Tensor:
    """Tanh-approximated GELU (transformers' gelu_new / gelu_pytorch_tanh)."""
    if kernels.runs_on(x):
        return kernels.op("gelu_tanh")(x)
    return ops.gelu(x, approximate="tanh")


def quick_gelu(x: Tensor) -> Tensor:
    """x * sigmoid(1.702 x) (CLIP, Qwen2-VL vision)."""
    if kernels.runs_on(x):
        return kernels.op("quick_gelu")(x)
    return x * ops.sigmoid(1.702 * x)


def silu(x: Tensor) -> Tensor:
    if kernels.runs_on(x):
        return kernels.op("silu")(x)
    return ops.silu(x)


def silu_mul(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up, the SwiGLU product, in one pass (same shapes)."""
    if kernels.runs_on(gate) and up.dtype == ms.float32 and gate.shape == up.shape:
        return kernels.op("silu_mul")(gate, up)
    return ops.silu(gate) * up


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return ops.concat((-x[..., half:], x[..., :half]), axis=-1)


ROTARY_KERNEL_ELEMENTS = 1 << 20  # measured: 2.4x the builtin at 3.2M elements, slower at 0.2M (a decoding step)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """The rotary position embedding x * cos + rotate_half(x) * sin, ``cos``/``sin`` broadcast to ``x``.

    ``cos``/``sin`` narrower than ``x`` (partial rotary, Qwen3.5) rotate its first channels; the rest pass unchanged.
    In one fused pass (no broadcast copies) for large 4-D float32 operands whose leading axes are x's or 1
    (prompts; a decoding step's few rows keep the builtin, which is as fast there)."""
    rotary = cos.shape[-1]
    if rotary < x.shape[-1]:
        return ops.concat((_rotate(x[..., :rotary], cos, sin), x[..., rotary:]), axis=-1)
    return _rotate(x, cos, sin)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """:func:`apply_rotary` over all of ``x``'s channels."""
    if kernels.runs_on(x) and cos.dtype == ms.float32 and sin.dtype == ms.float32 and x.ndim == 4 and cos.ndim == 4 \
            and sin.shape == cos.shape and cos.shape[3] == x.shape[3] and x.size >= ROTARY_KERNEL_ELEMENTS \
            and all(c in (1, n) for c, n in zip(cos.shape[:3], x.shape[:3])):
        return kernels.op("rotary")(x, cos, sin)
    return x * cos + rotate_half(x) * sin


ACTIVATIONS = {"gelu": gelu, "gelu_new": gelu_tanh, "gelu_pytorch_tanh": gelu_tanh, "quick_gelu": quick_gelu,
               "silu": silu, "relu": ops.relu}


def activation(name: str, owner: str = "hidden_act") -> Callable[[Tensor], Tensor]:
    """The activation a transformers config names (``hidden_act`` and the like); ValueError naming ``owner`` else."""
    if name not in ACTIVATIONS:
        raise ValueError(f"{owner} {name!r} not supported; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class Embedding(nn.Cell):
    """Lookup table with a ``weight`` of shape (num_embeddings, dim)."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.weight = zeros_parameter((num_embeddings, embedding_dim))
        self.gather = ops.Gather()

    def construct(self, ids: Tensor) -> Tensor:
        return self.gather(self.weight, ids.astype(ms.int32), 0)
