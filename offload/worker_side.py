"""The connector's worker side: executes each step's plan, layer by layer through vLLM's per-layer hooks.

``start_load`` fetches the entries (from the tiers, fastest first) and starts the first layers' host->device
copies and decodes on side streams (with ``load_overlap`` on CUDA the copies overlap the decodes through a
staging ring); ``wait_for_layer_load(layer)`` issues the next layers and makes the compute stream wait for that
layer's event only (offload/layerwise.py). Saves happen in the step in which a request's prompt finishes
prefilling: ``save_layer`` encodes that layer's blocks on a side stream into pinned host segments while later
layers compute; ``save`` applies the tier plan without making the compute stream
wait for those copies. Requests whose save is deferred are reported by ``finished_saves`` once the copies'
event has completed; a reallocated block whose save is in flight fences the compute stream. Token-dropping
policies store all layers of a block together: saved synchronously in ``save``, loaded before layer 0.
"""
from __future__ import annotations

import atexit
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from kvplug import vllm_compat
from kvplug.dropped_tokens import registry as dropped_registry
from kvplug.kv_payload import BlockContext, Payload, compression_ratio, payload_nbytes
from offload import host_memory, trace
from offload.config import OffloadConfig
from offload.layerwise import Lane, LoadJobs, SaveJobs, StagingRing, plan_runs
from offload.metadata import KvplugConnectorMetadata, KvplugWorkerMetadata, LoadSpec, SaveSpec
from offload.tiers import registry as tier_registry
from offload.tiers.base import Tier, TierEvents
from offload.tiers.planner import COPY, DEMOTE, DROP, STORE, TierOp
from offload.wiring import KvPolicy, PolicyProvider

# Blocks encoded/decoded per step of a save or load: bounds the temporary [n, layers, heads, tokens, dim]
# tensors (a 32K-token Llama-3-8B prefix is 4 GiB of K+V; 64 blocks of 16 tokens are 128 MiB).
CHUNK_BLOCKS = 64
# Devices whose policy kernels are compiled on first use (Triton JIT): warmed up when the caches register.
WARM_UP_DEVICES = ("cuda",)
# (policy, dtype, [heads, tokens, head_dim], device type) warmed up in this process (once per process).
_warmed: set[tuple] = set()
logger = logging.getLogger("vllm.kvplug.offload")


@dataclass
class WorkerStats:
    """Plain counters of one worker's connector: tests and offline runs read them through collective_rpc
    (/metrics has the rest)."""

    loaded_blocks: dict[str, int] = field(default_factory=lambda: dict.fromkeys(tier_registry.names(), 0))
    saved_blocks: int = 0
    # Per-layer hook calls that moved data (tests: the engine drove the layer-wise path).
    layerwise_saves: int = 0
    layerwise_load_waits: int = 0
    reuse_fences: int = 0  # steps whose compute stream waited for an in-flight save (preemption reuse)
    deferred_frees: int = 0  # finished requests whose blocks vLLM freed when get_finished reported them
    # For benchmarks/gpu_offload.py: host seconds of layer-wise saves (issuing them, and the pinned-segment
    # allocation within that).
    save_issue_s: float = 0.0
    save_alloc_s: float = 0.0
    # Loads: device memory of the staging ring (0: loads run serially), loads that overlapped copies with
    # decode, and host seconds spent planning loads (fetch, locate, runs) and issuing their layers.
    load_staging_bytes: int = 0
    overlapped_loads: int = 0
    load_plan_s: float = 0.0
    load_issue_s: float = 0.0


@dataclass
class _InflightSave:
    """One step's layer-wise save whose device->host copies may still run (until ``event`` completes)."""

    event: Any
    keys: set[str]
    block_ids: set[int]


class WorkerSide:
    def __init__(self, layout: Any, cfg: OffloadConfig, policies: PolicyProvider, metrics: Any = None,
                 vllm_config: Any = None) -> None:
        """``layout``: this rank's KvLayout (only ``tp_rank`` is read); ``metrics``: kvplug's OffloadMetrics or
        None; ``vllm_config``: finds the attention layers of registered caches (None in unit tests)."""
        self.cfg = cfg
        self.policies = policies
        self.m = metrics
        self.vllm_config = vllm_config
        self.layout = layout
        events = TierEvents(on_stored=self._stored, on_failed=self._store_failed, on_corrupt=self._count_corrupt)
        self.tiers: dict[str, Tier] = {t.name: t.open(cfg, layout.tp_rank, events)
                                       for t in tier_registry.enabled(cfg)}
        self.layers: list[tuple[str, torch.Tensor, torch.Tensor]] = []  # (name, K view, V view) by layer index
        self.layer_of: dict[str, int] = {}
        self._policies: dict[str, KvPolicy] = {}
        self.failed_block_ids: set[int] = set()
        self.unreadable: set[str] = set()
        self._unreadable_lock = threading.Lock()  # the disk writer's thread adds the keys of failed writes
        self._load_lane: Lane | None = None
        self._save_lane: Lane | None = None
        # Overlapped loads (CUDA, cfg.load_overlap): decode + scatter on their own lane, through a staging ring.
        self._decode_lane: Lane | None = None
        self._staging: StagingRing | None = None
        self._loads: LoadJobs | None = None
        self._saves: SaveJobs | None = None
        self._host: host_memory.HostMemory | None = None
        self._meta: KvplugConnectorMetadata | None = None  # the step whose saves are in flight
        # Saves of earlier steps whose copies may still run (the compute stream did not wait for them), and
        # the copies' event per request whose blocks vLLM keeps for us (reported by get_finished once done).
        self._inflight: list[_InflightSave] = []
        self._deferred_reqs: dict[str, Any] = {}
        self._finished_waiting: set[str] = set()
        self._load_timings: list[tuple[Any, Any, float]] = []
        # Called per layer after that layer's loads are written: (layer, block ids, device index tensor).
        self.load_listeners: list[Callable[[int, list[int], torch.Tensor], None]] = []
        self.stats = WorkerStats()
        atexit.register(self.close)

    def policy(self, name: str) -> KvPolicy:
        if name not in self._policies:
            self._policies[name] = self.policies.create(name)
        return self._policies[name]

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        # The views the attention backends read (CPU_ATTN's key blocks may be stored transposed).
        self.register_views(vllm_compat.kv_block_views(self.vllm_config, kv_caches))

    def register_views(self, layers: list[tuple[str, torch.Tensor, torch.Tensor]]) -> None:
        self.layers = layers
        self.layer_of = {name: i for i, (name, _, _) in enumerate(layers)}
        dev = layers[0][1].device if layers else torch.device("cpu")
        self._load_lane, self._save_lane = Lane(dev), Lane(dev)
        self._set_up_load_overlap(dev)
        # Host memory the GPU copies into must be pinned (else every copy is synchronous and staged); on CUDA
        # the host-memory tiers' budget is pinned once here, not per save inside a prefill.
        if self._host is None:
            host_bytes = sum(t.host_bytes(self.cfg) for t in tier_registry.enabled(self.cfg))
            self._host = host_memory.for_device(dev, host_bytes, [self._load_lane.stream, self._save_lane.stream])
            for tier in self.tiers.values():
                tier.use_host_memory(self._host)
        if layers and dev.type in WARM_UP_DEVICES:
            self.warm_up_kernels()
        # Backends that keep per-block state next to the KV (retrieval decode's block summaries) hear about
        # every block this connector writes, per layer, right after that layer's load (same stream).
        impls = [vllm_compat.attention_impl(self.vllm_config, name) if self.vllm_config is not None else None
                 for name, _, _ in layers]
        hooks = [getattr(impl, "after_external_kv_load", None) for impl in impls]
        if any(hooks):
            def refresh(layer: int, block_ids: list[int], index: torch.Tensor) -> None:
                if hooks[layer] is not None:
                    hooks[layer](self.layers[layer][1], index)

            self.load_listeners = [h for h in self.load_listeners if getattr(h, "__name__", "") != "refresh"]
            self.load_listeners.append(refresh)

    def _set_up_load_overlap(self, dev: torch.device) -> None:
        """A decode lane and the staging ring, once, where loads can overlap (CUDA with cfg.load_overlap)."""
        if self._staging is not None or not self.cfg.load_overlap or self._load_lane.stream is None:
            return
        try:
            self._staging = StagingRing(self.cfg.load_staging_bytes, dev)
        except RuntimeError as exc:  # out of device memory: loads stay serial, nothing else changes
            logger.warning("kvplug offload: no load staging ring (%s); loads copy and decode on one stream", exc)
            return
        self._decode_lane = Lane(dev)
        self.stats.load_staging_bytes = self._staging.nbytes
        logger.info("kvplug offload: load staging ring of %.0f MiB on %s (2 slots): copies overlap decode",
                    self._staging.nbytes / (1 << 20), dev)

    def warm_up_kernels(self) -> list[str]:
        """Run every policy's encode and decode once on two blocks of the cache's dtype and head shape, so no
        request pays a kernel's JIT compilation (the first int8 load on an H100 took 0.5 s instead of 0.17 s:
        Triton compiling ``_dequant_rows``). Once per process and shape; a policy that fails here is logged and
        left to fail (or fall back) where a request uses it. Returns the policies warmed up now."""
        _, kc, _ = self.layers[0]
        tail, dev = tuple(kc.shape[1:]), kc.device
        warmed, failed = [], []
        t0 = time.perf_counter()
        for name in self.policies.names():
            mark = (name, kc.dtype, tail, dev.type)
            if mark in _warmed:
                continue
            _warmed.add(mark)
            try:
                self._warm_up(self.policy(name), kc)
                warmed.append(name)
            except Exception as exc:  # noqa: BLE001 - a warm-up never stops the worker
                failed.append(f"{name} ({type(exc).__name__}: {exc})")
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        if warmed or failed:
            logger.info("kvplug offload: warmed up the cache policies' kernels for [%s] %s blocks in %.2f s: %s%s",
                        " x ".join(map(str, tail)), str(kc.dtype).replace("torch.", ""), time.perf_counter() - t0,
                        ", ".join(warmed) or "none", f"; failed: {'; '.join(failed)}" if failed else "")
        return warmed

    @staticmethod
    def _warm_up(policy: KvPolicy, like_cache: torch.Tensor) -> None:
        """Encode and decode two blocks (one layer) the ways the connector does: layer-wise policies through
        encode_groups / decode_stacked, the others through encode / decode; once with the blocks at the end
        of the prompt and once far from it (policies that keep a prompt's last tokens exact, e.g. int4)."""
        n, tokens = 2, like_cache.shape[2]
        k = torch.randn(n, 1, *like_cache.shape[1:], device=like_cache.device).to(like_cache.dtype)
        v = torch.randn_like(k)
        like = torch.empty_like(k)
        for prefix_len in (n * tokens, 1 << 20):
            ctx = BlockContext.contiguous(n, tokens, prefix_len=prefix_len)
            if policy.observation_window_tokens(prefix_len):  # SnapKV: the window's keys as query proxies
                ctx = BlockContext(ctx.block_start, prefix_len, obs_queries=k[-1])  # [layers, heads, window, dim]
            if policy.layerwise:
                for idx, batch in policy.encode_groups(k, v, ctx):
                    policy.decode_stacked(batch, like[:len(idx)])
            else:
                policy.decode(policy.encode(k, v, ctx), like)

    def host_memory_stats(self) -> dict[str, float]:
        return self._host.stats() if self._host is not None else {}

    def close(self) -> None:
        for tier in self.tiers.values():
            tier.close()

    # loads ------------------------------------------------------------------------------------------
    def _fetch(self, key: str) -> tuple[Payload | None, Tier | None]:
        for tier in self.tiers.values():
            p = tier.get(key)
            if p is not None:
                return p, tier
        return None, None

    def start_load(self, meta: KvplugConnectorMetadata) -> None:
        dropped_registry().clear(meta.fresh_block_ids)
        self._drain_load_timings()
        self._fence_reallocated_blocks(meta)
        self._loads = None
        if not meta.loads or not self.layers:
            return
        t0 = time.perf_counter()
        with trace.span("kvplug.offload.worker.plan_load", loads=len(meta.loads)):
            jobs = LoadJobs(self.layers, self._load_lane, on_layer_loaded=list(self.load_listeners),
                            decode_lane=self._decode_lane, staging=self._staging)
            for spec in meta.loads:
                self._plan_load(spec, jobs)
        self.stats.load_plan_s += time.perf_counter() - t0
        if not jobs:
            return
        self._loads = jobs
        start_ev = self._load_lane.record(timing=True)
        jobs.start()
        self.stats.overlapped_loads += jobs.overlapped
        self._load_timings.append((start_ev, None, t0))

    def _plan_load(self, spec: LoadSpec, jobs: LoadJobs) -> None:
        policy = self.policy(spec.policy)
        entries: list[tuple[Payload, Any]] = []
        # Per tier: blocks and bytes fetched, counted once per load (a 32K-token context is 2048 blocks). The
        # entries of one segment are equal-sized views: their size is computed once per segment.
        fetched: dict[str, list[int]] = {}
        segment_nbytes: dict[int, int] = {}
        check_inflight = bool(self._inflight)
        for i, key in enumerate(spec.keys):
            p, tier = self._fetch(key)
            if p is None:
                # vLLM recomputes these; later blocks of the chain cannot be used without this one either.
                self.failed_block_ids.update(spec.block_ids[i:])
                self.unreadable.update(spec.keys[i:i + 1])
                break
            loc = tier.locate(key)
            if loc is None:
                nbytes = payload_nbytes(p)
            else:
                nbytes = segment_nbytes.get(id(loc[0]))
                if nbytes is None:
                    nbytes = segment_nbytes[id(loc[0])] = payload_nbytes(p)
            counts = fetched.get(tier.name)
            if counts is None:
                counts = fetched[tier.name] = [0, 0]
            counts[0] += 1
            counts[1] += nbytes
            saving = self._inflight_event(key) if check_inflight else None
            if saving is not None:
                if policy.layerwise and loc is None:
                    saving.synchronize()  # plan_runs stacks loose entries on the host right now (rare)
                elif saving not in jobs.after_saves:
                    jobs.after_saves.append(saving)  # the load stream reads the host memory after the copies
            entries.append((p, loc))
        for name, (blocks, nbytes) in fetched.items():
            self.stats.loaded_blocks[name] += blocks
            if self.m is not None:
                self.m.bytes_loaded.labels(tier=name, policy=spec.policy).inc(nbytes)
        ids = spec.block_ids[:len(entries)]
        if not ids:
            return
        if policy.layerwise:
            jobs.runs += plan_runs(policy, entries, ids)
            dropped_registry().set_loaded(ids, None)
        else:
            payloads = [p for p, _ in entries]
            jobs.whole_block_work.append(lambda: self._write_blocks(spec.policy, payloads, ids))

    def _write_blocks(self, policy: str, payloads: list[Payload], ids: list[int]) -> None:
        """Decode whole-block payloads (every layer at once) and write them into the paged cache."""
        dev = self.layers[0][1].device
        for c0 in range(0, len(ids), CHUNK_BLOCKS):
            chunk_ids = ids[c0:c0 + CHUNK_BLOCKS]
            chunk = [{k: t.to(dev, non_blocking=True) for k, t in p.items()} for p in payloads[c0:c0 + CHUNK_BLOCKS]]
            k_like = self.layers[0][1]
            like = torch.empty(len(chunk_ids), len(self.layers), *k_like.shape[1:], dtype=k_like.dtype, device=dev)
            k, v, keep = self.policy(policy).decode(chunk, like)
            index = self._load_lane.to_device_index(chunk_ids)
            for layer, (_, kc, vc) in enumerate(self.layers):
                kc.index_copy_(0, index, k[:, layer])
                vc.index_copy_(0, index, v[:, layer])
                for hook in self.load_listeners:
                    hook(layer, chunk_ids, index)
            dropped_registry().set_loaded(chunk_ids, keep)

    def wait_for_layer_load(self, layer_name: str) -> None:
        if self._loads is None:
            return
        layer = self.layer_of.get(layer_name)
        if layer is None:  # not a layer of ours (e.g. a draft model's): everything must be in
            self._loads.lane.compute_waits(self._loads.finish())
            return
        self._loads.wait_layer(layer)
        self.stats.layerwise_load_waits += 1

    def _finish_loads(self) -> None:
        if self._loads is None:
            return
        end_ev = self._loads.finish()  # the forward never waited for some layers: issue them anyway
        self.stats.load_issue_s += self._loads.issue_s
        trace.mark("kvplug.offload.worker.load_issued", layers=self._loads.issued, issue_s=self._loads.issue_s,
                   overlapped=self._loads.overlapped)
        if self._load_timings and self._load_timings[-1][1] is None:
            start_ev, _, t0 = self._load_timings.pop()
            if end_ev is None:  # CPU: the work ran inline
                if self.m is not None:
                    self.m.load_seconds.observe(time.perf_counter() - t0)
            else:
                self._load_lane.waits(end_ev)  # overlapped: the last decode ends the load, not the copies
                end_timed = self._load_lane.record(timing=True)
                self._load_timings.append((start_ev, end_timed, t0))
        self._loads = None

    def _drain_load_timings(self) -> None:
        """Observe the load latency of earlier steps whose copies have finished (never a host sync)."""
        keep = []
        for start_ev, end_ev, t0 in self._load_timings:
            if end_ev is not None and end_ev.query():
                if self.m is not None:
                    self.m.load_seconds.observe(start_ev.elapsed_time(end_ev) / 1000.0)
            else:
                keep.append((start_ev, end_ev, t0))
        self._load_timings = keep[-16:]

    # saves and tier moves ---------------------------------------------------------------------------
    def save_layer(self, layer_name: str, meta: Any) -> None:
        if not isinstance(meta, KvplugConnectorMetadata) or not meta.saves or not self.layers:
            return
        layer = self.layer_of.get(layer_name)
        if layer is None:
            return
        self._saves_for(meta).save_layer(layer)
        self.stats.layerwise_saves += 1

    def _saves_for(self, meta: KvplugConnectorMetadata) -> SaveJobs:
        if self._meta is not meta or self._saves is None:
            self._meta = meta
            self._saves = SaveJobs(self.layers, self._save_lane, self._host)
            for spec in meta.saves:
                policy = self.policy(spec.policy)
                if policy.layerwise:
                    self._saves.add(policy, spec.keys, spec.block_ids, spec.block_starts, spec.prefix_len)
        return self._saves

    def save(self, meta: KvplugConnectorMetadata) -> None:
        self._finish_loads()
        saves, self._saves, self._meta = (self._saves_for(meta) if meta.saves and self.layers else None), None, None
        slots, ready = saves.finish() if saves is not None else ({}, None)
        self._prune_inflight()
        self._track_inflight(meta, saves, ready)
        if not self.layers or (not meta.saves and not meta.tier_ops):
            return
        if saves is not None:
            self.stats.save_issue_s += saves.issue_s
            self.stats.save_alloc_s += saves.alloc_s
        if saves is not None and self.m is not None:
            for policy, ratio in saves.compression():
                self.m.compression_ratio.labels(policy=policy).observe(ratio)
        encoded: dict[str, tuple[Payload, str]] = {}
        for spec in meta.saves:
            if self.policy(spec.policy).layerwise:
                for key in spec.keys:
                    if key in slots:
                        encoded[key] = (slots[key], spec.policy)
            else:
                for key, payload in zip(spec.keys, self._encode(spec)):
                    encoded[key] = (payload, spec.policy)
            self.stats.saved_blocks += len(spec.keys)
        for op in meta.tier_ops:
            self._apply(op, encoded, ready)

    def _track_inflight(self, meta: KvplugConnectorMetadata, saves: SaveJobs | None, ready: Any) -> None:
        """After this step's layer-wise copies were issued: either remember them as in flight (the scheduler
        delays freeing their requests' blocks) or, for saves it does not delay (an older scheduler side),
        order the compute stream after them as before. Every deferred request is remembered with the event
        get_finished polls (None: nothing to wait for, e.g. the save failed or no layers are registered)."""
        if saves is not None and saves.jobs:
            layerwise = [spec for spec in meta.saves if self.policy(spec.policy).layerwise]
            if all(spec.deferred for spec in layerwise):
                self._inflight.append(_InflightSave(
                    ready, {k for spec in layerwise for k in spec.keys},
                    {b for spec in layerwise for b in spec.block_ids}))
            else:
                self._save_lane.compute_waits(ready)
        for spec in meta.saves:
            if spec.deferred and spec.req_id:
                self._deferred_reqs[spec.req_id] = ready if saves is not None and saves.jobs else None

    def _prune_inflight(self) -> None:
        self._inflight = [s for s in self._inflight if not Lane.done(s.event)]

    def _inflight_event(self, key: str) -> Any:
        """The event of the newest save that may still be copying ``key``'s entry (pruned once per step, not
        per key: a completed event here costs a no-op stream wait), or None."""
        for s in reversed(self._inflight):
            if key in s.keys:
                return s.event
        return None

    def _fence_reallocated_blocks(self, meta: KvplugConnectorMetadata) -> None:
        """vLLM frees a preempted request's blocks at once (only finished requests' frees are delayed), so a
        block whose save is still copying can come back this step as a fresh block (or a load target):
        the compute stream, which writes it this step (the load stream follows it), waits for that save."""
        self._prune_inflight()
        if not self._inflight:
            return
        written = set(meta.allocated_block_ids).union(meta.fresh_block_ids, *(spec.block_ids for spec in meta.loads))
        for s in self._inflight:
            if not s.block_ids.isdisjoint(written):
                self._save_lane.compute_waits(s.event)
                self.stats.reuse_fences += 1

    def finished_saves(self, finished_req_ids: set[str]) -> set[str]:
        """Requests vLLM finished (this or an earlier step) whose deferred save has completed: vLLM may free
        their blocks now. Each is reported once."""
        self._finished_waiting.update(r for r in finished_req_ids if r in self._deferred_reqs)
        done = {r for r in self._finished_waiting if Lane.done(self._deferred_reqs[r])}
        for r in done:
            del self._deferred_reqs[r]
        self._finished_waiting -= done
        self._prune_inflight()
        self.stats.deferred_frees += len(done)
        return done

    def _encode(self, spec: SaveSpec) -> list[Payload]:
        """Whole-block encode (every layer at once) for policies that are not layer-wise."""
        obs = None
        if spec.window_slots:
            # Query proxies for SnapKV: the window's keys, [L, H, W, D].
            obs = torch.stack([torch.stack([kc[b, :, o] for b, o in spec.window_slots], dim=1)
                               for _, kc, _ in self.layers])
        policy = self.policy(spec.policy)
        # SnapKV normalises its scores over the blocks encoded together: one chunk for the whole prompt.
        step = len(spec.block_ids) if obs is not None else CHUNK_BLOCKS
        out: list[Payload] = []
        for c0 in range(0, len(spec.block_ids), step):
            index = self._save_lane.to_device_index(spec.block_ids[c0:c0 + step])
            k = torch.stack([kc.index_select(0, index) for _, kc, _ in self.layers], dim=1)  # [n, L, H, N, D]
            v = torch.stack([vc.index_select(0, index) for _, _, vc in self.layers], dim=1)
            ctx = BlockContext(tuple(spec.block_starts[c0:c0 + step]), spec.prefix_len, obs_queries=obs)
            payloads = policy.encode(k, v, ctx)
            out += [{name: t.to("cpu") for name, t in p.items()} for p in payloads]
            if self.m is not None and payloads:
                self.m.compression_ratio.labels(policy=spec.policy).observe(compression_ratio(k, v, payloads))
        return out

    def _apply(self, op: TierOp, encoded: dict[str, tuple[Any, str]], ready: Any) -> None:
        tier = self.tiers.get(op.tier)
        if tier is None:
            return
        if op.kind == STORE and op.key in encoded:
            item, policy = encoded[op.key]
            tier.store(op.key, item, ready, policy)
        elif op.kind in (DEMOTE, COPY):
            payload = tier.get(op.key)
            below = self.tiers.get(op.to)
            if payload is not None and below is not None:
                # The entry may be filled by this or an earlier step's copies: the next tier waits for them.
                below.store(op.key, payload, self._inflight_event(op.key) or ready,
                            "demoted" if op.kind == DEMOTE else "pinned")
            if op.kind == DEMOTE:
                tier.release(op.key)
        elif op.kind == DROP:
            tier.release(op.key)

    def _stored(self, tier: str, nbytes: int, label: str) -> None:
        if self.m is not None:
            self.m.bytes_stored.labels(tier=tier, policy=label).inc(nbytes)

    def _store_failed(self, key: str, reason: str) -> None:
        # The scheduler side thinks the entry is stored: reported like an unreadable one, it forgets it.
        if self.m is not None:
            self.m.disk_write_failures.labels(reason=reason).inc()
        with self._unreadable_lock:
            self.unreadable.add(key)

    def _count_corrupt(self, key: str, why: str) -> None:
        if self.m is not None:
            self.m.corrupt_entries.inc()

    def take_load_errors(self) -> set[int]:
        out, self.failed_block_ids = self.failed_block_ids, set()
        return out

    def worker_meta(self) -> KvplugWorkerMetadata | None:
        with self._unreadable_lock:
            if not self.unreadable:
                return None
            out, self.unreadable = KvplugWorkerMetadata(self.unreadable), set()
        return out
