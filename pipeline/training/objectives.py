"""Teacher-forced token log-probabilities of captions given videos: the CE loss and SCST's log-prob.

Both objectives need the same thing: for each (video, caption token ids) pair, the
log-probability of every caption token under the model with the caption fed as input.
The layout follows the model: OPT reads [image slots] + prompt + caption + eos as one
sequence (labels only on the caption), T5 encodes [image slots] + prompt and decodes
the caption, Video-LLaMA reads its prompt with the video in the ``<ImageHere>`` slots + caption +
eos (as OPT). The video is encoded once per video even when several captions share it.

Losses are sums over tokens divided by a count the caller passes (the token count of the
global batch), so data-parallel ranks that all-reduce-sum their gradients get exactly
the gradient of one process running the whole batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops

from models.generation import left_pad

QUESTION = "{question}"


@dataclass
class CaptionTokens:
    """Model inputs for N (video row, caption) pairs; ``rows`` maps each pair to its video."""

    input_ids: np.ndarray        # (N, L) prompt (+ caption for decoder-only), right-padded
    attention_mask: np.ndarray   # (N, L)
    labels: np.ndarray           # decoder-only: (N, L) aligned with input_ids; T5: (N, S) decoder targets; -100 ignored
    rows: np.ndarray             # (N,) video index of each pair

    @property
    def token_counts(self) -> np.ndarray:
        """(N,) number of supervised tokens per pair."""
        return (self.labels != -100).sum(axis=1)


class CaptionEncoder:
    """Turns caption strings or generated ids into :class:`CaptionTokens` for one model and prompt.

    A prompt holding ``{question}`` is a template: each sample's question (GEBC's three
    questions) fills it, so one batch can hold several prompts.
    """

    def __init__(self, model, tokenizer, prompt: str = "a video of", max_txt_len: int = 32):
        config = model.config
        self.model = model
        self.is_decoder_only = model.is_decoder_only
        text = config.text_config
        self.eos = int(text.eos_token_id)
        self.pad = int(text.pad_token_id if text.pad_token_id is not None else self.eos)
        self.tokenizer = tokenizer
        self.prompt = prompt
        self.max_txt_len = max_txt_len
        # generate's sequences start with the prompt (BLIP-2 OPT), not Video-LLaMA's (new tokens only)
        self.sequences_hold_prompt = self.is_decoder_only and not hasattr(model, "prompt_ids")
        self.prompts: dict[str | None, list[int]] = {}

    def _build_prompt_ids(self, prompt: str) -> list[int]:
        if hasattr(self.model, "prompt_ids"):  # the video goes where the prompt's text says (Video-LLaMA)
            return self.model.prompt_ids(self.tokenizer, prompt)
        config = self.model.config
        ids = list(self.tokenizer(prompt)["input_ids"]) if prompt else []
        if self.is_decoder_only and not ids and config.text_config.bos_token_id is not None:
            ids = [int(config.text_config.bos_token_id)]
        if config.image_token_index is not None:
            ids = [int(config.image_token_index)] * config.num_query_tokens + ids
        return ids

    def prompt_for(self, question: str | None = None) -> list[int]:
        """The prompt's ids, with ``question`` in its ``{question}``."""
        if question not in self.prompts:
            if (question is None) == (QUESTION in self.prompt):
                raise ValueError(f"the prompt {self.prompt!r} has {'a' if question is None else 'no'} {QUESTION} "
                                 f"but the sample has {'no question' if question is None else 'one'}: a prompt "
                                 f"with {QUESTION} is for annotations that ask questions (GEBC)")
            text = self.prompt if question is None else self.prompt.replace(QUESTION, question)
            self.prompts[question] = self._build_prompt_ids(text)
        return self.prompts[question]

    @property
    def prompt_ids(self) -> list[int]:
        return self.prompt_for(None)

    def _prompt_list(self, batch: int, questions: Optional[Sequence[str | None]]) -> list[list[int]]:
        if questions is not None and len(questions) != batch:
            raise ValueError(f"{len(questions)} questions for {batch} samples")
        return [self.prompt_for(q) for q in (questions if questions is not None else [None] * batch)]

    def prompt_batch(self, batch: int, questions: Optional[Sequence[str | None]] = None
                     ) -> tuple[np.ndarray, np.ndarray]:
        """Prompt ids and mask for ``generate``, left-padded when the questions differ."""
        return left_pad(self._prompt_list(batch, questions), self.pad)

    def caption_ids(self, captions: Sequence[str]) -> list[list[int]]:
        """Token ids of each caption, truncated to ``max_txt_len`` tokens including the final eos."""
        out = []
        for text in captions:
            ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])[: self.max_txt_len - 1]
            out.append(ids + [self.eos])
        return out

    def generated_ids(self, sequences: np.ndarray, prompt_len: int) -> list[list[int]]:
        """New tokens of ``generate`` output up to and including the first eos (padding dropped)."""
        if self.sequences_hold_prompt:
            start = prompt_len
        else:  # T5's sequences start with the decoder start token
            start = 0 if self.is_decoder_only else 1
        out = []
        for row in np.asarray(sequences)[:, start:]:
            ends = np.flatnonzero(row == self.eos)
            out.append([int(t) for t in (row[: ends[0] + 1] if len(ends) else row)])
        return out

    def decode(self, ids: Sequence[Sequence[int]]) -> list[str]:
        return [t.strip() for t in self.tokenizer.batch_decode([list(i) for i in ids], skip_special_tokens=True)]

    def encode(self, captions: Sequence[Sequence[int]], rows: Optional[Sequence[int]] = None,
               questions: Optional[Sequence[str | None]] = None) -> CaptionTokens:
        """Inputs for caption token ids (e.g. from :meth:`caption_ids`); ``rows``: their videos (default
        0..N-1); ``questions``: each pair's question for the prompt (default none)."""
        n = len(captions)
        rows = np.arange(n) if rows is None else np.asarray(rows, np.int64)
        prompts = self._prompt_list(n, questions)
        if self.is_decoder_only:
            length = max(len(p) + len(c) for p, c in zip(prompts, captions))
            ids = np.full((n, length), self.pad, np.int64)
            mask = np.zeros((n, length), np.int64)
            labels = np.full((n, length), -100, np.int64)
            for i, (prompt, cap) in enumerate(zip(prompts, captions)):
                end = len(prompt) + len(cap)
                ids[i, :end] = prompt + list(cap)
                mask[i, :end] = 1
                labels[i, len(prompt):end] = cap
            return CaptionTokens(ids, mask, labels, rows)
        width = max(len(p) for p in prompts)
        ids = np.full((n, width), self.pad, np.int64)
        mask = np.zeros((n, width), np.int64)
        labels = np.full((n, max(len(c) for c in captions)), -100, np.int64)
        for i, (prompt, cap) in enumerate(zip(prompts, captions)):
            ids[i, :len(prompt)] = prompt
            mask[i, :len(prompt)] = 1
            labels[i, :len(cap)] = cap
        return CaptionTokens(ids, mask, labels, rows)


def token_logprobs(model, pixel_values, tokens: CaptionTokens,
                   image_embeds: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """(N, S) log-probabilities of the supervised tokens (0 elsewhere) and the (N, S) float mask.

    Differentiable with respect to the model's parameters. ``image_embeds``: the videos' query outputs
    when the caller has them already.
    """
    if image_embeds is None:
        image_embeds = model.get_image_features(pixel_values)
    if len(tokens.rows) != image_embeds.shape[0] or (tokens.rows != np.arange(len(tokens.rows))).any():
        image_embeds = ops.gather(image_embeds, Tensor(tokens.rows.astype(np.int32)), 0)
    embeds, mask = model._merge(image_embeds, tokens.input_ids, tokens.attention_mask)
    mask = Tensor(mask.astype(np.int32))
    labels = Tensor(tokens.labels.astype(np.int32))
    lm = model.language_model
    if model.is_decoder_only:
        logits = lm(inputs_embeds=embeds, attention_mask=mask).logits
        logits = logits[:, -labels.shape[1]:][:, :-1]
        labels = labels[:, 1:]
    else:
        logits = lm(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=lm.shift_right(labels)).logits
    valid = labels != -100
    logp = ops.log_softmax(logits.astype(ms.float32), axis=-1)
    picked = ops.gather_elements(logp, -1, ops.where(valid, labels, ops.zeros_like(labels))[..., None])[..., 0]
    weight = valid.astype(ms.float32)
    return picked * weight, weight


def caption_loss(model, pixel_values, tokens: CaptionTokens, total_tokens: float,
                 contrast: Optional["Contrast"] = None) -> Tensor:
    """Cross-entropy summed over this batch's caption tokens, divided by ``total_tokens`` (the global count),
    plus ``contrast``'s video-caption contrastive term when given."""
    image_embeds = model.get_image_features(pixel_values)
    logp, _ = token_logprobs(model, pixel_values, tokens, image_embeds)
    loss = -logp.sum() / total_tokens
    if contrast is not None:
        loss = loss + contrast.weight * contrastive_loss(model, image_embeds, contrast.caption_ids, tokens.rows,
                                                         contrast.temperature) / contrast.world_size
    return loss


@dataclass
class Contrast:
    """A contrastive term beside the caption loss (CoCa's, BLIP-2 stage 1's ITC): each video's mean query output
    against its captions as the language model reads them alone, with the batch's other videos and captions as
    negatives. It gives the vision encoder and Q-Former a signal that does not pass through a language model
    still learning to read them (the bundled demo trains all three from scratch)."""

    caption_ids: list[list[int]]  # each pair's caption token ids, eos last (CaptionEncoder.caption_ids)
    weight: float = 1.0
    temperature: float = 0.07
    world_size: int = 1  # each rank contrasts its own batch; the all-reduce-sum of gradients then averages


def caption_features(model, caption_ids: Sequence[Sequence[int]]) -> Tensor:
    """(N, D) the decoder-only language model's last hidden state at each caption's final token (its eos),
    the caption read without the video or prompt."""
    lm = model.language_model
    decoder = getattr(getattr(lm, "model", None), "decoder", None)
    if not model.is_decoder_only or decoder is None:
        raise ValueError("the contrastive term reads captions with a BLIP-2 OPT language model; this model has "
                         f"{type(lm).__name__}")
    pad = int(model.config.text_config.pad_token_id or 0)
    ids, mask = right_pad(caption_ids, pad)
    hidden, _ = decoder(lm.get_input_embeddings()(Tensor(ids.astype(np.int32))), Tensor(mask.astype(np.int32)), 0)
    last = Tensor((mask.sum(axis=1) - 1).astype(np.int32))
    return ops.gather_elements(hidden, 1, ops.broadcast_to(last[:, None, None], (-1, 1, hidden.shape[2])))[:, 0]


def right_pad(rows: Sequence[Sequence[int]], pad: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, L) ids right-padded with ``pad`` and their mask."""
    length = max(len(r) for r in rows)
    ids = np.full((len(rows), length), pad, np.int64)
    mask = np.zeros((len(rows), length), np.int64)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = row
        mask[i, :len(row)] = 1
    return ids, mask


def contrastive_loss(model, image_embeds: Tensor, caption_ids: Sequence[Sequence[int]], rows: np.ndarray,
                     temperature: float = 0.07) -> Tensor:
    """Symmetric InfoNCE between B videos and N captions (caption n belongs to video ``rows[n]``).

    Caption to video: cross-entropy over the B videos. Video to caption: minus the log of the softmax mass on
    the video's own captions (several per video under ``ce_references: video``). The mean of the two directions.
    """
    videos = ops.L2Normalize(axis=-1, epsilon=1e-6)(image_embeds.mean(1).astype(ms.float32))
    texts = ops.L2Normalize(axis=-1, epsilon=1e-6)(caption_features(model, caption_ids).astype(ms.float32))
    sims = ops.matmul(videos, texts.T) / temperature  # (B, N)
    own = np.zeros((videos.shape[0], len(rows)), np.float32)
    own[np.asarray(rows), np.arange(len(rows))] = 1.0
    own = Tensor(own)
    text_to_video = -(ops.log_softmax(sims, axis=0) * own).sum() / len(rows)
    video_logp = ops.log_softmax(sims, axis=1)
    masked = ops.where(own > 0, video_logp, ops.fill(ms.float32, video_logp.shape, -1e9))
    video_to_text = -ops.logsumexp(masked, 1).mean()
    return (text_to_video + video_to_text) / 2
