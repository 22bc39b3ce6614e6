"""Vertical-slash estimation straight from the paged KV cache: the chunk's last LAST_Q queries against every
key of the sequence, read through the block table inside Triton (no ``key_cache[pages]`` copy of the
sequence's K), with the column and diagonal vote reductions fused into the same pass.

Two launches per call, no torch ops in between:
  1. _row_stats_kernel, one program per (head, key split): the online softmax max / sum of each voting row
     over its split's keys (partials [h, S, LAST_Q]);
  2. _line_votes_kernel, same grid: combines the partials in registers, recomputes the scores, normalizes
     them, writes each key's column vote (each key belongs to one tile: a plain store) and adds each
     diagonal's vote. Diagonals: a tile of LAST_Q rows x BLOCK_N keys crosses BLOCK_N + LAST_Q - 1
     diagonals; the tile is stored skewed (row r shifted by LAST_Q - 1 - r) into the program's scratch row
     in global memory (L2), read back straight and summed over rows, so each diagonal costs one atomic add
     per tile instead of one per (row, key).
Same result as vertical_slash.estimate_lines on the gathered keys (fp32 accumulation; summation order and
the dtype of the scores differ: tests compare with a tolerance).

Why no pooled per-physical-block key statistics for later chunks: vertical-slash votes are per key column
and per diagonal of this chunk's last queries (a different query set every chunk), so a per-block summary
(mean or max key of 16 tokens) cannot give them; it would serve block-sparse's pooled scores, whose pooling
of the context is a fraction of this pass. A later chunk still reads the context's keys once per layer, but
in place (no copy), in parallel over key splits.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from attention_backends.sparse_prefill.index import ChunkGeometry
from attention_backends.sparse_prefill.paged_keys import PagedKeys

_LOG2E = 1.4426950408889634


@triton.jit
def _scores(q, k_ptr, pages_ptr, kvh, kpos, key_ok, row_pos, row_ok, sk_b, sk_h, sk_t, sk_d, dims, dim_ok, qk_scale,
            PAGE: tl.constexpr, UPCAST: tl.constexpr):
    """[LAST_Q, BLOCK_N] scores (exp2 domain) of the voting rows against keys ``kpos`` read through the page table;
    -inf where the key is out of range or after the row."""
    page = tl.load(pages_ptr + kpos // PAGE, mask=key_ok, other=0).to(tl.int64)
    slot = kpos % PAGE
    kt = tl.load(k_ptr + (page * sk_b + kvh * sk_h + slot * sk_t)[None, :] + dims[:, None] * sk_d,
                 mask=key_ok[None, :] & dim_ok[:, None], other=0.0)  # [BLOCK_D, BLOCK_N]
    if UPCAST:
        kt = kt.to(tl.float32)
    s = tl.dot(q, kt) * qk_scale
    ok = key_ok[None, :] & row_ok[:, None] & (kpos[None, :] <= row_pos[:, None])
    return tl.where(ok, s, float("-inf"))


@triton.jit
def _voting_rows(q_ptr, kv_ptr, i, sq_h, sq_t, n, last, L, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                 LAST_Q: tl.constexpr, UPCAST: tl.constexpr):
    """Head ``i``'s last ``last`` query rows (padded to LAST_Q): (q, r, row_ok, row_pos, its KV head, dims, dim_ok)."""
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    r = tl.arange(0, LAST_Q)
    row_ok = r < last
    q = tl.load(q_ptr + i * sq_h + (n - last + r)[:, None] * sq_t + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    return q, r, row_ok, L - last + r, tl.load(kv_ptr + i), dims, dim_ok


@triton.jit
def _row_stats_kernel(q_ptr, kv_ptr, k_ptr, pages_ptr, m_ptr, l_ptr, sq_h, sq_t, sk_b, sk_h, sk_t, sk_d, n, last, L,
                      tiles_per_split, n_splits, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                      LAST_Q: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr, UPCAST: tl.constexpr):
    i = tl.program_id(0)
    split = tl.program_id(1)
    q, r, row_ok, row_pos, kvh, dims, dim_ok = _voting_rows(q_ptr, kv_ptr, i, sq_h, sq_t, n, last, L, HEAD_DIM,
                                                            BLOCK_D, LAST_Q, UPCAST)
    m_i = tl.full([LAST_Q], float("-inf"), tl.float32)
    l_i = tl.zeros([LAST_Q], tl.float32)
    for t in range(split * tiles_per_split, tl.minimum((split + 1) * tiles_per_split, tl.cdiv(L, BLOCK_N))):
        kpos = t * BLOCK_N + tl.arange(0, BLOCK_N)
        s = _scores(q, k_ptr, pages_ptr, kvh, kpos, kpos < L, row_pos, row_ok, sk_b, sk_h, sk_t, sk_d, dims, dim_ok,
                    qk_scale, PAGE, UPCAST)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), axis=1)
        m_i = m_new
    out = (i * n_splits + split) * LAST_Q + r
    tl.store(m_ptr + out, m_i)
    tl.store(l_ptr + out, l_i)


@triton.jit
def _line_votes_kernel(q_ptr, kv_ptr, k_ptr, pages_ptr, m_ptr, l_ptr, vert_ptr, slash_ptr, scratch_ptr, sq_h, sq_t,
                       sk_b, sk_h, sk_t, sk_d, n, last, L, tiles_per_split, n_splits, qk_scale,
                       HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, LAST_Q: tl.constexpr, BLOCK_N: tl.constexpr,
                       SPLITS_P: tl.constexpr, W: tl.constexpr, PAGE: tl.constexpr, UPCAST: tl.constexpr):
    i = tl.program_id(0)
    split = tl.program_id(1)
    q, r, row_ok, row_pos, kvh, dims, dim_ok = _voting_rows(q_ptr, kv_ptr, i, sq_h, sq_t, n, last, L, HEAD_DIM,
                                                            BLOCK_D, LAST_Q, UPCAST)
    # the rows' softmax max and normaliser over all splits
    sp = tl.arange(0, SPLITS_P)
    part = (i * n_splits + sp[:, None]) * LAST_Q + r[None, :]
    m_part = tl.load(m_ptr + part, mask=(sp < n_splits)[:, None], other=float("-inf"))
    l_part = tl.load(l_ptr + part, mask=(sp < n_splits)[:, None], other=0.0)
    m_row = tl.max(m_part, axis=0)
    m_row = tl.where(m_row == float("-inf"), 0.0, m_row)
    l_row = tl.sum(l_part * tl.exp2(m_part - m_row[None, :]), axis=0)
    inv_l = tl.where(row_ok & (l_row > 0), 1.0 / tl.where(l_row > 0, l_row, 1.0), 0.0)
    scratch = scratch_ptr + (i * n_splits + split) * (LAST_Q * W)  # W = BLOCK_N + LAST_Q: one skewed tile
    c = tl.arange(0, BLOCK_N)
    e = tl.arange(0, W)
    skew = r[:, None] * W + c[None, :] + (LAST_Q - 1) - r[:, None]  # row r, key c -> column c + LAST_Q - 1 - r
    straight = r[:, None] * W + e[None, :]
    c_of = e[None, :] - (LAST_Q - 1) + r[:, None]  # the key column a straight read lands on
    for t in range(split * tiles_per_split, tl.minimum((split + 1) * tiles_per_split, tl.cdiv(L, BLOCK_N))):
        k0 = t * BLOCK_N
        kpos = k0 + c
        key_ok = kpos < L
        s = _scores(q, k_ptr, pages_ptr, kvh, kpos, key_ok, row_pos, row_ok, sk_b, sk_h, sk_t, sk_d, dims, dim_ok,
                    qk_scale, PAGE, UPCAST)
        p = tl.exp2(s - m_row[:, None]) * inv_l[:, None]  # 0 where masked
        tl.store(vert_ptr + i * L + kpos, tl.sum(p, axis=0), mask=key_ok)
        # diagonal d = row_pos - key = (L - last + r) - (k0 + c); along a straight scratch row e = c - r + LAST_Q - 1
        tl.debug_barrier()  # the previous tile's reads of the scratch are done
        tl.store(scratch + skew, p)
        tl.debug_barrier()  # ... and this tile's writes are visible to the whole program
        diag = tl.sum(tl.load(scratch + straight, mask=(c_of >= 0) & (c_of < BLOCK_N), other=0.0), axis=0)
        d = (L - last + LAST_Q - 1) - k0 - e
        tl.atomic_add(slash_ptr + i * L + d, diag, mask=(d >= 0) & (d < L) & (e < BLOCK_N + LAST_Q - 1))


def estimate_lines_paged(q: torch.Tensor, k: PagedKeys, kv_ids: torch.Tensor, geom: ChunkGeometry, scale: float,
                         last_q: int = 64, block_n: int = 64, programs: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Column and diagonal attention mass [h, L] each (fp32) of the chunk's last ``last_q`` queries: q [h, n, d]
    (any strides), keys in the paged cache, kv_ids [h] each head's KV head. Keys are split over about
    ``programs`` / h programs per head (each reads its keys once per pass)."""
    h, n, d = q.shape
    L = geom.L
    if (block_n + max(16, triton.next_power_of_2(last_q))) & (block_n - 1 + max(16, triton.next_power_of_2(last_q))):
        raise ValueError(f"block_n ({block_n}) + the padded row count must be a power of two (the skewed scratch row)")
    last = min(last_q, n)
    LAST_Q = max(16, triton.next_power_of_2(last_q))
    n_tiles = -(-L // block_n)
    splits = max(1, min(n_tiles, programs // max(h, 1), 256))
    per_split = -(-n_tiles // splits)
    splits = -(-n_tiles // per_split)
    dev = q.device
    if q.stride(-1) != 1:
        q = q.contiguous()
    m_part = torch.empty(h, splits, LAST_Q, dtype=torch.float32, device=dev)
    l_part = torch.empty_like(m_part)
    vertical = torch.empty(h, L, dtype=torch.float32, device=dev)
    slash = torch.zeros(h, L, dtype=torch.float32, device=dev)
    scratch = torch.empty(h * splits, LAST_Q * (block_n + LAST_Q), dtype=torch.float32, device=dev)
    kv = kv_ids.to(torch.int32).contiguous()
    pages = k.pages.to(torch.int32).contiguous()
    kc = k.cache
    upcast = os.environ.get("TRITON_INTERPRET") == "1"  # the interpreter's bf16/fp16 dots are wrong (triton_kernels)
    common = dict(HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), LAST_Q=LAST_Q, BLOCK_N=block_n,
                  PAGE=kc.shape[2], UPCAST=upcast)
    args = (q.stride(0), q.stride(1), *kc.stride(), n, last, L, per_split, splits, scale * _LOG2E)
    _row_stats_kernel[(h, splits)](q, kv, kc, pages, m_part, l_part, *args, **common, num_warps=4)
    _line_votes_kernel[(h, splits)](q, kv, kc, pages, m_part, l_part, vertical, slash, scratch, *args,
                                    SPLITS_P=triton.next_power_of_2(splits), W=block_n + LAST_Q, **common, num_warps=4)
    return vertical, slash
