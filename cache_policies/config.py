"""The ``cache_policy`` config section: which policy a shared prefix gets, and each policy's parameters,
nested under the policy (``cache_policy.snapkv.keep_ratio``)."""
from __future__ import annotations

from typing import Any, ClassVar

import msgspec

from cache_policies import registry
from kvplug.config import KvplugConfigError, Section, check_finite

SECTION = "cache_policy"


class PolicyParams(Section):
    """A policy's parameters, checked against their lower bounds (``minimums``) under ``cache_policy.<key>``."""

    key: ClassVar[str]
    minimums: ClassVar[dict[str, int]] = {}

    def __post_init__(self) -> None:
        path = f"{SECTION}.{self.key}"
        check_finite(self, path)
        for name, minimum in self.minimums.items():
            value = getattr(self, name)
            if value < minimum:
                raise KvplugConfigError(f"{path}.{name}: must be >= {minimum}, got {value}")


class Int4Params(PolicyParams):
    """quant:int4 (KIVI): quantization group, and the prefix's last tokens kept exact."""

    key = "int4"
    minimums = {"group_size": 1, "residual_tokens": 0}
    group_size: int = 32
    residual_tokens: int = 32


class StreamingParams(PolicyParams):
    """drop:streaming (StreamingLLM): attention sinks and recent window kept."""

    key = "streaming"
    minimums = {"window_tokens": 1, "sink_tokens": 0}
    sink_tokens: int = 4
    window_tokens: int = 1024


class SnapKVParams(PolicyParams):
    """drop:snapkv: share of each block's tokens kept, observation window, score pooling width."""

    key = "snapkv"
    minimums = {"window_tokens": 1, "pool_kernel": 1}
    keep_ratio: float = 0.5
    window_tokens: int = 32
    pool_kernel: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.keep_ratio <= 1.0:
            raise KvplugConfigError(f"{SECTION}.snapkv.keep_ratio: must be in (0, 1], got {self.keep_ratio}")


class PolicyRule(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Pick ``policy`` for shared prefixes of at least ``min_prefix_tokens`` (and of ``tenant``, if set)."""

    policy: str
    min_prefix_tokens: int = 0
    tenant: str = ""


# Flat keys of earlier releases -> where they live now (an old config fails naming the new key).
RENAMED_KEYS = {
    "int4_group_size": "int4.group_size", "int4_residual_tokens": "int4.residual_tokens",
    "streaming_sink_tokens": "streaming.sink_tokens", "streaming_window_tokens": "streaming.window_tokens",
    "snapkv_keep_ratio": "snapkv.keep_ratio", "snapkv_window_tokens": "snapkv.window_tokens",
    "snapkv_pool_kernel": "snapkv.pool_kernel",
}
# Keys of earlier releases that did nothing -> why they are gone (a config still setting one fails saying so).
REMOVED_KEYS = {
    "enabled": "it only changed a metrics label; the policy applies to what offload stores, so it is on "
               "whenever offload is (--offload / offload.enabled): delete the key",
}


class CachePolicyConfig(Section):
    """Prefix-cache policy layer: how offloaded KV blocks are kept (cache_policies/registry.py lists names).

    Choice per request: ``kv_transfer_params.kvplug_policy`` if given, else the first matching rule, else
    ``default``. Policies with parameters read them from the field named by their ``params_key``.
    """

    default: str = "keep"
    rules: list[PolicyRule] = msgspec.field(default_factory=list)
    int4: Int4Params = msgspec.field(default_factory=Int4Params)
    streaming: StreamingParams = msgspec.field(default_factory=StreamingParams)
    snapkv: SnapKVParams = msgspec.field(default_factory=SnapKVParams)
    # The removed and renamed keys: accepted by the parser only to fail saying what became of them; never
    # encoded (UNSET).
    enabled: Any = msgspec.UNSET
    int4_group_size: Any = msgspec.UNSET
    int4_residual_tokens: Any = msgspec.UNSET
    streaming_sink_tokens: Any = msgspec.UNSET
    streaming_window_tokens: Any = msgspec.UNSET
    snapkv_keep_ratio: Any = msgspec.UNSET
    snapkv_window_tokens: Any = msgspec.UNSET
    snapkv_pool_kernel: Any = msgspec.UNSET

    def __post_init__(self) -> None:
        for old, why in REMOVED_KEYS.items():
            if getattr(self, old) is not msgspec.UNSET:
                raise KvplugConfigError(f"{SECTION}.{old} was removed: {why}")
        for old, new in RENAMED_KEYS.items():
            if getattr(self, old) is not msgspec.UNSET:
                raise KvplugConfigError(f"{SECTION}.{old} was renamed: use {SECTION}.{new}")
        try:
            registry.check_name(self.default, "policy")
        except registry.UnknownPolicyError as exc:
            raise KvplugConfigError(f"{SECTION}.default: {exc}") from None
        for i, rule in enumerate(self.rules):
            try:
                registry.check_name(rule.policy, "policy")
            except registry.UnknownPolicyError as exc:
                raise KvplugConfigError(f"{SECTION}.rules[{i}].policy: {exc}") from None
