"""Timing and peak-memory measurement shared by the benchmarks."""

from __future__ import annotations

import gc
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch


def resident_bytes() -> int:
    """Resident set size of this process in bytes (Linux /proc)."""
    with open("/proc/self/statm", "rb") as statm:
        resident_pages = int(statm.read().split()[1])
    return resident_pages * _PAGE_SIZE


_PAGE_SIZE = __import__("os").sysconf("SC_PAGE_SIZE")


class PeakResidentSampler:
    """Context manager that samples the resident memory in a thread and records its peak above the start."""

    def __init__(self, interval_s: float = 0.0005):
        self.interval_s = interval_s
        self.peak_extra_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "PeakResidentSampler":
        gc.collect()
        self._start = resident_bytes()
        self._peak = self._start
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, resident_bytes())
            time.sleep(self.interval_s)

    def __exit__(self, *exc) -> None:
        self._peak = max(self._peak, resident_bytes())
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self.peak_extra_bytes = max(0, self._peak - self._start)


@dataclass
class Measurement:
    """Median wall time over repeats and the largest peak extra resident memory seen."""

    median_s: float
    times_s: list[float]
    peak_extra_bytes: int

    def as_dict(self, reference_bytes: int | None = None) -> dict:
        result = {"median_s": self.median_s, "times_s": self.times_s, "peak_extra_bytes": self.peak_extra_bytes}
        if reference_bytes:
            result["peak_extra_vs_reference"] = self.peak_extra_bytes / reference_bytes
        return result


def measure(function: Callable[[], object], repeats: int = 5, warmup: int = 1) -> Measurement:
    """Time `function` `repeats` times after `warmup` calls, sampling peak resident memory in each call.

    The result of each call is dropped before the next one, so memory held by outputs counts in the
    call that produced it and not afterwards.
    """
    for _ in range(warmup):
        function()
    times, peaks = [], []
    for _ in range(repeats):
        with PeakResidentSampler() as sampler:
            start = time.perf_counter()
            result = function()
            if isinstance(result, torch.Tensor) and result.is_cuda:
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
            del result
        times.append(elapsed)
        peaks.append(sampler.peak_extra_bytes)
    return Measurement(median_s=statistics.median(times), times_s=times, peak_extra_bytes=max(peaks))
