"""kvplug's KV connector: offloads prefix KV blocks to CPU and disk tiers, in the form the policy chooses.

Loaded by vLLM through ``--kv-transfer-config '{"kv_connector": "KvplugConnector",
"kv_connector_module_path": "offload.connector", "kv_role": "kv_both"}'`` (``kvplug serve --offload``
writes it). One class with the two halves vLLM's ABC asks for:

* Scheduler side (engine core): on a new request, counts the consecutive prefix blocks beyond vLLM's own
  GPU prefix-cache hit that the tiers hold (``get_num_new_matched_tokens``), remembers which GPU blocks vLLM
  allocated for them, and each step emits metadata: loads (entry key -> GPU block id), saves and the tier
  plan (offload/tiers.py: what to store where, what to demote or delete).
* Worker side (each worker): executes it. Loads fetch the entries (CPU tier or disk), decode them with the
  policy on the KV cache's device (so a compressed entry also crosses PCIe compressed), and write K/V into
  the paged cache before the forward pass. Saves happen in ``wait_for_save`` of the step in which a
  request's prompt finishes prefilling: all its prompt blocks are in the cache then (policies see the whole
  prefix: SnapKV's observation window, StreamingLLM's window, KIVI's recent tokens).

Entries are keyed by vLLM's chained block hash + policy + model/layout (offload/keys.py). A missing or
corrupt entry is reported to vLLM as a failed block load, which vLLM recomputes (kv_load_failure_policy
"recompute"), and the scheduler side forgets it; a full tier evicts and never fails a request.

Synchronous on CPU. On CUDA, decode + copy run on a side stream and ``wait_for_layer_load`` makes the
compute stream wait for them (the first layer waits for all layers: entries hold every layer of a block,
so there is no per-layer overlap yet), and saves copy device->host synchronously at the end of the step.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from cache_policies import registry as policy_registry
from cache_policies.base import BlockContext, CachePolicy, Payload, compression_ratio, payload_nbytes
from cache_policies.selection import choose_policy
from kvplug import config as cfg_mod
from kvplug import metrics, vllm_compat
from offload.dropped_tokens import registry as dropped_registry
from offload.keys import entry_key
from offload.stores import CpuStore, DiskStore
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


@dataclass
class KvplugConnectorMetadata(_Metadata):  # type: ignore[misc, valid-type]
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)
    tier_ops: list[TierOp] = field(default_factory=list)
    fresh_block_ids: list[int] = field(default_factory=list)  # reallocated: forget their dropped-token masks


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
    offload: bool = True  # False: kv_transfer_params opted this request out of the tiers


class _SchedulerSide:
    def __init__(self, vllm_config: Any, cfg: cfg_mod.KvplugConfig) -> None:
        self.cfg = cfg
        self.layout = vllm_compat.kv_layout(vllm_config, tp_rank=0)
        self.block_size = self.layout.block_size
        self.tp_size = self.layout.tp_size
        disk_entries: dict[str, int] = {}
        if cfg.offload.disk_path:
            disk = DiskStore(_rank_dir(cfg.offload.disk_path, 0), on_corrupt=lambda *_: _count_corrupt())
            disk_entries = disk.scan()
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
        if st is None or num_external_tokens <= 0:
            return
        n = num_external_tokens // self.block_size
        st.load_keys = st.load_keys[:n]
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
                continue
            self._block_table(st, new.block_ids, replace=True)
            meta.fresh_block_ids += st.block_ids[st.local_blocks + len(st.load_keys):]
            progress.append((st, new.num_computed_tokens + so.num_scheduled_tokens.get(new.req_id, 0)))
        cached = so.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            st = self.reqs.get(req_id)
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
        spec = SaveSpec(st.policy, [], [], [], prompt_len)
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
        meta.saves.append(spec)

    def update_connector_output(self, out: Any) -> None:
        wm = getattr(out, "kv_connector_worker_meta", None)
        if isinstance(wm, KvplugWorkerMetadata):
            for k in wm.unreadable_keys:
                self.planner.forget(k)

    def request_finished(self, request: Any) -> None:
        self.reqs.pop(request.request_id, None)
        self._pending_loads.discard(request.request_id)


def _rank_dir(root: str, rank: int) -> str:
    return f"{root.rstrip('/')}/rank{rank}"


def _count_corrupt() -> None:
    m = metrics.get_offload()
    if m is not None:
        m.corrupt_entries.inc()


# --- worker side ---------------------------------------------------------------------------------------

class _WorkerSide:
    def __init__(self, vllm_config: Any, cfg: cfg_mod.KvplugConfig) -> None:
        self.cfg = cfg
        self.vllm_config = vllm_config
        self.layout = vllm_compat.kv_layout(vllm_config)
        self.cpu = CpuStore()
        self.disk = (DiskStore(_rank_dir(cfg.offload.disk_path, self.layout.tp_rank),
                               on_corrupt=lambda *_: _count_corrupt()) if cfg.offload.disk_path else None)
        self.layers: list[tuple[str, torch.Tensor, torch.Tensor]] = []  # (name, K view, V view) by layer index
        self._policies: dict[str, CachePolicy] = {}
        self.failed_block_ids: set[int] = set()
        self.unreadable: set[str] = set()
        self._load_event = None
        self._stream = None
        self.m = metrics.get_offload(cfg)
        # Plain counters too (tests and offline runs read them via collective_rpc; /metrics has the rest).
        self.loaded_blocks = {CPU: 0, DISK: 0}
        self.saved_blocks = 0

    def policy(self, name: str) -> CachePolicy:
        if name not in self._policies:
            self._policies[name] = policy_registry.create(name, self.cfg.cache_policy)
        return self._policies[name]

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        # The views the attention backends read (CPU_ATTN's key blocks may be stored transposed).
        self.layers = vllm_compat.kv_block_views(self.vllm_config, kv_caches)
        dev = self.layers[0][1].device if self.layers else torch.device("cpu")
        if dev.type == "cuda":
            self._stream = torch.cuda.Stream(device=dev)

    # loads ------------------------------------------------------------------------------------------
    def _fetch(self, key: str) -> tuple[Payload | None, str | None]:
        p = self.cpu.get(key)
        if p is not None:
            return p, CPU
        if self.disk is not None:
            p = self.disk.read(key)
            if p is not None:
                return p, DISK
        return None, None

    def start_load(self, meta: KvplugConnectorMetadata) -> None:
        dropped_registry().clear(meta.fresh_block_ids)
        if not meta.loads or not self.layers:
            return
        t0 = time.perf_counter()
        dev = self.layers[0][1].device
        ctx = torch.cuda.stream(self._stream) if self._stream is not None else _nullcontext()
        if self._stream is not None:
            # Work vLLM queued before this step (e.g. zeroing freshly allocated blocks) must land first.
            self._stream.wait_stream(torch.cuda.current_stream())
        with ctx:
            for spec in meta.loads:
                self._load_one(spec, dev)
            if self._stream is not None:
                self._load_event = torch.cuda.Event()
                self._load_event.record(self._stream)
        if self.m is not None:
            if self._stream is not None:
                self._load_event.synchronize()  # for the histogram only when metrics are on
            self.m.load_seconds.observe(time.perf_counter() - t0)

    def _load_one(self, spec: LoadSpec, dev: torch.device) -> None:
        payloads, ids = [], []
        for i, (key, block_id) in enumerate(zip(spec.keys, spec.block_ids)):
            if len(payloads) == CHUNK_BLOCKS:
                self._write_blocks(spec.policy, payloads, ids, dev)
                payloads, ids = [], []
            p, tier = self._fetch(key)
            if p is None:
                # vLLM recomputes these; later blocks of the chain cannot be used without this one either.
                self.failed_block_ids.update(spec.block_ids[i:])
                self.unreadable.update(spec.keys[i:i + 1])
                break
            if self.m is not None:
                self.m.bytes_loaded.labels(tier=tier, policy=spec.policy).inc(payload_nbytes(p))
            self.loaded_blocks[tier] += 1
            payloads.append({k: t.to(dev, non_blocking=True) for k, t in p.items()})
            ids.append(block_id)
        if payloads:
            self._write_blocks(spec.policy, payloads, ids, dev)

    def _write_blocks(self, policy: str, payloads: list[Payload], ids: list[int], dev: torch.device) -> None:
        """Decode payloads with the policy and write them into the paged cache at block ``ids``."""
        k_like = self.layers[0][1]
        like = torch.empty(len(ids), len(self.layers), *k_like.shape[1:], dtype=k_like.dtype, device=dev)
        k, v, keep = self.policy(policy).decode(payloads, like)
        index = torch.tensor(ids, device=dev)
        for layer, (_, kc, vc) in enumerate(self.layers):
            kc[index] = k[:, layer]
            vc[index] = v[:, layer]
        dropped_registry().set_loaded(ids, keep)

    def wait_for_layer_load(self) -> None:
        if self._load_event is not None:
            torch.cuda.current_stream().wait_event(self._load_event)
            self._load_event = None

    # saves and tier moves ---------------------------------------------------------------------------
    def save(self, meta: KvplugConnectorMetadata) -> None:
        if not self.layers or (not meta.saves and not meta.tier_ops):
            return
        encoded: dict[str, tuple[Payload, str]] = {}
        for spec in meta.saves:
            for key, payload in zip(spec.keys, self._encode(spec)):
                encoded[key] = (payload, spec.policy)
            self.saved_blocks += len(spec.keys)
        for op in meta.tier_ops:
            self._apply(op, encoded)

    def _encode(self, spec: SaveSpec) -> list[Payload]:
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
            index = torch.tensor(spec.block_ids[c0:c0 + step], device=self.layers[0][1].device)
            k = torch.stack([kc[index] for _, kc, _ in self.layers], dim=1)  # [n, L, H, N, D]
            v = torch.stack([vc[index] for _, _, vc in self.layers], dim=1)
            ctx = BlockContext(tuple(spec.block_starts[c0:c0 + step]), spec.prefix_len, obs_queries=obs)
            payloads = policy.encode(k, v, ctx)
            out += [{name: t.to("cpu", non_blocking=False) for name, t in p.items()} for p in payloads]
            if self.m is not None and payloads:
                self.m.compression_ratio.labels(policy=spec.policy).observe(compression_ratio(k, v, payloads))
        return out

    def _apply(self, op: TierOp, encoded: dict[str, tuple[Payload, str]]) -> None:
        if op.kind == "store_cpu" and op.key in encoded:
            payload, policy = encoded[op.key]
            self.cpu.put(op.key, payload)
            if self.m is not None:
                self.m.bytes_stored.labels(tier=CPU, policy=policy).inc(payload_nbytes(payload))
        elif op.kind == "store_disk" and op.key in encoded and self.disk is not None:
            payload, policy = encoded[op.key]
            n = self.disk.write(op.key, payload)
            if self.m is not None:
                self.m.bytes_stored.labels(tier=DISK, policy=policy).inc(n)
        elif op.kind == "demote":
            payload = self.cpu.get(op.key)
            if payload is not None and self.disk is not None:
                n = self.disk.write(op.key, payload)
                if self.m is not None:
                    self.m.bytes_stored.labels(tier=DISK, policy="demoted").inc(n)
            self.cpu.release(op.key)
        elif op.kind == "drop_cpu":
            self.cpu.release(op.key)
        elif op.kind == "drop_disk" and self.disk is not None:
            self.disk.delete(op.key)

    def take_load_errors(self) -> set[int]:
        out, self.failed_block_ids = self.failed_block_ids, set()
        return out

    def worker_meta(self) -> KvplugWorkerMetadata | None:
        if not self.unreadable:
            return None
        out, self.unreadable = KvplugWorkerMetadata(self.unreadable), set()
        return out


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


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
        self.scheduler_side.request_finished(request)
        return False, None

    # worker side
    def register_kv_caches(self, kv_caches):
        self.worker_side.register_kv_caches(kv_caches)

    def start_load_kv(self, forward_context, **kwargs):
        meta = self._get_connector_metadata()
        if isinstance(meta, KvplugConnectorMetadata):
            self.worker_side.start_load(meta)

    def wait_for_layer_load(self, layer_name):
        self.worker_side.wait_for_layer_load()

    def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs):
        return  # saved all layers at once in wait_for_save (see module docstring)

    def wait_for_save(self):
        meta = self._get_connector_metadata()
        if isinstance(meta, KvplugConnectorMetadata):
            self.worker_side.save(meta)

    def get_block_ids_with_load_errors(self):
        return self.worker_side.take_load_errors() if self.worker_side is not None else set()

    def build_connector_worker_meta(self):
        return self.worker_side.worker_meta() if self.worker_side is not None else None


def msgspec_replace(struct: Any, **changes: Any) -> Any:
    import msgspec

    return msgspec.structs.replace(struct, **changes)
