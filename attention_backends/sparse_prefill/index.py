"""The one sparse-index format every pattern produces and every kernel consumes.

A prefill chunk has ``n`` query rows at absolute positions ``[L - n, L)`` and attends to ``L`` keys (the
cached context plus itself, causally). Query rows are grouped in blocks of ``BLOCK`` counted from the
chunk's first row; keys in ``BLOCK``-aligned blocks counted from position 0. Per query head and query
block the index holds a set of whole key blocks (``block_mask``) plus single key columns that fall outside
those blocks (``cols``, compacted, ``-1`` padded). Causality is applied element-wise by the kernels, so
the diagonal block may be selected whole.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK = 64


@dataclass(frozen=True)
class ChunkGeometry:
    n: int  # query rows of this chunk
    L: int  # keys it attends to (context + chunk)

    def __post_init__(self) -> None:
        if not 0 < self.n <= self.L:
            raise ValueError(f"chunk of {self.n} rows cannot attend to {self.L} keys")

    @property
    def q_pos0(self) -> int:
        return self.L - self.n

    @property
    def nqb(self) -> int:
        return -(-self.n // BLOCK)

    @property
    def nkb(self) -> int:
        return -(-self.L // BLOCK)

    def q_block_bounds(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Absolute positions [a, b) of every query block."""
        a = self.q_pos0 + torch.arange(self.nqb, device=device) * BLOCK
        return a, torch.clamp(a + BLOCK, max=self.L)

    def causal_blocks(self, device=None) -> torch.Tensor:
        """[nqb, nkb] bool: key blocks holding at least one key some row of the query block may see."""
        _, b = self.q_block_bounds(device)
        kb_start = torch.arange(self.nkb, device=device) * BLOCK
        return kb_start[None, :] <= (b - 1)[:, None]

    def causal_pairs(self) -> int:
        """(query, key) pairs of the causal mask of this chunk."""
        lo, hi = self.q_pos0, self.L
        return (hi * (hi + 1) - lo * (lo + 1)) // 2


@dataclass
class SparseIndex:
    block_mask: torch.Tensor  # [H, nqb, nkb] bool
    cols: torch.Tensor  # [H, nqb, C] int64 key positions, valid first, -1 padded (C may be 0)
    col_count: torch.Tensor  # [H, nqb] int64

    @property
    def num_heads(self) -> int:
        return self.block_mask.shape[0]

    def computed_pairs(self, geom: ChunkGeometry) -> torch.Tensor:
        """[H] causal (query, key) pairs this index makes a kernel compute (what density reports)."""
        a, b = geom.q_block_bounds(self.block_mask.device)
        c = torch.arange(geom.nkb, device=a.device) * BLOCK
        w = torch.clamp(c + BLOCK, max=geom.L) - c

        def ramp(t: torch.Tensor) -> torch.Tensor:  # sum_{i<t} clamp(i + 1 - c, 0, w), for all (qb, kb)
            m = torch.clamp(t[:, None] - c[None, :], min=0)
            m_in = torch.minimum(m, w[None, :])
            return m_in * (m_in + 1) // 2 + (m - m_in) * w[None, :]

        per_block = ramp(b) - ramp(a)  # [nqb, nkb]
        blocks = (self.block_mask.long() * per_block[None]).sum(dim=(1, 2))
        valid = torch.arange(self.cols.shape[-1], device=a.device)[None, None, :] < self.col_count[..., None]
        col_rows = torch.clamp(b[None, :, None] - torch.maximum(self.cols, a[None, :, None]), min=0)
        return blocks + (col_rows * valid).sum(dim=(1, 2))

    def density(self, geom: ChunkGeometry) -> float:
        """Fraction of the causal mask (all heads) actually computed."""
        return float(self.computed_pairs(geom).sum()) / (geom.causal_pairs() * self.num_heads)

    def dense_mask(self, geom: ChunkGeometry, rows: slice | None = None) -> torch.Tensor:
        """[H, r, L] bool element mask (causal applied) for query rows ``rows`` of the chunk; for tests/recall."""
        rows = rows or slice(0, geom.n)
        r = torch.arange(rows.start, rows.stop, device=self.block_mask.device)
        keys = torch.arange(geom.L, device=r.device)
        m = self.block_mask[:, r // BLOCK][:, :, keys // BLOCK]  # [H, r, L]
        H = self.num_heads
        if self.cols.shape[-1]:
            cols = self.cols[:, r // BLOCK]  # [H, r, C]
            valid = torch.arange(cols.shape[-1], device=r.device) < self.col_count[:, r // BLOCK][..., None]
            m = m.clone()
            hh = torch.arange(H, device=r.device)[:, None, None].expand_as(cols)
            rr = torch.arange(len(r), device=r.device)[None, :, None].expand_as(cols)
            m[hh[valid], rr[valid], cols[valid]] = True
        causal = keys[None, None, :] <= (geom.q_pos0 + r)[None, :, None]
        return m & causal


def compact_columns(cols: torch.Tensor, block_mask: torch.Tensor, geom: ChunkGeometry) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head vertical columns [H, V] (-1 = unused) -> per query block, the ones not already inside a
    selected block and visible to the block's last row: (cols [H, nqb, V] valid-first, counts [H, nqb])."""
    H, V = cols.shape
    if V == 0:
        return cols.new_zeros((H, geom.nqb, 0)), cols.new_zeros((H, geom.nqb))
    _, b = geom.q_block_bounds(cols.device)
    c = cols[:, None, :].expand(H, geom.nqb, V)
    safe = torch.clamp(c, min=0)
    in_block = torch.gather(block_mask, 2, safe // BLOCK)
    valid = (c >= 0) & (c <= (b - 1)[None, :, None]) & ~in_block
    big = torch.iinfo(torch.int64).max
    keyed = torch.where(valid, c, torch.full_like(c, big))
    keyed, _ = torch.sort(keyed, dim=-1)
    count = valid.sum(-1)
    return torch.where(keyed == big, torch.full_like(keyed, -1), keyed), count


def empty_index(H: int, geom: ChunkGeometry, device=None) -> SparseIndex:
    return SparseIndex(torch.zeros(H, geom.nqb, geom.nkb, dtype=torch.bool, device=device),
                       torch.zeros(H, geom.nqb, 0, dtype=torch.int64, device=device),
                       torch.zeros(H, geom.nqb, dtype=torch.int64, device=device))
