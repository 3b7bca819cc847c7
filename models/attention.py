"""Attention for every model in ``models/``: one place that decides how softmax(q k^T + bias) v is computed.

- :func:`attention` is the entry point. Short inputs (one query block) and decode steps take the
  dense product. Longer ones take :func:`blockwise_attention`: keys in blocks with an online
  softmax, so the (T x S) score matrix never exists and memory grows linearly with the length.
  On Ascend, float16/bfloat16 inputs without a learned score bias go to MindSpore's fused
  flash-attention kernel instead (the blockwise version is the portable reference the CPU tests
  run; the Ascend branch is not exercised on CPU).
- :func:`write_cache` puts new keys/values into a static KV cache: a prompt fills slots [0, T)
  by concatenation, a decode step writes its one slot with a select (no one-hot matrix product).

Queries are (B, H, T, d) and already scaled; keys/values are (B, Hkv, S, d) with H a multiple of
Hkv (grouped-query attention: query head h reads key/value head h // (H / Hkv), without copying
the keys). ``key_mask`` (B, S) marks real keys. ``causal`` requires T == S (a prompt attending
to itself) and lets query i see keys j <= i. ``score_bias(q_start, q_stop, k_start, k_stop)``
returns an additive float32 bias broadcastable to (B, H, q_stop - q_start, k_stop - k_start)
(T5's relative positions), computed per block so it never exists in full either.
"""
from __future__ import annotations

from typing import Callable, Optional

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops

from models import kernels

MASK_MIN = float(np.finfo(np.float32).min)
HALF_MASK_MIN = -1e4  # hides a key in float16/bfloat16 scores without overflowing to -inf
DEFAULT_BLOCK_SIZE = 1024  # mid-size Qwen2-VL, 7.7k-token prompt: as fast as 2048-token tiles, 0.7 GB less peak memory
_settings = {"block_size": DEFAULT_BLOCK_SIZE, "device": "CPU"}

ScoreBias = Callable[[int, int, int, int], Tensor]


def set_block_size(block_size: int) -> None:
    """Key/query block length of blockwise attention (e.g. 512 to 2048); takes effect at the next compile."""
    if block_size < 16:
        raise ValueError(f"attention block size must be at least 16, got {block_size}: use 512 to 2048")
    _settings["block_size"] = int(block_size)


def block_size() -> int:
    return _settings["block_size"]


def refresh_device() -> None:
    """Read the device MindSpore targets; graphs cannot ask, so this runs before each new compile."""
    _settings["device"] = ms.get_context("device_target")


def device() -> str:
    """The device MindSpore targets, as of the last :func:`refresh_device` (safe to call inside a graph)."""
    return _settings["device"]


def _merge_heads(out: Tensor) -> Tensor:
    """(B, H, T, d) -> (B, T, H*d)."""
    b, h, t, d = out.shape
    return out.swapaxes(1, 2).reshape(b, t, h * d)


_scores_of = ops.BatchMatMul(transpose_b=True)  # q k^T: 5-10x faster on CPU than matmul of a swapped view
_weighted = ops.BatchMatMul()


_CAUSAL: dict = {}


def _causal_visibility(rows: int, cols: int, offset: int) -> Tensor:
    """(1, 1, 1, rows, cols) float32 constant: 1 where key j may be seen by query i (j <= i + offset).
    Built once per tile shape: building it from aranges costs more than the tile's product."""
    key = (rows, cols, offset)
    if key not in _CAUSAL:
        _CAUSAL[key] = Tensor(np.tri(rows, cols, offset, dtype=np.float32)[None, None, None])
    return _CAUSAL[key]


_TILE_BIAS: dict = {}


def _causal_tile_bias(shape: tuple, group: int, offset: int) -> Tensor:
    """The causal bias already at a tile's score shape (B, Hkv, group*rows, cols), kept for the last
    shape asked: adding an equal-shape tensor is many times faster on CPU than any broadcast."""
    key = (tuple(shape), group, offset)
    if key not in _TILE_BIAS:
        _TILE_BIAS.clear()
        b, kv_heads, grouped, cols = shape
        rows = grouped // group
        hidden = (1.0 - np.tri(rows, cols, offset, dtype=np.float32)) * MASK_MIN
        _TILE_BIAS[key] = Tensor(np.ascontiguousarray(np.broadcast_to(np.tile(hidden, (group, 1)), shape), np.float32))
    return _TILE_BIAS[key]


def _visibility_bias(key_mask, causal: bool, q0: int, q1: int, k0: int, k1: int) -> Optional[Tensor]:
    """Additive bias (B or 1, 1, 1, q, k) hiding padded keys and, with ``causal``, keys after the query;
    None when every key is visible. Padding and causality form one mask, so no score gets MASK_MIN twice."""
    visible = None
    if causal and k1 - 1 > q0:  # some key in the block lies after some query
        visible = _causal_visibility(q1 - q0, k1 - k0, q0 - k0)
    if key_mask is not None:
        keep = key_mask[:, k0:k1].astype(ms.float32)[:, None, None, None, :]
        if visible is not None:
            keep = ops.broadcast_to(keep, (keep.shape[0], 1, 1, q1 - q0, k1 - k0))
            visible = ops.broadcast_to(visible, keep.shape) * keep
        else:
            visible = keep
    return None if visible is None else (1.0 - visible) * MASK_MIN


def _scores(q: Tensor, key: Tensor, key_mask, causal: bool, score_bias, q0: int, q1: int, k0: int, k1: int,
            group: int) -> Tensor:
    """Float32 scores (B, Hkv, group*rows, n) of grouped queries ``q`` against keys [k0, k1), biases added.

    Biases are broadcast to the full score shape before the add: MindSpore's CPU kernels add a
    broadcast operand several times slower than an equal-shape one."""
    b, kv_heads = q.shape[:2]
    rows, n = q1 - q0, k1 - k0
    scores = _scores_of(q, key[:, :, k0:k1]).astype(ms.float32)
    if key_mask is None and score_bias is None:
        if causal and k1 - 1 > q0:
            scores = scores + _causal_tile_bias(scores.shape, group, q0 - k0)
        return scores
    full = (b, kv_heads, group, rows, n)
    bias = _visibility_bias(key_mask, causal, q0, q1, k0, k1)
    if score_bias is not None:
        learned = score_bias(q0, q1, k0, k1)
        learned = ops.broadcast_to(learned.reshape((learned.shape[0], kv_heads, group, rows, n)), full)
        bias = learned if bias is None else ops.broadcast_to(bias, full) + learned
    if bias is not None:
        scores = scores + ops.broadcast_to(bias, full).reshape(scores.shape)
    return scores


SOFTMAX_KERNEL_ELEMENTS = 1 << 20  # bench_kernels: 2.1-2.5x the builtin at 3.2M scores, no faster at 0.2M


def _softmax_lse(scores: Tensor, bias: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """softmax(scores + bias) over the last axis and its log-sum-exp; one fused kernel on CPU (float32)
    for tiles of at least ``SOFTMAX_KERNEL_ELEMENTS`` scores.

    The builtin path takes the log-sum-exp as the max score minus the log of the largest probability,
    which needs no second exponential pass."""
    if kernels.runs_on(scores) and scores.size >= SOFTMAX_KERNEL_ELEMENTS:
        if bias is None:
            return kernels.op("softmax_lse")(scores)
        return kernels.op("softmax_lse_bias")(scores, bias)
    if bias is not None:
        scores = scores + bias
    probs = ops.softmax(scores, axis=-1)
    return probs, scores.max(axis=-1) - ops.log(probs.max(axis=-1))


def dense_attention(query: Tensor, key: Tensor, value: Tensor, key_mask: Optional[Tensor] = None,
                    causal: bool = False, score_bias: Optional[ScoreBias] = None) -> Tensor:
    """softmax(q k^T + bias) v with the whole score matrix at once (softmax in float32); -> (B, T, H*d)."""
    b, h, t, d = query.shape
    kv_heads, s = key.shape[1], key.shape[2]
    group = h // kv_heads
    q = query.reshape(b, kv_heads, group * t, d)
    scores = _scores(q, key, key_mask, causal, score_bias, 0, t, 0, s, group)
    probs = ops.softmax(scores, axis=-1).astype(value.dtype)
    return _merge_heads(_weighted(probs, value).reshape(b, h, t, d))


def blockwise_attention(query: Tensor, key: Tensor, value: Tensor, key_mask: Optional[Tensor] = None,
                        causal: bool = False, score_bias: Optional[ScoreBias] = None,
                        block: Optional[int] = None) -> Tensor:
    """Attention in (query block x key block) tiles; -> (B, T, H*d), equal to :func:`dense_attention`.

    Each tile takes a fused softmax of its own scores, giving tile outputs normalised within the
    tile and the tile's log-sum-exp (its max score minus the log of its largest probability).
    Tiles of one query block are merged by their log-sum-exps (an online softmax); with ``causal``
    the key blocks after the query block are skipped. The largest temporary is
    (B, H, block, block), so memory beyond q, k and v does not grow with T. Rows whose keys are
    all masked (left padding) give finite, meaningless values that the caller discards.
    """
    block = block or block_size()
    b, h, t, d = query.shape
    kv_heads, s = key.shape[1], key.shape[2]
    group = h // kv_heads
    if causal and s != t:
        raise ValueError(f"causal blockwise attention needs as many keys as queries, got {t} and {s}")
    q5 = query.reshape(b, kv_heads, group, t, d)
    if key_mask is not None:  # the padding bias rides in the q k^T product: one more channel, no per-tile add
        hide = MASK_MIN if key.dtype == ms.float32 else HALF_MASK_MIN
        column = ((1.0 - key_mask.astype(ms.float32)) * hide).astype(key.dtype)[:, None, :, None]
        key = ops.concat((key, ops.broadcast_to(column, (b, kv_heads, s, 1))), axis=-1)
        q5 = ops.concat((q5, ops.ones((b, kv_heads, group, t, 1), q5.dtype)), axis=-1)
        key_mask = None
    outputs: list[Tensor] = []
    for q0 in range(0, t, block):
        q1 = min(q0 + block, t)
        q = q5[:, :, :, q0:q1].reshape(b, kv_heads, group * (q1 - q0), q5.shape[-1])
        lse = acc = None
        for k0 in range(0, q1 if causal else s, block):
            k1 = min(k0 + block, s)
            if score_bias is None and causal and k1 - 1 > q0:  # the causal tile bias goes into the fused softmax
                scores = _scores_of(q, key[:, :, k0:k1]).astype(ms.float32)
                probs, tile_lse = _softmax_lse(scores, _causal_tile_bias(scores.shape, group, q0 - k0))
            else:
                probs, tile_lse = _softmax_lse(_scores(q, key, key_mask, causal, score_bias, q0, q1, k0, k1, group))
            tile_out = _weighted(probs.astype(value.dtype), value[:, :, k0:k1]).astype(ms.float32)
            if lse is None:
                lse, acc = tile_lse, tile_out
                continue
            new_lse = ops.maximum(lse, tile_lse)
            new_lse = new_lse + ops.log(ops.exp(lse - new_lse) + ops.exp(tile_lse - new_lse))
            acc = (acc * ops.broadcast_to(ops.exp(lse - new_lse)[..., None], acc.shape)
                   + tile_out * ops.broadcast_to(ops.exp(tile_lse - new_lse)[..., None], acc.shape))
            lse = new_lse
        outputs.append(acc.reshape(b, kv_heads, group, q1 - q0, d))
    out = outputs[0] if len(outputs) == 1 else ops.concat(outputs, axis=3)
    return _merge_heads(out.astype(query.dtype).reshape(b, h, t, d))


def _fused_ascend(query: Tensor, key: Tensor, value: Tensor, key_mask: Optional[Tensor], causal: bool) -> Tensor:
    """MindSpore's flash-attention kernel (Atlas A2); mask semantics: True hides a score."""
    b, h, t, d = query.shape
    s = key.shape[2]
    hidden = None
    if key_mask is not None:
        hidden = ops.logical_not(key_mask.astype(ms.bool_))[:, None, None, :]
        hidden = ops.broadcast_to(hidden, (b, 1, t, s))
    if causal:
        future = Tensor(np.triu(np.ones((t, s), np.bool_), k=1))[None, None]
        hidden = future if hidden is None else ops.logical_or(hidden, future)
    out = ops.flash_attention_score(query, key, value, h, attn_mask=hidden, scalar_value=1.0, input_layout="BNSD")
    return _merge_heads(out)


def attention(query: Tensor, key: Tensor, value: Tensor, key_mask: Optional[Tensor] = None,
              causal: bool = False, score_bias: Optional[ScoreBias] = None, tiles: bool = True) -> Tensor:
    """softmax(q k^T + masks + score_bias) v -> (B, T, H*d): the one function every model calls.

    Dense while the score matrix is at most one block by one block (decode steps, short prompts);
    else the fused kernel on Ascend (half precision, no ``score_bias``), blockwise everywhere else.
    ``tiles=False`` keeps the dense product where the fused kernel does not apply: for compiled
    callers that bound their own memory (a CPU graph keeps every tile alive, so tiles save nothing).
    """
    small = query.shape[2] * key.shape[2] <= block_size() ** 2
    if small:
        return dense_attention(query, key, value, key_mask, causal, score_bias)
    if device() == "Ascend" and score_bias is None and query.dtype in (ms.float16, ms.bfloat16):
        return _fused_ascend(query, key, value, key_mask, causal)
    if not tiles:
        return dense_attention(query, key, value, key_mask, causal, score_bias)
    return blockwise_attention(query, key, value, key_mask, causal, score_bias)


def write_cache(cache: Tensor, new: Tensor, slots: Tensor) -> Tensor:
    """Put ``new`` (B, H, T, d) into ``cache`` (B, H, L, d) at ``slots`` (T consecutive slots).

    A multi-token write is a prompt and fills slots [0, T): a concatenation, linear in L. A
    one-token write (a decode step) selects its slot along L, so the compiled graph does not
    depend on which slot it is.
    """
    length = new.shape[2]
    if length > 1:
        return ops.concat((new.astype(cache.dtype), cache[:, :, length:]), axis=2)
    here = (ops.arange(cache.shape[2]).astype(ms.int32) == slots[0])[None, None, :, None]
    return ops.where(here, new.astype(cache.dtype), cache)


def cached_self_attention(query: Tensor, key: Tensor, value: Tensor, key_mask: Tensor, slots: Tensor,
                          past_key: Optional[Tensor] = None, past_value: Optional[Tensor] = None,
                          score_bias: Optional[ScoreBias] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Causal self-attention of T new positions, with or without a static KV cache.

    Without a cache (a full forward) the T positions attend causally to each other. With one, a
    prompt (T > 1, slots [0, T)) is written to the cache and attends causally to itself only,
    because the rest of the cache is still empty; a decode step (T = 1) is written to its slot
    and attends to every filled slot of ``key_mask`` (B, L). Returns the output (B, T, H*d) and
    the keys/values to keep (the updated cache, or the new keys without one).
    """
    length = query.shape[2]
    if past_key is None:
        return attention(query, key, value, key_mask, causal=length > 1, score_bias=score_bias), key, value
    past_key, past_value = write_cache(past_key, key, slots), write_cache(past_value, value, slots)
    if length > 1:
        out = attention(query, key, value, key_mask[:, :length], causal=True, score_bias=score_bias)
    else:
        out = attention(query, past_key, past_value, key_mask, score_bias=score_bias)
    return out, past_key, past_value
