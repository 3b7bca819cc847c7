"""Long clips through Qwen2-VL at the captioner's defaults: ours (MindSpore) against transformers + PyTorch.

Both sides caption through the same runner (``pipeline.captioning.runner.run``, batch 1) with the
same video decoding, frame spec (4 fps, 448 x 672, at most 768 frames), preprocessing
(``Qwen2VLVisionProcessor``), prompt ids and visual-token budget: the torch side's ``prepare`` is
``Qwen2VLCaptioner.prepare`` of a captioner built without its MindSpore model (see
:func:`ours_without_model`), so a clip beyond the budget keeps the same frames on both sides and
only the model differs. Torch runs ``Qwen2VLForConditionalGeneration`` with
``attn_implementation="sdpa"`` on the same saved weights. Greedy, ``max_new_tokens`` 8 (the
issue's measurement cut 200 new tokens to 8; random weights rarely stop early).

Per (config, clip) each side runs in its own subprocess (20 min timeout): a first video (for ours
this includes compiling), then a second, different video of the same length ("warm"). Peak RSS is
the child's ``ru_maxrss`` at its end (model, both videos). Compiled graphs and their seconds come
from ``models.jit.COMPILES``. A child that fails (exception, timeout, killed for memory) becomes a
row with the error. The torch child imports MindSpore too (our processor lives in ``models/``).

Configs (random seeded weights, vocabulary 96, the tests' tokenizer and chat template):
  tiny: LM 2 x 64, 4 heads, 4 KV heads; vision depth 2 x 32 (2 heads)  (tests/test_qwen2vl.tiny_config)
  mid:  LM 4 x 512, 8 heads, 2 KV heads, MLP 1408; vision depth 2 x 256 (4 heads)
both with 32768 positions and M-RoPE sections summing to head_dim / 2. Clips: ffmpeg testsrc,
640x360 at 25 fps (the second video flipped and hue-shifted). At 4 fps and 448 x 672 a clip needs
192 visual tokens per second: 60 s (46080) exceeds the default budget (24576), so both sides keep
128 of its 240 frames.

    python -m benchmarks.bench_long_video [--configs tiny,mid] [--clips 10,30,60] [--skip mid:60]
        [--max_minutes 35] [--output benchmarks/results/long_video.json]

A row estimated (from the previous row of its config) to end past ``--max_minutes`` is left out
and recorded as skipped, as are the rows named by ``--skip``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Sequence
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
NEW_TOKENS = 8
TIMEOUT = 20 * 60
SEED = 0
CLIP_SIZE, CLIP_RATE = "640x360", 25
NOTE = ("Shared machine, noisy timings (other jobs run alongside; 2 CPU cores): compare ratios within a row, "
        "not runs. Seconds are the runner's wall time for one video (decode + preprocess + model). "
        "Peak RSS is each side's own subprocess (model, both videos; the torch child also imports MindSpore).")
# Qwen/Qwen2-VL-7B-Instruct's preprocessor_config.json pixel range: 448 x 672 frames stay as they are.
PREPROCESSOR = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
                "merge_size": 2, "image_processor_type": "Qwen2VLImageProcessor"}


# ----------------------------------------------------------------------------- checkpoints and clips


def build_config(name: str):
    import transformers

    from tests.test_qwen2vl import (ENDOFTEXT, IM_END, IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START, VOCAB,
                                    tiny_config)

    if name == "tiny":
        config = tiny_config()
        config.text_config.num_key_value_heads = 4
        config.text_config.max_position_embeddings = 32768
        return config
    if name != "mid":
        raise ValueError(f"unknown config {name!r}: tiny or mid")
    text = dict(vocab_size=VOCAB, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                num_attention_heads=8, num_key_value_heads=2, rope_theta=1000000.0, max_position_embeddings=32768,
                rms_norm_eps=1e-6, rope_scaling={"type": "mrope", "mrope_section": [8, 12, 12]},
                tie_word_embeddings=False, bos_token_id=ENDOFTEXT, eos_token_id=IM_END, pad_token_id=ENDOFTEXT)
    vision = dict(depth=2, embed_dim=256, hidden_size=512, num_heads=4, mlp_ratio=4, in_channels=3, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2)
    return transformers.Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_PAD,
                                      video_token_id=VIDEO_PAD, vision_start_token_id=VISION_START,
                                      vision_end_token_id=VISION_END, tie_word_embeddings=False,
                                      eos_token_id=IM_END, pad_token_id=ENDOFTEXT, bos_token_id=ENDOFTEXT)


def save_long_checkpoint(name: str, folder: Path) -> Path:
    """A random transformers checkpoint (save_pretrained) with the tests' tokenizer and real pixel limits."""
    import torch
    import transformers

    from tests.test_qwen2vl import ENDOFTEXT, IM_END, save_tokenizer
    from tests.tiny_models import _randomize

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    model = transformers.Qwen2VLForConditionalGeneration(build_config(name)).eval()
    _randomize(model, SEED)
    model.save_pretrained(folder)
    save_tokenizer(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    (folder / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [IM_END, ENDOFTEXT], "pad_token_id": ENDOFTEXT, "bos_token_id": ENDOFTEXT}))
    return folder


def make_clip(folder: Path, seconds: int, variant: str) -> Path:
    """A testsrc clip (moving counter and scroll bar) with a one-row CSV; variant "b" is flipped and hue-shifted."""
    path = folder / f"clip{seconds}s_{variant}.mp4"
    cmd = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
           f"testsrc=size={CLIP_SIZE}:rate={CLIP_RATE}", "-t", str(seconds)]
    if variant == "b":
        cmd += ["-vf", "vflip,hue=h=120"]
    subprocess.run(cmd + ["-pix_fmt", "yuv420p", str(path)], check=True, timeout=600)
    csv = path.with_suffix(".csv")
    csv.write_text(f"path\n{path.name}\n")
    return csv


# ----------------------------------------------------------------------------- the two sides (in a child)


def ours_without_model(folder: str, config):
    """A Qwen2VLCaptioner whose MindSpore model is not built (its config stands in): the real
    __init__ gives the same frame spec, prompt ids, pad/EOS ids and budget, and ``prepare`` the same inputs."""
    from pipeline.captioning import caption_qwen2vl

    with mock.patch.object(caption_qwen2vl, "from_pretrained", lambda *a, **k: SimpleNamespace(config=config)):
        return caption_qwen2vl.Qwen2VLCaptioner(folder, max_new_tokens=NEW_TOKENS)


def torch_captioner(folder: str, model_class: str = "Qwen2VLForConditionalGeneration",
                    without_model: Callable | None = None):
    """transformers' ``model_class`` (sdpa) behind our captioner's interface, fed the inputs of
    ``without_model(folder, config)`` (default :func:`ours_without_model`): only the model differs."""
    import torch
    import transformers

    from benchmarks.families import TorchQwen2VL
    from pipeline.captioning.budget import BUDGET_COLUMNS

    class TorchLong(TorchQwen2VL):
        """transformers (sdpa) behind our captioner's interface, fed our PreparedVideo inputs."""

        extra_columns = BUDGET_COLUMNS

        def __init__(self):  # TorchQwen2VL's attributes, with sdpa asked for explicitly
            self.model = getattr(transformers, model_class).from_pretrained(
                folder, attn_implementation="sdpa", dtype=torch.float32).eval()
            self.ours = (without_model or ours_without_model)(folder, self.model.config)
            self.frame_spec = self.ours.frame_spec
            self.prepare = self.ours.prepare
            self.tokenizer = self.ours.tokenizer

        def generate(self, batch):
            texts = super().generate([video.inputs for video in batch])
            return [{"text": text, **video.columns()} for text, video in zip(texts, batch)]

    return TorchLong()


def ours_captioner(folder: str):
    from pipeline.captioning.caption_qwen2vl import Qwen2VLCaptioner

    captioner = Qwen2VLCaptioner(folder, max_new_tokens=NEW_TOKENS)
    inner = captioner.generate

    def generate(batch):  # the runner records only the message: print the traceback for the parent
        try:
            return inner(batch)
        except Exception:
            traceback.print_exc()
            raise

    captioner.generate = generate
    return captioner


def visual_columns(captioner, row, video: Path) -> dict:
    """visual_tokens / num_frames_used from the runner's CSV, else recomputed from the grid ours would use."""
    import pandas as pd

    if "visual_tokens" in row and pd.notna(row["visual_tokens"]):
        return {"visual_tokens": int(row["visual_tokens"]), "num_frames_used": int(row["num_frames_used"])}
    from pipeline.datasets.video import sample_frames

    spec = captioner.frame_spec
    frames, _ = sample_frames(str(video), num_frames=spec.num_frames, fps=spec.fps, height=spec.height,
                              width=spec.width)
    frames, max_pixels = captioner.fit(frames, captioner.budget)
    grid = captioner.processor.video_grid(len(frames), *frames.shape[1:3], max_pixels)
    return {"visual_tokens": captioner.processor.num_tokens(grid), "num_frames_used": len(frames),
            "visual_columns": "computed from the grid (not in the runner's CSV)"}


def child(side: str, folder: str, csvs: Sequence[str], work: Path, result: Path) -> None:
    import pandas as pd
    import torch

    from models.jit import COMPILES
    from pipeline import distributed
    from pipeline.captioning.runner import RunOptions, run

    distributed.setup("CPU")
    torch.manual_seed(SEED)
    start = time.perf_counter()
    captioner = ours_captioner(folder) if side == "ours" else torch_captioner(folder)
    out = {"side": side, "load_seconds": time.perf_counter() - start, "torch_threads": torch.get_num_threads(),
           "budget": captioner.budget if side == "ours" else captioner.ours.budget, "videos": []}
    for label, csv in zip(("first", "warm"), csvs):
        graphs, seconds = COMPILES.snapshot()
        output = work / f"{side}_{label}" / "captions.csv"
        summary = run(captioner, RunOptions(input=csv, output=str(output), bs=1, num_workers=2, overwrite=True))
        row = pd.read_csv(output, keep_default_na=False).iloc[0].to_dict()
        video = Path(csv).parent / row["path"]
        out["videos"].append({
            "video": label, "seconds": summary.seconds, "model_seconds": summary.model_seconds,
            "decode_seconds": summary.decode_seconds, "status": row["status"], "error": row["error"],
            "text": row["text"], **visual_columns(captioner.ours if side == "torch" else captioner, row, video),
            "graphs": COMPILES.graphs - graphs, "compile_seconds": COMPILES.seconds - seconds})
    out["compiled_graphs"], out["compile_seconds"] = COMPILES.snapshot()
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # KiB on Linux
    result.write_text(json.dumps(out, indent=2))


# ----------------------------------------------------------------------------- the parent


def run_side(side: str, folder: Path, csvs: Sequence[Path], work: Path,
             module: str = "benchmarks.bench_long_video") -> dict:
    """One side in its own subprocess (``module``'s ``--child``); any failure becomes {"error": ...} with the
    stderr's last lines."""
    work.mkdir(parents=True, exist_ok=True)
    result, log = work / "result.json", work / "stderr.txt"
    cmd = [sys.executable, "-m", module, "--child", side, "--folder", str(folder),
           "--videos", ",".join(map(str, csvs)), "--work", str(work), "--result", str(result)]
    env = {**os.environ, "TQDM_DISABLE": "1", "GLOG_v": os.environ.get("GLOG_v", "3")}
    start = time.perf_counter()
    try:
        with open(log, "w") as err:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=err, stderr=subprocess.STDOUT, timeout=TIMEOUT)
        error = None if proc.returncode == 0 else (
            f"exit {proc.returncode}" + (" (SIGKILL: likely out of memory)" if proc.returncode == -9 else ""))
    except subprocess.TimeoutExpired:
        error = f"timeout after {TIMEOUT} s"
    wall = time.perf_counter() - start
    tail = log.read_text(errors="replace").strip().splitlines()[-12:] if log.is_file() else []
    if error is None and not result.is_file():
        error = "no result file"
    if error is not None:
        return {"error": error, "stderr_tail": tail, "wall_seconds": wall}
    out = json.loads(result.read_text())
    out["wall_seconds"] = wall
    failed = [v for v in out["videos"] if v["status"] != "ok"]
    if failed:
        out["error"] = "; ".join(f"{v['video']} video: {v['error']}" for v in failed)
        out["stderr_tail"] = tail
    return out


def make_row(config: str, seconds: int, ours: dict, ref: dict) -> dict:
    row = {"config": config, "clip_seconds": seconds}
    for name, side in (("ours", ours), ("torch", ref)):
        videos = {v["video"]: v for v in side.get("videos", [])}
        for label in ("first", "warm"):
            v = videos.get(label)
            row[f"{name}_{label}_seconds"] = v["seconds"] if v and v["status"] == "ok" else None
        row[f"{name}_peak_rss_gb"] = side.get("peak_rss_gb")
        if side.get("error"):
            row[f"{name}_error"] = side["error"]
            row[f"{name}_stderr_tail"] = side.get("stderr_tail", [])
        row[f"{name}_detail"] = side
    first = ours.get("videos", [{}])[0] if ours.get("videos") else {}
    row["num_frames_used"] = first.get("num_frames_used")
    row["visual_tokens"] = first.get("visual_tokens")
    row["compiled_graphs"] = ours.get("compiled_graphs")
    row["compile_seconds"] = ours.get("compile_seconds")
    row["warm_new_graphs"] = ours["videos"][1]["graphs"] if len(ours.get("videos", [])) > 1 else None
    for key in ("first_seconds", "warm_seconds", "peak_rss_gb"):
        a, b = row[f"ours_{key}"], row[f"torch_{key}"]
        row[f"ratio_{key}"] = a / b if a and b else None
    if ours.get("videos") and ref.get("videos"):
        pairs = list(zip(ours["videos"], ref["videos"]))
        row["same_inputs"] = all((a["visual_tokens"], a["num_frames_used"]) == (b["visual_tokens"], b["num_frames_used"])
                                 for a, b in pairs)
        row["captions_equal"] = f"{sum(a['text'] == b['text'] for a, b in pairs)}/{len(pairs)}"
    return row


def expected_tokens(seconds: int) -> int:
    """Visual tokens of a clip at the defaults: 4 fps (at most 768 frames), 384 per 2 frames, within the budget."""
    return min(min(4 * seconds, 768) // 2 * 384, 24576)


def estimate_seconds(rows: list[dict], config: str, seconds: int) -> float:
    """Wall time of a row (both sides), from the last measured row of the same config; none: 0 (just run it).
    Scaled by the visual-token ratio to the power 1.5 (attention is quadratic in the prompt, the rest linear)."""
    done = [r for r in rows if r["config"] == config and r.get("wall_seconds")]
    if not done:
        return 0.0
    last = done[-1]
    ratio = expected_tokens(seconds) / expected_tokens(last["clip_seconds"])
    return last["wall_seconds"] * max(1.0, ratio) ** 1.5


def _fmt(value, digits: int = 1, suffix: str = "") -> str:
    return "—" if value is None else f"{value:.{digits}f}{suffix}"


def table(rows: list[dict]) -> str:
    head = ["config", "clip", "frames", "visual tokens", "ours first s", "ours warm s", "ours RSS GB", "graphs",
            "compile s", "torch first s", "torch warm s", "torch RSS GB", "first ours/torch", "warm ours/torch",
            "RSS ours/torch", "captions equal", "notes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        notes = [f"{side}: {r[side + '_error']}" for side in ("ours", "torch") if r.get(side + "_error")]
        if r.get("skipped"):
            notes.append(f"skipped: {r['skipped']}")
        if r.get("same_inputs") is False:
            notes.append("inputs differ between the sides!")
        cells = [r["config"], f"{r['clip_seconds']} s", str(r.get("num_frames_used") or "—"),
                 str(r.get("visual_tokens") or "—"), _fmt(r.get("ours_first_seconds")),
                 _fmt(r.get("ours_warm_seconds")), _fmt(r.get("ours_peak_rss_gb"), 2),
                 str(r.get("compiled_graphs") if r.get("compiled_graphs") is not None else "—"),
                 _fmt(r.get("compile_seconds")), _fmt(r.get("torch_first_seconds")),
                 _fmt(r.get("torch_warm_seconds")), _fmt(r.get("torch_peak_rss_gb"), 2),
                 _fmt(r.get("ratio_first_seconds"), 2, "x"), _fmt(r.get("ratio_warm_seconds"), 2, "x"),
                 _fmt(r.get("ratio_peak_rss_gb"), 2, "x"), r.get("captions_equal", "—"),
                 "; ".join(notes)[:200]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def meta() -> dict:
    import mindspore as ms
    import torch
    import transformers

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "mindspore": ms.__version__,
            "torch_threads": torch.get_num_threads(), "note": NOTE,
            "settings": {"fps": 4, "height": 448, "width": 672, "max_frames": 768, "greedy": True,
                         "max_new_tokens": NEW_TOKENS, "batch_size": 1, "clip": f"testsrc {CLIP_SIZE} @ {CLIP_RATE} fps",
                         "subprocess_timeout_seconds": TIMEOUT, "torch_attn_implementation": "sdpa"}}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="tiny,mid", help="comma-separated: tiny, mid")
    parser.add_argument("--clips", default="10,30,60", help="clip lengths in seconds, comma-separated")
    parser.add_argument("--skip", default="", help="rows to leave out (recorded as skipped), e.g. mid:60")
    parser.add_argument("--max_minutes", type=float, default=35,
                        help="leave out (record as skipped) a row estimated to end past this much wall time")
    parser.add_argument("--output", default="benchmarks/results/long_video.json")
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
    configs = args.configs.split(",")
    clips = [int(c) for c in args.clips.split(",")]
    skip = {s for s in args.skip.split(",") if s}
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_long_") as tmp:
        tmp = Path(tmp)
        videos = {s: [make_clip(tmp, s, v) for v in ("a", "b")] for s in clips}
        for config in configs:
            folder = save_long_checkpoint(config, tmp / config)
            for seconds in clips:
                if f"{config}:{seconds}" in skip:
                    rows.append({"config": config, "clip_seconds": seconds, "skipped": "--skip"})
                    continue
                elapsed = time.perf_counter() - started
                estimate = estimate_seconds(rows, config, seconds)
                if elapsed + estimate > args.max_minutes * 60:
                    rows.append({"config": config, "clip_seconds": seconds, "skipped":
                                 f"would end past --max_minutes {args.max_minutes:g} (at {elapsed / 60:.0f} min, "
                                 f"estimated {estimate / 60:.0f} min more)"})
                    print(f"skipping {config} {seconds}s: {rows[-1]['skipped']}", flush=True)
                    continue
                work = tmp / f"{config}_{seconds}"
                ours = run_side("ours", folder, videos[seconds], work / "ours")
                ref = run_side("torch", folder, videos[seconds], work / "torch")
                rows.append(make_row(config, seconds, ours, ref))
                rows[-1]["wall_seconds"] = (ours.get("wall_seconds") or 0) + (ref.get("wall_seconds") or 0)
                print(f"[{time.perf_counter() - started:6.0f}s] {config} {seconds}s: ours {ours.get('wall_seconds', 0):.0f}s"
                      f" torch {ref.get('wall_seconds', 0):.0f}s wall" + (f" ERROR {ours.get('error') or ref.get('error')}"
                                                                         if ours.get('error') or ref.get('error') else ""),
                      flush=True)
    print(table(rows))
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    info = {**meta(), "total_wall_seconds": time.perf_counter() - started,
            "command": "python -m benchmarks.bench_long_video " + " ".join(argv if argv is not None else sys.argv[1:])}
    output.write_text(json.dumps({"meta": info, "configs": {c: build_config(c).to_dict() for c in configs},
                                  "results": rows}, indent=2, default=str))
    print(f"results written to {output}")


if __name__ == "__main__":
    main()
