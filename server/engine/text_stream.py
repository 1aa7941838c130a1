"""Incremental detokenization with stop strings: bytes of token pieces in, safe text deltas out.

Never emits half a UTF-8 character (pieces of byte-level BPE split characters across tokens) and never
emits any part of a stop string, even when the stop string is split across tokens: text that could be the
start of a stop string is held back until the next piece decides.
"""

from __future__ import annotations

import codecs


class TextStream:
    def __init__(self, stop: tuple[str, ...] = ()) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = tuple(s for s in stop if s)
        self._held = ""  # decoded text that may still turn out to begin a stop string
        self.stopped = False  # a stop string was found; nothing more is emitted

    def push(self, piece: bytes) -> str:
        """Add one token's bytes; return the text that is now safe to emit."""
        if self.stopped:
            return ""
        self._held += self._decoder.decode(piece)
        if not self._stop:
            text, self._held = self._held, ""
            return text
        stop_at = self._first_stop_index()
        if stop_at is not None:
            self.stopped = True
            text, self._held = self._held[:stop_at], ""
            return text
        keep = self._longest_partial_stop_suffix()
        cut = len(self._held) - keep
        text, self._held = self._held[:cut], self._held[cut:]
        return text

    def flush(self) -> str:
        """At the end of generation: whatever is held (an unfinished character becomes U+FFFD)."""
        if self.stopped:
            return ""
        self._held += self._decoder.decode(b"", final=True)
        text, self._held = self._held, ""
        stop_at = self._first_stop_index_in(text)
        if stop_at is not None:
            self.stopped = True
            return text[:stop_at]
        return text

    def _first_stop_index(self) -> int | None:
        return self._first_stop_index_in(self._held)

    def _first_stop_index_in(self, text: str) -> int | None:
        found = [i for i in (text.find(s) for s in self._stop) if i >= 0]
        return min(found) if found else None

    def _longest_partial_stop_suffix(self) -> int:
        """Length of the longest suffix of the held text that is a proper prefix of some stop string."""
        held = self._held
        best = 0
        for stop in self._stop:
            for length in range(min(len(stop) - 1, len(held)), best, -1):
                if held.endswith(stop[:length]):
                    best = length
                    break
        return best
