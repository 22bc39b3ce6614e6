"""Entry keys: vLLM's chained prefix-block hash + the policy + the model/layout identity.

vLLM's block hash already chains every earlier block (and LoRA / multimodal / cache-salt extras), so a key
names "this exact prefix up to this block"; the layout identity (model, dtype, heads, block size, TP rank)
makes sure two models or layouts never share an entry, and the policy that an int4 copy never answers a
`keep` request. The layout identity includes a fingerprint of the weights and model config
(``offload.layout.model_fingerprint``), and ``KEY_VERSION`` changes whenever what an entry's bytes mean changes,
so entries of other weights or of an older kvplug are misses, never served.
"""
from __future__ import annotations

import hashlib


KEY_VERSION = b"kvplug-entry-v2"


def entry_key(layout_identity: bytes, policy: str, block_hash: bytes | object) -> str:
    return KeyMaker(layout_identity, policy)(block_hash)


class KeyMaker:
    """``entry_key`` for one (layout identity, policy): the fixed parts are hashed once, each block's key is a
    copy of that state plus the block hash (a 32K-token prompt has 2048 blocks; the scheduler keys each)."""

    def __init__(self, layout_identity: bytes, policy: str) -> None:
        self._head = hashlib.sha256()
        for part in (KEY_VERSION, layout_identity, policy.encode()):
            _update(self._head, part)

    def __call__(self, block_hash: bytes | object) -> str:
        raw = bytes(block_hash) if isinstance(block_hash, (bytes, bytearray)) else repr(block_hash).encode()
        h = self._head.copy()
        _update(h, raw)
        return h.hexdigest()[:48]


def _update(h, part: bytes) -> None:
    h.update(len(part).to_bytes(4, "little") + part)  # one call: the scheduler keys 2048 blocks per follow-up


def hash_hex(block_hash: bytes | object) -> str:
    """vLLM's block hash as lowercase hex: the block identity the events feed and the router share (it does
    not depend on the policy or the layout)."""
    if isinstance(block_hash, (bytes, bytearray)):
        return bytes(block_hash).hex()
    return hashlib.sha256(repr(block_hash).encode()).hexdigest()
