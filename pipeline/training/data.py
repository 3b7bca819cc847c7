"""Batches of (frames, captions) for training and evaluation, decoded ahead in worker threads.

Order. Epoch ``e`` visits the samples in a permutation seeded by ``(seed, e)``. Step
``s`` takes the global batch at positions ``[s*G, (s+1)*G)`` of that order, with
``G = world_size * batch_size``, and rank ``r`` its slice ``[r*B, (r+1)*B)``: the ranks'
slices are disjoint and together cover the global batch, so data parallel training sees
exactly what one process with batch G would. With ``drop_last=False`` (evaluation) the
last global batch may be short, so a rank may get a short batch or none there. Frame sampling randomness ("headtail") is
seeded by ``(seed, epoch, sample index)``, so a sample's frames do not depend on which
rank or worker decodes it, or on whether the run was resumed.

A sample with ``start``/``end`` (a GEBC boundary's window) is sampled within those seconds.

Resume. ``state_dict()`` is ``{"epoch", "step"}`` (plus sizes to check against):
the next batch to yield. Loading it and iterating yields exactly the batches an
uninterrupted run would have yielded from there.

Unreadable videos. A video that raises ``VideoReadError`` is logged and counted, and
(with ``replace_unreadable``, the training default) replaced by the next readable sample
of the epoch order, so every batch keeps its size and the step's shapes stay fixed (one
bad file must not kill a long run or change compiled graph shapes). For evaluation pass
``replace_unreadable=False``: the video is dropped from its batch instead, so no video is
scored twice. Known bad videos are not decoded again.
"""
from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.datasets.captions import CaptionRecord
from pipeline.datasets.video import VideoReadError, check_sampling_args, sample_frames

logger = logging.getLogger(__name__)


@dataclass
class Batch:
    pixel_values: np.ndarray          # the preprocessed frames stacked, e.g. (B, T, 3, H, W)
    video_ids: list[str]
    captions: list[tuple[str, ...]]   # training: one caption each; evaluation: all references
    indices: list[int]                # positions of the samples in the loader's sample list
    questions: list[str | None] | None = None  # per sample, the prompt's {question} (GEBC); None: no questions


class VideoCaptionLoader:
    """Iterates one epoch per ``iter()``; see the module doc for order, sharding and resume.

    samples: e.g. ``training_samples(records)`` (training) or the records (evaluation).
    batch_size: per rank. preprocess: (T, H, W, 3) uint8 frames -> model input array
    (e.g. ``Blip2FrameProcessor``), run in the worker threads.
    """

    def __init__(self, samples: Sequence[CaptionRecord], batch_size: int,
                 preprocess: Callable[[np.ndarray], Any], *, num_frames: int = 8,
                 sampling: str = "headtail", shuffle: bool = True, seed: int = 0, rank: int = 0,
                 world_size: int = 1, num_workers: int = 2, drop_last: bool = True,
                 replace_unreadable: bool = True, prefetch_batches: int = 2, backend: str = "auto") -> None:
        check_sampling_args(num_frames, sampling, None)
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got "
                             f"batch_size={batch_size}, rank={rank}, world_size={world_size}")
        self.samples = list(samples)
        self.batch_size = batch_size
        self.global_batch_size = batch_size * world_size
        if drop_last and len(self.samples) < self.global_batch_size:
            raise ValueError(f"{len(self.samples)} samples are fewer than one global batch "
                             f"({world_size} ranks x {batch_size}); lower the batch size or set drop_last=False")
        self.preprocess = preprocess
        self.num_frames = num_frames
        self.sampling = sampling
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.num_workers = max(1, num_workers)
        self.drop_last = drop_last
        self.replace_unreadable = replace_unreadable
        self.prefetch_batches = max(1, prefetch_batches)
        self.backend = backend
        self.epoch = 0
        self.step = 0
        self.unreadable: set[int] = set()
        self.num_replaced = 0

    def __len__(self) -> int:
        """Steps per epoch."""
        if self.drop_last:
            return len(self.samples) // self.global_batch_size
        return math.ceil(len(self.samples) / self.global_batch_size)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Sample indices in the order epoch ``epoch`` visits them."""
        if not self.shuffle:
            return np.arange(len(self.samples))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.samples))

    def rank_positions(self, step: int) -> range:
        """Positions in the epoch order that this rank reads at ``step``."""
        start = step * self.global_batch_size + self.rank * self.batch_size
        return range(start, min(start + self.batch_size, len(self.samples)))

    def state_dict(self) -> dict[str, int]:
        epoch, step = (self.epoch + 1, 0) if self.step >= len(self) else (self.epoch, self.step)
        return {"epoch": epoch, "step": step, "global_batch_size": self.global_batch_size,
                "num_samples": len(self.samples)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue where ``state`` was taken; a changed world size keeps the samples consumed."""
        if state.get("num_samples", len(self.samples)) != len(self.samples):
            raise ValueError(f"the saved loader state is for {state['num_samples']} samples, this loader "
                             f"has {len(self.samples)}; resume with the same annotations and split")
        step = state["step"]
        saved_batch = state.get("global_batch_size", self.global_batch_size)
        if saved_batch != self.global_batch_size:
            step = step * saved_batch // self.global_batch_size
            logger.warning("global batch changed from %d to %d: resuming epoch %d at step %d",
                           saved_batch, self.global_batch_size, state["epoch"], step)
        self.epoch, self.step = state["epoch"], step

    def _load(self, index: int, epoch: int) -> Any:
        """Decode and preprocess one sample; raises VideoReadError for an unreadable video."""
        if index in self.unreadable:
            raise VideoReadError(self.samples[index].path, "unreadable earlier in this run")
        rng = np.random.default_rng([self.seed, epoch, index])
        sample = self.samples[index]
        frames, _ = sample_frames(sample.path, num_frames=self.num_frames, sampling=self.sampling, rng=rng,
                                  backend=self.backend, start=sample.start, end=sample.end)
        return self.preprocess(frames)

    def _note_unreadable(self, index: int, exc: VideoReadError) -> None:
        if index not in self.unreadable:
            self.unreadable.add(index)
            logger.warning("skipping unreadable video (%s); %d unreadable so far", exc, len(self.unreadable))

    def _replacement(self, order: np.ndarray, position: int, epoch: int) -> tuple[int, Any]:
        """The next readable sample after ``position`` in the epoch order (wrapping around)."""
        for offset in range(1, len(order)):
            index = int(order[(position + offset) % len(order)])
            try:
                return index, self._load(index, epoch)
            except VideoReadError as exc:
                self._note_unreadable(index, exc)
        raise RuntimeError(f"none of the {len(order)} videos could be read; check the video paths")

    def _collect(self, order: np.ndarray, positions: range, futures: list[Future], epoch: int) -> Batch | None:
        indices, inputs = [], []
        for position, future in zip(positions, futures):
            index = int(order[position])
            try:
                inputs.append(future.result())
            except VideoReadError as exc:
                self._note_unreadable(index, exc)
                if not self.replace_unreadable:
                    continue
                index, replacement = self._replacement(order, position, epoch)
                inputs.append(replacement)
                self.num_replaced += 1
            indices.append(index)
        if not indices:
            return None
        return Batch(pixel_values=np.stack(inputs), video_ids=[self.samples[i].video_id for i in indices],
                     captions=[self.samples[i].captions for i in indices], indices=indices,
                     questions=[self.samples[i].question for i in indices])

    def __iter__(self) -> Iterator[Batch]:
        """Yield this rank's batches from the saved position to the end of the epoch."""
        state = self.state_dict()
        self.epoch, self.step = state["epoch"], state["step"]
        epoch, order = self.epoch, self.epoch_order(self.epoch)
        steps = iter(range(self.step, len(self)))
        pool = ThreadPoolExecutor(max_workers=self.num_workers, thread_name_prefix="frames")
        pending: deque[tuple[int, range, list[Future]]] = deque()

        def submit(step: int) -> None:
            positions = self.rank_positions(step)
            pending.append((step, positions, [pool.submit(self._load, int(order[p]), epoch) for p in positions]))

        try:
            for step in steps:
                submit(step)
                if len(pending) >= self.prefetch_batches:
                    break
            while pending:
                step, positions, futures = pending.popleft()
                following = next(steps, None)
                if following is not None:
                    submit(following)
                batch = self._collect(order, positions, futures, epoch)
                self.step = step + 1
                if batch is not None:
                    yield batch
            self.epoch, self.step = epoch + 1, 0
        finally:
            for _, _, futures in pending:
                for future in futures:
                    future.cancel()
            pool.shutdown(wait=True, cancel_futures=True)
