"""A captioner's answers turned into output rows, and the out-of-memory retry at half the budget.

``generate`` may answer per video with a caption, a dict of "text" plus its declared extra
columns, or an exception for a video that failed alone. A failed batch is retried one video at a time, so one bad input costs one row; a video
that runs out of memory alone is retried once through the captioner's ``shrink``.

A captioner whose generation stops repetition loops (``models.generation.LoopStop``) answers ``repetition``
and ``retried`` (``LOOP_COLUMNS``); the videos it answers ``repetition`` true for are generated once more, in
one call, with its ``loop_retry`` options (sampling), and that answer replaces the first with ``retried``
true. So ``repetition`` always describes the row's final text (the runner's clean-up adds the loops it
cuts), and ``retried`` that the first attempt looped.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from pipeline.datasets.metadata import CAPTION_COLUMN, ERROR_COLUMN, STATUS_COLUMN, STATUS_ERROR, STATUS_OK

if TYPE_CHECKING:
    from models.generation import GenerateOutput
    from pipeline.captioning.runner import Captioner

logger = logging.getLogger(__name__)


TRUNCATED_COLUMN = "truncated"
REPETITION_COLUMN = "repetition"
RETRIED_COLUMN = "retried"
LOOP_COLUMNS = (REPETITION_COLUMN, RETRIED_COLUMN)
_SENTENCE_ENDS = (".", "!", "?", '"', "'", ")", "\u201d", "\u3002")


def stopped_rows(output: GenerateOutput, kwargs: Mapping[str, Any]) -> np.ndarray | None:
    """The rows ``generate`` stopped in a loop, or None when its options (``kwargs``) did not ask to stop loops
    (so ``caption_answers`` adds no loop columns)."""
    return output.stopped_repeating if kwargs.get("stop_repetition") is not None else None


def caption_answers(texts: Sequence[str], new_ids: np.ndarray, eos_token_id: Any, max_new_tokens: int,
                    stopped_repeating: np.ndarray | None = None) -> list[dict[str, str]]:
    """Per video its caption and ``truncated``: generation ran to ``max_new_tokens`` without an end
    token and the text stops mid-sentence (raise --max_new_tokens for such captions). With
    ``stopped_repeating`` (generation stopped loops) also ``repetition`` (that row's loop was stopped, which
    is not truncation) and ``retried`` (false: the retry sets it)."""
    eos = [] if eos_token_id is None else np.atleast_1d(eos_token_id)
    at_limit = new_ids.shape[1] >= max_new_tokens
    looped = np.zeros(len(texts), bool) if stopped_repeating is None else stopped_repeating
    answers = []
    for text, row, loop in zip(texts, new_ids, looped):
        text = text.strip()
        cut = at_limit and not loop and not np.isin(row, eos).any() and not text.endswith(_SENTENCE_ENDS)
        answer = {"text": text, TRUNCATED_COLUMN: str(bool(cut)).lower()}
        if stopped_repeating is not None:
            answer.update({REPETITION_COLUMN: str(bool(loop)).lower(), RETRIED_COLUMN: "false"})
        answers.append(answer)
    return answers


def error_message(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".replace("\n", " ")[:500]


def _cell(value: Any) -> str:
    return "" if value is None else str(value)


def _carried_columns(exc: BaseException | None) -> dict[str, str]:
    """Extra-column values an error knows (e.g. the budget that ran out of memory), as cells."""
    carried = getattr(exc, "columns", None)
    return {name: _cell(value) for name, value in dict(carried).items()} if carried else {}


@dataclass
class Result:
    """One video's outcome: the caption and extra columns, or the error."""

    text: str = ""
    columns: dict[str, str] = field(default_factory=dict)
    error: BaseException | None = None

    def row(self, cells: Mapping[str, str]) -> dict[str, str]:
        ok = self.error is None
        return {**cells, **self.columns, CAPTION_COLUMN: self.text, STATUS_COLUMN: STATUS_OK if ok else STATUS_ERROR,
                ERROR_COLUMN: "" if ok else error_message(self.error)}


def failure(exc: BaseException) -> Result:
    return Result(columns=_carried_columns(exc), error=exc)


def _parse_output(output: Any, extra_columns: Sequence[str]) -> Result:
    """A captioner's answer for one video: a caption, a dict of "text" and declared extra columns, or the
    exception that video alone failed with (the batch's other answers stand)."""
    if isinstance(output, BaseException):
        return failure(output)
    if isinstance(output, str):
        return Result(text=output)
    if isinstance(output, Mapping) and isinstance(output.get("text"), str):
        undeclared = sorted(set(output) - {"text", *extra_columns})
        if undeclared:
            return Result(error=RuntimeError(f"captioner returned undeclared column(s) {undeclared}; "
                                              f"add them to its extra_columns"))
        return Result(text=output["text"], columns={name: _cell(output.get(name)) for name in extra_columns})
    return Result(error=RuntimeError(f"captioner returned {type(output).__name__} for a video; "
                                      f"expected a caption string or a dict with a 'text' string"))


class OutOfMemoryError(RuntimeError):
    """A video ran out of memory and could not be captioned smaller; ``columns`` are extra cells it knows."""

    def __init__(self, message: str, columns: Mapping[str, Any] | None = None):
        super().__init__(message)
        self.columns = dict(columns or {})


def is_out_of_memory(exc: BaseException) -> bool:
    """MindSpore's "Memory not enough" (CPU), any "out of memory" message (devices), or Python's MemoryError."""
    text = str(exc).lower()
    return isinstance(exc, MemoryError) or "memory not enough" in text or "out of memory" in text


def _generate_one(captioner: Captioner, inputs: Any, extra_columns: Sequence[str]) -> Result:
    outputs = captioner.generate([inputs])
    if len(outputs) != 1:
        raise RuntimeError(f"captioner returned {len(outputs)} captions for 1 video")
    return _parse_output(_retry_loops(captioner, [inputs], outputs)[0], extra_columns)


def _retry_loops(captioner: Captioner, inputs: list[Any], outputs: list[Any]) -> list[Any]:
    """The answers with each looping one generated once more with the captioner's ``loop_retry`` options
    (``retried`` true); a failed retry keeps the first answers, whose loop the clean-up still cuts."""
    options = getattr(captioner, "loop_retry", None)
    looping = [i for i, answer in enumerate(outputs)
               if isinstance(answer, Mapping) and answer.get(REPETITION_COLUMN) == "true"]
    if not options or not looping:
        return outputs
    try:
        again = captioner.generate([inputs[i] for i in looping], options=options)
        if len(again) != len(looping):
            raise RuntimeError(f"captioner returned {len(again)} captions for {len(looping)} videos")
    except Exception as exc:  # noqa: BLE001 - the first answers stand
        logger.warning("re-generating %d looping captions failed (%s); keeping them as they are", len(looping),
                       error_message(exc))
        return outputs
    outputs = list(outputs)
    for i, answer in zip(looping, again):
        if isinstance(answer, Mapping):
            outputs[i] = {**answer, RETRIED_COLUMN: "true"}
    return outputs


def _retry_smaller(captioner: Captioner, inputs: Any, first: BaseException, extra_columns: Sequence[str]) -> Result:
    """After one video ran out of memory: caption it once more at half its budget, if the captioner can shrink it."""
    shrink = getattr(captioner, "shrink", None)
    if shrink is None or not is_out_of_memory(first):
        return failure(first)
    try:
        smaller = shrink(inputs)
    except Exception as exc:  # noqa: BLE001 - a failed shrink costs only this row
        return failure(OutOfMemoryError(f"out of memory ({error_message(first)}), and shrinking the input "
                                         f"failed: {error_message(exc)}", _carried_columns(exc)))
    if smaller is None:
        return failure(OutOfMemoryError(f"out of memory and the input cannot be shrunk further: "
                                         f"{error_message(first)}", _carried_columns(first)))
    logger.warning("out of memory on one video (%s); retrying it at half its visual-token budget",
                   error_message(first))
    try:
        return _generate_one(captioner, smaller, extra_columns)
    except Exception as second:  # noqa: BLE001
        if is_out_of_memory(second):
            return failure(OutOfMemoryError(
                f"out of memory at both attempts, at the full and at half the visual-token budget: "
                f"{error_message(first)}; then {error_message(second)}", _carried_columns(second)))
        return failure(second)


def caption_batch(captioner: Captioner, inputs: list[Any], extra_columns: Sequence[str] = ()) -> list[Result]:
    """Caption a batch; if the batch fails, retry each video alone so one bad input costs one row,
    and a video alone that runs out of memory once more at half its budget."""
    try:
        outputs = captioner.generate(inputs)
        if len(outputs) != len(inputs):
            raise RuntimeError(f"captioner returned {len(outputs)} captions for {len(inputs)} videos")
    except Exception as exc:  # noqa: BLE001
        if len(inputs) == 1:
            return [_retry_smaller(captioner, inputs[0], exc, extra_columns)]
        logger.warning("batch of %d failed (%s); retrying one video at a time", len(inputs), error_message(exc))
        return [caption_batch(captioner, [x], extra_columns)[0] for x in inputs]
    return [_parse_output(output, extra_columns) for output in _retry_loops(captioner, inputs, outputs)]
