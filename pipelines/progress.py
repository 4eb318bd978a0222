"""Progress lines for long stages: done/total, rate and ETA, at most every few seconds."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, label: str, total: int, unit: str = "rows", quiet: bool = False, every_s: float = 5.0):
        self.label, self.total, self.unit, self.quiet, self.every_s = label, total, unit, quiet, every_s
        self.done = 0
        self.start = self.last = time.perf_counter()

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last >= self.every_s:
            self.last = now
            self._print(now)

    def finish(self) -> float:
        now = time.perf_counter()
        self._print(now, final=True)
        return now - self.start

    def _print(self, now: float, final: bool = False) -> None:
        if self.quiet:
            return
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        line = f"[data] {self.label}: {self.done:,}/{self.total:,} {self.unit}"
        if final:
            line += f" in {elapsed:.1f}s ({rate:.1f} {self.unit}/s)"
        else:
            pct = 100 * self.done / max(self.total, 1)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            line += f" ({pct:.0f}%, {rate:.1f} {self.unit}/s, eta {eta:.0f}s)"
        print(line, file=sys.stderr, flush=True)


def say(message: str, quiet: bool = False) -> None:
    if not quiet:
        print(f"[data] {message}", file=sys.stderr, flush=True)
