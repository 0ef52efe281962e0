"""A dependency-free progress bar with images per second."""
from __future__ import annotations

import sys
import time


class Progress:
    """``Progress(total_steps, desc)``; call ``update(n_images, **stats)`` per step and ``close()``.
    On a terminal it redraws one line; otherwise (logs, CI) it prints a line every ``interval``
    seconds (the loop prints a summary line per epoch anyway)."""

    def __init__(self, total: int, desc: str = "", enabled: bool = True, stream=None, width: int = 24,
                 interval: float = 30.0):
        self.total = max(int(total), 1)
        self.desc = desc
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.width = width
        self.step = 0
        self.images = 0
        self.t0 = time.perf_counter()
        self._last_draw = time.perf_counter()
        self.interval = interval

    @property
    def rate(self) -> float:
        dt = time.perf_counter() - self.t0
        return self.images / dt if dt > 0 else 0.0

    def _line(self, stats: dict) -> str:
        frac = self.step / self.total
        filled = int(round(frac * self.width))
        bar = "#" * filled + "." * (self.width - filled)
        extra = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in stats.items())
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / self.step * (self.total - self.step) if self.step else 0.0
        return (f"{self.desc} [{bar}] {self.step}/{self.total} {self.rate:7.1f} img/s "
                f"{elapsed:5.0f}s<{eta:4.0f}s {extra}")

    def update(self, n_images: int, **stats) -> None:
        self.step += 1
        self.images += int(n_images)
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.tty:
            if now - self._last_draw > 0.2 or self.step == self.total or self.step == 1:
                self.stream.write("\r" + self._line(stats) + "\033[K")
                self.stream.flush()
                self._last_draw = now
        elif now - self._last_draw >= self.interval and self.step < self.total:
            self.stream.write(self._line(stats) + "\n")
            self.stream.flush()
            self._last_draw = now

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()
