"""Triton: one retrieval-decode step over a paged KV cache (Quest scoring, top-k, flash-decoding attention).

1. ``_masked_score_kernel``: Quest bounds of every block-table entry straight from the summaries (no gather),
   with sink/recent blocks forced (+inf), blocks beyond the sequence invalid (-inf), and sequences below
   min_context forced whole (they decode densely);
2. ``torch.topk`` (sorted) over the fixed table width;
3. ``_topk_decode_kernel``: one program per (sequence, kv-head, split) walks its share of the top-k slots
   ``TILE_BLOCKS`` at a time, reading each block through the block table, keeping an online softmax for all
   query heads of the GQA group (they share the blocks); a slot counts if its rank is within the sequence's
   budget (computed in-kernel from seq_lens) and its score is finite;
4. ``_merge_kernel``: merges the splits into the output rows.
Shapes depend only on (N, Hkv, table width, k): the step is CUDA-graph capturable. Also runs under
``TRITON_INTERPRET=1`` on CPU (tests compare it with the torch selection + ``reference``).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# --- fused CUDA decode step: 3 Triton launches + one torch.topk, all fixed-shape --------------------------
# Under full CUDA graphs every small kernel costs a few microseconds of serialized launch, which at batch 1
# is more than the KV bytes the selection saves; so budgets, forced blocks and validity are computed inside
# the kernels from seq_lens (no torch glue), and the split merge writes straight into the output rows.

@triton.jit
def _budget_blocks(seq_len, nb, BLOCK_SIZE: tl.constexpr, BUDGET_TOKENS: tl.constexpr, FRACTION: tl.constexpr,
                   MIN_BLOCKS: tl.constexpr, MIN_CONTEXT: tl.constexpr):
    if FRACTION > 0:
        tokens = tl.ceil(seq_len.to(tl.float64) * FRACTION).to(tl.int64)
    else:
        tokens = seq_len.to(tl.int64) * 0 + BUDGET_TOKENS
    blocks = tl.maximum((tokens + BLOCK_SIZE - 1) // BLOCK_SIZE, MIN_BLOCKS)
    return tl.where(seq_len < MIN_CONTEXT, nb, tl.minimum(blocks, nb))


@triton.jit
def _masked_score_kernel(
    Q, KMIN, KMAX, TABLE, SEQ_LENS, SCORES,
    stride_qn, stride_qh, stride_sb, stride_sh, stride_tn, stride_on, stride_oh,
    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    WIDTH: tl.constexpr, TILE: tl.constexpr, REDUCE_MAX: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    SINK_BLOCKS: tl.constexpr, RECENT_BLOCKS: tl.constexpr, MIN_CONTEXT: tl.constexpr, DOT_FP32: tl.constexpr,
):
    pid_nh = tl.program_id(0)
    tile = tl.program_id(1)
    n = pid_nh // NUM_KV_HEADS
    h = pid_nh % NUM_KV_HEADS
    seq_len = tl.load(SEQ_LENS + n).to(tl.int64)
    nb = (seq_len + BLOCK_SIZE - 1) // BLOCK_SIZE
    b = tile * TILE + tl.arange(0, TILE)
    in_seq = b < nb
    forced = (b < SINK_BLOCKS) | (b >= nb - RECENT_BLOCKS) | (seq_len < MIN_CONTEXT)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + n * stride_qn + (h * GROUP + g)[:, None] * stride_qh + d[None, :], mask=(g < GROUP)[:, None],
                other=0.0).to(tl.float32)
    need = in_seq & (forced == 0)  # (not "~": the interpreter turns ~bool into an int mask)
    phys = tl.load(TABLE + n * stride_tn + b, mask=need, other=0).to(tl.int64)
    s_ptrs = phys[:, None] * stride_sb + h * stride_sh + d[None, :]
    kmin = tl.load(KMIN + s_ptrs, mask=need[:, None], other=0.0).to(tl.float32)
    kmax = tl.load(KMAX + s_ptrs, mask=need[:, None], other=0.0).to(tl.float32)
    empty = tl.max(kmax, axis=1) == float("-inf")  # a block never written (e.g. loaded behind our back)
    kmin = tl.where(kmin == float("inf"), 0.0, kmin)
    kmax = tl.where(kmax == float("-inf"), 0.0, kmax)
    pos = tl.maximum(q, 0.0)
    neg = tl.minimum(q, 0.0)
    if DOT_FP32:
        s = tl.dot(pos, tl.trans(kmax), input_precision="ieee") + tl.dot(neg, tl.trans(kmin), input_precision="ieee")
    else:
        s = tl.dot(pos, tl.trans(kmax)) + tl.dot(neg, tl.trans(kmin))
    live_g = (g < GROUP)[:, None]
    if REDUCE_MAX:
        r = tl.max(tl.where(live_g, s, float("-inf")), axis=0)
    else:
        r = tl.sum(tl.where(live_g, s, 0.0), axis=0)
    r = tl.where(empty, -1e30, r)
    r = tl.where(forced, float("inf"), r)
    r = tl.where(in_seq, r, float("-inf"))
    tl.store(SCORES + n * stride_on + h * stride_oh + b, r, mask=b < WIDTH)


@triton.jit
def _topk_decode_kernel(
    Q, K, V, TABLE, TOP_IDX, TOP_VAL, SEQ_LENS, M_OUT, L_OUT, ACC_OUT,
    scale,
    stride_qn, stride_qh, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt, stride_tn,
    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, NUM_SEL: tl.constexpr, BLOCKS_PER_SPLIT: tl.constexpr, TILE_BLOCKS: tl.constexpr,
    NUM_SPLITS: tl.constexpr, BUDGET_TOKENS: tl.constexpr, FRACTION: tl.constexpr, MIN_BLOCKS: tl.constexpr,
    MIN_CONTEXT: tl.constexpr, DOT_FP32: tl.constexpr,
):
    pid_nh = tl.program_id(0)
    split = tl.program_id(1)
    n = pid_nh // NUM_KV_HEADS
    h = pid_nh % NUM_KV_HEADS
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + n * stride_qn + (h * GROUP + g)[:, None] * stride_qh + d[None, :], mask=(g < GROUP)[:, None],
                other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    seq_len = tl.load(SEQ_LENS + n).to(tl.int64)
    nb = (seq_len + BLOCK_SIZE - 1) // BLOCK_SIZE
    budget = _budget_blocks(seq_len, nb, BLOCK_SIZE, BUDGET_TOKENS, FRACTION, MIN_BLOCKS, MIN_CONTEXT)
    TILE: tl.constexpr = TILE_BLOCKS * BLOCK_SIZE
    t = tl.arange(0, TILE)
    slot_in_tile = t // BLOCK_SIZE
    offset = t % BLOCK_SIZE
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    sel_base = (n * NUM_KV_HEADS + h) * NUM_SEL
    first = split * BLOCKS_PER_SPLIT
    for i in range(0, BLOCKS_PER_SPLIT, TILE_BLOCKS):
        rank = first + i + slot_in_tile  # top-k output is sorted: rank < budget is this sequence's share
        in_range = (rank < NUM_SEL) & (i + slot_in_tile < BLOCKS_PER_SPLIT) & (rank < budget)
        # Every load in this loop is unmasked at a clamped, always-valid index (rank 0, logical block 0, the
        # physical block in table column 0) and dead lanes are masked only in the scores: masked loads here
        # broke Triton 3.6's layout passes on sm_90 ("mask type matches ptr type" / RemoveLayoutConversions).
        safe_rank = tl.where(in_range, rank, 0)
        score = tl.where(in_range, tl.load(TOP_VAL + sel_base + safe_rank), float("-inf"))
        logical = tl.load(TOP_IDX + sel_base + safe_rank).to(tl.int64)
        pos = logical * BLOCK_SIZE + offset
        live = in_range & (score > float("-inf")) & (pos < seq_len)
        phys = tl.load(TABLE + n * stride_tn + tl.where(live, logical, 0)).to(tl.int64)
        k = tl.load(K + phys[:, None] * stride_kb + h * stride_kh + offset[:, None] * stride_kt + d[None, :])
        v = tl.load(V + phys[:, None] * stride_vb + h * stride_vh + offset[:, None] * stride_vt + d[None, :])
        if DOT_FP32:
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee") * scale
        else:
            s = tl.dot(q, tl.trans(k.to(q.dtype))).to(tl.float32) * scale
        s = tl.where(live[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        if DOT_FP32:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
    out_base = ((n * NUM_KV_HEADS + h) * NUM_SPLITS + split) * GROUP_PAD
    tl.store(M_OUT + out_base + g, m_i)
    tl.store(L_OUT + out_base + g, l_i)
    tl.store(ACC_OUT + (out_base + g)[:, None] * HEAD_DIM + d[None, :], acc)


@triton.jit
def _merge_kernel(M, L, ACC, OUT, stride_on, stride_oh, NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr,
                  GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr,
                  SPLITS_PAD: tl.constexpr):
    pid_nh = tl.program_id(0)
    n = pid_nh // NUM_KV_HEADS
    h = pid_nh % NUM_KV_HEADS
    sp = tl.arange(0, SPLITS_PAD)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    base = pid_nh * NUM_SPLITS * GROUP_PAD
    ml = base + sp[:, None] * GROUP_PAD + g[None, :]  # [S, G]
    ok = sp[:, None] < NUM_SPLITS
    m = tl.load(M + ml, mask=ok, other=float("-inf"))
    l = tl.load(L + ml, mask=ok, other=0.0)
    m_max = tl.max(m, axis=0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp(m - m_max[None, :])  # [S, G]
    denom = tl.sum(l * w, axis=0)
    denom = tl.where(denom > 0, denom, 1.0)
    gi = tl.arange(0, GROUP_PAD)
    for j in range(GROUP):
        # column j of [S, G] weights, without a dynamic index: select it with a mask
        wj = tl.sum(tl.where(gi[None, :] == j, w, 0.0), axis=1)  # [S]
        dj = tl.sum(tl.where(gi == j, denom, 0.0), axis=0)
        a = tl.load(ACC + (base + sp[:, None] * GROUP_PAD + j) * HEAD_DIM + d[None, :], mask=ok, other=0.0)
        o = tl.sum(a * wj[:, None], axis=0) / dj
        tl.store(OUT + n * stride_on + (h * GROUP + j) * stride_oh + d, o.to(OUT.dtype.element_ty))


def retrieval_decode(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, kmin: torch.Tensor,
                     kmax: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor, params, k: int,
                     scale: float, out: torch.Tensor | None = None, num_splits: int | None = None,
                     tile_blocks: int | None = None, score_tile: int = 64) -> torch.Tensor:
    """One decode step of retrieval attention on the GPU: q [N, Hq, D] (one token per sequence), key/value
    caches as [num_blocks, Hkv, block_size, D] views, summaries [num_blocks+1, Hkv, D], block_table [N, B],
    seq_lens [N]; ``params`` a planner.RetrievalParams, ``k`` the fixed selection slots. Writes into ``out``
    ([N, Hq, D], any row stride) if given. Sequences below params.min_context_tokens read all their blocks
    (k must cover them: planner.graph_k)."""
    N, Hq, D = q.shape
    _, Hkv, bs, _ = key_cache.shape
    B = block_table.shape[1]
    G = Hq // Hkv
    g_pad = max(16, triton.next_power_of_2(G))
    k = min(k, B)
    dot_fp32 = _INTERPRET or q.dtype == torch.float32
    q = q.contiguous()
    scores = torch.empty(N, Hkv, B, dtype=torch.float32, device=q.device)
    _masked_score_kernel[(N * Hkv, triton.cdiv(B, score_tile))](
        q, kmin, kmax, block_table, seq_lens, scores,
        q.stride(0), q.stride(1), kmin.stride(0), kmin.stride(1), block_table.stride(0), scores.stride(0),
        scores.stride(1),
        NUM_KV_HEADS=Hkv, GROUP=G, GROUP_PAD=g_pad, HEAD_DIM=D, WIDTH=B, TILE=score_tile,
        REDUCE_MAX=params.gqa_reduce == "max", BLOCK_SIZE=bs, SINK_BLOCKS=params.sink_blocks,
        RECENT_BLOCKS=params.recent_blocks, MIN_CONTEXT=params.min_context_tokens, DOT_FP32=True)
    top_val, top_idx = torch.topk(scores, k, dim=-1, sorted=True)
    tile_blocks = tile_blocks or max(1, 64 // bs)
    if num_splits is None:
        num_splits = max(1, min(16, triton.cdiv(k, 2 * tile_blocks)))
    per_split = triton.cdiv(triton.cdiv(k, num_splits), tile_blocks) * tile_blocks
    num_splits = triton.cdiv(k, per_split)
    m = torch.empty(N, Hkv, num_splits, g_pad, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    acc = torch.empty(N, Hkv, num_splits, g_pad, D, dtype=torch.float32, device=q.device)
    _topk_decode_kernel[(N * Hkv, num_splits)](
        q, key_cache, value_cache, block_table, top_idx, top_val, seq_lens, m, l, acc, scale,
        q.stride(0), q.stride(1), key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2), block_table.stride(0),
        NUM_KV_HEADS=Hkv, GROUP=G, GROUP_PAD=g_pad, HEAD_DIM=D, BLOCK_SIZE=bs, NUM_SEL=k,
        BLOCKS_PER_SPLIT=per_split, TILE_BLOCKS=tile_blocks, NUM_SPLITS=num_splits,
        BUDGET_TOKENS=params.budget_tokens, FRACTION=float(params.budget_fraction),
        MIN_BLOCKS=params.sink_blocks + params.recent_blocks, MIN_CONTEXT=params.min_context_tokens,
        DOT_FP32=dot_fp32)
    if out is None:
        out = torch.empty(N, Hq, D, dtype=q.dtype, device=q.device)
    _merge_kernel[(N * Hkv,)](m, l, acc, out, out.stride(0), out.stride(1), NUM_KV_HEADS=Hkv, GROUP=G,
                              GROUP_PAD=g_pad, HEAD_DIM=D, NUM_SPLITS=num_splits,
                              SPLITS_PAD=max(2, triton.next_power_of_2(num_splits)))
    return out
