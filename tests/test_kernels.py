"""The fused CPU kernels (models/kernels) against MindSpore's builtins: values, gradients, graphs, fallback."""
from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, ops

from models import kernels, layers

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(3, 7, 37), (1, 1), (13,), (5, 8), (2, 70001), (257, 1536)]
TOLERANCE = 1e-6

needs_kernels = pytest.mark.skipif(not kernels.refresh(), reason="CPU kernels not built (no compiler or not on CPU)")


@pytest.fixture
def kernels_off(monkeypatch):
    """The builtins, for the reference values; the kernels come back on afterwards."""
    monkeypatch.setenv(kernels.SWITCH, "0")
    assert not kernels.refresh()
    yield
    monkeypatch.delenv(kernels.SWITCH)
    assert kernels.refresh()


def rel_diff(a: np.ndarray, b: np.ndarray, scale: float = 0.0) -> float:
    """max |a - b| / max(max |b|, scale): differences of large and small entries alike count against the scale."""
    return float(np.abs(a.astype(np.float64) - b).max() / max(np.abs(b).max(), scale, 1e-30))


def norm_dx_scale(shape: tuple, norms: "Norms", eps: float, centred: bool) -> float:
    """The size of a norm's input gradient before cancellation, rstd |dy w|: with one element per row the
    gradient itself cancels to rounding noise (0 for LayerNorm), which is compared against this instead."""
    x, dy = data(shape).astype(np.float64), data(shape, 2, 1.0).astype(np.float64)
    weight = (norms.ln if centred else norms.rms).weight.asnumpy()
    spread = x.var(axis=-1) if centred else (x * x).mean(axis=-1)
    return float(np.abs(dy).max() * np.abs(weight).max() / np.sqrt(spread.min() + eps))


def data(shape: tuple, seed: int = 0, scale: float = 3.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


class Norms(ms.nn.Cell):
    def __init__(self, size: int):
        super().__init__()
        rng = np.random.default_rng(7)
        self.ln = layers.LayerNorm(size, eps=1e-5)
        self.rms = layers.RMSNorm(size, eps=1e-6)
        for p, offset in ((self.ln.weight, 1.0), (self.ln.bias, 0.0), (self.rms.weight, 1.0)):
            p.set_data(Tensor((offset + 0.5 * rng.standard_normal(size)).astype(np.float32)))


def unary_cases() -> dict:
    return {"gelu": layers.gelu, "gelu_tanh": layers.gelu_tanh, "quick_gelu": layers.quick_gelu, "silu": layers.silu}


def run_all(shape: tuple, compiled: bool) -> dict:
    """Every op on data of ``shape`` (values, and gradients of a weighted sum), under ms.jit or PyNative."""
    x, up, w = Tensor(data(shape)), Tensor(data(shape, 1)), Tensor(data(shape, 2, 1.0))
    norms = Norms(shape[-1])
    def silu_mul(a):
        return layers.silu_mul(a, up)

    fns = dict(unary_cases(), silu_mul=silu_mul)
    fns["layer_norm"] = norms.ln
    fns["rms_norm"] = norms.rms
    def weighted(fn):
        def loss(a):
            return (fn(a) * w).sum()
        return loss

    def maybe_jit(fn):
        return ms.jit(fn) if compiled else fn

    out = {}
    for name, fn in fns.items():
        out[name] = maybe_jit(fn.construct if isinstance(fn, ms.nn.Cell) else fn)(x).asnumpy()
        out[name + " dx"] = maybe_jit(ms.grad(weighted(fn), grad_position=0))(x).asnumpy()
    for name, cell in (("layer_norm", norms.ln), ("rms_norm", norms.rms)):
        grads = maybe_jit(ms.grad(weighted(cell), grad_position=None, weights=cell.trainable_params()))(x)
        for param, g in zip(cell.trainable_params(), grads):
            out[f"{name} d{param.name.rsplit('.', 1)[-1]}"] = g.asnumpy()

    def silu_mul_loss(a, b):
        return (layers.silu_mul(a, b) * w).sum()
    out["silu_mul dup"] = maybe_jit(ms.grad(silu_mul_loss, grad_position=1))(x, up).asnumpy()
    scales = {"layer_norm dx": norm_dx_scale(shape, norms, 1e-5, True),
              "rms_norm dx": norm_dx_scale(shape, norms, 1e-6, False)}
    return out, scales


@needs_kernels
@pytest.mark.parametrize("compiled", [False, True], ids=["pynative", "jit"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kernels_equal_builtins(shape, compiled, monkeypatch):
    ours, scales = run_all(shape, compiled)
    monkeypatch.setenv(kernels.SWITCH, "0")
    assert not kernels.refresh()
    try:
        builtin, _ = run_all(shape, compiled)
    finally:
        monkeypatch.delenv(kernels.SWITCH)
        assert kernels.refresh()
    assert ours.keys() == builtin.keys()
    diffs = {k: rel_diff(ours[k], builtin[k], scales.get(k, 0.0)) for k in ours}
    assert all(d < TOLERANCE for d in diffs.values()), {k: d for k, d in diffs.items() if not d < TOLERANCE}


@needs_kernels
def test_gelu_tails_to_float32_rounding():
    """erf GELU against float64 over [-12, 12]: the rational erf is accurate to a few float32 ulps
    in both tails (the builtin's 1 + erf form loses all digits below about -5)."""
    x = np.concatenate([np.linspace(-12, 12, 240001), data((100000,))]).astype(np.float32)
    ours = layers.gelu(Tensor(x)).asnumpy().astype(np.float64)
    x64 = x.astype(np.float64)
    exact = np.array([0.5 * v * math.erfc(-v / math.sqrt(2)) for v in x64])
    normal = np.abs(exact) > np.finfo(np.float32).tiny
    ulps = np.abs(ours - exact)[normal] / np.spacing(np.abs(exact[normal]).astype(np.float32))
    assert ulps.max() <= 8, ulps.max()


@needs_kernels
def test_special_values():
    x = Tensor(np.array([0.0, -0.0, np.inf, 200.0, -200.0, np.nan, 1e-40], np.float32))
    gelu = layers.gelu(x).asnumpy()
    np.testing.assert_array_equal(gelu[[0, 2, 3, 4]], [0.0, np.inf, 200.0, 0.0])
    assert np.isnan(gelu[5])
    silu = layers.silu(x).asnumpy()
    np.testing.assert_array_equal(silu[[0, 2, 3]], [0.0, np.inf, 200.0])
    assert abs(silu[4]) < 1e-40 and np.isnan(silu[5])


@needs_kernels
def test_float16_inputs(monkeypatch):
    """Half-precision activations and RMSNorm take the builtins; LayerNorm (float32 inside) takes the kernel."""
    x = Tensor(data((4, 37))).astype(ms.float16)
    norms = Norms(37)
    cases = dict(unary_cases(), rms_norm=norms.rms, layer_norm=norms.ln)
    ours = {name: fn(x) for name, fn in cases.items()}
    monkeypatch.setenv(kernels.SWITCH, "0")
    assert not kernels.refresh()
    try:
        builtin = {name: fn(x) for name, fn in cases.items()}
    finally:
        monkeypatch.delenv(kernels.SWITCH)
        assert kernels.refresh()
    for name in cases:
        assert ours[name].dtype == ms.float16
        if name == "layer_norm":
            assert rel_diff(ours[name].asnumpy(), builtin[name].asnumpy()) < 1e-3
        else:
            np.testing.assert_array_equal(ours[name].asnumpy(), builtin[name].asnumpy())


FALLBACK = textwrap.dedent("""
    import logging, sys
    import numpy as np
    from mindspore import Tensor, ops
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    from models import kernels, layers
    assert not kernels.active()
    x = Tensor(np.linspace(-5, 5, 37, dtype=np.float32).reshape(1, 37))
    ln = layers.LayerNorm(37)
    layers.RMSNorm(37)
    assert not kernels.refresh()
    expected = (0.5 * x * (1.0 + ops.erf(x * 0.7071067811865476))).asnumpy()
    assert np.array_equal(layers.gelu(x).asnumpy(), expected)
    y, _, _ = ops.LayerNorm(-1, -1, 1e-5)(x, ln.weight, ln.bias)
    assert np.array_equal(ln(x).asnumpy(), y.asnumpy())
    print("fallback ok")
""")


@pytest.mark.parametrize("compiler", ["/nonexistent/g++", "false"], ids=["no compiler", "build fails"])
def test_fallback_without_build(compiler, tmp_path):
    """No compiler, or a failing build: the builtins' exact results and a single warning."""
    env = dict(os.environ, CXX=compiler, CAPTION_KERNELS_CACHE=str(tmp_path), PYTHONPATH=str(ROOT))
    env.pop(kernels.SWITCH, None)
    result = subprocess.run([sys.executable, "-c", FALLBACK], env=env, capture_output=True, text=True, cwd=ROOT,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fallback ok" in result.stdout
    warnings = [line for line in result.stderr.splitlines() if line.startswith("WARNING models.kernels")]
    assert len(warnings) == 1, result.stderr[-3000:]


@needs_kernels
def test_layer_norm_in_training_mode_keeps_the_builtin():
    norms = Norms(37)
    x = Tensor(data((3, 37)))
    norms.ln.set_train(True)
    y, _, _ = ops.LayerNorm(-1, -1, 1e-5)(x, norms.ln.weight, norms.ln.bias)
    np.testing.assert_array_equal(norms.ln(x).asnumpy(), y.asnumpy())
    norms.ln.set_train(False)
    assert 0 < rel_diff(norms.ln(x).asnumpy(), y.asnumpy()) < TOLERANCE


@needs_kernels
def test_switch_off_uses_builtins(kernels_off):
    x = Tensor(data((3, 7, 37)))
    expected = (0.5 * x * (1.0 + ops.erf(x * 0.7071067811865476))).asnumpy()
    np.testing.assert_array_equal(layers.gelu(x).asnumpy(), expected)


@needs_kernels
def test_cache_is_keyed_and_reused(tmp_path, monkeypatch):
    """A second build with the same sources and flags reuses the cached library instead of compiling again."""
    monkeypatch.setenv(kernels.CACHE, str(tmp_path))
    compiler = kernels.shutil.which(kernels.COMPILER)
    first = kernels._compile(compiler, kernels._cache_dir(compiler))
    stamp = first.stat().st_mtime_ns
    second = kernels._compile(compiler, kernels._cache_dir(compiler))
    assert first == second and second.stat().st_mtime_ns == stamp
    assert first.parent.parent == tmp_path


ROTARY_SHAPES = [((2, 4, 9, 16), (2, 1, 9, 16)),   # Llama: angles per row and position, shared by the heads
                 ((3, 50, 2, 8), (1, 50, 1, 8)),   # Qwen2-VL vision: per patch, shared by frames and heads
                 ((1, 3, 1, 6), (1, 1, 1, 6)),     # one decoding step
                 ((2, 2, 70001, 2), (2, 1, 70001, 2))]  # many rows, split over threads


@pytest.fixture
def rotary_kernel_always(monkeypatch):
    """The kernel for every size (it is kept for large operands only, where it measured faster)."""
    monkeypatch.setattr(layers, "ROTARY_KERNEL_ELEMENTS", 0)


def run_rotary(x_shape: tuple, angle_shape: tuple, compiled: bool) -> tuple[np.ndarray, np.ndarray]:
    x, w = Tensor(data(x_shape)), Tensor(data(x_shape, 2, 1.0))
    angles = data(angle_shape, 1)
    cos, sin = Tensor(np.cos(angles)), Tensor(np.sin(angles))

    def loss(a):
        return (layers.apply_rotary(a, cos, sin) * w).sum()

    def forward(a):
        return layers.apply_rotary(a, cos, sin)

    wrap = ms.jit if compiled else (lambda f: f)
    return wrap(forward)(x).asnumpy(), wrap(ms.grad(loss, grad_position=0))(x).asnumpy()


@needs_kernels
@pytest.mark.parametrize("compiled", [False, True], ids=["pynative", "jit"])
@pytest.mark.parametrize("shapes", ROTARY_SHAPES, ids=str)
def test_rotary_kernel_equals_builtin(shapes, compiled, monkeypatch, rotary_kernel_always):
    if not compiled:  # the kernel runs, not the builtin twice (graphs cannot call a recording spy)
        asked, real = [], kernels.op

        def spy(key):
            asked.append(key)
            return real(key)
        monkeypatch.setattr(kernels, "op", spy)
        run_rotary(*shapes, compiled)
        assert asked == ["rotary"] * 2  # the forward, and the forward the gradient differentiates
        monkeypatch.setattr(kernels, "op", real)
    ours = run_rotary(*shapes, compiled)
    monkeypatch.setenv(kernels.SWITCH, "0")
    assert not kernels.refresh()
    try:
        builtin = run_rotary(*shapes, compiled)
    finally:
        monkeypatch.delenv(kernels.SWITCH)
        assert kernels.refresh()
    for got, want in zip(ours, builtin):
        assert got.shape == want.shape and rel_diff(got, want) < TOLERANCE


SOFTMAX_SHAPES = [(3, 7, 37), (2, 1, 1), (5, 9), (2, 3, 257, 1024)]  # the last split over threads


def run_softmax_lse(shape: tuple, with_bias: bool, compiled: bool) -> list[np.ndarray]:
    """Probabilities, log-sum-exps and the scores' gradient of attention._softmax_lse, as it decides now."""
    from models.attention import MASK_MIN, _softmax_lse

    x = Tensor(data(shape))
    bias = np.where(np.random.default_rng(4).random(shape) < 0.3, MASK_MIN, 0.0).astype(np.float32)
    bias.reshape(-1, shape[-1])[:, 0] = 0.0  # every row keeps a key, as the callers' rows do
    bias = Tensor(bias) if with_bias else None
    dprobs, dlse = Tensor(data(shape, 2, 1.0)), Tensor(data(shape[:-1], 3, 1.0))

    def forward(a):
        return _softmax_lse(a, bias)

    def loss(a):
        probs, lse = _softmax_lse(a, bias)
        return (probs * dprobs).sum() + (lse * dlse).sum()

    wrap = ms.jit if compiled else (lambda f: f)
    probs, lse = wrap(forward)(x)
    return [probs.asnumpy(), lse.asnumpy(), wrap(ms.grad(loss, grad_position=0))(x).asnumpy()]


@needs_kernels
@pytest.mark.parametrize("compiled", [False, True], ids=["pynative", "jit"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["plain", "bias"])
@pytest.mark.parametrize("shape", SOFTMAX_SHAPES, ids=str)
def test_softmax_lse_kernel_equals_builtin(shape, with_bias, compiled, monkeypatch):
    from models import attention

    monkeypatch.setattr(attention, "SOFTMAX_KERNEL_ELEMENTS", 0)  # every size (kept for large tiles only)
    if not compiled:
        asked, real = [], kernels.op

        def spy(key):
            asked.append(key)
            return real(key)
        monkeypatch.setattr(kernels, "op", spy)
        run_softmax_lse(shape, with_bias, compiled)
        assert asked == ["softmax_lse_bias" if with_bias else "softmax_lse"] * 2
        monkeypatch.setattr(kernels, "op", real)
    ours = run_softmax_lse(shape, with_bias, compiled)
    monkeypatch.setenv(kernels.SWITCH, "0")
    assert not kernels.refresh()
    try:
        builtin = run_softmax_lse(shape, with_bias, compiled)
    finally:
        monkeypatch.delenv(kernels.SWITCH)
        assert kernels.refresh()
    for got, want in zip(ours, builtin):
        assert got.shape == want.shape and rel_diff(got, want) < TOLERANCE
