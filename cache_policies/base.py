"""The cache-policy ABC: how one shared-context KV block is kept when it leaves the GPU.

A policy turns the K and V of a batch of KV blocks into compact per-block payloads (``encode``) and back
(``decode``). Tensors are ``[n_blocks, layers, kv_heads, block_tokens, head_dim]``; a payload is a dict
of tensors (what the offload tiers store). Policies that drop tokens also return a keep-mask
``[n_blocks, layers, kv_heads, block_tokens]`` so whoever reloads the block knows which positions hold
no KV and must never be attended.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from kvplug.kv_payload import BlockContext, Payload, stack_field


class CachePolicy(ABC):
    """One way to keep KV blocks. Subclasses set ``name`` and implement encode/decode."""

    name: ClassVar[str]
    drops_tokens: ClassVar[bool] = False
    # True only where a reload is byte-identical to what was computed (``keep``): KV reloaded under any other
    # policy must never reach a request of another policy through vLLM's GPU prefix cache.
    lossless: ClassVar[bool] = False
    # True when encoding each layer on its own gives the same bytes as encoding all layers together, and
    # every payload tensor leads with the layer dimension. The KV connector then saves and loads such
    # entries layer by layer, overlapping compute. The token-dropping policies keep their kept rows
    # flattened across layers (and SnapKV scores all layers together), so they move whole blocks.
    layerwise: ClassVar[bool] = True
    # The policy's parameters: the struct type of ``cache_policy.<params_key>`` (cache_policies/config.py),
    # whose fields are the constructor's keyword arguments. None: the policy has no parameters.
    params_key: ClassVar[str | None] = None
    params_type: ClassVar[type | None] = None

    @abstractmethod
    def encode(self, k: torch.Tensor, v: torch.Tensor, ctx: BlockContext) -> list[Payload]:
        """K, V ``[n, L, H, N, D]`` -> one payload per block."""

    @abstractmethod
    def decode(self, payloads: list[Payload], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                          torch.Tensor | None]:
        """Payloads -> (K, V, keep_mask or None), K/V shaped and typed like ``like`` ``[n, L, H, N, D]``."""

    def encode_groups(self, k: torch.Tensor, v: torch.Tensor, ctx: BlockContext) -> list[tuple[list[int], Payload]]:
        """Like ``encode``, but blocks whose payloads share fields and shapes come back stacked:
        [(block indexes, {field: [m, ...]})]. The connector moves each group with one copy per field
        instead of one per block. Subclasses override this to skip the per-block split."""
        groups: dict[tuple, tuple[list[int], list[Payload]]] = {}
        for i, p in enumerate(self.encode(k, v, ctx)):
            sig = tuple((name, t.dtype, tuple(t.shape)) for name, t in p.items())
            idx, ps = groups.setdefault(sig, ([], []))
            idx.append(i)
            ps.append(p)
        return [(idx, {name: stack_field(ps, name) for name in ps[0]}) for idx, ps in groups.values()]

    def decode_stacked(self, batch: Payload, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                        torch.Tensor | None]:
        """``decode`` of blocks whose payloads are already stacked ({field: [n, ...]}, one group of
        ``encode_groups``)."""
        return self.decode([{name: t[i] for name, t in batch.items()} for i in range(like.shape[0])], like)

    def size_class(self, block_start: int, block_tokens: int, prefix_len: int) -> object:
        """Blocks with equal size classes encode to the same number of bytes (the offload scheduler sizes
        entries by encoding one zero block per class instead of waiting for the worker)."""
        return 0

    def observation_window_tokens(self, prompt_len: int) -> int:
        """Last prompt tokens whose keys the saver passes as ``BlockContext.obs_queries`` (0: none needed)."""
        return 0

    def describe(self) -> str:
        return self.name


class StackedPolicy(CachePolicy):
    """A policy that encodes a batch of blocks as one stacked group; ``encode`` splits it per block."""

    @abstractmethod
    def encode_groups(self, k: torch.Tensor, v: torch.Tensor, ctx: BlockContext) -> list[tuple[list[int], Payload]]:
        """Every block of the batch in one group: [(all block indexes, {field: [n, ...]})]."""

    def encode(self, k: torch.Tensor, v: torch.Tensor, ctx: BlockContext) -> list[Payload]:
        (_, batch), = self.encode_groups(k, v, ctx)
        return [{name: t[i] for name, t in batch.items()} for i in range(k.shape[0])]


def check_kv(k: torch.Tensor, v: torch.Tensor, ctx: BlockContext) -> None:
    if k.shape != v.shape or k.dim() != 5:
        raise ValueError(f"expected K and V shaped [n, L, H, N, D] alike, got {tuple(k.shape)} and {tuple(v.shape)}")
    if len(ctx.block_start) != k.shape[0]:
        raise ValueError(f"context describes {len(ctx.block_start)} blocks, tensors hold {k.shape[0]}")
