"""Incremental detokenisation with stop strings: token ids in, text that is safe to stream out.

Two things make "decode the new tokens and send them" wrong. A byte-level BPE token can end in
the middle of a UTF-8 character, which decodes to U+FFFD until the next token completes it; and a
stop string may be split over several tokens, so text that could be the start of one must be held
back until it is known not to be (OpenAI's API never shows the stop string itself).

Ids are kept pending until they decode to whole characters and then committed to the text, so
each push decodes only a few ids, not the whole sequence (decoding is not additive in general,
but it is at character boundaries for byte-level tokenizers, which is where the cut is made).
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"
MAX_PENDING = 8  # ids that never complete a character (invalid bytes) are committed as they are


class TextStream:
    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tok, self.stop = tokenizer, tuple(s for s in stop if s)
        self.text = ""  # decoded from committed ids
        self.pending: list[int] = []
        self.sent = 0  # characters of the text already handed out
        self.stopped = False  # a stop string appeared; nothing more is handed out

    def _full(self) -> tuple[str, bool]:
        """(committed text + the pending ids' text, whether the end may be an incomplete character)."""
        piece = self.tok.decode(self.pending) if self.pending else ""
        if not piece.endswith(REPLACEMENT) or len(self.pending) >= MAX_PENDING:
            self.text += piece
            self.pending = []
            return self.text, False
        return self.text + piece.rstrip(REPLACEMENT), True

    def push(self, ids: list[int]) -> str:
        """Add generated ids (EOS excluded); -> the text that may be streamed now."""
        if self.stopped:
            return ""
        self.pending.extend(ids)
        full, _ = self._full()
        start = max(0, self.sent - max((len(s) for s in self.stop), default=0))
        hits = [i for i in (full.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            return self._take(full, min(hits))
        return self._take(full, len(full) - self._held_back(full))

    def flush(self) -> str:
        """At the end of generation: everything not yet handed out (a dangling partial character too)."""
        if self.stopped:
            return ""
        piece = self.tok.decode(self.pending) if self.pending else ""
        self.text, self.pending = self.text + piece, []
        return self._take(self.text, len(self.text))

    def _held_back(self, full: str) -> int:
        """Characters at the end of `full` that begin some stop string."""
        return max((k for s in self.stop for k in range(min(len(s) - 1, len(full)), 0, -1)
                    if full.endswith(s[:k])), default=0)

    def _take(self, full: str, end: int) -> str:
        end = max(end, self.sent)
        out, self.sent = full[self.sent:end], end
        return out
