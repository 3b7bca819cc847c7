"""Per-step decoding cost at a real vocabulary: token selection on the host (before) against on the device.

The decoder is tiny (Qwen2, 2 layers, hidden 64, 4 heads, 2 KV heads) with Qwen2-VL's vocabulary of
151,936 and an untied LM head, so a step's cost is the vocabulary side. Random prompts of 24 tokens,
batch 8, ``max_new_tokens`` 16 with ``min_new_tokens`` 16 (every step runs, eos banned on all of them,
as min length does). Cases: greedy (bs 8) and beam search (bs 8 x 5 beams, all beams returned), each
also with Qwen2-VL's repetition penalty of 1.05 (``_rp``).

Three implementations:
  before: ``models/generation.py`` as of ``--before-rev`` (default: the newest commit whose file has
          no on-device selection), loaded from git: full logits to the host, numpy log-softmax and a
          full stable ``argsort`` over beams x vocabulary;
  full:   today's file with ``select_on_device=False`` (full logits, host selection by ``argpartition``);
  device: today's default (argmax / top-k log-probs picked inside the compiled step, the repetition
          penalty applied there from a seen-token mask kept on the device).

Times come from wrapping ``models.jit.call``: every compiled call (prefill, decoding step, beam
reorder) is timed until its first output is on the host (graphs run asynchronously, and
``mindspore.runtime.synchronize`` has no CPU device); the caller's own copy of it then counts as host time,
and so does "device"'s selection graph, which runs on the step's logits outside ``models.jit.call``. Per selection (one per decoding call,
the prefill's included), "host" is the generate() time outside compiled calls: copies to numpy,
rules, selection, bookkeeping. "step" is the model's one-token compiled call, "reorder" the cache gather; "whole" = step + reorder + host. Each (implementation, case)
runs in its own process after one warm-up generate (compiling); the median of ``--repeats`` runs is
kept, and peak RSS is that process's ``ru_maxrss``. The sequences of all three are compared.

    python -m benchmarks.bench_token_selection [--repeats 3] [--output benchmarks/results/token_selection.json]
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 151936
BATCH, PROMPT, NEW = 8, 24, 16
CASES = {"greedy": (1, 1.0), "beam": (5, 1.0), "greedy_rp": (1, 1.05), "beam_rp": (5, 1.05)}  # beams, penalty
IMPLS = ("before", "full", "device")
MARKER = "select_on_device"  # present in the generation module once it selects on the device

logger = logging.getLogger("bench")


def before_rev() -> str:
    """The newest commit whose ``models/generation.py`` has no on-device selection."""
    revs = subprocess.run(["git", "log", "--format=%H", "--", "models/generation.py"], cwd=ROOT,
                          capture_output=True, text=True, check=True).stdout.split()
    for rev in revs:
        text = subprocess.run(["git", "show", f"{rev}:models/generation.py"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout
        if MARKER not in text:
            return rev
    raise RuntimeError("no commit of models/generation.py without on-device selection")


def load_before(rev: str, folder: Path):
    """HEAD-independent copy of the old generation module, importable next to today's."""
    path = folder / "generation_before.py"
    path.write_text(subprocess.run(["git", "show", f"{rev}:models/generation.py"], cwd=ROOT, capture_output=True,
                                   text=True, check=True).stdout)
    spec = importlib.util.spec_from_file_location("models.generation_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


def child(impl: str, case: str, repeats: int, rev: str) -> dict:
    """One (implementation, case) in this process: warm up, then time ``repeats`` generate() calls."""
    import numpy as np
    import transformers

    from models import generation, jit
    from models.layers import init_weights
    from models.qwen2 import Qwen2ForCausalLM

    cfg = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   tie_word_embeddings=False, eos_token_id=151645, pad_token_id=151643)
    model = Qwen2ForCausalLM(cfg)
    init_weights(model)
    folder = tempfile.TemporaryDirectory()  # kept to the end: ms.jit reads the old module's source
    module = load_before(rev, Path(folder.name)) if impl == "before" else generation
    kwargs = {"select_on_device": False} if impl == "full" else {}
    beams, penalty = CASES[case]
    ids = np.random.default_rng(0).integers(0, 151643, (BATCH, PROMPT))
    timed: dict[str, list[float]] = {}
    original = jit.call

    def timed_call(name, fn, *args):
        start = time.perf_counter()
        out = original(name, fn, *args)
        out[0].asnumpy()  # wait for the graph; the caller's own asnumpy of it then counts as host time
        timed.setdefault(name, []).append(time.perf_counter() - start)
        return out

    jit.call = timed_call

    def run():
        return module.generate(model, input_ids=ids, max_new_tokens=NEW, min_new_tokens=NEW, num_beams=beams,
                               num_return_sequences=beams, repetition_penalty=penalty, **kwargs)

    run()
    rows = []
    for _ in range(repeats):
        timed.clear()
        start = time.perf_counter()
        out = run()
        total = time.perf_counter() - start
        calls = timed["decode_step"]
        reorders = timed.get("reorder", [])
        steps = len(calls) - 1
        host = (total - sum(calls) - sum(reorders)) / len(calls)
        step = statistics.mean(calls[1:])
        reorder = sum(reorders) / steps
        rows.append({"total_s": total, "steps": steps, "prefill_ms": calls[0] * 1e3, "step_ms": step * 1e3,
                     "reorder_ms": reorder * 1e3, "host_ms": host * 1e3, "whole_ms": (step + reorder + host) * 1e3})
    result = {key: statistics.median(r[key] for r in rows) for key in rows[0]}
    result.update(impl=impl, case=case, peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  sequences_sha1=hashlib.sha1(np.ascontiguousarray(out.sequences).tobytes()).hexdigest(),
                  scores=None if out.sequences_scores is None else [float(s) for s in out.sequences_scores])
    folder.cleanup()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--before-rev", default=None, help="git revision of the old models/generation.py")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "token_selection.json"))
    parser.add_argument("--child", nargs=2, metavar=("IMPL", "CASE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    rev = args.before_rev or before_rev()
    if args.child:
        print(json.dumps(child(*args.child, args.repeats, rev)))
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    results = []
    for case in CASES:
        for impl in IMPLS:
            logger.info("running %s / %s", case, impl)
            proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_token_selection", "--child", impl, case,
                                   "--repeats", str(args.repeats), "--before-rev", rev],
                                  cwd=ROOT, capture_output=True, text=True)
            if proc.returncode:
                raise RuntimeError(f"{case}/{impl} failed:\n{proc.stderr[-3000:]}")
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    header = (f"{'case':10s} {'impl':7s} {'steps':>5s} {'host ms':>9s} {'step ms':>9s} {'reorder ms':>10s} "
              f"{'whole ms':>9s} {'total s':>8s} {'peak RSS MB':>11s}")
    print(header)
    for r in results:
        print(f"{r['case']:10s} {r['impl']:7s} {r['steps']:5.0f} {r['host_ms']:9.2f} {r['step_ms']:9.2f} "
              f"{r['reorder_ms']:10.2f} {r['whole_ms']:9.2f} {r['total_s']:8.3f} {r['peak_rss_mb']:11.0f}")
    for case in CASES:
        hashes = {r["impl"]: r["sequences_sha1"] for r in results if r["case"] == case}
        print(f"{case}: same sequences in all three: {len(set(hashes.values())) == 1}")
    payload = {"machine": platform.platform(), "python": platform.python_version(), "before_rev": rev,
               "vocab": VOCAB, "batch": BATCH, "prompt": PROMPT, "max_new_tokens": NEW, "repeats": args.repeats,
               "results": results}
    Path(args.output).write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
