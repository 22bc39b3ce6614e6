"""Triton kernels for sparse prefill: block-mask -> index compaction, and sparse attention that reads the
paged KV cache directly (block table + arbitrary cache strides, so CPU_ATTN's and FlashAttention's
layouts both work). Tested against reference.py under TRITON_INTERPRET=1 on the CPU.

Pattern scoring (the last-64-query estimate, pooled block scores, top-k) runs as torch ops on the device:
shapes depend only on host-known budgets, so nothing in a layer's forward waits for the GPU.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.profiler import record_function

from attention_backends.sparse_prefill.head_config import LayerPlan, build_index
from attention_backends.sparse_prefill.group_index import GroupIndex, group_index
from attention_backends.sparse_prefill.index import BLOCK, ChunkGeometry, SparseIndex
from attention_backends.sparse_prefill.index_options import IndexOptions
from attention_backends.sparse_prefill.paged_keys import PagedKeys

# Triton 3.9's interpreter computes bf16/fp16 tl.dot wrongly; interpreted runs dot in fp32 instead.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _compact_blocks_kernel(mask_ptr, idx_ptr, count_ptr, nkb, stride_mh, stride_mq, stride_ih, stride_iq,
                           nqb, CHUNK: tl.constexpr):
    """One program per (query block, head): write the selected key-block ids in ascending order."""
    qb = tl.program_id(0)
    h = tl.program_id(1)
    base = mask_ptr + h * stride_mh + qb * stride_mq
    out = idx_ptr + h * stride_ih + qb * stride_iq
    written = 0
    for start in range(0, nkb, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        sel = tl.load(base + offs, mask=offs < nkb, other=0).to(tl.int32)
        pos = written + tl.cumsum(sel, axis=0) - sel
        tl.store(out + pos, offs.to(tl.int32), mask=sel > 0)
        written += tl.sum(sel, axis=0)
    tl.store(count_ptr + h * nqb + qb, written)


def compact_blocks(block_mask: torch.Tensor, max_blocks: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """[H, nqb, nkb] bool -> (ids [H, nqb, max_blocks] int32 ascending, counts [H, nqb] int32)."""
    H, nqb, nkb = block_mask.shape
    width = nkb if max_blocks is None else max_blocks
    mask = block_mask.to(torch.int8).contiguous()
    ids = torch.zeros(H, nqb, max(width, 1), dtype=torch.int32, device=block_mask.device)
    counts = torch.zeros(H, nqb, dtype=torch.int32, device=block_mask.device)
    _compact_blocks_kernel[(nqb, H)](mask, ids, counts, nkb, mask.stride(0), mask.stride(1), ids.stride(0),
                                     ids.stride(1), nqb, CHUNK=128)
    return ids, counts


@triton.jit
def _range_keys(rng_ptr, row_off, j, a, L, BLOCK_N: tl.constexpr):
    """Range ``j`` of a query block starting at position ``a``: its key positions and which are valid keys."""
    start = a + tl.load(rng_ptr + row_off + 2 * j)
    stop = a + tl.load(rng_ptr + row_off + 2 * j + 1)
    kpos = start + tl.arange(0, BLOCK_N)
    return kpos, (kpos >= 0) & (kpos < stop) & (kpos < L)


@triton.jit
def _attend_keys(acc, l_i, m_i, q, kpos, key_ok, row_pos, k_ptr, v_ptr, pages_ptr, kvh, sk_b, sk_h, sk_t, sk_d,
                 sv_b, sv_h, sv_t, sv_d, page_size, qk_scale, dims, dim_ok, UPCAST: tl.constexpr):
    """One online-softmax step over BLOCK_N keys at positions ``kpos`` read through the page table."""
    page = tl.load(pages_ptr + kpos // page_size, mask=key_ok, other=0)
    slot = kpos % page_size
    kt = tl.load(k_ptr + page[None, :] * sk_b + kvh * sk_h + slot[None, :] * sk_t + dims[:, None] * sk_d,
                 mask=key_ok[None, :] & dim_ok[:, None], other=0.0)  # [BLOCK_D, BLOCK_N]
    if UPCAST:
        kt = kt.to(tl.float32)
    s = tl.dot(q, kt) * qk_scale  # fp32 accumulate, exp2 domain
    s = tl.where(key_ok[None, :] & (kpos[None, :] <= row_pos[:, None]), s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v = tl.load(v_ptr + page[:, None] * sv_b + kvh * sv_h + slot[:, None] * sv_t + dims[None, :] * sv_d,
                mask=key_ok[:, None] & dim_ok[None, :], other=0.0)
    if UPCAST:
        v = v.to(tl.float32)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, l_i, m_new


@triton.jit
def _sparse_attn_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr, pages_ptr, bidx_ptr, bcnt_ptr, cidx_ptr, ccnt_ptr, rng_ptr, rcnt_ptr,
        rfirst_ptr, sq_t, sq_h, sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d, so_t, so_h,
        sbi_h, sbi_q, sci_h, sci_q, sr_h, nqb, n, L, q_pos0, scale, page_size, group,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        UPCAST: tl.constexpr):
    """One program per (query block, query head): its selected key blocks, its key ranges (relative to the
    block's first row, at most BLOCK_N keys each), then its vertical columns."""
    qb = tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // group
    rows = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n
    row_pos = q_pos0 + rows
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    q = tl.load(q_ptr + rows[:, None] * sq_t + h * sq_h + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :],
                other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    qk_scale = scale * 1.4426950408889634
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    n_blocks = tl.load(bcnt_ptr + h * nqb + qb)
    for i in range(0, n_blocks):
        kb = tl.load(bidx_ptr + h * sbi_h + qb * sbi_q + i)
        kpos = kb * BLOCK_N + tl.arange(0, BLOCK_N)
        acc, l_i, m_i = _attend_keys(acc, l_i, m_i, q, kpos, kpos < L, row_pos, k_ptr, v_ptr, pages_ptr, kvh,
                                     sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d, page_size, qk_scale, dims,
                                     dim_ok, UPCAST)
    a = q_pos0 + qb * BLOCK_M
    r_end = tl.load(rcnt_ptr + h)
    for j in range(tl.load(rfirst_ptr + h * nqb + qb), r_end):
        kpos, key_ok = _range_keys(rng_ptr, h * sr_h, j, a, L, BLOCK_N)
        acc, l_i, m_i = _attend_keys(acc, l_i, m_i, q, kpos, key_ok, row_pos, k_ptr, v_ptr, pages_ptr, kvh,
                                     sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d, page_size, qk_scale, dims,
                                     dim_ok, UPCAST)
    n_cols = tl.load(ccnt_ptr + h * nqb + qb)
    for c0 in range(0, n_cols, BLOCK_N):
        c = c0 + tl.arange(0, BLOCK_N)
        key_ok = c < n_cols
        kpos = tl.load(cidx_ptr + h * sci_h + qb * sci_q + c, mask=key_ok, other=0)
        acc, l_i, m_i = _attend_keys(acc, l_i, m_i, q, kpos, key_ok, row_pos, k_ptr, v_ptr, pages_ptr, kvh,
                                     sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d, page_size, qk_scale, dims,
                                     dim_ok, UPCAST)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(o_ptr + rows[:, None] * so_t + h * so_h + dims[None, :], out.to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None] & dim_ok[None, :])


def sparse_attention_paged_per_head(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                                    pages: torch.Tensor, index: SparseIndex, geom: ChunkGeometry, scale: float,
                                    out: torch.Tensor | None = None, max_blocks: int | None = None,
                                    num_warps: int = 4, num_stages: int = 2) -> torch.Tensor:
    """The per-head kernel (one program per 64-row block and query head; each head of a GQA group re-reads the
    group's K/V, mostly from L2). Same arguments and result as sparse_attention_paged."""
    n, Hq, d = q.shape
    Hkv = key_cache.shape[1]
    out = torch.empty_like(q) if out is None else out
    bidx, bcnt = compact_blocks(index.block_mask, max_blocks)
    cols = index.cols.to(torch.int32).contiguous()
    if cols.shape[-1] == 0:
        cols = torch.zeros(Hq, geom.nqb, 1, dtype=torch.int32, device=q.device)
    ccnt = index.col_count.to(torch.int32).contiguous()
    pages = pages.to(torch.int32).contiguous()
    ranges = index.ranges.to(torch.int32).contiguous()
    if ranges.shape[1] == 0:
        ranges = torch.zeros(Hq, 1, 2, dtype=torch.int32, device=q.device)
    rcnt = index.range_count.to(torch.int32).contiguous()
    rfirst = index.range_first.to(torch.int32).contiguous()
    _sparse_attn_kernel[(geom.nqb, Hq)](
        q, key_cache, value_cache, out, pages, bidx, bcnt, cols, ccnt, ranges, rcnt, rfirst,
        q.stride(0), q.stride(1), *key_cache.stride(), *value_cache.stride(), out.stride(0), out.stride(1),
        bidx.stride(0), bidx.stride(1), cols.stride(0), cols.stride(1), ranges.stride(0), geom.nqb, n, geom.L,
        geom.q_pos0,
        scale, key_cache.shape[2], Hq // Hkv,
        HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_M=BLOCK, BLOCK_N=BLOCK,
        UPCAST=_INTERPRET, num_warps=num_warps, num_stages=num_stages)
    return out


@triton.jit
def _online_softmax_update(acc, l_i, m_i, m_new, m_safe, s, v):
    """Fold a tile's scores ``s`` (exp2 domain; ``m_safe`` = the new running max, 0 where a row has none yet)
    and its values into the running (acc, l_i); returns (acc, l_i, m_new)."""
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, l_i, m_new


@triton.jit
def _group_tile(acc, l_i, m_i, q, kpos, key_ok, head_ok, row_pos, k_ptr, v_ptr, pages_ptr, kvh, sk_b, sk_h, sk_t,
                sk_d, sv_b, sv_h, sv_t, sv_d, qk_scale, dims, dim_ok, PAGE: tl.constexpr, UPCAST: tl.constexpr):
    """One online-softmax step of a stacked (rows x group heads) Q tile over BLOCK_N keys read once through
    the page table. ``head_ok`` [GM, BLOCK_N] or [GM, 1]: which (row head, key) pairs count."""
    page = tl.load(pages_ptr + kpos // PAGE, mask=key_ok, other=0).to(tl.int64)
    slot = kpos % PAGE
    kd_ok = key_ok[:, None] & dim_ok[None, :]
    k = tl.load(k_ptr + (page * sk_b + kvh * sk_h + slot * sk_t)[:, None] + dims[None, :] * sk_d, mask=kd_ok,
                other=0.0)  # [BLOCK_N, BLOCK_D]
    v = tl.load(v_ptr + (page * sv_b + kvh * sv_h + slot * sv_t)[:, None] + dims[None, :] * sv_d, mask=kd_ok,
                other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, tl.trans(k)) * qk_scale  # fp32 accumulate, exp2 domain
    s = tl.where(head_ok & key_ok[None, :] & (kpos[None, :] <= row_pos[:, None]), s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    return _online_softmax_update(acc, l_i, m_i, m_new, m_safe, s, v)


@triton.jit
def _stacked_q_tile(q_ptr, t, h0, group, n, q_pos0, sq_t, sq_h, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_M: tl.constexpr, GROUP_P: tl.constexpr, UPCAST: tl.constexpr):
    """The Q tile of row tile ``t`` with the group's heads (h0 ...) stacked: row r of head j at r * GROUP_P + j.
    Returns (q, rows, hrow, row_ok, row_pos, h, dims, dim_ok)."""
    e = tl.arange(0, BLOCK_M * GROUP_P)
    hrow = e % GROUP_P
    rows = t * BLOCK_M + e // GROUP_P
    row_ok = (rows < n) & (hrow < group)
    h = h0 + hrow
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    q = tl.load(q_ptr + rows[:, None] * sq_t + h[:, None] * sq_h + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    return q, rows, hrow, row_ok, q_pos0 + rows, h, dims, dim_ok


@triton.jit
def _group_attn_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr, pages_ptr, bm_ptr, ubm_ptr, bidx_ptr, bcnt_ptr, rng_ptr, rcnt_ptr, rfirst_ptr, rbits_ptr,
        cidx_ptr, cbits_ptr, ccnt_ptr, sq_t, sq_h, sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d, so_t, so_h,
        sbm_h, sbm_q, subm_g, subm_q, sbi_g, sbi_q, sr_g, srb_g, sc_g, sc_q, nqb, n_tiles, n, L, q_pos0, scale, group,
        kv_div,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, GROUP_P: tl.constexpr,
        BLOCK_N: tl.constexpr, QBLOCK: tl.constexpr, PAGE: tl.constexpr, UNION: tl.constexpr,
        HAS_RANGES: tl.constexpr, HAS_COLS: tl.constexpr, UPCAST: tl.constexpr):
    """One program per (tile of BLOCK_M rows, KV head): the Q tile stacks the rows of all the group's query
    heads (row r of head j at r * GROUP_P + j), so every K/V tile is read once per group. Loops: the group's
    union key blocks of the rows' query block, its union range tiles, its union columns; per-key head bits say
    which heads count each key (see group_index.py)."""
    t = n_tiles - 1 - tl.program_id(0)  # the last row tiles see the most keys: start them first
    gid = tl.program_id(1)  # the group (index entries); its K/V head in the cache is gid // kv_div
    kvh = gid // kv_div
    qb = (t * BLOCK_M) // QBLOCK
    q, rows, hrow, row_ok, row_pos, h, dims, dim_ok = _stacked_q_tile(
        q_ptr, t, gid * group, group, n, q_pos0, sq_t, sq_h, HEAD_DIM, BLOCK_D, BLOCK_M, GROUP_P, UPCAST)
    qk_scale = scale * 1.4426950408889634
    m_i = tl.full([BLOCK_M * GROUP_P], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M * GROUP_P], tl.float32)
    acc = tl.zeros([BLOCK_M * GROUP_P, BLOCK_D], tl.float32)
    all_heads = row_ok[:, None]
    n_blocks = tl.load(bcnt_ptr + gid * nqb + qb)
    for i in range(0, n_blocks):
        kb = tl.load(bidx_ptr + gid * sbi_g + qb * sbi_q + i)
        kpos = kb * QBLOCK + tl.arange(0, QBLOCK)
        if UNION:
            head_ok = all_heads
        else:
            head_ok = (tl.load(bm_ptr + h * sbm_h + qb * sbm_q + kb, mask=row_ok, other=0) != 0)[:, None]
        acc, l_i, m_i = _group_tile(acc, l_i, m_i, q, kpos, kpos < L, head_ok, row_pos, k_ptr, v_ptr, pages_ptr,
                                    kvh, sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d, qk_scale, dims, dim_ok,
                                    PAGE, UPCAST)
    if HAS_RANGES:
        a = q_pos0 + qb * QBLOCK
        r_end = tl.load(rcnt_ptr + gid)
        for j in range(tl.load(rfirst_ptr + gid * nqb + qb), r_end):
            kpos, key_ok = _range_keys(rng_ptr, gid * sr_g, j, a, L, BLOCK_N)
            if UNION:  # every head, except on keys the union's whole blocks already gave
                ub = tl.load(ubm_ptr + gid * subm_g + qb * subm_q + kpos // QBLOCK, mask=key_ok, other=0)
                head_ok = all_heads & (ub == 0)[None, :]
            else:
                bits = tl.load(rbits_ptr + gid * srb_g + (kpos - a + L), mask=key_ok, other=0)
                head_ok = ((bits[None, :] >> hrow[:, None]) & 1) != 0
            acc, l_i, m_i = _group_tile(acc, l_i, m_i, q, kpos, key_ok, head_ok, row_pos, k_ptr, v_ptr, pages_ptr,
                                        kvh, sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d, qk_scale, dims, dim_ok,
                                        PAGE, UPCAST)
    if HAS_COLS:
        n_cols = tl.load(ccnt_ptr + gid * nqb + qb)
        for c0 in range(0, n_cols, BLOCK_N):
            c = c0 + tl.arange(0, BLOCK_N)
            key_ok = c < n_cols
            kpos = tl.load(cidx_ptr + gid * sc_g + qb * sc_q + c, mask=key_ok, other=0)
            if UNION:
                head_ok = all_heads
            else:
                bits = tl.load(cbits_ptr + gid * sc_g + qb * sc_q + c, mask=key_ok, other=0)
                head_ok = ((bits[None, :] >> hrow[:, None]) & 1) != 0
            acc, l_i, m_i = _group_tile(acc, l_i, m_i, q, kpos, key_ok, head_ok, row_pos, k_ptr, v_ptr, pages_ptr,
                                        kvh, sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d, qk_scale, dims, dim_ok,
                                        PAGE, UPCAST)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(o_ptr + rows[:, None] * so_t + h[:, None] * so_h + dims[None, :], out.to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None] & dim_ok[None, :])


def group_config(group: int, head_dim: int) -> dict:
    """Default tile config of the group kernel: ~128 stacked rows (BLOCK_M rows x the group, padded to a
    power of two), 64-key tiles. Chosen by measurement on the H100 (benchmarks/kernels/sparse_prefill_bench)."""
    gp = triton.next_power_of_2(group)
    block_m = max(16, min(BLOCK, 128 // gp))
    rows = block_m * gp
    return {"block_m": block_m, "block_n": 64, "num_warps": 8 if rows >= 128 else 4, "num_stages": 2}


def sparse_attention_paged_group(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                                 pages: torch.Tensor, index: SparseIndex, geom: ChunkGeometry, scale: float,
                                 out: torch.Tensor | None = None, max_blocks: int | None = None,
                                 num_warps: int | None = None, num_stages: int | None = None,
                                 block_m: int | None = None, block_n: int | None = None, union: bool = False,
                                 gindex: GroupIndex | None = None, share_kv: bool = True) -> torch.Tensor:
    """The group kernel (arguments and result as sparse_attention_paged): one program per (row tile, KV head)
    reads each K/V tile once for all the group's query heads, and its tensor cores compute the group's union
    of keys for every head. ``union=False`` counts exactly the index's pairs per head (the same function as
    the per-head kernel and reference.sparse_attention); ``union=True`` lets every head of a group attend
    the group's union (group_index.union_index). ``gindex``: a prebuilt group_index(..., tile=block_n,
    union=union). ``share_kv=False``: one program per query head instead (groups of 1, no union: the
    per-head kernel's work with this kernel's tiles). It can only beat the per-head kernel where a group's
    heads select mostly the same keys (benchmarks/kernels/SPARSE_PREFILL_GROUP_NOTES.md: on the benchmark's
    synthetic Q/K their union is 1.6-2.4x a head's keys and it measured 0.42-0.64x of the per-head speed)."""
    n, Hq, d = q.shape
    kv_div = 1 if share_kv else Hq // key_cache.shape[1]
    Hkv = key_cache.shape[1] * kv_div  # programs per row tile
    group = Hq // Hkv
    cfg = group_config(group, d)
    block_m = block_m or cfg["block_m"]
    block_n = block_n or cfg["block_n"]
    if BLOCK % block_m or block_n % BLOCK:
        raise ValueError(f"block_m must divide {BLOCK}, block_n be a multiple of it")
    out = torch.empty_like(q) if out is None else out
    gi = gindex if gindex is not None else group_index(index, geom, group, tile=block_n, union=union,
                                                       max_blocks=max_blocks)
    if gi.union != union or gi.group != group:
        raise ValueError("gindex was built for another group or mode")
    bm = index.block_mask.view(torch.int8) if index.block_mask.dtype == torch.bool else index.block_mask
    pages = pages.to(torch.int32).contiguous()
    n_tiles = -(-n // block_m)
    _group_attn_kernel[(n_tiles, Hkv)](
        q, key_cache, value_cache, out, pages, bm, gi.block_union, gi.block_ids, gi.block_count, gi.ranges, gi.range_count,
        gi.range_first, gi.range_bits, gi.cols, gi.col_bits, gi.col_count,
        q.stride(0), q.stride(1), *key_cache.stride(), *value_cache.stride(), out.stride(0), out.stride(1),
        bm.stride(0), bm.stride(1), gi.block_union.stride(0), gi.block_union.stride(1), gi.block_ids.stride(0), gi.block_ids.stride(1), gi.ranges.stride(0),
        gi.range_bits.stride(0), gi.cols.stride(0), gi.cols.stride(1), geom.nqb, n_tiles, n, geom.L, geom.q_pos0,
        scale, group, kv_div,
        HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_M=block_m,
        GROUP_P=triton.next_power_of_2(group), BLOCK_N=block_n,
        QBLOCK=BLOCK, PAGE=key_cache.shape[2], UNION=union, HAS_RANGES=index.ranges.shape[1] > 0,
        HAS_COLS=index.cols.shape[-1] > 0, UPCAST=_INTERPRET,
        num_warps=num_warps or cfg["num_warps"], num_stages=num_stages or cfg["num_stages"])
    return out


@triton.jit
def _shared_tile(acc, l_i, m_i, q, kpos, key_ok, row_pos, k_ptr, v_ptr, pages_ptr, kvh, sk_b, sk_h, sk_t, sk_d,
                 sv_b, sv_h, sv_t, sv_d, qk_scale, dims, dim_ok, PAGE: tl.constexpr, MASKED: tl.constexpr,
                 UPCAST: tl.constexpr):
    """One online-softmax step of the stacked Q tile over BLOCK_N keys. MASKED=False: the caller proved every
    key valid and visible to every row of the tile (an interior tile): no load masks, no score masking."""
    if MASKED:
        page = tl.load(pages_ptr + kpos // PAGE, mask=key_ok, other=0).to(tl.int64)
    else:
        page = tl.load(pages_ptr + kpos // PAGE).to(tl.int64)
    slot = kpos % PAGE
    k_off = (page * sk_b + kvh * sk_h + slot * sk_t)[:, None] + dims[None, :] * sk_d
    v_off = (page * sv_b + kvh * sv_h + slot * sv_t)[:, None] + dims[None, :] * sv_d
    if MASKED:
        kd_ok = key_ok[:, None] & dim_ok[None, :]
        k = tl.load(k_ptr + k_off, mask=kd_ok, other=0.0)
        v = tl.load(v_ptr + v_off, mask=kd_ok, other=0.0)
    else:
        k = tl.load(k_ptr + k_off, mask=dim_ok[None, :], other=0.0)
        v = tl.load(v_ptr + v_off, mask=dim_ok[None, :], other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, tl.trans(k)) * qk_scale  # fp32 accumulate, exp2 domain
    if MASKED:
        s = tl.where(key_ok[None, :] & (kpos[None, :] <= row_pos[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:  # every score finite: the running max is too
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = m_new
    return _online_softmax_update(acc, l_i, m_i, m_new, m_safe, s, v)


@triton.jit
def _shared_group_attn_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr, pages_ptr, bidx_ptr, bcnt_ptr, rng_ptr, rcnt_ptr, rfirst_ptr, cidx_ptr, ccnt_ptr,
        sq_t, sq_h, sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d, so_t, so_h, sbi_g, sbi_q, sr_h, sc_h, sc_q,
        nqb, n_tiles, n, L, q_pos0, scale, group,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, GROUP_P: tl.constexpr,
        QBLOCK: tl.constexpr, PAGE: tl.constexpr, HAS_RANGES: tl.constexpr, HAS_COLS: tl.constexpr,
        UPCAST: tl.constexpr):
    """One program per (tile of BLOCK_M rows, KV head) over a group-shared index (every query head of the group
    selects the same keys; the entries of the group's first head are read): the Q tile stacks the group's
    heads (row r of head j at r * GROUP_P + j), each K/V tile is read once, and the tensor cores compute
    exactly one head's pairs per head. Only tiles that reach past the tile's first row (the diagonal), past
    the sequence start or end, or are partial, apply masks; interior tiles skip the mask arithmetic."""
    t = n_tiles - 1 - tl.program_id(0)  # the last row tiles see the most keys: start them first
    kvh = tl.program_id(1)
    h0 = kvh * group  # the index entries of the group (all its heads hold the same)
    qb = (t * BLOCK_M) // QBLOCK
    q, rows, hrow, row_ok, row_pos, h, dims, dim_ok = _stacked_q_tile(
        q_ptr, t, h0, group, n, q_pos0, sq_t, sq_h, HEAD_DIM, BLOCK_D, BLOCK_M, GROUP_P, UPCAST)
    first_pos = q_pos0 + t * BLOCK_M  # the tile's first row: keys at or before it are visible to all its rows
    qk_scale = scale * 1.4426950408889634
    m_i = tl.full([BLOCK_M * GROUP_P], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M * GROUP_P], tl.float32)
    acc = tl.zeros([BLOCK_M * GROUP_P, BLOCK_D], tl.float32)
    offs = tl.arange(0, QBLOCK)
    n_blocks = tl.load(bcnt_ptr + kvh * nqb + qb)  # block ids are compacted per group
    for i in range(0, n_blocks):
        kb = tl.load(bidx_ptr + kvh * sbi_g + qb * sbi_q + i)
        kpos = kb * QBLOCK + offs
        if kb * QBLOCK + QBLOCK - 1 <= first_pos:
            acc, l_i, m_i = _shared_tile(acc, l_i, m_i, q, kpos, kpos < L, row_pos, k_ptr, v_ptr, pages_ptr, kvh,
                                         sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d, qk_scale, dims, dim_ok,
                                         PAGE, False, UPCAST)
        else:
            acc, l_i, m_i = _shared_tile(acc, l_i, m_i, q, kpos, kpos < L, row_pos, k_ptr, v_ptr, pages_ptr, kvh,
                                         sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d, qk_scale, dims, dim_ok,
                                         PAGE, True, UPCAST)
    if HAS_RANGES:
        a = q_pos0 + qb * QBLOCK
        r_end = tl.load(rcnt_ptr + h0)
        for j in range(tl.load(rfirst_ptr + h0 * nqb + qb), r_end):
            start = a + tl.load(rng_ptr + h0 * sr_h + 2 * j)
            stop = a + tl.load(rng_ptr + h0 * sr_h + 2 * j + 1)
            kpos = start + offs
            if (start >= 0) & (stop - start == QBLOCK) & (stop - 1 <= first_pos):
                acc, l_i, m_i = _shared_tile(acc, l_i, m_i, q, kpos, kpos < stop, row_pos, k_ptr, v_ptr, pages_ptr,
                                             kvh, sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d, qk_scale, dims,
                                             dim_ok, PAGE, False, UPCAST)
            else:
                key_ok = (kpos >= 0) & (kpos < stop) & (kpos < L)
                acc, l_i, m_i = _shared_tile(acc, l_i, m_i, q, kpos, key_ok, row_pos, k_ptr, v_ptr, pages_ptr,
                                             kvh, sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d, qk_scale, dims,
                                             dim_ok, PAGE, True, UPCAST)
    if HAS_COLS:
        n_cols = tl.load(ccnt_ptr + h0 * nqb + qb)
        col_base = cidx_ptr + h0 * sc_h + qb * sc_q
        for c0 in range(0, n_cols, QBLOCK):
            c = c0 + offs
            key_ok = c < n_cols
            kpos = tl.load(col_base + c, mask=key_ok, other=0)
            # columns ascend: a whole tile whose last column is visible to the first row needs no mask
            last = tl.load(col_base + tl.minimum(c0 + QBLOCK, n_cols) - 1)
            if (c0 + QBLOCK <= n_cols) & (last <= first_pos):
                acc, l_i, m_i = _shared_tile(acc, l_i, m_i, q, kpos, key_ok, row_pos, k_ptr, v_ptr, pages_ptr, kvh,
                                             sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d, qk_scale, dims, dim_ok,
                                             PAGE, False, UPCAST)
            else:
                acc, l_i, m_i = _shared_tile(acc, l_i, m_i, q, kpos, key_ok, row_pos, k_ptr, v_ptr, pages_ptr, kvh,
                                             sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d, qk_scale, dims, dim_ok,
                                             PAGE, True, UPCAST)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(o_ptr + rows[:, None] * so_t + h[:, None] * so_h + dims[None, :], out.to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None] & dim_ok[None, :])


def sparse_attention_paged_shared(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                                  pages: torch.Tensor, index: SparseIndex, geom: ChunkGeometry, scale: float,
                                  out: torch.Tensor | None = None, max_blocks: int | None = None,
                                  num_warps: int | None = None, num_stages: int | None = None,
                                  block_m: int | None = None) -> torch.Tensor:
    """The shared group kernel (arguments and result as sparse_attention_paged) for a group-shared index:
    build_index(..., IndexOptions(group_shared_selection=True)) with a plan whose KV groups each use one pattern
    and budgets (LayerPlan.group_uniform). The index of each group's first query head is used for all its heads,
    so an index that is not group-shared gives those heads the wrong keys (SparseIndex.is_group_shared checks,
    with a sync)."""
    n, Hq, d = q.shape
    Hkv = key_cache.shape[1]
    group = Hq // Hkv
    cfg = group_config(group, d)
    block_m = block_m or cfg["block_m"]
    if BLOCK % block_m:
        raise ValueError(f"block_m must divide {BLOCK}, got {block_m}")
    out = torch.empty_like(q) if out is None else out
    bidx, bcnt = compact_blocks(index.block_mask[::group], max_blocks)  # one row per group
    cols = index.cols.to(torch.int32).contiguous()
    if cols.shape[-1] == 0:
        cols = torch.zeros(Hq, geom.nqb, 1, dtype=torch.int32, device=q.device)
    ccnt = index.col_count.to(torch.int32).contiguous()
    ranges = index.ranges.to(torch.int32).contiguous()
    if ranges.shape[1] == 0:
        ranges = torch.zeros(Hq, 1, 2, dtype=torch.int32, device=q.device)
    rcnt = index.range_count.to(torch.int32).contiguous()
    rfirst = index.range_first.to(torch.int32).contiguous()
    pages = pages.to(torch.int32).contiguous()
    n_tiles = -(-n // block_m)
    _shared_group_attn_kernel[(n_tiles, Hkv)](
        q, key_cache, value_cache, out, pages, bidx, bcnt, ranges, rcnt, rfirst, cols, ccnt,
        q.stride(0), q.stride(1), *key_cache.stride(), *value_cache.stride(), out.stride(0), out.stride(1),
        bidx.stride(0), bidx.stride(1), ranges.stride(0), cols.stride(0), cols.stride(1),
        geom.nqb, n_tiles, n, geom.L, geom.q_pos0, scale, group,
        HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_M=block_m,
        GROUP_P=triton.next_power_of_2(group), QBLOCK=BLOCK, PAGE=key_cache.shape[2],
        HAS_RANGES=index.ranges.shape[1] > 0, HAS_COLS=index.cols.shape[-1] > 0, UPCAST=_INTERPRET,
        num_warps=num_warps or cfg["num_warps"], num_stages=num_stages or cfg["num_stages"])
    return out


KERNELS = {"per_head": sparse_attention_paged_per_head, "group": sparse_attention_paged_group,
           "group_shared": sparse_attention_paged_shared}
# Measured faster on the H100 at 32K-128K with the benchmark's vertical-slash index
# (benchmarks/kernels/SPARSE_PREFILL_GROUP_NOTES.md).
DEFAULT_KERNEL = "per_head"


def sparse_attention_paged(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                           pages: torch.Tensor, index: SparseIndex, geom: ChunkGeometry, scale: float,
                           out: torch.Tensor | None = None, max_blocks: int | None = None, kernel: str | None = None,
                           **options) -> torch.Tensor:
    """q [n, Hq, d]; key/value_cache [num_blocks, Hkv, page_size, d] (any strides); pages: the sequence's
    physical block ids; index over this chunk -> out [n, Hq, d]. ``kernel``: "per_head" (default), "group" or
    "group_shared" (a group-shared index only: sparse_attention_paged_shared);
    ``options``: that kernel's tile/launch options (num_warps, num_stages; block_m, block_n, union)."""
    return KERNELS[kernel or DEFAULT_KERNEL](q, key_cache, value_cache, pages, index, geom, scale, out, max_blocks,
                                             **options)


def sparse_prefill_paged(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, pages: torch.Tensor,
                         geom: ChunkGeometry, plan: LayerPlan, scale: float, out: torch.Tensor,
                         options: IndexOptions = IndexOptions()) -> torch.Tensor:
    """The CUDA path of one chunk: index from the chunk's queries and the sequence's keys (build_index with
    ``options``), then the kernel. Returns the computed (query, key) pairs as a device scalar (read back later,
    outside forward). Of ``options``, two act here too: ``group_shared_selection``: where every group's heads
    share a pattern and budgets, the shared group kernel. ``fused_estimate``: vertical-slash estimates from the
    paged cache in place (estimate_kernels.py) instead of from a copy of the sequence's keys."""
    keys = PagedKeys(key_cache, pages, geom.L)
    # copy: [Hkv, L, d] contiguous per KV head (what the torch estimate's matmuls read), viewed as [L, Hkv, d]
    k = keys if options.fused_estimate else keys.heads().transpose(0, 1)
    with record_function("kvplug.sparse_prefill.index"):  # host time of each part, named in a profile
        index = build_index(q, k, geom, plan, scale, options, trim_columns=False)
    shared_kernel = options.group_shared_selection and plan.group_uniform(q.shape[1] // key_cache.shape[1])
    with record_function("kvplug.sparse_prefill.attend"):
        sparse_attention_paged(q, key_cache, value_cache, pages, index, geom, scale, out,
                               kernel="group_shared" if shared_kernel else None)
    return index.computed_pairs(geom).sum()
