"""The connector's scheduler side (engine core): which prefix blocks the tiers hold, and each step's plan.

On a new request it counts the consecutive prefix blocks beyond vLLM's own GPU prefix-cache hit that the
tiers hold (``get_num_new_matched_tokens``), remembers which GPU blocks vLLM allocated for them, and each step
emits metadata for the workers: loads (entry key -> GPU block id), saves and the tier plan (what to store
where, what to demote or drop: offload/tiers/planner.py).

It also keeps what the API server shows (offload/inventory.py) and answers it over the control channel
(offload/control.py): the inventory, the events feed, pins, and each request's cache report (how many prompt
tokens came from vLLM's GPU prefix cache, from each tier, and were recomputed; why the first missing block
missed). The report's numbers are added to the kvplug_request_prompt_tokens / kvplug_offload_misses counters
when the request finishes, so reports and metrics agree.
"""
from __future__ import annotations

import collections
import hashlib
import logging
import math
import threading
import time
from array import array
from dataclasses import dataclass, field
from typing import Any

import torch

from kvplug import vllm_compat
from kvplug.kv_payload import BlockContext, payload_nbytes
from offload.config import OffloadConfig
from offload import inventory as inv
from offload import request_keys, trace
from offload.keys import KeyMaker, hash_hex
from offload.layout import KvLayout
from offload.metadata import KvplugConnectorMetadata, KvplugWorkerMetadata, LoadSpec, SaveSpec
from offload.tiers import registry as tier_registry
from offload.tiers.disk import rank_dir
from offload.tiers.eviction import DEFAULT_PRIORITY
from offload.tiers.planner import DEMOTE, DROP, PinRefused, TierOp, TierPlanner
from offload.wiring import KvPolicy, PolicyProvider

logger = logging.getLogger("vllm.kvplug.offload")
REMEMBERED_REPORTS = 4096  # reports the API server can still fetch by id after their request finished
REMEMBERED_CONTENT = 200_000  # prompt blocks whose salt/policy a later miss can compare with


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
    report: dict | None = None  # the request's cache report (set once its blocks are allocated)
    keys: list[str] = field(default_factory=list)  # entry keys of its first blocks (SchedulerSide.keys_of)
    load_tiers: list[str] = field(default_factory=list)


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
        self.planner = TierPlanner(tier_registry.budgets(cfg), cfg.reuse_weight, existing, cfg.max_pinned_fraction)
        self._pending_ops: list[TierOp] = self.planner.take_startup_ops()
        # The control thread reads (and for pins changes) the planner and the inventory: one lock for both.
        self.lock = threading.RLock()
        self.inventory = inv.CacheInventory(self.planner, self.block_size,
                                            cfg.disk_path and rank_dir(cfg.disk_path, 0), cfg.inventory_prompt_tokens)
        self.inventory.restore()
        self.reports: collections.OrderedDict[str, dict] = collections.OrderedDict()
        # Prompt block content (token ids, salt- and policy-free) -> the (salt, policy, opted out) it was seen with.
        self._content: collections.OrderedDict[bytes, set[tuple[str | None, str, bool]]] = collections.OrderedDict()
        self.reqs: dict[str, _ReqState] = {}
        self._pending_loads: set[str] = set()
        self.steps = 0  # engine steps seen (build_connector_meta calls): offload/trace.py's events count them
        self._size_cache: dict[tuple[str, object], int] = {}
        self._policies: dict[str, KvPolicy] = {}
        self._key_makers: dict[str, KeyMaker] = {}
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

    def _key_maker(self, policy: str) -> KeyMaker:
        maker = self._key_makers.get(policy)
        if maker is None:
            maker = self._key_makers[policy] = KeyMaker(self.layout.identity(), policy)
        return maker

    def key(self, policy: str, block_hash: Any) -> str:
        return self._key_maker(policy)(block_hash)

    def keys_of(self, st: _ReqState, n: int) -> list[str]:
        """The entry keys of the request's first ``n`` blocks, each computed once per request (its lookup, its
        saves and its inventory record key the same blocks)."""
        hashes = st.request.block_hashes
        n = min(n, len(hashes))
        if len(st.keys) < n:
            maker = self._key_maker(st.policy)
            st.keys += [maker(h) for h in hashes[len(st.keys):n]]
        return st.keys[:n]

    def _choose(self, request: Any) -> str:
        params = getattr(request, "kv_transfer_params", None) or {}
        return self.policies.choose(len(request.prompt_token_ids or ()), params)

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        with self.lock, trace.span("kvplug.offload.scheduler.lookup", req=request.request_id,
                                   step=self.steps) as ev:
            matched, load_async = self._match(request, num_computed_tokens)
            ev.update(gpu_hit_tokens=num_computed_tokens, matched_tokens=matched, load_async=load_async)
            return matched, load_async

    def _match(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        st = self.reqs.get(request.request_id)
        if st is None:
            params = getattr(request, "kv_transfer_params", None) or {}
            st = self.reqs[request.request_id] = _ReqState(
                request, self._choose(request), offload=params.get(self.policies.offload_key) is not False)
        st.local_blocks, st.load_keys = num_computed_tokens // self.block_size, []
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
        for k in self.keys_of(st, limit)[start:]:
            if self.planner.where(k) is None:
                break
            keys.append(k)
        st.local_blocks, st.load_keys = start, keys
        return len(keys) * bs, False

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        with self.lock, trace.span("kvplug.offload.scheduler.after_alloc", req=request.request_id, step=self.steps):
            self._after_alloc(request, blocks, num_external_tokens)

    def _after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        st = self.reqs.get(request.request_id)
        if st is None:
            return
        st.lossy_from = None
        n = max(num_external_tokens, 0) // self.block_size
        st.load_keys = st.load_keys[:n]
        # One pass over the loaded keys: a hit's tier is also what the report counts (a hit moves no entry).
        hit_tiers = [self.planner.record_hit(k) for k in st.load_keys]
        if st.report is None:  # the first allocation decides (a preempted request's recompute is not a miss)
            self._start_report(st, hit_tiers)
        if n <= 0:
            return
        if not self.policy(st.policy).lossless:
            # vLLM cached the blocks it allocated for the load under the prefix's hash already; take them out
            # before the next waiting request looks the prefix up (later blocks: build_connector_meta).
            st.lossy_from = st.isolated_upto = st.local_blocks
            ids = vllm_compat.request_block_ids(blocks)
            self._isolate(st, ids, st.local_blocks + n)
        hits = collections.Counter(hit_tiers)
        if self.m is not None:
            for tier, n in hits.items():
                if tier is not None:
                    self.m.hits.labels(tier=tier).inc(n)  # once per tier and load, not per block
        self.inventory.hit(st.load_keys)
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
        with self.lock, trace.span("kvplug.offload.scheduler.build_meta", step=self.steps) as ev:
            meta = self._build_meta(so)
            if meta.tier_ops:
                self.inventory.sync([op.key for op in meta.tier_ops])
                self._count_evictions()
            if trace.enabled():
                ev.update(load_blocks=sum(len(s.keys) for s in meta.loads), saves=len(meta.saves),
                          scheduled=[n.req_id for n in so.scheduled_new_reqs] + list(so.scheduled_cached_reqs.req_ids))
            self.steps += 1  # build_connector_meta runs once per engine step (vLLM's schedule())
            return meta

    def _build_meta(self, so: Any) -> KvplugConnectorMetadata:
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
            trace.mark("kvplug.offload.scheduler.load_planned", req=req_id, step=self.steps, blocks=len(ids))

        for st, computed_after in progress:
            prompt_len = len(st.request.prompt_token_ids or ())
            if st.saved or computed_after < prompt_len:
                continue
            st.saved = True
            if st.offload:
                self._plan_saves(st, prompt_len, meta)
            else:
                self._remember_content(st, prompt_len // bs, opted_out=True)
        return meta

    def _plan_saves(self, st: _ReqState, prompt_len: int, meta: KvplugConnectorMetadata) -> None:
        bs = self.block_size
        policy = self.policy(st.policy)
        n_full = min(prompt_len // bs, len(st.request.block_hashes), len(st.block_ids))
        spec = SaveSpec(st.policy, [], [], [], prompt_len, req_id=st.request.request_id)
        for i, k in enumerate(self.keys_of(st, n_full)):
            if self.planner.where(k) is not None:  # stored already (e.g. the prefix this request loaded)
                continue
            ops = self.planner.plan_store(k, self._estimate_nbytes(policy, i * bs, prompt_len))
            if not ops:  # fits nowhere
                if self.m is not None:
                    self.m.skipped_stores.inc()
                continue
            meta.tier_ops += ops
            spec.keys.append(k)
            spec.block_ids.append(st.block_ids[i])
            spec.block_starts.append(i * bs)
        self._record_prefix(st, n_full, meta)
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
        if isinstance(wm, KvplugWorkerMetadata) and wm.unreadable_keys:
            with self.lock:
                for k in wm.unreadable_keys:
                    self.planner.forget(k)
                self.inventory.sync(wm.unreadable_keys, inv.UNREADABLE)
                self._reports_lose(wm.unreadable_keys)
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

    def finish_report(self, request: Any) -> dict | None:
        """Close the request's cache report (its numbers go to the counters): the kv_transfer_params of its
        response (the report, when the request came through the API server's middleware), else None."""
        with self.lock:
            st = self.reqs.get(request.request_id)
            return self._finish_report(st) if st is not None else None

    def request_finished(self, request: Any, block_ids: Any = None) -> bool:
        """Forget the request; True: vLLM must keep its blocks until the workers report its save done."""
        trace.mark("kvplug.offload.scheduler.finished", req=request.request_id, step=self.steps)
        with self.lock:
            return self._finished(request, block_ids)

    def _finished(self, request: Any, block_ids: Any) -> bool:
        st = self.reqs.pop(request.request_id, None)
        self._pending_loads.discard(request.request_id)
        if st is not None and st.lossy_from is not None and block_ids:
            ids = list(block_ids[0]) if isinstance(block_ids, tuple) else list(block_ids)
            self._isolate(st, ids, len(ids))  # the last blocks (decode) were cached after the last step
        if st is None or not st.save_deferred:
            return False
        self.delayed_frees.add(request.request_id)
        return True

    # --- cache report ----------------------------------------------------------------------------------
    def _params(self, st: _ReqState) -> dict:
        return getattr(st.request, "kv_transfer_params", None) or {}

    def _start_report(self, st: _ReqState, load_tiers: list[str | None]) -> None:
        """The request's cache report, from its first allocation: GPU hit, what each tier supplies (``load_tiers``:
        the tier of each of ``st.load_keys``), the rest recomputed, and why the first block past the hits missed."""
        bs, req = self.block_size, st.request
        prompt_len = len(req.prompt_token_ids or ())
        st.load_tiers = [t or "?" for t in load_tiers]
        params = self._params(st)
        st.report = {"prompt_tokens": prompt_len, "gpu_tokens": min(st.local_blocks * bs, prompt_len),
                     **{f"{t.name}_tokens": 0 for t in self.planner.tiers}, "recomputed_tokens": 0,
                     "missed_blocks": 0, "policy": st.policy,
                     "priority": params.get(request_keys.PRIORITY_KEY, DEFAULT_PRIORITY),
                     "offload": st.offload, "first_miss": None, "pin": None, "final": False}
        self._recount(st)
        rid = params.get(request_keys.REPORT_ID_KEY)
        if isinstance(rid, str):
            self.reports[rid] = st.report
            while len(self.reports) > REMEMBERED_REPORTS:
                self.reports.popitem(last=False)

    def _recount(self, st: _ReqState) -> None:
        """Token counts and the first miss from ``st.load_keys`` / ``st.load_tiers`` (again after a failed load)."""
        r, bs, req = st.report, self.block_size, st.request
        assert r is not None
        for t in self.planner.tiers:
            r[f"{t.name}_tokens"] = bs * sum(1 for x in st.load_tiers[:len(st.load_keys)] if x == t.name)
        served = st.local_blocks + len(st.load_keys)
        r["recomputed_tokens"] = r["prompt_tokens"] - r["gpu_tokens"] - bs * len(st.load_keys)
        # Blocks the tiers could have supplied (vLLM computes at least the prompt's last token).
        limit = min(len(req.block_hashes), (r["prompt_tokens"] - 1) // bs) if r["prompt_tokens"] else 0
        r["missed_blocks"] = max(0, limit - served)
        r["first_miss"] = ({"block": served, "token": served * bs, "reason": self._miss_reason(st, served)}
                           if r["missed_blocks"] else None)

    def _miss_reason(self, st: _ReqState, i: int) -> str:
        if not st.offload:
            return inv.OPTED_OUT
        key = self.key(st.policy, st.request.block_hashes[i])
        why = self.inventory.why_gone(key)
        if why is not None:
            return why
        seen = self._content.get(self._content_of(st, i + 1))
        if not seen:
            return inv.NEVER_SEEN
        salt = getattr(st.request, "cache_salt", None)
        same_salt = {(policy, opted_out) for s, policy, opted_out in seen if s == salt}
        if not same_salt:
            return inv.OTHER_SALT
        if (st.policy, False) in same_salt:
            return inv.NOT_STORED
        if any(opted_out for _, opted_out in same_salt):
            return inv.OPTED_OUT
        return inv.OTHER_POLICY

    def _known_content(self, st: _ReqState, n_blocks: int) -> list[bytes | None]:
        """The content digests of the request's first ``n_blocks`` blocks that the inventory knows, else None: a
        registered block's vLLM hash fixes every token up to it, so a follow-up that loaded a 2048-block prefix
        hashes only its new blocks."""
        blocks = self.inventory.blocks
        return [b.content if (b := blocks.get(k)) is not None else None for k in self.keys_of(st, n_blocks)]

    def _content_of(self, st: _ReqState, n_blocks: int) -> bytes:
        """The identity of the request's first ``n_blocks`` blocks (``_content_chain``'s last), hashing only the
        blocks whose digest the inventory does not know."""
        return self._content_chain(st.request, n_blocks, self._known_content(st, n_blocks))[-1]

    def _content_chain(self, request: Any, n_blocks: int, known: list[bytes | None] = ()) -> list[bytes]:
        """Salt- and policy-free identities of the prompt's first ``n_blocks`` prefixes (token ids only).
        ``known[i]``: block i's identity where already known (else None), taken instead of hashing its tokens."""
        bs, tokens = self.block_size, request.prompt_token_ids or ()
        out, h = [], b""
        for i in range(n_blocks):
            d = known[i] if i < len(known) else None
            h = d if d is not None else hashlib.blake2b(
                h + array("q", tokens[i * bs:(i + 1) * bs]).tobytes(), digest_size=16).digest()
            out.append(h)
        return out

    def _remember_content(self, st: _ReqState, n_blocks: int, opted_out: bool,
                          known: list[bytes | None] = ()) -> list[bytes]:
        """Remember the (salt, policy, opted out) each of the first ``n_blocks`` prefixes was seen with; their
        content chain (``known``: as ``_content_chain``)."""
        salt = getattr(st.request, "cache_salt", None)
        chain = self._content_chain(st.request, n_blocks, known)
        for h in chain:
            seen = self._content.setdefault(h, set())
            if len(seen) < 8:  # variants kept per content (salts x policies)
                seen.add((salt, st.policy, opted_out))
            self._content.move_to_end(h)
        while len(self._content) > REMEMBERED_CONTENT:
            self._content.popitem(last=False)
        return chain

    def _reports_lose(self, keys: set[str]) -> None:
        """Planned loads that turned out unreadable: vLLM recomputes from the first of them on."""
        for st in self.reqs.values():
            if st.report is None or not st.load_keys or keys.isdisjoint(st.load_keys):
                continue
            st.load_keys = st.load_keys[:min(st.load_keys.index(k) for k in keys if k in st.load_keys)]
            self._recount(st)

    def _finish_report(self, st: _ReqState) -> dict | None:
        r = st.report
        if r is None:
            return None
        r["final"] = True
        if self.m is not None:
            for source in ("gpu", *(t.name for t in self.planner.tiers), "recomputed"):
                if r[f"{source}_tokens"]:
                    self.m.prompt_tokens.labels(source=source).inc(r[f"{source}_tokens"])
            if r["missed_blocks"]:
                self.m.misses.labels(reason=r["first_miss"]["reason"]).inc(r["missed_blocks"])
        if request_keys.REPORT_ID_KEY not in self._params(st):
            return None
        return {request_keys.REPORT_FIELD: r}

    # --- inventory, pins -------------------------------------------------------------------------------
    def _record_prefix(self, st: _ReqState, n_full: int, meta: KvplugConnectorMetadata) -> None:
        """After a request's saves were planned: its blocks and prefix in the inventory, its pin."""
        params = self._params(st)
        entry_keys, blocks = self.keys_of(st, n_full), self.inventory.blocks
        chain = self._remember_content(st, n_full, opted_out=False, known=self._known_content(st, n_full))
        keys, registered = [], []
        for h, k, content in zip(st.request.block_hashes, entry_keys, chain):
            if self.planner.where(k) is None:
                break  # not stored (fits nowhere): the prefix ends here
            b = blocks.get(k)
            if b is None:
                b = self.inventory.register(k, hash_hex(h), st.policy)
                registered.append(k)
            b.content = content
            keys.append(k)
        if not keys:
            return
        priority = params.get(request_keys.PRIORITY_KEY, DEFAULT_PRIORITY)
        prefix = self.inventory.add_prefix(hash_hex(st.request.block_hashes[len(keys) - 1]), keys, st.policy,
                                           priority, (st.request.prompt_token_ids or ())[:len(keys) * self.block_size])
        # Only the blocks registered now: every planner change of a registered block's tiers is synced where it
        # is made (tier ops after each step, pins, deletes, unreadable entries).
        self.inventory.sync(registered)
        if priority != DEFAULT_PRIORITY:
            for k in keys:
                for t in self.planner.holders(k):
                    self.planner.index(t).set_priority(k, priority)  # type: ignore[union-attr]
        if params.get(request_keys.PIN_KEY) is True:
            ttl = params.get(request_keys.TTL_KEY)
            result = self._pin(prefix, ttl, params.get(request_keys.PRIORITY_KEY), meta.tier_ops)
            if st.report is not None:
                st.report["pin"] = result

    def _pin(self, prefix: inv.Prefix, ttl_s: float | None, priority: str | None, ops: list[TierOp]) -> dict:
        until = math.inf if ttl_s is None else time.time() + float(ttl_s)
        keys = [k for k in prefix.keys if self.planner.where(k) is not None]
        try:
            ops += self.planner.pin(keys, until, priority)
        except PinRefused as exc:
            if self.m is not None:
                self.m.pin_refusals.labels(tier=exc.tier).inc()
            return {"pinned": False, "prefix": prefix.prefix_id, "error": str(exc)}
        prefix.pinned_until = until if prefix.pinned_until is None else max(until, prefix.pinned_until)
        if priority is not None:
            prefix.priority = priority
        self.inventory.sync(keys)
        self.inventory.save_pins()
        self._update_gauges()
        return {"pinned": True, "prefix": prefix.prefix_id, "blocks": len(keys),
                "ttl_s": None if ttl_s is None else float(ttl_s)}

    def _count_evictions(self) -> None:
        evicted = self.planner.take_evicted()
        if self.m is None:
            return
        for tier, _, cls in evicted:
            self.m.evictions.labels(tier=tier, **{"class": cls}).inc()
        self._update_gauges()

    def _update_gauges(self) -> None:
        if self.m is None:
            return
        for t in self.planner.tiers:
            index = self.planner.index(t.name)
            if index is not None:
                self.m.pinned_bytes.labels(tier=t.name).set(index.pinned_bytes)
                for cls, nbytes in index.class_bytes().items():
                    self.m.resident_bytes.labels(tier=t.name, **{"class": cls}).set(nbytes)

    # --- the control channel (API server -> engine core) ------------------------------------------------
    def answer(self, msg: dict) -> dict:
        op = msg.get("op")
        if op == "events":
            return self._answer_events(msg)
        with self.lock:
            if op == "inventory":
                return {"ok": True, **self.inventory.listing(int(msg.get("offset", 0)), int(msg.get("limit", 100)),
                                                             msg.get("tier"), msg.get("pinned"))}
            if op == "report":
                r = self.reports.get(str(msg.get("id")))
                return {"ok": True, "report": dict(r) if r is not None else None}
            if op in ("pin", "delete"):
                p = self.inventory.find_prefix(str(msg.get("prefix", "")))
                if p is None:
                    return {"ok": False, "status": 404, "error": f"no resident prefix {msg.get('prefix')!r}"}
                return self._answer_pin(p, msg) if op == "pin" else self._answer_delete(p)
        return {"ok": False, "status": 400, "error": f"unknown control op {op!r}"}

    def _answer_events(self, msg: dict) -> dict:
        since, epoch = msg.get("since"), msg.get("epoch")
        wait = min(float(msg.get("wait_s") or 0), inv.MAX_EVENT_WAIT_S)
        deadline = time.monotonic() + wait
        while True:
            with self.lock:
                out = self.inventory.events_since(since, epoch)
            if out["reset"] or out["stored"] or out["removed"] or time.monotonic() >= deadline:
                return {"ok": True, **out}
            with self.inventory.changed:  # short waits: an event between the check and the wait is not missed long
                self.inventory.changed.wait(min(0.25, max(0.0, deadline - time.monotonic())))

    def _answer_pin(self, p: inv.Prefix, msg: dict) -> dict:
        if msg.get("pinned") is False:
            self.planner.unpin(p.keys)
            p.pinned_until = None
            self.inventory.save_pins()
            self._update_gauges()
            return {"ok": True, "pinned": False, "prefix": p.prefix_id}
        result = self._pin(p, msg.get("ttl_s"), msg.get("priority"), self._pending_ops)
        if not result["pinned"]:
            return {"ok": False, "status": 507, "error": result["error"], **result}
        return {"ok": True, **result}

    def _answer_delete(self, p: inv.Prefix) -> dict:
        keys = [k for k in p.keys if self.planner.where(k) is not None]
        for k in keys:
            self._pending_ops += self.planner.plan_drop(k)
        was_pinned = p.pinned_until is not None
        self.inventory.sync(keys, inv.DELETED)
        self.inventory.prefixes.pop(p.prefix_id, None)
        if was_pinned:
            self.inventory.save_pins()
        self._update_gauges()
        return {"ok": True, "deleted": p.prefix_id, "blocks": len(keys)}
