"""Incremental detokenization with stop strings: emits only text that is final."""

from __future__ import annotations

from collections.abc import Callable

from transformers import PreTrainedTokenizerBase


class TextStream:
    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        stop: list[str] | tuple[str, ...] = (),
        on_text: Callable[[str], None] | None = None,
    ):
        self.tokenizer, self.stop, self.on_text = tokenizer, [s for s in stop if s], on_text
        self.ids: list[int] = []
        self.text = ""  # the final text so far (up to a stop string, when one was hit)
        self.sent = 0  # characters of self.text already given to on_text

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, new_ids: list[int]) -> int | None:
        """Add tokens; if a stop string now appears, return how many of new_ids end at it (else None)."""
        before = len(self.ids)
        self.ids.extend(new_ids)
        text = self.decode(self.ids)
        hit = self._first_stop(text)
        if hit is not None:
            # the fewest new tokens whose text already contains the stop string
            keep = next(m for m in range(1, len(new_ids) + 1) if self._first_stop(self.decode(self.ids[: before + m])) is not None)
            del self.ids[before + keep :]
            self.text = text[:hit]
            self._emit(len(self.text))
            return keep
        self.text = text
        self._emit(self._safe_end(text))
        return None

    def finish(self) -> str:
        self._emit(len(self.text))
        return self.text

    def _first_stop(self, text: str) -> int | None:
        found = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        return min(found) if found else None

    def _safe_end(self, text: str) -> int:
        """Hold back a trailing partial character and any tail that could still grow into a stop string."""
        end = len(text.rstrip("\ufffd"))
        held = max(
            (n for s in self.stop for n in range(1, min(len(s) - 1, end) + 1) if text[end - n : end] == s[:n]),
            default=0,
        )
        return max(end - held, self.sent)

    def _emit(self, end: int) -> None:
        if end > self.sent:
            if self.on_text is not None:
                self.on_text(self.text[self.sent : end])
            self.sent = end
