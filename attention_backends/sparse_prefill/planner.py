"""plan(): once per batch, in the metadata builder, from host-side metadata only.

Splits the batch's requests into sparse prefill chunks (query length > 1 and the cost model's decision,
cost_model.ChunkDecider, says sparse) and everything else (decodes, short or cheap prefills), which the dense
backend attends through its own metadata built for just those requests. Every layer's forward reuses the plan.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from attention_backends.sparse_prefill import head_config, model_identity
from attention_backends.sparse_prefill.cost_model import ChunkDecider, ChunkDecision, record_decisions
from attention_backends.sparse_prefill.head_config import HeadPattern, PatternConfig
from kvplug import vllm_compat

logger = logging.getLogger("vllm.kvplug.sparse_prefill")
PLAN_ATTR = "kvplug_sparse_prefill"  # attribute of the dense backend's metadata that carries the plan
SHIPPED_CONFIGS = model_identity.SHIPPED_CONFIGS


@dataclass(frozen=True)
class SparseSegment:
    """One request's prefill chunk: query rows [row_start, row_end) of the batch, sequence length after it."""

    req: int
    row_start: int
    row_end: int
    seq_len: int
    budget_factor: float = 1.0  # head_config.budget_scale for this chunk's length
    predicted_density: float | None = None  # the cost model's (None: threshold rule), for its feedback


@dataclass
class SparsePrefillPlan:
    segments: list[SparseSegment]
    block_table: torch.Tensor  # the batch's block table (device)
    dense_req_ids: torch.Tensor  # host int64: requests the dense backend attends
    dense_rows: torch.Tensor | None  # their batch rows (device after attach), None when none
    dense_metadata: Any = None  # the dense backend's metadata for exactly those rows
    sparse_tokens: int = 0
    dense_prefill_tokens: int = 0
    # (segment, block size) -> fa2_sparse.SequenceKV: built by the batch's first layer on the FA2 executor
    sequence_kv: dict[tuple[int, int], Any] = field(default_factory=dict)


def plan(common_attn_metadata: Any, decider: ChunkDecider) -> SparsePrefillPlan | None:
    """The plan of one batch, or None when no request goes sparse (then the backend is the dense one).
    Every prefill chunk (query length > 1) gets ``decider``'s decision; decisions are counted."""
    cam = common_attn_metadata
    num_reqs = int(cam.num_reqs)
    qsl = cam.query_start_loc_cpu[:num_reqs + 1].long()
    qlens = (qsl[1:] - qsl[:-1]).tolist()
    if max(qlens, default=0) <= 1:  # decodes only: nothing to decide
        return None
    seq_lens = vllm_compat.host_seq_lens(cam)[:num_reqs].tolist()
    decided: dict[int, ChunkDecision] = {r: decider.decide(n, int(seq_lens[r])) for r, n in enumerate(qlens) if n > 1}
    record_decisions(decided.values())
    sparse_ids = [r for r, d in decided.items() if d.sparse]
    if not sparse_ids:
        return None
    segments = [SparseSegment(r, int(qsl[r]), int(qsl[r + 1]), int(seq_lens[r]), decided[r].budget_factor,
                              decided[r].predicted_density) for r in sparse_ids]
    chosen = set(sparse_ids)
    dense_ids = [r for r in range(num_reqs) if r not in chosen]
    dense_rows = None
    if dense_ids:
        dense_rows = torch.cat([torch.arange(int(qsl[r]), int(qsl[r + 1])) for r in dense_ids])
    prefill_dense = sum(qlens[r] for r in dense_ids if qlens[r] > 1)
    return SparsePrefillPlan(segments, cam.block_table_tensor, torch.tensor(dense_ids, dtype=torch.int64), dense_rows,
                             sparse_tokens=sum(qlens[r] for r in sparse_ids), dense_prefill_tokens=prefill_dense)


def attach(attn_metadata: Any, common_attn_metadata: Any, decider: ChunkDecider,
           build_dense: Callable[[Any], Any]) -> SparsePrefillPlan | None:
    """Plan the batch and hang the plan on the dense metadata; ``build_dense(cam)`` is the parent builder."""
    p = plan(common_attn_metadata, decider)
    if p is None:
        return None
    if p.dense_rows is not None:
        sub = vllm_compat.subset_common_metadata(common_attn_metadata, p.dense_req_ids, p.dense_rows)
        p.dense_metadata = build_dense(sub)
        p.dense_rows = p.dense_rows.to(common_attn_metadata.query_start_loc.device)
    setattr(attn_metadata, PLAN_ATTR, p)
    return p


def plan_of(attn_metadata: Any) -> SparsePrefillPlan | None:
    return None if attn_metadata is None else getattr(attn_metadata, PLAN_ATTR, None)


@dataclass(frozen=True)
class ChosenConfig:
    config: PatternConfig
    source: str  # the file, or "uniform default"
    reason: str  # why (what the log line and the info metric say)


@functools.cache
def choose_pattern_config(setting: str, model: str, default_pattern: str, default_budgets_json: str) -> ChosenConfig:
    """The per-head config this process uses: an explicit file; for "auto" the shipped config whose model
    identity (model_identity.py: architecture, layer/head counts, head dim, config.json hash) is the served
    model's, whatever its folder is called; else default_pattern on every head. Logged once, with why."""
    import json

    if setting != "auto":
        chosen = ChosenConfig(head_config.load(setting), setting, "sparse_prefill.pattern_config names it")
    else:
        path, reason = model_identity.find_shipped(model_identity.model_identity(model))
        if path is not None:
            chosen = ChosenConfig(head_config.load(path), str(path), reason)
        else:
            uniform = PatternConfig(default=HeadPattern(pattern=default_pattern, budgets=json.loads(default_budgets_json)))
            chosen = ChosenConfig(uniform.validate(), "uniform default", f"{reason}: {default_pattern} on every head")
    logger.info("kvplug sparse prefill: pattern config %s (%s)", chosen.source, chosen.reason)
    return chosen


def pattern_config_for(setting: str, model: str, default_pattern: str, default_budgets_json: str) -> PatternConfig:
    return choose_pattern_config(setting, model, default_pattern, default_budgets_json).config
