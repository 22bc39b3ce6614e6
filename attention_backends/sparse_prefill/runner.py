"""run(): one layer's attention for a batch with sparse prefill chunks in it.

Dense rows (decodes, short prefills) go to the dense backend with the metadata the planner built for
them; every sparse chunk builds its index from its queries and the sequence's keys in the paged cache,
then attends sparsely (torch reference on CPU, Triton on CUDA, or vLLM's FA2 sparse kernel: executor.py).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.profiler import record_function

from attention_backends.row_subset import forward_rows
from attention_backends.sparse_prefill import cost_model, fa2_sparse
from attention_backends.sparse_prefill.executor import Executor, note_once
from attention_backends.sparse_prefill.head_config import LayerPlan, PatternConfig, build_index
from attention_backends.sparse_prefill.index import BLOCK, ChunkGeometry
from attention_backends.sparse_prefill.index_options import IndexOptions
from attention_backends.sparse_prefill.paged_keys import PagedKeys
from attention_backends.sparse_prefill.planner import SparsePrefillPlan
from attention_backends.sparse_prefill.reference import sparse_attention
from kvplug import metrics, vllm_compat

_stats_lock = threading.Lock()
# compiled_index: the start-up compile of the index build (backend_hooks.warm_up): seconds, plans, chunk shapes
WARM_UP: dict[str, Any] = {}
# Process-wide counters (tests read them through collective_rpc; Prometheus gets the same numbers).
STATS = {"batches": 0, "sparse_tokens": 0, "dense_prefill_tokens": 0, "sparse_layer_calls": 0,
         "computed_pairs": 0, "causal_pairs": 0,
         # sparse_prefill.executor: chunk-layers the FA2 kernel attended; ones that asked for it and ran triton
         "fa2_sparse_layer_calls": 0, "executor_fallback_layer_calls": 0}


# CUDA: per-layer computed-pair counts stay on the device, never read inside forward. The next step's metadata
# builder starts one non-blocking copy of them into pinned host memory (ordered after the step's kernels on the
# stream that ran them) and a later builder records them once that copy is done: no step ever waits for the
# device. (computed pairs on the device, causal pairs, the cost model's predicted computed pairs or None,
# the CUDA stream that computed them or None)
_PENDING_PAIRS: list[tuple[torch.Tensor, int, float | None, Any]] = []


@dataclass
class _CountsCopy:
    """One step's counts on their way to the host."""

    host: torch.Tensor  # [n] int64 (pinned when copied from the device)
    done: Any  # torch.cuda.Event recorded after the copy, None when the counts were on the host already
    pairs: list[tuple[int, float | None]]  # (causal, predicted) per count

    def ready(self) -> bool:
        return self.done is None or self.done.query()

    def wait(self) -> None:
        if self.done is not None:
            self.done.synchronize()


_IN_FLIGHT: list[_CountsCopy] = []  # copies started, oldest first (one stream: they complete in order)


def _start_copy(pending: list[tuple[torch.Tensor, int, float | None, Any]]) -> _CountsCopy:
    stream = pending[-1][3]  # a step's layers run on one stream
    pairs = [(causal, predicted) for _, causal, predicted, _ in pending]
    if stream is None:  # host tensors (the CPU path, tests): nothing to wait for
        return _CountsCopy(torch.stack([c.reshape(()).to(torch.int64) for c, *_ in pending]), None, pairs)
    with torch.cuda.stream(stream):
        counts = torch.stack([c.reshape(()).to(torch.int64) for c, *_ in pending])
        host = torch.empty(counts.shape, dtype=counts.dtype, pin_memory=True)
        host.copy_(counts, non_blocking=True)
        done = torch.cuda.Event()
        done.record(stream)
    return _CountsCopy(host, done, pairs)


def flush_pending(wait: bool = False) -> None:
    """Record the pair counts that sparse chunks left on the device. From the metadata builder (``wait`` False):
    start the host copy of what the last step left and record the copies already done, never waiting for the
    device. ``wait`` (stats_snapshot, outside any step): record everything, waiting for the copies."""
    global _PENDING_PAIRS
    ready: list[_CountsCopy] = []
    with _stats_lock:
        pending, _PENDING_PAIRS = _PENDING_PAIRS, []
        if pending:
            _IN_FLIGHT.append(_start_copy(pending))
        while _IN_FLIGHT and (wait or _IN_FLIGHT[0].ready()):
            ready.append(_IN_FLIGHT.pop(0))
    for copy in ready:
        if wait:
            copy.wait()
        for computed, (causal, predicted) in zip(copy.host.tolist(), copy.pairs):
            _record_pairs(int(computed), causal, predicted)


def stats_snapshot(_worker: Any = None) -> dict[str, Any]:
    """The counters (every sparse chunk run so far included), plus ``chunks``: prefill chunks by
    "decision/reason" (cost_model.record_decisions), and ``warm_up``: the compiled_index start-up compile."""
    flush_pending(wait=True)
    with _stats_lock:
        return {**STATS, "chunks": cost_model.decisions_snapshot(), "warm_up": dict(WARM_UP)}


def record_batch(plan: SparsePrefillPlan) -> None:
    with _stats_lock:
        STATS["batches"] += 1
        STATS["sparse_tokens"] += plan.sparse_tokens
        STATS["dense_prefill_tokens"] += plan.dense_prefill_tokens
    m = metrics.get()
    if m is not None:
        m.sparse_prefill_tokens.labels(mode="sparse").inc(plan.sparse_tokens)
        if plan.dense_prefill_tokens:
            m.sparse_prefill_tokens.labels(mode="dense").inc(plan.dense_prefill_tokens)


def record_dense_batch(prefill_tokens: int) -> None:
    """A batch without sparse chunks: its prefill tokens (if any) were dense."""
    if not prefill_tokens:
        return
    with _stats_lock:
        STATS["dense_prefill_tokens"] += prefill_tokens
    m = metrics.get()
    if m is not None:
        m.sparse_prefill_tokens.labels(mode="dense").inc(prefill_tokens)


def _record_computed(computed: torch.Tensor, causal: int, predicted: float | None) -> None:
    """One chunk-layer's computed-pair count: on CUDA queued on the device (read by flush_pending, outside
    forward), elsewhere recorded now."""
    if computed.is_cuda:
        with _stats_lock:
            _PENDING_PAIRS.append((computed, causal, predicted, torch.cuda.current_stream(computed.device)))
    else:
        _record_pairs(int(computed), causal, predicted)


def _record_pairs(computed: int, causal: int, predicted: float | None = None) -> None:
    if predicted is not None:  # the cost model learns how far its density estimate is off
        cost_model.FEEDBACK.observe(computed, predicted)
    with _stats_lock:
        STATS["sparse_layer_calls"] += 1
        STATS["computed_pairs"] += computed
        STATS["causal_pairs"] += causal
    m = metrics.get()
    if m is not None:
        m.sparse_prefill_pairs.labels(kind="computed").inc(computed)
        m.sparse_prefill_pairs.labels(kind="causal").inc(causal)


# The warm-up's sequence length: above every budget (a shorter sequence than a budget is another graph) and, on
# the CPU, above 4096 keys (inductor's C++ reductions compile differently up to 4096).
WARM_UP_TOKENS = 8192


class SparsePrefillRunner:
    """Lives in one attention impl (one layer); the per-head plan of that layer is resolved once."""

    def __init__(self, pattern_config: PatternConfig, num_heads: int, num_kv_heads: int, scale: float,
                 index_options: IndexOptions = IndexOptions(), executor: Executor | None = None) -> None:
        self.pattern_config = pattern_config
        self.num_heads, self.num_kv_heads, self.scale = num_heads, num_kv_heads, scale
        self.index_options = index_options  # SparsePrefillConfig.index_options(): how each chunk's index is built
        self.executor = executor or Executor("triton")  # sparse_prefill.executor, resolved (executor.resolve)
        self._layer_plans: dict[float, LayerPlan] = {}  # by budget factor (head_config.budget_scale)

    def reconfigure(self, pattern_config: PatternConfig, index_options: IndexOptions) -> None:
        """Another per-head config / index options from the next chunk on (backend_hooks.set_override)."""
        self.pattern_config, self.index_options = pattern_config, index_options
        self._layer_plans = {}

    def layer_plan(self, layer: Any, device: torch.device, budget_factor: float = 1.0) -> LayerPlan:
        plan = self._layer_plans.get(budget_factor)
        if plan is None:
            plan = LayerPlan.from_config(self.pattern_config, vllm_compat.layer_index(layer.layer_name),
                                         self.num_heads, device, budget_factor)
            self._layer_plans[budget_factor] = plan
        return plan

    def forward(self, dense_forward: Callable[..., Any], layer: Any, query: torch.Tensor, key: torch.Tensor | None,
                value: torch.Tensor | None, kv_cache: torch.Tensor, plan: SparsePrefillPlan,
                output: torch.Tensor) -> torch.Tensor:
        if plan.dense_rows is not None:
            forward_rows(dense_forward, layer, query, key, value, kv_cache, plan.dense_metadata, plan.dense_rows, output)
        key_cache, value_cache = vllm_compat.paged_kv_views(kv_cache, layer)
        block_size = key_cache.shape[2]
        use_fa2 = self._use_fa2(query, key_cache)
        for i, seg in enumerate(plan.segments):
            layer_plan = self.layer_plan(layer, query.device, seg.budget_factor)
            geom = ChunkGeometry(seg.row_end - seg.row_start, seg.seq_len)
            causal = geom.causal_pairs() * self.num_heads
            predicted = None if seg.predicted_density is None else seg.predicted_density * causal
            blocks = plan.block_table[seg.req, :-(-seg.seq_len // block_size)].long()
            seq = None
            if use_fa2:
                # per batch (the first layer builds it, the others reuse it): where the sequence's tokens are
                seq = plan.sequence_kv.get((i, block_size))
                if seq is None:
                    seq = plan.sequence_kv[(i, block_size)] = fa2_sparse.SequenceKV.build(blocks, block_size, geom)
            computed = self._attend(query[seg.row_start:seg.row_end], key_cache, value_cache, blocks, geom,
                                    layer_plan, output[seg.row_start:seg.row_end], seq)
            _record_computed(computed, causal, predicted)
        return output

    def _attend(self, q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, blocks: torch.Tensor,
                geom: ChunkGeometry, layer_plan: LayerPlan, out: torch.Tensor,
                seq: "fa2_sparse.SequenceKV | None") -> torch.Tensor:
        """One sparse chunk: index + attention on the executor's path (``seq`` given: the FA2 kernel). Returns
        the computed pairs as a 0-d tensor (on CUDA left on the device)."""
        if seq is not None:
            return self._attend_fa2(q, key_cache, value_cache, blocks, seq, geom, layer_plan, out)
        if q.is_cuda:
            from attention_backends.sparse_prefill import triton_kernels

            return triton_kernels.sparse_prefill_paged(q, key_cache, value_cache, blocks, geom, layer_plan,
                                                       self.scale, out, self.index_options)
        k = _gather_sequence(key_cache, blocks, geom.L)
        v = _gather_sequence(value_cache, blocks, geom.L)
        # CPU: the torch estimate on the gathered keys (fused_estimate is a Triton kernel: CUDA only)
        index = build_index(q, k, geom, layer_plan, self.scale, self.index_options)
        sparse_attention(q, k, v, index, self.scale, out=out)
        return index.computed_pairs(geom).sum()

    def warm_up(self, layers: range, query_dtype: torch.dtype, cache_dtype: torch.dtype, block_size: int,
                head_dim: int, device: torch.device, small_chunks: bool = True,
                floor: int = WARM_UP_TOKENS) -> tuple[int, list[tuple[int, int]]]:
        """Run every chunk variant the compiled index build has (warm_up_geometries) for each distinct layer plan
        of ``layers`` on synthetic K/V and queries, through the path forward takes (this executor, these dtypes),
        so torch.compile builds its graphs now and no request pays them (compiled_index). Records nothing.
        ``small_chunks``: also chunks of one query block (their own graphs; skip them where none goes sparse);
        ``floor``: the shortest sequence that may go sparse. Returns the number of distinct plans and the (n, L) run."""
        # Under inference_mode, as vLLM runs forward, the layer plans built here too (forward builds them lazily,
        # inside it): dynamo guards on the grad mode and on each input tensor's dispatch keys, so a graph traced
        # outside it would not serve a request.
        with torch.inference_mode():
            plans: dict[tuple, LayerPlan] = {}
            for layer in layers:
                plan = LayerPlan.from_config(self.pattern_config, layer, self.num_heads, device)
                plans.setdefault(plan.head_specs, plan)
            geoms = warm_up_geometries(list(plans.values()), small_chunks, floor)
            return len(plans), self._warm_up(list(plans.values()), geoms, query_dtype, cache_dtype, block_size,
                                             head_dim, device)

    def _warm_up(self, plans: list[LayerPlan], geoms: list[ChunkGeometry], query_dtype: torch.dtype,
                 cache_dtype: torch.dtype, block_size: int, head_dim: int, device: torch.device
                 ) -> list[tuple[int, int]]:
        L = max(g.L for g in geoms)
        Hkv, d = self.num_kv_heads, head_dim
        nb = -(-L // block_size) + 1
        gen = torch.Generator(device=device).manual_seed(0)
        # [blocks, block_size, Hkv, d] memory viewed [blocks, Hkv, block_size, d], as FlashAttention's cache is
        key_cache, value_cache = (torch.randn(nb, block_size, Hkv, d, generator=gen, device=device)
                                  .to(cache_dtype).transpose(1, 2) for _ in range(2))
        blocks = torch.randperm(nb, generator=gen, device=device)[:-(-L // block_size)]
        q_all = torch.randn(L, self.num_heads, d, generator=gen, device=device).to(query_dtype)
        use_fa2 = self.executor.fa2 and self.executor.refusal(q_all, key_cache) is None
        for geom in geoms:
            q, out = q_all[-geom.n:], torch.empty_like(q_all[-geom.n:])
            pages = blocks[:-(-geom.L // block_size)]
            seq = fa2_sparse.SequenceKV.build(pages, block_size, geom) if use_fa2 else None
            for plan in plans:
                self._attend(q, key_cache, value_cache, pages, geom, plan, out, seq)
        return [(g.n, g.L) for g in geoms]

    def _use_fa2(self, query: torch.Tensor, key_cache: torch.Tensor) -> bool:
        """This layer call's chunks go through the FA2 kernel (counted either way when it was asked for)."""
        ex = self.executor
        refused = ex.refusal(query, key_cache) if ex.fa2 else None
        if refused is not None:
            note_once(f"sparse_prefill.executor={ex.name}: FA2 sparse cannot run this batch ({refused}); its "
                      "sparse chunks run triton")
        if ex.fallback or refused is not None:
            with _stats_lock:
                STATS["executor_fallback_layer_calls"] += 1
            return False
        if ex.fa2:
            with _stats_lock:
                STATS["fa2_sparse_layer_calls"] += 1
        return ex.fa2

    def _attend_fa2(self, q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, blocks: torch.Tensor,
                    seq: fa2_sparse.SequenceKV, geom: ChunkGeometry, layer_plan: LayerPlan,
                    out: torch.Tensor) -> torch.Tensor:
        """One chunk through the FA2 kernel: gather the sequence's K/V out of the cache (the kernel reads
        contiguous varlen K/V; the estimate reuses the keys; per token or by whole pages: fa2_whole_page_gather),
        index with 64-key windows, convert, attend. Returns the computed pairs as a 0-d tensor (on the device:
        read later, outside forward)."""
        options = self.index_options
        k = fa2_sparse.gather_kv(key_cache, seq, options.fa2_whole_page_gather)
        v = fa2_sparse.gather_kv(value_cache, seq, options.fa2_whole_page_gather)
        keys = PagedKeys(key_cache, blocks, geom.L) if options.fused_estimate and q.is_cuda else k[:geom.L]
        with record_function("kvplug.sparse_prefill.index"):
            index = build_index(q, keys, geom, layer_plan, self.scale, options, trim_columns=False,
                                window_ranges=True)
        with record_function("kvplug.sparse_prefill.attend"):
            fa2_sparse.attend(self.executor.kernel, q, k, v, index, geom, self.scale, out, seq,
                              fa2_sparse.plan_has_blocks(layer_plan, options.dense_tail_rows))
        return index.computed_pairs(geom).sum()



def warm_up_geometries(plans: list[LayerPlan], small_chunks: bool, floor: int = WARM_UP_TOKENS) -> list[ChunkGeometry]:
    """The chunk shapes that give the compiled index build (head_config.compiled_builder, dynamic shapes) every
    graph later chunks need, measured on the CPU (tests/attention_backends/sparse_prefill/test_runner_warm_up.py):
    a later chunk (n < L; first, or the whole-prompt graph would pin n == L), a whole prompt (n == L: no new
    graph after the chunked one, kept to be sure) and, with ``small_chunks``, chunks of one query block (n < BLOCK
    and n == BLOCK: a graph each). Budgets (any budget_scale factor), longer sequences, other chunk offsets in
    the batch and other query/key layouts (head_config._fresh_inputs) reuse them."""
    top = max([v for p in plans for g in p.groups for v in g.budget_max.values()], default=0)
    L = max(WARM_UP_TOKENS, -(-(2 * top + 1) // BLOCK) * BLOCK)
    small = [ChunkGeometry(BLOCK // 2 + 1, L), ChunkGeometry(BLOCK, L)] if small_chunks else []
    # ``floor``: the shortest sequence a sparse chunk may have (min_prompt_tokens). Below WARM_UP_TOKENS the same
    # two chunks there too: on the CPU up to 4096 keys is another graph (on the GPU they reuse the long ones).
    short = -(-max(floor, 2 * top + 1, 2 * BLOCK) // BLOCK) * BLOCK
    shorter = [ChunkGeometry(short // 2, short), ChunkGeometry(short, short)] if short < L else []
    return [ChunkGeometry(L // 2, L), ChunkGeometry(L, L)] + small + shorter


def _gather_sequence(cache: torch.Tensor, blocks: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Paged [num_blocks, kv_heads, block_size, d] -> the sequence's [seq_len, kv_heads, d] (a copy)."""
    x = cache[blocks]  # [nb, Hkv, bs, d]
    return x.permute(0, 2, 1, 3).reshape(-1, x.shape[1], x.shape[3])[:seq_len]
