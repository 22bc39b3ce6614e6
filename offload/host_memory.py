"""Host memory for the CPU tier's layer-wise save segments.

Pinning host memory (cudaHostAlloc) runs at ~2 GiB/s on the H100 host: a fresh 4 GiB context paid ~1.7 s
of it inside its first-turn prefill (BENCHMARKS.md, "turn-1 cost"). ``PinnedPool`` pins the CPU tier's
budget once, at startup (as vLLM's own offloading does), and carves segments out of it; a segment's range
returns to the pool when the tier has dropped every view of it and the copies queued before that moment
have completed. A request larger than what is free falls back to a fresh pinned allocation, so a full or
fragmented pool costs speed, never a save.

``HostMemory`` (plain, unpinned) is the CPU engine's: there is no device to copy from asynchronously.
"""
from __future__ import annotations

import bisect
import collections
import logging
import math
import os
import time
import weakref
from typing import Callable

import torch

logger = logging.getLogger("vllm.kvplug.offload")
ALIGN = 512  # bytes; every dtype's alignment, and cache-line friendly
# Share of the host's available memory the pool may pin up front (the rest stays pageable for everyone else).
MAX_HOST_SHARE = 0.5


def _record_cuda_event(stream):
    ev = torch.cuda.Event()
    ev.record(stream)
    return ev


class HostMemory:
    """Unpinned host tensors (CPU engines)."""

    pinned = False

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device="cpu")

    def stats(self) -> dict[str, float]:
        return {}


def _available_host_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class PinnedPool(HostMemory):
    """One pinned buffer of ``capacity`` bytes, carved first-fit into aligned ranges.

    ``streams``: the streams that read or write segment memory (the connector's save and load lanes). When a
    range's last view dies, an event is recorded on each; the range is reused only once they completed, so a
    copy still in flight never sees its memory handed to another segment.
    """

    def __init__(self, capacity: int, streams: list = (), pin: bool = True,
                 record_event: Callable[[object], object] | None = None) -> None:
        available = _available_host_bytes()
        if available is not None and capacity > available * MAX_HOST_SHARE:
            logger.warning("kvplug offload: CPU tier of %.1f GiB exceeds %.0f%% of the host's available memory "
                           "(%.1f GiB); pinning %.1f GiB up front, the rest on demand", capacity / 2**30,
                           MAX_HOST_SHARE * 100, available / 2**30, available * MAX_HOST_SHARE / 2**30)
            capacity = int(available * MAX_HOST_SHARE)
        self.capacity = max(0, capacity // ALIGN * ALIGN)
        self.pinned = pin
        self._streams = [s for s in streams if s is not None]
        self._record_event = record_event or _record_cuda_event
        t0 = time.perf_counter()
        self._buffer = torch.empty(self.capacity, dtype=torch.uint8, device="cpu", pin_memory=pin)
        self.pin_s = time.perf_counter() - t0
        self._array = self._buffer.numpy()  # numpy slices are the per-range owners (weakref-able buffers)
        self._free_starts: list[int] = [0] if self.capacity else []
        self._free_sizes: dict[int, int] = {0: self.capacity} if self.capacity else {}
        # Ranges whose views died, not yet reused: (start, size, events). Appended from finalizers (any thread,
        # any moment); only the allocating thread takes them off (a deque: both ends are thread-safe).
        self._released: collections.deque = collections.deque()
        self.pooled_allocs = 0
        self.fallback_allocs = 0
        self.fallback_bytes = 0
        if self.capacity:
            logger.info("kvplug offload: pinned %.1f GiB of host memory for the CPU tier in %.1f s",
                        self.capacity / 2**30, self.pin_s)

    # -- allocation -------------------------------------------------------------------------------------

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        size = -(-max(nbytes, 1) // ALIGN) * ALIGN
        start = self._take(size)
        if start is None:
            self.fallback_allocs += 1
            self.fallback_bytes += nbytes
            return torch.empty(shape, dtype=dtype, device="cpu", pin_memory=self.pinned)
        self.pooled_allocs += 1
        owner = self._array[start:start + size]
        weakref.finalize(owner, self._release, start, size).atexit = False
        # frombuffer keeps ``owner`` alive as long as any view of the tensor's storage exists.
        raw = torch.frombuffer(owner, dtype=torch.uint8)
        return raw[:nbytes].view(dtype).view(shape)

    def _take(self, size: int) -> int | None:
        self._reclaim()
        for i, start in enumerate(self._free_starts):
            free = self._free_sizes[start]
            if free >= size:
                del self._free_starts[i], self._free_sizes[start]
                if free > size:
                    self._insert_free(start + size, free - size)
                return start
        return None

    # -- release --------------------------------------------------------------------------------------

    def _release(self, start: int, size: int) -> None:
        try:
            events = [self._record_event(stream) for stream in self._streams]
        except Exception:  # noqa: BLE001 - interpreter shutdown, CUDA torn down: the range is simply not reused
            return
        self._released.append((start, size, events))

    def _reclaim(self) -> None:
        for _ in range(len(self._released)):
            start, size, events = self._released.popleft()
            if all(ev.query() for ev in events):
                self._insert_free(start, size)
            else:
                self._released.append((start, size, events))  # copies still in flight: look again next time

    def _insert_free(self, start: int, size: int) -> None:
        """Add [start, start+size) to the free list, merged with free neighbours."""
        i = bisect.bisect_left(self._free_starts, start)
        if i > 0:
            prev = self._free_starts[i - 1]
            if prev + self._free_sizes[prev] == start:
                start, size = prev, size + self._free_sizes.pop(prev)
                del self._free_starts[i - 1]
                i -= 1
        if i < len(self._free_starts) and start + size == self._free_starts[i]:
            nxt = self._free_starts.pop(i)
            size += self._free_sizes.pop(nxt)
        self._free_starts.insert(i, start)
        self._free_sizes[start] = size

    # -- introspection --------------------------------------------------------------------------------

    def free_bytes(self) -> int:
        self._reclaim()
        return sum(self._free_sizes.values())

    def stats(self) -> dict[str, float]:
        return {"pool_bytes": self.capacity, "pool_free_bytes": self.free_bytes(), "pool_pin_s": self.pin_s,
                "pooled_allocs": self.pooled_allocs, "fallback_allocs": self.fallback_allocs,
                "fallback_bytes": self.fallback_bytes}


def for_device(device: torch.device, cpu_tier_bytes: int, streams: list) -> HostMemory:
    """The CPU tier's host memory on ``device``: a pinned pool of the tier's size on CUDA, plain elsewhere.
    KVPLUG_PINNED_POOL=0 turns the pool off (fresh pinned allocation per segment, the old behaviour)."""
    if device.type != "cuda":
        return HostMemory()
    if os.environ.get("KVPLUG_PINNED_POOL", "1") == "0":
        return PinnedPool(0, streams)
    return PinnedPool(cpu_tier_bytes, streams)
