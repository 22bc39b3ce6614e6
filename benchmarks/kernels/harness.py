"""Generic timing harness: CUDA events when the work runs on a GPU, else
``time.perf_counter`` around each call."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def _quantile(sorted_vals: list[float], q: float) -> float:
    if len(sorted_vals) == 1:
        return sorted_vals[0]
    pos = q * (len(sorted_vals) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def time_cuda(fn: Callable[[], object], warmup: int = 3, iters: int = 10,
              device: str | None = None) -> dict:
    """Time ``fn()``: ``{"median_ms", "p10", "p90", "mean_ms", "min_ms", "iters", "timer"}``.

    Uses CUDA events when CUDA is available and ``device`` is not a CPU
    device, else ``perf_counter``.  ``warmup`` untimed calls come first.
    """
    if iters < 1:
        raise ValueError("iters must be >= 1")
    import torch

    use_cuda = torch.cuda.is_available() and not (device and str(device).startswith("cpu"))
    for _ in range(warmup):
        fn()
    times: list[float] = []
    if use_cuda:
        torch.cuda.synchronize()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        for s, e in zip(starts, ends):
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
        timer = "cuda-event"
    else:
        for _ in range(iters):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1000.0)
        timer = "perf_counter"
    ts = sorted(times)
    return {
        "median_ms": statistics.median(ts),
        "p10": _quantile(ts, 0.10),
        "p90": _quantile(ts, 0.90),
        "mean_ms": statistics.fmean(ts),
        "min_ms": ts[0],
        "iters": iters,
        "warmup": warmup,
        "timer": timer,
    }
