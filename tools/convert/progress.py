"""A one-line progress bar on stderr: items done (tensors, chunks), amount done (MB, tokens), rate, time left.

On a terminal the line is redrawn in place (at most ten times a second); into a log or a pipe it writes a
line per tenth of the work, as llama.cpp's tools log their steps, rather than a redraw per item. Disabled,
it only counts (library calls and tests stay silent)."""
from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, total_bytes: int, n_tensors: int, stream: TextIO | None = None, enabled: bool = True,
                 unit: str = "MB", scale: float = 1e6):
        """total_bytes: the whole amount, in `unit` * `scale` (bytes shown as MB by default); n_tensors: items."""
        self.total_bytes = max(total_bytes, 1)
        self.n_tensors = n_tensors
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.interactive = enabled and self.stream.isatty()
        self.unit, self.scale = unit, scale
        self.done_bytes = 0
        self.done_tensors = 0
        self.start = time.perf_counter()
        self._last_draw = 0.0
        self._last_decile = -1

    @property
    def mb_per_s(self) -> float:
        """Rate in `unit` per second."""
        return self.done_bytes / self.scale / max(time.perf_counter() - self.start, 1e-9)

    def update(self, name: str, nbytes: int, tensor_done: bool = True) -> None:
        """`nbytes` more of item `name` done (a slab of a tensor's rows; the last one with tensor_done)."""
        self.done_bytes += nbytes
        self.done_tensors += int(tensor_done)
        if not self.enabled:
            return
        frac = min(self.done_bytes / self.total_bytes, 1.0)
        spent = time.perf_counter() - self.start
        left = spent / frac * (1 - frac) if frac > 0 else 0.0
        amount = (f"{self.done_bytes / self.scale:.1f}/{self.total_bytes / self.scale:.1f}" if self.scale != 1
                  else f"{self.done_bytes}/{self.total_bytes}")
        line = (f"{self.done_tensors:4d}/{self.n_tensors} [{'#' * int(frac * 30):<30}] {amount} {self.unit} "
                f"{self.mb_per_s:7.1f} {self.unit}/s {spent:5.0f} s, {left:.0f} s left  {name}")
        last = tensor_done and self.done_tensors == self.n_tensors
        now = time.perf_counter()
        if self.interactive:
            if now - self._last_draw > 0.1 or last:
                self.stream.write("\r\x1b[K" + line)
                self.stream.flush()
                self._last_draw = now
        elif int(frac * 10) != self._last_decile or last:
            self._last_decile = int(frac * 10)
            self.stream.write(line + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.interactive:
            self.stream.write("\n")
            self.stream.flush()
