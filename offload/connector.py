"""kvplug's KV connector: offloads prefix KV blocks to CPU and disk tiers, in the form the policy chooses.

Loaded by vLLM through ``--kv-transfer-config '{"kv_connector": "KvplugConnector",
"kv_connector_module_path": "offload.connector", "kv_role": "kv_both"}'`` (``kvplug serve --offload``
writes it). One class with the two halves vLLM's ABC asks for:

* Scheduler side (engine core): on a new request, counts the consecutive prefix blocks beyond vLLM's own
  GPU prefix-cache hit that the tiers hold (``get_num_new_matched_tokens``), remembers which GPU blocks vLLM
  allocated for them, and each step emits metadata: loads (entry key -> GPU block id), saves and the tier
  plan (offload/tiers.py: what to store where, what to demote or delete).
* Worker side (each worker): executes it, layer by layer through vLLM's per-layer hooks
  (offload/layerwise.py). ``start_load_kv`` fetches the entries (CPU tier, pending disk writes, disk) and
  starts the first layers' host->device copies and decodes on a side stream; ``wait_for_layer_load(layer)``
  issues the next layers and makes the compute stream wait for that layer's event only. Saves happen in
  the step in which a request's prompt finishes prefilling (policies see the whole prefix: KIVI's recent
  tokens, SnapKV's window): ``save_kv_layer(layer)`` encodes that layer's blocks on a side stream and copies
  them into pinned host segments while later layers compute; ``wait_for_save`` applies the tier plan and
  returns without making the compute stream wait for those copies (the step, and the next one, do not
  pay for them). The blocks stay valid through vLLM's delay free: ``request_finished`` of a request whose
  save was planned returns True (vLLM keeps its blocks), and a worker's ``get_finished`` reports the request
  once its save's event has completed (polled, never a host sync); vLLM frees the blocks then. A preempted
  request's blocks are freed at once: when such a block is reallocated while its save is in flight, the
  compute stream waits for that save before the step writes it. A load of an entry whose save is in
  flight waits for it on the load stream. Disk writes (checksum, fsync) run on a background thread.
  Token-dropping policies store all layers of a block together, so they are saved (synchronously) in
  ``wait_for_save`` and loaded before layer 0. On CPU (no streams) the same calls do the work inline, saves
  are done when ``wait_for_save`` returns, and no request's free is delayed.

Entries are keyed by vLLM's chained block hash + policy + model/layout (offload/keys.py). A missing or
corrupt entry is reported to vLLM as a failed block load, which vLLM recomputes (kv_load_failure_policy
"recompute"), and the scheduler side forgets it; a full tier evicts and a failed store (host memory, disk)
skips the entry: neither fails a request.
"""
from __future__ import annotations

import atexit
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from cache_policies import registry as policy_registry
from cache_policies.base import BlockContext, CachePolicy, Payload, compression_ratio, payload_nbytes
from cache_policies.selection import choose_policy
from kvplug import config as cfg_mod
from kvplug import metrics, vllm_compat
from offload import host_memory
from kvplug.dropped_tokens import registry as dropped_registry
from offload.keys import entry_key
from offload.layerwise import Lane, LoadJobs, SaveJobs, plan_runs
from offload.stores import AsyncDiskWriter, CpuStore, DiskStore, check_free_space
from offload.tiers import CPU, DISK, TierOp, TierPlanner

logger = logging.getLogger("vllm.kvplug.offload")
# Blocks encoded/decoded per step of a save or load: bounds the temporary [n, layers, heads, tokens, dim]
# tensors (a 32K-token Llama-3-8B prefix is 4 GiB of K+V; 64 blocks of 16 tokens are 128 MiB).
CHUNK_BLOCKS = 64
_Base, _Metadata, _Role, _WorkerMetadata = vllm_compat.kv_connector_api()


# --- metadata (scheduler -> worker, and back) ----------------------------------------------------------

@dataclass
class LoadSpec:
    policy: str
    keys: list[str]
    block_ids: list[int]


@dataclass
class SaveSpec:
    policy: str
    keys: list[str]
    block_ids: list[int]
    block_starts: list[int]
    prefix_len: int
    # Observation window (SnapKV): (block id, offset) of the last prompt tokens, in order.
    window_slots: list[tuple[int, int]] = field(default_factory=list)
    req_id: str = ""
    # The scheduler delays freeing the request's blocks until a worker reports this save done (get_finished).
    deferred: bool = False


@dataclass
class KvplugConnectorMetadata(_Metadata):  # type: ignore[misc, valid-type]
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)
    tier_ops: list[TierOp] = field(default_factory=list)
    fresh_block_ids: list[int] = field(default_factory=list)  # reallocated: forget their dropped-token masks
    # Every block this step may write that vLLM's prefix cache did not supply (computed or loaded into): a
    # superset of fresh_block_ids + load targets. A block whose save is still copying must not be among them.
    allocated_block_ids: list[int] = field(default_factory=list)


@dataclass
class KvplugWorkerMetadata(_WorkerMetadata):  # type: ignore[misc, valid-type]
    unreadable_keys: set[str] = field(default_factory=set)

    def aggregate(self, other: "KvplugWorkerMetadata") -> "KvplugWorkerMetadata":
        return KvplugWorkerMetadata(self.unreadable_keys | other.unreadable_keys)


# --- scheduler side ------------------------------------------------------------------------------------

@dataclass
class _ReqState:
    request: Any
    policy: str
    local_blocks: int = 0  # blocks vLLM's own prefix cache supplied
    load_keys: list[str] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)
    saved: bool = False
    save_deferred: bool = False  # a deferred save was planned: its blocks are freed when workers report it
    offload: bool = True  # False: kv_transfer_params opted this request out of the tiers
    # Lossy reloads: from this block on, the request's KV is not what a fresh computation gives (the reloaded
    # blocks, and every block computed attending to them), so vLLM's prefix cache must not offer it to other
    # requests. None: nothing lossy was loaded. ``isolated_upto``: blocks taken out of the prefix cache so far.
    lossy_from: int | None = None
    isolated_upto: int = 0


class _SchedulerSide:
    def __init__(self, vllm_config: Any, cfg: cfg_mod.KvplugConfig, defer_free: bool | None = None) -> None:
        self.cfg = cfg
        # Layer-wise saves outlive their step (CUDA side-stream copies): keep finished requests' blocks.
        self.defer_free = vllm_compat.kv_saves_defer_block_free() if defer_free is None else defer_free
        self.delayed_frees: set[str] = set()  # finished requests whose blocks wait for a worker's report
        self.layout = vllm_compat.kv_layout(vllm_config, tp_rank=0)
        self.block_size = self.layout.block_size
        self.tp_size = self.layout.tp_size
        disk_entries: dict[str, int] = {}
        if cfg.offload.disk_path:
            disk = DiskStore(_rank_dir(cfg.offload.disk_path, 0), on_corrupt=lambda *_: _count_corrupt())
            disk_entries = disk.scan()
            # TP ranks' directories share the filesystem and hold the same blocks (each its head shard).
            check_free_space(disk.root, cfg.offload.disk_bytes * self.tp_size,
                             sum(disk_entries.values()) * self.tp_size)
            if disk_entries:
                logger.info("kvplug offload: %d entries from a previous run on disk at %s", len(disk_entries),
                            cfg.offload.disk_path)
        # TP ranks hold the same blocks (each its head shard), so one plan covers all ranks: per-rank bytes.
        self.planner = TierPlanner(cfg.offload.cpu_bytes, cfg.offload.disk_bytes, cfg.offload.reuse_weight,
                                   disk_entries)
        self._pending_ops: list[TierOp] = self.planner.take_startup_ops()
        self.reqs: dict[str, _ReqState] = {}
        self._pending_loads: set[str] = set()
        self._size_cache: dict[tuple[str, object], int] = {}
        self._policies: dict[str, CachePolicy] = {}
        self.m = metrics.get_offload(cfg)
        # vLLM's GPU block pool (bind_gpu_block_pool): lossy reloads are taken out of its prefix cache.
        self.block_pool: Any = None
        self.isolated_blocks = 0
        self._warned_no_pool = False

    def policy(self, name: str) -> CachePolicy:
        if name not in self._policies:
            self._policies[name] = policy_registry.create(name, self.cfg.cache_policy)
        return self._policies[name]

    def key(self, policy: str, block_hash: Any) -> str:
        return entry_key(self.layout.identity(), policy, block_hash)

    def _choose(self, request: Any) -> str:
        params = getattr(request, "kv_transfer_params", None) or {}
        try:
            return choose_policy(self.cfg.cache_policy, len(request.prompt_token_ids or ()), params)
        except policy_registry.UnknownPolicyError as exc:
            # The HTTP middleware rejects these with 400; offline callers get the default and a warning.
            logger.warning("kvplug offload: %s; using %r", exc, self.cfg.cache_policy.default)
            return self.cfg.cache_policy.default

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        st = self.reqs.get(request.request_id)
        if st is None:
            params = getattr(request, "kv_transfer_params", None) or {}
            st = self.reqs[request.request_id] = _ReqState(
                request, self._choose(request), offload=params.get(policy_registry.REQUEST_OFFLOAD_KEY) is not False)
        if not st.offload:
            return 0, False
        if self.block_pool is None and not self.policy(st.policy).lossless:
            # Without the block pool a lossy reload could not be kept out of the prefix cache: recompute.
            if not self._warned_no_pool:
                self._warned_no_pool = True
                logger.warning("kvplug offload: vLLM did not bind its GPU block pool to the connector; entries "
                               "of lossy policies (%s) are recomputed instead of loaded", st.policy)
            return 0, False
        bs = self.block_size
        start = num_computed_tokens // bs
        # Leave at least one prompt token to compute: vLLM needs a token to sample from.
        limit = min(len(request.block_hashes), (request.num_tokens - 1) // bs)
        keys = []
        for i in range(start, limit):
            k = self.key(st.policy, request.block_hashes[i])
            if self.planner.where(k) is None:
                break
            keys.append(k)
        st.local_blocks, st.load_keys = start, keys
        return len(keys) * bs, False

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        st = self.reqs.get(request.request_id)
        if st is None:
            return
        st.lossy_from = None
        if num_external_tokens <= 0:
            return
        n = num_external_tokens // self.block_size
        st.load_keys = st.load_keys[:n]
        if not self.policy(st.policy).lossless:
            # vLLM cached the blocks it allocated for the load under the prefix's hash already; take them out
            # before the next waiting request looks the prefix up (later blocks: build_connector_meta).
            st.lossy_from = st.isolated_upto = st.local_blocks
            ids = vllm_compat.request_block_ids(blocks)
            self._isolate(st, ids, st.local_blocks + n)
        for k in st.load_keys:
            tier = self.planner.record_hit(k)
            if self.m is not None and tier is not None:
                self.m.hits.labels(tier=tier).inc()
        self._pending_loads.add(request.request_id)

    def _estimate_nbytes(self, policy: CachePolicy, block_start: int, prefix_len: int) -> int:
        lay = self.layout
        cls = policy.size_class(block_start, lay.block_size, prefix_len)
        cached = self._size_cache.get((policy.name, cls))
        if cached is not None:
            return cached
        elem = torch.empty(0, dtype=getattr(torch, lay.dtype, torch.bfloat16)).element_size()
        rows = lay.num_layers * lay.kv_heads
        if policy.drops_tokens:
            nbytes = rows * lay.block_size + 2 * rows * int(cls) * lay.head_dim * elem
        else:
            z = torch.zeros(1, lay.num_layers, lay.kv_heads, lay.block_size, lay.head_dim,
                            dtype=getattr(torch, lay.dtype, torch.bfloat16))
            nbytes = payload_nbytes(policy.encode(z, z, BlockContext((block_start,), prefix_len))[0])
        self._size_cache[(policy.name, cls)] = nbytes
        return nbytes

    def _block_table(self, st: _ReqState, new_ids: Any, replace: bool) -> None:
        if new_ids is None:
            return
        ids = list(new_ids[0])
        st.block_ids = ids if replace else st.block_ids + ids

    def build_connector_meta(self, so: Any) -> KvplugConnectorMetadata:
        meta = KvplugConnectorMetadata(tier_ops=self._pending_ops)
        self._pending_ops = []
        bs = self.block_size
        progress: list[tuple[_ReqState, int]] = []
        for new in so.scheduled_new_reqs:
            st = self.reqs.get(new.req_id)
            if st is None:
                meta.allocated_block_ids += list(new.block_ids[0]) if new.block_ids is not None else []
                continue
            self._block_table(st, new.block_ids, replace=True)
            meta.fresh_block_ids += st.block_ids[st.local_blocks + len(st.load_keys):]
            meta.allocated_block_ids += st.block_ids[st.local_blocks:]
            progress.append((st, new.num_computed_tokens + so.num_scheduled_tokens.get(new.req_id, 0)))
        cached = so.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            st = self.reqs.get(req_id)
            if cached.new_block_ids[i] is not None:
                meta.allocated_block_ids += list(cached.new_block_ids[i][0])
            if st is None:
                continue
            resumed = req_id in getattr(cached, "resumed_req_ids", ())
            new_ids = cached.new_block_ids[i]
            if new_ids is not None and not resumed:
                meta.fresh_block_ids += list(new_ids[0])
            self._block_table(st, new_ids, replace=resumed)
            if resumed:  # preempted and back: vLLM recomputes it; loads were only planned for new requests
                meta.fresh_block_ids += list(new_ids[0]) if new_ids is not None else []
            progress.append((st, cached.num_computed_tokens[i] + so.num_scheduled_tokens.get(req_id, 0)))

        for st, computed_after in progress:
            if st.lossy_from is not None:
                self._isolate(st, st.block_ids, computed_after // bs)

        for req_id in list(self._pending_loads):
            st = self.reqs.get(req_id)
            self._pending_loads.discard(req_id)
            if st is None or not st.load_keys or len(st.block_ids) < st.local_blocks + len(st.load_keys):
                continue
            ids = st.block_ids[st.local_blocks:st.local_blocks + len(st.load_keys)]
            meta.loads.append(LoadSpec(st.policy, list(st.load_keys), ids))

        for st, computed_after in progress:
            prompt_len = len(st.request.prompt_token_ids or ())
            if st.saved or not st.offload or computed_after < prompt_len:
                continue
            st.saved = True
            self._plan_saves(st, prompt_len, meta)
        return meta

    def _plan_saves(self, st: _ReqState, prompt_len: int, meta: KvplugConnectorMetadata) -> None:
        bs = self.block_size
        policy = self.policy(st.policy)
        n_full = min(prompt_len // bs, len(st.request.block_hashes), len(st.block_ids))
        spec = SaveSpec(st.policy, [], [], [], prompt_len, req_id=st.request.request_id)
        for i in range(n_full):
            k = self.key(st.policy, st.request.block_hashes[i])
            ops = self.planner.plan_store(k, self._estimate_nbytes(policy, i * bs, prompt_len))
            if not ops:
                if self.planner.where(k) is None and self.m is not None:
                    self.m.skipped_stores.inc()
                continue
            for op in ops:
                if op.kind in ("demote", "drop_cpu") and self.m is not None:
                    self.m.evictions.labels(tier=CPU).inc()
                elif op.kind == "drop_disk" and self.m is not None:
                    self.m.evictions.labels(tier=DISK).inc()
            meta.tier_ops += ops
            spec.keys.append(k)
            spec.block_ids.append(st.block_ids[i])
            spec.block_starts.append(i * bs)
        if not spec.keys:
            return
        if policy.name == "drop:snapkv":
            w = min(self.cfg.cache_policy.snapkv_window_tokens, prompt_len)
            spec.window_slots = [(st.block_ids[p // bs], p % bs) for p in range(prompt_len - w, prompt_len)
                                 if p // bs < len(st.block_ids)]
        # Whole-block policies encode synchronously in wait_for_save: nothing outlives the step.
        spec.deferred = st.save_deferred = self.defer_free and policy.layerwise
        meta.saves.append(spec)

    def update_connector_output(self, out: Any) -> None:
        wm = getattr(out, "kv_connector_worker_meta", None)
        if isinstance(wm, KvplugWorkerMetadata):
            for k in wm.unreadable_keys:
                self.planner.forget(k)
            if self.m is not None and wm.unreadable_keys:
                self.m.misses.inc(len(wm.unreadable_keys))  # planned as hits, recomputed
        self.delayed_frees.difference_update(getattr(out, "finished_sending", None) or ())

    def _isolate(self, st: _ReqState, block_ids: list[int], upto: int) -> None:
        """Take ``block_ids[st.isolated_upto:upto]`` out of vLLM's prefix cache (the request keeps them): KV
        derived from a lossy reload is served only through the tiers, under its own policy's key."""
        ids = block_ids[st.isolated_upto:upto]
        if not ids:
            return
        self.block_pool.evict_blocks(set(ids))
        self.isolated_blocks += len(ids)
        if self.m is not None:
            self.m.isolated_blocks.labels(policy=st.policy).inc(len(ids))
        st.isolated_upto = upto

    def request_finished(self, request: Any, block_ids: Any = None) -> bool:
        """Forget the request; True: vLLM must keep its blocks until the workers report its save done."""
        st = self.reqs.pop(request.request_id, None)
        self._pending_loads.discard(request.request_id)
        if st is not None and st.lossy_from is not None and block_ids:
            ids = list(block_ids[0]) if isinstance(block_ids, tuple) else list(block_ids)
            self._isolate(st, ids, len(ids))  # the last blocks (decode) were cached after the last step
        if st is None or not st.save_deferred:
            return False
        self.delayed_frees.add(request.request_id)
        return True


def _rank_dir(root: str, rank: int) -> str:
    return f"{root.rstrip('/')}/rank{rank}"


def _count_corrupt() -> None:
    m = metrics.get_offload()
    if m is not None:
        m.corrupt_entries.inc()


# --- worker side ---------------------------------------------------------------------------------------

@dataclass
class _InflightSave:
    """One step's layer-wise save whose device->host copies may still run (until ``event`` completes)."""

    event: Any
    keys: set[str]
    block_ids: set[int]


class _WorkerSide:
    def __init__(self, vllm_config: Any, cfg: cfg_mod.KvplugConfig, layout: Any = None) -> None:
        self.cfg = cfg
        self.vllm_config = vllm_config
        self.layout = layout if layout is not None else vllm_compat.kv_layout(vllm_config)
        self.cpu = CpuStore()
        # The only writer of its rank directory: exclusive (a second engine on the same disk_path fails here).
        self.disk = (DiskStore(_rank_dir(cfg.offload.disk_path, self.layout.tp_rank),
                               on_corrupt=lambda *_: _count_corrupt(), exclusive=True)
                     if cfg.offload.disk_path else None)
        self.writer = (AsyncDiskWriter(self.disk, self._disk_written, self._disk_write_failed)
                       if self.disk is not None else None)
        self.layers: list[tuple[str, torch.Tensor, torch.Tensor]] = []  # (name, K view, V view) by layer index
        self.layer_of: dict[str, int] = {}
        self._policies: dict[str, CachePolicy] = {}
        self.failed_block_ids: set[int] = set()
        self.unreadable: set[str] = set()
        self._unreadable_lock = threading.Lock()  # the disk writer's thread adds the keys of failed writes
        self._load_lane: Lane | None = None
        self._save_lane: Lane | None = None
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
        self.m = metrics.get_offload(cfg)
        # Plain counters too (tests and offline runs read them via collective_rpc; /metrics has the rest).
        self.loaded_blocks = {CPU: 0, DISK: 0}
        self.saved_blocks = 0
        # Per-layer hook calls that moved data (tests: the engine drove the layer-wise path).
        self.layerwise_saves = 0
        self.layerwise_load_waits = 0
        self.reuse_fences = 0  # steps whose compute stream waited for an in-flight save (preemption reuse)
        self.deferred_frees = 0  # finished requests whose blocks vLLM freed when get_finished reported them
        # Host seconds of layer-wise saves: issuing them, and the pinned-segment allocation within that.
        self.save_issue_s = 0.0
        self.save_alloc_s = 0.0
        atexit.register(self.close)

    def policy(self, name: str) -> CachePolicy:
        if name not in self._policies:
            self._policies[name] = policy_registry.create(name, self.cfg.cache_policy)
        return self._policies[name]

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        # The views the attention backends read (CPU_ATTN's key blocks may be stored transposed).
        self.register_views(vllm_compat.kv_block_views(self.vllm_config, kv_caches))

    def register_views(self, layers: list[tuple[str, torch.Tensor, torch.Tensor]]) -> None:
        self.layers = layers
        self.layer_of = {name: i for i, (name, _, _) in enumerate(layers)}
        dev = layers[0][1].device if layers else torch.device("cpu")
        self._load_lane, self._save_lane = Lane(dev), Lane(dev)
        # Host memory the GPU copies into must be pinned (else every copy is synchronous and staged); on CUDA
        # the CPU tier's budget is pinned once here, not per save inside a prefill.
        if self._host is None:
            self._host = host_memory.for_device(dev, self.cfg.offload.cpu_bytes,
                                                [self._load_lane.stream, self._save_lane.stream])
            self.cpu.host = self._host  # whole-block entries live in the same memory as segments
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

    def host_memory_stats(self) -> dict[str, float]:
        return self._host.stats() if self._host is not None else {}

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    # loads ------------------------------------------------------------------------------------------
    def _fetch(self, key: str) -> tuple[Payload | None, str | None]:
        p = self.cpu.get(key)
        if p is not None:
            return p, CPU
        if self.writer is not None:
            p = self.writer.pending(key)  # demoted or stored this run, not on disk yet
            if p is not None:
                return p, DISK
        if self.disk is not None:
            p = self.disk.read(key)
            if p is not None:
                return p, DISK
        return None, None

    def start_load(self, meta: KvplugConnectorMetadata) -> None:
        dropped_registry().clear(meta.fresh_block_ids)
        self._drain_load_timings()
        self._fence_reallocated_blocks(meta)
        self._loads = None
        if not meta.loads or not self.layers:
            return
        t0 = time.perf_counter()
        jobs = LoadJobs(self.layers, self._load_lane, on_layer_loaded=list(self.load_listeners))
        for spec in meta.loads:
            self._plan_load(spec, jobs)
        if not jobs:
            return
        self._loads = jobs
        start_ev = self._load_lane.record(timing=True)
        jobs.start()
        self._load_timings.append((start_ev, None, t0))

    def _plan_load(self, spec: LoadSpec, jobs: LoadJobs) -> None:
        policy = self.policy(spec.policy)
        entries: list[tuple[Payload, Any]] = []
        for i, key in enumerate(spec.keys):
            p, tier = self._fetch(key)
            if p is None:
                # vLLM recomputes these; later blocks of the chain cannot be used without this one either.
                self.failed_block_ids.update(spec.block_ids[i:])
                self.unreadable.update(spec.keys[i:i + 1])
                break
            if self.m is not None:
                self.m.bytes_loaded.labels(tier=tier, policy=spec.policy).inc(payload_nbytes(p))
            self.loaded_blocks[tier] += 1
            loc = self.cpu.locate(key) if tier == CPU else None
            saving = self._inflight_event(key)
            if saving is not None:
                if policy.layerwise and loc is None:
                    saving.synchronize()  # plan_runs stacks loose entries on the host right now (rare)
                elif saving not in jobs.after_saves:
                    jobs.after_saves.append(saving)  # the load stream reads the host memory after the copies
            entries.append((p, loc))
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
        self.layerwise_load_waits += 1

    def _finish_loads(self) -> None:
        if self._loads is None:
            return
        end_ev = self._loads.finish()  # the forward never waited for some layers: issue them anyway
        if self._load_timings and self._load_timings[-1][1] is None:
            start_ev, _, t0 = self._load_timings.pop()
            if end_ev is None:  # CPU: the work ran inline
                if self.m is not None:
                    self.m.load_seconds.observe(time.perf_counter() - t0)
            else:
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
        self.layerwise_saves += 1

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
            self.save_issue_s += saves.issue_s
            self.save_alloc_s += saves.alloc_s
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
            self.saved_blocks += len(spec.keys)
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
                self.reuse_fences += 1

    def finished_saves(self, finished_req_ids: set[str]) -> set[str]:
        """Requests vLLM finished (this or an earlier step) whose deferred save has completed: vLLM may free
        their blocks now. Each is reported once."""
        self._finished_waiting.update(r for r in finished_req_ids if r in self._deferred_reqs)
        done = {r for r in self._finished_waiting if Lane.done(self._deferred_reqs[r])}
        for r in done:
            del self._deferred_reqs[r]
        self._finished_waiting -= done
        self._prune_inflight()
        self.deferred_frees += len(done)
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
        if op.kind == "store_cpu" and op.key in encoded:
            item, policy = encoded[op.key]
            if isinstance(item, tuple):  # (segment, slot) of a layer-wise save
                self.cpu.adopt(op.key, *item)
            else:
                self.cpu.put(op.key, item)
            if self.m is not None:
                self.m.bytes_stored.labels(tier=CPU, policy=policy).inc(payload_nbytes(self.cpu.get(op.key)))
        elif op.kind == "store_disk" and op.key in encoded and self.writer is not None:
            item, policy = encoded[op.key]
            self.writer.write(op.key, item[0].entry(item[1]) if isinstance(item, tuple) else item, ready, policy)
        elif op.kind == "demote":
            payload = self.cpu.get(op.key)
            if payload is not None and self.writer is not None:
                # The entry may be filled by this or an earlier step's copies: the writer waits for them.
                self.writer.write(op.key, payload, self._inflight_event(op.key) or ready, "demoted")
            self.cpu.release(op.key)
        elif op.kind == "drop_cpu":
            self.cpu.release(op.key)
        elif op.kind == "drop_disk" and self.writer is not None:
            self.writer.delete(op.key)

    def _disk_written(self, key: str, nbytes: int, policy: str) -> None:
        if self.m is not None:
            self.m.bytes_stored.labels(tier=DISK, policy=policy).inc(nbytes)

    def _disk_write_failed(self, key: str, reason: str) -> None:
        # The scheduler side thinks the entry is on disk: reported like an unreadable one, it forgets it.
        if self.m is not None:
            self.m.disk_write_failures.labels(reason=reason).inc()
        with self._unreadable_lock:
            self.unreadable.add(key)

    def take_load_errors(self) -> set[int]:
        out, self.failed_block_ids = self.failed_block_ids, set()
        return out

    def worker_meta(self) -> KvplugWorkerMetadata | None:
        with self._unreadable_lock:
            if not self.unreadable:
                return None
            out, self.unreadable = KvplugWorkerMetadata(self.unreadable), set()
        return out


# --- the connector vLLM instantiates -------------------------------------------------------------------

class KvplugConnector(_Base):  # type: ignore[misc, valid-type]
    """vLLM KV connector (both roles) for kvplug's offload tiers and cache policies."""

    def __init__(self, vllm_config: Any, role: Any, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        from kvplug.plugin import active_config

        cfg = active_config()
        if not cfg.offload.enabled:
            # Loaded through --kv-transfer-config without `--offload`/config: use its defaults (CPU 8 GiB).
            cfg = msgspec_replace(cfg, offload=msgspec_replace(cfg.offload, enabled=True))
        self.scheduler_side = _SchedulerSide(vllm_config, cfg) if role == _Role.SCHEDULER else None
        self.worker_side = _WorkerSide(vllm_config, cfg) if role == _Role.WORKER else None

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a best-effort cache: a dropped save is a future miss, nothing more

    # scheduler side
    def get_num_new_matched_tokens(self, request, num_computed_tokens):
        return self.scheduler_side.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request, blocks, num_external_tokens):
        self.scheduler_side.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output):
        return self.scheduler_side.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output):
        self.scheduler_side.update_connector_output(connector_output)

    def request_finished(self, request, block_ids):
        # True: a save of the request's blocks may still be copying; get_finished reports when it is done.
        return self.scheduler_side.request_finished(request, block_ids), None

    def bind_gpu_block_pool(self, gpu_block_pool):
        if self.scheduler_side is not None:
            self.scheduler_side.block_pool = gpu_block_pool

    # worker side
    def register_kv_caches(self, kv_caches):
        self.worker_side.register_kv_caches(kv_caches)

    def start_load_kv(self, forward_context, **kwargs):
        meta = self._get_connector_metadata()
        if isinstance(meta, KvplugConnectorMetadata):
            self.worker_side.start_load(meta)

    def wait_for_layer_load(self, layer_name):
        self.worker_side.wait_for_layer_load(layer_name)

    def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs):
        # The layer's KV is in the paged cache (the hook runs after attention): start saving it.
        self.worker_side.save_layer(layer_name, self._get_connector_metadata())

    def wait_for_save(self):
        meta = self._get_connector_metadata()
        if isinstance(meta, KvplugConnectorMetadata):
            self.worker_side.save(meta)

    def get_finished(self, finished_req_ids):
        if self.worker_side is None:
            return None, None
        return self.worker_side.finished_saves(finished_req_ids) or None, None

    def shutdown(self):
        if self.worker_side is not None:
            self.worker_side.close()

    def get_block_ids_with_load_errors(self):
        return self.worker_side.take_load_errors() if self.worker_side is not None else set()

    def build_connector_worker_meta(self):
        return self.worker_side.worker_meta() if self.worker_side is not None else None


def msgspec_replace(struct: Any, **changes: Any) -> Any:
    import msgspec

    return msgspec.structs.replace(struct, **changes)
