"""offload/host_memory.py: the pinned pool the CPU tier's save segments are carved from (unpinned here:
no GPU; the allocator, reuse and event fencing are the same code)."""
from __future__ import annotations

import gc

import torch

from offload import host_memory
from offload.host_memory import ALIGN, HostMemory, PinnedPool


class FakeEvent:
    def __init__(self) -> None:
        self.complete = False

    def query(self) -> bool:
        return self.complete


class Recorder:
    """Stands in for the lanes' streams: every release records one event per stream."""

    def __init__(self) -> None:
        self.events: list[FakeEvent] = []

    def __call__(self, stream) -> FakeEvent:
        ev = FakeEvent()
        self.events.append(ev)
        return ev

    def complete_all(self) -> None:
        for ev in self.events:
            ev.complete = True


def _pool(capacity=64 * ALIGN, streams=("save", "load")):
    rec = Recorder()
    return PinnedPool(capacity, list(streams), pin=False, record_event=rec), rec


def test_tensors_come_from_the_pool_with_the_asked_shape_and_dtype():
    pool, _ = _pool()
    a = pool.empty((2, 3, 5), torch.bfloat16)
    b = pool.empty((7,), torch.float32)
    assert a.shape == (2, 3, 5) and a.dtype == torch.bfloat16 and a.is_contiguous()
    assert b.shape == (7,) and b.dtype == torch.float32
    a.fill_(1.5)
    b.fill_(-2.0)
    assert bool((a == 1.5).all()) and bool((b == -2.0).all())  # disjoint ranges: neither overwrote the other
    base = pool._buffer.data_ptr()
    assert base <= a.data_ptr() < base + pool.capacity and base <= b.data_ptr() < base + pool.capacity
    assert (a.data_ptr() - base) % ALIGN == 0 and (b.data_ptr() - base) % ALIGN == 0
    assert pool.pooled_allocs == 2 and pool.fallback_allocs == 0
    assert pool.free_bytes() == pool.capacity - 2 * ALIGN


def test_a_range_returns_only_after_its_last_view_died_and_the_streams_passed_the_release():
    pool, rec = _pool()
    seg = pool.empty((4, ALIGN // 4), torch.uint8)  # one ALIGN-sized range
    slot = seg[1]  # the tier keeps per-block views of a segment
    del seg
    gc.collect()
    assert pool.free_bytes() == pool.capacity - ALIGN  # a view is alive: not released
    del slot
    gc.collect()
    assert len(rec.events) == 2  # one event per stream, recorded when the last view died
    assert pool.free_bytes() == pool.capacity - ALIGN  # copies queued before the release may still run
    rec.complete_all()
    assert pool.free_bytes() == pool.capacity


def test_freed_neighbours_merge_so_a_large_segment_fits_again():
    pool, rec = _pool(capacity=4 * ALIGN)
    parts = [pool.empty((ALIGN,), torch.uint8) for _ in range(4)]
    assert pool.free_bytes() == 0
    big = pool.empty((2 * ALIGN,), torch.uint8)
    assert pool.fallback_allocs == 1 and pool.fallback_bytes == 2 * ALIGN  # full: a fresh allocation, no failure
    assert not (pool._buffer.data_ptr() <= big.data_ptr() < pool._buffer.data_ptr() + pool.capacity)
    del parts[1], parts[1]  # the 2nd and 3rd ranges, adjacent
    gc.collect()
    rec.complete_all()
    again = pool.empty((2 * ALIGN,), torch.uint8)
    assert pool.fallback_allocs == 1  # the two freed neighbours merged into one range that fits
    assert again.data_ptr() == pool._buffer.data_ptr() + ALIGN
    assert pool._free_starts == []


def test_first_fit_reuses_the_lowest_range_and_splits_it():
    pool, rec = _pool(capacity=8 * ALIGN, streams=())
    a = pool.empty((3 * ALIGN,), torch.uint8)
    b = pool.empty((ALIGN,), torch.uint8)
    del a
    gc.collect()  # no streams: reusable at once
    c = pool.empty((ALIGN + 1,), torch.uint8)  # rounds up to 2 * ALIGN, carved from a's old range
    assert c.data_ptr() == pool._buffer.data_ptr()
    assert pool._free_starts == [2 * ALIGN, 4 * ALIGN]
    assert pool._free_sizes == {2 * ALIGN: ALIGN, 4 * ALIGN: 4 * ALIGN}
    del b, c


def test_a_disabled_pool_allocates_fresh_memory(monkeypatch):
    monkeypatch.setenv("KVPLUG_PINNED_POOL", "0")
    monkeypatch.setattr(host_memory, "PinnedPool", lambda cap, streams: PinnedPool(cap, streams, pin=False))
    pool = host_memory.for_device(torch.device("cuda"), 1 << 20, [])
    t = pool.empty((3, 4), torch.float16)
    assert pool.capacity == 0 and pool.fallback_allocs == 1 and t.shape == (3, 4)


def test_cpu_engines_get_plain_host_memory():
    mem = host_memory.for_device(torch.device("cpu"), 1 << 30, [])
    assert type(mem) is HostMemory and not mem.pinned
    assert mem.empty((2, 2), torch.int8).dtype == torch.int8


def test_the_pool_never_pins_more_than_half_the_available_host_memory(monkeypatch, caplog):
    monkeypatch.setattr(host_memory, "_available_host_bytes", lambda: 100 * ALIGN)
    with caplog.at_level("WARNING", logger="vllm.kvplug.offload"):
        pool = PinnedPool(1000 * ALIGN, [], pin=False)
    assert pool.capacity == 50 * ALIGN
    assert any("exceeds 50% of the host's available memory" in r.getMessage() for r in caplog.records)
