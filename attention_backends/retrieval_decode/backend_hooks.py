"""The hooks kvplug's backend calls: plan in the metadata builder, summaries after each KV write, run in
the attention impl. Each returns None when retrieval decode is off, so the backend stays a passthrough."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch

from attention_backends import wiring
from attention_backends.retrieval_decode import cpu_kernel, planner, reuse, runner
from kvplug import vllm_compat

PLAN_ATTR = "kvplug_retrieval"
# Benchmark knob: RetrievalParams fields replaced at run time in this process (set through
# LLM.collective_rpc), so one engine with one prefilled prefix cache can sweep budgets; {"dense": True}
# sends every decode to the dense path. Empty = the config as resolved.
_OVERRIDE: dict = {}


def set_override(_worker: Any = None, **fields: Any) -> None:
    """Replace retrieval params in this process (``collective_rpc(set_override, kwargs=...)``)."""
    unknown = set(fields) - set(planner.RetrievalParams.__dataclass_fields__) - {"dense"}
    if unknown:
        raise ValueError(f"unknown retrieval decode override(s): {sorted(unknown)}")
    _OVERRIDE.clear()
    _OVERRIDE.update(fields)


def _config():
    cfg = wiring.current().retrieval_decode
    return cfg if cfg.enabled else None


def enabled() -> bool:
    return _config() is not None


def plan_of(attn_metadata: Any) -> planner.RetrievalPlan | None:
    return getattr(attn_metadata, PLAN_ATTR, None)


class BuilderHook:
    def __init__(self, builder: Any, cfg: Any) -> None:
        self.builder = builder
        # CUDA: pure-decode batches use fixed shapes so full CUDA graphs can capture and replay them.
        self.graph_safe = vllm_compat.platform_name() == "cuda"
        self.params = planner.RetrievalParams.for_device(cfg, builder.kv_cache_spec.block_size, self.graph_safe)
        self.num_kv_heads = builder.kv_cache_spec.num_kv_heads
        self.graph_k = planner.graph_k(self.params, builder.vllm_config.model_config.max_model_len)
        self.dense_path = None
        if self.graph_safe and self.params.graph_dense_path:
            self.dense_path = _DensePathBuffers(builder)
        self.tracker: reuse.ReuseTracker | None = None  # selection reuse (reselect_interval > 1), made on first use
        # vLLM may reuse one group's metadata for another group by swapping its block table in
        # (update_block_table); the plan holds the first group's table, so every group must build its own.
        builder.supports_update_block_table = False

    def build(self, common_attn_metadata: Any, build_full: Callable[[Any], Any],
              build_rest: Callable[[Any], Any], build_dense: Callable[[Any], Any] | None = None) -> Any | None:
        """Metadata of a batch with retrieval decodes in it (the plan attached), else None: build as usual.
        ``build_dense``: the dense backend's build of a batch without cascade (the graph's dense path)."""
        cam = common_attn_metadata
        phases = vllm_compat.batch_phases(cam)
        if not phases.decode_tokens:
            return None
        params = self.params
        if _OVERRIDE:
            if _OVERRIDE.get("dense"):
                runner.record_batch(None, phases.decode_tokens)
                return None
            params = dataclasses.replace(params, **_OVERRIDE)
        tracker = self._reuse_tracker(params, phases)
        if self.graph_safe and not phases.prefill_reqs:
            return self._build_graph_plan(cam, params, phases, build_full, build_dense, tracker)
        plan = planner.plan(params, cam.query_start_loc_cpu, vllm_compat.host_seq_lens(cam), cam.num_reqs,
                            cam.block_table_tensor, cam.num_actual_tokens)
        runner.record_batch(plan, phases.decode_tokens)
        if plan is None:
            return None
        attn_metadata = build_full(cam)
        if plan.rest_req_ids.numel():
            plan.rest_metadata = build_rest(vllm_compat.subset_common_metadata(cam, plan.rest_req_ids, plan.rest_rows))
            plan.rest_rows_dev = plan.rest_rows.to(cam.block_table_tensor.device)
        if tracker is not None:  # a pure-decode batch on the CPU path: rows = request indices
            seq = vllm_compat.host_seq_lens(cam)[:cam.num_reqs]
            retrieval = torch.zeros(cam.num_reqs, dtype=torch.bool, device=seq.device)
            retrieval[plan.req_ids] = True
            reselect, sel_seq_lens = tracker.step(cam.block_table_tensor, seq, retrieval, params.reselect_interval,
                                                  params.block_size)
            plan.reuse = reuse.ReuseRows(plan.req_ids, reselect[plan.req_ids], sel_seq_lens[plan.req_ids],
                                         tracker.capacity, self._reuse_slots(cam), params.reuse_extra_blocks)
        if vllm_compat.platform_name() == "cpu":
            blocks = None if plan.reuse is None else reuse.selected_counts(
                plan.reuse.reselect, plan.reuse.sel_seq_lens, plan.seq_lens_cpu, params, plan.reuse.slots)
            per_head = planner.selected_tokens(plan, blocks).repeat_interleave(self.num_kv_heads)
            plan.extra["cpu"] = cpu_kernel.cpu_head_decode_metadata(self.builder, per_head)
            if params.dense_layers:  # the first layers read every block of the same sequences
                full = plan.seq_lens_cpu.repeat_interleave(self.num_kv_heads)
                plan.extra["cpu_dense"] = cpu_kernel.cpu_head_decode_metadata(self.builder, full)
        setattr(attn_metadata, PLAN_ATTR, plan)
        return attn_metadata

    def _reuse_tracker(self, params: planner.RetrievalParams, phases: Any) -> reuse.ReuseTracker | None:
        """The tracker when this batch may reuse selections (reuse on, no prefill chunk in it), else None; a batch
        that may not resets every row (its next retrieval step selects)."""
        if params.reselect_interval <= 1 or phases.prefill_reqs:
            if self.tracker is not None:
                self.tracker.reset()
            return None
        if self.tracker is None:
            self.tracker = reuse.ReuseTracker(vllm_compat.decode_batch_capacity(self.builder.vllm_config),
                                              self.builder.device)
        return self.tracker

    def _reuse_slots(self, cam: Any) -> int:
        """Stored slots per (row, kv-head): the graph's k, as the select kernels clamp it (to the table width)."""
        return min(self.graph_k, int(cam.block_table_tensor.shape[1]))

    def _build_graph_plan(self, cam: Any, params: planner.RetrievalParams, phases: Any,
                          build_full: Callable[[Any], Any], build_dense: Callable[[Any], Any] | None,
                          tracker: reuse.ReuseTracker | None = None) -> Any:
        """CUDA pure-decode batch: a device-only plan over the builder's persistent buffers (graph replay)."""
        n = cam.num_reqs
        dense_metadata = retrieval_seq_lens = None
        if self.dense_path is not None:  # built first: the full build below rewrites the builder's shared buffers
            if build_dense is None:
                raise RuntimeError("retrieval decode: graph_dense_path needs the dense backend's build (build_dense)")
            dense_metadata, retrieval_seq_lens = self.dense_path.build(cam, params, build_dense)
        attn_metadata = build_full(cam)
        rows = None
        if tracker is not None:  # device ops on the tracker's persistent buffers: the graph reads them in place
            reselect, sel_seq_lens = tracker.step(cam.block_table_tensor, cam.seq_lens,
                                                  planner.retrieval_rows(params, cam.seq_lens),
                                                  params.reselect_interval, params.block_size)
            rows = reuse.ReuseRows(None, reselect, sel_seq_lens, tracker.capacity, self._reuse_slots(cam),
                                   params.reuse_extra_blocks)
        setattr(attn_metadata, PLAN_ATTR, planner.DecodeGraphPlan(
            cam.seq_lens, cam.block_table_tensor, self.graph_k, params, dense_metadata=dense_metadata,
            retrieval_seq_lens=retrieval_seq_lens, reuse=rows))
        # Metrics from the host copy of the lengths (what the device computes, without reading it back).
        nb, budget = planner.device_budgets(params, vllm_compat.host_seq_lens(cam)[:n])
        sparse = budget < nb
        runner.record_counts(int(sparse.sum()), phases.decode_tokens - int(sparse.sum()),
                             int(budget[sparse].sum()), int(nb[sparse].sum()))
        return attn_metadata


class _DensePathBuffers:
    """The persistent per-step buffers of the dense path in pure-decode graphs (graph_dense_path): the two
    length buffers (planner.split_lengths) and the dense metadata's own AOT schedule. Allocated once, as large
    as any pure-decode batch, so the pointers a graph captured stay valid at every replay."""

    def __init__(self, builder: Any) -> None:
        self.builder = builder
        self.capacity = vllm_compat.decode_batch_capacity(builder.vllm_config)
        self.dense_seq_lens = torch.zeros(self.capacity, dtype=torch.int32, device=builder.device)
        self.retrieval_seq_lens = torch.zeros_like(self.dense_seq_lens)
        self.schedule = vllm_compat.schedule_buffer(builder)

    def build(self, cam: Any, params: planner.RetrievalParams,
              build_dense: Callable[[Any], Any]) -> tuple[Any, torch.Tensor]:
        """(the dense backend's metadata of the batch with the retrieval rows' lengths 0, the retrieval lengths)."""
        n = cam.seq_lens.shape[0]
        if n > self.capacity:  # never silently: k is sized for sparse rows only, read-all would not fit
            raise RuntimeError(f"retrieval decode: a pure-decode batch of {n} requests exceeds the dense path's "
                               f"buffers ({self.capacity}: max(max_num_seqs, max_cudagraph_capture_size))")
        dense, retrieval = self.dense_seq_lens[:n], self.retrieval_seq_lens[:n]
        if dense.dtype != cam.seq_lens.dtype:
            raise RuntimeError(f"retrieval decode: seq_lens are {cam.seq_lens.dtype}, the dense path's buffers int32")
        planner.split_lengths(params, cam.seq_lens, dense, retrieval)
        dense_metadata = build_dense(vllm_compat.with_seq_lens(cam, dense))
        vllm_compat.keep_schedule(dense_metadata, self.builder, self.schedule)
        return dense_metadata, retrieval


def builder_hook(builder: Any) -> BuilderHook | None:
    cfg = _config()
    return None if cfg is None else BuilderHook(builder, cfg)


record_refresh = runner.record_refresh


def impl_runner(impl: Any) -> runner.RetrievalDecodeRunner | None:
    """A runner for one attention impl (layer), or None when retrieval decode is off or cannot apply."""
    cfg = _config()
    if cfg is None:
        return None
    if vllm_compat.dense_backend_writes_kv_in_forward():
        raise RuntimeError("retrieval decode needs a dense backend that writes the KV cache before forward "
                           "(do_kv_cache_update); this vLLM's backend writes it inside forward")
    window = getattr(impl, "sliding_window", None)
    if window not in (None, -1, (-1, -1)) or getattr(impl, "sinks", None) is not None \
            or getattr(impl, "alibi_slopes", None) is not None:
        return None  # windowed / sink-token / ALiBi layers keep the dense kernel (their masks are not block-local)
    return runner.RetrievalDecodeRunner(impl, cfg.group_blocks, cfg.fused_kv_write, cfg)
