"""Can the demo model's vision encoder learn shape at all, given the shape as a direct label, and how soon?

The demo captioner stays at a colour-only plateau (``benchmarks/demo_design.py``): shape at chance however the
Q-Former is arranged. This probe takes the caption path away: the vision encoder of ``configs/demo/blip2_opt.json``
(transformers' ``Blip2VisionModel``, the architecture our port matches) with a linear head on its mean-pooled
tokens, trained from the same random start (normal(0, 0.02) matrices, as ``models.layers.init_weights``) with AdamW
to name the shape of single frames of the synthetic clips (``pipeline.datasets.synthetic``, fresh frames every
step). Each variant changes one thing; the table gives held-out accuracy (300 frames) along the way.

``qformer`` puts the demo's Q-Former (8 queries) between the encoder and the head (the head reads the mean of the
query outputs). ``qformer_lm*`` add the projection and the demo's OPT (from scratch), which reads the query
outputs and four prompt tokens and names the shape as its next token; ``qformer_lm_colour`` names the colour
that way (7 classes), a check of that path: it learns no colour in 400 updates, which the captioner names within
200, so this path is not yet faithful to the captioner's. At the random start the Q-Former's outputs hardly
depend on the frames (the learned queries, unit-scaled by its LayerNorms, dominate a cross-attention term of
normal(0, 0.02) projections); ``*_cross5`` start those projections (value, output dense) at 5x the std.

``*fan_in`` start every projection (Linear, the patch convolution) at std 1/sqrt(fan in), embeddings at 0.02. At
width 128, 0.02 shrinks each layer's output about 4x, so at the start every attention passes on only a few percent
of what other tokens hold; shape needs patches combined, colour does not. With fan_in the encoder alone names shape
91 % at 800 updates (64 % at 0.02) and so does the path through the OPT, 92 % (38 %).

    python -m benchmarks.demo_vision_probe [--variants base,lr1e-3,...] [--steps 800]
        [--output benchmarks/results/demo_vision_probe.json]

It runs on torch (a test-only dependency) because it studies the design, not our implementation, and runs
about twice as fast there; chance is 33 %.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from models.blip2.processing import CLIP_MEAN, CLIP_STD
from pipeline.datasets.synthetic import COLOURS, SHAPES, random_clip, render

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "demo" / "blip2_opt.json"
# name -> changes from the demo's vision config and recipe (lr 3e-4, batch 32, weight decay 0.05)
VARIANTS = {
    "base": {},
    "lr1e-3": {"lr": 1e-3},
    "lr1e-4": {"lr": 1e-4},
    "batch16": {"batch": 16},
    "patch8": {"patch_size": 8},
    "patch32": {"patch_size": 32},
    "layers2": {"num_hidden_layers": 2},
    "positions_std1": {"position_std": 1.0},
    "qformer": {"qformer": True},
    "qformer_lm": {"qformer": True, "lm": True},
    "qformer_lm_lr1e-3": {"qformer": True, "lm": True, "lr": 1e-3},
    "qformer_lm_1layer": {"qformer": True, "lm": True, "lm_layers": 1},
    "qformer_lm_colour": {"qformer": True, "lm": True, "target": "colour"},
    "qformer_lm_colour_cross5": {"qformer": True, "lm": True, "target": "colour", "cross_scale": 5.0},
    "qformer_lm_cross5": {"qformer": True, "lm": True, "cross_scale": 5.0},
    "fan_in": {"init": "fan_in"},
    "qformer_fan_in": {"qformer": True, "init": "fan_in"},
    "qformer_lm_fan_in": {"qformer": True, "lm": True, "init": "fan_in"},
    "qformer_lm_fan_in_lr1e-3": {"qformer": True, "lm": True, "init": "fan_in", "lr": 1e-3},
}
# what a variant learns to name: the shape (ids 5-7 in the language model's variants) or, as a check that the
# language model's path can learn at all, the colour (ids 12-18)
TARGETS = {"shape": (SHAPES, 5), "colour": (tuple(COLOURS), 12)}


def frames(rng: np.random.Generator, count: int, target: str = "shape") -> tuple[np.ndarray, np.ndarray]:
    """``count`` normalised frames (N, 3, 96, 96), each a random frame of a new random clip, and their shapes (or
    colours)."""
    images, labels = [], []
    for _ in range(count):
        clip = random_clip(rng)
        frame = render(clip, 8, 96, rng)[rng.integers(8)]
        images.append(((frame / 255.0 - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1))
        labels.append(TARGETS[target][0].index(getattr(clip, target)))
    return np.stack(images).astype(np.float32), np.array(labels)


def run_variant(changes: dict, steps: int, every: int, seed: int = 0) -> dict:
    import torch
    from transformers import Blip2Config, OPTConfig, OPTForCausalLM
    from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerModel, Blip2VisionModel

    torch.manual_seed(seed)
    full = Blip2Config.from_json_file(str(CONFIG))
    config = full.vision_config
    for key in ("patch_size", "num_hidden_layers"):
        if key in changes:
            setattr(config, key, changes[key])
    target = changes.get("target", "shape")
    classes, first_id = len(TARGETS[target][0]), TARGETS[target][1]
    encoder, head = Blip2VisionModel(config), torch.nn.Linear(config.hidden_size, classes)
    # eval(): no dropout, as in our Q-Former (models/blip2/qformer.py), which the captioner trains
    qformer = Blip2QFormerModel(full.qformer_config).eval() if changes.get("qformer") else None
    # the demo's query count when these variants ran (the bundled model has 32 since, grouped per frame)
    queries = torch.nn.Parameter(torch.zeros(1, changes.get("queries", 8), full.qformer_config.hidden_size))
    layers = changes.get("lm_layers", full.text_config.num_hidden_layers)
    text = {**full.text_config.to_dict(), "num_hidden_layers": layers}
    lm = OPTForCausalLM(OPTConfig(**text)).eval() if changes.get("lm") else None
    projection = torch.nn.Linear(full.qformer_config.hidden_size, full.text_config.hidden_size)
    parts = [encoder, head] + ([qformer] if qformer is not None else []) + ([projection, lm] if lm else [])
    params = [p for part in parts for p in part.parameters()] + ([queries] if qformer is not None else [])
    generator = torch.Generator().manual_seed(seed)
    # init "fan_in": every Linear and Conv2d matrix at std 1/sqrt(fan_in) (0.088 at width 128), embeddings at 0.02
    projections = {id(m.weight) for part in parts for m in part.modules()
                   if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))} if changes.get("init") == "fan_in" else set()
    with torch.no_grad():
        for p in params:
            if p.ndim >= 2:
                std = (p[0].numel() ** -0.5) if id(p) in projections else 0.02
                p.copy_(torch.randn(p.shape, generator=generator) * std)
        if qformer is not None and changes.get("cross_scale"):  # the frames' term of the query outputs, larger
            for layer in qformer.encoder.layer:
                if layer.has_cross_attention:
                    layer.crossattention.attention.value.weight.mul_(changes["cross_scale"])
                    layer.crossattention.output.dense.weight.mul_(changes["cross_scale"])
        positions = encoder.embeddings.position_embedding
        positions.copy_(torch.randn(positions.shape, generator=generator) * changes.get("position_std", 0.02))
    optimizer = torch.optim.AdamW(params, lr=changes.get("lr", 3e-4), weight_decay=0.05)
    rng = np.random.default_rng(seed)
    held_x, held_y = frames(rng, 300, target)

    def logits(x: np.ndarray) -> "torch.Tensor":
        tokens = encoder(pixel_values=torch.from_numpy(x)).last_hidden_state
        if qformer is not None:
            tokens = qformer(query_embeds=queries.expand(len(x), -1, -1),
                             encoder_hidden_states=tokens).last_hidden_state
        if lm is not None:  # the prompt "<bos> a video of a" as ids 1, 8..11
            prompt = lm.get_input_embeddings()(torch.tensor([1, 8, 9, 10, 11])).expand(len(x), -1, -1)
            embeds = torch.cat([projection(tokens), prompt], dim=1)
            return lm(inputs_embeds=embeds).logits[:, -1, first_id:first_id + classes]
        return head(tokens.mean(1))

    curve, started = [], time.perf_counter()
    for step in range(1, steps + 1):
        x, y = frames(rng, changes.get("batch", 32), target)
        loss = torch.nn.functional.cross_entropy(logits(x), torch.from_numpy(y))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % every == 0:
            with torch.no_grad():
                accuracy = float((logits(held_x).argmax(-1).numpy() == held_y).mean())
            curve.append({"step": step, "accuracy": round(accuracy, 3), "loss": round(loss.item(), 3)})
            print(f"  step {step}: held-out {target} accuracy {accuracy:.2f}", flush=True)
    return {"changes": changes, "curve": curve, "seconds": round(time.perf_counter() - started, 1)}


def first_step_at(curve: list[dict], accuracy: float) -> int | None:
    return next((p["step"] for p in curve if p["accuracy"] >= accuracy), None)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names of " + ", ".join(VARIANTS))
    p.add_argument("--steps", type=int, default=800, help="updates per variant")
    p.add_argument("--every", type=int, default=100, help="updates between held-out evaluations")
    p.add_argument("--output", default="benchmarks/results/demo_vision_probe.json", help="results JSON (accumulates)")
    args = p.parse_args(argv)
    unknown = [n for n in args.variants.split(",") if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {sorted(VARIANTS)}")
    import torch

    torch.set_num_threads(2)
    output = ROOT / args.output
    results = json.loads(output.read_text()) if output.is_file() else {}
    for name in args.variants.split(","):
        print(f"{name}: {VARIANTS[name] or 'the demo design'}", flush=True)
        results[name] = {**run_variant(VARIANTS[name], args.steps, args.every), "date": time.strftime("%Y-%m-%d %H:%M")}
        output.write_text(json.dumps(results, indent=1))
    print("| variant | steps | final accuracy | first step at 60 % | first step at 90 % | seconds |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        curve = r["curve"]
        print(f"| {name} | {curve[-1]['step']} | {100 * curve[-1]['accuracy']:.0f} % | "
              f"{first_step_at(curve, 0.6) or '-'} | {first_step_at(curve, 0.9) or '-'} | {r['seconds']} |")
    return results


if __name__ == "__main__":
    main()
