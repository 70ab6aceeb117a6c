"""Incremental detokenisation: the text each newly sampled token adds to a stream.

Decoding one token alone is wrong for byte-level vocabularies (a multi-byte character spans tokens, and
a leading space depends on the token before). So, as vLLM does, the text is decoded over a short window
that starts a few tokens back: the delta is what the window with the new tokens adds to the window
without them, held back while it ends in an incomplete character (U+FFFD).

    detok = IncrementalDetokenizer(tokenizer, prompt_ids)
    for token in generated:
        text += detok.add([token])
    text += detok.flush()          # at the end: whatever was held back
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

__all__ = ["IncrementalDetokenizer"]

_CONTEXT = 5  # tokens of the prompt decoded before the first generated one (leading spaces, merges)


class Decoder(Protocol):
    def decode(self, ids: Sequence[int]) -> str: ...


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Decoder, prompt_ids: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-_CONTEXT:])
        self.prefix = 0  # the window starts here
        self.read = len(self.ids)  # text of ids[prefix:read] has been emitted (or is the prompt's)

    def add(self, token_ids: Sequence[int]) -> str:
        """The text `token_ids` complete ("" while a character is still incomplete)."""
        self.ids.extend(token_ids)
        before = self.tokenizer.decode(self.ids[self.prefix : self.read])
        after = self.tokenizer.decode(self.ids[self.prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before) :]

    def flush(self) -> str:
        """What is still held back (an incomplete character decodes as U+FFFD)."""
        before = self.tokenizer.decode(self.ids[self.prefix : self.read])
        after = self.tokenizer.decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return after[len(before) :] if len(after) > len(before) else ""
