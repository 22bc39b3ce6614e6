"""Torch reference of sparse prefill attention (the CPU path, and the oracle for the Triton kernels).

Cost follows the index: each group of query blocks gathers only the key blocks and columns some of its
heads selected, so compute and memory scale with the density, not with the causal square.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from attention_backends.sparse_prefill.index import BLOCK, ChunkGeometry, SparseIndex

Q_BLOCKS_PER_STEP = 8


def _gqa_keys(x: torch.Tensor, Hq: int) -> torch.Tensor:
    """[L, Hkv, d] -> [Hq, L, d] view-expanded per query head (no copy)."""
    L, Hkv, d = x.shape
    g = Hq // Hkv
    return x.permute(1, 0, 2)[:, None].expand(Hkv, g, L, d).reshape(Hq, L, d) if g > 1 else x.permute(1, 0, 2)


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: SparseIndex, scale: float,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """q [n, Hq, d]; k, v [L, Hkv, d] (the whole sequence, chunk last) -> [n, Hq, d] in q's dtype.

    Per step of Q_BLOCKS_PER_STEP query blocks: gather the union (over heads) of their selected key blocks
    and columns once, then one SDPA call with a per-head element mask (block mask, columns, causality).
    """
    n, Hq, d = q.shape
    L, Hkv, _ = k.shape
    geom = ChunkGeometry(n, L)
    out = torch.empty_like(q) if out is None else out
    dev = q.device
    key_pos = torch.arange(L, device=dev)
    for qb0 in range(0, geom.nqb, Q_BLOCKS_PER_STEP):
        qb1 = min(geom.nqb, qb0 + Q_BLOCKS_PER_STEP)
        r0, r1 = qb0 * BLOCK, min(qb1 * BLOCK, n)
        rows_qb = (torch.arange(r0, r1, device=dev) // BLOCK)  # query block of every row
        sub = index.block_mask[:, qb0:qb1]  # [Hq, G, nkb]
        blocks = sub.any(1).any(0).nonzero().flatten()  # union of selected key blocks
        in_blocks = torch.zeros(L, dtype=torch.bool, device=dev)
        in_blocks.view(-1)[(blocks[:, None] * BLOCK + torch.arange(BLOCK, device=dev)).flatten().clamp(max=L - 1)] = True
        cols = index.cols[:, qb0:qb1]
        col_ok = torch.arange(cols.shape[-1], device=dev) < index.col_count[:, qb0:qb1, None]
        extra = torch.zeros(L, dtype=torch.bool, device=dev)
        extra[cols[col_ok]] = True
        ranged = None
        if index.ranges.shape[1]:  # [Hq, G, L]: keys inside a range of (head, query block)
            a = geom.q_pos0 + torch.arange(qb0, qb1, device=dev) * BLOCK
            ranged = index.in_ranges((key_pos[None, :] - a[:, None])[None].expand(Hq, -1, -1))
            extra |= ranged.any(1).any(0)
        keys = key_pos[in_blocks | extra]  # ascending key positions attended by anyone in this step
        slot = torch.full((L,), -1, dtype=torch.int64, device=dev)
        slot[keys] = torch.arange(len(keys), device=dev)
        # Element mask [Hq, rows, keys]: the row's block selects the key's block, a range of the row's block
        # holds the key, or the key is a column of the row's block.
        mask = sub[:, rows_qb - qb0][:, :, keys // BLOCK]
        if ranged is not None:
            mask |= ranged[:, :, keys][:, rows_qb - qb0]
        if cols.shape[-1]:
            h_i, g_i, c_i = col_ok.nonzero(as_tuple=True)
            col_mask = torch.zeros(Hq, qb1 - qb0, len(keys), dtype=torch.bool, device=dev)
            col_mask[h_i, g_i, slot[cols[h_i, g_i, c_i]]] = True
            mask |= col_mask[:, rows_qb - qb0]
        mask &= keys[None, None, :] <= (geom.q_pos0 + torch.arange(r0, r1, device=dev))[None, :, None]
        qs = q[r0:r1].transpose(0, 1)[None].float()
        ks = k[keys].transpose(0, 1)[None].float()
        vs = v[keys].transpose(0, 1)[None].float()
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask[None], scale=scale, enable_gqa=Hq != Hkv)
        out[r0:r1] = o[0].transpose(0, 1).nan_to_num(0.0).to(out.dtype)
    return out


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of a chunk (rows at positions [L - n, L)) over all L keys; the oracle."""
    n, Hq, _ = q.shape
    L = k.shape[0]
    kh, vh = _gqa_keys(k, Hq).float(), _gqa_keys(v, Hq).float()
    causal = torch.arange(L)[None, :] <= (L - n + torch.arange(n))[:, None]
    s = torch.einsum("qhd,hkd->hqk", q.float(), kh) * scale
    p = torch.softmax(s.masked_fill(~causal[None], float("-inf")), dim=-1)
    return torch.einsum("hqk,hkd->qhd", p, vh).to(q.dtype)


def attention_recall(q: torch.Tensor, k: torch.Tensor, index: SparseIndex, scale: float,
                     rows_per_step: int = 256) -> torch.Tensor:
    """[Hq] mean over query rows of the dense attention mass that falls inside the index's mask."""
    n, Hq, _ = q.shape
    L = k.shape[0]
    geom = ChunkGeometry(n, L)
    kh = _gqa_keys(k, Hq).float()
    total = torch.zeros(Hq, dtype=torch.float64)
    for r0 in range(0, n, rows_per_step):
        r1 = min(n, r0 + rows_per_step)
        pos = L - n + torch.arange(r0, r1)
        causal = torch.arange(L)[None, :] <= pos[:, None]
        s = torch.einsum("qhd,hkd->hqk", q[r0:r1].float(), kh) * scale
        p = torch.softmax(s.masked_fill(~causal[None], float("-inf")), dim=-1)
        total += (p * index.dense_mask(geom, slice(r0, r1))).sum(dim=(1, 2)).double()
    return (total / n).float()
