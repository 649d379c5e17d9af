"""Timing and peak-memory measurement shared by the benchmarks."""

from __future__ import annotations

import contextlib
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


def synchronize(device: torch.device | str) -> None:
    """Wait for queued kernels on an accelerator, so that wall time covers them; nothing to wait for on CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class ComponentTimer:
    """Accumulates wall time of chosen methods while they are wrapped by `wrap`.

    `wrap(owner, "method", "component")` replaces the method on that one object by a timed version
    (an instance attribute, so other objects of the class are untouched) and restores it on exit.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()

    @contextlib.contextmanager
    def wrap(self, owner: object, method_name: str, component: str):
        original = getattr(owner, method_name)
        shadowed = method_name in vars(owner)

        def timed(*args, **kwargs):
            synchronize(self.device)
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                synchronize(self.device)
                self.seconds[component] = self.seconds.get(component, 0.0) + time.perf_counter() - start
                self.calls[component] = self.calls.get(component, 0) + 1

        setattr(owner, method_name, timed)
        try:
            yield self
        finally:
            if shadowed:
                setattr(owner, method_name, original)
            else:
                delattr(owner, method_name)


def matmul_peaks(size: int, device: torch.device | str = "cpu", previous: dict | None = None) -> dict:
    """Measure the float32 and bfloat16 matmul peaks; with `previous`, keep the better of the two measurements.

    Benchmarks measure before and after their runs, so one burst of load from another process does not
    set the reference that every achieved FLOP/s is divided by.
    """
    peaks = {}
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        peak = matmul_peak(dtype, size, device=device)
        if previous is not None and previous[name]["flop_per_s"] > peak["flop_per_s"]:
            peak = previous[name]
        peaks[name] = peak
    return peaks


def matmul_peak(dtype: torch.dtype, size: int = 2048, repeats: int = 10, device: torch.device | str = "cpu") -> dict:
    """Measure the best achieved FLOP/s of a square `size` matmul in `dtype` (2 * size**3 FLOP per product)."""
    generator = torch.Generator().manual_seed(0)
    left = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    right = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    left @ right  # warm-up: the first call selects and loads the kernel
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        left @ right
        synchronize(device)
        times.append(time.perf_counter() - start)
    flops = 2.0 * size**3
    return {"dtype": str(dtype).removeprefix("torch."), "size": size, "best_s": min(times),
            "median_s": statistics.median(times), "flop_per_s": flops / min(times)}


def count_flops(function: Callable[[], object]) -> int:
    """Count the floating-point operations of one call with PyTorch's FlopCounterMode (matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        function()
    return int(counter.get_total_flops())


def transformer_forward_flops(config, batch_size: int) -> int:
    """FLOP of one `XDLMTransformer` forward on `batch_size` grids, counting matmuls at 2 FLOP per multiply-add.

    Per block and token: qkv (3 D^2), output projection (D^2) and the MLP (2 r D^2) multiply-adds; per
    block and row, QK^T and attention times V (2 L^2 D); then the output head (D V per token) and the
    adaLN modulation (6 D^2 per block and 2 D^2 final, per row). Layer norms, softmax and GELU are left
    out, as FLOP counts of transformers usually do; they are a few percent at these widths.
    """
    width, depth, length = config.hidden_size, config.depth, config.grid_size**2
    mlp_width = int(width * config.mlp_ratio)
    per_token = depth * (4 * width * width + 2 * width * mlp_width) + width * config.vocab_size
    per_row = depth * (2 * length * length * width + 6 * width * width) + 2 * width * width
    return 2 * batch_size * (length * per_token + per_row)
