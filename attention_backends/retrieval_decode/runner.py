"""run(): one layer's decode attention for a batch holding retrieval-decode sequences, plus the layer's
block summaries, updated right after the dense backend writes this step's keys into the paged cache.

Rows that are not retrieval decodes (prefill chunks, short decodes) go through ``rest_forward`` with the
metadata the planner built for just them, so sparse prefill and the dense kernels see a normal batch.
"""
from __future__ import annotations

import threading
from typing import Any, Callable

import torch

from attention_backends.retrieval_decode import cpu_kernel
from attention_backends.retrieval_decode.planner import DecodeGraphPlan, RetrievalPlan
from attention_backends.retrieval_decode.selection import select_for_queries
from attention_backends.retrieval_decode.summaries import BlockSummaries
from kvplug import metrics, vllm_compat

_stats_lock = threading.Lock()
# Per process, per batch (not per layer); tests read them through collective_rpc, Prometheus gets the same.
STATS = {"batches": 0, "sparse_tokens": 0, "dense_decode_tokens": 0, "blocks_read": 0, "blocks_total": 0}
# Layers whose runner allocated block summaries (not reset by stats_reset): proof that the retrieval impl, not
# the dense one, is writing summaries in this process; and what they cost on top of vLLM's KV cache.
SUMMARIES = {"layers": 0, "bytes": 0}


def stats_snapshot(_worker: Any = None) -> dict[str, int]:
    with _stats_lock:
        return dict(STATS, summary_layers=SUMMARIES["layers"], summary_bytes=SUMMARIES["bytes"])


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


class RetrievalDecodeRunner:
    """Lives in one attention impl (one layer): owns that layer's block summaries."""

    def __init__(self, impl: Any) -> None:
        self.impl = impl
        self.summaries: BlockSummaries | None = None
        self.layer_idx: int | None = None

    def _layer_index(self, layer: Any) -> int:
        if self.layer_idx is None:
            self.layer_idx = vllm_compat.layer_index(getattr(layer, "layer_name", ""))
        return self.layer_idx

    def _dense_rows(self, layer: Any, query: torch.Tensor, kv_cache: torch.Tensor, plan: Any,
                    output: torch.Tensor) -> torch.Tensor:
        """The retrieval rows of a dense layer: the same kernels reading every block (fixed shapes)."""
        import dataclasses

        if query.is_cuda:
            from attention_backends.retrieval_decode import triton_kernels

            key_cache, value_cache = vllm_compat.paged_kv_views(kv_cache, layer)
            dense = dataclasses.replace(plan.params, min_context_tokens=1 << 62)
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

    def after_kv_write(self, key: torch.Tensor | None, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        if key is None or kv_cache.numel() == 0:
            return  # profiling runs have no cache yet
        nb, hkv, bs, d = vllm_compat.paged_kv_geometry(kv_cache)
        if self.summaries is None or not self.summaries.matches(nb, hkv, d, bs, kv_cache.device):
            # First write into this cache (or the cache was re-allocated): summaries start empty.
            if kv_cache.is_cuda and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("retrieval decode: first KV write happened inside CUDA-graph capture; "
                                   "summaries must be allocated in an eager warm-up step")
            # CPU: float32; CUDA: the KV dtype, so scoring reads 1/block_size of the KV bytes it saves.
            dtype = torch.float32 if not kv_cache.is_cuda or not kv_cache.dtype.is_floating_point \
                or kv_cache.element_size() < 2 else kv_cache.dtype
            fresh = self.summaries is None
            self.summaries = BlockSummaries.allocate(nb, hkv, d, bs, dtype, kv_cache.device)
            with _stats_lock:
                SUMMARIES["layers"] += fresh
                SUMMARIES["bytes"] += 2 * self.summaries.kmin.numel() * self.summaries.kmin.element_size() * fresh
        self.summaries.update(key, slot_mapping)

    def forward(self, rest_forward: Callable[..., Any], layer: Any, query: torch.Tensor, key: torch.Tensor | None,
                value: torch.Tensor | None, kv_cache: torch.Tensor, plan: RetrievalPlan | DecodeGraphPlan,
                output: torch.Tensor, dense_forward: Callable[[], Any] | None = None) -> torch.Tensor:
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
        if query.is_cuda:  # fused Triton step: budgets, selection and validity computed on the device
            from attention_backends.retrieval_decode import triton_kernels

            key_cache, value_cache = vllm_compat.paged_kv_views(kv_cache, layer)
            if key_cache.shape[2] != p.block_size:  # block tables would index kernel blocks of another size
                raise RuntimeError(f"retrieval decode: KV cache blocks hold {key_cache.shape[2]} tokens but the "
                                   f"KV-cache spec says {p.block_size} (kernel block size != manager block size)")
            if isinstance(plan, DecodeGraphPlan):  # whole pure-decode batch, written in place (CUDA graphs)
                n = plan.seq_lens.shape[0]
                triton_kernels.retrieval_decode(query[:n], key_cache, value_cache, kmin, kmax, plan.block_table,
                                                plan.seq_lens, p, plan.k, self.impl.scale, out=output[:n])
            else:
                output[plan.rows] = triton_kernels.retrieval_decode(
                    query[plan.rows], key_cache, value_cache, kmin, kmax, plan.block_table, plan.seq_lens, p, plan.k,
                    self.impl.scale)
            return output
        q = query[plan.rows]
        sel = select_for_queries(q, kmin, kmax, plan.block_table, plan.num_blocks, plan.budget_blocks, plan.k,
                                 p.sink_blocks, p.recent_blocks, p.gqa_reduce)
        phys = torch.gather(plan.block_table.long().unsqueeze(1).expand(-1, kmin.shape[1], -1), 2, sel.blocks)
        output[plan.rows] = cpu_kernel.cpu_head_decode(self.impl, layer, q, kv_cache, phys, plan.extra["cpu"])
        return output


def stats_reset(_worker: Any = None) -> None:
    with _stats_lock:
        for key in STATS:
            STATS[key] = 0
