"""Caption videos with Qwen2-VL (Qwen/Qwen2-VL-{2B,7B,72B}-Instruct), Qwen2.5-VL
(Qwen/Qwen2.5-VL-{3B,7B,32B,72B}-Instruct) or Qwen3-VL, dense (Qwen/Qwen3-VL-{2B,4B,8B,32B}-Instruct) or MoE
(Qwen/Qwen3-VL-{30B-A3B,235B-A22B}-Instruct), Qwen3.5 and Qwen3.6 (``model_type`` qwen3_5 / qwen3_5_moe, which
caption exactly as Qwen3-VL: its processor, video rules, timestamps and preset), and their -FP8 releases: the
checkpoint's config.json picks the model, and for Qwen3-VL and Qwen3.5 the defaults
(``configs/captioning/qwen3_vl.yaml``).

Frames are sampled at ``--fps`` over the whole video (or ``--num_frames`` uniformly) and resized
to ``--height`` x ``--width``; the question goes through the checkpoint's chat template with one
video entry, whose ``<|video_pad|>`` is expanded to one token per merged vision patch
(grid_t * grid_h * grid_w / 4). A batch of videos is one left-padded greedy generate call that
stops each row at the checkpoint's EOS tokens (``<|im_end|>``, ``<|endoftext|>``).

A video whose frames would need more than ``--max_visual_tokens`` (default: what the context
holds, see ``pipeline.captioning.budget``) keeps fewer frames, evenly spread (a lower frame rate),
down to ``--min_frames`` (default ``MIN_FRAMES``); only then is the resolution lowered. Out of memory,
the runner retries a video once at half its budget (:meth:`Qwen2VLCaptioner.shrink`).

The runner gives ``prepare`` the sampled frames' real start times (``frame_times``, seconds from the
first frame of the row's segment or window: a segment is timed as a clip of its own, as Qwen's
processors time the clip they are given), so variable frame rates, ``--num_frames``, segments and
windows, and ``--max_frames`` caps keep true time. Without times (the server's videos and images)
the frames are taken as sampled at ``--fps`` (with ``--num_frames``, Qwen2.5-VL's processor default
of 2 fps); so are frames that all show one instant (a still image). Qwen2.5-VL turns the times into
each video's ``second_per_grid_ts`` (seconds per temporal patch); Qwen3-VL writes the video as one
timestamped group per temporal patch (``models.qwen3_vl.processing``). Either way the times follow the
frames the budget keeps.

Qwen3-VL follows qwen-vl-utils: under ``--fps`` sampling a video gets at least ``--min_frames`` (4)
frames, a short clip's spread evenly over its duration (an odd count's last frame is repeated to fill
the final temporal patch); its frame size is 128 to ``--max_frame_tokens`` tokens per temporal patch,
about the checkpoint's total for the video, before ``--max_visual_tokens`` applies; and a budget may not
take a temporal patch below those 128 tokens, so a budget under the minimum frames at that floor makes
the video an error row (a ``BudgetError`` naming the numbers) rather than a caption of less.
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

from models import from_pretrained
from models.checkpoint import CheckpointError, load_tokenizer, read_config
from models.generation import left_pad
from models.qwen2_5_vl.processing import DEFAULT_FPS, Qwen2_5_VLVisionProcessor, sampled_fps
from models.qwen2_vl.processing import Qwen2VLVisionProcessor
from models.qwen3_vl.processing import FRAME_TOKENS, Qwen3VLVisionProcessor, patch_times, video_prompt_ids
from pipeline.captioning.budget import (BUDGET_COLUMNS, BudgetError, PreparedVideo, context_budget,
                                        uniform_subset)
from pipeline.captioning.chat import Turn, template_messages, with_token_counts
from pipeline.captioning.cli import (LoopGuard, checkpoint_decoding, common_parser, generation_options, loop_options,
                                     main_with)
from pipeline.captioning.results import TRUNCATED_COLUMN, caption_answers, stopped_rows
from pipeline.captioning.runner import FrameSpec, RunSummary
from pipeline.config import CONFIG_DIR, ConfigError

BASE_CONFIG = CONFIG_DIR / "captioning" / "qwen2vl.yaml"
QWEN3_VL_CONFIG = CONFIG_DIR / "captioning" / "qwen3_vl.yaml"
PROCESSORS = {"qwen2_vl": Qwen2VLVisionProcessor, "qwen2_5_vl": Qwen2_5_VLVisionProcessor,
              "qwen3_vl": Qwen3VLVisionProcessor, "qwen3_vl_moe": Qwen3VLVisionProcessor,
              "qwen3_5": Qwen3VLVisionProcessor, "qwen3_5_moe": Qwen3VLVisionProcessor}
# Qwen3-VL dense and MoE, and Qwen3.5 / Qwen3.6 (transformers maps them to Qwen3-VL's processor): the same
# video rules and timestamped prompt
QWEN3_VL_TYPES = ("qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe")
# Qwen3.5's chat template opens a reasoning block (<think>) after the assistant header unless told
# enable_thinking=False; a caption is the answer alone, so its prompts are rendered without thinking
NO_THINKING_TYPES = ("qwen3_5", "qwen3_5_moe")
VIDEO_PAD = "<|video_pad|>"
MIN_FRAMES = 4  # fewest frames a budget may leave (two temporal patches), and Qwen3-VL's fewest sampled

logger = logging.getLogger(__name__)


class VideoInputs(NamedTuple):
    """One video's model inputs; ``second_per_grid_t`` is None for Qwen2-VL."""

    pixel_values_videos: np.ndarray
    video_grid_thw: np.ndarray
    input_ids: list[int]
    second_per_grid_t: float | None


@dataclass
class TimedVideo(PreparedVideo):
    """A prepared video that keeps its frames' times, so a smaller re-preparation keeps its time scale."""

    frame_times: np.ndarray


class Qwen2VLCaptioner:
    """Prepares :class:`VideoInputs` per video in worker threads; captions a batch in one call."""

    extra_columns = (*BUDGET_COLUMNS, TRUNCATED_COLUMN)

    def __init__(self, folder: str, dtype: str = "float32", question: str = "Describe the video in detail",
                 fps: float = 4.0, num_frames: int | None = None, max_frames: int = 768, height: int = 448,
                 width: int = 672, max_new_tokens: int = 200, max_visual_tokens: int | None = None,
                 generation: dict | None = None, tp_size: int = 1, max_frame_tokens: int | None = None,
                 min_frames: int | None = None, stop_repetition: bool = False, loop_retry_seed: int | None = None):
        """``min_frames``: the fewest frames the budget may leave a video (default ``MIN_FRAMES``) and, for
        Qwen3-VL (or when given), the fewest ``fps`` sampling gives. ``stop_repetition``: generation ends a
        caption in a loop (the ``repetition`` and ``retried`` columns); ``loop_retry_seed``: such a caption is
        generated once more, sampling as the checkpoint recommends, from a generator of this seed (see
        ``pipeline.captioning.results``)."""
        if min_frames is not None and min_frames < 1:
            raise ConfigError(f"--min_frames must be at least 1 (got {min_frames})")
        model_type = read_config(folder).get("model_type")
        if model_type not in PROCESSORS:
            raise CheckpointError(f"{folder} holds a {model_type!r} model; this script captions with "
                                  "Qwen2-VL, Qwen2.5-VL, Qwen3-VL and Qwen3.5 / Qwen3.6 (dense and MoE)")
        self.tokenizer = load_tokenizer(folder)  # first: a broken folder fails before the model loads
        self.model = from_pretrained(folder, dtype=dtype, tp_size=tp_size)
        self.timed = model_type == "qwen2_5_vl"  # Qwen2.5-VL: time-based positions
        self.timestamps = model_type in QWEN3_VL_TYPES  # Qwen3-VL: a timestamp before each temporal patch
        self.template_options = {"enable_thinking": False} if model_type in NO_THINKING_TYPES else {}
        top = max_frame_tokens or FRAME_TOKENS[1]  # Qwen3-VL's per-patch range: [128 or less, top]
        options = {"frame_tokens": (min(FRAME_TOKENS[0], top), top)} if self.timestamps else {}
        self.processor = PROCESSORS[model_type].from_pretrained(folder, **options)
        self.min_frames = min_frames or MIN_FRAMES
        if num_frames:
            self.frame_spec = FrameSpec(num_frames=num_frames, height=height, width=width, times=True)
        else:
            sampled_min = min_frames or (MIN_FRAMES if self.timestamps else None)  # qwen-vl-utils' 4 frames
            self.frame_spec = FrameSpec(num_frames=max_frames, fps=fps, height=height, width=width,
                                        min_frames=sampled_min, times=True)
        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                  **self.template_options)
        if text.count(VIDEO_PAD) != 1:
            raise ValueError(f"the chat template should place one {VIDEO_PAD} for a video entry, got {text!r}")
        # Qwen2-VL and Qwen2.5-VL: tokenised once here (the workers only splice ids): the placeholder is a
        # special token, so prefix + pads + suffix equals tokenising the expanded text. Qwen3-VL's workers
        # tokenise the text with its timestamps (see timestamped_ids).
        self.prompt_text = text
        ids = self.tokenizer(text)["input_ids"]
        at = ids.index(self.model.config.video_token_id)
        self.prefix, self.suffix = ids[:at], ids[at + 1:]
        # The checkpoint's repetition controls (Qwen2-VL-Instruct sets repetition_penalty 1.05) apply, as
        # transformers applies them, unless a flag overrides them.
        decoding = checkpoint_decoding(folder, self.model.config, self.tokenizer)
        self.pad_id = decoding["pad_token_id"]
        self.generate_kwargs = dict(max_new_tokens=max_new_tokens, **{**decoding, **(generation or {})})
        loops = LoopGuard.build(folder, self.tokenizer, stop_repetition, loop_retry_seed)
        self.generate_kwargs.update(loops.kwargs)
        self.extra_columns, self.loop_retry = (*self.extra_columns, *loops.columns), loops.retry
        max_positions = self.model.config.text_config.max_position_embeddings
        self.budget = context_budget(max_positions, len(self.prefix) + len(self.suffix), max_new_tokens,
                                     max_visual_tokens)

    def fit(self, frames: np.ndarray, budget: int) -> tuple[np.ndarray, int | None]:
        """Frames and per-frame pixel limit that keep the video within ``budget`` tokens: fewer frames
        first (down to ``min_frames``), then a lower resolution (Qwen3-VL: not below its per-patch floor).
        Raises BudgetError when nothing fits."""
        proc = self.processor
        count, height, width = frames.shape[:3]
        fewest = min(count, self.min_frames)
        t, h, w = proc.video_grid(count, height, width)
        per_group = h * w // proc.merge_size ** 2
        if self.timestamps and t * per_group > budget:
            self.check_least(fewest, height, width, budget)
        groups = max(budget // per_group, -(-fewest // proc.temporal_patch_size))
        if groups < t:
            keep = min(count, groups * proc.temporal_patch_size)
            logger.info("video of %d frames needs %d visual tokens, budget %d: keeping %d frames",
                        count, t * per_group, budget, keep)
            frames = frames[uniform_subset(count, keep)]
            t, h, w = proc.video_grid(keep, height, width)  # Qwen3-VL: fewer frames may each get more tokens
            per_group = h * w // proc.merge_size ** 2
        if t * per_group <= budget:
            return frames, None
        unit = (proc.patch_size * proc.merge_size) ** 2
        max_pixels = budget // t * unit
        if max_pixels:
            t, h, w = proc.video_grid(len(frames), height, width, max_pixels)
        if not max_pixels or t * h * w // proc.merge_size ** 2 > budget:
            raise BudgetError(f"the video cannot fit {budget} visual tokens even with {len(frames)} frames at the "
                              "smallest resolution; raise --max_visual_tokens or shorten the clip (--window_seconds)")
        logger.info("lowering the resolution to %dx%d to fit %d frames in %d tokens",
                    h * proc.patch_size, w * proc.patch_size, len(frames), budget)
        return frames, max_pixels

    def check_least(self, frames: int, height: int, width: int, budget: int) -> None:
        """Qwen3-VL: raise BudgetError when ``budget`` is below ``frames`` frames at the per-patch floor, so the
        row says what to raise instead of being captioned from less than Qwen's rule allows."""
        least = self.processor.least_tokens(frames, height, width)
        if budget < least:
            patches = -(-frames // self.processor.temporal_patch_size)
            raise BudgetError(f"the budget of {budget} visual tokens is too small for the minimum of {frames} "
                              f"frames: {patches} temporal patches of at least {least // patches} tokens need "
                              f"{least}; raise --max_visual_tokens to {least} or more (or lower --min_frames)")

    def prepare(self, frames: np.ndarray, budget: int | None = None,
                frame_times: np.ndarray | None = None) -> TimedVideo:
        """Model inputs within ``budget`` tokens; ``frame_times``: the frames' start times (seconds from the
        clip's, segment's or window's first frame), else (or when no time passes between them, as for a still
        image) the rate the frame spec samples at."""
        budget = budget or self.budget
        if frame_times is not None and len(frame_times) != len(frames):
            raise ValueError(f"{len(frame_times)} frame times for {len(frames)} frames")
        if frame_times is None or not np.ptp(frame_times):
            frame_times = np.arange(len(frames)) / (self.frame_spec.fps or DEFAULT_FPS)
        frame_times = np.asarray(frame_times, np.float64)
        fitted, max_pixels = self.fit(frames, budget)
        kept = frame_times[uniform_subset(len(frames), len(fitted))]  # the frames fit keeps
        rows, grid = self.processor.video(fitted, max_pixels)
        tokens = self.processor.num_tokens(grid[0])
        if self.timestamps:
            ids = self.timestamped_ids(self.prompt_text, kept, tokens // int(grid[0][0]))
        else:
            ids = self.prefix + [self.model.config.video_token_id] * tokens + self.suffix
        second = self.processor.second_per_grid(sampled_fps(kept)) if self.timed else None
        return TimedVideo(VideoInputs(rows, grid, ids, second), fitted, budget, len(fitted), tokens, kept)

    def shrink(self, video: TimedVideo) -> TimedVideo | None:
        """The same video at half its budget (after running out of memory), its frames' times kept, or None
        when nothing fits."""
        try:
            return self.prepare(video.frames, max(1, video.budget // 2), video.frame_times)
        except BudgetError:
            return None

    def timestamped_ids(self, text: str, frame_times: np.ndarray, tokens_per_patch: int) -> list[int]:
        """Qwen3-VL: ``text``'s video written as one timestamped group per temporal patch."""
        return video_prompt_ids(self.tokenizer, text, patch_times(frame_times, self.processor.temporal_patch_size),
                                tokens_per_patch, self.model.config.video_token_id)

    def chat_prompt(self, turns: Sequence[Turn]) -> str:
        """The conversation through the checkpoint's chat template, the video as one ``<|video_pad|>``."""
        return self.tokenizer.apply_chat_template(template_messages(turns, {"type": "video"}), tokenize=False,
                                                  add_generation_prompt=True, **self.template_options)

    def with_prompt(self, video: PreparedVideo, prompt: str) -> VideoInputs:
        """The video's inputs under another prompt text, its ``<|video_pad|>`` expanded to the video's tokens."""
        if self.timestamps:
            patches = int(video.inputs.video_grid_thw[0][0])
            return video.inputs._replace(input_ids=self.timestamped_ids(prompt, video.frame_times,
                                                                        video.visual_tokens // patches))
        ids = self.tokenizer(prompt)["input_ids"]
        if ids.count(self.model.config.video_token_id) != 1:
            raise ValueError(f"a prompt must hold one {VIDEO_PAD} for the video, got {prompt!r}")
        at = ids.index(self.model.config.video_token_id)
        return video.inputs._replace(input_ids=ids[:at] + [ids[at]] * video.visual_tokens + ids[at + 1:])

    def generate(self, batch: Sequence[PreparedVideo], prompts: Sequence[str] | None = None,
                 options: dict | None = None) -> list[dict]:
        """Captions (or, with per-video ``prompts`` and ``options``, replies with token counts); see
        :mod:`pipeline.captioning.chat`."""
        inputs = [video.inputs for video in batch] if prompts is None else \
            [self.with_prompt(video, prompt) for video, prompt in zip(batch, prompts)]
        kwargs = {**self.generate_kwargs, **(options or {})}
        args = model_inputs(inputs, self.pad_id)
        result = self.model.generate(**args, **kwargs, return_dict_in_generate=True)
        out = result.sequences[:, args["input_ids"].shape[1]:]
        texts = self.tokenizer.batch_decode(out, skip_special_tokens=True)
        answers = caption_answers(texts, out, kwargs["eos_token_id"], kwargs["max_new_tokens"],
                                  stopped_rows(result, kwargs))
        if prompts is not None:
            answers = with_token_counts(answers, [len(i.input_ids) for i in inputs], out, kwargs["eos_token_id"])
        return [{**answer, **video.columns()} for answer, video in zip(answers, batch)]


def model_inputs(batch: Sequence[VideoInputs], pad_id: int) -> dict[str, np.ndarray]:
    """A batch's generate arguments under transformers' names: left-padded ``input_ids`` and
    ``attention_mask``, the videos' patch rows and grids, and (Qwen2.5-VL) ``second_per_grid_ts``."""
    input_ids, mask = left_pad([b.input_ids for b in batch], pad_id)
    args = {"input_ids": input_ids, "attention_mask": mask,
            "pixel_values_videos": np.concatenate([b.pixel_values_videos for b in batch]),
            "video_grid_thw": np.concatenate([b.video_grid_thw for b in batch])}
    if batch[0].second_per_grid_t is not None:
        args["second_per_grid_ts"] = np.array([b.second_per_grid_t for b in batch], np.float32)
    return args


def build_parser() -> argparse.ArgumentParser:
    p = common_parser(
        "Caption videos with Qwen2-VL, Qwen2.5-VL, Qwen3-VL or Qwen3.5 / Qwen3.6 (Qwen/Qwen2-VL-*-Instruct, "
        "Qwen/Qwen2.5-VL-*-Instruct, Qwen/Qwen3-VL-*-Instruct, Qwen/Qwen3.5-*, dense and MoE).",
        epilog=f"defaults come from {BASE_CONFIG.relative_to(CONFIG_DIR.parent)} "
               f"({QWEN3_VL_CONFIG.relative_to(CONFIG_DIR.parent)} for a Qwen3-VL or Qwen3.5 checkpoint)\n"
               "example:\n  msrun --worker_num=8 --local_worker_num=8 --join=True "
               "pipeline/captioning/caption_qwen2vl.py meta.csv "
               "--pretrained_model_name_or_path /models/Qwen2-VL-7B-Instruct --bs 8")
    p.add_argument("--fps", type=float, help="frames sampled per second of video (unless --num_frames is given)")
    p.add_argument("--max_frames", type=int, help="at most this many frames per video with --fps sampling")
    p.add_argument("--height", type=int, help="frame height before patching (a multiple of 28 avoids a resize)")
    p.add_argument("--width", type=int, help="frame width before patching (a multiple of 28 avoids a resize)")
    p.add_argument("--max_visual_tokens", type=int,
                   help="most vision tokens per video (default: what the checkpoint's context holds after the "
                        "prompt and --max_new_tokens, at most 24576); a video that needs more keeps fewer "
                        "frames, then a lower resolution")
    p.add_argument("--max_frame_tokens", type=int,
                   help="Qwen3-VL: most vision tokens per temporal patch (2 frames) before --max_visual_tokens "
                        "applies; each patch gets at least 128 (or this, when lower) and the video about the "
                        "checkpoint's total (published: 24576)")
    p.add_argument("--min_frames", type=int,
                   help="fewest frames per video: with --fps sampling a shorter clip gets this many, spread evenly "
                        "over it (Qwen3-VL: 4 by default, as qwen-vl-utils; Qwen2-VL/2.5-VL: only when given), "
                        "and --max_visual_tokens never leaves fewer (default 4); a Qwen3-VL video whose minimum "
                        "at 128 tokens per temporal patch (--max_frame_tokens when lower) exceeds "
                        "--max_visual_tokens is an error row")
    return p


def build_captioner(args: argparse.Namespace, dtype: str) -> Qwen2VLCaptioner:
    if not args.pretrained_model_name_or_path:
        raise FileNotFoundError("--pretrained_model_name_or_path is required: a local Qwen2-VL or Qwen2.5-VL "
                                "checkpoint folder")
    return Qwen2VLCaptioner(args.pretrained_model_name_or_path, dtype, question=args.question, fps=args.fps,
                            num_frames=args.num_frames, max_frames=args.max_frames, height=args.height,
                            width=args.width, max_new_tokens=args.max_new_tokens,
                            max_visual_tokens=args.max_visual_tokens, generation=generation_options(args),
                            tp_size=args.tp_size, max_frame_tokens=args.max_frame_tokens,
                            min_frames=args.min_frames, **loop_options(args))


def base_config(argv: Sequence[str] | None) -> Path:
    """The defaults for the checkpoint on the command line: Qwen3-VL's preset for a Qwen3-VL or Qwen3.5 folder."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--pretrained_model_name_or_path")
    folder = pre.parse_known_args(argv)[0].pretrained_model_name_or_path
    try:
        qwen3 = folder is not None and read_config(folder).get("model_type") in QWEN3_VL_TYPES
    except CheckpointError:  # the captioner reports a broken folder
        qwen3 = False
    return QWEN3_VL_CONFIG if qwen3 else BASE_CONFIG


def main(argv: Sequence[str] | None = None) -> RunSummary:
    return main_with(build_parser(), build_captioner, argv, base_config=base_config(argv))


if __name__ == "__main__":
    main()
