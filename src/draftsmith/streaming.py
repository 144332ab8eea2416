"""Incremental detokenization with stop strings: emits only text that is final, in time linear in the output.

Decoding the whole output again at every step, and searching all of it for stop strings, costs time
quadratic in its length. Instead a window of recent ids is decoded (the prefix-offset technique of
incremental detokenizers): the text the window adds is decode(ids[prefix:]) minus decode(ids[prefix:read]).
The tokens in ids[prefix:read] are context only: they give the first new token its leading space (which
SentencePiece drops at the start of a decode) and the bytes a split character continues. The window moves
on once its text ends in a whole character, so it spans about two steps.

Stop strings are searched only in text not yet emitted: the new text plus the held-back tail, which is at
most the longest stop string less one character (any longer tail could not still grow into a stop string).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

PARTIAL = "\ufffd"  # what decoding shows for the bytes of a character that is not complete yet
# A character is at most 4 bytes, so a partial one spans at most 3 tokens: a window this far past `read`
# that still ends in PARTIAL ends in bytes that are no character at all (a model emitting invalid UTF-8).
# It moves on anyway, or it would grow without end and each step would decode all of it again.
MAX_PENDING_TOKENS = 16


@dataclass
class _Window:
    """Where decoding stands: the part of the state a stop hit rolls back to retry token by token."""

    n_ids: int = 0
    prefix: int = 0  # ids[prefix:read] are context, their text already counted
    read: int = 0
    prefix_text: str = ""  # decode(ids[prefix:read])
    seen: int = 0  # characters of the window's new text (beyond prefix_text) already counted
    held: str = ""  # counted but not emitted: it could be the start of a stop string
    ready: str = ""  # final, to hand to on_text


class TextStream:
    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        stop: list[str] | tuple[str, ...] = (),
        on_text: Callable[[str], None] | None = None,
    ):
        self.tokenizer, self.stop, self.on_text = tokenizer, [s for s in stop if s], on_text
        self.ids: list[int] = []
        self.stopped = False
        self._emitted: list[str] = []  # the pieces given to on_text, in order
        self._w = _Window()

    @property
    def text(self) -> str:
        """The final text so far (up to a stop string, when one was hit), held-back tail included."""
        return "".join(self._emitted) + self._w.ready + self._w.held

    def decode(self, ids: list[int]) -> str:
        # no clean-up of spaces: it rewrites " ." in code, and it differs between a window and the whole text
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, new_ids: list[int]) -> int | None:
        """Add tokens; if a stop string now appears, return how many of new_ids end at it (else None)."""
        if self.stopped:
            return 0
        before = _Window(**vars(self._w))
        if self._advance(new_ids) is None:
            self._flush()
            return None
        # a stop string appeared: find the fewest new tokens that complete it, decoding them one at a time
        del self.ids[before.n_ids:]
        self._w = before
        for kept, token in enumerate(new_ids, 1):
            hit = self._advance([token])
            if hit is not None:
                self._w.ready += self._w.held[:hit]
                self._w.held = ""
                self.stopped = True
                self._flush()
                return kept
        self._flush()  # unreachable unless decoding one by one differs from decoding together
        return None

    def finish(self) -> str:
        """Emit the held-back tail (no stop string completed it) and any trailing partial character."""
        if not self.stopped:
            self._w.held += self._fresh_text(partial_ok=True)
            self._w.ready += self._w.held
            self._w.held = ""
        self._flush()
        return self.text

    def _fresh_text(self, partial_ok: bool) -> str:
        """Text of the window not counted yet; moves the window on when its text ends in a whole character."""
        w = self._w
        window_text = self.decode(self.ids[w.prefix:])
        moving_on = (partial_ok or not window_text.endswith(PARTIAL)
                     or len(self.ids) - w.read > MAX_PENDING_TOKENS)
        complete = window_text if moving_on else window_text.rstrip(PARTIAL)
        new = complete[len(w.prefix_text):]
        fresh = new[w.seen:]
        w.seen = max(w.seen, len(new))
        if moving_on:
            w.prefix, w.read = w.read, len(self.ids)
            w.prefix_text = self.decode(self.ids[w.prefix:w.read])
            w.seen = 0
        return fresh

    def _advance(self, new_ids: list[int]) -> int | None:
        """Decode new_ids into the held text. Return the index in `held` of the first stop string, or None
        (then move what can no longer start a stop string to `ready`)."""
        self.ids.extend(new_ids)
        w = self._w
        w.n_ids = len(self.ids)
        w.held += self._fresh_text(partial_ok=False)
        found = [i for i in (w.held.find(s) for s in self.stop) if i >= 0]
        if found:
            return min(found)
        keep = self._stop_prefix_len(w.held)
        w.ready += w.held[:len(w.held) - keep]
        w.held = w.held[len(w.held) - keep:]
        return None

    def _stop_prefix_len(self, text: str) -> int:
        """The longest tail of text that is a proper prefix of a stop string: it may still become one."""
        if not text:
            return 0
        last, longest = text[-1], 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), longest, -1):
                if s[n - 1] == last and text.endswith(s[:n]):
                    longest = n
                    break
        return longest

    def _flush(self) -> None:
        if self._w.ready:
            piece, self._w.ready = self._w.ready, ""
            self._emitted.append(piece)
            if self.on_text is not None:
                self.on_text(piece)
