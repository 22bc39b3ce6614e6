"""Tenants are separated by vLLM's `cache_salt`, not by `kvplug_tenant`: two salts never share an offload entry.

The offload tiers (CPU and disk, every TP rank) key entries by ``entry_key(layout, policy, block_hash)`` with
vLLM's chained block hash; vLLM puts ``cache_salt`` into the first block's extra keys, so every later block
of a salted prompt hashes differently too. Computed here with vLLM's own request block hasher.
"""
from __future__ import annotations

import itertools

from cache_policies.registry import POLICY_NAMES
from offload.keys import entry_key

BLOCK = 16
TOKENS = list(range(1000, 1000 + 8 * BLOCK))
LAYOUTS = (b"model-a|bf16|rank0", b"model-a|bf16|rank1")  # any layout identity: the salt must matter in each


def block_hashes(cache_salt: str | None) -> list:
    from vllm import SamplingParams
    from vllm.utils.hashing import sha256_cbor
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.request import Request

    init_none_hash(sha256_cbor)
    request = Request("r", TOKENS, SamplingParams(max_tokens=1), None, cache_salt=cache_salt,
                      block_hasher=get_request_block_hasher(BLOCK, sha256_cbor))
    assert len(request.block_hashes) == len(TOKENS) // BLOCK
    return request.block_hashes


def entry_keys(cache_salt: str | None) -> set[str]:
    return {entry_key(layout, policy, h) for layout, policy, h in
            itertools.product(LAYOUTS, POLICY_NAMES, block_hashes(cache_salt))}


def test_two_cache_salts_never_share_an_entry_key():
    tenant_a, tenant_b, unsalted = entry_keys("tenant-a"), entry_keys("tenant-b"), entry_keys(None)
    assert entry_keys("tenant-a") == tenant_a                  # deterministic: a tenant finds its own entries
    assert len(tenant_a) == len(LAYOUTS) * len(POLICY_NAMES) * len(TOKENS) // BLOCK
    assert not tenant_a & tenant_b and not tenant_a & unsalted and not tenant_b & unsalted


def test_the_salt_changes_every_block_not_only_the_first():
    a, b = block_hashes("tenant-a"), block_hashes("tenant-b")
    assert all(x != y for x, y in zip(a, b))
