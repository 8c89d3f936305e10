"""A one-line progress bar over tensors on stderr: tensors done, bytes done, MB/s."""
from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, total_bytes: int, n_tensors: int, stream: TextIO | None = None, enabled: bool = True):
        self.total_bytes = max(total_bytes, 1)
        self.n_tensors = n_tensors
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.interactive = enabled and self.stream.isatty()
        self.done_bytes = 0
        self.done_tensors = 0
        self.start = time.perf_counter()
        self._last_draw = 0.0
        self._last_decile = -1

    @property
    def mb_per_s(self) -> float:
        return self.done_bytes / 1e6 / max(time.perf_counter() - self.start, 1e-9)

    def update(self, name: str, nbytes: int) -> None:
        self.done_bytes += nbytes
        self.done_tensors += 1
        if not self.enabled:
            return
        frac = self.done_bytes / self.total_bytes
        line = (f"{self.done_tensors:4d}/{self.n_tensors} [{'#' * int(frac * 30):<30}] "
                f"{self.done_bytes / 1e6:8.1f}/{self.total_bytes / 1e6:.1f} MB {self.mb_per_s:7.1f} MB/s  {name}")
        now = time.perf_counter()
        if self.interactive:
            if now - self._last_draw > 0.1 or self.done_tensors == self.n_tensors:
                self.stream.write("\r\x1b[K" + line)
                self.stream.flush()
                self._last_draw = now
        elif int(frac * 10) != self._last_decile or self.done_tensors == self.n_tensors:
            # logs and pipes get a line per 10%, not a redraw per tensor
            self._last_decile = int(frac * 10)
            self.stream.write(line + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.interactive:
            self.stream.write("\n")
            self.stream.flush()
