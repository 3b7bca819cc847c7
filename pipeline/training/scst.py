"""Self-critical sequence training (SCST) with a CIDEr-D reward, as in the BLIP-2 video captioner recipe.

For each video: generate K candidates (all beams of a beam search, or K samples), score
each with CIDEr-D against the video's references (document frequencies from the training
references, computed once), subtract a baseline (the candidates' mean reward, or the
greedy caption's reward) and weight the candidate's length-normalised log-probability,
recomputed with gradients by a teacher-forced forward:

    loss = -sum_i (r_i - b) * logp_i / len_i   over all candidates of the global batch,
           divided by the global number of candidates.

Generation runs in inference mode (no LoRA dropout); the loss forward in training mode.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from mindspore import Tensor

from pipeline.training.objectives import CaptionEncoder, CaptionTokens, token_logprobs

# (candidate captions, references of each candidate) -> rewards
RewardFn = Callable[[list[str], list[list[str]]], np.ndarray]
BASELINES = ("mean", "greedy")
CANDIDATES = ("beam", "sample")


@dataclass
class ScstConfig:
    num_candidates: int = 5          # beams (beam search) or samples per video
    candidates: str = "beam"         # beam | sample
    baseline: str = "mean"           # mean | greedy
    max_new_tokens: int = 32
    min_new_tokens: int = 5
    temperature: float = 1.0         # sampling only
    top_k: int = 0
    top_p: float = 1.0
    use_jit: bool = True             # compiled decoding steps (False: PyNative, for tiny models and debugging)


@dataclass
class ScstBatch:
    """Candidates of one (local) batch, with what the loss needs."""

    tokens: CaptionTokens
    captions: list[str]
    rewards: np.ndarray      # (N,) CIDEr-D of each candidate
    advantages: np.ndarray   # (N,) reward - baseline


def cider_reward(train_references: Sequence[Sequence[str]]) -> RewardFn:
    """CIDEr-D with document frequencies from the training references (``pipeline.training.cider``)."""
    from pipeline.training.cider import CiderD

    scorer = CiderD([list(r) for r in train_references])
    return lambda candidates, refs: np.asarray(scorer.score(candidates, refs), np.float64)


def _generate(model, encoder: CaptionEncoder, pixel_values, config: ScstConfig, greedy: bool,
              rng: np.random.Generator, questions: Sequence[str | None] | None) -> list[list[int]]:
    ids, mask = encoder.prompt_batch(len(pixel_values), questions)
    kwargs = dict(max_new_tokens=config.max_new_tokens, min_new_tokens=config.min_new_tokens,
                  use_jit=config.use_jit)
    if greedy:
        kwargs.update(num_beams=1)
    elif config.candidates == "beam":
        kwargs.update(num_beams=config.num_candidates, num_return_sequences=config.num_candidates)
    else:
        kwargs.update(do_sample=True, num_return_sequences=config.num_candidates, temperature=config.temperature,
                      top_k=config.top_k, top_p=config.top_p, seed=rng)
    out = model.generate(pixel_values=pixel_values, input_ids=ids, attention_mask=mask,
                         return_dict_in_generate=True, **kwargs)
    return encoder.generated_ids(out.sequences, ids.shape[1])


def make_candidates(model, encoder: CaptionEncoder, pixel_values: np.ndarray, references: Sequence[Sequence[str]],
                    reward_fn: RewardFn, config: ScstConfig, rng: np.random.Generator,
                    questions: Sequence[str | None] | None = None) -> ScstBatch:
    """Generate, decode and score the candidates of a batch (no gradients); ``questions``: per video (GEBC)."""
    if config.candidates not in CANDIDATES or config.baseline not in BASELINES:
        raise ValueError(f"candidates must be one of {CANDIDATES} and baseline one of {BASELINES}")
    was_training = model.training
    model.set_train(False)
    try:
        k = config.num_candidates
        ids = _generate(model, encoder, pixel_values, config, greedy=False, rng=rng, questions=questions)
        greedy_ids = _generate(model, encoder, pixel_values, config, greedy=True, rng=rng, questions=questions) \
            if config.baseline == "greedy" else None
    finally:
        model.set_train(was_training)
    captions = encoder.decode(ids)
    refs = [list(references[i // k]) for i in range(len(ids))]
    rewards = reward_fn(captions, refs)
    if greedy_ids is None:
        baseline = np.repeat(rewards.reshape(-1, k).mean(axis=1), k)
    else:
        baseline = np.repeat(reward_fn(encoder.decode(greedy_ids), [list(r) for r in references]), k)
    tokens = encoder.encode(ids, rows=np.repeat(np.arange(len(pixel_values)), k),
                            questions=None if questions is None else [q for q in questions for _ in range(k)])
    return ScstBatch(tokens, captions, rewards, rewards - baseline)


def normalised_logprobs(model, pixel_values, tokens: CaptionTokens) -> Tensor:
    """(N,) sum of each candidate's token log-probs divided by its length (padding masked)."""
    logp, weight = token_logprobs(model, pixel_values, tokens)
    return logp.sum(axis=1) / weight.sum(axis=1).clip(1.0, None)


def scst_loss(model, pixel_values, batch: ScstBatch, total_candidates: float) -> Tensor:
    """-sum((r - b) * logp / len) / ``total_candidates`` (the global candidate count)."""
    logp = normalised_logprobs(model, pixel_values, batch.tokens)
    return -(logp * Tensor(batch.advantages.astype(np.float32))).sum() / total_candidates
