"""What a stored KV block is, shared by the cache policies (which make payloads) and the offload tiers (which
move and store them): a payload is a dict of tensors per block; ``BlockContext`` says where the blocks sat in
the prefix they were saved from."""
from __future__ import annotations

from dataclasses import dataclass

import torch

Payload = dict[str, torch.Tensor]


@dataclass(frozen=True)
class BlockContext:
    """Where the blocks sit in the prefix they were saved from (policies that care about position)."""

    block_start: tuple[int, ...]  # absolute token position of each block's first token
    prefix_len: int  # tokens of the prefix at save time (the request's prompt length)
    # Observation-window queries for SnapKV: [layers, q_heads, window, head_dim]. The KV connector never sees
    # queries, so it passes the keys of the window instead (query proxy; see cache_policies/drop_snapkv.py).
    obs_queries: torch.Tensor | None = None

    @staticmethod
    def contiguous(n_blocks: int, block_tokens: int, first_block: int = 0,
                   prefix_len: int | None = None) -> "BlockContext":
        starts = tuple((first_block + i) * block_tokens for i in range(n_blocks))
        end = (first_block + n_blocks) * block_tokens
        return BlockContext(starts, end if prefix_len is None else prefix_len)


def payload_nbytes(payload: Payload) -> int:
    return sum(t.numel() * t.element_size() for t in payload.values())


def compression_ratio(k: torch.Tensor, v: torch.Tensor, payloads: list[Payload]) -> float:
    """Raw K+V bytes over stored bytes (> 1 means smaller)."""
    raw = (k.numel() * k.element_size()) + (v.numel() * v.element_size())
    stored = sum(payload_nbytes(p) for p in payloads)
    return raw / max(stored, 1)


def stack_field(payloads: list[Payload], key: str) -> torch.Tensor:
    return torch.stack([p[key] for p in payloads])
