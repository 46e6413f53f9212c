"""Turning a growing list of token ids into text deltas, and finding stop strings.

Byte-level tokenizers can split one character over several tokens; a delta is only released
once it no longer ends in a partial character (U+FFFD). Text that might be the start of a stop
string is held back until it is known not to be one, so a stop string never leaks into a
stream.
"""

from __future__ import annotations

from collections.abc import Sequence

_PARTIAL = "\ufffd"


# Tokens decoded again with each new one: enough context for the tokenizer to join pieces
# (byte-level merges, leading-space rules) without re-decoding the whole output every token.
_CONTEXT = 6


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.token_ids: list[int] = []
        self.text = ""  # all text decoded so far (final once no partial char remains)
        self.emitted = 0  # characters of `text` already released
        self.stopped = False
        self._done = 0  # tokens whose text is already in self.text

    def add(self, token_id: int) -> str:
        """Add one token; return the text now safe to release ("" if none)."""
        self.token_ids.append(token_id)
        start = max(0, self._done - _CONTEXT)
        decode = self.tokenizer.decode
        prefix = decode(self.token_ids[start:self._done], skip_special_tokens=True)
        window = decode(self.token_ids[start:], skip_special_tokens=True)
        if window.endswith(_PARTIAL) or not window.startswith(prefix):
            return ""  # a character still incomplete: wait for the next token
        self.text += window[len(prefix):]
        self._done = len(self.token_ids)
        return self._release(final=False)

    def finish(self) -> str:
        """Release whatever is held back (end of generation without a stop string), including
        a trailing incomplete character, as U+FFFD."""
        if self.stopped:
            return ""
        if self._done < len(self.token_ids):
            start = max(0, self._done - _CONTEXT)
            prefix = self.tokenizer.decode(self.token_ids[start:self._done], skip_special_tokens=True)
            window = self.tokenizer.decode(self.token_ids[start:], skip_special_tokens=True)
            self.text += window[len(prefix):] if window.startswith(prefix) else window
            self._done = len(self.token_ids)
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
