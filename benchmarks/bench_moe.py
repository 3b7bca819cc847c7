"""The MoE layer alone: ours (``models.moe.SparseMoeBlock``, MindSpore) against transformers 5.25's
``Qwen3VLMoeTextSparseMoeBlock`` on PyTorch, same weights, float32, CPU.

Shape: Qwen3-VL-30B-A3B's MoE layer (hidden 2048, experts of 768, 128 experts, top-8) scaled down to
run on 2 cores: hidden 1024, experts of 384, top-8, with 128 and then 64 experts (``--experts``). The
weights are random (numpy, seeded: router N(0, 4/hidden), gate/up N(0, 1/hidden), down N(0, 1/inter)),
made in each side's process from the same seed and copied into each layout (transformers keeps
``gate_up_proj`` (E, 2 inter, hidden) and ``down_proj`` (E, hidden, inter), ours their transposes).
Inputs are N(0, 1), the same on both sides.

Cases, each one call of the layer:
- prefill: one row of N tokens, (1, N, hidden) (``--prefill``), as an MoE prompt runs: the host-grouped
  path (pairs sorted by expert on the host, the routing and one batched matmul per projection compiled for
  every length).
- decode: B rows of one token, (B, 1, hidden) (``--decode``), as a generation step runs them. Ours is
  compiled (``ms.jit`` of the block's ``construct``): the fused kernel (``models/kernels/moe.cc``), or with
  ``CAPTION_KERNELS=0`` gathered pairs when B x top_k <= experts, every expert on every token otherwise.
Torch runs under ``torch.no_grad()`` with each experts implementation of ``transformers.integrations.moe``
(``--torch_impls``): ``grouped_mm`` (what transformers picks by default for a model it builds, on this CPU
through torch's own ``F.grouped_mm`` kernel: see ``meta.sides``), ``eager`` (the per-expert Python
loop: the default of a block built on its own, as the tests build it) and ``batched_mm`` (gathers every
pair's expert matrices, so it is left out where that copy would pass ``--batched_mm_max_gb``), all on
torch's default 2 threads; ``grouped_mm@1`` is grouped_mm on one thread: when other jobs load the
machine, torch's two OpenMP threads wait on each other and a call can take 10x its quiet time, while one
thread slows down about as much as MindSpore does (measured here: decode B=16, 388 ms median on 2 threads
against 40 ms on 1, at load average 3.7).

Method: each side lives in its own process (``--child``), taking one command at a time, so only one
computes at any moment. Per case and implementation: two warm-up calls (the first compiles
ours' decode graph: "first call s"), the second call's output saved and compared (max abs diff against
ours, which must stay below 1e-4). Then ``--repeats`` rounds, the implementations' order rotated every
round; in a round each runs back to back for at least ``--min_seconds`` (MindSpore's asynchronous calls
end at the last output's read) and gives its mean seconds per call. A case's time is the median over the
rounds; tokens/s = tokens per call / time. Speed ratio = ours tokens/s / torch's (above 1: ours faster).
The JSON also keeps every round, each implementation's fastest one and the ratio of those
(``speed_ratio_best_times``: a loaded machine disturbs it less, and torch's two OpenMP threads suffer more
from a loaded machine than MindSpore's), and the cost of launching a one-op graph (``graph_launch_ms`` in
``meta.sides``): a decode case here is a one-layer graph and pays it once per layer, where a model's decode
step pays it once for all its layers.
Every case starts a fresh process per side (both load at once, before anything is timed), so a side's
memory is that case's alone (MindSpore keeps what its pool once took). Memory, after the rounds: one more
call per implementation with the process's peak RSS reset just before it (/proc/self/clear_refs); "MB"
is that call's peak VmHWM (framework, weights, and what the layer holds or allocates), in brackets how far
it is above the RSS right after loading (ours: the memory pool the case's calls grew; torch: the call's
temporaries).

    python -m benchmarks.bench_moe [--experts 128,64] [--prefill 512,2048] [--decode 1,4,16]
        [--torch_impls grouped_mm,grouped_mm@1,eager,batched_mm] [--repeats 7] [--output benchmarks/results/moe.json]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

import numpy as np

from benchmarks.bench_kernels import peak_rss_mb, per_call_ms

ROOT = Path(__file__).resolve().parents[1]
SEED = 0
TOLERANCE = 1e-4
MARK = "@@bench_moe "  # a child's replies on stdout start with this (libraries may print there too)
NOTE = ("Shared machine, noisy timings (other jobs run alongside; 2 CPU cores): compare the ratios within a row, "
        "not runs. Both sides run in their own process, one at a time, in rotating order.")


# ----------------------------------------------------------------------------- weights and inputs


def layer_weights(spec: dict) -> dict[str, np.ndarray]:
    """Router (E, hidden), gate_up (E, hidden, 2 inter) and down (E, inter, hidden): ours' layout."""
    e, h, i = spec["experts"], spec["hidden"], spec["inter"]
    rng = np.random.default_rng(spec["seed"])
    gate = rng.standard_normal((e, h), dtype=np.float32) * np.float32(2 / math.sqrt(h))
    gate_up = rng.standard_normal((e, h, 2 * i), dtype=np.float32) * np.float32(1 / math.sqrt(h))
    down = rng.standard_normal((e, i, h), dtype=np.float32) * np.float32(1 / math.sqrt(i))
    return {"gate": gate, "gate_up": gate_up, "down": down}


def case_input(spec: dict, case: dict) -> np.ndarray:
    """(1, N, hidden) for a prefill, (B, 1, hidden) for a decode step."""
    shape = (1, case["size"], spec["hidden"]) if case["kind"] == "prefill" else (case["size"], 1, spec["hidden"])
    rng = np.random.default_rng([spec["seed"], case["size"], case["kind"] == "decode"])
    return rng.standard_normal(shape, dtype=np.float32)


def ours_path(spec: dict, case: dict) -> str:
    """The expert path ``models.moe.run_experts`` takes on CPU for a case (in the parent process, which reads
    the same switch and builds the same kernels as the child that runs it)."""
    from models import kernels

    if case["kind"] == "prefill":
        return "host-grouped (compiled)"
    if kernels.active():
        return "fused kernel"
    return "gathered pairs" if case["size"] * spec["top_k"] <= spec["experts"] else "all experts"


def batched_mm_gb(spec: dict, case: dict) -> float:
    """What transformers' batched_mm copies: every (token, expert) pair's expert matrices."""
    pairs = case["size"] * spec["top_k"]
    return pairs * 3 * spec["hidden"] * spec["inter"] * 4 / 1e9


# ----------------------------------------------------------------------------- the two sides (children)


def ours_side(spec: dict):
    """Calls of our block per case: PyNative for a prefill, ``ms.jit`` for a decode step."""
    import mindspore as ms
    from mindspore import Tensor

    ms.set_device("CPU")
    from models import attention, moe

    attention.refresh_device()
    config = SimpleNamespace(hidden_size=spec["hidden"], moe_intermediate_size=spec["inter"],
                             num_experts=spec["experts"], num_experts_per_tok=spec["top_k"], norm_topk_prob=True,
                             hidden_act="silu")
    block = moe.SparseMoeBlock(config)
    weights = layer_weights(spec)
    block.gate.weight.set_data(Tensor(weights.pop("gate")))
    block.experts.gate_up_proj.set_data(Tensor(weights.pop("gate_up")))
    block.experts.down_proj.set_data(Tensor(weights.pop("down")))
    step = ms.jit(block.construct)

    def make(case: dict, impl: str):
        x = Tensor(case_input(spec, case))
        fn = block if case["kind"] == "prefill" else step
        return lambda: fn(x)

    def launch(x):
        return x + 1

    tiny, launch_jit = Tensor(np.zeros((1, 1, spec["hidden"]), np.float32)), ms.jit(launch)
    per_call_ms(lambda: launch_jit(tiny), 20)
    info = {"mindspore": ms.__version__,
            "graph_launch_ms": per_call_ms(lambda: launch_jit(tiny), 200)}  # a one-op graph's cost per call
    return make, lambda out: out.asnumpy(), info


def torch_side(spec: dict):
    """Calls of transformers' block per case and experts implementation."""
    import torch
    import transformers
    from transformers.integrations import moe as hf_moe
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextSparseMoeBlock

    def config(impl: str | None):
        out = transformers.Qwen3VLMoeTextConfig(hidden_size=spec["hidden"], moe_intermediate_size=spec["inter"],
                                                num_experts=spec["experts"], num_experts_per_tok=spec["top_k"],
                                                hidden_act="silu")
        out._experts_implementation = impl
        return out

    weights = layer_weights(spec)
    shared = {"gate.weight": weights.pop("gate"),
              "experts.gate_up_proj": np.ascontiguousarray(weights.pop("gate_up").transpose(0, 2, 1)),
              "experts.down_proj": np.ascontiguousarray(weights.pop("down").transpose(0, 2, 1))}
    shared = {name: torch.nn.Parameter(torch.from_numpy(value), requires_grad=False) for name, value in shared.items()}
    blocks = {}

    def block_for(impl: str):
        """One block per implementation (its own config), all holding the same parameters."""
        if impl not in blocks:
            with torch.device("meta"):
                block = Qwen3VLMoeTextSparseMoeBlock(config(impl)).eval()
            for name, param in shared.items():
                owner, attr = name.rsplit(".", 1)
                setattr(block.get_submodule(owner), attr, param)
            blocks[impl] = block
        return blocks[impl]

    torch.set_grad_enabled(False)

    default_threads = torch.get_num_threads()

    def make(case: dict, impl: str):
        """``impl``: an experts implementation, "@N" after it for N torch threads (default: torch's own)."""
        name, _, threads = impl.partition("@")
        threads = int(threads or default_threads)
        x = torch.from_numpy(case_input(spec, case))
        block = block_for(name)

        def call():
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
            return block(x)
        return call

    # What transformers picks for a model it builds (a one-layer text model at a tiny size), and whether its
    # grouped_mm runs torch's own kernel here or transformers' per-expert fallback loop.
    tiny = transformers.Qwen3VLMoeTextConfig(hidden_size=16, moe_intermediate_size=8, num_experts=4,
                                             num_experts_per_tok=2, num_hidden_layers=1, num_attention_heads=2,
                                             num_key_value_heads=1, head_dim=8, intermediate_size=32, vocab_size=32)
    default = transformers.Qwen3VLMoeTextModel(tiny).config._experts_implementation
    offsets = torch.tensor([spec["top_k"]] * spec["experts"], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    probe = torch.zeros(int(offsets[-1]), spec["hidden"])
    native = hf_moe._can_use_grouped_mm(probe, shared["experts.gate_up_proj"].transpose(-2, -1), offsets)
    info = {"torch": torch.__version__, "transformers": transformers.__version__,
            "torch_threads": default_threads,
            "model_default_experts_implementation": default,
            "standalone_block_experts_implementation": "eager (config._experts_implementation None: the block's "
                                                       "own forward, a Python loop over the experts hit)",
            "grouped_mm_kernel": "torch.nn.functional.grouped_mm (native)" if native
            else "transformers' grouped_mm_fallback (a loop of torch.mm)"}
    return make, lambda out: out.numpy(), info


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmRSS in /proc/self/status")


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM restarts from the current RSS


def child(side: str, spec: dict, builders: dict | None = None) -> None:
    """Serve the parent's commands (JSON lines on stdin), one reply line each on stdout. ``builders``: each side's
    ``(spec) -> (make(case, impl), to_numpy(out), info)`` (default :func:`ours_side` and :func:`torch_side`)."""
    def reply(obj: dict) -> None:
        sys.stdout.write(MARK + json.dumps(obj) + "\n")
        sys.stdout.flush()

    start = time.perf_counter()
    make, to_numpy, info = (builders or {"ours": ours_side, "torch": torch_side})[side](spec)
    loaded = _rss_mb()
    reply({"ready": True, "load_seconds": time.perf_counter() - start, "rss_after_load_mb": loaded,
           "peak_rss_load_mb": peak_rss_mb(), **info})
    calls = {}
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            break
        key = (json.dumps(cmd["case"], sort_keys=True), cmd["impl"])
        try:
            if key not in calls:
                calls[key] = make(cmd["case"], cmd["impl"])
            call = calls[key]
            if cmd["op"] == "warm":
                seconds = []
                for _ in range(2):
                    begin = time.perf_counter()
                    out = to_numpy(call())
                    seconds.append(time.perf_counter() - begin)
                np.save(cmd["save"], out)
                reply({"first_seconds": seconds[0], "second_seconds": seconds[1]})
            elif cmd["op"] == "time":
                reply({"seconds": per_call_ms(call, cmd["calls"]) / 1e3})
            else:  # "memory": one more call with the peak RSS reset before it
                _reset_peak_rss()
                before = _rss_mb()
                to_numpy(call())
                reply({"peak_mb": peak_rss_mb(), "rss_before_mb": before, "rss_after_load_mb": loaded})
        except Exception as exc:  # a failed implementation becomes a row note, not a lost run
            reply({"error": f"{type(exc).__name__}: {exc}"[:500]})
            calls.pop(key, None)


# ----------------------------------------------------------------------------- the parent


class Side:
    """A child process serving one side's commands."""

    def __init__(self, side: str, spec: dict, log: Path, module: str = "benchmarks.bench_moe"):
        """``module``: what ``python -m`` runs in the child (its ``--child SIDE --spec JSON`` calls :func:`child`)."""
        cmd = [sys.executable, "-m", module, "--child", side, "--spec", json.dumps(spec)]
        env = {**os.environ, "GLOG_v": os.environ.get("GLOG_v", "3")}
        self.log = open(log, "w")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, bufsize=1)
        self.info: dict = {}

    def ready(self) -> dict:
        self.info = self.receive()
        return self.info

    def receive(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
        self.proc.wait()
        tail = Path(self.log.name).read_text(errors="replace").strip().splitlines()[-8:]
        raise RuntimeError(f"the {self.proc.args[4]} child ended (exit {self.proc.returncode}): " + " | ".join(tail))

    def ask(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self.receive()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=60)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def measure_case(sides: dict[str, Side], spec: dict, case: dict, impls: list[tuple[str, str]], work: Path,
                 repeats: int, min_seconds: float, head: dict | None = None, tolerance: float = TOLERANCE) -> dict:
    """One row: warm-up and outputs of every implementation, rounds in rotating order, then memory. ``head``: the
    row's first fields (default the MoE case's); ``tolerance``: the largest max abs diff for ``outputs_agree``."""
    tokens = case["size"]  # tokens per call: N for a prefill, B one-token rows for a decode step
    head = head if head is not None else {"experts": spec["experts"], "case": case["kind"], "size": case["size"],
                                          "tokens_per_call": tokens, "ours_path": ours_path(spec, case)}
    row = {**head, "load_average_before": os.getloadavg(), "impls": {}}
    live = []
    for side, impl in impls:
        entry = row["impls"].setdefault(impl, {"side": side})
        if impl.startswith("batched_mm") and batched_mm_gb(spec, case) > spec["batched_mm_max_gb"]:
            entry["skipped"] = (f"would copy {batched_mm_gb(spec, case):.1f} GB of expert matrices "
                                f"(--batched_mm_max_gb {spec['batched_mm_max_gb']:g})")
            continue
        got = sides[side].ask(op="warm", case=case, impl=impl, save=str(work / f"{impl}.npy"))
        if "error" in got:
            entry["error"] = got["error"]
            continue
        entry.update(first_call_seconds=got["first_seconds"], warm_call_seconds=got["second_seconds"],
                     calls=max(1, min(500, math.ceil(min_seconds / max(got["second_seconds"], 1e-6)))), times=[])
        live.append((side, impl))
    outputs = {impl: np.load(work / f"{impl}.npy") for _, impl in live}
    for _, impl in live:
        if impl != "ours" and "ours" in outputs:
            row["impls"][impl]["max_abs_diff_vs_ours"] = float(np.abs(outputs[impl] - outputs["ours"]).max())
    for r in range(repeats):
        shift = r % len(live) if live else 0
        for side, impl in live[shift:] + live[:shift]:
            got = sides[side].ask(op="time", case=case, impl=impl, calls=row["impls"][impl]["calls"])
            if "error" in got:
                row["impls"][impl]["error"] = got["error"]
            else:
                row["impls"][impl]["times"].append(got["seconds"])
    for side, impl in live:
        got = sides[side].ask(op="memory", case=case, impl=impl)
        if "error" not in got:
            row["impls"][impl].update(peak_mb=got["peak_mb"], rss_after_load_mb=got["rss_after_load_mb"],
                                      rss_before_call_mb=got["rss_before_mb"],
                                      work_mb=got["peak_mb"] - got["rss_after_load_mb"])
    for entry in row["impls"].values():
        if entry.get("times"):
            entry["seconds"] = statistics.median(entry["times"])
            entry["best_seconds"] = min(entry["times"])
            entry["tokens_per_second"] = tokens / entry["seconds"]
    ours = row["impls"].get("ours", {})
    diffs = []
    for impl, entry in row["impls"].items():
        if impl != "ours" and ours.get("seconds") and entry.get("seconds"):
            entry["speed_ratio_ours_over_this"] = entry["seconds"] / ours["seconds"]
            entry["speed_ratio_best_times"] = entry["best_seconds"] / ours["best_seconds"]
        if "max_abs_diff_vs_ours" in entry:
            diffs.append(entry["max_abs_diff_vs_ours"])
    row["load_average_after"] = os.getloadavg()
    row["max_abs_diff"] = max(diffs) if diffs else None
    row["outputs_agree"] = bool(diffs) and max(diffs) < tolerance
    return row


def fmt(value, digits: int = 0, suffix: str = "") -> str:
    return "—" if value is None else f"{value:,.{digits}f}{suffix}"


def table(rows: list[dict], torch_impls: Sequence[str]) -> str:
    """Tokens/s (medians), speed ratios ours/torch as "median (fastest rounds)", memory "peak (above load)" for
    ours and the first torch implementation (the JSON has every one's)."""
    head = ["experts", "case", "ours path", "ours tok/s", *[f"{i} tok/s" for i in torch_impls],
            *[f"ours/{i}" for i in torch_impls], "max diff", "ours MB", f"{torch_impls[0]} MB", "ours 1st call s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        impls = r["impls"]

        def cell(impl: str, text) -> str:
            entry = impls.get(impl, {})
            if entry.get("skipped"):
                return "skipped"
            if entry.get("error") and not entry.get("times"):
                return "error"
            return text(entry)

        speed = lambda e: fmt(e.get("tokens_per_second"))  # noqa: E731
        ratio = lambda e: ("—" if e.get("speed_ratio_ours_over_this") is None else  # noqa: E731
                           f"{e['speed_ratio_ours_over_this']:.2f}x ({e['speed_ratio_best_times']:.2f}x)")
        memory = lambda e: f"{e['peak_mb']:,.0f} ({e['work_mb']:+,.0f})" if "peak_mb" in e else "—"  # noqa: E731
        label = f"prefill {r['size']}" if r["case"] == "prefill" else f"decode B={r['size']}"
        cells = [str(r["experts"]), label, r["ours_path"], cell("ours", speed),
                 *[cell(i, speed) for i in torch_impls], *[cell(i, ratio) for i in torch_impls],
                 "—" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.1e}", cell("ours", memory),
                 cell(torch_impls[0], memory), cell("ours", lambda e: fmt(e.get("first_call_seconds"), 2))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def meta(spec: dict, args, sides_info: dict) -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "note": NOTE,
            "settings": {k: v for k, v in spec.items() if k != "experts"} | {
                "experts": args.experts, "repeats": args.repeats, "min_seconds": args.min_seconds,
                "prefill": args.prefill, "decode": args.decode, "dtype": "float32", "tolerance": TOLERANCE},
            "sides": sides_info}


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", default="128,64", help="expert counts to run, comma-separated (each its own "
                                                            "weights and processes)")
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size")
    parser.add_argument("--inter", type=int, default=384,
                        help="each expert's intermediate size (moe_intermediate_size)")
    parser.add_argument("--top_k", type=int, default=8, help="experts per token (num_experts_per_tok)")
    parser.add_argument("--prefill", default="512,2048", help="prefill cases: tokens in one row, comma-separated")
    parser.add_argument("--decode", default="1,4,16", help="decode cases: rows of one token, comma-separated")
    parser.add_argument("--torch_impls", default="grouped_mm,grouped_mm@1,eager,batched_mm",
                        help="transformers experts implementations to time, comma-separated; NAME@N runs it on N torch "
                             "threads (default: torch's own, 2 here)")
    parser.add_argument("--batched_mm_max_gb", type=float, default=2.0,
                        help="leave batched_mm out of a case where it would copy more expert matrices than this")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per case (median)")
    parser.add_argument("--min_seconds", type=float, default=0.3,
                        help="least time of one implementation's back-to-back calls in a round")
    parser.add_argument("--output", default="benchmarks/results/moe.json", help="where the results JSON goes")
    parser.add_argument("--child", choices=("ours", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child, json.loads(args.spec))
    torch_impls = [i for i in args.torch_impls.split(",") if i]
    cases = [{"kind": "prefill", "size": n} for n in ints(args.prefill)] + \
            [{"kind": "decode", "size": b} for b in ints(args.decode)]
    impls = [("ours", "ours")] + [("torch", impl) for impl in torch_impls]
    started = time.perf_counter()
    rows, sides_info = [], {}
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    spec = {}
    for experts in ints(args.experts):
        spec = {"experts": experts, "hidden": args.hidden, "inter": args.inter, "top_k": args.top_k, "seed": SEED,
                "batched_mm_max_gb": args.batched_mm_max_gb}
        for case in cases:
            with tempfile.TemporaryDirectory(prefix="bench_moe_") as tmp:
                tmp = Path(tmp)
                sides = {side: Side(side, spec, tmp / f"{side}.log") for side in ("ours", "torch")}  # load together
                try:
                    sides_info[str(experts)] = {side: s.ready() for side, s in sides.items()}
                    rows.append(measure_case(sides, spec, case, impls, tmp, args.repeats, args.min_seconds))
                    rows[-1]["load"] = {side: {k: v for k, v in s.info.items() if k != "ready"}
                                        for side, s in sides.items()}
                finally:
                    for s in sides.values():
                        s.close()
            r = rows[-1]
            print(f"[{time.perf_counter() - started:6.0f}s] experts {experts} {case['kind']} {case['size']}: "
                  + ", ".join(f"{i} {e['tokens_per_second']:.0f} tok/s" for i, e in r["impls"].items()
                              if "tokens_per_second" in e) + f", max diff {r['max_abs_diff']}", flush=True)
            info = {**meta(spec, args, sides_info), "total_wall_seconds": time.perf_counter() - started,
                    "command": "python -m benchmarks.bench_moe " + " ".join(argv if argv is not None else sys.argv[1:])}
            output.write_text(json.dumps({"meta": info, "results": rows}, indent=2))
    print(table(rows, torch_impls))
    print(f"results written to {output} ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
