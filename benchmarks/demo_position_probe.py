"""Do a demo model's query outputs say where the shape is, and which way it moves? Two ridge probes.

The demo captioner learns colour, shape, growing, shrinking and appearing, but answers "moving left" for clips
that move left, right, up or down, bounce or stay still (``benchmarks/demo_design.py``). Those actions differ
only in where the shape is from frame to frame. This probe asks whether that reaches the language model.

It renders still clips of the synthetic data (``pipeline.datasets.synthetic``: random colour, shape and
background, the shape at a random place) and runs each model's vision encoder and Q-Former on 8 of their 16
frames, as the captioner does. Then it fits a ridge regression from features to the shape's centre (x, y) on
400 clips and reports R^2 on 200 others (1 = position fully readable, 0 = none). The features are:

* ``first frame's queries``: the language-model inputs of the first frame's query group (frame-grouped models);
* ``all queries``: every query output, which is all the language model sees of the video;
* ``vision tokens``: the first frame's vision-encoder tokens, flattened.

The second probe renders moving clips, one of the six actions that differ only in where the shape is (left,
right, up, down, bouncing, still), and fits a ridge classifier (one-hot targets, the largest output wins) from
all query outputs to the action: held-out accuracy, chance 1 in 6. If it is high while the captions miss the
motion, the language model is what fails to read it; if it is low, the Q-Former drops it.

    python -m benchmarks.demo_position_probe --models random:fan_in,random:fan_in+sincos,PATH[,PATH]
        [--output benchmarks/results/demo_position_probe.json]

Results accumulate in the output: each run adds or replaces its models' rows.

``random:<init>`` is a fresh ``configs/demo/blip2_opt.json`` model (``fan_in`` and ``+sincos`` as
``pipeline.training.train --init fan_in --vision_position_init sincos``); a PATH is a checkpoint folder. The
ridge penalty is the best of 1, 10, 100 and 1000 on the 200 clips, so both scores are slightly optimistic for all
alike.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import mindspore as ms
import numpy as np
from tqdm import tqdm

from models.blip2.processing import Blip2FrameProcessor
from pipeline.datasets.synthetic import Clip, random_clip, render

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "demo" / "blip2_opt.json"
SIZE, FIT, HELD_OUT, FRAMES = 96, 400, 200, 8
PENALTIES = (1.0, 10.0, 100.0, 1000.0)
POSITIONAL = ("left", "right", "up", "down", "bounces", "still")


def clips(count: int, seed: int, actions: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(count, 8, 3, 96, 96) processed frames of clips doing ``actions`` in turn, (count,) the action's index,
    and (count, 2) where render() started the shape (its centre throughout for a still clip)."""
    rng, processor = np.random.default_rng(seed), Blip2FrameProcessor(SIZE, SIZE)
    pixels, labels, starts = [], [], []
    margin = SIZE * 0.22  # where render() places a shape
    for i in range(count):
        drawn = random_clip(rng)
        label = i % len(actions)
        clip = Clip(drawn.colour, drawn.shape, actions[label], drawn.second_colour, drawn.background)
        frames = render(clip, size=SIZE, rng=np.random.default_rng(seed + 1 + i))
        starts.append(np.random.default_rng(seed + 1 + i).uniform(margin, SIZE - margin, 2))
        pixels.append(processor(frames[::16 // FRAMES]))
        labels.append(label)
    return np.stack(pixels), np.array(labels), np.array(starts)


def load(spec: str):
    """A checkpoint folder, or ``random:<init>`` built as the training script builds a fresh model."""
    if spec.startswith("random:"):
        from pipeline.training import train

        init = spec.split(":", 1)[1].split("+")
        flags = ["--model_config", str(CONFIG), "--init", init[0]]
        if "sincos" in init[1:]:
            flags += ["--vision_position_init", "sincos"]
        return train.build_model(train.build_parser().parse_args(flags), "float32")
    from models import from_pretrained

    return from_pretrained(spec, dtype="float32")


def features(model, pixels: np.ndarray, batch: int = 10) -> dict[str, np.ndarray]:
    model.set_train(False)
    queries, tokens = [], []
    for i in tqdm(range(0, len(pixels), batch), desc="clips", unit="batch"):
        chunk = ms.Tensor(pixels[i:i + batch])
        queries.append(model.get_image_features(chunk).asnumpy())
        first = model.tubelets(chunk)[:, 0]  # the first frame, or the first tubelet (temporal_patch_size)
        tokens.append(model.vision_model(first).asnumpy())
    queries, tokens = np.concatenate(queries), np.concatenate(tokens)
    steps = FRAMES // getattr(model, "temporal_patch_size", 1)
    group = queries.shape[1] // steps if getattr(model, "frame_query_groups", False) else None
    out = {"all queries": queries.reshape(len(queries), -1), "vision tokens": tokens.reshape(len(tokens), -1)}
    if group:
        out["first frame's queries"] = queries[:, :group].reshape(len(queries), -1)
    return out


def ridge_predict(x: np.ndarray, y: np.ndarray, penalty: float) -> np.ndarray:
    """Ridge regression fit on the first FIT rows, predictions for the rest (features standardised)."""
    mean, std = x[:FIT].mean(0), x[:FIT].std(0) + 1e-6
    x = (x - mean) / std
    fit, test = x[:FIT], x[FIT:]
    target = y[:FIT] - y[:FIT].mean(0)
    weights = np.linalg.solve(fit.T @ fit + penalty * np.eye(fit.shape[1]), fit.T @ target)
    return test @ weights + y[:FIT].mean(0)


def ridge_r2(x: np.ndarray, y: np.ndarray, penalty: float) -> np.ndarray:
    """Held-out R^2 of each column of ``y``."""
    predicted = ridge_predict(x, y, penalty)
    return 1 - ((predicted - y[FIT:]) ** 2).sum(0) / ((y[FIT:] - y[FIT:].mean(0)) ** 2).sum(0)


def ridge_accuracy(x: np.ndarray, labels: np.ndarray, penalty: float) -> float:
    """Held-out accuracy of a ridge classifier on one-hot targets."""
    predicted = ridge_predict(x, np.eye(labels.max() + 1)[labels], penalty)
    return float((predicted.argmax(1) == labels[FIT:]).mean())


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", required=True, help="comma-separated checkpoint folders or random:<init>")
    p.add_argument("--seed", type=int, default=123, help="seed of the still clips (the moving clips use seed + 1)")
    p.add_argument("--output", default="benchmarks/results/demo_position_probe.json", help="results JSON")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ms.set_device("CPU")
    pixels, _, centres = clips(FIT + HELD_OUT, args.seed, ("still",))
    moving, labels, _ = clips(FIT + HELD_OUT, args.seed + 1, POSITIONAL)
    results = {"clips": {"fit": FIT, "held_out": HELD_OUT, "frames": FRAMES, "seed": args.seed,
                         "motion_actions": list(POSITIONAL)},
               "date": time.strftime("%Y-%m-%d %H:%M"), "models": {}}
    lines = ["| model | features | R^2 of x | R^2 of y |", "|---|---|---|---|"]
    motion_lines = ["| model | motion from all queries (chance 17 %) |", "|---|---|"]
    for spec in args.models.split(","):
        model, rows = load(spec), {}
        for name, x in features(model, pixels).items():
            scores = {penalty: ridge_r2(x, centres, penalty) for penalty in PENALTIES}
            penalty = max(scores, key=lambda k: scores[k].mean())
            rows[name] = {"x": round(float(scores[penalty][0]), 3), "y": round(float(scores[penalty][1]), 3),
                          "penalty": penalty}
            lines.append(f"| {spec} | {name} | {rows[name]['x']:.2f} | {rows[name]['y']:.2f} |")
        x = features(model, moving)["all queries"]
        motion = max(ridge_accuracy(x, labels, penalty) for penalty in PENALTIES)
        rows["motion from all queries"] = round(motion, 3)
        motion_lines.append(f"| {spec} | {100 * motion:.0f} % |")
        results["models"][spec] = rows
    print("\n".join(lines + [""] + motion_lines))
    output = ROOT / args.output
    if output.exists():  # keep the other models' rows; a rerun model's replace its old ones
        results["models"] = {**json.loads(output.read_text())["models"], **results["models"]}
    output.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
