"""Gated DeltaNet (models.linear_attention) against transformers' Qwen3_5GatedDeltaNet (PyTorch, fp32).

transformers' module runs on its PyTorch fallbacks (no flash-linear-attention / causal-conv1d on CPU): the
chunked rule for prompts, the recurrent rule and conv update for cached single-token steps.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
hf_qwen3_5 = pytest.importorskip("transformers.models.qwen3_5.modeling_qwen3_5")

import mindspore as ms  # noqa: E402
from mindspore import Tensor  # noqa: E402
from transformers.cache_utils import DynamicCache  # noqa: E402
from transformers.models.qwen3_5.configuration_qwen3_5 import Qwen3_5TextConfig  # noqa: E402

from models.linear_attention import (GatedDeltaNet, chunk_gated_delta_rule,  # noqa: E402
                                     recurrent_gated_delta_rule)

HIDDEN = 32


def tiny_config() -> Qwen3_5TextConfig:
    return Qwen3_5TextConfig(hidden_size=HIDDEN, linear_num_key_heads=2, linear_num_value_heads=4,
                             linear_key_head_dim=8, linear_value_head_dim=16, linear_conv_kernel_dim=4,
                             num_hidden_layers=1, layer_types=["linear_attention"], num_attention_heads=2,
                             num_key_value_heads=1, head_dim=16, intermediate_size=64, vocab_size=64)


@pytest.fixture(scope="module")
def pair():
    """transformers' layer with its seeded random init (plus random norm weight and dt_bias, which start as ones)
    and ours loaded from its state dict: every name must match, none missing or extra."""
    config = tiny_config()
    torch.manual_seed(0)
    hf = hf_qwen3_5.Qwen3_5GatedDeltaNet(config, layer_idx=0).eval()
    with torch.no_grad():
        hf.norm.weight.uniform_(0.5, 1.5)
        hf.dt_bias.uniform_(-1.0, 1.0)
    ours = GatedDeltaNet(config)
    state = {name: value.detach().numpy() for name, value in hf.state_dict().items()}
    params = dict(ours.parameters_and_names())
    assert set(params) == set(state), (sorted(set(state) - set(params)), sorted(set(params) - set(state)))
    for name, param in params.items():
        assert tuple(param.shape) == state[name].shape, name
        param.set_data(Tensor(state[name]))
    return hf, ours


def hidden(length: int, batch: int = 1, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(batch, length, HIDDEN)).astype(np.float32)


def run_hf(hf, x: np.ndarray, steps: np.ndarray = None, mask: np.ndarray = None):
    """transformers' outputs for a prompt (then cached single-token steps) and its cache's final states."""
    cache = DynamicCache(config=tiny_config())
    with torch.no_grad():
        outs = [hf(torch.from_numpy(x), cache=cache,
                   attention_mask=None if mask is None else torch.from_numpy(mask))]
        for t in range(0 if steps is None else steps.shape[1]):
            outs.append(hf(torch.from_numpy(steps[:, t:t + 1]), cache=cache))
    layer = cache.layers[0]
    return [o.numpy() for o in outs], layer.conv_states[0].numpy(), layer.recurrent_states[0].numpy()


def test_transformers_uses_torch_fallbacks():
    """The reference is transformers' own PyTorch code: neither kernel package is installed here."""
    assert importlib.util.find_spec("fla") is None and importlib.util.find_spec("causal_conv1d") is None


@pytest.mark.parametrize("length", [5, 64, 150])
def test_prompt_matches_transformers(pair, length):
    hf, ours = pair
    x = hidden(length, batch=2, seed=length)
    (want,), want_conv, want_state = run_hf(hf, x)
    out, conv, state = ours.prompt(Tensor(x))
    assert np.abs(out.asnumpy() - want).max() < 1e-4
    assert conv.shape == want_conv.shape == (2, 96, 4)
    assert np.abs(conv.asnumpy() - want_conv).max() < 1e-5
    assert state.shape == want_state.shape == (2, 4, 8, 16) and state.dtype == ms.float32
    assert np.abs(state.asnumpy() - want_state).max() < 1e-4


def test_decode_matches_transformers_cache(pair):
    hf, ours = pair
    x, steps = hidden(70, batch=2, seed=1), hidden(5, batch=2, seed=2)
    want, want_conv, want_state = run_hf(hf, x, steps)
    out, conv, state = ours.prompt(Tensor(x))
    assert np.abs(out.asnumpy() - want[0]).max() < 1e-4
    for t in range(5):
        out, conv, state = ours.step(Tensor(steps[:, t:t + 1]), conv, state)
        assert np.abs(out.asnumpy() - want[t + 1]).max() < 1e-4
    assert np.abs(conv.asnumpy() - want_conv).max() < 1e-5
    assert np.abs(state.asnumpy() - want_state).max() < 1e-4


def test_left_padding_equals_rows_alone(pair):
    hf, ours = pair
    lengths, width = (9, 70), 70
    rows = [hidden(n, seed=10 + n) for n in lengths]
    x = np.zeros((2, width, HIDDEN), np.float32)
    mask = np.zeros((2, width), np.int32)
    for r, (row, n) in enumerate(zip(rows, lengths)):
        x[r, width - n:] = row[0] + 3.0 * (r == 0)  # padding content must not matter either
        x[r, :width - n] = 5.0
        mask[r, width - n:] = 1
    out, conv, state = ours.prompt(Tensor(x), Tensor(mask))
    (hf_out,), _, _ = run_hf(hf, x, mask=mask)
    for r, (row, n) in enumerate(zip(rows, lengths)):
        alone_out, alone_conv, alone_state = ours.prompt(Tensor(row + 3.0 * (r == 0)))
        assert np.abs(out.asnumpy()[r, width - n:] - alone_out.asnumpy()[0]).max() < 1e-5
        assert np.abs(conv.asnumpy()[r] - alone_conv.asnumpy()[0]).max() < 1e-5
        assert np.abs(state.asnumpy()[r] - alone_state.asnumpy()[0]).max() < 1e-5
        assert np.abs(hf_out[r, width - n:] - alone_out.asnumpy()[0]).max() < 1e-4


def test_chunked_equals_recurrent(pair):
    _, ours = pair
    x = hidden(70, batch=2, seed=3)
    out, conv, state = ours.prompt(Tensor(x))
    step_conv = Tensor(np.zeros((2, 96, 4), np.float32))
    step_state = Tensor(np.zeros((2, 4, 8, 16), np.float32))
    step_fn = ms.jit(ours.step)
    outs = []
    for t in range(x.shape[1]):
        o, step_conv, step_state = step_fn(Tensor(x[:, t:t + 1]), step_conv, step_state)
        outs.append(o.asnumpy())
    assert np.abs(np.concatenate(outs, axis=1) - out.asnumpy()).max() < 1e-4
    assert np.abs(step_conv.asnumpy() - conv.asnumpy()).max() < 1e-5
    assert np.abs(step_state.asnumpy() - state.asnumpy()).max() < 1e-4


def test_rule_functions_agree_with_initial_state_and_similar_keys():
    """The math functions directly: a nonzero start state, strong decay and nearly parallel keys (where a power
    series for the triangular inverse would lose precision); chunk sizes that do and do not divide L."""
    rng = np.random.default_rng(4)
    b, length, hk, hv, dk, dv = 1, 40, 1, 2, 4, 3
    base = rng.normal(size=(1, 1, hk, dk))
    q = Tensor(rng.normal(size=(b, length, hk, dk)).astype(np.float32))
    k = Tensor((base + 0.05 * rng.normal(size=(b, length, hk, dk))).astype(np.float32))
    v = Tensor(rng.normal(size=(b, length, hv, dv)).astype(np.float32))
    g = Tensor(-rng.uniform(0.0, 3.0, size=(b, length, hv)).astype(np.float32))
    beta = Tensor(rng.uniform(0.5, 1.0, size=(b, length, hv)).astype(np.float32))
    s0 = Tensor(rng.normal(size=(b, hv, dk, dv)).astype(np.float32))
    want_out, want_state = recurrent_gated_delta_rule(q, k, v, g, beta, s0)
    for chunk in (8, 16, 64):
        out, state = chunk_gated_delta_rule(q, k, v, g, beta, s0, chunk_size=chunk)
        assert np.abs(out.asnumpy() - want_out.asnumpy()).max() < 1e-4
        assert np.abs(state.asnumpy() - want_state.asnumpy()).max() < 1e-4


def test_jit_equals_eager(pair):
    """The step compiles (what generation does each token); the prompt compiles too, mask included."""
    _, ours = pair
    x = hidden(12, batch=2, seed=5)
    mask = np.ones((2, 11), np.int32)
    mask[0, :4] = 0
    eager_prompt = ours.prompt(Tensor(x[:, :11]), Tensor(mask))
    compiled_prompt = ms.jit(ours.prompt)(Tensor(x[:, :11]), Tensor(mask))
    _, conv, state = eager_prompt
    eager = ours.step(Tensor(x[:, 11:]), conv, state)
    compiled = ms.jit(ours.step)(Tensor(x[:, 11:]), conv, state)
    for a, c in zip(eager_prompt + eager, compiled_prompt + compiled):
        assert a.shape == c.shape
        assert np.abs(a.asnumpy() - c.asnumpy()).max() < 1e-6
