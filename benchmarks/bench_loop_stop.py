"""Tokens and time that stopping repetition loops saves (``generate(stop_repetition=...)``), on a loop-prone model.

Model: a tiny random Llama (``models.llama``, hidden 64, 2 layers, weights N(0, ``--std``): small weights make
greedy decoding fall into loops, as captioners do at their worst) over the first ``--vocab`` ids of a byte-level
BPE vocabulary of Qwen2's size (``benchmarks.bpe_vocab``, learnt here: bytes and the commonest merges; a random
model over all 151k ids wanders rather than loops), so the stop works on words as the captioners' does
(``pipeline.captioning.cli.loop_stop``: the clean-up's thresholds, word starts from the tokenizer; a loop inside
one word, "useruseruser", is not stopped, as the clean-up keeps it). The end token lies outside those ids, so a
row that does not loop runs to the budget. Prompts: ``--rows`` random ids (16 each, seeded), greedy,
``--max_new_tokens`` (200, the Qwen captioners' default).

Per batch size, every batch runs without and with the stop, once each after one warm-up call of each (the
graphs compile there), on the same prompts. Tokens: each row's generated tokens as the streamer sees them (up to
and including eos or the stop). Steps: the decoding steps of the batch (a batch ends when its last row does).
Time: the generate calls' wall time. Every stopped row is checked: its tokens equal the unstopped run's up to
the stop, and the caption clean-up (``pipeline.datasets.caption_text.cut_repetition``) cuts a loop from its
text (``cleanup_agrees``).

    python -m benchmarks.bench_loop_stop [--rows 16] [--batch_sizes 8,1] [--max_new_tokens 200]
        [--vocab 2000] [--std 0.02] [--seed 0] [--output benchmarks/results/loop_stop.json]
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from pathlib import Path

import mindspore as ms
import numpy as np
import transformers

from benchmarks.bpe_vocab import byte_level_bpe
from models.layers import init_weights
from models.llama import LlamaForCausalLM
from pipeline.captioning.cli import loop_stop
from pipeline.datasets.caption_text import cut_repetition

logger = logging.getLogger(__name__)
PROMPT_TOKENS = 16


def build_model(vocab: int, eos: int, std: float, seed: int) -> LlamaForCausalLM:
    ms.set_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                   eos_token_id=eos, pad_token_id=eos)
    model = LlamaForCausalLM(cfg)
    init_weights(model, std=std)
    return model


def run(model, prompts: np.ndarray, max_new_tokens: int, stop) -> dict:
    """One generate call: its new tokens per row (as streamed), steps, seconds and stopped rows."""
    counts = np.zeros(len(prompts), np.int64)
    steps = []

    def stream(tokens: np.ndarray) -> None:
        counts[:] += tokens >= 0
        steps.append(1)

    start = time.perf_counter()
    out = model.generate(input_ids=prompts, max_new_tokens=max_new_tokens, streamer=stream,
                         stop_repetition=stop)
    seconds = time.perf_counter() - start
    return dict(new=out.sequences[:, prompts.shape[1]:], tokens=counts, steps=len(steps), seconds=seconds,
                stopped=out.stopped_repeating)


def bench(batch: int, model, tokenizer, prompts: np.ndarray, max_new_tokens: int, stop) -> dict:
    warm = prompts[:batch]
    run(model, warm, max_new_tokens, None)
    run(model, warm, max_new_tokens, stop)
    totals = {key: 0 for key in ("tokens_off", "tokens_on", "steps_off", "steps_on")}
    totals.update(seconds_off=0.0, seconds_on=0.0, stopped=0, same_prefix=0, cleanup_agrees=0)
    for first in range(0, len(prompts), batch):
        rows = prompts[first:first + batch]
        off, on = run(model, rows, max_new_tokens, None), run(model, rows, max_new_tokens, stop)
        for side, result in (("off", off), ("on", on)):
            totals[f"tokens_{side}"] += int(result["tokens"].sum())
            totals[f"steps_{side}"] += result["steps"]
            totals[f"seconds_{side}"] += result["seconds"]
        for row in np.flatnonzero(on["stopped"]):
            length = on["tokens"][row]
            totals["stopped"] += 1
            totals["same_prefix"] += bool((on["new"][row, :length] == off["new"][row, :length]).all())
            text = tokenizer.decode(on["new"][row, :length], skip_special_tokens=True)
            totals["cleanup_agrees"] += cut_repetition(text).repetition
    totals.update(batch_size=batch, rows=len(prompts),
                  tokens_saved=1 - totals["tokens_on"] / totals["tokens_off"],
                  speedup=totals["seconds_off"] / totals["seconds_on"])
    return totals


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=16, help="prompts, each generated without and with the stop")
    p.add_argument("--batch_sizes", default="8,1", help="comma-separated batch sizes, each run over all rows")
    p.add_argument("--max_new_tokens", type=int, default=200, help="token budget per row")
    p.add_argument("--vocab", type=int, default=2000, help="the model's vocabulary: the tokenizer's first ids")
    p.add_argument("--std", type=float, default=0.02, help="the random weights' standard deviation (small: loops)")
    p.add_argument("--seed", type=int, default=0, help="seeds the weights and the prompts")
    p.add_argument("--output", default="benchmarks/results/loop_stop.json", help="where the JSON results go")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    tokenizer = byte_level_bpe()
    started = time.perf_counter()
    stop = loop_stop(tokenizer)
    vocab_seconds = time.perf_counter() - started
    model = build_model(args.vocab, tokenizer.eos_token_id, args.std, args.seed)
    prompts = np.random.default_rng(args.seed).integers(256, args.vocab, (args.rows, PROMPT_TOKENS))
    results = [bench(int(b), model, tokenizer, prompts, args.max_new_tokens, stop)
               for b in args.batch_sizes.split(",")]
    header = f"{'bs':>3} {'rows':>4} {'stopped':>7} {'tokens off':>10} {'tokens on':>9} {'saved':>6} " \
             f"{'steps off':>9} {'steps on':>8} {'s off':>6} {'s on':>6} {'speedup':>7} {'clean-up agrees':>15}"
    lines = [header] + [
        f"{r['batch_size']:>3} {r['rows']:>4} {r['stopped']:>7} {r['tokens_off']:>10} {r['tokens_on']:>9} "
        f"{r['tokens_saved']:>6.1%} {r['steps_off']:>9} {r['steps_on']:>8} {r['seconds_off']:>6.2f} "
        f"{r['seconds_on']:>6.2f} {r['speedup']:>6.2f}x {r['cleanup_agrees']:>8}/{r['stopped']}" for r in results]
    logger.info("\n".join(lines))
    meta = dict(vocab=args.vocab, tokenizer_vocab=len(tokenizer), std=args.std, seed=args.seed, max_new_tokens=args.max_new_tokens,
                prompt_tokens=PROMPT_TOKENS, word_table_seconds=round(vocab_seconds, 2),
                mindspore=ms.__version__, python=platform.python_version(), machine=platform.machine())
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(dict(meta=meta, results=results), indent=1) + "\n")
    logger.info("written to %s", args.output)


if __name__ == "__main__":
    main()
