"""A task's output: bytes from the process, decoded as UTF-8 incrementally."""

from __future__ import annotations

import codecs


class OutputLog:
    """Decoded output of one task, appended in arrival order.

    Decoding is incremental, so a character split across two reads stays whole, and bytes
    that are not UTF-8 become U+FFFD instead of raising.
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._chunks: list[str] = []
        self._joined: str | None = ""

    def feed(self, data: bytes) -> str:
        """Append raw bytes; return the text they completed (may be empty)."""
        return self._append(self._decoder.decode(data))

    def close(self) -> str:
        """Flush a trailing incomplete character (as U+FFFD); return what it added."""
        return self._append(self._decoder.decode(b"", final=True))

    def _append(self, text: str) -> str:
        if text:
            self._chunks.append(text)
            self._joined = None
        return text

    def text(self) -> str:
        if self._joined is None:
            # Join once per change, then keep one chunk: reads between appends stay cheap.
            self._joined = "".join(self._chunks)
            self._chunks = [self._joined]
        return self._joined

    def tail_lines(self, count: int, window: int = 65536) -> list[str]:
        """The last `count` lines within the last `window` characters."""
        return self.text()[-window:].splitlines()[-count:]
