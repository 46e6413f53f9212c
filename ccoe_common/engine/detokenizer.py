"""Turning a growing list of token ids into text deltas, and finding stop strings.

Byte-level tokenizers can split one character over several tokens; a delta is only released
once it no longer ends in a partial character (U+FFFD). Text that might be the start of a stop
string is held back until it is known not to be one, so a stop string never leaks into a
stream.
"""

from __future__ import annotations

from collections.abc import Sequence

_PARTIAL = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.token_ids: list[int] = []
        self.text = ""  # all text decoded so far (final once no partial char remains)
        self.emitted = 0  # characters of `text` already released
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Add one token; return the text now safe to release ("" if none)."""
        self.token_ids.append(token_id)
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        if text.endswith(_PARTIAL):
            return ""
        self.text = text
        return self._release(final=False)

    def finish(self) -> str:
        """Release whatever is held back (end of generation without a stop string)."""
        if self.stopped:
            return ""
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        limit = len(self.text)
        for s in self.stop:
            at = self.text.find(s, max(0, self.emitted - len(s) + 1))
            if at != -1 and at < limit:
                limit = at
                self.stopped = True
        if self.stopped:
            self.text = self.text[:limit]
        elif not final and self.stop:
            # Hold back a tail that could still grow into a stop string.
            for keep in range(min(max(map(len, self.stop)) - 1, limit - self.emitted), 0, -1):
                tail = self.text[limit - keep:limit]
                if any(s.startswith(tail) for s in self.stop):
                    limit -= keep
                    break
        delta = self.text[self.emitted:limit]
        self.emitted = max(self.emitted, limit)
        return delta
