"""One loaded captioner answering conversations about videos: what the server and the terminal chat share.

The family's own entry script builds the captioner (its YAML defaults, its flags), so frames are
sampled as the runner samples them (``frame_spec``) and prepared by the same code; a conversation
becomes the family's prompt through ``chat_prompt`` (see :mod:`pipeline.captioning.chat`).
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from models import attention, jit, model_family
from models.checkpoint import read_config
from models.constrained import JsonGrammar, is_complete
from models.generation import check_generation_args
from pipeline import distributed, environment
from pipeline.captioning.chat import Turn
from pipeline.captioning.cli import check_args, resolve_dtype, resolve_prompt
from pipeline.captioning.results import TRUNCATED_COLUMN
from pipeline.config import CONFIG_DIR, ConfigError, apply_config, parse_with_config
from pipeline.datasets.decode_pool import DecodePool, default_timeout
from pipeline.datasets.video import resize_frames, sample_frames, uniform_indices
from pipeline.serve.batching import ClientGone
from pipeline.serve.streaming import TextStream

logger = logging.getLogger(__name__)
GRAMMAR_CACHE = 32  # compiled response_format schemas an engine keeps

# registry family -> (entry module, its configs/captioning presets, in order); PLLaVA is a "llava"
# config with pooling keys; Qwen2.5-VL's preset (2 fps) goes over Qwen2-VL's
ENTRY_SCRIPTS = {
    "blip-2": ("pipeline.captioning.caption_blip2", ("blip2.yaml",)),
    "llava": ("pipeline.captioning.caption_llava", ("llava.yaml",)),
    "llava_next": ("pipeline.captioning.caption_llava", ("llava.yaml",)),
    "pllava": ("pipeline.captioning.caption_pllava", ("pllava.yaml",)),
    "qwen2_vl": ("pipeline.captioning.caption_qwen2vl", ("qwen2vl.yaml",)),
    "qwen2_5_vl": ("pipeline.captioning.caption_qwen2vl", ("qwen2vl.yaml", "qwen2_5_vl.yaml")),
    "qwen3_vl": ("pipeline.captioning.caption_qwen2vl", ("qwen3_vl.yaml",)),
    "qwen3_vl_moe": ("pipeline.captioning.caption_qwen2vl", ("qwen3_vl.yaml",)),
    "qwen3_5": ("pipeline.captioning.caption_qwen2vl", ("qwen3_vl.yaml",)),  # Qwen3.5 / 3.6: Qwen3-VL's rules
    "qwen3_5_moe": ("pipeline.captioning.caption_qwen2vl", ("qwen3_vl.yaml",)),
    "video_llama": ("pipeline.captioning.caption_videollama", ("videollama.yaml",)),
}


class RequestError(ValueError):
    """A request the model cannot answer as asked (the client's fault): a 4xx for the server."""

    def __init__(self, message: str, code: str, status: int = 400):
        super().__init__(message)
        self.code, self.status = code, status


def checkpoint_family(folder: str | Path) -> str:
    """The captioning family of a checkpoint folder, from its config.json."""
    raw = read_config(folder)
    family = model_family(raw)
    if family == "llava" and raw.get("pooling_shape") is not None:
        family = "pllava"
    if family not in ENTRY_SCRIPTS:
        raise ConfigError(f"{folder} holds a {family!r} model, which the server does not caption with; supported: "
                          f"{', '.join(sorted(ENTRY_SCRIPTS))}")
    return family


class Clip(NamedTuple):
    """A request's frames and, for a sampled video, their start times in seconds (None for images), which
    captioners whose prompt or positions carry time use (Qwen2.5-VL, Qwen3-VL)."""

    frames: np.ndarray
    times: np.ndarray | None = None


@dataclass
class Prepared:
    """A conversation ready for ``generate``: the captioner's prepared video and the prompt text."""

    inputs: Any
    prompt: str
    num_frames: int
    on_token: Callable[[int], None] | None = None  # a streamed reply: called with each new token id
    is_alive: Callable[[], bool] | None = None  # False once the client has disconnected (None: always wanted)


class Engine:
    """A captioner with per-request prompts; ``generate_calls`` counts the model's batched calls."""

    def __init__(self, captioner: Any, family: str, question: str, max_decode_pixels: int | None):
        self.captioner = captioner
        self.family = family
        self.question = question
        self.max_decode_pixels = max_decode_pixels
        self.decode_pool: DecodePool | None = None  # videos decode in these processes when set (the server)
        self.decode_timeout: float | None = None     # seconds one video may take there (None: by frame count)
        self.generate_calls = 0
        self._lock = threading.Lock()  # one generate at a time: the model's caches are not shared
        self._grammars: OrderedDict[str, JsonGrammar] = OrderedDict()  # compiled response_format schemas
        self._grammars_lock = threading.Lock()  # requests compile theirs in the decoder threads

    @classmethod
    def load(cls, folder: str, family_argv: Sequence[str] = (), device: str | None = None,
             dtype: str | None = None) -> Engine:
        """Build the folder's captioner as its entry script would with ``family_argv`` (its flags)."""
        family = checkpoint_family(folder)
        module_name, presets = ENTRY_SCRIPTS[family]
        module = importlib.import_module(module_name)
        argv = ["<server>", "--pretrained_model_name_or_path", folder, *family_argv]
        if dtype:
            argv += ["--dtype", dtype]
        parser = module.build_parser()
        for preset in presets:
            apply_config(parser, CONFIG_DIR / "captioning" / preset)
        if parser.get_default("stop_repetition") is not None:
            # a reply may be asked to repeat itself; --stop_repetition in the family's flags turns it on
            parser.set_defaults(stop_repetition=False)
        try:
            args = parse_with_config(parser, argv)
        except SystemExit as exc:  # argparse already printed which flag it refused
            raise ConfigError(f"{module_name} refused the flags {list(family_argv)}") from exc
        check_args(args)
        resolve_prompt(args)
        attention.set_block_size(args.attention_block_size)
        environment.set_verbose(args.verbose)
        info = distributed.setup(device or args.device)
        captioner = module.build_captioner(args, resolve_dtype(args, info.device))
        logger.info("loaded %s (%s) from %s", type(captioner).__name__, family, folder)
        return cls(captioner, family, args.question, args.max_decode_pixels or None)

    def limit_frames(self, max_frames: int) -> None:
        """Sample at most ``max_frames`` per video: an fps-sampled video keeps that many, evenly spread (as
        the runner's own cap does); a fixed count above it is refused."""
        spec = self.captioner.frame_spec
        if spec.fps:
            self.captioner.frame_spec = replace(spec, num_frames=min(spec.num_frames, max_frames))
        elif spec.num_frames > max_frames:
            raise ConfigError(f"the model samples {spec.num_frames} frames per video, above --max_frames {max_frames}")

    @property
    def max_new_tokens(self) -> int:
        """The captioner's reply length (--max_new_tokens), for requests that give no max_tokens."""
        return self.captioner.generate_kwargs["max_new_tokens"]

    @property
    def fixed_frames(self) -> int | None:
        """Frames every video must have (PLLaVA's pooling shape is built for one count), else None."""
        return self.captioner.frame_spec.num_frames if self.family == "pllava" else None

    def video_frames(self, path: str | Path) -> Clip:
        """A video's frames (and their times, where the captioner takes them) sampled as the runner samples
        them for this captioner; in a decoder process, stopped after ``decode_timeout`` (a
        ``DecodeTimeoutError``), when the engine has a pool."""
        spec = self.captioner.frame_spec
        sampling = dict(num_frames=spec.num_frames, sampling=spec.sampling, fps=spec.fps, height=spec.height,
                        width=spec.width, max_pixels=self.max_decode_pixels, min_frames=spec.min_frames,
                        return_times=spec.times)
        if self.decode_pool is None:
            frames, times = sample_frames(path, **sampling)
        else:
            timeout = self.decode_timeout or default_timeout(spec.num_frames)
            frames, times = self.decode_pool.sample_frames(path, timeout=timeout, **sampling)
        return Clip(np.asarray(frames), np.asarray(times, np.float64) if spec.times else None)

    def image_frames(self, paths: Sequence[str | Path]) -> Clip:
        """Images as the frames of one video, in order, at the first one's size (and the spec's, if set)."""
        spec = self.captioner.frame_spec
        images = [sample_frames(p, num_frames=1, height=spec.height, width=spec.width)[0][0] for p in paths]
        height, width = images[0].shape[:2]
        frames = np.stack([resize_frames(image[None], height, width)[0] for image in images])
        if self.fixed_frames and len(frames) != self.fixed_frames:
            frames = frames[uniform_indices(len(frames), self.fixed_frames)]
        return Clip(frames)

    def prepare(self, clip: Clip, turns: Sequence[Turn]) -> Prepared:
        """The conversation about ``clip`` as model inputs; a user turn without text asks the default
        question (the captioner's caption prompt)."""
        turns = [replace(t, text=self.question) if t.role == "user" and not t.text else t for t in turns]
        if turns[-1].role != "user":
            raise RequestError("the last message must be the user's", "invalid_messages")
        try:
            if clip.times is not None:
                inputs = self.captioner.prepare(clip.frames, frame_times=clip.times)
            else:
                inputs = self.captioner.prepare(clip.frames)
        except ValueError as exc:  # e.g. a budget no frame fits
            raise RequestError(f"the video cannot be prepared for this model: {exc}", "invalid_media") from exc
        return Prepared(inputs, self.captioner.chat_prompt(turns), len(clip.frames))

    def grammar(self, schema: dict) -> JsonGrammar:
        """``schema`` compiled for this model's tokenizer (``GrammarError`` if it cannot be); the last
        ``GRAMMAR_CACHE`` schemas are kept, so requests with one schema share a grammar and can share a batch."""
        key = json.dumps(schema, sort_keys=True)
        with self._grammars_lock:
            if key not in self._grammars:
                self._grammars[key] = JsonGrammar(schema, self.captioner.tokenizer)
                if len(self._grammars) > GRAMMAR_CACHE:
                    self._grammars.popitem(last=False)
            self._grammars.move_to_end(key)
            return self._grammars[key]

    def options(self, max_tokens: int, temperature: float | None = None, top_p: float | None = None,
                seed: int | None = None, min_tokens: int | None = None, grammar: JsonGrammar | None = None) -> dict:
        """Generate overrides for a request: at most ``max_tokens`` new tokens, at least ``min_tokens`` (capped by
        ``max_tokens``; unset: the captioner's own); sampling when temperature is above 0 (0 or unset: the
        captioner's own greedy or beam decoding); the reply constrained to ``grammar`` (``response_format``)."""
        base = self.captioner.generate_kwargs
        options: dict[str, Any] = {"max_new_tokens": max_tokens}
        if grammar is not None:
            options["grammar"] = grammar
        if min_tokens is not None:
            options["min_new_tokens"] = min(min_tokens, max_tokens)
        elif base.get("min_new_tokens", 0) > max_tokens:
            options["min_new_tokens"] = max_tokens
        if temperature:
            options.update(do_sample=True, temperature=float(temperature), num_beams=1,
                           top_p=1.0 if top_p is None else float(top_p))
            if seed is not None:
                options["seed"] = np.random.default_rng(seed)
        try:
            check_generation_args(**{k: v for k, v in options.items() if k not in ("seed", "grammar")})
        except ValueError as exc:
            raise RequestError(str(exc), "invalid_parameter") from exc
        return options

    def streams_tokens(self, options: dict) -> bool:
        """Whether replies made with ``options`` can stream token by token (beam search settles at the end)."""
        return options.get("num_beams", self.captioner.generate_kwargs.get("num_beams", 1)) == 1

    def text_stream(self) -> TextStream:
        """The deltas of one streamed reply, decoded and cut as the captioner decodes and cuts replies."""
        tokenizer = self.captioner.tokenizer
        return TextStream(lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
                          getattr(self.captioner, "separator", "") or "")

    @staticmethod
    def wanted(prepared: Prepared) -> bool:
        """Whether someone still waits for this reply."""
        return prepared.is_alive is None or prepared.is_alive()

    def generate(self, batch: Sequence[Prepared], options: dict) -> list[dict]:
        """Replies to a batch of conversations in one model call (options shared by the batch); the
        streamed ones get their tokens as they are picked. Decoding token by token stops (``ClientGone``)
        once no client of the batch is left; beam search runs to its end."""
        hooks = [p.on_token for p in batch]
        if self.streams_tokens(options) and any(p.on_token or p.is_alive for p in batch):
            def streamer(tokens: np.ndarray) -> None:
                for hook, token in zip(hooks, tokens.tolist()):
                    if hook is not None and token >= 0:
                        hook(token)
                if not any(self.wanted(p) for p in batch):
                    raise ClientGone(f"every client of the batch of {len(batch)} disconnected")
            options = {**options, "streamer": streamer}
        with self._lock:
            self.generate_calls += 1
            try:
                answers = self.captioner.generate([p.inputs for p in batch], prompts=[p.prompt for p in batch],
                                                  options=options)
            except RuntimeError:  # a graph that failed (e.g. the video encoder's) would fail the next requests
                jit.discard_graphs()
                raise
        grammar = options.get("grammar")
        if grammar is not None:  # a reply is cut (finish_reason "length") exactly when its JSON is incomplete
            for answer in answers:
                answer[TRUNCATED_COLUMN] = str(not is_complete(answer["text"], grammar.schema)).lower()
        return answers


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """The flags the server and the chat share; the rest of the command line goes to the family's script."""
    p.add_argument("--pretrained_model_name_or_path", required=True,
                   help="local checkpoint folder of any captioning family (BLIP-2, LLaVA, LLaVA-NeXT, PLLaVA, "
                        "Qwen2-VL, Qwen2.5-VL, Video-LLaMA); config.json picks the family")
    p.add_argument("--device", choices=["Ascend", "CPU"], help="default: Ascend where MindSpore sees one, else CPU")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="weights and compute dtype (default: float32 on CPU, bfloat16 on Ascend)")


FAMILY_FLAGS_EPILOG = (
    "Any other flag goes to the family's captioning script, over its configs/captioning/*.yaml defaults, "
    "e.g. --num_frames 4, --fps 2, --num_beams 1, --question '...', --prompt_template '...'\n"
    "(see python -m pipeline.captioning.caption_<family> --help).")
