"""msrun worker for tests/test_tensor_parallel.py and tests/test_qwen3_5_parallel.py: each named model split over
all ranks (tp = world size).

Usage: tp_worker.py <spec.json> <out folder>. ``spec.json``: ``{name: {"folder": ..., "inputs": <npz>,
"decoding": bool}}``.
Every rank writes ``<name>_tp<N>_rank<r>.npz`` (forward logits and greedy ids); rank 0 also writes
``<name>_tp1.npz`` from the whole model, for the comparison.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models import from_pretrained  # noqa: E402
from pipeline import distributed  # noqa: E402

NEW_TOKENS = 8


def ids(generated) -> np.ndarray:
    """The ids of a ``generate`` result: an array (the vision-language models), or a decoder's ``GenerateOutput``."""
    return np.asarray(getattr(generated, "sequences", generated))


def outputs(model, inputs: dict, decoding: bool) -> dict:
    """Logits and greedy ids; with ``decoding`` also beam search (3 beams) and seeded sampling."""
    result = {"logits": model(**inputs).logits.asnumpy(),
              "ids": ids(model.generate(**inputs, max_new_tokens=NEW_TOKENS))}
    if decoding:
        result["beams"] = ids(model.generate(**inputs, max_new_tokens=NEW_TOKENS, num_beams=3))
        result["sampled"] = ids(model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=True,
                                               top_k=0, temperature=1.5, seed=7))
    return result


def main() -> None:
    spec, out = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
    info = distributed.setup("CPU")
    for name, entry in spec.items():
        inputs = dict(np.load(entry["inputs"]))
        split = from_pretrained(entry["folder"], tp_size=info.world_size)
        decoding = entry.get("decoding", False)
        np.savez(out / f"{name}_tp{info.world_size}_rank{info.rank}.npz", **outputs(split, inputs, decoding))
        if info.rank == 0:
            np.savez(out / f"{name}_tp1.npz", **outputs(from_pretrained(entry["folder"]), inputs, decoding))


if __name__ == "__main__":
    main()
