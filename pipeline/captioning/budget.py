"""The visual-token budget: how many vision tokens one video may put into the prompt.

A video at a captioner's frame rate and resolution can need more tokens than the language model
has positions (4 fps over 60 s at 448 x 672 is 46k Qwen2-VL tokens; its context is 32k). The
budget is what fits the checkpoint's context after the text of the prompt and the reply, capped
so that a long video cannot take unbounded memory. Captioners spend it by lowering the frame
rate first and the resolution second, and record what they used in the output columns below.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_CAP = 24576
BUDGET_COLUMNS = ("num_frames_used", "visual_tokens", "visual_token_budget")


class BudgetError(ValueError):
    """A video cannot fit the budget even at the minimum frame count and resolution."""


def context_budget(max_positions: int, text_tokens: int, max_new_tokens: int,
                   requested: Optional[int] = None, cap: int = DEFAULT_CAP) -> int:
    """Visual tokens one prompt may hold: ``requested`` (or ``cap``), never more than the context allows."""
    fits = max_positions - text_tokens - max_new_tokens
    if fits < 1:
        raise ValueError(f"the prompt's text ({text_tokens} tokens) and --max_new_tokens ({max_new_tokens}) "
                         f"already fill the model's {max_positions} positions; lower --max_new_tokens")
    if requested is None:
        return min(cap, fits)
    if requested < 1:
        raise ValueError(f"--max_visual_tokens must be at least 1, got {requested}")
    if requested > fits:
        logger.warning("--max_visual_tokens %d does not fit the model's context of %d positions with this "
                       "prompt and --max_new_tokens; using %d", requested, max_positions, fits)
    return min(requested, fits)


def uniform_subset(count: int, keep: int) -> np.ndarray:
    """Indices of ``keep`` of ``count`` evenly spread frames (a lower frame rate over the same span)."""
    if keep >= count:
        return np.arange(count)
    return ((2 * np.arange(keep) + 1) * count // (2 * keep)).astype(np.int64)


@dataclass
class PreparedVideo:
    """One video's model inputs plus what the budget chose, and the frames to re-prepare it smaller."""

    inputs: Any
    frames: np.ndarray
    budget: int
    num_frames_used: int
    visual_tokens: int

    def columns(self) -> dict:
        return {"num_frames_used": self.num_frames_used, "visual_tokens": self.visual_tokens,
                "visual_token_budget": self.budget}
