"""Host-side timestamps and torch.profiler ranges of the offload path, for benchmarks (benchmarks/gpu_offload.py
--profile): where a follow-up's time goes between its arrival and its first token.

``span(name, **fields)`` is a torch.profiler range named ``name`` (all start with "kvplug.offload.") while a
profiler runs, and, while ``enable()``d, an event {name, t0, t1, fields} in a bounded buffer; otherwise it does
nothing (no dispatcher call, no allocation beyond the caller's dict). ``mark`` is an instant event. Timestamps are
``time.perf_counter()``: CLOCK_MONOTONIC on Linux, the same clock in every process of the host, so a benchmark
can place the engine's events between its own calls. The buffer is per process: with one worker, vLLM runs the
scheduler and the worker in the engine-core process, so one ``enable()`` through ``collective_rpc`` covers both
(with tensor parallelism the scheduler's events stay in its own process).
"""
from __future__ import annotations

import collections
import contextlib
import time

import torch
from torch.profiler import record_function

MAX_EVENTS = 4096
_events: collections.deque = collections.deque(maxlen=MAX_EVENTS)
_on = [False]


def enable(on: bool = True) -> None:
    _on[0] = on
    _events.clear()


def enabled() -> bool:
    return _on[0]


def take() -> list[dict]:
    """The events recorded since the last take (oldest first), and forget them."""
    out = list(_events)
    _events.clear()
    return out


def profiled(name: str):
    """The profiler range alone (per-layer work: no event, a dispatcher call only while a profiler runs)."""
    return record_function(name) if torch.autograd._profiler_enabled() else contextlib.nullcontext()


@contextlib.contextmanager
def span(name: str, **fields):
    """Yields ``fields`` (the caller may add results to it before the span ends)."""
    if not _on[0]:
        with profiled(name):
            yield fields
        return
    t0 = time.perf_counter()
    with profiled(name):
        yield fields
    _events.append({"name": name, "t0": t0, "t1": time.perf_counter(), **fields})


def mark(name: str, **fields) -> None:
    if _on[0]:
        now = time.perf_counter()
        _events.append({"name": name, "t0": now, "t1": now, **fields})
