"""A reply's tokens, as generation picks them, turned into the text deltas of a streamed completion.

The deltas must add up to the reply the non-streamed path returns: the captioner strips the
decoded text and, for Video-LLaMA, cuts it at its separator. So a delta never holds leading or
trailing white space (trailing space goes out with the next word), nor the start of the separator,
nor half a character that a later token completes; :meth:`TextStream.finish` sends what is left.
"""
from __future__ import annotations

from typing import Callable


class TextStream:
    """Text deltas of one reply from its token ids (``decode``: ids -> text, special tokens skipped)."""

    def __init__(self, decode: Callable[[list[int]], str], stop: str = ""):
        self.decode, self.stop = decode, stop
        self.ids: list[int] = []
        self.sent = ""
        self.stopped = False

    def _held_back(self, text: str) -> str:
        """``text`` without a tail that may be the start of the stop string."""
        for size in range(min(len(self.stop) - 1, len(text)), 0, -1):
            if text.endswith(self.stop[:size]):
                return text[:-size].rstrip()
        return text

    def add(self, token: int) -> str:
        """The new text once ``token`` is added ('' while it is held back)."""
        if self.stopped:
            return ""
        self.ids.append(token)
        text = self.decode(self.ids).lstrip()
        if self.stop and self.stop in text:
            text, self.stopped = text[:text.index(self.stop)], True
        text = text.rstrip()
        if text.endswith("\ufffd"):  # a character split over tokens
            return ""
        if self.stop and not self.stopped:
            text = self._held_back(text)
        if not text.startswith(self.sent):  # the tokenizer re-joined earlier text: wait for the end
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta

    def finish(self, final: str) -> str:
        """What the final reply has beyond the deltas sent."""
        return final[len(self.sent):] if final.startswith(self.sent) else ""
