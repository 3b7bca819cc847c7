"""Gated DeltaNet, the linear-attention layer of Qwen3.5 / Qwen3-Next hybrid decoders (``linear_attn``).

Instead of a KV cache the layer keeps two fixed-size states per sequence:

- a causal depthwise convolution (kernel K) over the q/k/v channels; its state is the last K conv
  inputs, (B, C, K) with C = 2 key_dim + value_dim in transformers' layout (channels q | k | v);
- a matrix per value head, S (B, Hv, dk, dv) in float32, updated by the gated delta rule: per token,
  S <- exp(g) S, then S <- S + k (beta (v - S^T k))^T (write the part of v that S does not already
  predict for k), and the output is S^T q. q, k are l2-normalised, q scaled by dk^-1/2; value head h
  reads key head h // (Hv / Hk).

A prompt runs the rule in chunks of 64 tokens (:func:`chunk_gated_delta_rule`): inside a chunk the
token-by-token updates collapse into a few (64 x 64) matmuls (a unit lower-triangular system, the
"UT transform"), and only the chunks are scanned in order. Time and memory are linear in the length
(nothing of size L x L exists) and the sequential part is L / 64 steps instead of L. A decoding step
runs the rule for one token (:func:`recurrent_gated_delta_rule`) with static shapes, for ``ms.jit``.

Left padding (``mask`` 0) never reaches the states: padded positions' inputs are zeroed (as
transformers does) and their steps are the identity (g = 0, beta = 0), so a padded row's outputs at
real positions and its final states equal those of the row run alone.

Heads are a dimension of every tensor here, so a tensor-parallel split is a slice of heads (see
:class:`GatedDeltaNet`); the math functions take whatever head counts they are given.
"""
from __future__ import annotations

from typing import Optional

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from models.layers import activation, ones_parameter, zeros_parameter
from models.parallel import (ColumnParallelLinear, Ranges, RowParallelLinear, TensorParallelError, current,
                             slice_spec)

CHUNK_SIZE = 64  # as transformers and flash-linear-attention

_bmm = ops.BatchMatMul()
_bmm_tb = ops.BatchMatMul(transpose_b=True)
_bmm_ta = ops.BatchMatMul(transpose_a=True)
_MASKS: dict = {}


def _chunk_masks(size: int) -> tuple[Tensor, list[Tensor]]:
    """Constants for a chunk: the causal (i >= j) mask, and per doubling level s the mask of entries inside
    a (2s x 2s) diagonal block but outside the (s x s) ones (what :func:`_unit_lower_inverse` merges)."""
    if size not in _MASKS:
        i, j = np.arange(size)[:, None], np.arange(size)[None, :]
        levels, s = [], 1
        while s < size:
            levels.append(Tensor(((i // (2 * s) == j // (2 * s)) & (i // s != j // s)).astype(np.float32)))
            s *= 2
        _MASKS[size] = (Tensor((i >= j).astype(np.float32)), levels)
    return _MASKS[size]


def l2norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    """x / sqrt(sum x^2 + eps) over the last axis (FLA's and transformers' formula: eps inside the root)."""
    return x * ops.rsqrt((x * x).sum(axis=-1, keepdims=True) + eps)


def gated_rms_norm(x: Tensor, gate: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm of x over the last axis times ``weight`` (a plain scale, not 1 + weight), then times silu(gate);
    in float32, returned in x's dtype."""
    x32 = x.astype(ms.float32)
    y = x32 * ops.rsqrt(ops.square(x32).mean(axis=-1, keep_dims=True) + eps)
    return (y * weight.astype(ms.float32) * ops.silu(gate.astype(ms.float32))).astype(x.dtype)


def causal_conv1d(x: Tensor, weight: Tensor, conv_state: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Causal depthwise convolution of ``x`` (B, L, C) with ``weight`` (C, 1, K) (torch's Conv1d layout), no bias.

    ``conv_state`` (B, C, K): the last K inputs before ``x`` (zeros, i.e. none, when None). Returns the
    output (B, L, C) and the new state, the last K inputs including ``x``: one function for a prompt and
    for a decoding step (L = 1), K shifted products with no Python branch on values."""
    b, length, c = x.shape
    k = weight.shape[-1]
    past = ops.zeros((b, k, c), x.dtype) if conv_state is None else conv_state.swapaxes(1, 2).astype(x.dtype)
    full = ops.concat((past, x), axis=1)  # (B, K + L, C); position t of x is full[K + t]
    taps = weight.reshape(c, k).astype(x.dtype)
    out = full[:, 1:1 + length] * taps[:, 0]
    for j in range(1, k):
        out = out + full[:, 1 + j:1 + j + length] * taps[:, j]
    return out, full[:, length:].swapaxes(1, 2)


def _prepare(query: Tensor, key: Tensor, value: Tensor, g: Tensor, beta: Tensor) -> tuple:
    """(B, L, H*, d) inputs -> float32 (B, Hv, L, d): q, k l2-normalised, q scaled, key heads repeated
    so that value head h reads key head h // (Hv / Hk); g and beta -> (B, Hv, L)."""
    b, length, hk, dk = key.shape
    hv = value.shape[2]
    q = l2norm(query.astype(ms.float32)) * (dk ** -0.5)
    k = l2norm(key.astype(ms.float32))
    if hv != hk:
        q, k = (ops.broadcast_to(t[:, :, :, None], (b, length, hk, hv // hk, dk)).reshape(b, length, hv, dk)
                for t in (q, k))
    q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, value.astype(ms.float32)))
    return q, k, v, g.astype(ms.float32).swapaxes(1, 2), beta.astype(ms.float32).swapaxes(1, 2)


def _unit_lower_inverse(system: Tensor, size: int) -> Tensor:
    """Inverse of I + the strictly lower part of ``system`` (..., size, size), by merging diagonal blocks:
    X_2s = X_s - X_s E_s X_s, E_s the entries joining pairs of s-blocks. log2(size) levels of matmuls,
    exact like forward substitution (no power series, which cancels catastrophically for similar keys)."""
    _, levels = _chunk_masks(size)
    inverse = ops.broadcast_to(ops.eye(size, size, ms.float32), system.shape)
    for joins in levels:
        inverse = inverse - _bmm(_bmm(inverse, system * joins), inverse)
    return inverse


def chunk_gated_delta_rule(query: Tensor, key: Tensor, value: Tensor, g: Tensor, beta: Tensor,
                           initial_state: Optional[Tensor] = None,
                           chunk_size: int = CHUNK_SIZE) -> tuple[Tensor, Tensor]:
    """The gated delta rule over a whole sequence, in chunks; equal to :func:`recurrent_gated_delta_rule`.

    ``query``/``key`` (B, L, Hk, dk), ``value`` (B, L, Hv, dv), ``g`` (log decay, <= 0) and ``beta`` (B, L, Hv),
    ``initial_state`` (B, Hv, dk, dv). Returns the output (B, L, Hv, dv) in value's dtype and the final state
    (B, Hv, dk, dv) float32. The length is padded to whole chunks with identity steps (g = beta = 0)."""
    q, k, v, g, beta = _prepare(query, key, value, g, beta)
    b, h, length, dk = k.shape
    dv = v.shape[-1]
    pad = -length % chunk_size
    if pad:
        q, k, v = (ops.concat((t, ops.zeros((b, h, pad, t.shape[-1]), t.dtype)), axis=2) for t in (q, k, v))
        g, beta = (ops.concat((t, ops.zeros((b, h, pad), t.dtype)), axis=2) for t in (g, beta))
    n = (length + pad) // chunk_size
    q, k, v = (t.reshape(b * h, n, chunk_size, t.shape[-1]) for t in (q, k, v))
    g, beta = (t.reshape(b * h, n, chunk_size) for t in (g, beta))
    causal, _ = _chunk_masks(chunk_size)

    cum = ops.cumsum(g, axis=-1)  # log of the decay from the chunk's start to each position
    gap = cum[..., :, None] - cum[..., None, :]  # decay from j to i; positive above the diagonal: masked first
    decay = ops.exp(gap * causal) * causal
    k_beta = k * beta[..., None]
    inverse = _unit_lower_inverse(_bmm_tb(k_beta, k) * decay, chunk_size)
    new_values = _bmm(inverse, v * beta[..., None])  # the chunk's corrections, before the old state's share
    reads = _bmm(inverse, k_beta * ops.exp(cum)[..., None])  # how much of the old state each correction undoes
    inner = _bmm_tb(q, k) * decay  # attention inside the chunk
    q_decayed = q * ops.exp(cum)[..., None]
    k_decayed = k * ops.exp(cum[..., -1:] - cum)[..., None]
    chunk_decay = ops.exp(cum[..., -1])[..., None, None]  # (BH, N, 1, 1)

    state = ops.zeros((b * h, dk, dv), ms.float32) if initial_state is None else \
        initial_state.astype(ms.float32).reshape(b * h, dk, dv)
    outs = []
    for i in range(n):
        v_new = new_values[:, i] - _bmm(reads[:, i], state)
        outs.append(_bmm(q_decayed[:, i], state) + _bmm(inner[:, i], v_new))
        state = state * chunk_decay[:, i] + _bmm_ta(k_decayed[:, i], v_new)
    out = outs[0] if n == 1 else ops.concat(outs, axis=1)
    out = out[:, :length].reshape(b, h, length, dv).transpose(0, 2, 1, 3)
    return out.astype(value.dtype), state.reshape(b, h, dk, dv)


def recurrent_gated_delta_rule(query: Tensor, key: Tensor, value: Tensor, g: Tensor, beta: Tensor,
                               initial_state: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """The gated delta rule token by token (decoding steps; the reference the chunked form is tested against).
    Same arguments and results as :func:`chunk_gated_delta_rule`; a Python loop over L, so L = 1 compiles small."""
    q, k, v, g, beta = _prepare(query, key, value, g, beta)
    b, h, length, dk = k.shape
    dv = v.shape[-1]
    state = ops.zeros((b, h, dk, dv), ms.float32) if initial_state is None else initial_state.astype(ms.float32)
    outs = []
    for t in range(length):
        k_t = k[:, :, t, :, None]  # (B, H, dk, 1)
        state = state * ops.exp(g[:, :, t])[..., None, None]
        predicted = (state * k_t).sum(axis=-2)  # S^T k: (B, H, dv)
        delta = (v[:, :, t] - predicted) * beta[:, :, t, None]
        state = state + k_t * delta[:, :, None, :]
        outs.append((state * q[:, :, t, :, None]).sum(axis=-2))
    out = ops.stack(outs, axis=1)  # (B, L, H, dv)
    return out.astype(value.dtype), state


class DepthwiseConv1d(nn.Cell):
    """Holds ``weight`` (channels, 1, kernel) as torch.nn.Conv1d(groups=channels, bias=False) names it; ``ranges``:
    the [start, stop) channel ranges of a tensor-parallel rank, concatenated (None: all of them)."""

    def __init__(self, channels: int, kernel: int, ranges: Optional[Ranges] = None):
        super().__init__()
        ranges = ranges or [(0, channels)]
        self.weight = zeros_parameter((sum(stop - start for start, stop in ranges), 1, kernel))
        spec = slice_spec(0, ranges, channels)
        if spec is not None:
            self.checkpoint_slices = {"weight": spec}


class GatedRMSNorm(nn.Cell):
    """``norm.weight`` (head_v_dim,): :func:`gated_rms_norm` over each value head."""

    def __init__(self, size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = ones_parameter((size,))
        self.eps = eps

    def construct(self, x: Tensor, gate: Tensor) -> Tensor:
        return gated_rms_norm(x, gate, self.weight, self.eps)


class GatedDeltaNet(nn.Cell):
    """transformers' ``Qwen3_5GatedDeltaNet`` (``linear_attn`` of a Qwen3.5 linear-attention layer), same parameter
    names and shapes: ``in_proj_qkv`` (2 key_dim + value_dim, D), ``in_proj_z`` (value_dim, D), ``in_proj_b`` and
    ``in_proj_a`` (Hv, D), ``conv1d.weight`` (C, 1, K), ``dt_bias`` and ``A_log`` (Hv,), ``norm.weight`` (dv,),
    ``out_proj`` (D, value_dim); no biases. (Qwen3-Next fuses the projections per key head instead:
    ``in_proj_qkvz``/``in_proj_ba``, which a loader would have to regroup into these.)

    Tensor parallelism (built inside ``models.parallel.building``): a rank keeps key heads [k0, k1) (an even split;
    key heads that tp_size does not divide are refused) and the value heads that read them,
    [k0 Hv / Hk, k1 Hv / Hk): the matching rows of each third (q, k, v) of ``in_proj_qkv`` and channels of
    ``conv1d``, the rows of ``in_proj_z/b/a``, its entries of ``dt_bias`` and ``A_log``, the columns of ``out_proj``
    (whose partial outputs are all-reduced, as attention's ``o_proj``); ``norm.weight`` is whole. Its
    ``num_k_heads``, ``num_v_heads``, ``key_dim``, ``value_dim`` and ``conv_dim`` are the rank's, and so are the
    conv and recurrent states: (B, conv_dim, K) and (B, num_v_heads, dk, dv).
    """

    def __init__(self, config, chunk_size: int = CHUNK_SIZE):
        super().__init__()
        key_heads, value_heads = int(config.linear_num_key_heads), int(config.linear_num_value_heads)
        if value_heads % key_heads:
            raise ValueError(f"linear_num_value_heads ({value_heads}) must be a multiple of "
                             f"linear_num_key_heads ({key_heads})")
        group = current()
        if key_heads % group.size:
            raise TensorParallelError(f"the Gated DeltaNet's linear_num_key_heads ({key_heads}) is not divisible by "
                                      f"tp_size {group.size}: a rank keeps whole key heads; use a tp_size that "
                                      f"divides {key_heads}")
        k0, k1 = group.split(key_heads, "linear_num_key_heads")
        per_key = value_heads // key_heads
        v0, v1 = k0 * per_key, k1 * per_key
        self.num_k_heads, self.num_v_heads = k1 - k0, v1 - v0
        self.head_k_dim, self.head_v_dim = int(config.linear_key_head_dim), int(config.linear_value_head_dim)
        dk, dv = self.head_k_dim, self.head_v_dim
        self.key_dim = self.num_k_heads * dk
        self.value_dim = self.num_v_heads * dv
        self.conv_kernel_size = int(config.linear_conv_kernel_dim)
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.chunk_size = chunk_size
        self.act = activation(config.hidden_act)
        hidden = int(config.hidden_size)
        # this rank's channels of q | k | v (each third holds its heads contiguously): one range in each third
        full_key, full_value = key_heads * dk, value_heads * dv
        channels = [(k0 * dk, k1 * dk), (full_key + k0 * dk, full_key + k1 * dk),
                    (2 * full_key + v0 * dv, 2 * full_key + v1 * dv)]
        values = (v0 * dv, v1 * dv)
        self.in_proj_qkv = ColumnParallelLinear(hidden, 2 * full_key + full_value, bias=False, rows=channels)
        self.in_proj_z = ColumnParallelLinear(hidden, full_value, bias=False, rows=values)
        self.in_proj_b = ColumnParallelLinear(hidden, value_heads, bias=False, rows=(v0, v1))
        self.in_proj_a = ColumnParallelLinear(hidden, value_heads, bias=False, rows=(v0, v1))
        self.conv1d = DepthwiseConv1d(2 * full_key + full_value, self.conv_kernel_size, channels)
        self.dt_bias = ones_parameter((self.num_v_heads,))
        self.A_log = zeros_parameter((self.num_v_heads,))
        heads = slice_spec(0, [(v0, v1)], value_heads)
        if heads is not None:
            self.checkpoint_slices = {"dt_bias": heads, "A_log": heads}
        self.norm = GatedRMSNorm(self.head_v_dim, float(config.rms_norm_eps))
        self.out_proj = RowParallelLinear(full_value, hidden, bias=False, cols=values)

    def _inputs(self, hidden: Tensor, conv_state: Optional[Tensor]) -> tuple:
        """Projections, conv and gates of ``hidden`` (B, L, D): q, k, v, z per head, g and beta (float32)."""
        b, length, _ = hidden.shape
        mixed, conv_state = causal_conv1d(self.in_proj_qkv(hidden), self.conv1d.weight, conv_state)
        mixed = self.act(mixed)
        query = mixed[..., :self.key_dim].reshape(b, length, self.num_k_heads, self.head_k_dim)
        key = mixed[..., self.key_dim:2 * self.key_dim].reshape(b, length, self.num_k_heads, self.head_k_dim)
        value = mixed[..., 2 * self.key_dim:].reshape(b, length, self.num_v_heads, self.head_v_dim)
        z = self.in_proj_z(hidden).reshape(b, length, self.num_v_heads, self.head_v_dim)
        beta = ops.sigmoid(self.in_proj_b(hidden).astype(ms.float32))
        rate = ops.softplus(self.in_proj_a(hidden).astype(ms.float32) + self.dt_bias.astype(ms.float32))
        g = -ops.exp(self.A_log.astype(ms.float32)) * rate  # log decay: -exp(A_log) softplus(a + dt_bias)
        return query, key, value, z, g, beta, conv_state

    def _output(self, core: Tensor, z: Tensor) -> Tensor:
        b, length = core.shape[:2]
        return self.out_proj(self.norm(core, z).reshape(b, length, self.value_dim))

    def prompt(self, hidden: Tensor, mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
        """A prompt ``hidden`` (B, L, D) from empty states; ``mask`` (B, L) 1 for real tokens, 0 for left padding.
        Returns the output (B, L, D), the conv state (B, C, K) and the recurrent state (B, Hv, dk, dv) float32.
        Outputs at padded positions are meaningless (finite); the states never see them."""
        keep = None if mask is None else mask.astype(ms.float32)
        if keep is not None:
            hidden = hidden * keep.astype(hidden.dtype)[..., None]
        query, key, value, z, g, beta, conv_state = self._inputs(hidden, None)
        if keep is not None:  # identity steps: no decay (g = 0), no write (beta = 0)
            g, beta = g * keep[..., None], beta * keep[..., None]
        core, state = chunk_gated_delta_rule(query, key, value, g, beta, chunk_size=self.chunk_size)
        return self._output(core, z), conv_state, state

    def step(self, hidden: Tensor, conv_state: Tensor, recurrent_state: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One decoding step ``hidden`` (B, 1, D) -> (output (B, 1, D), new conv state, new recurrent state).
        Static shapes and no branches on values: compiles once under ``ms.jit``."""
        query, key, value, z, g, beta, conv_state = self._inputs(hidden, conv_state)
        core, state = recurrent_gated_delta_rule(query, key, value, g, beta, recurrent_state)
        return self._output(core, z), conv_state, state

    def construct(self, hidden: Tensor, mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
        return self.prompt(hidden, mask)
