"""Policy registry: name -> class, built with parameters from the ``cache_policy`` config section.

Imports of the policy modules (and torch) are lazy, so config validation and the HTTP middleware can check
names without loading torch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cache_policies.base import CachePolicy
    from kvplug.config import CachePolicyConfig

# name -> (module, class, {constructor kwarg: cache_policy config field})
_REGISTRY: dict[str, tuple[str, str, dict[str, str]]] = {
    "keep": ("cache_policies.keep", "KeepPolicy", {}),
    "quant:int8": ("cache_policies.quant_int8", "Int8Policy", {}),
    "quant:fp8": ("cache_policies.quant_fp8", "Fp8Policy", {}),
    "quant:int4": ("cache_policies.quant_int4", "Int4KiviPolicy",
                   {"group_size": "int4_group_size", "residual_tokens": "int4_residual_tokens"}),
    "drop:streaming": ("cache_policies.drop_streaming", "StreamingPolicy",
                       {"sink_tokens": "streaming_sink_tokens", "window_tokens": "streaming_window_tokens"}),
    "drop:snapkv": ("cache_policies.drop_snapkv", "SnapKVPolicy",
                    {"keep_ratio": "snapkv_keep_ratio", "window_tokens": "snapkv_window_tokens",
                     "pool_kernel": "snapkv_pool_kernel"}),
}
POLICY_NAMES: tuple[str, ...] = tuple(_REGISTRY)
# Per-request selection: extra_body={"kv_transfer_params": {REQUEST_POLICY_KEY: "quant:int4"}}
REQUEST_POLICY_KEY = "kvplug_policy"
REQUEST_TENANT_KEY = "kvplug_tenant"
# {REQUEST_OFFLOAD_KEY: false}: this request neither loads from nor saves to the offload tiers (baselines,
# one-off prompts that would only evict shared contexts).
REQUEST_OFFLOAD_KEY = "kvplug_offload"


class UnknownPolicyError(ValueError):
    pass


def check_name(name: Any, where: str = "policy") -> str:
    if not isinstance(name, str) or name not in _REGISTRY:
        raise UnknownPolicyError(f"unknown {where} {name!r}; known policies: {', '.join(POLICY_NAMES)}")
    return name


def create(name: str, config: "CachePolicyConfig | None" = None, **overrides: Any) -> "CachePolicy":
    """Build policy ``name`` with its parameters from ``config`` (defaults when None) and overrides."""
    module, cls_name, params = _REGISTRY[check_name(name)]
    cls = getattr(importlib.import_module(module), cls_name)
    kwargs = {arg: getattr(config, field) for arg, field in params.items()} if config is not None else {}
    kwargs.update(overrides)
    return cls(**kwargs)
