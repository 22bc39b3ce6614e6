"""plan(): once per batch, in the metadata builder, from host-side metadata only.

Splits the batch's requests into sparse prefill chunks (query length > 1 and sequence >= the threshold)
and everything else (decodes, short prefills), which the dense backend attends through its own metadata
built for just those requests. Every layer's forward reuses the plan.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from attention_backends.sparse_prefill import head_config
from attention_backends.sparse_prefill.head_config import HeadPattern, PatternConfig
from kvplug import vllm_compat

logger = logging.getLogger("vllm.kvplug.sparse_prefill")
PLAN_ATTR = "kvplug_sparse_prefill"  # attribute of the dense backend's metadata that carries the plan
SHIPPED_CONFIGS = Path(__file__).parent / "configs"


@dataclass(frozen=True)
class SparseSegment:
    """One request's prefill chunk: query rows [row_start, row_end) of the batch, sequence length after it."""

    req: int
    row_start: int
    row_end: int
    seq_len: int


@dataclass
class SparsePrefillPlan:
    segments: list[SparseSegment]
    block_table: torch.Tensor  # the batch's block table (device)
    dense_req_ids: torch.Tensor  # host int64: requests the dense backend attends
    dense_rows: torch.Tensor | None  # their batch rows (device after attach), None when none
    dense_metadata: Any = None  # the dense backend's metadata for exactly those rows
    sparse_tokens: int = 0
    dense_prefill_tokens: int = 0


def plan(common_attn_metadata: Any, min_prompt_tokens: int) -> SparsePrefillPlan | None:
    """The plan of one batch, or None when no request goes sparse (then the backend is the dense one)."""
    cam = common_attn_metadata
    num_reqs = int(cam.num_reqs)
    qsl = cam.query_start_loc_cpu[:num_reqs + 1].long()
    qlens = qsl[1:] - qsl[:-1]
    seq_lens = vllm_compat.host_seq_lens(cam)[:num_reqs].long()
    sparse = (qlens > 1) & (seq_lens >= min_prompt_tokens)
    if not bool(sparse.any()):
        return None
    sparse_ids = sparse.nonzero().flatten()
    dense_ids = (~sparse).nonzero().flatten()
    segments = [SparseSegment(int(r), int(qsl[r]), int(qsl[r + 1]), int(seq_lens[r])) for r in sparse_ids.tolist()]
    dense_rows = None
    if len(dense_ids):
        dense_rows = torch.cat([torch.arange(int(qsl[r]), int(qsl[r + 1])) for r in dense_ids.tolist()])
    prefill_dense = int(qlens[dense_ids][qlens[dense_ids] > 1].sum()) if len(dense_ids) else 0
    return SparsePrefillPlan(segments, cam.block_table_tensor, dense_ids, dense_rows,
                             sparse_tokens=int(qlens[sparse_ids].sum()), dense_prefill_tokens=prefill_dense)


def attach(attn_metadata: Any, common_attn_metadata: Any, min_prompt_tokens: int,
           build_dense: Callable[[Any], Any]) -> SparsePrefillPlan | None:
    """Plan the batch and hang the plan on the dense metadata; ``build_dense(cam)`` is the parent builder."""
    p = plan(common_attn_metadata, min_prompt_tokens)
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


def model_key(model: str) -> str:
    """'~/.cache/kvplug/models/smollm2-135m-instruct' -> 'smollm2-135m-instruct' (shipped config name)."""
    return Path(str(model).rstrip("/")).name.lower()


@functools.cache
def pattern_config_for(setting: str, model: str, default_pattern: str, default_budgets_json: str) -> PatternConfig:
    """The per-head config this process uses: an explicit file, the shipped one for the model, or uniform."""
    import json

    if setting != "auto":
        return head_config.load(setting)
    shipped = SHIPPED_CONFIGS / f"{model_key(model)}.json"
    if shipped.exists():
        logger.info("kvplug sparse prefill: using shipped pattern config %s", shipped)
        return head_config.load(shipped)
    return PatternConfig(default=HeadPattern(pattern=default_pattern, budgets=json.loads(default_budgets_json))).validate()
