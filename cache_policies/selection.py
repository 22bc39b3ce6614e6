"""Which policy a request's shared prefix gets: the request's own choice, else config rules, else default."""
from __future__ import annotations

from typing import Any, Mapping

from cache_policies.registry import REQUEST_POLICY_KEY, REQUEST_TENANT_KEY, check_name


def choose_policy(config: Any, prefix_tokens: int, kv_transfer_params: Mapping[str, Any] | None) -> str:
    """``config`` is the cache_policy section; raises UnknownPolicyError for a bad requested name."""
    params = kv_transfer_params or {}
    requested = params.get(REQUEST_POLICY_KEY)
    if requested is not None:
        return check_name(requested, f"kv_transfer_params.{REQUEST_POLICY_KEY}")
    tenant = params.get(REQUEST_TENANT_KEY, "")
    for rule in config.rules:
        if prefix_tokens >= rule.min_prefix_tokens and (not rule.tenant or rule.tenant == tenant):
            return rule.policy
    return config.default
