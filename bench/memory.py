"""Peak resident memory of the running process, for the benchmarks (Linux ``/proc``)."""

from __future__ import annotations

import os
import threading


class PeakRSS:
    """Samples this process's resident memory every 10 ms while the ``with`` block runs.

    ``peak`` is the highest RSS seen (bytes); ``extra_bytes`` is the peak above the level at entry.
    """

    def __enter__(self) -> "PeakRSS":
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self._rss())

    @property
    def extra_bytes(self) -> int:
        return self.peak - self.base
