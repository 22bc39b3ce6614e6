"""Shared helpers of the token-dropping policies: store only the kept tokens plus the keep-mask."""
from __future__ import annotations

import torch

from cache_policies.base import CachePolicy
from kvplug.kv_payload import Payload


class TokenDropPolicy(CachePolicy):
    """A policy that stores only some tokens of a block (and the keep-mask that says which)."""

    drops_tokens = True
    layerwise = False  # kept rows are flattened across layers


def pack_kept(k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor) -> Payload:
    """One block: k, v [L, H, N, D], keep [L, H, N] bool -> kept rows only (in mask order) + the mask."""
    return {"mask": keep.to(torch.uint8), "k": k[keep], "v": v[keep]}


def unpack_kept(payloads: list[Payload], like: torch.Tensor):
    k = torch.zeros(like.shape, dtype=like.dtype, device=like.device)
    v = torch.zeros_like(k)
    masks = torch.stack([p["mask"].bool() for p in payloads])
    for i, p in enumerate(payloads):
        k[i][masks[i]] = p["k"].to(like.dtype)
        v[i][masks[i]] = p["v"].to(like.dtype)
    return k, v, masks
