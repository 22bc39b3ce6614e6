"""Block-sparse: queries and keys mean-pooled in BLOCK-token blocks; each query block keeps its top-k key
blocks by pooled score, always with the first block and the diagonal blocks."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from attention_backends.sparse_prefill.index import BLOCK, ChunkGeometry
from attention_backends.sparse_prefill.paged_keys import key_tensor
from attention_backends.sparse_prefill.patterns.base import SparsePattern, exact_row_blocks, group_votes, rank_mask


def mean_pool_blocks(x: torch.Tensor) -> torch.Tensor:
    """[h, T, d] -> [h, ceil(T / BLOCK), d]: mean of each block (the last one over its real rows)."""
    h, T, d = x.shape
    nb = -(-T // BLOCK)
    padded = F.pad(x.float(), (0, 0, 0, nb * BLOCK - T)).view(h, nb, BLOCK, d).sum(2)
    counts = torch.clamp(T - torch.arange(nb, device=x.device) * BLOCK, max=BLOCK).to(padded.dtype)
    return padded / counts[None, :, None]


def exact_block_mass(q: torch.Tensor, k: torch.Tensor, kv_ids: torch.Tensor, geom: ChunkGeometry,
                     scale: float) -> torch.Tensor:
    """[h, nqb, nkb]: each query block's exact softmax mass on each key block (summed over its rows): what
    block-sparse's pooled scores estimate (sparse_prefill.exact_selection)."""
    mass = q.new_zeros((q.shape[0], geom.nqb, geom.nkb), dtype=torch.float32)
    for hs, r0, att in exact_row_blocks(q, k, kv_ids, geom, scale, 0, geom.n):
        keys = att.shape[-1]
        nb = -(-keys // BLOCK)
        per_block = F.pad(att.sum(1), (0, nb * BLOCK - keys)).view(att.shape[0], nb, BLOCK).sum(-1)
        mass[hs, r0 // BLOCK, :nb] = per_block
    return mass


class BlockSparse(SparsePattern):
    name = "block_sparse"
    budgets = {"top_k": (32, 1)}
    search_candidates = ({"top_k": 8}, {"top_k": 16}, {"top_k": 32}, {"top_k": 64})
    length_scaled = ("top_k",)

    @classmethod
    def keys_per_row(cls, budgets):
        return budgets["top_k"] * BLOCK

    @classmethod
    def select(cls, q, k, kv_ids, geom: ChunkGeometry, budgets, budget_max, scale, group_shared=False,
               segment_rows=0, exact=False, gqa_kv_heads=None):  # segment_rows, gqa_kv_heads: vertical-slash's
        dev = q.device
        k = key_tensor(k)
        if exact:
            scores = exact_block_mass(q, k, kv_ids, geom, scale)
        else:
            scores = torch.einsum("hqd,hkd->hqk", mean_pool_blocks(q), mean_pool_blocks(k)[kv_ids]) * scale
        if group_shared:  # the group's summed pooled scores rank the blocks for all its heads
            scores = group_votes(scores, kv_ids, k.shape[0])[kv_ids]
        causal = geom.causal_blocks(dev)[None]
        a, b = geom.q_block_bounds(dev)
        kb = torch.arange(geom.nkb, device=dev)
        forced = (kb[None, :] == 0) | ((kb[None, :] >= (a // BLOCK)[:, None]) & (kb[None, :] <= ((b - 1) // BLOCK)[:, None]))
        scores = torch.where(forced[None], torch.full_like(scores, float("inf")), scores)
        scores = scores.masked_fill(~causal, float("-inf"))
        kmax = min(budget_max["top_k"], geom.nkb)
        top = torch.topk(scores, kmax, dim=-1).indices  # [h, nqb, kmax]
        keep = rank_mask(kmax, budgets["top_k"])[:, None, :].expand_as(top)
        mask = torch.zeros_like(scores, dtype=torch.bool)
        mask.scatter_(2, top, keep)
        return mask & causal, None, None
