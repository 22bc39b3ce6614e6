"""A sequence's keys where they are: the paged KV cache, read through the sequence's block table.

build_index takes either a [L, Hkv, d] key tensor (the CPU path, tests, the search) or PagedKeys (the CUDA
path with ``fused_estimate``): vertical-slash then estimates with one Triton kernel that gathers its keys
through the block table (estimate_kernels.py) instead of copying the sequence's K out of the cache first;
patterns that need the keys as a tensor (block-sparse's pooling) gather them with heads().
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PagedKeys:
    cache: torch.Tensor  # [num_blocks, Hkv, page, d], any strides (FlashAttention's and CPU_ATTN's layouts)
    pages: torch.Tensor  # [>= ceil(L / page)] physical block ids of the sequence, in order
    length: int  # L: keys of the sequence (cached context + this chunk)

    @property
    def num_kv_heads(self) -> int:
        return self.cache.shape[1]

    def heads(self) -> torch.Tensor:
        """[Hkv, L, d] contiguous per KV head (a copy through the block table)."""
        Hkv, d = self.cache.shape[1], self.cache.shape[3]
        return self.cache[self.pages.long()].transpose(0, 1).reshape(Hkv, -1, d)[:, :self.length]


def key_heads(k: torch.Tensor | PagedKeys) -> torch.Tensor | PagedKeys:
    """build_index's keys as patterns take them: [L, Hkv, d] -> a [Hkv, L, d] view; PagedKeys as they are."""
    return k if isinstance(k, PagedKeys) else k.transpose(0, 1)


def num_kv_heads(k: torch.Tensor | PagedKeys) -> int:
    """KV heads of keys as patterns get them (key_heads())."""
    return k.num_kv_heads if isinstance(k, PagedKeys) else k.shape[0]


def key_tensor(k: torch.Tensor | PagedKeys) -> torch.Tensor:
    """Keys as patterns get them, as a [Hkv, L, d] tensor (gathered from the cache for PagedKeys)."""
    return k.heads() if isinstance(k, PagedKeys) else k
