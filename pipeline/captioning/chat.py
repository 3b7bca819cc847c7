"""Per-request prompts for the captioners: one conversation about one video, as the server and the chat use it.

Every captioner keeps its fixed prompt for the runner and adds two things for conversations:

- ``chat_prompt(turns) -> str``: the conversation as the family's prompt text, with the family's
  media marker where the video goes and ending where the assistant's reply starts (the checkpoint's
  chat template where the family has one, else its prompt template);
- ``generate(batch, prompts=..., options=...)``: ``prompts`` gives each prepared video its own prompt
  text instead of the fixed one, ``options`` overrides generate keyword arguments for the batch; the
  answers then also carry ``prompt_tokens`` and ``completion_tokens``.

A conversation's first user turn with the video, as a single turn, renders to exactly the captioner's
fixed prompt for that question, so a one-turn chat answers as the runner captions.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Turn:
    """One message of a conversation; ``media`` marks the user turn that shows the video."""

    role: str
    text: str
    media: bool = False

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"a message's role must be one of {', '.join(ROLES)}, got {self.role!r}")


def template_messages(turns: Sequence[Turn], media_part: dict) -> list[dict]:
    """The turns as transformers chat-template messages, ``media_part`` (e.g. ``{"type": "video"}``) first
    in the media turn's content, as the captioners' fixed prompts place it."""
    messages = []
    for turn in turns:
        content = [media_part] if turn.media else []
        messages.append({"role": turn.role, "content": content + [{"type": "text", "text": turn.text}]})
    return messages


def template_chat(turns: Sequence[Turn], first: str, follow_up: str, marker: str, end: str = "") -> str:
    """A conversation in a prompt-template format (for checkpoints without a chat template).

    The media turn uses ``first`` (the captioner's template, with ``marker`` where the video goes),
    every other user turn ``follow_up``; both have ``{question}``. An assistant turn is appended as
    `` {answer}{end}``; a system turn comes first, on its own line.
    """
    out = []
    for turn in turns:
        if turn.role == "system":
            out.append(turn.text + "\n")
        elif turn.role == "assistant":
            out.append(f" {turn.text}{end}")
        else:
            template = first if turn.media else follow_up
            if not turn.media:
                template = re.sub(re.escape(marker) + r"\s*", "", template)
            out.append(template.replace("{question}", turn.text))
    return "".join(out)


def question_answer_chat(turns: Sequence[Turn]) -> str:
    """BLIP-2's prompt: a single question as it is (a caption prompt such as "a video of", or
    "Question: ... Answer:"), a longer conversation as "Question: q Answer: a ..." (VideoBLIP's demo)."""
    talk = [turn for turn in turns if turn.role != "system"]
    system = " ".join(turn.text for turn in turns if turn.role == "system")
    if len(talk) == 1:
        text = talk[0].text
    else:
        text = " ".join(f"Question: {t.text} Answer:" if t.role == "user" else t.text for t in talk)
    return f"{system} {text}" if system else text


def with_token_counts(answers: list[dict], prompt_lengths: Sequence[int], new_ids: np.ndarray,
                      eos_token_id: Any) -> list[dict]:
    """Answers with ``prompt_tokens`` (visual tokens included) and ``completion_tokens`` (up to and
    including the first end token), the usage an OpenAI response reports."""
    eos = [] if eos_token_id is None else np.atleast_1d(eos_token_id)
    counted = []
    for answer, length, row in zip(answers, prompt_lengths, new_ids):
        ends = np.flatnonzero(np.isin(row, eos))
        completion = int(ends[0]) + 1 if len(ends) else len(row)
        counted.append({**answer, "prompt_tokens": int(length), "completion_tokens": completion})
    return counted
