"""Caption videos with PLLaVA (ermu2001/pllava-7b/13b/34b).

``--num_frames`` frames (default 4) go through the CLIP tower one by one; their projected features
are average-pooled to ``--pooling_shape`` (default: num_frames x the checkpoint's 12 x 12, as
PLLaVA's own captioning uses) and fill the single ``<image>`` of the prompt. A batch of videos is one
left-padded generate call. LoRA deltas of the published weights are merged at load time (scale
lora_alpha / r with lora_alpha 4 as PLLaVA's scripts use; a ``lora_alpha`` key in config.json overrides).
"""
from __future__ import annotations

import argparse
from typing import Sequence

import numpy as np

from models.llava import PllavaForConditionalGeneration
from models.llava.processing import PllavaFrameProcessor
from pipeline.captioning.budget import PreparedVideo
from pipeline.captioning.caption_llava import LlavaCaptioner, add_generation_flags
from pipeline.captioning.cli import common_parser, generation_options, loop_options, main_with
from pipeline.captioning.runner import RunSummary
from pipeline.config import CONFIG_DIR, ConfigError

BASE_CONFIG = CONFIG_DIR / "captioning" / "pllava.yaml"


def parse_pooling_shape(text: str) -> tuple[int, int, int]:
    """"T-H-W" (e.g. 4-12-12) -> (T, H, W)."""
    parts = text.replace("x", "-").split("-")
    if len(parts) != 3 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"pooling shape must be T-H-W positive integers, got {text!r}")
    return tuple(int(p) for p in parts)


class PllavaCaptioner(LlavaCaptioner):
    """LlavaCaptioner whose prompt has one ``<image>`` for the whole pooled video."""

    def __init__(self, folder: str, dtype: str = "float32", pooling_shape: Sequence[int] | None = None, **kwargs):
        self.pooling_shape = pooling_shape
        super().__init__(folder, dtype, **kwargs)
        tokens = self.model.image_token_count(self.num_frames)
        if tokens > self.budget:
            raise ConfigError(f"--pooling_shape {'-'.join(map(str, self.model.pooling_shape))} gives {tokens} "
                              f"visual tokens, more than the budget of {self.budget} (the context after the prompt "
                              "and --max_new_tokens, or --max_visual_tokens); choose a smaller pooling shape")

    def build_processor(self, folder: str) -> PllavaFrameProcessor:
        if not isinstance(self.model, PllavaForConditionalGeneration):
            raise ConfigError(f"{folder} is not a PLLaVA checkpoint (config.json has no pooling_shape); "
                              "use pipeline/captioning/caption_llava.py")
        model = self.model
        model.pooling_shape = tuple(self.pooling_shape or (self.num_frames,) + tuple(model.pooling_shape[1:]))
        return PllavaFrameProcessor.from_pretrained(folder, model.config.vision_config.image_size)

    def images_in_prompt(self) -> int:
        """One ``<image>`` for the whole video, as PLLaVA's prompts have."""
        return 1

    def prepare(self, frames: np.ndarray, budget: int | None = None) -> PreparedVideo:
        """All ``num_frames`` frames: the pooled token count is fixed by ``pooling_shape`` (checked at start)."""
        return PreparedVideo(self.processor(frames), frames, self.budget, len(frames),
                             self.model.image_token_count(self.num_frames))

    def shrink(self, video: PreparedVideo) -> None:
        """Pooled videos cannot shrink per video (the pooling shape is compiled for the run)."""
        return None

    def model_inputs(self, batch: Sequence[PreparedVideo], prompts: Sequence[str] | None = None
                     ) -> tuple[list[list[int]], dict]:
        count = [self.model.image_token_count(self.num_frames)]
        ids = [self.expand(count, text) for text in prompts] if prompts else [self.expand(count)] * len(batch)
        return ids, dict(pixel_values=np.stack([video.inputs for video in batch]))


def build_parser() -> argparse.ArgumentParser:
    p = common_parser(
        "Caption videos with PLLaVA (ermu2001/pllava-*): frame features pooled over time and space.",
        epilog=f"defaults come from {BASE_CONFIG.relative_to(CONFIG_DIR.parent)}\n"
               "example:\n  python -m pipeline.captioning.caption_pllava meta.csv "
               "--pretrained_model_name_or_path /models/pllava-7b --num_frames 4 --bs 8")
    add_generation_flags(p)
    p.add_argument("--pooling_shape", type=parse_pooling_shape,
                   help="pooled T-H-W grid (default: num_frames-12-12, i.e. the checkpoint's spatial size)")
    return p


def build_captioner(args: argparse.Namespace, dtype: str) -> PllavaCaptioner:
    if not args.pretrained_model_name_or_path:
        raise FileNotFoundError("--pretrained_model_name_or_path is required: a local PLLaVA checkpoint folder")
    return PllavaCaptioner(args.pretrained_model_name_or_path, dtype, pooling_shape=args.pooling_shape,
                           question=args.question, num_frames=args.num_frames, max_new_tokens=args.max_new_tokens,
                           num_beams=args.num_beams, prompt_template=args.prompt_template,
                           max_visual_tokens=args.max_visual_tokens, generation=generation_options(args),
                           tp_size=args.tp_size, **loop_options(args))


def main(argv: Sequence[str] | None = None) -> RunSummary:
    return main_with(build_parser(), build_captioner, argv, base_config=BASE_CONFIG)


if __name__ == "__main__":
    main()
