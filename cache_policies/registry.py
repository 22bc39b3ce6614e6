"""Policy registry: name -> class; each policy's parameters come from its own ``cache_policy`` sub-section.

Imports of the policy modules (and torch) are lazy, so config validation and the HTTP middleware can check
names without loading torch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

import msgspec

if TYPE_CHECKING:
    from cache_policies.base import CachePolicy
    from cache_policies.config import CachePolicyConfig

# name -> (module, class)
_REGISTRY: dict[str, tuple[str, str]] = {
    "keep": ("cache_policies.keep", "KeepPolicy"),
    "quant:int8": ("cache_policies.quant_int8", "Int8Policy"),
    "quant:fp8": ("cache_policies.quant_fp8", "Fp8Policy"),
    "quant:int4": ("cache_policies.quant_int4", "Int4KiviPolicy"),
    "drop:streaming": ("cache_policies.drop_streaming", "StreamingPolicy"),
    "drop:snapkv": ("cache_policies.drop_snapkv", "SnapKVPolicy"),
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


def policy_class(name: str) -> "type[CachePolicy]":
    module, cls_name = _REGISTRY[check_name(name)]
    return getattr(importlib.import_module(module), cls_name)


def create(name: str, config: "CachePolicyConfig | None" = None, **overrides: Any) -> "CachePolicy":
    """Build policy ``name`` with its parameters from ``config`` (defaults when None) and overrides."""
    cls = policy_class(name)
    kwargs: dict[str, Any] = {}
    if cls.params_type is not None:
        params = getattr(config, cls.params_key) if config is not None else cls.params_type()
        kwargs = msgspec.structs.asdict(params)
    kwargs.update(overrides)
    return cls(**kwargs)
