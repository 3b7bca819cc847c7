"""Caption videos with LLaVA-1.5 (llava-hf/llava-1.5-*, xtuner/llava-llama-3-8b-v1_1-transformers) or
LLaVA-NeXT (llava-hf/llava-v1.6-*).

Frames are images: each sampled frame is one ``<image>`` of the prompt (``--num_frames 1``, the
default, is the middle frame). Every ``<image>`` becomes as many image tokens as the model has
features for it, as transformers' processors expand it. A batch of videos is one left-padded
generate call. When the frames would need more than ``--max_visual_tokens`` (default: what the
context holds after the prompt and the reply), fewer frames, evenly spread, are used; out of
memory, the runner retries a video once with half the budget (:meth:`LlavaCaptioner.shrink`).
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from models import from_pretrained
from models.checkpoint import load_tokenizer
from models.generation import left_pad
from models.llava import LlavaNextForConditionalGeneration, PllavaForConditionalGeneration
from models.llava.processing import ClipFrameProcessor, LlavaNextFrameProcessor
from pipeline.captioning.budget import (BUDGET_COLUMNS, BudgetError, PreparedVideo, context_budget,
                                        uniform_subset)
from pipeline.captioning.chat import Turn, template_chat, template_messages, with_token_counts
from pipeline.captioning.cli import LoopGuard, common_parser, generation_options, loop_options, main_with
from pipeline.captioning.results import TRUNCATED_COLUMN, caption_answers, stopped_rows
from pipeline.captioning.runner import FrameSpec, RunSummary
from pipeline.config import CONFIG_DIR, ConfigError

BASE_CONFIG = CONFIG_DIR / "captioning" / "llava.yaml"
IMAGE = "<image>"
# later user turns of a conversation when the tokenizer has no chat template (LLaVA-1.5's Vicuna format)
FOLLOW_UP = "USER: {question} ASSISTANT:"

logger = logging.getLogger(__name__)


def generation_eos(folder: str) -> int | list[int] | None:
    """``eos_token_id`` of the folder's generation_config.json: chat checkpoints (e.g. Llama-3's
    ``<|eot_id|>``) end a reply with a token other than the decoder config's EOS."""
    path = Path(folder) / "generation_config.json"
    return json.loads(path.read_text()).get("eos_token_id") if path.is_file() else None


class LlavaCaptioner:
    """Prepares frames with the checkpoint's image processor; captions a batch in one generate call."""

    extra_columns = (*BUDGET_COLUMNS, TRUNCATED_COLUMN)

    def __init__(self, folder: str, dtype: str = "float32", question: str = "Describe the video in detail",
                 num_frames: int = 1, max_new_tokens: int = 200, num_beams: int = 1,
                 prompt_template: str = "USER: <image>\n{question} ASSISTANT:", max_visual_tokens: int | None = None,
                 generation: dict | None = None, tp_size: int = 1, stop_repetition: bool = False,
                 loop_retry_seed: int | None = None):
        """``stop_repetition``, ``loop_retry_seed``: loop-proof decoding (``pipeline.captioning.cli.LoopGuard``)."""
        self.tokenizer = load_tokenizer(folder)  # first: a broken folder fails before the model loads
        self.model = from_pretrained(folder, dtype=dtype, tp_size=tp_size)
        self.num_frames = num_frames
        self.frame_spec = FrameSpec(num_frames=num_frames)
        self.processor = self.build_processor(folder)
        self.image_token = self.model.config.image_token_index
        self.prompt_template = prompt_template
        self.prompt_text = prompt_template.format(question=question)
        self.prompts = {self.images_in_prompt(): self.tokenize_prompt(self.prompt_text, self.images_in_prompt())}
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.model.config.text_config.pad_token_id or 0)
        self.generate_kwargs = dict(max_new_tokens=max_new_tokens, num_beams=num_beams, **(generation or {}))
        eos = generation_eos(folder)
        if eos is not None:
            self.generate_kwargs["eos_token_id"] = eos
        loops = LoopGuard.build(folder, self.tokenizer, stop_repetition, loop_retry_seed)
        self.generate_kwargs.update(loops.kwargs)
        self.extra_columns, self.loop_retry = (*self.extra_columns, *loops.columns), loops.retry
        text_tokens = len(self.prompts[self.images_in_prompt()]) - self.images_in_prompt()
        self.budget = context_budget(self.model.config.text_config.max_position_embeddings, text_tokens,
                                     max_new_tokens, max_visual_tokens)

    def build_processor(self, folder: str) -> ClipFrameProcessor:
        """The checkpoint's image processor: CLIP's, or LLaVA-NeXT's tiles."""
        size = self.model.config.vision_config.image_size
        if isinstance(self.model, LlavaNextForConditionalGeneration):
            return LlavaNextFrameProcessor.from_pretrained(folder, size, self.model.config.image_grid_pinpoints)
        return ClipFrameProcessor.from_pretrained(folder, size)

    def images_in_prompt(self) -> int:
        """``<image>`` markers in the prompt: one per frame."""
        return self.num_frames

    def tokenize_prompt(self, prompt: str, markers: int) -> list[int]:
        """Prompt ids with ``markers`` image tokens (``<image>`` repeated, one per line)."""
        if IMAGE not in prompt:
            raise ConfigError(f"the prompt template needs an {IMAGE} marker: {prompt!r}")
        prompt = prompt.replace(IMAGE, "\n".join([IMAGE] * markers), 1)
        ids = self.tokenizer(prompt)["input_ids"]
        found = sum(i == self.image_token for i in ids)
        if found != markers:
            raise ConfigError(f"the tokenizer turned {markers} {IMAGE} markers into {found} "
                             f"image tokens ({self.image_token}); it must know {IMAGE} as one special token")
        return ids

    def expand(self, counts: Sequence[int], prompt: str | None = None) -> list[int]:
        """The prompt (default: the fixed one) for ``len(counts)`` images with its k-th image token
        repeated counts[k] times."""
        markers = len(counts)
        if prompt is not None:
            ids = self.tokenize_prompt(prompt, markers)
        else:
            if markers not in self.prompts:
                self.prompts[markers] = self.tokenize_prompt(self.prompt_text, markers)
            ids = self.prompts[markers]
        counts = iter(counts)
        out: list[int] = []
        for i in ids:
            out += [i] * next(counts) if i == self.image_token else [i]
        return out

    def tokens_per_frame(self, frame: np.ndarray) -> int:
        if isinstance(self.model, LlavaNextForConditionalGeneration):
            return self.model.image_token_count(frame.shape[:2])
        return self.model.image_token_count()

    def prepare(self, frames: np.ndarray, budget: int | None = None) -> PreparedVideo:
        """Frames -> pixel inputs, with as many frames (evenly spread) as ``budget`` tokens allow."""
        budget = budget or self.budget
        per_frame = self.tokens_per_frame(frames[0])
        keep = min(len(frames), budget // per_frame)
        if keep < 1:
            raise BudgetError(f"one frame needs {per_frame} visual tokens, more than the budget of {budget}; "
                              "raise --max_visual_tokens, or lower --max_new_tokens when the context is the limit")
        if keep < len(frames):
            logger.info("%d frames need %d visual tokens, budget %d: keeping %d frames",
                        len(frames), len(frames) * per_frame, budget, keep)
            frames = frames[uniform_subset(len(frames), keep)]
        return PreparedVideo(self.processor(frames), frames, budget, keep, keep * per_frame)

    def shrink(self, video: PreparedVideo) -> PreparedVideo | None:
        """The same video at half its budget (after running out of memory), or None when nothing fits."""
        try:
            smaller = self.prepare(video.frames, max(1, video.budget // 2))
        except BudgetError:
            return None
        return smaller if smaller.visual_tokens < video.visual_tokens else None

    def model_inputs(self, batch: Sequence[PreparedVideo], prompts: Sequence[str] | None = None
                     ) -> tuple[list[list[int]], dict]:
        """Per-video prompt ids (from ``prompts``, default the fixed prompt) and the model's pixel inputs."""
        texts = prompts or [None] * len(batch)
        if isinstance(self.model, LlavaNextForConditionalGeneration):
            sizes = np.concatenate([video.inputs[1] for video in batch])
            tiles = max(video.inputs[0].shape[1] for video in batch)
            pixels = np.concatenate([np.pad(p, ((0, 0), (0, tiles - p.shape[1])) + ((0, 0),) * 3)
                                     for p, _ in (video.inputs for video in batch)])
            ids = [self.expand([self.model.image_token_count(s) for s in video.inputs[1]], text)
                   for video, text in zip(batch, texts)]
            return ids, dict(pixel_values=pixels, image_sizes=sizes)
        count = self.model.image_token_count()
        ids = [self.expand([count] * video.num_frames_used, text) for video, text in zip(batch, texts)]
        return ids, dict(pixel_values=np.concatenate([video.inputs for video in batch]))

    def chat_prompt(self, turns: Sequence[Turn]) -> str:
        """The conversation through the tokenizer's chat template (one ``<image>`` for the video), else
        ``--prompt_template`` for the video's turn and LLaVA-1.5's format for later ones."""
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(template_messages(turns, {"type": "image"}), tokenize=False,
                                                      add_generation_prompt=True)
        return template_chat(turns, self.prompt_template, FOLLOW_UP, IMAGE, end=self.tokenizer.eos_token or "")

    def generate(self, batch: Sequence[PreparedVideo], prompts: Sequence[str] | None = None,
                 options: dict | None = None) -> list[dict]:
        """Captions (or, with per-video ``prompts`` and ``options``, replies with token counts); see
        :mod:`pipeline.captioning.chat`."""
        prompt_ids, pixels = self.model_inputs(batch, prompts)
        input_ids, mask = left_pad(prompt_ids, self.pad_id)
        kwargs = {**self.generate_kwargs, **(options or {})}
        out = self.model.generate(input_ids=input_ids, attention_mask=mask, **pixels, return_dict_in_generate=True,
                                  **kwargs)
        ids = out.sequences[:, input_ids.shape[1]:]
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        eos = kwargs.get("eos_token_id", self.model.config.text_config.eos_token_id)
        answers = caption_answers(texts, ids, eos, kwargs["max_new_tokens"], stopped_rows(out, kwargs))
        if prompts is not None:
            answers = with_token_counts(answers, [len(p) for p in prompt_ids], ids, eos)
        return [{**answer, **video.columns()} for answer, video in zip(answers, batch)]


def add_generation_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt_template", help="the prompt around the question: {question} and one <image> marker "
                                             "(replaced by the frames); match the checkpoint's chat format")
    p.add_argument("--num_beams", type=int, help="beam search width (1: greedy)")
    p.add_argument("--max_visual_tokens", type=int,
                   help="most image tokens per video (default: what the checkpoint's context holds after the "
                        "prompt and --max_new_tokens, at most 24576); a video that needs more keeps fewer frames")


def build_parser() -> argparse.ArgumentParser:
    p = common_parser(
        "Caption videos with LLaVA-1.5 or LLaVA-NeXT (llava-hf/llava-1.5-*, llava-hf/llava-v1.6-*, "
        "xtuner/llava-llama-3-8b-v1_1-transformers); each sampled frame is one image of the prompt.",
        epilog=f"defaults come from {BASE_CONFIG.relative_to(CONFIG_DIR.parent)}\n"
               "example:\n  python -m pipeline.captioning.caption_llava meta.csv "
               "--pretrained_model_name_or_path /models/llava-1.5-7b-hf --bs 8\n"
               "  LLaVA-NeXT Mistral: --prompt_template '[INST] <image>\\n{question} [/INST]'")
    add_generation_flags(p)
    return p


def build_captioner(args: argparse.Namespace, dtype: str) -> LlavaCaptioner:
    if not args.pretrained_model_name_or_path:
        raise FileNotFoundError("--pretrained_model_name_or_path is required: a local LLaVA checkpoint folder")
    captioner = LlavaCaptioner(args.pretrained_model_name_or_path, dtype, question=args.question,
                               num_frames=args.num_frames, max_new_tokens=args.max_new_tokens,
                               num_beams=args.num_beams, prompt_template=args.prompt_template,
                               max_visual_tokens=args.max_visual_tokens, generation=generation_options(args),
                               tp_size=args.tp_size, **loop_options(args))
    if isinstance(captioner.model, PllavaForConditionalGeneration):
        raise ConfigError("this checkpoint is PLLaVA: use pipeline/captioning/caption_pllava.py")
    return captioner


def main(argv: Sequence[str] | None = None) -> RunSummary:
    return main_with(build_parser(), build_captioner, argv, base_config=BASE_CONFIG)


if __name__ == "__main__":
    main()
