"""The per-query-head SparseIndex regrouped per KV head (GQA group), for the group-shared Triton kernel.

One kernel program serves every query head of a KV group for a tile of rows, so it visits the *union* of the
group's keys once and shares each K/V load across the group's heads. Which (head, key) pairs count is then
decided per key by a bit per head of the group:

  * ``exact`` (default): a head keeps exactly its own keys (the kernel computes the same function as the
    per-head index; the tensor cores still do the union's work);
  * ``union``: every head of the group attends the union (more pairs, recall >= the per-head index).
    ``union_index`` gives that index per query head, for the torch reference and the density.

Per source (the index's three; a head uses whole blocks or ranges, never both, plus columns):

  * blocks: the union of the group's selected key blocks per query block (compacted ids); per-head
    membership is read from the original block_mask in the kernel (one byte per row head and tile);
  * ranges: the group's ranges merged and re-cut into tiles of at most ``tile`` keys (relative to the query
    block's first row, the same for every query block, like the index's); per-head membership is
    ``range_bits[g, rel + L]`` (bit j: head j of the group has the relative key position ``rel`` in a range);
  * columns: per query block the sorted union of the group's compacted columns with the bits of the heads
    that hold them. In exact mode a column may also lie inside another head's range tile: its bits there are
    the range heads', here the column heads' (disjoint per head), so no (head, key) pair is counted twice.
    In union mode columns inside the union's blocks or ranges are dropped instead, and range tiles skip keys
    inside the union's blocks (a group may mix a block pattern with a range pattern).

All of it is torch on the device with shapes known on the host (no sync).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attention_backends.sparse_prefill.index import BLOCK, RANGE_PAD, ChunkGeometry, SparseIndex

HEAD_BITS = 5  # columns are sorted as (col << HEAD_BITS) | head-in-group: groups of at most 32 heads
MAX_GROUP = 1 << HEAD_BITS


@dataclass
class GroupIndex:
    group: int  # query heads per KV head
    union: bool
    block_ids: torch.Tensor  # [Hkv, nqb, W] int32 ascending union blocks (see block_count)
    block_count: torch.Tensor  # [Hkv, nqb] int32
    block_union: torch.Tensor  # [Hkv, nqb, nkb] int8: union mode's range tiles skip keys of union blocks
    ranges: torch.Tensor  # [Hkv, R, 2] int32 union tiles relative to the query block start, RANGE_PAD padded
    range_count: torch.Tensor  # [Hkv] int32
    range_first: torch.Tensor  # [Hkv, nqb] int32
    range_bits: torch.Tensor  # [Hkv, L + BLOCK] int32, index rel + L
    cols: torch.Tensor  # [Hkv, nqb, C] int32 ascending union columns
    col_bits: torch.Tensor  # [Hkv, nqb, C] int32
    col_count: torch.Tensor  # [Hkv, nqb] int32


def _merge_ranges(ranges: torch.Tensor, count: torch.Tensor, tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ranges [h, M, 2] (any order; entries j >= count[h] ignored) -> their union cut into pieces of at most
    ``tile`` keys: ([h, M, 2] ascending, RANGE_PAD padded; counts [h]). A merged segment of m inputs (each at
    most ``tile`` wide) is at most m * tile wide, so M pieces always suffice (fixed shape)."""
    h, M, _ = ranges.shape
    dev = ranges.device
    if M == 0:
        return ranges.new_zeros((h, 0, 2)), count.new_zeros((h,))
    j = torch.arange(M, device=dev)[None, :].expand(h, M)
    real = (j < count[:, None]) & (ranges[..., 1] > ranges[..., 0])
    big = 1 << 40
    s = torch.where(real, ranges[..., 0], torch.full_like(ranges[..., 0], big))
    s, order = torch.sort(s, dim=-1)
    e = torch.gather(torch.where(real, ranges[..., 1], torch.full_like(s, big)), 1, order)
    real = s < big
    run_end = torch.cummax(e, dim=-1).values
    prev_end = F.pad(run_end[:, :-1], (1, 0), value=-big)
    new_seg = real & (s > prev_end)
    first = torch.cummax(torch.where(new_seg, j, torch.zeros_like(j)), dim=-1).values
    seg_id = torch.cumsum(new_seg.long(), -1) - 1
    seg_end = torch.full((h, M), -big, dtype=e.dtype, device=dev).scatter_reduce(
        1, seg_id.clamp(min=0), torch.where(real, e, torch.full_like(e, -big)), "amax")
    seg_end = torch.gather(seg_end, 1, seg_id.clamp(min=0))
    seg_start = torch.gather(s, 1, first)
    p = j - first
    t_start = seg_start + p * tile
    keep = real & (t_start < seg_end)
    t_end = torch.minimum(t_start + tile, seg_end)
    key = torch.where(keep, t_start, torch.full_like(t_start, big))
    key, order = torch.sort(key, dim=-1, stable=True)
    t_end = torch.gather(t_end, 1, order)
    pad = key == big
    key = torch.where(pad, torch.full_like(key, RANGE_PAD), key)
    t_end = torch.where(pad, torch.full_like(t_end, RANGE_PAD), t_end)
    return torch.stack([key, t_end], -1), keep.sum(-1)


def _head_range_map(index: SparseIndex, L: int) -> torch.Tensor:
    """[H, L + BLOCK] bool: relative key position rel (at rel + L) lies in one of the head's ranges."""
    H, R = index.ranges.shape[:2]
    W = L + BLOCK
    dev = index.ranges.device
    diff = torch.zeros(H, W + 1, dtype=torch.int32, device=dev)
    if R:
        real = torch.arange(R, device=dev)[None, :] < index.range_count[:, None]
        s = torch.clamp(index.ranges[..., 0] + L, 0, W)
        e = torch.clamp(index.ranges[..., 1] + L, 0, W)
        real = real & (e > s)
        one = real.to(torch.int32)
        diff.scatter_add_(1, torch.where(real, s, W), one)
        diff.scatter_add_(1, torch.where(real, e, W), -one)
    return torch.cumsum(diff[:, :W], 1) > 0


def group_index(index: SparseIndex, geom: ChunkGeometry, group: int, tile: int = BLOCK, union: bool = False,
                max_blocks: int | None = None) -> GroupIndex:
    """Regroup ``index`` (one entry per query head, heads h = g * group + j) per KV head g; see the module doc.
    ``tile``: the widest range tile (the kernel's range BLOCK_N, a multiple of BLOCK or BLOCK itself)."""
    from attention_backends.sparse_prefill.triton_kernels import compact_blocks

    H, nqb, nkb = index.block_mask.shape
    if H % group or not 1 <= group <= MAX_GROUP or geom.L >= 1 << (31 - HEAD_BITS):
        raise ValueError(f"{H} query heads in groups of {group} (at most {MAX_GROUP}), {geom.L} keys: unsupported")
    Hkv, L, dev = H // group, geom.L, index.block_mask.device
    hbit = (1 << torch.arange(group, device=dev, dtype=torch.int32))  # [G]
    # blocks
    blocks_union = index.block_mask.view(Hkv, group, nqb, nkb).any(1)
    bids, bcnt = compact_blocks(blocks_union, max_blocks)
    # ranges
    R = index.ranges.shape[1]
    in_range = _head_range_map(index, L)  # [H, L + BLOCK]
    range_bits = (in_range.view(Hkv, group, -1).to(torch.int32) * hbit[None, :, None]).sum(1, dtype=torch.int32)
    if R:
        per_group = index.ranges.view(Hkv, group * R, 2)
        j = torch.arange(group * R, device=dev).view(group, R)
        real = (j % R)[None] < index.range_count.view(Hkv, group, 1)  # [Hkv, G, R]
        # put every real range first so one count per group describes the concatenation
        key = torch.where(real.view(Hkv, -1), j.view(1, -1), j.view(1, -1) + group * R)
        order = torch.sort(key, dim=-1).indices
        per_group = torch.gather(per_group, 1, order[..., None].expand(-1, -1, 2))
        ranges, rcount = _merge_ranges(per_group, real.view(Hkv, -1).sum(-1), tile)
        a, _ = geom.q_block_bounds(dev)
        rfirst = torch.searchsorted(ranges[..., 1].contiguous(), (-a)[None, :].expand(Hkv, -1).contiguous(),
                                    right=True)
        # query blocks none of the group's heads visits ranges in (dense-tail blocks) skip the union's too
        off = ~index.ranges_on().view(Hkv, group, nqb).any(1)
        rfirst = torch.where(off, rcount[:, None], rfirst)
    else:
        ranges = torch.zeros(Hkv, 1, 2, dtype=torch.int64, device=dev)
        rcount = torch.zeros(Hkv, dtype=torch.int64, device=dev)
        rfirst = torch.zeros(Hkv, nqb, dtype=torch.int64, device=dev)
    # columns: sort (col << HEAD_BITS | j) over the group's heads, then merge equal columns' head bits
    C = index.cols.shape[-1]
    if C:
        cols = index.cols.view(Hkv, group, nqb, C)
        valid = torch.arange(C, device=dev) < index.col_count.view(Hkv, group, nqb, 1)
        if union:  # drop columns the union's blocks or ranges already cover
            safe = cols.clamp(min=0)
            a, _ = geom.q_block_bounds(dev)
            g_ = torch.arange(Hkv, device=dev)[:, None, None, None]
            qb_ = torch.arange(nqb, device=dev)[None, None, :, None]
            covered = blocks_union[g_, qb_, safe // BLOCK]
            covered |= range_bits[g_, (safe - a[None, None, :, None] + L).clamp(0, L + BLOCK - 1)] != 0
            valid &= ~covered
        jj = torch.arange(group, device=dev, dtype=torch.int32)[None, :, None, None]
        big = torch.iinfo(torch.int32).max  # (col << HEAD_BITS) fits int32 below 2**26 keys
        packed = torch.where(valid, (cols.to(torch.int32) << HEAD_BITS) | jj, big)
        packed = torch.sort(packed.permute(0, 2, 1, 3).reshape(Hkv, nqb, group * C), dim=-1).values
        ok = packed != big
        col = torch.where(ok, packed >> HEAD_BITS, -1)
        bit = torch.where(ok, 1 << (packed & (MAX_GROUP - 1)), 0)
        first = ok & (col != F.pad(col[..., :-1], (1, 0), value=-1))
        run = (torch.cumsum(first, -1, dtype=torch.int32) - 1).clamp(min=0).long()
        ucount = first.sum(-1)
        ubits = torch.zeros_like(bit).scatter_add_(-1, run, bit)
        ucols = torch.full_like(col, -1).scatter_(-1, torch.where(first, run, group * C - 1), col)
        ucols = torch.where(torch.arange(group * C, device=dev) < ucount[..., None], ucols, -1)
    else:
        ucols = torch.zeros(Hkv, nqb, 1, dtype=torch.int64, device=dev)
        ubits = torch.zeros_like(ucols)
        ucount = torch.zeros(Hkv, nqb, dtype=torch.int64, device=dev)
    if union:
        range_bits = torch.where(range_bits != 0, -1, 0).to(torch.int32)  # every bit: every head
        ubits = torch.where(ubits != 0, -1, 0)
    i32 = lambda x: x.to(torch.int32).contiguous()  # noqa: E731
    return GroupIndex(group, union, bids, bcnt, blocks_union.view(torch.int8), i32(ranges), i32(rcount), i32(rfirst), range_bits.contiguous(),
                      i32(ucols), i32(ubits), i32(ucount))


def union_index(index: SparseIndex, geom: ChunkGeometry, group: int) -> SparseIndex:
    """The per-query-head SparseIndex in which every head of a group attends the group's union (what the
    group kernel computes in union mode): for the torch reference, recall and density."""
    gi = group_index(index, geom, group, tile=BLOCK, union=True)
    H, nqb, nkb = index.block_mask.shape
    Hkv = H // group
    rep = lambda x: x.repeat_interleave(group, 0).long()  # noqa: E731
    return SparseIndex(index.block_mask.view(Hkv, group, nqb, nkb).any(1).repeat_interleave(group, 0),
                       rep(gi.cols), rep(gi.col_count), rep(gi.ranges), rep(gi.range_count), rep(gi.range_first))
