"""Which grammar engine computes the allowed-token masks of schema-constrained decoding: llguidance against
outlines-core, at a 152k byte-level BPE vocabulary (``benchmarks/bpe_vocab.py``).

Both install from PyPI without torch (xgrammar needs torch and triton, so it cannot run in this project's
torch-free runtime and is not measured). For each preset in ``configs/schemas`` and each engine:

* ``tokenizer_s``: reading the tokenizer into the engine (once per tokenizer; outlines-core: its
  ``Vocabulary`` of decoded token bytes);
* ``compile_s``: turning the schema into a matcher (llguidance: grammar, matcher and its first mask, which
  builds the lexer lazily; outlines-core: the regex and its token-level ``Index``, whose first mask is then
  a lookup);
* ``mask_us``: one row's next-token bitmask, median / mean / max over the steps of a valid document of that
  schema (the engine is advanced by the document's own tokens), after the first mask;
* ``batch8_us``: the masks of 8 rows (8 different documents) per step, mean over steps (llguidance: its
  executor's threads; outlines-core: one guide after the other, as it has no batch call).

Run with outlines-core installed (``pip install 'outlines-core>=0.2,<0.3'``; it is not a dependency)::

    python -m benchmarks.bench_grammar_engines [--output benchmarks/results/grammar_engines.json]
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
SCHEMAS = ("hunyuan", "opensora", "camera_motion")
VOCAB = 151_936  # Qwen2-VL's LM head: the mask's width
BATCH = 8
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
WORDS = ("a red car drives along a coastal road at sunset while waves break on the rocks below and "
         "gulls circle over the water; the camera follows from a low angle as warm light fades into blue "
         "dusk, with soft shadows and a calm, nostalgic mood").split()


def example(schema: dict, rng: np.random.Generator):
    """A random document valid for the presets' subset of JSON Schema (objects, arrays, strings, enums)."""
    if "enum" in schema:
        return schema["enum"][rng.integers(len(schema["enum"]))]
    kind = schema["type"]
    if kind == "object":
        return {key: example(schema["properties"][key], rng) for key in schema["required"]}
    if kind == "array":
        return [example(schema["items"], rng) for _ in range(rng.integers(schema.get("minItems", 1), 4))]
    if kind == "boolean":
        return bool(rng.integers(2))
    start = rng.integers(len(WORDS))
    return " ".join(WORDS[start:start + rng.integers(4, 25)]).capitalize()


def documents(schema: dict, tokenizer, count: int) -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [tokenizer.encode(json.dumps(example(schema, rng), separators=(", ", ": ")), add_special_tokens=False)
            for _ in range(count)]


def _stats(seconds: list[float]) -> dict:
    us = [s * 1e6 for s in seconds]
    return {"median": statistics.median(us), "mean": statistics.fmean(us), "max": max(us)}


def bench_llguidance(tokenizer, schemas: dict[str, dict]) -> dict:
    import llguidance
    import llguidance.numpy as llnp

    start = time.perf_counter()
    engine_tokenizer = llguidance.LLTokenizer(tokenizer.backend_tokenizer.to_str(), n_vocab=VOCAB,
                                              eos_token=tokenizer.eos_token_id)
    out = {"version": llguidance.__version__, "tokenizer_s": time.perf_counter() - start, "schemas": {}}
    executor = llguidance.LLExecutor()
    for name, schema in schemas.items():
        docs = documents(schema, tokenizer, BATCH)
        bitmask = llnp.allocate_token_bitmask(BATCH, VOCAB)
        start = time.perf_counter()
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        first = llguidance.LLMatcher(engine_tokenizer, grammar)
        llnp.fill_next_token_bitmask(first, bitmask, 0)
        compile_s = time.perf_counter() - start
        times = []
        for token in docs[0]:
            start = time.perf_counter()
            llnp.fill_next_token_bitmask(first, bitmask, 0)
            times.append(time.perf_counter() - start)
            assert first.consume_token(token), first.get_error()
        matchers = [llguidance.LLMatcher(engine_tokenizer, grammar) for _ in docs]
        batch_times = []
        for step in range(max(map(len, docs))):
            live = [(m, row) for row, (m, doc) in enumerate(zip(matchers, docs)) if step < len(doc)]
            start = time.perf_counter()
            llnp.fill_next_token_bitmask_par(executor, live, bitmask)
            batch_times.append(time.perf_counter() - start)
            for m, row in live:
                assert m.consume_token(docs[row][step]), m.get_error()
        out["schemas"][name] = {"compile_s": compile_s, "mask_us": _stats(times),
                                "batch8_us": statistics.fmean(batch_times) * 1e6, "steps": len(docs[0])}
    return out


def _byte_vocabulary(tokenizer) -> dict[bytes, list[int]]:
    """Each token's bytes (byte-level BPE: one character per byte), special tokens left out."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
    specials = set(tokenizer.all_special_ids)
    vocab: dict[bytes, list[int]] = {}
    for token, index in tokenizer.get_vocab().items():
        if index not in specials:
            vocab.setdefault(bytes(byte_of[c] for c in token), []).append(index)
    return vocab


def bench_outlines_core(tokenizer, schemas: dict[str, dict]) -> dict:
    from importlib.metadata import version

    import outlines_core

    start = time.perf_counter()
    vocabulary = outlines_core.Vocabulary(tokenizer.eos_token_id, _byte_vocabulary(tokenizer))
    out = {"version": version("outlines-core"), "tokenizer_s": time.perf_counter() - start, "schemas": {}}
    for name, schema in schemas.items():
        docs = documents(schema, tokenizer, BATCH)
        bitmask = np.zeros((BATCH, (VOCAB + 31) // 32), np.int32)
        start = time.perf_counter()
        index = outlines_core.Index(outlines_core.json_schema.build_regex_from_schema(json.dumps(schema)),
                                    vocabulary)
        compile_s = time.perf_counter() - start

        def fill(guide, row: int) -> None:
            guide.write_mask_into(bitmask[row].ctypes.data, bitmask.shape[1], 4)

        first, times = outlines_core.Guide(index), []
        for token in docs[0]:
            start = time.perf_counter()
            fill(first, 0)
            times.append(time.perf_counter() - start)
            first.advance(token, return_tokens=False)
        guides = [outlines_core.Guide(index) for _ in docs]
        batch_times = []
        for step in range(max(map(len, docs))):
            live = [row for row, doc in enumerate(docs) if step < len(doc)]
            start = time.perf_counter()
            for row in live:
                fill(guides[row], row)
            batch_times.append(time.perf_counter() - start)
            for row in live:
                guides[row].advance(docs[row][step], return_tokens=False)
        out["schemas"][name] = {"compile_s": compile_s, "mask_us": _stats(times),
                                "batch8_us": statistics.fmean(batch_times) * 1e6, "steps": len(docs[0])}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "grammar_engines.json"),
                   help="where the results are written as JSON")
    args = p.parse_args()
    tokenizer = byte_level_bpe()
    schemas = {name: json.loads((ROOT / "configs" / "schemas" / f"{name}.json").read_text()) for name in SCHEMAS}
    results = {"machine": platform.platform(), "python": platform.python_version(), "vocab": VOCAB,
               "tokenizer_tokens": len(tokenizer), "batch": BATCH,
               "engines": {"llguidance": bench_llguidance(tokenizer, schemas),
                           "outlines-core": bench_outlines_core(tokenizer, schemas)}}
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    print(f"vocabulary {VOCAB} (tokenizer {len(tokenizer)} tokens), batch {BATCH}")
    print(f"{'engine':<14} {'schema':<14} {'tokenizer s':>11} {'compile s':>10} {'mask us med':>11} "
          f"{'mask us mean':>12} {'batch8 us':>10}")
    for engine, res in results["engines"].items():
        for name, row in res["schemas"].items():
            print(f"{engine:<14} {name:<14} {res['tokenizer_s']:>11.2f} {row['compile_s']:>10.3f} "
                  f"{row['mask_us']['median']:>11.1f} {row['mask_us']['mean']:>12.1f} {row['batch8_us']:>10.1f}")


if __name__ == "__main__":
    main()
