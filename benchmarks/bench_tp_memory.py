"""Host memory and time of loading one model whole (tp 1) and split over 2 msrun ranks (tp 2), on CPU.

The model is a random Llama of about 500 MB in float32 (hidden 768, 8 layers, 12 heads, 4 KV heads,
MLP 3072, vocabulary 32000, untied head) written as one safetensors file. Each process reports its
resident memory after its imports and process-group set-up (the baseline: MindSpore, transformers), its peak
after ``models.from_pretrained`` (VmHWM), the load's seconds, and the median seconds of a 128-token
forward. tp 1 runs as a plain process, tp 2 as 2 msrun workers (whose collectives, on CPU, are
MindSpore's world-group ones). The table gives each rank's load peak above its baseline and the ratio to tp 1.

    python -m benchmarks.bench_tp_memory [--repeats 3] [--output benchmarks/results/tp_memory.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CONFIG = dict(vocab_size=32000, hidden_size=768, intermediate_size=3072, num_hidden_layers=8, num_attention_heads=12,
              num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False)
PROMPT = 128


def memory_mb(field: str) -> float:
    """A field of /proc/self/status (VmRSS: now, VmHWM: this process's peak) in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no {field} in /proc/self/status")


def write_model(folder: Path) -> float:
    """The random checkpoint in ``folder``; returns its size in MB."""
    import transformers
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    transformers.LlamaConfig(**CONFIG).save_pretrained(folder)
    c = CONFIG
    head_dim = c["hidden_size"] // c["num_attention_heads"]
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], c["hidden_size"]), "model.norm.weight": (c["hidden_size"],),
              "lm_head.weight": (c["vocab_size"], c["hidden_size"])}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (c["hidden_size"], c["hidden_size"]),
            p + "self_attn.k_proj.weight": (c["num_key_value_heads"] * head_dim, c["hidden_size"]),
            p + "self_attn.v_proj.weight": (c["num_key_value_heads"] * head_dim, c["hidden_size"]),
            p + "self_attn.o_proj.weight": (c["hidden_size"], c["hidden_size"]),
            p + "mlp.gate_proj.weight": (c["intermediate_size"], c["hidden_size"]),
            p + "mlp.up_proj.weight": (c["intermediate_size"], c["hidden_size"]),
            p + "mlp.down_proj.weight": (c["hidden_size"], c["intermediate_size"]),
            p + "input_layernorm.weight": (c["hidden_size"],), p + "post_attention_layernorm.weight": (c["hidden_size"],),
        })
    rng = np.random.default_rng(0)
    tensors = {name: (rng.standard_normal(shape, np.float32) * 0.02 if len(shape) == 2 else np.ones(shape, np.float32))
               for name, shape in shapes.items()}
    save_file(tensors, str(folder / "model.safetensors"))
    return (folder / "model.safetensors").stat().st_size / 2**20


def worker(folder: str, tp_size: int, repeats: int, out: str) -> None:
    """One process's measurements, written to ``out``/rank<r>.json."""
    sys.path.insert(0, str(ROOT))
    from models import from_pretrained
    from pipeline import distributed

    info = distributed.setup("CPU")
    import transformers  # noqa: F401 - from_pretrained's own imports belong to the baseline

    import models.llama  # noqa: F401
    baseline = memory_mb("VmRSS")
    start = time.perf_counter()
    model = from_pretrained(folder, tp_size=tp_size)
    load_seconds = time.perf_counter() - start
    peak = memory_mb("VmHWM")
    ids = np.random.default_rng(1).integers(0, CONFIG["vocab_size"], (1, PROMPT))
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        logits = model(input_ids=ids).logits.asnumpy()
        times.append(time.perf_counter() - start)
    result = {"rank": info.rank, "tp_size": tp_size, "baseline_rss_mb": round(baseline, 1),
              "load_peak_rss_mb": round(peak, 1), "load_above_baseline_mb": round(peak - baseline, 1),
              "load_seconds": round(load_seconds, 2), "forward_seconds": round(statistics.median(times[1:]), 3),
              "logits_checksum": float(np.abs(logits).sum())}
    Path(out, f"tp{tp_size}_rank{info.rank}.json").write_text(json.dumps(result))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_all(repeats: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        folder, out = Path(tmp, "llama"), Path(tmp, "out")
        out.mkdir()
        size = write_model(folder)
        me = [sys.executable, "-m", "benchmarks.bench_tp_memory", "--as_worker", str(folder), "--repeats", str(repeats),
              "--out", str(out)]
        subprocess.run(me + ["--tp_size", "1"], cwd=ROOT, check=True)
        msrun = Path(sys.executable).with_name("msrun")
        env = dict(os.environ, PATH=f"{msrun.parent}{os.pathsep}{os.environ['PATH']}")
        subprocess.run([str(msrun), "--worker_num=2", "--local_worker_num=2", "--join=True",
                        f"--master_port={free_port()}", f"--log_dir={tmp}/logs", str(ROOT / "benchmarks/bench_tp_memory.py"), "--as_worker", str(folder),
                        "--repeats", str(repeats), "--out", str(out), "--tp_size", "2"], cwd=ROOT, env=env,
                       check=True)
        rows = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    whole = next(r for r in rows if r["tp_size"] == 1)
    for row in rows:
        row["above_baseline_vs_tp1"] = round(row["load_above_baseline_mb"] / whole["load_above_baseline_mb"], 3)
        row["peak_vs_tp1"] = round(row["load_peak_rss_mb"] / whole["load_peak_rss_mb"], 3)
    return {"checkpoint_mb": round(size, 1), "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="timed forwards per process (after one warm-up)")
    parser.add_argument("--output", default=str(ROOT / "benchmarks/results/tp_memory.json"), help="results file")
    parser.add_argument("--as_worker", metavar="FOLDER", help=argparse.SUPPRESS)
    parser.add_argument("--tp_size", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.as_worker:
        worker(args.as_worker, args.tp_size, args.repeats, args.out)
        return
    result = run_all(args.repeats)
    result["meta"] = {"machine": platform.platform(), "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}
    print(f"checkpoint {result['checkpoint_mb']} MB (float32)")
    print(f"{'run':<12}{'baseline MB':>12}{'load peak MB':>14}{'above base':>12}{'vs tp1':>8}{'load s':>8}"
          f"{'forward s':>11}")
    for r in result["rows"]:
        print(f"{'tp%d rank%d' % (r['tp_size'], r['rank']):<12}{r['baseline_rss_mb']:>12}{r['load_peak_rss_mb']:>14}"
              f"{r['load_above_baseline_mb']:>12}{r['above_baseline_vs_tp1']:>8}{r['load_seconds']:>8}"
              f"{r['forward_seconds']:>11}")
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
