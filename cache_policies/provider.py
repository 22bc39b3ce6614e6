"""The policies the offload connector uses, built from the ``cache_policy`` section (implements
offload.wiring.PolicyProvider; the composition layer constructs it and hands it to offload.wiring)."""
from __future__ import annotations

import logging
from typing import Any, Mapping

from cache_policies import registry
from cache_policies.base import CachePolicy
from cache_policies.config import CachePolicyConfig
from cache_policies.selection import choose_policy

logger = logging.getLogger("vllm.kvplug.offload")


class RegistryPolicyProvider:
    policy_key = registry.REQUEST_POLICY_KEY
    offload_key = registry.REQUEST_OFFLOAD_KEY

    def __init__(self, config: CachePolicyConfig) -> None:
        self.config = config

    def create(self, name: str) -> CachePolicy:
        return registry.create(name, self.config)

    def names(self) -> tuple[str, ...]:
        return registry.POLICY_NAMES

    def choose(self, prefix_tokens: int, kv_transfer_params: Mapping[str, Any] | None) -> str:
        """The request's policy; an unknown requested name falls back to the default with a warning (the HTTP
        middleware rejects those with 400 first; offline callers get here)."""
        try:
            return choose_policy(self.config, prefix_tokens, kv_transfer_params)
        except registry.UnknownPolicyError as exc:
            logger.warning("kvplug offload: %s; using %r", exc, self.config.default)
            return self.config.default
