"""A one-line progress bar on stderr, redrawn in place with a carriage return."""

from __future__ import annotations

import time
from typing import TextIO

_BAR_WIDTH = 28
# Redraw at most this often: a file of 100k items must not flood a log with 100k frames.
_MIN_INTERVAL_S = 0.1


def bar(frac: float) -> str:
    """``[####....]`` filled to ``frac`` (0 to 1)."""
    filled = int(min(max(frac, 0.0), 1.0) * _BAR_WIDTH)
    return f"[{'#' * filled}{'.' * (_BAR_WIDTH - filled)}]"


class Progress:
    """Counts items done out of ``total``; ``update`` takes a delta. Does nothing when disabled."""

    def __init__(
        self, total: int, label: str, stream: TextIO, *, enabled: bool = True, unit: str = "items"
    ) -> None:
        self.total = max(total, 0)
        self.label = label
        self.unit = unit
        self.stream = stream
        self.enabled = enabled
        self.done = 0
        self._start = time.monotonic()
        self._last_draw = 0.0
        self._last_len = 0
        self._drawn_done = -1
        self._closed = False

    def update(self, n: int, *, force: bool = False) -> None:
        """Count ``n`` more done; redraw unless the last frame is too recent (``force``: redraw anyway)."""
        self.done += n
        now = time.monotonic()
        if force or now - self._last_draw >= _MIN_INTERVAL_S or self.done >= self.total:
            self._draw(now)

    def close(self) -> None:
        """Draw the final state and end the line. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self.enabled:
            if self._drawn_done != self.done:  # update() may have drawn the final frame already
                self._draw(time.monotonic())
            self.stream.write("\n")
            self.stream.flush()

    def render(self, now: float) -> str:
        frac = min(self.done / self.total, 1.0) if self.total else 1.0
        return f"{self.label} {bar(frac)} {self.done}/{self.total} {frac:4.0%} {self.detail(now)}"

    def detail(self, now: float) -> str:
        """What follows the count: the rate. Subclasses show something else."""
        elapsed = max(now - self._start, 1e-9)
        return f"{self.done / elapsed:.0f} {self.unit}/s"

    def _draw(self, now: float) -> None:
        if not self.enabled:
            return
        line = self.render(now)
        # Pad over the previous frame's tail instead of an ANSI erase, which a log file would keep as junk.
        self.stream.write("\r" + line.ljust(self._last_len))
        self.stream.flush()
        self._last_len = len(line)
        self._last_draw = now
        self._drawn_done = self.done
