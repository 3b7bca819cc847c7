"""On-device token selection (models.generation): the same ids, in the same tie order, as the host's
stable full sort, and generation that selects on the device equals generation from full logits."""
from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
import transformers

from models import generation
from models.generation import _best, _topk
from models.layers import init_weights
from models.llama import LlamaForCausalLM


def reference(x: np.ndarray, k: int, eos: list, ban: bool, shift: np.ndarray | None) -> tuple:
    """The host rule: ban eos, add the running score, then a stable sort (ties to the lower id)."""
    y = x.copy()
    if ban and eos:
        y[:, eos] = -np.inf
    if shift is not None:
        y = (y + shift[:, None]).astype(np.float32)
    ids = np.argsort(-y, axis=-1, kind="stable")[:, :k]
    return np.take_along_axis(y, ids, -1), ids


def tied_rows(rows: int, vocab: int, seed: int) -> np.ndarray:
    """Scores with many exact ties (a few distinct values) and some -inf entries."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 4, (rows, vocab)).astype(np.float32) - 3.0
    x[rng.random((rows, vocab)) < 0.2] = -np.inf
    x[0] = 0.0  # one row all equal
    return x


@pytest.mark.parametrize("vocab", [99, 5000, 5001])  # one keyed pass; groups; groups with padding
@pytest.mark.parametrize("k", [1, 10])
@pytest.mark.parametrize("ban", [False, True])
@pytest.mark.parametrize("jit", [False, True])
def test_best_matches_a_stable_sort(vocab, k, ban, jit):
    x = tied_rows(6, vocab, seed=vocab + k)
    eos = [3, vocab - 1]
    x[1, eos] = 5.0  # the best entries of row 1 are eos: banned, the row's ranking must skip them
    shift = np.array([0.0, -1e9, -2.5, 0.25, -7.0, 1.0], np.float32)
    fn = ms.jit(_best) if jit else _best
    vals, ids = fn(ms.Tensor(x), k, ms.Tensor(np.asarray(eos, np.int32)), ms.Tensor(ban), ms.Tensor(shift))
    vals, ids = vals.asnumpy(), ids.asnumpy()
    order = np.lexsort((ids, -vals), axis=-1)
    ref_vals, ref_ids = reference(x, k, eos, ban, shift)
    np.testing.assert_array_equal(np.take_along_axis(ids, order, -1), ref_ids)
    np.testing.assert_array_equal(np.take_along_axis(vals, order, -1), ref_vals)


def test_best_without_eos_or_shift():
    x = tied_rows(3, 4000, seed=1)
    vals, ids = _best(ms.Tensor(x), 7, None, None, None)
    order = np.lexsort((ids.asnumpy(), -vals.asnumpy()), axis=-1)
    np.testing.assert_array_equal(np.take_along_axis(ids.asnumpy(), order, -1), reference(x, 7, [], False, None)[1])


@pytest.mark.parametrize("k", [1, 3, 10, 40])
def test_host_topk_is_the_stable_sort(k):
    x = tied_rows(5, 40, seed=k)
    x[2, 5] = np.nan
    np.testing.assert_array_equal(_topk(x, k), np.argsort(-x, axis=-1, kind="stable")[:, :k])


@pytest.fixture(scope="module")
def llama():
    cfg = transformers.LlamaConfig(vocab_size=3001, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   eos_token_id=7, pad_token_id=0)
    model = LlamaForCausalLM(cfg)
    init_weights(model, std=0.2)
    return model


@pytest.mark.parametrize("kw", [
    dict(num_beams=1),
    dict(num_beams=1, min_new_tokens=5),
    dict(num_beams=4, num_return_sequences=4, min_new_tokens=5),
    dict(num_beams=3, num_return_sequences=2, eos_token_id=[7, 11], length_penalty=0.7),
    dict(num_beams=3, num_return_sequences=3, repetition_penalty=0.6),
])
def test_device_selection_equals_full_logits(llama, kw):
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 3001, (9, 9))
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :6] = 0  # left padding; batch 9 runs as a bucket of 10 (one filler row)
    args = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, **kw)
    fast = generation.generate(llama, **args)
    full = generation.generate(llama, select_on_device=False, **args)
    np.testing.assert_array_equal(fast.sequences, full.sequences)
    if kw["num_beams"] > 1:
        np.testing.assert_allclose(fast.sequences_scores, full.sequences_scores, atol=1e-5)
