"""Overlapped loads (offload/layerwise.py: copies on one lane, decode + scatter on another, through a staging
ring): the bytes written equal the serial path's, and a staging slot is never refilled before the decode that
reads it has run. CPU has no streams, so the lanes here are simulated ones that queue their work and run it
only when something waits for it, the copy lane as far ahead as its waits allow (the order that would expose
a missing wait on a real GPU)."""
from __future__ import annotations

import collections
import contextlib

import pytest
import torch

from kvplug.config import KvplugConfigError
from offload import layerwise, metadata
from offload.config import OffloadConfig
from tests.offload.test_layerwise import LAYERS, make_worker, run_step, save_meta


class SimEvent:
    def __init__(self, sim: "Sim") -> None:
        self.sim, self.done = sim, False

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.sim.drain(self)

    def elapsed_time(self, other) -> float:
        return 0.0


class Sim:
    """Runs queued lane work in stream order: each lane in FIFO order, a wait blocks its lane until the
    event's record has run; the preferred lane is always advanced first ("copy": the copy lane runs ahead,
    which exposes a slot refilled too early; "decode": the decode lane runs first, which exposes a decode
    that does not wait for its copies)."""

    def __init__(self, first: str = "copy") -> None:
        self.lanes: list[DeferredLane] = []
        self.first = first

    def drain(self, until: SimEvent | None = None) -> None:
        while until is None or not until.done:
            order = self.lanes if self.first == "copy" else self.lanes[::-1]
            if not any(lane.step() for lane in order):
                assert until is None, "deadlock: the event waited for can never complete"
                return


class DeferredLane(layerwise.Lane):
    def __init__(self, sim: Sim) -> None:
        self.device = torch.device("cpu")
        self.stream = object()  # "has a stream": the connector takes the asynchronous path
        self.sim, self.queue = sim, collections.deque()
        sim.lanes.append(self)

    def context(self):
        return contextlib.nullcontext()

    def run(self, work) -> None:
        self.queue.append(("run", work))

    def record(self, timing: bool = False):
        ev = SimEvent(self.sim)
        self.queue.append(("record", ev))
        return ev

    def waits(self, event) -> None:
        if event is not None:
            self.queue.append(("wait", event))

    def follow_compute(self) -> None:
        pass

    def compute_waits(self, event) -> None:
        if event is not None:
            self.sim.drain(event)

    def to_device_index(self, ids):
        return torch.tensor(ids, dtype=torch.long)

    def step(self) -> bool:
        """Run the head of the queue unless it waits for an event not yet recorded; False if nothing ran."""
        if not self.queue or (self.queue[0][0] == "wait" and not self.queue[0][1].done):
            return False
        kind, item = self.queue.popleft()
        if kind == "run":
            item()
        elif kind == "record":
            item.done = True
        return True


def overlapped(side, staging_bytes: int, first: str = "copy") -> Sim:
    """Put ``side``'s loads on simulated copy and decode lanes with a CPU staging ring."""
    sim = Sim(first)
    side._load_lane = DeferredLane(sim)
    side._decode_lane = DeferredLane(sim)
    side._staging = layerwise.StagingRing(staging_bytes, "cpu")
    return sim


def block_bytes(side, keys) -> int:
    """One block of one layer of these entries, staged (fields aligned)."""
    p = side.tiers["cpu"].get(keys[0])
    return sum(layerwise._aligned(t[0].numel() * t.element_size()) for t in p.values())


SRC, DST = list(range(2, 12)), [40, 30, 31, 32, 20, 21, 22, 23, 44, 45]


def saved(policy, monkeypatch, segment_blocks=4):
    """A worker whose CPU tier holds SRC in segments of ``segment_blocks`` (several runs per load)."""
    monkeypatch.setattr(layerwise, "SEGMENT_BLOCKS", segment_blocks)
    side = make_worker()
    meta, keys = save_meta(policy, SRC)
    run_step(side, meta)
    return side, keys


def serial_load(side, keys, dst):
    """What today's serial path writes into ``dst`` (per layer: K and V), leaving the cache as it was."""
    before = [(kc[dst].clone(), vc[dst].clone()) for _, kc, vc in side.layers]
    run_step(side, metadata.KvplugConnectorMetadata(loads=[metadata.LoadSpec(keys[0].split("-")[0], keys, dst)]))
    want = [(kc[dst].clone(), vc[dst].clone()) for _, kc, vc in side.layers]
    for (_, kc, vc), (k, v) in zip(side.layers, before):
        kc[dst], vc[dst] = k, v
    return want


def load_meta(policy, keys, dst):
    return metadata.KvplugConnectorMetadata(loads=[metadata.LoadSpec(policy, keys, dst)])


@pytest.mark.parametrize("first", ["copy", "decode"])
@pytest.mark.parametrize("policy", ["keep", "quant:int8", "quant:int4", "drop:streaming"])
def test_overlapped_load_writes_the_serial_paths_bytes_and_each_layer_is_in_when_waited(policy, first, monkeypatch):
    side, keys = saved(policy, monkeypatch)
    want = serial_load(side, keys, DST)
    untouched = [(kc.clone(), vc.clone()) for _, kc, vc in side.layers]
    for _, kc, vc in side.layers:
        kc[DST], vc[DST] = 0, 0
    layer_wise = side.policy(policy).layerwise
    # Slots of ~3 blocks: several units per layer, pieces that cross the segments' runs, slots reused.
    sim = overlapped(side, 2 * 3 * block_bytes(side, keys) if layer_wise else 1 << 20, first)
    side.start_load(load_meta(policy, keys, DST))
    if layer_wise:
        assert side._loads.overlapped and len(side._loads.units) >= 3
    for i, (name, kc, vc) in enumerate(side.layers):
        side.wait_for_layer_load(name)  # drains the lanes up to this layer's event, no further
        assert torch.equal(kc[DST], want[i][0]) and torch.equal(vc[DST], want[i][1]), f"layer {i}"
    side.save(load_meta(policy, keys, DST))
    sim.drain()
    for (_, kc, vc), (k0, v0) in zip(side.layers, untouched):  # nothing else written
        others = [b for b in range(kc.shape[0]) if b not in DST]
        assert torch.equal(kc[others], k0[others]) and torch.equal(vc[others], v0[others])
    assert side.stats.overlapped_loads == (1 if layer_wise else 0)  # the serial reference load counts none


def test_back_to_back_loads_reuse_the_ring_without_overwriting_a_slot_not_yet_decoded(monkeypatch):
    """Two steps whose forward never waits (no per-layer hooks): nothing runs until the end, so the second
    step's copies into each slot are ordered only by the first step's decode events."""
    side, keys = saved("quant:int8", monkeypatch)
    first, second = DST[:5], DST[5:]
    want_first, want_second = serial_load(side, keys[:5], first), serial_load(side, keys[5:], second)
    sim = overlapped(side, 2 * 2 * block_bytes(side, keys))
    run_step(side, load_meta("quant:int8", keys[:5], first), hooks=False)
    run_step(side, load_meta("quant:int8", keys[5:], second), hooks=False)
    assert any(lane.queue for lane in sim.lanes)  # all of it still queued
    sim.drain()
    for (_, kc, vc), (k1, v1), (k2, v2) in zip(side.layers, want_first, want_second):
        assert torch.equal(kc[first], k1) and torch.equal(vc[first], v1)
        assert torch.equal(kc[second], k2) and torch.equal(vc[second], v2)


def test_without_the_slot_wait_the_copy_lane_overwrites_a_slot_before_its_decode(monkeypatch):
    """The simulation can see the hazard the ring's wait prevents (else the tests above could not fail)."""
    side, keys = saved("keep", monkeypatch)
    want = serial_load(side, keys, DST)
    sim = overlapped(side, 2 * 3 * block_bytes(side, keys))

    def acquire_without_wait(self, copy_lane):
        slot, self._next = self._next, (self._next + 1) % len(self.buffers)
        return slot

    monkeypatch.setattr(layerwise.StagingRing, "acquire", acquire_without_wait)
    run_step(side, load_meta("keep", keys, DST))
    sim.drain()
    assert not all(torch.equal(kc[DST], k) for (_, kc, _), (k, _) in zip(side.layers, want))


def count_decodes(side, policy):
    """Calls of ``policy``'s decode_stacked from now on (its instance on ``side``, counted in a list)."""
    pol, calls = side.policy(policy), []
    decode = pol.decode_stacked

    def counted(batch, like):
        calls.append(len(like))
        return decode(batch, like)

    pol.decode_stacked = counted
    return calls


@pytest.mark.parametrize("first", ["copy", "decode"])
def test_a_unit_of_several_runs_decodes_once_per_layer_with_the_serial_paths_bytes(first, monkeypatch):
    """A layer of 3 segment runs in one slot: one decode (and scatter) per layer over all 10 blocks, not one per
    run (the host issued 8x the kernels per int8 layer on the H100 and bounded the load)."""
    side, keys = saved("quant:int8", monkeypatch)
    want = serial_load(side, keys, DST)
    for _, kc, vc in side.layers:
        kc[DST], vc[DST] = 0, 0
    sim = overlapped(side, 2 * 20 * block_bytes(side, keys), first)
    calls = count_decodes(side, "quant:int8")
    run_step(side, load_meta("quant:int8", keys, DST))
    sim.drain()
    assert side.stats.overlapped_loads == 1 and calls == [len(DST)] * LAYERS
    assert all(torch.equal(kc[DST], k) and torch.equal(vc[DST], v) for (_, kc, vc), (k, v) in zip(side.layers, want))


def test_a_unit_of_two_policies_decodes_each_policys_blocks_apart(monkeypatch):
    """One step loading keep and int8 entries into one slot: two decode batches per layer, bytes as the serial
    path's."""
    monkeypatch.setattr(layerwise, "SEGMENT_BLOCKS", 4)
    side = make_worker()
    keys = {}
    for policy in ("keep", "quant:int8"):
        meta, keys[policy] = save_meta(policy, SRC)
        run_step(side, meta)
    load = metadata.KvplugConnectorMetadata(loads=[metadata.LoadSpec("keep", keys["keep"][:5], DST[:5]),
                                                   metadata.LoadSpec("quant:int8", keys["quant:int8"][5:], DST[5:])])
    before = [(kc[DST].clone(), vc[DST].clone()) for _, kc, vc in side.layers]
    run_step(side, load)  # the serial reference
    want = [(kc[DST].clone(), vc[DST].clone()) for _, kc, vc in side.layers]
    for (_, kc, vc), (k, v) in zip(side.layers, before):
        kc[DST], vc[DST] = k, v
    sim = overlapped(side, 1 << 20, "decode")
    kept, quantized = count_decodes(side, "keep"), count_decodes(side, "quant:int8")
    side.start_load(load)
    assert [[len(b.block_ids) for b in unit] for unit in side._loads.batches] == [[5, 5]]
    side.save(load)
    sim.drain()
    assert kept == quantized == [5] * LAYERS
    assert all(torch.equal(kc[DST], k) and torch.equal(vc[DST], v) for (_, kc, vc), (k, v) in zip(side.layers, want))


def test_a_block_id_written_twice_starts_a_new_decode_batch(monkeypatch):
    """Within one index_copy_ a repeated index has no defined winner: the second write goes in a later batch."""
    side, keys = saved("quant:int8", monkeypatch)
    jobs = layerwise.LoadJobs(side.layers, side._load_lane)
    side._plan_load(metadata.LoadSpec("quant:int8", keys, [40, 30, 31, 32, 40, 21, 22, 23, 44, 45]), jobs)
    unit = layerwise.plan_staged_units(jobs.runs, 1 << 20)[0]
    assert [b.block_ids for b in layerwise.plan_decode_batches(unit)] == [[40, 30, 31, 32], [40, 21, 22, 23, 44, 45]]


def test_a_decode_batch_holds_at_most_decode_batch_blocks(monkeypatch):
    side, keys = saved("quant:int8", monkeypatch)
    monkeypatch.setattr(layerwise, "DECODE_BATCH_BLOCKS", 8)
    jobs = layerwise.LoadJobs(side.layers, side._load_lane)
    side._plan_load(metadata.LoadSpec("quant:int8", keys, DST), jobs)
    unit = layerwise.plan_staged_units(jobs.runs, 1 << 20)[0]
    assert [b.block_ids for b in layerwise.plan_decode_batches(unit)] == [DST[:8], DST[8:]]


def test_without_the_decodes_wait_for_its_copies_the_decode_reads_a_stale_slot(monkeypatch):
    """The simulation can see a decode that does not wait for its unit's copies (else the tests above could not
    fail): the decode lane runs first and reads the slot before the copy lane filled it."""
    side, keys = saved("quant:int8", monkeypatch)
    want = serial_load(side, keys, DST)
    sim = overlapped(side, 2 * 20 * block_bytes(side, keys), "decode")
    for buf in side._staging.buffers:
        buf.zero_()
    side._decode_lane.waits = lambda event: None
    run_step(side, load_meta("quant:int8", keys, DST))
    sim.drain()
    assert not all(torch.equal(kc[DST], k) for (_, kc, _), (k, _) in zip(side.layers, want))


def test_a_block_larger_than_a_slot_takes_the_serial_path(monkeypatch):
    side, keys = saved("keep", monkeypatch)
    want = serial_load(side, keys, DST)
    overlapped(side, block_bytes(side, keys))  # two slots of half a block each
    side.start_load(load_meta("keep", keys, DST))
    assert side._loads.units is None and not side._loads.overlapped
    side.save(load_meta("keep", keys, DST))
    side._load_lane.sim.drain()
    assert all(torch.equal(kc[DST], k) and torch.equal(vc[DST], v) for (_, kc, vc), (k, v) in zip(side.layers, want))


def test_units_cover_every_block_once_within_the_slot(monkeypatch):
    side, keys = saved("quant:int8", monkeypatch, segment_blocks=3)
    jobs = layerwise.LoadJobs(side.layers, side._load_lane)
    side._plan_load(metadata.LoadSpec("quant:int8", keys, DST), jobs)
    slot = 2 * block_bytes(side, keys) + layerwise.STAGING_ALIGN
    units = layerwise.plan_staged_units(jobs.runs, slot)
    covered = [b for unit in units for piece in unit for b in piece.run.block_ids[piece.lo:piece.hi]]
    assert covered == DST
    for unit in units:
        used = sum(layerwise._aligned(t.numel() * t.element_size()) for piece in unit for _, t in piece.fields(0))
        assert used <= slot
    assert layerwise.plan_staged_units(jobs.runs, 10 * block_bytes(side, keys)) and len(
        layerwise.plan_staged_units(jobs.runs, 10 * block_bytes(side, keys))) == 1


def test_the_ring_is_the_configured_size_and_cpu_workers_load_serially():
    ring = layerwise.StagingRing(10 << 20, "cpu")
    assert ring.nbytes == 10 << 20 and len(ring.buffers) == 2 and ring.slot_bytes == 5 << 20
    side = make_worker(load_overlap=True)  # CPU: no streams, so no ring and no decode lane, whatever load_overlap says
    assert side.cfg.load_overlap and side._staging is None and side._decode_lane is None
    assert side.stats.load_staging_bytes == 0


def test_load_overlap_config():
    assert not OffloadConfig().load_overlap and OffloadConfig().load_staging_bytes == 320 << 20  # off until the GPU run
    assert OffloadConfig(load_staging_size="64MiB").load_staging_bytes == 64 << 20
    with pytest.raises(KvplugConfigError, match=r"offload\.load_staging_size: at least 1MiB"):
        OffloadConfig(load_overlap=True, load_staging_size="4KiB")
    OffloadConfig(load_overlap=False, load_staging_size=0)  # no ring: no size needed
