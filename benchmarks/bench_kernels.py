"""Speed of the fused CPU kernels (models/kernels) against MindSpore's builtins and PyTorch eager.

Per op, on a (2056, 1536) float32 tensor (8 ViT images of 257 tokens by 1536 features) and a
(256, 768) one (for ``softmax_lse``, an attention tile's scores: 2056 queries by 1536 keys; its
``_bias`` case adds an equal-shape bias, as a causal tile does): MindSpore builtin under ``ms.jit`` (``CAPTION_KERNELS=0``), our kernel under
``ms.jit``, and torch eager, in ms per call (median over interleaved rounds, so a load change on a
shared machine hits all three alike), the ratios, and each implementation's peak RSS (its own process
running every op once at the large shape).

Then one model: a BLIP-2-style ViT (hidden 768, MLP 3072, 6 layers, 12 heads, 8 images at 224 px,
random weights, our port loading transformers' ``Blip2VisionModel`` weights) forward under ms.jit
and in PyNative, with the kernels off and on (one process, interleaved rounds), then in
transformers + torch eager (its own process); ms per forward, peak RSS per process.

    python -m benchmarks.bench_kernels [--rounds 7] [--output benchmarks/results/kernels.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

SHAPES = [(2056, 1536), (256, 768)]
OPS = ("gelu", "gelu_tanh", "quick_gelu", "silu_mul", "layer_norm", "rms_norm", "rotary", "softmax_lse",
       "softmax_lse_bias")
IMPLS = ("builtin", "kernel", "torch")
MODEL_MODES = ("builtin jit", "kernel jit", "builtin pynative", "kernel pynative", "torch eager")
ROOT = Path(__file__).resolve().parents[1]


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM: unlike ru_maxrss it does not start from the parent's peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmHWM in /proc/self/status")


def set_kernels(on: bool) -> None:
    from models import kernels
    os.environ[kernels.SWITCH] = "1" if on else "0"
    if kernels.refresh() != on:
        raise RuntimeError("the CPU kernels did not build: nothing to compare")


def ms_ops(shape: tuple, on: bool) -> dict[str, Callable[[], object]]:
    """Compiled calls of every op with the kernels on or off (fresh graphs, traced under that setting)."""
    import mindspore as ms
    from mindspore import Tensor

    from models import attention, layers
    set_kernels(on)
    rng = np.random.default_rng(0)
    x, up = (Tensor(rng.standard_normal(shape).astype(np.float32)) for _ in range(2))
    ln, rms = layers.LayerNorm(shape[-1]), layers.RMSNorm(shape[-1])
    unary = {"gelu": layers.gelu, "gelu_tanh": layers.gelu_tanh, "quick_gelu": layers.quick_gelu,
             "layer_norm": ln.construct, "rms_norm": rms.construct}
    calls = {name: (lambda f=ms.jit(fn): f(x)) for name, fn in unary.items()}
    compiled = ms.jit(layers.silu_mul)
    calls["silu_mul"] = lambda: compiled(x, up)
    heads, cos, sin = (Tensor(a) for a in rotary_operands(x.asnumpy(), rng))
    rotary = ms.jit(layers.apply_rotary)
    calls["rotary"] = lambda: rotary(heads, cos, sin)
    softmax, softmax_bias = ms.jit(attention._softmax_lse), ms.jit(attention._softmax_lse)
    calls["softmax_lse"] = lambda: softmax(x)
    calls["softmax_lse_bias"] = lambda: softmax_bias(x, up)
    for call in calls.values():
        read(call())  # compile (and trace the kernel setting) now
    return calls


ROTARY_DIM = 128  # head size of the rotary case: x of (rows, cols) is (1, cols / 128 heads, rows, 128)


def rotary_operands(x: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``x`` as (1, heads, rows, 128) queries, and cos and sin of (1, 1, rows, 128) shared by the heads,
    as in a Llama/Qwen2 attention layer."""
    heads = np.ascontiguousarray(x.reshape(1, x.shape[0], -1, ROTARY_DIM).swapaxes(1, 2))
    angles = rng.standard_normal((1, 1, x.shape[0], ROTARY_DIM)).astype(np.float32)
    return heads, np.cos(angles), np.sin(angles)


def torch_ops(shape: tuple) -> dict[str, Callable[[], object]]:
    import torch
    import torch.nn.functional as F
    rng = np.random.default_rng(0)
    x, up = (torch.from_numpy(rng.standard_normal(shape).astype(np.float32)) for _ in range(2))
    w, b = torch.ones(shape[-1]), torch.zeros(shape[-1])
    heads, cos, sin = (torch.from_numpy(a) for a in rotary_operands(x.numpy(), rng))

    def rotary():
        half = ROTARY_DIM // 2
        return heads * cos + torch.cat((-heads[..., half:], heads[..., :half]), -1) * sin

    def softmax_lse(scores):
        probs = torch.softmax(scores, -1)
        return probs, scores.amax(-1) - torch.log(probs.amax(-1))
    return {"rotary": rotary, "softmax_lse": lambda: softmax_lse(x), "softmax_lse_bias": lambda: softmax_lse(x + up), "gelu": lambda: F.gelu(x), "gelu_tanh": lambda: F.gelu(x, approximate="tanh"),
            "quick_gelu": lambda: x * torch.sigmoid(1.702 * x), "silu_mul": lambda: F.silu(x) * up,
            "layer_norm": lambda: F.layer_norm(x, (shape[-1],), w, b, 1e-5),
            "rms_norm": lambda: F.rms_norm(x, (shape[-1],), w, 1e-6)}


def read(out) -> None:
    """Wait for a MindSpore result (one tensor or a tuple from one graph); torch results are ready."""
    last = out[-1] if isinstance(out, tuple) else out
    if hasattr(last, "asnumpy"):
        last.asnumpy()


def per_call_ms(call: Callable[[], object], calls: int) -> float:
    """Mean ms over ``calls`` back-to-back calls; MindSpore's asynchronous launches end at the final read."""
    start = time.perf_counter()
    for _ in range(calls):
        out = call()
    read(out)
    return (time.perf_counter() - start) * 1e3 / calls


def op_rows(rounds: int) -> list[dict]:
    import torch
    torch.set_num_threads(os.cpu_count() or 1)
    rows = []
    for shape in SHAPES:
        impls = {"builtin": ms_ops(shape, False), "kernel": ms_ops(shape, True), "torch": torch_ops(shape)}
        calls = max(3, int(2e7 // (shape[0] * shape[1])))
        for name in OPS:
            times = {impl: [] for impl in IMPLS}
            for _ in range(rounds):
                for impl in IMPLS:
                    times[impl].append(per_call_ms(impls[impl][name], calls))
            row = {"op": name, "shape": list(shape), **{f"{impl}_ms": statistics.median(t) for impl, t in times.items()}}
            row["builtin_over_kernel"] = row["builtin_ms"] / row["kernel_ms"]
            row["torch_over_kernel"] = row["torch_ms"] / row["kernel_ms"]
            rows.append(row)
    return rows


def rss_worker(impl: str) -> dict:
    """Every op once at the large shape in this process: its peak RSS."""
    base = peak_rss_mb()
    if impl == "torch":
        for call in torch_ops(SHAPES[0]).values():
            call()
    else:
        for call in ms_ops(SHAPES[0], impl == "kernel").values():
            read(call())
    return {"impl": impl, "peak_rss_mb": peak_rss_mb(), "rss_before_ops_mb": base}


def vision_config():
    from transformers import Blip2VisionConfig
    return Blip2VisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=6, num_attention_heads=12,
                             image_size=224, patch_size=14, layer_norm_eps=1e-6, qkv_bias=True)


def _ms_forward(call: Callable, inputs, kernels_on: bool) -> Callable[[], np.ndarray]:
    """A forward that sets its kernel switch first: PyNative reads it on every call (graphs when traced)."""
    def forward() -> np.ndarray:
        set_kernels(kernels_on)
        return call(inputs).asnumpy()
    return forward


def model_worker(side: str, folder: str, repeats: int) -> dict:
    """The ViT forwards of one side in this process: "torch", or "mindspore" with every MindSpore mode
    loaded at once and timed in interleaved rounds (so a load change on the machine hits them alike)."""
    pixels = np.random.default_rng(1).standard_normal((8, 3, 224, 224)).astype(np.float32)
    forwards = {}
    if side == "torch":
        import torch
        from transformers import Blip2VisionModel as HFVision
        torch.set_num_threads(os.cpu_count() or 1)
        model = HFVision.from_pretrained(folder).eval()

        def forward():
            with torch.no_grad():
                return model(pixel_values=torch.from_numpy(pixels)).last_hidden_state.numpy()
        forwards["torch eager"] = forward
    else:
        import mindspore as ms

        from models.blip2.vision import Blip2VisionModel
        from models.checkpoint import load_checkpoint
        inputs = ms.Tensor(pixels)
        for mode in MODEL_MODES[:-1]:
            set_kernels(mode.startswith("kernel"))
            model = load_checkpoint(Blip2VisionModel(vision_config()), Path(folder))
            call = ms.jit(model.construct) if mode.endswith("jit") else model
            forwards[mode] = _ms_forward(call, inputs, mode.startswith("kernel"))
            start = time.perf_counter()
            forwards[mode]()  # compiles under this mode's kernel setting
            forwards[mode].first = time.perf_counter() - start
    rows = {mode: {"mode": mode, "times": []} for mode in forwards}
    for mode, forward in forwards.items():
        if not hasattr(forward, "first"):
            start = time.perf_counter()
            forward()
            forward.first = time.perf_counter() - start
        rows[mode]["first_call_seconds"] = forward.first
    for _ in range(repeats):
        for mode, forward in forwards.items():
            start = time.perf_counter()
            out = forward()
            rows[mode]["times"].append(time.perf_counter() - start)
            np.save(Path(folder) / f"{mode.replace(' ', '_')}.npy", out)
    for row in rows.values():
        row["seconds"] = statistics.median(row.pop("times"))
        row["peak_rss_mb"] = peak_rss_mb()
    return {"rows": list(rows.values())}


def run_worker(args: list[str]) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-m", "benchmarks.bench_kernels", *args], capture_output=True,
                            text=True, cwd=ROOT, env=env, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def random_vision_model(folder: str) -> None:
    """transformers' ViT with random weights of realistic spread (its own init leaves the output near 0)."""
    import torch
    from transformers import Blip2VisionModel as HFVision
    torch.manual_seed(0)
    model = HFVision(vision_config())
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.02)
            elif name.endswith("weight"):
                param.normal_(1.0, 0.1)
            else:
                param.normal_(0.0, 0.02)
    model.save_pretrained(folder)


def model_rows(repeats: int) -> list[dict]:
    """The MindSpore side, then the torch side, each in its own process (peak RSS: the MindSpore
    process holds all three of its modes' models)."""
    with tempfile.TemporaryDirectory() as folder:
        random_vision_model(folder)
        rows = []
        for side in ("mindspore", "torch"):
            rows += run_worker(["--model_worker", side, "--folder", folder, "--repeats", str(repeats)])["rows"]
        ref = np.load(Path(folder) / "torch_eager.npy")
        for row in rows:
            out = np.load(Path(folder) / f"{row['mode'].replace(' ', '_')}.npy")
            row["max_abs_diff_vs_torch"] = float(np.abs(out - ref).max())
    torch_seconds = rows[-1]["seconds"]
    for row in rows:
        row["speed_vs_torch"] = torch_seconds / row["seconds"]
    return rows


def print_tables(ops_rows: list[dict], rss: list[dict], models: list[dict]) -> None:
    print(f"{'op':<16} {'shape':<12} {'builtin ms':>10} {'kernel ms':>10} {'torch ms':>9} "
          f"{'builtin/kernel':>14} {'torch/kernel':>12}")
    for r in ops_rows:
        print(f"{r['op']:<16} {'x'.join(map(str, r['shape'])):<12} {r['builtin_ms']:>10.2f} {r['kernel_ms']:>10.2f} "
              f"{r['torch_ms']:>9.2f} {r['builtin_over_kernel']:>13.1f}x {r['torch_over_kernel']:>11.2f}x")
    print()
    for r in rss:
        print(f"peak RSS, every op once at 2056x1536, {r['impl']:<8}: {r['peak_rss_mb']:.0f} MB "
              f"({r['rss_before_ops_mb']:.0f} MB before the ops)")
    print()
    print(f"{'ViT forward (8 x 224 px, 6 x 768)':<36} {'s':>7} {'first s':>8} {'vs torch':>9} {'process RSS MB':>14} "
          f"{'max |diff| vs torch':>20}")
    for r in models:
        print(f"{r['mode']:<36} {r['seconds']:>7.3f} {r['first_call_seconds']:>8.2f} {r['speed_vs_torch']:>8.2f}x "
              f"{r['peak_rss_mb']:>14.0f} {r['max_abs_diff_vs_torch']:>20.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds per op (median reported)")
    parser.add_argument("--repeats", type=int, default=5, help="timed model forwards after the first")
    parser.add_argument("--output", default="benchmarks/results/kernels.json")
    parser.add_argument("--rss_worker", choices=IMPLS, help=argparse.SUPPRESS)
    parser.add_argument("--model_worker", choices=("mindspore", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_worker:
        print(json.dumps(rss_worker(args.rss_worker)))
        return
    if args.model_worker:
        print(json.dumps(model_worker(args.model_worker, args.folder, args.repeats)))
        return
    ops_rows = op_rows(args.rounds)
    rss = [run_worker(["--rss_worker", impl]) for impl in IMPLS]
    models = model_rows(args.repeats)
    print_tables(ops_rows, rss, models)
    result = {"machine": {"cpus": os.cpu_count(), "load_average_at_end": os.getloadavg()},
              "ops": ops_rows, "peak_rss": rss, "vit_forward": models}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
