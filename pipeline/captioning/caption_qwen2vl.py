"""Caption videos with Qwen2-VL (Qwen/Qwen2-VL-{2B,7B,72B}-Instruct).

Frames are sampled at ``--fps`` over the whole video (or ``--num_frames`` uniformly) and resized
to ``--height`` x ``--width``; the question goes through the checkpoint's chat template with one
video entry, whose ``<|video_pad|>`` is expanded to one token per merged vision patch
(grid_t * grid_h * grid_w / 4). A batch of videos is one left-padded greedy generate call that
stops each row at the checkpoint's EOS tokens (``<|im_end|>``, ``<|endoftext|>``).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import numpy as np

from models import from_pretrained
from models.qwen2_vl.processing import Qwen2VLVisionProcessor
from pipeline.captioning.cli import common_parser, main_with
from pipeline.captioning.runner import FrameSpec, RunSummary
from pipeline.config import CONFIG_DIR

BASE_CONFIG = CONFIG_DIR / "captioning" / "qwen2vl.yaml"
VIDEO_PAD = "<|video_pad|>"


class Qwen2VLCaptioner:
    """Prepares (patch rows, grid, prompt ids) per video in worker threads; captions a batch in one call."""

    def __init__(self, folder: str, dtype: str = "float32", question: str = "Describe the video in detail",
                 fps: float = 4.0, num_frames: int | None = None, max_frames: int = 768, height: int = 448,
                 width: int = 672, max_new_tokens: int = 200, pad_to_multiple_of: int = 64):
        from transformers import AutoTokenizer, GenerationConfig

        self.model = from_pretrained(folder, dtype=dtype)
        self.processor = Qwen2VLVisionProcessor.from_pretrained(folder)
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        if num_frames:
            self.frame_spec = FrameSpec(num_frames=num_frames, height=height, width=width)
        else:
            self.frame_spec = FrameSpec(num_frames=max_frames, fps=fps, height=height, width=width)
        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if text.count(VIDEO_PAD) != 1:
            raise ValueError(f"the chat template should place one {VIDEO_PAD} for a video entry, got {text!r}")
        # Tokenised once here (the workers only splice ids): the placeholder is a special token,
        # so prefix + pads + suffix equals tokenising the expanded text.
        ids = self.tokenizer(text)["input_ids"]
        at = ids.index(self.model.config.video_token_id)
        self.prefix, self.suffix = ids[:at], ids[at + 1:]
        gen = GenerationConfig.from_pretrained(folder) if (Path(folder) / "generation_config.json").is_file() \
            else self.model.config
        eos = gen.eos_token_id if gen.eos_token_id is not None else self.tokenizer.eos_token_id
        pad = gen.pad_token_id if gen.pad_token_id is not None else self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (eos[0] if isinstance(eos, list) else eos)
        self.generate_kwargs = dict(max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=self.pad_id,
                                    pad_to_multiple_of=pad_to_multiple_of)

    def prepare(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[int]]:
        rows, grid = self.processor.video(frames)
        tokens = [self.model.config.video_token_id] * self.processor.num_tokens(grid[0])
        return rows, grid, self.prefix + tokens + self.suffix

    def generate(self, batch: Sequence[tuple[np.ndarray, np.ndarray, list[int]]]) -> list[str]:
        width = max(len(ids) for _, _, ids in batch)
        input_ids = np.array([[self.pad_id] * (width - len(ids)) + ids for _, _, ids in batch], np.int64)
        mask = np.array([[0] * (width - len(ids)) + [1] * len(ids) for _, _, ids in batch], np.int64)
        out = self.model.generate(input_ids, mask, pixel_values_videos=np.concatenate([b[0] for b in batch]),
                                  video_grid_thw=np.concatenate([b[1] for b in batch]), **self.generate_kwargs)
        texts = self.tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        return [text.strip() for text in texts]


def build_parser() -> argparse.ArgumentParser:
    p = common_parser(
        "Caption videos with Qwen2-VL (Qwen/Qwen2-VL-*-Instruct).",
        epilog=f"defaults come from {BASE_CONFIG.relative_to(CONFIG_DIR.parent)}\n"
               "example:\n  msrun --worker_num=8 --local_worker_num=8 --join=True "
               "pipeline/captioning/caption_qwen2vl.py meta.csv "
               "--pretrained_model_name_or_path /models/Qwen2-VL-7B-Instruct --bs 8")
    p.add_argument("--fps", type=float, help="frames sampled per second of video (unless --num_frames is given)")
    p.add_argument("--max_frames", type=int, help="at most this many frames per video with --fps sampling")
    p.add_argument("--height", type=int, help="frame height before patching (a multiple of 28 avoids a resize)")
    p.add_argument("--width", type=int, help="frame width before patching (a multiple of 28 avoids a resize)")
    p.add_argument("--pad_to_multiple_of", type=int,
                   help="left-pad prompts to a multiple of this many tokens so similar lengths share one "
                        "compiled graph (1: no padding)")
    return p


def build_captioner(args: argparse.Namespace, dtype: str) -> Qwen2VLCaptioner:
    if not args.pretrained_model_name_or_path:
        raise FileNotFoundError("--pretrained_model_name_or_path is required: a local Qwen2-VL checkpoint folder")
    return Qwen2VLCaptioner(args.pretrained_model_name_or_path, dtype, question=args.question, fps=args.fps,
                            num_frames=args.num_frames, max_frames=args.max_frames, height=args.height,
                            width=args.width, max_new_tokens=args.max_new_tokens,
                            pad_to_multiple_of=args.pad_to_multiple_of)


def main(argv: Sequence[str] | None = None) -> RunSummary:
    return main_with(build_parser(), build_captioner, argv, base_config=BASE_CONFIG)


if __name__ == "__main__":
    main()
