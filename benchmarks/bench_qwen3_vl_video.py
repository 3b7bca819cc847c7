"""A 60 s clip through Qwen3-VL (dense), or Qwen3.5 (``--model qwen3_5``), at the captioner's Qwen3-VL defaults:
ours (MindSpore) against transformers + PyTorch.

``benchmarks.bench_long_video`` for Qwen3-VL: both sides caption through the same runner
(``pipeline.captioning.runner.run``, batch 1) with the same video decoding, frame spec and preprocessing:
``configs/captioning/qwen3_vl.yaml`` (2 fps over the whole video, at most 768 frames, decoded at
448 x 672, 128 to 768 tokens per temporal patch, about 24,576 tokens a video), the prompt ids with one
timestamp per temporal patch, and the visual-token budget. The torch side's ``prepare`` is our
``Qwen2VLCaptioner.prepare`` of a captioner built without its MindSpore model (see
:func:`ours_without_model`), so only the model differs. Torch runs transformers'
``Qwen3VLForConditionalGeneration`` (``Qwen3_5ForConditionalGeneration`` for a Qwen3.5 checkpoint: the child
reads config.json's ``model_type``) with ``attn_implementation="sdpa"`` on the same saved weights, given the same
prompt ids, pixel rows and grids. Greedy, 8 new tokens (random weights rarely stop early).

Per (config, clip) each side runs in its own subprocess (``bench_long_video``'s child: 20 min timeout): a
first video (for ours this includes compiling), then a second, different video of the same length
("warm"). Peak RSS is the child's ``ru_maxrss`` at its end (model, both videos). A child that fails
(exception, timeout, killed for memory) becomes a row with the error. The torch child imports MindSpore
too (our processor lives in ``models/``).

Configs (random seeded weights spread as the tests spread them, the tests' 96-word tokenizer and chat
template, 32,768 positions):
  tiny: LM 3 x 64, 4 heads, 2 KV heads, head_dim 24; vision 3 x 32, DeepStack after 2 blocks
        (tests/test_qwen3_vl.tiny_config)
  mid:  LM 4 x 512, 8 heads, 2 KV heads, head_dim 64, MLP 1408; vision 2 x 256 (4 heads, MLP 1024),
        DeepStack after both blocks (into the first 2 decoder layers), 48 x 48 learned positions
``--model qwen3_5`` (config tiny only; results default to benchmarks/results/qwen3_5_video.json):
  tiny: tests/test_qwen3_5_vl's dense model (its weights, spread around each norm's centre): LM 4 x 64, three
        Gated DeltaNet layers (2 key / 4 value heads of 16, conv 4) then one gated full-attention layer (4 heads,
        2 KV heads, head_dim 32, half rotating); Qwen3-VL's tiny tower without DeepStack; the chat template with
        Qwen3.5's thinking switch (the captioner turns thinking off). The processor configs are Qwen3-VL's
        published ones, as for Qwen3-VL (Qwen3.5 uses Qwen3-VL's processor).
Clips: ffmpeg testsrc, 640x360 at 25 fps (the second video flipped and hue-shifted). At the defaults a
60 s clip is 120 frames, 60 temporal patches of 14 x 21 merged tokens: 17,640 visual tokens, within the
budget, plus 60 timestamps and their vision start/end tokens.

    python -m benchmarks.bench_qwen3_vl_video [--model qwen3_vl|qwen3_5] [--configs tiny,mid] [--clips 60]
        [--max_minutes 25] [--output benchmarks/results/qwen3_vl_video.json]

Rows run in order (every clip of a config, then the next config) and the results file is rewritten
after each row. A row estimated (from the previous row of its config, else from the previous config's
row for that clip and the configs' sizes) to end past ``--max_minutes`` is left out and recorded as
skipped.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Sequence
from unittest import mock

from benchmarks import bench_long_video as long_video
from benchmarks.bench_long_video import (CLIP_RATE, CLIP_SIZE, NEW_TOKENS, ROOT, SEED, TIMEOUT, make_clip, make_row,
                                        table)

NOTE = ("Shared machine, noisy timings (other jobs run alongside; 2 CPU cores): compare ratios within a row, "
        "not runs. Seconds are the runner's wall time for one video (decode + preprocess + model). "
        "Peak RSS is each side's own subprocess (model, both videos; the torch child also imports MindSpore).")
CAPTIONER_KEYS = ("question", "fps", "max_frames", "height", "width", "max_frame_tokens", "min_frames")
# Qwen/Qwen3-VL-*-Instruct's preprocessor_config.json and video_preprocessor_config.json.
PIXELS = {"patch_size": 16, "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5] * 3,
          "image_std": [0.5] * 3}
IMAGE_SIZE = {"longest_edge": 16777216, "shortest_edge": 65536}
VIDEO_SIZE = {"longest_edge": 25165824, "shortest_edge": 4096}
# Relative cost of a row between configs, for the time estimate of a config's first row (measured here).
COST = {"tiny": 1.0, "mid": 1.5}
# Per model: transformers' class (the torch side) and the results file's default.
MODELS = {"qwen3_vl": ("Qwen3VLForConditionalGeneration", "benchmarks/results/qwen3_vl_video.json"),
          "qwen3_5": ("Qwen3_5ForConditionalGeneration", "benchmarks/results/qwen3_5_video.json")}


# ----------------------------------------------------------------------------- checkpoints


def qwen3_5_model(name: str):
    """tests/test_qwen3_5_vl's tiny dense Qwen3.5 (seeded, its weights), with 32,768 positions."""
    from tests.test_qwen3_5_vl import hf_model

    if name != "tiny":
        raise ValueError(f"unknown Qwen3.5 config {name!r}: tiny")
    model = hf_model(seed=SEED)
    model.config.text_config.max_position_embeddings = 32768
    return model


def build_config(name: str, model: str = "qwen3_vl"):
    import transformers

    from tests.test_qwen2vl import ENDOFTEXT, IM_END, IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START, VOCAB
    from tests.test_qwen3_vl import tiny_config

    if model == "qwen3_5":
        return qwen3_5_model(name).config
    if name == "tiny":
        config = tiny_config()
        config.text_config.max_position_embeddings = 32768
        return config
    if name != "mid":
        raise ValueError(f"unknown config {name!r}: tiny or mid")
    text = dict(vocab_size=VOCAB, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                num_attention_heads=8, num_key_value_heads=2, head_dim=64, max_position_embeddings=32768,
                rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 5000000.0,
                                                    "mrope_section": [12, 10, 10], "mrope_interleaved": True},
                tie_word_embeddings=False, bos_token_id=ENDOFTEXT, eos_token_id=IM_END, pad_token_id=ENDOFTEXT)
    vision = dict(depth=2, hidden_size=256, intermediate_size=1024, num_heads=4, out_hidden_size=512, in_channels=3,
                  patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                  deepstack_visual_indexes=[0, 1], hidden_act="gelu_pytorch_tanh")
    return transformers.Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_PAD,
                                      video_token_id=VIDEO_PAD, vision_start_token_id=VISION_START,
                                      vision_end_token_id=VISION_END, tie_word_embeddings=False)


def save_checkpoint(name: str, folder: Path, model: str = "qwen3_vl") -> Path:
    """A random transformers checkpoint (save_pretrained), the tests' tokenizer with timestamp words (Qwen3.5: and
    its chat template with the thinking switch), and Qwen3-VL's published preprocessor configs."""
    import torch
    import transformers

    from tests.test_qwen2vl import ENDOFTEXT, IM_END, save_tokenizer, spread_weights
    from tests.test_qwen3_vl import TIME_WORDS

    folder.mkdir(parents=True, exist_ok=True)
    if model == "qwen3_5":
        hf = qwen3_5_model(name)
    else:
        torch.manual_seed(SEED)
        hf = spread_weights(transformers.Qwen3VLForConditionalGeneration(build_config(name)).eval(), SEED)
    hf.save_pretrained(folder)
    save_tokenizer(folder, TIME_WORDS)
    if model == "qwen3_5":
        from tests.test_qwen3_5_vl import THINKING_TEMPLATE

        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        tokenizer.chat_template = THINKING_TEMPLATE
        tokenizer.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {**PIXELS, "size": IMAGE_SIZE, "image_processor_type": "Qwen2VLImageProcessor"}))
    (folder / "video_preprocessor_config.json").write_text(json.dumps({**PIXELS, "size": VIDEO_SIZE}))
    (folder / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [IM_END, ENDOFTEXT], "pad_token_id": ENDOFTEXT, "bos_token_id": ENDOFTEXT}))
    return folder


def preset() -> dict:
    """The captioner's Qwen3-VL defaults (configs/captioning/qwen3_vl.yaml) that its constructor takes."""
    from pipeline.captioning.caption_qwen2vl import QWEN3_VL_CONFIG
    from pipeline.config import load_yaml

    return {k: v for k, v in load_yaml(QWEN3_VL_CONFIG).items() if k in CAPTIONER_KEYS}


def expected_tokens(seconds: int) -> int:
    """Visual tokens of a clip at the defaults (frames at the preset's rate, sized by Qwen3-VL's rule), before a
    token budget applies (60 s is within it)."""
    from models.qwen3_vl.processing import Qwen3VLVisionProcessor

    settings = preset()
    frames = max(min(int(seconds * settings["fps"]), settings["max_frames"]), 4)
    top = settings.get("max_frame_tokens", 768)
    processor = Qwen3VLVisionProcessor(frame_tokens=(min(128, top), top))  # its defaults: the published sizes
    return processor.num_tokens(processor.video_grid(frames, settings["height"], settings["width"]))


# ----------------------------------------------------------------------------- the two sides (in a child)


def ours_without_model(folder: str, config):
    """A Qwen2VLCaptioner at the Qwen3-VL defaults whose MindSpore model is not built (its config stands in):
    the real __init__ gives the same frame spec, prompt ids, pad/EOS ids and budget, and ``prepare`` the same
    inputs."""
    from pipeline.captioning import caption_qwen2vl

    with mock.patch.object(caption_qwen2vl, "from_pretrained", lambda *a, **k: SimpleNamespace(config=config)):
        return caption_qwen2vl.Qwen2VLCaptioner(folder, max_new_tokens=NEW_TOKENS, **preset())


_long_video_torch = long_video.torch_captioner  # kept: child() puts torch_captioner below in its place


def torch_captioner(folder: str):
    """transformers' Qwen3-VL or Qwen3.5 (sdpa, as config.json's ``model_type`` says) fed our inputs
    (bench_long_video's torch side)."""
    model_type = json.loads((Path(folder) / "config.json").read_text())["model_type"]
    return _long_video_torch(folder, MODELS[model_type][0], ours_without_model)


def ours_captioner(folder: str):
    from pipeline.captioning.caption_qwen2vl import Qwen2VLCaptioner

    captioner = Qwen2VLCaptioner(folder, max_new_tokens=NEW_TOKENS, **preset())
    inner = captioner.generate

    def generate(batch):  # the runner records only the message: print the traceback for the parent
        try:
            return inner(batch)
        except Exception:
            traceback.print_exc()
            raise

    captioner.generate = generate
    return captioner


def child(side: str, folder: str, csvs: Sequence[str], work: Path, result: Path) -> None:
    """``bench_long_video.child`` (timing, graphs, peak RSS) with this benchmark's Qwen3-VL captioners."""
    with mock.patch.multiple(long_video, ours_captioner=ours_captioner, torch_captioner=torch_captioner):
        long_video.child(side, folder, csvs, work, result)


# ----------------------------------------------------------------------------- the parent


def run_side(side: str, folder: Path, csvs: Sequence[Path], work: Path) -> dict:
    """One side in its own subprocess of this module (bench_long_video's runner)."""
    return long_video.run_side(side, folder, csvs, work, module="benchmarks.bench_qwen3_vl_video")


def estimate_seconds(rows: list[dict], config: str, seconds: int) -> float:
    """Wall time of a row (both sides): from the last measured row of the same config, scaled by the
    visual-token ratio to the power 1.5 (attention is quadratic in the prompt, the rest linear); else from
    another config's row of the same clip, scaled by ``COST``; else 0 (just run it)."""
    done = [r for r in rows if r.get("wall_seconds")]
    same = [r for r in done if r["config"] == config]
    if same:
        last = same[-1]
        return last["wall_seconds"] * max(1.0, expected_tokens(seconds) / expected_tokens(last["clip_seconds"])) ** 1.5
    other = [r for r in done if r["clip_seconds"] == seconds and r["config"] in COST]
    if other and config in COST:
        return other[-1]["wall_seconds"] * COST[config] / COST[other[-1]["config"]]
    return 0.0


def meta(configs: Sequence[str], model: str = "qwen3_vl") -> dict:
    import mindspore as ms
    import torch
    import transformers

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "mindspore": ms.__version__,
            "torch_threads": torch.get_num_threads(), "note": NOTE,
            "settings": {**preset(), "config_file": "configs/captioning/qwen3_vl.yaml", "greedy": True,
                         "max_new_tokens": NEW_TOKENS, "batch_size": 1,
                         "clip": f"testsrc {CLIP_SIZE} @ {CLIP_RATE} fps",
                         "subprocess_timeout_seconds": TIMEOUT, "torch_attn_implementation": "sdpa",
                         "model": model, "torch_class": MODELS[model][0]},
            "configs": {c: build_config(c, model).to_dict() for c in configs}}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="qwen3_vl",
                        help="the family: qwen3_vl (configs tiny, mid) or qwen3_5 (config tiny)")
    parser.add_argument("--configs", help="comma-separated, run in this order: tiny, mid (default: both for "
                                          "qwen3_vl, tiny for qwen3_5)")
    parser.add_argument("--clips", default="60", help="clip lengths in seconds, comma-separated")
    parser.add_argument("--max_minutes", type=float, default=25,
                        help="leave out (record as skipped) a row estimated to end past this much wall time")
    parser.add_argument("--output", help="results JSON, rewritten after every row (default: "
                                         "benchmarks/results/qwen3_vl_video.json, or qwen3_5_video.json)")
    parser.add_argument("--child", choices=("ours", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--videos", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child, args.folder, args.videos.split(","), Path(args.work), Path(args.result))
    if shutil.which("ffmpeg") is None:
        raise SystemExit("ffmpeg is needed to make the benchmark clips (apt-get install ffmpeg)")
    configs = (args.configs or ("tiny,mid" if args.model == "qwen3_vl" else "tiny")).split(",")
    clips = [int(c) for c in args.clips.split(",")]
    started = time.perf_counter()
    output = Path(args.output or MODELS[args.model][1])
    output.parent.mkdir(parents=True, exist_ok=True)
    info = {**meta(configs, args.model), "command": "python -m benchmarks.bench_qwen3_vl_video "
                                       + " ".join(argv if argv is not None else sys.argv[1:])}
    rows: list[dict] = []

    def write() -> None:
        info["total_wall_seconds"] = time.perf_counter() - started
        info["expected_visual_tokens"] = {str(s): expected_tokens(s) for s in clips}
        output.write_text(json.dumps({"meta": info, "results": rows}, indent=2, default=str))

    with tempfile.TemporaryDirectory(prefix="bench_qwen3_vl_") as tmp:
        tmp = Path(tmp)
        videos = {s: [make_clip(tmp, s, v) for v in ("a", "b")] for s in clips}
        for config in configs:
            folder = None
            for seconds in clips:
                elapsed = time.perf_counter() - started
                estimate = estimate_seconds(rows, config, seconds)
                if elapsed + estimate > args.max_minutes * 60:
                    rows.append({"config": config, "clip_seconds": seconds, "skipped":
                                 f"would end past --max_minutes {args.max_minutes:g} (at {elapsed / 60:.0f} min, "
                                 f"estimated {estimate / 60:.0f} min more)"})
                    print(f"skipping {config} {seconds}s: {rows[-1]['skipped']}", flush=True)
                    write()
                    continue
                folder = folder or save_checkpoint(config, tmp / config, args.model)
                work = tmp / f"{config}_{seconds}"
                ours = run_side("ours", folder, videos[seconds], work / "ours")
                ref = run_side("torch", folder, videos[seconds], work / "torch")
                rows.append(make_row(config, seconds, ours, ref))
                rows[-1]["wall_seconds"] = ours["wall_seconds"] + ref["wall_seconds"]
                rows[-1]["expected_visual_tokens"] = expected_tokens(seconds)
                errors = "; ".join(f"{side}: {out['error']}" for side, out in (("ours", ours), ("torch", ref))
                                   if out.get("error"))
                print(f"[{time.perf_counter() - started:6.0f}s] {config} {seconds}s: ours {ours['wall_seconds']:.0f}s"
                      f" torch {ref['wall_seconds']:.0f}s wall" + (f" ERROR {errors}" if errors else ""), flush=True)
                write()
    write()
    print(table(rows))
    print(f"results written to {output} ({(time.perf_counter() - started) / 60:.1f} min)")


if __name__ == "__main__":
    main()
