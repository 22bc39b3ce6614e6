"""Torch reference of sparse prefill attention (the CPU path, and the oracle for the Triton kernels).

Cost follows the index: each group of query blocks gathers only its selected key blocks and columns, so
compute and memory scale with the density, not with the causal square.
"""
from __future__ import annotations

import torch

from attention_backends.sparse_prefill.index import BLOCK, ChunkGeometry, SparseIndex

Q_BLOCKS_PER_STEP = 4


def _gqa_keys(x: torch.Tensor, Hq: int) -> torch.Tensor:
    """[L, Hkv, d] -> [Hq, L, d] view-expanded per query head (no copy)."""
    L, Hkv, d = x.shape
    g = Hq // Hkv
    return x.permute(1, 0, 2)[:, None].expand(Hkv, g, L, d).reshape(Hq, L, d) if g > 1 else x.permute(1, 0, 2)


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: SparseIndex, scale: float,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """q [n, Hq, d]; k, v [L, Hkv, d] (the whole sequence, chunk last) -> [n, Hq, d] in q's dtype."""
    n, Hq, d = q.shape
    L = k.shape[0]
    geom = ChunkGeometry(n, L)
    kh, vh = _gqa_keys(k, Hq), _gqa_keys(v, Hq)
    out = torch.empty_like(q) if out is None else out
    nblk = index.block_mask.sum(-1)  # [Hq, nqb]
    offs = torch.arange(BLOCK, device=q.device)
    heads = torch.arange(Hq, device=q.device)[:, None, None]
    for qb0 in range(0, geom.nqb, Q_BLOCKS_PER_STEP):
        qb1 = min(geom.nqb, qb0 + Q_BLOCKS_PER_STEP)
        sub = index.block_mask[:, qb0:qb1]  # [Hq, G, nkb]
        nb = max(int(nblk[:, qb0:qb1].max()), 1)
        # Selected key blocks first (stable sort of "not selected"), in ascending order.
        blocks = torch.sort((~sub).to(torch.int8), dim=-1, stable=True).indices[..., :nb]
        block_ok = torch.arange(nb, device=q.device) < nblk[:, qb0:qb1, None]
        keys = (blocks[..., None] * BLOCK + offs).flatten(-2)  # [Hq, G, nb*BLOCK]
        key_ok = (block_ok[..., None] & torch.ones(BLOCK, dtype=torch.bool, device=q.device)).flatten(-2) & (keys < L)
        if index.cols.shape[-1]:
            cols = index.cols[:, qb0:qb1]
            col_ok = torch.arange(cols.shape[-1], device=q.device) < index.col_count[:, qb0:qb1, None]
            keys = torch.cat([keys, cols], -1)
            key_ok = torch.cat([key_ok, col_ok], -1)
        keys = torch.where(key_ok, keys, torch.zeros_like(keys))
        G, M = keys.shape[1], keys.shape[2]
        r0, r1 = qb0 * BLOCK, min(qb1 * BLOCK, n)
        rows = torch.arange(r0, qb0 * BLOCK + G * BLOCK, device=q.device)
        qblk = torch.zeros(Hq, G * BLOCK, d, dtype=torch.float32, device=q.device)
        qblk[:, :r1 - r0] = q[r0:r1].transpose(0, 1).float()
        qblk = qblk.view(Hq, G, BLOCK, d)
        flat = keys.reshape(Hq, G * M)
        ksel = kh[heads.view(Hq, 1), flat].view(Hq, G, M, d).float()
        vsel = vh[heads.view(Hq, 1), flat].view(Hq, G, M, d).float()
        s = torch.einsum("hgqd,hgmd->hgqm", qblk, ksel) * scale
        row_pos = (geom.q_pos0 + rows).view(G, BLOCK)
        ok = key_ok[:, :, None, :] & (keys[:, :, None, :] <= row_pos[None, :, :, None])
        s = s.masked_fill(~ok, float("-inf"))
        p = torch.softmax(s, dim=-1).nan_to_num(0.0)
        o = torch.einsum("hgqm,hgmd->hgqd", p, vsel).reshape(Hq, G * BLOCK, d)
        out[r0:r1] = o[:, :r1 - r0].transpose(0, 1).to(out.dtype)
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
