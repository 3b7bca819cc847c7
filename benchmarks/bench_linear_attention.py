"""The Gated DeltaNet layer alone: ours (``models.linear_attention.GatedDeltaNet``, MindSpore) against transformers
5.25's ``Qwen3_5GatedDeltaNet`` on PyTorch, same weights, float32, CPU, at long prompts.

Shape: a Qwen3.5-9B linear-attention layer (hidden 4096; 16 key heads and 32 value heads of 128; conv kernel 4)
scaled down to run on 2 cores: hidden 1024, 8 key heads and 16 value heads of 128 (key dim 1024, value dim 2048,
conv channels 4096), kernel 4. The weights are random (numpy, seeded, made in each side's process and loaded
by name: both sides name and shape their parameters alike): projections N(0, 1/fan-in), conv N(0, 1/kernel),
``A_log`` = log U(0.01, 16) (transformers' initial range), ``dt_bias`` and the gated norm 1 + N(0, 0.01).
Inputs N(0, 1).

Memory at 32k tokens (fp32, per token): the input (1024 values, 4 KiB), the q/k/v projection and its conv and
activation (4096 each, 48 KiB), z (8 KiB), q/k/v as float32 heads with the key heads repeated (2 x 16 x 128 +
2048, 24 KiB, plus transposed copies), the chunk matrices (16 heads x 64 per token, 4 KiB each: decay, UT
system and inverse, intra-chunk attention, temporaries, ~32 KiB), the chunk operands (corrections, state reads,
decayed q/k: 8 KiB each, ~40 KiB), the output heads, norm and projection (~20 KiB): about 200 KiB (205 MB per
1k tokens) a token were it all alive at once. Measured (smoke runs at 256 to 1024 tokens, the slope of the
prefill's peak): ours about 240 MB per 1k tokens, torch about 185, so at 32,768 tokens about 8 GB and 6 GB above
the ~0.45 GB each child loads: ~15 GB with both children alive (they are, and MindSpore's pool keeps what it
took) on this 23 GiB machine. Half the value heads would halve most of it; the shape keeps the 9B's proportions
instead, and a length whose projected peak (both sides, extrapolated from the longest lengths measured before
it) exceeds the memory available when it starts is recorded as skipped (``--ignore_memory`` runs it anyway).

Cases per prompt length (``--lengths``, default 1k, 8k, 32k), each length in a fresh pair of processes (so its
memory is its own), one row each:
- prefill: one row of N tokens, (1, N, 1024), from empty states: ours ``prompt`` (PyNative, as a layer runs
  op by op; ``--ours_prefill jit`` compiles it, as a dense model's prompt graph does), the chunked delta rule;
  transformers' ``forward`` with a fresh ``DynamicCache`` each call (as ``generate``'s prefill), whose
  reference PyTorch ``torch_chunk_gated_delta_rule`` runs on CPU (flash-linear-attention and causal-conv1d
  have no CPU kernels). Compared: the last token's output.
- decode: one token (1, 1, 1024) after that prompt, the states carried from step to step as in generation
  (transformers updates its cache in place, ours is fed back the states its step returns): ours ``step``
  under ``ms.jit``, transformers' ``forward`` with the cache (``torch_recurrent_gated_delta_rule``). Compared:
  the second step's output (both sides have then taken two steps from the prompt's states).
- full attention (contrast, ours only, ``--no_attention`` leaves it out): the decode step of Qwen3.5's gated
  full-attention layer (``LlamaAttention`` with q/k norms and the output gate; 8 heads, 2 KV heads of 256, a
  quarter rotating) over a KV cache of N + 1 slots, under ``ms.jit``: the cost a DeltaNet layer does not have.

Method: ``benchmarks.bench_moe``'s machinery: each side a child process taking one command at a time; per case
two warm-up calls (the first compiles: "1st call s"), then ``--repeats`` rounds in rotating order, each at least
``--min_seconds`` of back-to-back calls, the median per call; memory: one more call with the peak RSS reset
before it (/proc/self/clear_refs + VmHWM). Prefill MB: that call's peak above the RSS right after loading (ours:
the pool the case's calls grew; torch: the call's temporaries), and per 1k tokens. Decode MB: the step's peak
above the RSS just before it. Linear growth: per-token time and MB per 1k tokens should stay flat across the
lengths ("x" = relative to the shortest length); decode: the time per step should not grow with the prompt.

    python -m benchmarks.bench_linear_attention [--lengths 1024,8192,32768] [--repeats 5]
        [--ours_prefill pynative|jit] [--no_attention] [--output benchmarks/results/linear_attention.json]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

import numpy as np

from benchmarks.bench_moe import NOTE, SEED, TOLERANCE, Side, child, fmt, ints, measure_case

MODULE = "benchmarks.bench_linear_attention"
LINEAR_KEYS = ("hidden_size", "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
               "linear_value_head_dim", "linear_conv_kernel_dim", "hidden_act", "rms_norm_eps")


# ----------------------------------------------------------------------------- weights and inputs


def layer_config(spec: dict) -> dict:
    """The DeltaNet's config fields (both sides read these names)."""
    return {key: spec[key] for key in LINEAR_KEYS}


def attention_config(spec: dict) -> dict:
    """The gated full-attention layer's config fields (ours' ``LlamaAttention`` reads these names)."""
    return {"hidden_size": spec["hidden_size"], "num_attention_heads": spec["attention_heads"],
            "num_key_value_heads": spec["attention_kv_heads"], "head_dim": spec["attention_head_dim"],
            "rms_norm_eps": spec["rms_norm_eps"], "attention_bias": False,
            "rope_parameters": {"rope_type": "default", "rope_theta": spec["rope_theta"],
                                "partial_rotary_factor": spec["partial_rotary_factor"]}}


def deltanet_weights(spec: dict) -> dict[str, np.ndarray]:
    """Every parameter of the layer by its (shared) name."""
    rng = np.random.default_rng(spec["seed"])
    hidden, kernel = spec["hidden_size"], spec["linear_conv_kernel_dim"]
    heads = spec["linear_num_value_heads"]
    key_dim = spec["linear_num_key_heads"] * spec["linear_key_head_dim"]
    value_dim = heads * spec["linear_value_head_dim"]
    conv = 2 * key_dim + value_dim

    def normal(shape, fan_in):
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(1 / math.sqrt(fan_in))

    return {"in_proj_qkv.weight": normal((conv, hidden), hidden),
            "in_proj_z.weight": normal((value_dim, hidden), hidden),
            "in_proj_b.weight": normal((heads, hidden), hidden), "in_proj_a.weight": normal((heads, hidden), hidden),
            "conv1d.weight": normal((conv, 1, kernel), kernel),
            "dt_bias": 1 + normal((heads,), 100), "A_log": np.log(rng.uniform(0.01, 16, heads)).astype(np.float32),
            "norm.weight": 1 + normal((spec["linear_value_head_dim"],), 100),
            "out_proj.weight": normal((hidden, value_dim), value_dim)}


def attention_weights(spec: dict) -> dict[str, np.ndarray]:
    """The gated attention layer's parameters (q_proj twice as wide: each head's queries then its gate)."""
    rng = np.random.default_rng([spec["seed"], 1])
    hidden, heads, kv, dim = (spec[k] for k in ("hidden_size", "attention_heads", "attention_kv_heads",
                                                  "attention_head_dim"))

    def normal(shape, scale):
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)

    return {"q_proj.weight": normal((2 * heads * dim, hidden), hidden ** -0.5),
            "k_proj.weight": normal((kv * dim, hidden), hidden ** -0.5),
            "v_proj.weight": normal((kv * dim, hidden), hidden ** -0.5),
            "o_proj.weight": normal((hidden, heads * dim), (heads * dim) ** -0.5),
            "q_norm.weight": normal((dim,), 0.1), "k_norm.weight": normal((dim,), 0.1)}


def prompt_input(spec: dict, length: int) -> np.ndarray:
    return np.random.default_rng([spec["seed"], length]).standard_normal((1, length, spec["hidden_size"]),
                                                                         dtype=np.float32)


def token_input(spec: dict, length: int) -> np.ndarray:
    """The decode step's token after a prompt of ``length``."""
    return np.random.default_rng([spec["seed"], length, 1]).standard_normal((1, 1, spec["hidden_size"]),
                                                                            dtype=np.float32)


# ----------------------------------------------------------------------------- the two sides (children)


def ours_side(spec: dict):
    """Calls per case: ``prompt`` (PyNative or ms.jit), then ``step`` under ms.jit from its states; the gated
    attention step for contrast."""
    import mindspore as ms
    from mindspore import Tensor

    ms.set_device("CPU")
    from models import attention
    from models.linear_attention import GatedDeltaNet

    attention.refresh_device()

    def load(cell, weights: dict) -> None:
        params = dict(cell.parameters_and_names())
        if set(params) != set(weights):
            raise KeyError(f"parameters {sorted(params)} against weights {sorted(weights)}")
        for name, param in params.items():
            param.set_data(Tensor(weights[name]))

    net = GatedDeltaNet(SimpleNamespace(**layer_config(spec)))
    load(net, deltanet_weights(spec))
    prompt = ms.jit(net.prompt) if spec["ours_prefill"] == "jit" else net.prompt
    step = ms.jit(net.step)
    states: dict[int, tuple] = {}  # a length's states after its latest prompt call

    def attention_step(length: int, token: Tensor):
        from models.llama import LlamaAttention, rope_inverse_frequencies

        config = SimpleNamespace(**attention_config(spec))
        layer = LlamaAttention(config, qk_norm=True, output_gate=True, unit_offset_norm=True)
        load(layer, attention_weights(spec))
        rng = np.random.default_rng([spec["seed"], length, 2])
        shape = (1, spec["attention_kv_heads"], length + 1, spec["attention_head_dim"])
        cache = [Tensor(rng.standard_normal(shape, dtype=np.float32)) for _ in range(2)]
        freqs = np.float32(length) * rope_inverse_frequencies(config)
        angles = np.concatenate((freqs, freqs)).reshape(1, 1, 1, -1)
        cos, sin = Tensor(np.cos(angles)), Tensor(np.sin(angles))
        mask, slots = Tensor(np.ones((1, length + 1), np.int32)), Tensor(np.array([length], np.int32))
        compiled = ms.jit(layer.construct)

        def call():
            out, cache[0], cache[1] = compiled(token, cos, sin, mask, slots, *cache)
            return out
        return call

    def make(case: dict, impl: str):
        length = case["length"]
        if case["kind"] == "prefill":
            x = Tensor(prompt_input(spec, length))

            def call():
                out, *states[length] = prompt(x)
                return out
            return call
        token = Tensor(token_input(spec, length))
        if case["kind"] == "attention":
            return attention_step(length, token)
        carried = list(states[length])

        def call():
            out, carried[0], carried[1] = step(token, *carried)
            return out
        return call

    return make, lambda out: out[:, -1].asnumpy(), {"mindspore": ms.__version__, "prefill": spec["ours_prefill"]}


def torch_side(spec: dict):
    """transformers' layer: ``forward`` with a fresh cache per prompt call, then one-token calls on that cache."""
    import torch
    import transformers
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5GatedDeltaNet

    torch.set_grad_enabled(False)
    config = transformers.Qwen3_5TextConfig(**layer_config(spec), num_hidden_layers=1,
                                            layer_types=["linear_attention"])
    layer = Qwen3_5GatedDeltaNet(config, 0).eval()
    layer.load_state_dict({name: torch.from_numpy(value) for name, value in deltanet_weights(spec).items()})
    caches: dict[int, object] = {}  # a length's cache after its latest prompt call

    def make(case: dict, impl: str):
        length = case["length"]
        if case["kind"] == "prefill":
            x = torch.from_numpy(prompt_input(spec, length))

            def call():
                caches[length] = transformers.DynamicCache(config=config)
                return layer(x, cache=caches[length])
            return call
        token, cache = torch.from_numpy(token_input(spec, length)), caches[length]
        return lambda: layer(token, cache=cache)

    missing = [name for name in ("fla", "causal_conv1d") if importlib.util.find_spec(name) is None]
    info = {"torch": torch.__version__, "transformers": transformers.__version__,
            "torch_threads": torch.get_num_threads(),
            "delta_rule": "transformers' reference PyTorch (torch_chunk_gated_delta_rule, "
                          "torch_recurrent_gated_delta_rule, causal_conv1d_fn/update)",
            "not_installed": missing}
    return make, lambda out: out[:, -1].numpy(), info


# ----------------------------------------------------------------------------- the parent


def available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024 / 1e9
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def projected_gb(rows: list[dict], length: int) -> float | None:
    """Both children's peak at a prompt of ``length``: each side's loaded RSS plus its prefill memory, extrapolated
    along the line through the two longest prefills measured so far (one: its MB per 1k tokens; none: None)."""
    done = sorted((r for r in rows if r["case"] == "prefill" and "impls" in r
                   and all("work_mb" in e for e in r["impls"].values())), key=lambda r: r["length"])[-2:]
    if not done:
        return None
    last, first = done[-1], done[0]
    mib = 0.0
    for impl, entry in last["impls"].items():
        slope = (entry["mb_per_1k_tokens"] / 1000 if first is last else
                 (entry["work_mb"] - first["impls"][impl]["work_mb"]) / (last["length"] - first["length"]))
        mib += entry["rss_after_load_mb"] + entry["work_mb"] + max(slope, 0.0) * (length - last["length"])
    return mib * 2 ** 20 / 1e9


def derive(row: dict) -> None:
    """Per-token time and MB per 1k tokens (prefill), ms and MB per step (decode), per implementation."""
    for entry in row["impls"].values():
        if entry.get("seconds"):
            entry["ms_per_call"] = entry["seconds"] * 1e3
            if row["case"] == "prefill":
                entry["us_per_token"] = entry["seconds"] / row["length"] * 1e6
        if "peak_mb" in entry:
            if row["case"] == "prefill":
                entry["mb_per_1k_tokens"] = entry["work_mb"] / row["length"] * 1000
            else:
                entry["step_mb"] = entry["peak_mb"] - entry["rss_before_call_mb"]


def growth(rows: list[dict], case: str, key: str) -> dict:
    """``key`` of every implementation at each length over its value at the shortest length."""
    rows = sorted((r for r in rows if r["case"] == case and "impls" in r), key=lambda r: r["length"])
    out = {}
    for impl in {i for r in rows for i in r["impls"]}:
        values = [(r["length"], r["impls"].get(impl, {}).get(key)) for r in rows]
        base = next((v for _, v in values if v), None)
        out[impl] = {str(n): (v / base if v and base else None) for n, v in values}
    return out


def _with_growth(value, relative, digits: int) -> str:
    return "—" if value is None else fmt(value, digits) + ("" if relative is None else f" ({relative:.2f}x)")


def tables(rows: list[dict]) -> str:
    prefill = [r for r in rows if r["case"] == "prefill"]
    per_token, per_1k = growth(rows, "prefill", "us_per_token"), growth(rows, "prefill", "mb_per_1k_tokens")
    head = ["tokens", "ours s", "torch s", "ours tok/s", "torch tok/s", "ours/torch speed", "ours µs/tok",
            "torch µs/tok", "ours MB (above load)", "torch MB (above load)", "ours MB/1k tok", "torch MB/1k tok",
            "ours 1st call s", "max diff (last token)"]
    lines = ["Prefill (one row of N tokens; \"x\": relative to the shortest length, flat = linear growth)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in prefill:
        if r.get("skipped"):
            lines.append(f"| {r['length']:,} | skipped: {r['skipped']} |" + " |" * (len(head) - 2))
            continue
        ours, ref = r["impls"].get("ours", {}), r["impls"].get("torch", {})
        n = str(r["length"])
        memory = lambda e: f"{e['peak_mb']:,.0f} ({e['work_mb']:+,.0f})" if "peak_mb" in e else "—"  # noqa: E731
        ratio = ref.get("speed_ratio_ours_over_this")
        cells = [f"{r['length']:,}", fmt(ours.get("seconds"), 2), fmt(ref.get("seconds"), 2),
                 fmt(ours.get("tokens_per_second")), fmt(ref.get("tokens_per_second")),
                 "—" if ratio is None else f"{ratio:.2f}x ({ref['speed_ratio_best_times']:.2f}x)",
                 _with_growth(ours.get("us_per_token"), per_token.get("ours", {}).get(n), 1),
                 _with_growth(ref.get("us_per_token"), per_token.get("torch", {}).get(n), 1),
                 memory(ours), memory(ref),
                 _with_growth(ours.get("mb_per_1k_tokens"), per_1k.get("ours", {}).get(n), 0),
                 _with_growth(ref.get("mb_per_1k_tokens"), per_1k.get("torch", {}).get(n), 0),
                 fmt(ours.get("first_call_seconds"), 2), errors(r) or fmt_diff(r)]
        lines.append("| " + " | ".join(cells) + " |")
    step_growth = growth(rows, "decode", "ms_per_call")
    attention = {r["length"]: r["impls"].get("ours", {}) for r in rows if r["case"] == "attention"}
    attention_growth = growth(rows, "attention", "ms_per_call").get("ours", {})
    head = ["prompt tokens", "ours ms/step", "torch ms/step", "ours/torch speed", "ours step MB", "torch step MB",
            "ours 1st call s", "max diff (2nd step)", "full attention ms/step (ours)"]
    lines += ["", "Decode step (one token, batch 1, after the prompt; \"x\": relative to the shortest prompt)", "",
              "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in (r for r in rows if r["case"] == "decode"):
        ours, ref = r["impls"].get("ours", {}), r["impls"].get("torch", {})
        n, full = str(r["length"]), attention.get(r["length"], {})
        ratio = ref.get("speed_ratio_ours_over_this")
        cells = [f"{r['length']:,}", _with_growth(ours.get("ms_per_call"), step_growth.get("ours", {}).get(n), 2),
                 _with_growth(ref.get("ms_per_call"), step_growth.get("torch", {}).get(n), 2),
                 "—" if ratio is None else f"{ratio:.2f}x ({ref['speed_ratio_best_times']:.2f}x)",
                 fmt(ours.get("step_mb"), 1), fmt(ref.get("step_mb"), 1), fmt(ours.get("first_call_seconds"), 2),
                 errors(r) or fmt_diff(r),
                 "error" if full.get("error") and not full.get("seconds") else
                 _with_growth(full.get("ms_per_call"), attention_growth.get(n), 2)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fmt_diff(row: dict) -> str:
    return "—" if row.get("max_abs_diff") is None else f"{row['max_abs_diff']:.1e}"


def errors(row: dict) -> str:
    return "; ".join(f"{impl}: {e['error'][:80]}" for impl, e in row["impls"].items() if e.get("error"))


def meta(spec: dict, args, sides_info: dict) -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "note": NOTE,
            "settings": {**spec, "lengths": ints(args.lengths), "repeats": args.repeats,
                         "min_seconds": args.min_seconds, "dtype": "float32", "tolerance": args.tolerance,
                         "attention_contrast": not args.no_attention},
            "sides": sides_info}


def run_length(spec: dict, length: int, cases: list, args, rows: list[dict], started: float) -> dict:
    """Every case of one prompt length in a fresh pair of children; its rows appended to ``rows`` as they end.
    Returns what the children said once loaded."""
    with tempfile.TemporaryDirectory(prefix="bench_linear_attention_") as tmp:
        tmp = Path(tmp)
        sides = {side: Side(side, spec, tmp / f"{side}.log", module=MODULE) for side in ("ours", "torch")}
        try:
            info = {side: s.ready() for side, s in sides.items()}
            for kind, impls in cases:
                size = length if kind == "prefill" else 1
                head = {"case": kind, "length": length, "tokens_per_call": size}
                row = measure_case(sides, spec, {"kind": kind, "length": length, "size": size}, impls, tmp,
                                   args.repeats, args.min_seconds, head=head, tolerance=args.tolerance)
                if kind == "attention":
                    row["outputs_agree"] = None  # ours alone: nothing to compare
                derive(row)
                rows.append(row)
                print(f"[{time.perf_counter() - started:6.0f}s] {kind} {length}: " + ", ".join(
                    f"{impl} {e['ms_per_call']:.2f} ms" for impl, e in row["impls"].items() if "ms_per_call" in e)
                    + (f", max diff {row['max_abs_diff']:.1e}" if row["max_abs_diff"] is not None else "")
                    + (f" ERROR {errors(row)}" if errors(row) else ""), flush=True)
        finally:
            for s in sides.values():
                s.close()
    return info


def summary(rows: list[dict]) -> dict:
    return {"prefill_us_per_token_vs_shortest": growth(rows, "prefill", "us_per_token"),
            "prefill_mb_per_1k_tokens_vs_shortest": growth(rows, "prefill", "mb_per_1k_tokens"),
            "decode_ms_per_step_vs_shortest": growth(rows, "decode", "ms_per_call"),
            "attention_decode_ms_per_step_vs_shortest": growth(rows, "attention", "ms_per_call"),
            "all_outputs_agree": all(r["outputs_agree"] for r in rows if r.get("outputs_agree") is not None),
            "median_load_average": statistics.median([r["load_average_before"][0] for r in rows
                                                      if "load_average_before" in r] or [math.nan])}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="1024,8192,32768", help="prompt lengths, comma-separated (each its own "
                                                                     "pair of processes)")
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size")
    parser.add_argument("--key_heads", type=int, default=8, help="linear_num_key_heads")
    parser.add_argument("--value_heads", type=int, default=16, help="linear_num_value_heads")
    parser.add_argument("--head_dim", type=int, default=128, help="linear key and value head dim")
    parser.add_argument("--ours_prefill", choices=("pynative", "jit"), default="pynative",
                        help="ours' prompt op by op, or compiled per length (ms.jit)")
    parser.add_argument("--no_attention", action="store_true",
                        help="leave out the full-attention decode step (ours) for contrast")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per case (median)")
    parser.add_argument("--min_seconds", type=float, default=0.3,
                        help="least time of one implementation's back-to-back calls in a round")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE, help="largest max abs diff that agrees")
    parser.add_argument("--ignore_memory", action="store_true",
                        help="run a length even when its projected peak exceeds the available memory")
    parser.add_argument("--output", default="benchmarks/results/linear_attention.json",
                        help="results JSON, rewritten after every length")
    parser.add_argument("--child", choices=("ours", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child, json.loads(args.spec), {"ours": ours_side, "torch": torch_side})
    spec = {"hidden_size": args.hidden, "linear_num_key_heads": args.key_heads,
            "linear_num_value_heads": args.value_heads, "linear_key_head_dim": args.head_dim,
            "linear_value_head_dim": args.head_dim, "linear_conv_kernel_dim": 4, "hidden_act": "silu",
            "rms_norm_eps": 1e-6, "attention_heads": 8, "attention_kv_heads": 2, "attention_head_dim": 256,
            "rope_theta": 10_000_000.0, "partial_rotary_factor": 0.25, "ours_prefill": args.ours_prefill,
            "seed": SEED}
    both = [("ours", "ours"), ("torch", "torch")]
    cases = [("prefill", both), ("decode", both)] + ([] if args.no_attention else [("attention", [("ours", "ours")])])
    started = time.perf_counter()
    rows, sides_info = [], {}
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    for length in ints(args.lengths):
        need, free = projected_gb(rows, length), available_gb()
        if need is not None and need > free and not args.ignore_memory:
            rows.append({"case": "prefill", "length": length, "skipped": f"projected peak {need:.1f} GB (both sides) "
                         f"> {free:.1f} GB available (--ignore_memory runs it)"})
            print(f"skipping {length}: {rows[-1]['skipped']}", flush=True)
        else:
            sides_info[str(length)] = run_length(spec, length, cases, args, rows, started)
        info = {**meta(spec, args, sides_info), "total_wall_seconds": time.perf_counter() - started,
                "command": f"python -m {MODULE} " + " ".join(argv if argv is not None else sys.argv[1:])}
        output.write_text(json.dumps({"meta": info, "summary": summary(rows), "results": rows}, indent=2))
    print(tables(rows))
    print(f"results written to {output} ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
