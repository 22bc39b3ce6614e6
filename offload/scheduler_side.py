"""The connector's scheduler side (engine core): which prefix blocks the tiers hold, and each step's plan.

On a new request it counts the consecutive prefix blocks beyond vLLM's own GPU prefix-cache hit that the
tiers hold (``get_num_new_matched_tokens``), remembers which GPU blocks vLLM allocated for them, and each step
emits metadata for the workers: loads (entry key -> GPU block id), saves and the tier plan (what to store
where, what to demote or drop: offload/tiers/planner.py).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from kvplug import vllm_compat
from kvplug.kv_payload import BlockContext, payload_nbytes
from offload.config import OffloadConfig
from offload.keys import entry_key
from offload.layout import KvLayout
from offload.metadata import KvplugConnectorMetadata, KvplugWorkerMetadata, LoadSpec, SaveSpec
from offload.tiers import registry as tier_registry
from offload.tiers.planner import DEMOTE, DROP, TierOp, TierPlanner
from offload.wiring import KvPolicy, PolicyProvider

logger = logging.getLogger("vllm.kvplug.offload")


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


class SchedulerSide:
    def __init__(self, layout: KvLayout, cfg: OffloadConfig, policies: PolicyProvider, metrics: Any = None,
                 defer_free: bool = False) -> None:
        """``metrics``: kvplug's OffloadMetrics or None; ``defer_free``: saves outlive their step (CUDA side-stream
        copies), so finished requests' blocks are kept until a worker reports the save done."""
        self.cfg = cfg
        self.policies = policies
        self.m = metrics
        self.defer_free = defer_free
        self.delayed_frees: set[str] = set()  # finished requests whose blocks wait for a worker's report
        self.layout = layout
        self.block_size = self.layout.block_size
        self.tp_size = self.layout.tp_size
        existing = {t.name: t.existing_entries(cfg, self.tp_size, self._count_corrupt)
                    for t in tier_registry.enabled(cfg)}
        # TP ranks hold the same blocks (each its head shard), so one plan covers all ranks: per-rank bytes.
        self.planner = TierPlanner(tier_registry.budgets(cfg), cfg.reuse_weight, existing)
        self._pending_ops: list[TierOp] = self.planner.take_startup_ops()
        self.reqs: dict[str, _ReqState] = {}
        self._pending_loads: set[str] = set()
        self._size_cache: dict[tuple[str, object], int] = {}
        self._policies: dict[str, KvPolicy] = {}
        # vLLM's GPU block pool (bind_gpu_block_pool): lossy reloads are taken out of its prefix cache.
        self.block_pool: Any = None
        self.isolated_blocks = 0
        self._warned_no_pool = False

    def _count_corrupt(self, key: str, why: str) -> None:
        if self.m is not None:
            self.m.corrupt_entries.inc()

    def policy(self, name: str) -> KvPolicy:
        if name not in self._policies:
            self._policies[name] = self.policies.create(name)
        return self._policies[name]

    def key(self, policy: str, block_hash: Any) -> str:
        return entry_key(self.layout.identity(), policy, block_hash)

    def _choose(self, request: Any) -> str:
        params = getattr(request, "kv_transfer_params", None) or {}
        return self.policies.choose(len(request.prompt_token_ids or ()), params)

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        st = self.reqs.get(request.request_id)
        if st is None:
            params = getattr(request, "kv_transfer_params", None) or {}
            st = self.reqs[request.request_id] = _ReqState(
                request, self._choose(request), offload=params.get(self.policies.offload_key) is not False)
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

    def _estimate_nbytes(self, policy: KvPolicy, block_start: int, prefix_len: int) -> int:
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
                if op.kind in (DEMOTE, DROP) and self.m is not None:
                    self.m.evictions.labels(tier=op.tier).inc()
            meta.tier_ops += ops
            spec.keys.append(k)
            spec.block_ids.append(st.block_ids[i])
            spec.block_starts.append(i * bs)
        if not spec.keys:
            return
        w = policy.observation_window_tokens(prompt_len)
        if w:
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
