"""Speed of our MindSpore captioners against transformers + PyTorch (eager) on the same weights.

Both sides run through the same captioning runner, with the same video decoding and the
same preprocessing (ours, equal to the transformers processors), so only the model
differs. Rows: one forward (8 images + prompt), and captioning 16 videos end to end
at batch 1 and 8 (beam 5, 32 new tokens at most, 5 at least, 8 frames).
Ours runs in PyNative and under ms.jit; compile time is reported apart (first call).
The weights are random and large, so activations reach the hundreds and fp32 rounding
(relative 1e-6 per layer) can flip a near-tie in beam search: the table counts the
captions equal to torch's rather than requiring all (tests check exact parity).

Qwen2-VL, Qwen2.5-VL and LLaVA (``--models qwen2-vl,qwen2.5-vl,llava``) are built in
benchmarks/families.py: greedy, 32 new tokens at most, Qwen2-VL and Qwen2.5-VL 8 frames at 224x224,
LLaVA one middle frame at 336 px (see there why). Their forward row's "ours jit" compiles the vision encoder (the LM forward is PyNative);
their captioning rows generate under ms.jit as the BLIP-2 ones do.

    python -m benchmarks.bench_captioning [--videos 16] [--output benchmarks/results/captioning.json]
    python -m benchmarks.bench_captioning --models qwen2-vl,llava --output benchmarks/results/captioning_vlm.json
    python -m benchmarks.bench_captioning --models qwen2.5-vl --videos 8 --output benchmarks/results/qwen2_5_vl.json
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import mindspore as ms
import numpy as np
import pandas as pd
import torch

from pipeline import distributed
from pipeline.captioning.caption_blip2 import Blip2Captioner
from pipeline.captioning.runner import RunOptions, run
from benchmarks.families import FAMILIES
from tests.tiny_models import hf_blip2, save_word_tokenizer

logger = logging.getLogger("bench")

# "Tiny but not trivial": vision 12 x 384 at 224 px, Q-Former 4 layers, OPT 6 x 512 (and T5 6+6 x 512).
VISION = dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6,
              image_size=224, patch_size=14, qkv_bias=True)
QFORMER = dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=6,
               cross_attention_frequency=2, encoder_hidden_size=384)
TEXT = {
    "blip2-opt": dict(model_type="opt", vocab_size=2000, hidden_size=512, ffn_dim=2048, num_hidden_layers=6,
                      num_attention_heads=8, max_position_embeddings=256, word_embed_proj_dim=512,
                      pad_token_id=1, bos_token_id=2, eos_token_id=2),
    "blip2-t5": dict(model_type="t5", vocab_size=2000, d_model=512, d_kv=64, d_ff=1024, num_layers=6,
                     num_heads=8, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                     pad_token_id=0, eos_token_id=1, decoder_start_token_id=0),
}
GENERATE = dict(num_beams=5, max_new_tokens=32, min_new_tokens=5)
NUM_FRAMES = 8


def make_videos(folder: Path, count: int) -> Path:
    sources = ["testsrc=decimals=0", "mandelbrot", "color=c=red", "cellauto=rule=30", "life=ratio=0.2",
               "rgbtestsrc", "smptebars", "color=c=blue"]
    rows = []
    for i in range(count):
        path = folder / f"clip{i:02d}.mp4"
        source = sources[i % len(sources)]
        sep = ":" if "=" in source else "="
        subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
                        f"{source}{sep}size=320x240:rate=10", "-t", "3", "-pix_fmt", "yuv420p", str(path)],
                       check=True, timeout=120)
        rows.append({"path": path.name})
    pd.DataFrame(rows).to_csv(folder / "videos.csv", index=False)
    return folder / "videos.csv"


def save_checkpoint(name: str, folder: Path) -> Path:
    text = TEXT[name]
    hf_blip2(text, image_token=True, seed=0, vision=VISION, qformer=QFORMER, num_query_tokens=32) \
        .save_pretrained(folder)
    specials = ({"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3} if text["model_type"] == "opt"
                else {"<pad>": 0, "</s>": 1, "<unk>": 2})
    save_word_tokenizer(folder, text["vocab_size"], specials)
    return folder


class TorchCaptioner:
    """The reference: transformers' Blip2ForConditionalGeneration.generate behind the same interface."""

    def __init__(self, ours: Blip2Captioner, folder: Path):
        from transformers import Blip2ForConditionalGeneration

        self.model = Blip2ForConditionalGeneration.from_pretrained(folder).eval()
        self.frame_spec = ours.frame_spec
        self.prepare = ours.processor
        self.prompt_ids = ours.prompt_ids
        self.tokenizer = ours.tokenizer

    def generate(self, batch: Sequence[np.ndarray]) -> list[str]:
        ids = torch.tensor([self.prompt_ids] * len(batch))
        pixels = torch.from_numpy(np.stack(batch))
        with torch.no_grad():  # transformers' BLIP-2 takes images only: frames in, one set of queries per frame
            embeds = self._video_embeds(pixels)
            out = self._generate_from(embeds, ids)
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]

    def _video_embeds(self, pixels: torch.Tensor) -> torch.Tensor:
        """Vision encoder on B*T frames, all frames' tokens to one set of queries, projection."""
        b, t = pixels.shape[:2]
        tokens = self.model.vision_model(pixel_values=pixels.flatten(0, 1)).last_hidden_state
        tokens = tokens.reshape(b, -1, tokens.shape[-1])
        queries = self.model.query_tokens.expand(b, -1, -1)
        q = self.model.qformer(query_embeds=queries, encoder_hidden_states=tokens).last_hidden_state
        return self.model.language_projection(q)

    def _generate_from(self, image_embeds: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        lm = self.model.language_model
        embeds = lm.get_input_embeddings()(ids)
        mask = ids == self.model.config.image_token_index
        embeds[mask] = image_embeds.reshape(-1, embeds.shape[-1])
        out = lm.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(ids), do_sample=False, **GENERATE)
        return out


def timed(fn: Callable, repeats: int = 3) -> tuple[float, float]:
    """(first call seconds, best of the following ``repeats`` calls)."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return first, min(times)


def bench_forward(ours: Blip2Captioner, ref: TorchCaptioner) -> list[dict]:
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((8, 3, 224, 224)).astype(np.float32)
    ids = np.array([ours.prompt_ids] * 8, np.int64)
    mask = np.ones_like(ids)
    rows = []
    with torch.no_grad():
        _, best = timed(lambda: ref.model(pixel_values=torch.from_numpy(pixels), input_ids=torch.from_numpy(ids),
                                          attention_mask=torch.from_numpy(mask),
                                          **_t5_decoder(ref.model, ids)))
    rows.append({"case": "forward 8 images", "impl": "torch eager", "seconds": best})
    for use_jit in (False, True):
        ours.model.use_jit = use_jit
        first, best = timed(lambda: ours.model(pixel_values=pixels, input_ids=ids, attention_mask=mask,
                                               **_t5_decoder_np(ours.model, ids)).logits.asnumpy())
        rows.append({"case": "forward 8 images", "impl": "ours jit" if use_jit else "ours pynative",
                     "seconds": best, "first_call_seconds": first})
    return rows


def bench_family(name: str, folder: Path) -> tuple:
    """Qwen2-VL / LLaVA (benchmarks/families.py): the captioners and the forward rows."""
    folder.mkdir(parents=True, exist_ok=True)
    ours, ref, case, torch_forward, ours_forward = FAMILIES[name](folder)
    with torch.no_grad():
        _, best = timed(torch_forward)
    rows = [{"case": case, "impl": "torch eager", "seconds": best}]
    for use_jit in (False, True):  # ends with the vision encoder compiled, as generation uses it
        first, best = timed(ours_forward(use_jit))
        rows.append({"case": case, "impl": "ours jit" if use_jit else "ours pynative", "seconds": best,
                     "first_call_seconds": first})
    return ours, ref, rows


def _t5_decoder_np(model, ids: np.ndarray) -> dict:
    return {} if model.is_decoder_only else {"decoder_input_ids": np.zeros((ids.shape[0], 4), np.int64)}


def _t5_decoder(model, ids: np.ndarray) -> dict:
    return {} if model.config.use_decoder_only_language_model else {
        "decoder_input_ids": torch.zeros((ids.shape[0], 4), dtype=torch.long)}


def bench_captioning(captioner, csv_path: Path, bs: int, label: str, out_dir: Path) -> dict:
    """Caption every video through the runner; the first batch is a warm-up (compilation) outside the timing."""
    spec = captioner.frame_spec  # the warm-up frames get the shapes the run's frames will have
    frames = np.zeros((spec.num_frames, spec.height or 240, spec.width or 320, 3), np.uint8)
    warm = [captioner.prepare(frames)] * bs
    start = time.perf_counter()
    captioner.generate(warm)
    warmup = time.perf_counter() - start
    summary = run(captioner, RunOptions(input=str(csv_path), output=str(out_dir / f"{label}_bs{bs}.csv"),
                                        bs=bs, num_workers=2, overwrite=True))
    return {"case": f"caption {summary.done} videos bs{bs}", "impl": label, "seconds": summary.seconds,
            "videos_per_second": summary.videos_per_second, "model_seconds": summary.model_seconds,
            "warmup_seconds": warmup}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=16, help="videos to caption per row")
    parser.add_argument("--models", default="blip2-opt,blip2-t5",
                        help="comma-separated: " + ",".join([*TEXT, *FAMILIES]))
    parser.add_argument("--batch_sizes", default="1,8")
    parser.add_argument("--output", default="benchmarks/results/captioning.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if shutil.which("ffmpeg") is None:
        raise SystemExit("ffmpeg is needed to make the benchmark videos (apt-get install ffmpeg)")
    distributed.setup("CPU")
    torch.set_num_threads(2)
    torch.manual_seed(0)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        csv_path = make_videos(tmp, args.videos)
        for name in args.models.split(","):
            if name in FAMILIES:
                ours, ref, rows = bench_family(name, tmp / name)
            else:
                folder = save_checkpoint(name, tmp / name)
                ours = Blip2Captioner(str(folder), num_frames=NUM_FRAMES, **GENERATE)
                ref = TorchCaptioner(ours, folder)
                rows = bench_forward(ours, ref)
                ours.model.use_jit = True
            for bs in (int(b) for b in args.batch_sizes.split(",")):
                rows.append(bench_captioning(ref, csv_path, bs, "torch eager", tmp))
                rows.append(bench_captioning(ours, csv_path, bs, "ours jit", tmp))
                theirs = pd.read_csv(tmp / f"torch eager_bs{bs}.csv")["text"].tolist()
                mine = pd.read_csv(tmp / f"ours jit_bs{bs}.csv")["text"].tolist()
                rows[-1]["captions_equal_reference"] = f"{sum(a == b for a, b in zip(theirs, mine))}/{len(mine)}"
            for row in rows:
                row["model"] = name
            results += rows
    report(results, Path(args.output))


def report(results: list[dict], output: Path) -> None:
    reference = {(r["model"], r["case"]): r["seconds"] for r in results if r["impl"] == "torch eager"}
    print(f"{'model':10} {'case':26} {'impl':14} {'seconds':>9} {'vs torch':>9}  notes")
    for r in results:
        ratio = reference[(r["model"], r["case"])] / r["seconds"]
        r["speedup_vs_torch"] = ratio
        notes = []
        if "first_call_seconds" in r:
            notes.append(f"first call {r['first_call_seconds']:.1f}s")
        if "warmup_seconds" in r:
            notes.append(f"warm-up batch {r['warmup_seconds']:.1f}s, {r['videos_per_second']:.2f} videos/s")
        if "captions_equal_reference" in r:
            notes.append(f"{r['captions_equal_reference']} captions equal torch's")
        print(f"{r['model']:10} {r['case']:26} {r['impl']:14} {r['seconds']:9.2f} {ratio:8.2f}x  {', '.join(notes)}")
    output.parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
            "mindspore": ms.__version__, "torch_threads": torch.get_num_threads()}
    output.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"results written to {output}")


if __name__ == "__main__":
    main()
