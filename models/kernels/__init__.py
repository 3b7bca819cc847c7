"""Fused CPU kernels for the hot non-matmul ops, as MindSpore "aot" custom operators.

MindSpore 2.7's CPU kernels for erf, GELU, LayerNorm and friends run 5 to 30 times slower than
PyTorch's. The C++ sources next to this file (``activations.cc``, ``norms.cc``, ``rotary.cc``) do each op in one
pass over memory (the attention tile's softmax with its log-sum-exp: three passes over a row that
stays in cache) on 8-float vectors, large ones split over the CPUs (plain threads, not OpenMP,
whose spinning workers slowed the next MindSpore matmul); ``ops.Custom(func_type="aot")`` runs them
inside ``ms.jit`` graphs and in PyNative alike, and each has a bprop, so training keeps them.

The library is compiled on first use (``g++ -O3 -march=native``) into
``$CAPTION_KERNELS_CACHE`` or ``~/.cache/mscaption/kernels/<hash of sources, flags, compiler, CPU>/``
under a file lock, so concurrent msrun ranks build it once. Without a compiler, or if the build
fails, the callers keep MindSpore's builtins and one warning is logged. ``CAPTION_KERNELS=0``
forces the builtins; so does any device other than CPU (Ascend keeps MindSpore's kernels), and
any dtype other than float32.

The choice is made in Python, not in the graph: :func:`refresh` reads the switch and the device
(it runs at import and whenever a norm layer is built, i.e. with every model), and compiled
graphs keep the choice they were traced with.
"""
from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Optional

import mindspore as ms
from mindspore import Tensor, ops

logger = logging.getLogger(__name__)

SWITCH = "CAPTION_KERNELS"
CACHE = "CAPTION_KERNELS_CACHE"
SOURCE_DIR = Path(__file__).resolve().parent
SOURCES = ("activations.cc", "norms.cc", "rotary.cc", "moe.cc", "infer.cc")
HEADERS = ("common.h",)
COMPILER = "g++"
FLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-std=c++17", "-pthread")
LIBRARY = "caption_kernels.so"

_state: dict = {"on": False, "library": None, "tried": False}
_ops: dict = {}


def _cpu_signature() -> str:
    """What -march=native compiles for: the CPU model and feature flags (a cache built elsewhere must not load)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return os.uname().machine
    keep = [line for line in lines if line.startswith(("model name", "flags"))]
    return "\n".join(dict.fromkeys(keep))


def _compiler_version(compiler: str) -> str:
    result = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True)
    return result.stdout.splitlines()[0] if result.stdout else ""


def _cache_dir(compiler: str) -> Path:
    digest = hashlib.sha256()
    for name in SOURCES + HEADERS:
        digest.update(name.encode() + b"\0" + (SOURCE_DIR / name).read_bytes())
    digest.update(" ".join(FLAGS).encode())
    digest.update(_compiler_version(compiler).encode())
    digest.update(_cpu_signature().encode())
    root = Path(os.environ.get(CACHE) or Path.home() / ".cache" / "mscaption" / "kernels")
    return root / digest.hexdigest()[:16]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _compile(compiler: str, folder: Path) -> Path:
    """The cached library, compiled first if missing (another process may be compiling: wait for its lock)."""
    target = folder / LIBRARY
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with _locked(folder / ".lock"):
        if target.exists():
            return target
        logger.info("compiling the CPU kernels into %s (once per source version and CPU)", folder)
        with tempfile.NamedTemporaryFile(dir=folder, suffix=".so", delete=False) as tmp:
            partial = Path(tmp.name)
        try:
            command = [compiler, *FLAGS, "-o", str(partial), *(str(SOURCE_DIR / s) for s in SOURCES)]
            subprocess.run(command, capture_output=True, text=True, check=True)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
    return target


def library() -> Optional[Path]:
    """Path of the compiled kernels, building them on the first call; None (one warning) if that fails."""
    if _state["tried"]:
        return _state["library"]
    _state["tried"] = True
    compiler = shutil.which(os.environ.get("CXX", COMPILER))
    if compiler is None:
        logger.warning("no C++ compiler (%s) found: the CPU kernels are off, MindSpore's builtin ops run instead",
                       os.environ.get("CXX", COMPILER))
        return None
    try:
        path = _compile(compiler, _cache_dir(compiler))
        ctypes.CDLL(str(path))  # a library that does not load would fail later, inside a graph
        _state["library"] = path
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", "") or str(error)
        logger.warning("building the CPU kernels failed, MindSpore's builtin ops run instead: %s", detail.strip()[-2000:])
    return _state["library"]


def refresh() -> bool:
    """Decide again whether the fused kernels run (switch, device, library); affects graphs compiled from now on."""
    wanted = os.environ.get(SWITCH, "1").strip().lower() not in ("0", "false", "off", "no")
    on_cpu = ms.get_context("device_target") == "CPU"
    _state["on"] = bool(wanted and on_cpu and library() is not None)
    if _state["on"] and not _ops:
        _make_ops(str(_state["library"]))
    return _state["on"]


def active() -> bool:
    """Whether the fused kernels run, as :func:`refresh` last decided (graphs read this while tracing)."""
    return _state["on"]


def _custom(lib: str, name: str, inputs: int, outputs: int, bprop: Optional[Callable] = None) -> ops.Custom:
    """One AOT op of the library, float32 in and out. Shapes and dtypes come from its C++ ``<name>InferShape``
    and ``<name>InferType`` (infer.cc), which MindSpore calls only for an op with registration info."""
    reg = ops.CustomRegOp(name)
    for i in range(inputs):
        reg = reg.input(i, f"x{i}")
    for i in range(outputs):
        reg = reg.output(i, f"y{i}")
    reg = reg.dtype_format(*[ops.DataType.F32_Default] * (inputs + outputs)).target("CPU").get_op_info()
    return ops.Custom(f"{lib}:{name}", out_shape=None, out_dtype=None, func_type="aot", bprop=bprop, reg_info=reg)


def _make_ops(lib: str) -> None:
    """The forward ops with their bprops; gradient kernels take the forward's inputs and dy.

    The bprops are parsed into graphs, so they are named functions (MindSpore cannot parse a lambda
    passed as an argument).
    """
    def grad_of_unary(name: str) -> Callable:
        grad = _custom(lib, name, 2, 1)

        def bprop(x, out, dout):
            return (grad(x, dout),)
        return bprop

    for key, name in (("gelu", "GeluErf"), ("gelu_tanh", "GeluTanh"), ("quick_gelu", "QuickGelu"), ("silu", "Silu")):
        _ops[key] = _custom(lib, name, 1, 1, grad_of_unary(name + "Grad"))

    silu_mul_grad = _custom(lib, "SiluMulGrad", 3, 2)

    def silu_mul_bprop(gate, up, out, dout):
        return silu_mul_grad(gate, up, dout)
    _ops["silu_mul"] = _custom(lib, "SiluMul", 2, 1, silu_mul_bprop)
    _ops["moe_experts"] = _custom(lib, "MoeExperts", 5, 1)  # inference only: one-token steps (models.moe)

    ln_grad = _custom(lib, "LayerNormGrad", 4, 3)

    def ln_bprop(x, weight, bias, eps, out, dout):
        dx, dw, db = ln_grad(x, weight, dout, eps)
        return dx, dw, db, ops.zeros_like(eps)
    _ops["layer_norm"] = _custom(lib, "LayerNorm", 4, 1, ln_bprop)

    rms_grad = _custom(lib, "RmsNormGrad", 4, 2)

    def rms_bprop(x, weight, eps, out, dout):
        dx, dw = rms_grad(x, weight, dout, eps)
        return dx, dw, ops.zeros_like(eps)
    _ops["rms_norm"] = _custom(lib, "RmsNorm", 3, 1, rms_bprop)

    def softmax_grad(probs, lse_grad, probs_grad):
        inner = (probs_grad * probs).sum(axis=-1, keepdims=True)
        return probs * (probs_grad - inner + lse_grad[..., None])

    def softmax_lse_bprop(x, out, dout):
        return (softmax_grad(out[0], dout[1], dout[0]),)

    def softmax_lse_bias_bprop(x, bias, out, dout):
        dx = softmax_grad(out[0], dout[1], dout[0])
        return dx, dx
    _ops["softmax_lse"] = _custom(lib, "SoftmaxLse", 1, 2, softmax_lse_bprop)
    _ops["softmax_lse_bias"] = _custom(lib, "SoftmaxLseBias", 2, 2, softmax_lse_bias_bprop)

    rotary_grad = _custom(lib, "RotaryGrad", 3, 1)

    def rotary_bprop(x, cos, sin, out, dout):
        return rotary_grad(dout, cos, sin), ops.zeros_like(cos), ops.zeros_like(sin)
    _ops["rotary"] = _custom(lib, "Rotary", 3, 1, rotary_bprop)


def runs_on(x: Tensor) -> bool:
    """Whether ``x`` goes to a fused kernel: they are on (CPU, built, not switched off) and it is float32."""
    return active() and x.dtype == ms.float32


def op(key: str) -> ops.Custom:
    """The fused op ``key`` (only call when :func:`active`)."""
    return _ops[key]


def scalar(value: float) -> Tensor:
    """A float32 (1,) tensor: how eps reaches a kernel (AOT ops take tensors)."""
    return Tensor([value], ms.float32)


refresh()
