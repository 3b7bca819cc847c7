"""What schema-constrained decoding costs per generated token: constrained against unconstrained generation at
Qwen2-VL's vocabulary (151,936), batch 8.

The decoder is tiny (Qwen2, 2 layers, hidden 64, untied LM head of 151,936 columns), so a step's cost is the
vocabulary side, where the mask acts; the tokenizer is ``benchmarks/bpe_vocab.py``'s learnt 152k byte-level BPE.
The constrained runs follow the ``hunyuan`` preset (``configs/schemas``). Random prompts of 24 tokens, up to 48 new
tokens: a random model at this vocabulary almost never picks eos unconstrained, nor completes 8 JSON documents
constrained, so both run all 48 (times are per token either way). Cases: greedy, beam search (2 beams, whose
matchers are copied and reordered with them) and sampling (temperature 1, all tokens).

Per case: ``step_ms``, a generated token's wall time after the prompt (the model's step, the selection graph,
the host's bookkeeping; constrained: also computing the mask and advancing the matchers), the median over
``--repeats`` runs after a warm-up that compiles; ``mask_ms``: of that, the host's time in
``RowMatchers.allowed`` (the engine's masks of 8 rows, unpacked to a (8, V) bool array) and ``advance_ms`` in
``RowMatchers.advance`` (each row's matcher takes its token). ``ratio``: constrained step / unconstrained step,
the goal being at most 1.3.

    python -m benchmarks.bench_constrained [--repeats 3] [--output benchmarks/results/constrained.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from benchmarks.bpe_vocab import byte_level_bpe

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 151_936
BATCH, PROMPT, NEW = 8, 24, 48
CASES = {"greedy": {}, "beam2": {"num_beams": 2}, "sample": {"do_sample": True, "temperature": 1.0, "top_k": 0}}


class Timer:
    """Wraps a method of a class, adding each call's seconds to ``seconds``."""

    def __init__(self, owner, name: str):
        self.owner, self.name, self.original = owner, name, getattr(owner, name)
        self.seconds = 0.0
        self.calls = 0

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return self.original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
                self.calls += 1
        setattr(owner, name, timed)

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0


def measure(model, ids: np.ndarray, kwargs: dict, timers: dict[str, Timer], repeats: int) -> dict:
    """Median per-token times of ``repeats`` generate calls after a warm-up."""
    from models.generation import generate

    runs = []
    for attempt in range(repeats + 1):
        for t in timers.values():
            t.reset()
        start = time.perf_counter()
        out = generate(model, input_ids=ids, max_new_tokens=NEW, **kwargs)
        total = time.perf_counter() - start
        steps = out.sequences.shape[1] - ids.shape[1]
        if attempt:  # the first run compiles
            per_step = steps - 1
            runs.append({"steps": steps,
                         "step_ms": (total - timers["prefill"].seconds) / per_step * 1e3,
                         "prefill_ms": timers["prefill"].seconds * 1e3,
                         "mask_ms": timers["allowed"].seconds / max(timers["allowed"].calls, 1) * 1e3,
                         "advance_ms": timers["advance"].seconds / max(per_step, 1) * 1e3})
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="timed generate calls per case (after one warm-up)")
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "constrained.json"),
                   help="where the results are written as JSON")
    args = p.parse_args()

    import transformers

    from models import generation
    from models.constrained import JsonGrammar, RowMatchers
    from models.layers import init_weights
    from models.qwen2 import Qwen2ForCausalLM

    tokenizer = byte_level_bpe()
    schema = json.loads((ROOT / "configs" / "schemas" / "hunyuan.json").read_text())
    grammar = JsonGrammar(schema, tokenizer)
    cfg = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id,
                                   pad_token_id=tokenizer.pad_token_id)
    model = Qwen2ForCausalLM(cfg)
    init_weights(model)
    ids = np.random.default_rng(0).integers(3, len(tokenizer), (BATCH, PROMPT))
    timers = {"prefill": Timer(generation._Session, "prefill"), "allowed": Timer(RowMatchers, "allowed"),
              "advance": Timer(RowMatchers, "advance")}
    results = []
    for case, kwargs in CASES.items():
        seeded = {"seed": 0} if kwargs.get("do_sample") else {}
        free = measure(model, ids, {**kwargs, **seeded}, timers, args.repeats)
        constrained = measure(model, ids, {**kwargs, **seeded, "grammar": grammar}, timers, args.repeats)
        results.append({"case": case, "unconstrained": free, "constrained": constrained,
                        "ratio": constrained["step_ms"] / free["step_ms"]})
    report = {"machine": platform.platform(), "python": platform.python_version(), "vocab": VOCAB,
              "batch": BATCH, "prompt": PROMPT, "max_new_tokens": NEW, "schema": "hunyuan",
              "repeats": args.repeats, "results": results}
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(f"vocabulary {VOCAB}, batch {BATCH}, schema hunyuan; per generated token, median of {args.repeats}")
    print(f"{'case':<8} {'free ms':>8} {'constrained ms':>15} {'ratio':>6} {'mask ms':>8} {'advance ms':>10}")
    for row in results:
        c = row["constrained"]
        print(f"{row['case']:<8} {row['unconstrained']['step_ms']:>8.2f} {c['step_ms']:>15.2f} {row['ratio']:>6.2f} "
              f"{c['mask_ms']:>8.2f} {c['advance_ms']:>10.3f}")


if __name__ == "__main__":
    main()
