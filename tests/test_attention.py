"""Blockwise attention equals the dense product; the cache write fills the right slots."""
from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

from models.attention import attention, blockwise_attention, dense_attention, write_cache


def naive(q, k, v, mask, causal, bias=None):
    """Reference in numpy float64: repeat kv heads, full score matrix."""
    b, h, t, d = q.shape
    group = h // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    scores = np.einsum("bhtd,bhsd->bhts", q, k).astype(np.float64)
    visible = np.ones((b, 1, t, k.shape[2]), bool)
    if mask is not None:
        visible &= mask[:, None, None, :].astype(bool)
    if causal:
        visible &= np.tril(np.ones((t, t), bool))[None, None]
    if bias is not None:
        scores = scores + bias
    scores = np.where(visible, scores, -1e30)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.einsum("bhts,bhsd->bhtd", probs, v)
    return out.transpose(0, 2, 1, 3).reshape(b, t, h * d)


def inputs(b, h, kv, t, s, d=8, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(b, h, t, d)).astype(np.float32)
    k = rng.normal(size=(b, kv, s, d)).astype(np.float32)
    v = rng.normal(size=(b, kv, s, d)).astype(np.float32)
    return q, k, v


@pytest.mark.parametrize("length,block", [(37, 8), (64, 16), (50, 64), (33, 7 + 9)])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 1)])
def test_causal_left_padded_blockwise_equals_naive(length, block, heads, kv_heads):
    q, k, v = inputs(2, heads, kv_heads, length, length)
    mask = np.ones((2, length), np.int32)
    mask[1, :13] = 0  # left padding on the second row
    out = blockwise_attention(Tensor(q), Tensor(k), Tensor(v), Tensor(mask), causal=True, block=block).asnumpy()
    ref = naive(q, k, v, mask, causal=True)
    # padded query rows see no real key: their output is meaningless and discarded by every model
    assert np.abs(out[0] - ref[0]).max() < 1e-5
    assert np.abs(out[1, 13:] - ref[1, 13:]).max() < 1e-5
    dense = dense_attention(Tensor(q), Tensor(k), Tensor(v), Tensor(mask), causal=True).asnumpy()
    assert np.abs(dense[1, 13:] - ref[1, 13:]).max() < 1e-5


@pytest.mark.parametrize("t,s,block", [(5, 45, 16), (40, 40, 9), (1, 100, 32)])
def test_bidirectional_with_score_bias(t, s, block):
    q, k, v = inputs(1, 4, 2, t, s, seed=1)
    mask = np.ones((1, s), np.int32)
    mask[0, -3:] = 0
    table = np.random.default_rng(2).normal(size=(1, 4, t, s)).astype(np.float32)

    def bias(q0, q1, k0, k1):
        return Tensor(table[:, :, q0:q1, k0:k1])

    out = blockwise_attention(Tensor(q), Tensor(k), Tensor(v), Tensor(mask), score_bias=bias, block=block)
    assert np.abs(out.asnumpy() - naive(q, k, v, mask, False, table)).max() < 1e-5


def test_blockwise_under_jit_matches_and_dispatch_picks_blocks():
    from models import attention as attn_module

    q, k, v = inputs(1, 2, 2, 300, 300)
    mask = np.ones((1, 300), np.int32)

    @ms.jit
    def fn(query, key, value, key_mask):
        return blockwise_attention(query, key, value, key_mask, causal=True, block=64)

    out = fn(Tensor(q), Tensor(k), Tensor(v), Tensor(mask)).asnumpy()
    assert np.abs(out - naive(q, k, v, mask, True)).max() < 1e-5
    old = attn_module.block_size()
    attn_module.set_block_size(64)
    try:
        via_dispatch = attention(Tensor(q), Tensor(k), Tensor(v), Tensor(mask), causal=True).asnumpy()
    finally:
        attn_module.set_block_size(old)
    assert np.abs(via_dispatch - out).max() < 1e-6


def test_write_cache_prompt_then_one_slot():
    cache = Tensor(np.full((1, 2, 6, 3), 7.0, np.float32))
    prompt = np.arange(24, dtype=np.float32).reshape(1, 2, 4, 3)
    filled = write_cache(cache, Tensor(prompt), Tensor(np.arange(4, dtype=np.int32))).asnumpy()
    assert np.array_equal(filled[:, :, :4], prompt) and np.all(filled[:, :, 4:] == 7.0)
    step = np.full((1, 2, 1, 3), -1.0, np.float32)
    after = write_cache(Tensor(filled), Tensor(step), Tensor(np.array([4], np.int32))).asnumpy()
    assert np.all(after[:, :, 4] == -1.0)
    assert np.array_equal(after[:, :, :4], prompt) and np.all(after[:, :, 5] == 7.0)
