"""Quest block summaries: per physical KV block and kv-head, the per-channel min and max of its keys.

The summaries live in a side tensor indexed by the *physical* block id, so blocks shared through the prefix
cache share their summary, and they are updated from the same ``slot_mapping`` vLLM uses to write the keys
into the paged cache (prefill chunks and decode tokens alike). vLLM fills a block from offset 0 upwards and
never appends to a block another sequence owns, so a write at offset 0 means the block was (re)allocated:
its old summary is discarded before the new keys are folded in. That is what makes a freed-and-reused block
start fresh.

Everything here is fixed-shape and sync-free (no ``.item()``, no boolean indexing): padded tokens
(``slot_mapping == -1``) land in one extra "trash" row, so the update can be captured in a CUDA graph.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class BlockSummaries:
    """``kmin``/``kmax``: [num_blocks + 1, kv_heads, head_dim]; the last row absorbs padded tokens.

    Two-level selection (CUDA) adds ``gmin``/``gmax`` of the same shape: the summary of a *group* of consecutive
    logical blocks, stored in the row of the group's last block (a full block is shared through the prefix cache
    only with its whole prefix, so that block identifies the group). The scoring kernel fills a row the first time
    it scores the complete group (min / max of its blocks' summaries); a write at offset 0 of a block (it was
    (re)allocated) empties its row, and ``refresh_blocks_`` empties them all."""

    kmin: torch.Tensor
    kmax: torch.Tensor
    block_size: int
    gmin: torch.Tensor | None = None
    gmax: torch.Tensor | None = None

    @classmethod
    def allocate(cls, num_blocks: int, kv_heads: int, head_dim: int, block_size: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 storage: torch.Tensor | None = None, groups: bool = False) -> "BlockSummaries":
        """``storage``: optional uint8 bytes (``nbytes(...)`` of them, on ``device``) to build the tensors in;
        ``groups``: also the group summaries of two-level selection."""
        shape = (num_blocks + 1, kv_heads, head_dim)
        parts = 4 if groups else 2
        if storage is None:
            all_ = torch.empty((parts, *shape), dtype=dtype, device=device)
        else:
            all_ = storage.view(dtype).view(parts, *shape)
        # An empty block bounds nothing: min=+inf, max=-inf makes its Quest score -inf until written.
        all_[0::2].fill_(float("inf"))
        all_[1::2].fill_(float("-inf"))
        g = (all_[2], all_[3]) if groups else (None, None)
        return cls(all_[0], all_[1], block_size, *g)

    @staticmethod
    def nbytes(num_blocks: int, kv_heads: int, head_dim: int, dtype: torch.dtype, groups: bool = False) -> int:
        return (4 if groups else 2) * (num_blocks + 1) * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    @property
    def num_blocks(self) -> int:
        return self.kmin.shape[0] - 1

    def matches(self, num_blocks: int, kv_heads: int, head_dim: int, block_size: int, device) -> bool:
        return (self.num_blocks == num_blocks and tuple(self.kmin.shape[1:]) == (kv_heads, head_dim)
                and self.block_size == block_size and self.kmin.device == torch.device(device))

    def update(self, key: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        if key.is_cuda:  # one Triton launch per layer instead of ~12 small torch kernels (decode-step latency)
            from attention_backends.retrieval_decode import triton_kernels

            triton_kernels.update_summaries(self.kmin, self.kmax, key, slot_mapping, self.block_size, self.gmax)
        else:
            update_summaries_(self.kmin, self.kmax, key, slot_mapping, self.block_size, self.gmax)

    def write_and_update(self, key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                         value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Write this step's keys and values into the paged cache ([num_blocks, kv_heads, block_size, head_dim]
        views) and fold the keys into these summaries: one Triton launch on CUDA (the dense backend's write plus
        ``update``, retrieval_decode.fused_kv_write), the torch reference elsewhere."""
        if key.is_cuda:
            from attention_backends.retrieval_decode import triton_kernels

            triton_kernels.write_kv(key, value, key_cache, value_cache, slot_mapping, self.kmin, self.kmax, self.gmax)
        else:
            write_kv_and_update_summaries_(key, value, key_cache, value_cache, slot_mapping, self.kmin, self.kmax,
                                           self.block_size, self.gmax)

    def refresh(self, key_cache: torch.Tensor, block_ids: torch.Tensor,
                tokens_in_block: torch.Tensor | None = None) -> None:
        """``refresh_blocks_`` on these summaries; every group row is emptied (refilled at the next scoring):
        a refreshed block may sit anywhere in a group, and the group's row is keyed by its last block."""
        refresh_blocks_(self.kmin, self.kmax, key_cache, block_ids, tokens_in_block)
        if self.gmax is not None:
            self.gmin.fill_(float("inf"))
            self.gmax.fill_(float("-inf"))


def update_summaries_(kmin: torch.Tensor, kmax: torch.Tensor, key: torch.Tensor, slot_mapping: torch.Tensor,
                      block_size: int, gmax: torch.Tensor | None = None) -> None:
    """Fold ``key`` [T, kv_heads, head_dim] written at ``slot_mapping`` [T] into the summaries in place.

    ``slot_mapping`` may be shorter than ``key`` (vLLM pads the token dim) and may hold -1 for padding.
    ``gmax``: group summaries (two-level), whose rows of (re)allocated blocks are emptied.
    """
    n = slot_mapping.shape[0]
    key = key[:n]
    trash = kmin.shape[0] - 1
    slots = slot_mapping.to(torch.long)
    valid = slots >= 0
    blocks = torch.where(valid, torch.div(slots, block_size, rounding_mode="floor"), torch.full_like(slots, trash))
    fresh = torch.where(valid & (slots % block_size == 0), blocks, torch.full_like(slots, trash))
    # Reset (re)allocated blocks before folding in this step's keys, so stale keys of a freed block vanish.
    kmin.index_fill_(0, fresh, float("inf"))
    kmax.index_fill_(0, fresh, float("-inf"))
    if gmax is not None:  # a group keyed by a (re)allocated block is stale: empty means "refill when scored"
        gmax.index_fill_(0, fresh, float("-inf"))
    idx = blocks.view(-1, 1, 1).expand_as(key)
    k = key.to(kmin.dtype)
    kmin.scatter_reduce_(0, idx, k, reduce="amin", include_self=True)
    kmax.scatter_reduce_(0, idx, k, reduce="amax", include_self=True)


def write_kv_(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
              slot_mapping: torch.Tensor) -> None:
    """vLLM's reshape_and_cache_flash with cache dtype "auto", in torch: token i's key/value [T, kv_heads, head_dim]
    rows go, as they are, to slot ``slot_mapping[i]`` of the [num_blocks, kv_heads, block_size, head_dim] cache
    views; slot -1 (padding) is skipped, and key rows past slot_mapping's length are ignored (vLLM pads them)."""
    if key.dtype != key_cache.dtype or value.dtype != value_cache.dtype:
        raise ValueError(f"write_kv_ copies bytes: key/value {key.dtype}/{value.dtype} into a "
                         f"{key_cache.dtype}/{value_cache.dtype} cache")
    n = slot_mapping.shape[0]
    slots = slot_mapping.to(torch.long)
    keep = slots >= 0
    blocks = torch.div(slots[keep], key_cache.shape[2], rounding_mode="floor")
    offsets = slots[keep] % key_cache.shape[2]
    key_cache[blocks, :, offsets] = key[:n][keep]
    value_cache[blocks, :, offsets] = value[:n][keep]


def write_kv_and_update_summaries_(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                                   value_cache: torch.Tensor, slot_mapping: torch.Tensor, kmin: torch.Tensor,
                                   kmax: torch.Tensor, block_size: int, gmax: torch.Tensor | None = None) -> None:
    """The two-step path the fused Triton write replaces: the dense backend's write (``write_kv_``), then
    ``update_summaries_`` (the reference of ``triton_kernels.write_kv``)."""
    write_kv_(key, value, key_cache, value_cache, slot_mapping)
    update_summaries_(kmin, kmax, key, slot_mapping, block_size, gmax)


def refresh_blocks_(kmin: torch.Tensor, kmax: torch.Tensor, key_cache: torch.Tensor, block_ids: torch.Tensor,
                    tokens_in_block: torch.Tensor | None = None) -> None:
    """Recompute the summaries of ``block_ids`` from the paged cache itself (``key_cache`` view
    [num_blocks, kv_heads, block_size, head_dim]). For KV that reached the cache without passing through the
    backend's write (e.g. loaded by a KV connector). ``tokens_in_block`` [len(block_ids)]: filled slots
    (default: full blocks)."""
    ids = block_ids.long()
    keys = key_cache[ids].to(kmin.dtype)  # [n, H, bs, D]
    if tokens_in_block is not None:
        filled = torch.arange(keys.shape[2], device=keys.device).view(1, 1, -1, 1) < tokens_in_block.view(-1, 1, 1, 1)
        kmin[ids] = torch.where(filled, keys, torch.full_like(keys, float("inf"))).amin(dim=2)
        kmax[ids] = torch.where(filled, keys, torch.full_like(keys, float("-inf"))).amax(dim=2)
    else:
        kmin[ids] = keys.amin(dim=2)
        kmax[ids] = keys.amax(dim=2)
