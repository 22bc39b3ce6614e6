"""Triton: one retrieval-decode step over a paged KV cache (Quest scoring, top-k, flash-decoding attention),
and the per-layer block-summary update.

1. ``_masked_score_kernel``: Quest bounds of every block of a sequence straight from the summaries (no gather),
   with sink/recent blocks forced (+inf) and sequences below min_context forced whole (they decode densely).
   Tiles past a sequence's own block count exit at once: under CUDA graphs the table is as wide as
   max_model_len, and a 32K sequence must not pay for the 128K columns it does not have.
2. ``_select_kernel``: per (sequence, kv-head) the sequence's budget of best blocks, by a bisection on the
   scores' order-preserving integer keys (the budget-th largest score is the threshold; ties go to the lower
   block index), compacted in block order into the slots. It looks at the sequence's own blocks only, in
   registers; no sort, no torch.topk over the padded table width.
3. ``_topk_decode_kernel``: one program per (sequence, kv-head, split) walks its share of the selected slots
   ``TILE_BLOCKS`` at a time, reading each block through the block table, keeping an online softmax for all
   query heads of the GQA group (they share the blocks); a slot counts if its rank is within the sequence's
   budget (computed in-kernel from seq_lens);
4. ``_merge_kernel``: merges the splits into the output rows.
``_summary_update_kernel`` folds the keys of one step into the summaries (one launch instead of a dozen torch
ops per layer). Shapes depend only on (N, Hkv, table width, k): everything is CUDA-graph capturable. Also
runs under ``TRITON_INTERPRET=1`` on CPU (tests compare it with the torch selection + ``reference`` and
``summaries.update_summaries_``).
"""
from __future__ import annotations

import os
import warnings

import torch
import triton
import triton.language as tl


_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# The select's early exit (a reduction under a data-dependent branch; H100: 0.029-0.031 ms vs 0.034 for the fixed
# 32 halvings, same blocks). KVPLUG_RD_SELECT_EARLY_EXIT=0 turns it off; a compiler that rejects it falls back.
SELECT_EARLY_EXIT = os.environ.get("KVPLUG_RD_SELECT_EARLY_EXIT", "1") != "0"


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
    TILE: tl.constexpr, REDUCE_MAX: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    SINK_BLOCKS: tl.constexpr, RECENT_BLOCKS: tl.constexpr, MIN_CONTEXT: tl.constexpr, DOT_FP32: tl.constexpr,
):
    pid_nh = tl.program_id(0)
    tile = tl.program_id(1)
    n = pid_nh // NUM_KV_HEADS
    h = pid_nh % NUM_KV_HEADS
    seq_len = tl.load(SEQ_LENS + n).to(tl.int64)
    nb = (seq_len + BLOCK_SIZE - 1) // BLOCK_SIZE
    if tile * TILE < nb:  # the selection reads columns < nb only: tiles past them read and write nothing
        b = tile * TILE + tl.arange(0, TILE)
        in_seq = b < nb
        forced = (b < SINK_BLOCKS) | (b >= nb - RECENT_BLOCKS) | (seq_len < MIN_CONTEXT)
        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, HEAD_DIM)
        q = tl.load(Q + n * stride_qn + (h * GROUP + g)[:, None] * stride_qh + d[None, :],
                    mask=(g < GROUP)[:, None], other=0.0)
        need = in_seq & (forced == 0)  # (not "~": the interpreter turns ~bool into an int mask)
        phys = tl.load(TABLE + n * stride_tn + b, mask=need, other=0).to(tl.int64)
        s_ptrs = phys[:, None] * stride_sb + h * stride_sh + d[None, :]
        kmin = tl.load(KMIN + s_ptrs, mask=need[:, None], other=0.0)
        kmax = tl.load(KMAX + s_ptrs, mask=need[:, None], other=0.0)
        empty = tl.max(kmax.to(tl.float32), axis=1) == float("-inf")  # never written (e.g. loaded behind our back)
        kmin = tl.where(kmin == float("inf"), 0.0, kmin).to(KMIN.dtype.element_ty)
        kmax = tl.where(kmax == float("-inf"), 0.0, kmax).to(KMAX.dtype.element_ty)
        if DOT_FP32:
            qf = q.to(tl.float32)
            pos = tl.maximum(qf, 0.0)
            neg = tl.minimum(qf, 0.0)
            s = tl.dot(pos, tl.trans(kmax.to(tl.float32)), input_precision="ieee") \
                + tl.dot(neg, tl.trans(kmin.to(tl.float32)), input_precision="ieee")
        else:
            # 16-bit summaries and queries: products are exact in the fp32 accumulator, so tensor cores give the
            # same bound as an fp32 dot at a fraction of the cost (GROUP is padded to 16 rows for tl.dot).
            qs = q.to(kmax.dtype)
            pos = tl.maximum(qs, 0.0).to(kmax.dtype)
            neg = tl.minimum(qs, 0.0).to(kmax.dtype)
            s = tl.dot(pos, tl.trans(kmax)) + tl.dot(neg, tl.trans(kmin))
        live_g = (g < GROUP)[:, None]
        if REDUCE_MAX:
            r = tl.max(tl.where(live_g, s, float("-inf")), axis=0)
        else:
            r = tl.sum(tl.where(live_g, s, 0.0), axis=0)
        r = tl.where(empty, -1e30, r)
        r = tl.where(forced, float("inf"), r)
        tl.store(SCORES + n * stride_on + h * stride_oh + b, r, mask=in_seq)


@triton.jit
def _order_key(x):
    """float32 -> int32 with the same order (-0.0 just below +0.0)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, -(bits & 0x7FFFFFFF) - 1, bits)


@triton.jit
def _select_kernel(
    SCORES, SEQ_LENS, TOP_IDX, stride_sn, stride_sh,
    NUM_KV_HEADS: tl.constexpr, WIDTH_PAD: tl.constexpr, NUM_SEL: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BUDGET_TOKENS: tl.constexpr, FRACTION: tl.constexpr, MIN_BLOCKS: tl.constexpr, MIN_CONTEXT: tl.constexpr,
    EARLY_EXIT: tl.constexpr,
):
    pid_nh = tl.program_id(0)
    n = pid_nh // NUM_KV_HEADS
    h = pid_nh % NUM_KV_HEADS
    seq_len = tl.load(SEQ_LENS + n).to(tl.int64)
    nb = (seq_len + BLOCK_SIZE - 1) // BLOCK_SIZE
    budget = tl.minimum(_budget_blocks(seq_len, nb, BLOCK_SIZE, BUDGET_TOKENS, FRACTION, MIN_BLOCKS, MIN_CONTEXT),
                        NUM_SEL).to(tl.int32)
    b = tl.arange(0, WIDTH_PAD)
    valid = b < nb
    x = tl.load(SCORES + n * stride_sn + h * stride_sh + b, mask=valid, other=float("-inf"))
    key = _order_key(x)
    # A t with #{key >= t} == budget, else the largest t with #{key >= t} >= budget (the budget-th largest key,
    # then ties at t fill up): invariant count(lo) >= budget (lo starts below every key) and count(hi) < budget
    # (hi above every key); at most 32 halvings of the int32 range.
    lo = seq_len * 0 - 2147483648
    hi = seq_len * 0 + 2147483648
    cnt_lo = tl.sum(valid.to(tl.int32), axis=0)
    for _ in range(32):
        if EARLY_EXIT:
            # Each halving is a block-wide reduction (the select's whole cost): stop once exactly budget keys
            # are >= lo, i.e. lo fell between the budget-th and the next key (about half the halvings on
            # distinct scores; at once for rows that read every block, e.g. padding or short sequences).
            if (cnt_lo != budget) & (hi - lo > 1):
                mid = (lo + hi) >> 1
                cnt = tl.sum((valid & (key >= mid.to(tl.int32))).to(tl.int32), axis=0)
                ok = cnt >= budget
                lo = tl.where(ok, mid, lo)
                hi = tl.where(ok, hi, mid)
                cnt_lo = tl.where(ok, cnt, cnt_lo)
        else:
            mid = (lo + hi) >> 1
            cnt = tl.sum((valid & (key >= mid.to(tl.int32))).to(tl.int32), axis=0)
            ok = cnt >= budget
            lo = tl.where(ok, mid, lo)
            hi = tl.where(ok, hi, mid)
    t = lo.to(tl.int32)
    above = (valid & (key > t)).to(tl.int32)
    at = (valid & (key == t)).to(tl.int32)
    need = budget - tl.sum(above, axis=0)  # ties at t to take, lowest blocks first
    # One scan counts both: blocks above t (fewer than budget <= NUM_SEL < 2**16) in the low 16 bits, ties at t
    # before each column in the high bits (int64 once a row could hold 2**15 ties).
    packed = above + (at << 16)
    if WIDTH_PAD > 16384:
        packed = packed.to(tl.int64)
    c = tl.cumsum(packed, axis=0)
    above_before = (c & 0xFFFF) - above
    at_before = (c >> 16) - at
    take = (above > 0) | ((at > 0) & (at_before < need))
    slot = above_before + tl.minimum(at_before, need).to(tl.int32)
    tl.store(TOP_IDX + pid_nh * NUM_SEL + slot, b.to(tl.int32), mask=take & (slot < NUM_SEL))


@triton.jit
def _topk_decode_kernel(
    Q, K, V, TABLE, TOP_IDX, SEQ_LENS, M_OUT, L_OUT, ACC_OUT,
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
    budget = tl.minimum(_budget_blocks(seq_len, nb, BLOCK_SIZE, BUDGET_TOKENS, FRACTION, MIN_BLOCKS, MIN_CONTEXT),
                        NUM_SEL)
    TILE: tl.constexpr = TILE_BLOCKS * BLOCK_SIZE
    t = tl.arange(0, TILE)
    slot_in_tile = t // BLOCK_SIZE
    offset = t % BLOCK_SIZE
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    sel_base = (n * NUM_KV_HEADS + h) * NUM_SEL
    first = split * BLOCKS_PER_SPLIT
    if first < budget:  # k covers min_context's dense blocks: splits past a sequence's budget read nothing
        for i in range(0, BLOCKS_PER_SPLIT, TILE_BLOCKS):
            rank = first + i + slot_in_tile  # the selection fills slots [0, budget) of (sequence, kv-head)
            in_range = (rank < NUM_SEL) & (i + slot_in_tile < BLOCKS_PER_SPLIT) & (rank < budget)
            # Every load in this loop is unmasked at a clamped, always-valid index (slot 0, logical block 0, the
            # physical block in table column 0) and dead lanes are masked only in the scores: masked loads here
            # broke Triton 3.6's layout passes on sm_90 ("mask type matches ptr type" / RemoveLayoutConversions).
            safe_rank = tl.where(in_range, rank, 0)
            logical = tl.load(TOP_IDX + sel_base + safe_rank).to(tl.int64)
            pos = logical * BLOCK_SIZE + offset
            live = in_range & (pos < seq_len)
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
def _summary_update_kernel(KEY, SLOTS, KMIN, KMAX, num_tokens, stride_kt, stride_kh, stride_sb, stride_sh,
                           BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr):
    """One program per (token, kv-head). A step's tokens of one block are one contiguous run of consecutive
    slots (a block belongs to one request; its tokens sit together in the batch), so the run's first token
    folds the whole run in (at most BLOCK_SIZE tokens) and the others do nothing: no atomics, no races. A run
    starting at offset 0 means the block was (re)allocated: it replaces the old summary instead of merging."""
    t = tl.program_id(0)
    h = tl.program_id(1)
    slot = tl.load(SLOTS + t).to(tl.int64)
    prev = tl.load(SLOTS + tl.maximum(t - 1, 0)).to(tl.int64)
    blk = tl.where(slot >= 0, slot, 0) // BLOCK_SIZE
    prev_blk = tl.where(prev >= 0, prev, 0) // BLOCK_SIZE
    leader = (slot >= 0) & ((t == 0) | (prev < 0) | (prev_blk != blk))
    if leader:
        j = t + tl.arange(0, BLOCK_SIZE)
        sj = tl.load(SLOTS + tl.where(j < num_tokens, j, t)).to(tl.int64)
        mine = (j < num_tokens) & (sj >= 0) & (tl.where(sj >= 0, sj, 0) // BLOCK_SIZE == blk)
        d = tl.arange(0, HEAD_DIM)
        k = tl.load(KEY + tl.where(mine, j, t)[:, None] * stride_kt + h * stride_kh + d[None, :]).to(tl.float32)
        new_min = tl.min(tl.where(mine[:, None], k, float("inf")), axis=0)
        new_max = tl.max(tl.where(mine[:, None], k, float("-inf")), axis=0)
        s_ptrs = blk * stride_sb + h * stride_sh + d
        fresh = slot % BLOCK_SIZE == 0
        old_min = tl.load(KMIN + s_ptrs).to(tl.float32)
        old_max = tl.load(KMAX + s_ptrs).to(tl.float32)
        new_min = tl.where(fresh, new_min, tl.minimum(old_min, new_min))
        new_max = tl.where(fresh, new_max, tl.maximum(old_max, new_max))
        tl.store(KMIN + s_ptrs, new_min.to(KMIN.dtype.element_ty))
        tl.store(KMAX + s_ptrs, new_max.to(KMAX.dtype.element_ty))


def update_summaries(kmin: torch.Tensor, kmax: torch.Tensor, key: torch.Tensor, slot_mapping: torch.Tensor,
                     block_size: int) -> None:
    """``summaries.update_summaries_`` in one launch: key [T, Hkv, D] (T may exceed slot_mapping's length:
    vLLM pads tokens), slot_mapping [n] with -1 for padding; summaries [num_blocks + 1, Hkv, D]."""
    n = slot_mapping.shape[0]
    if n == 0:
        return
    if key.stride(-1) != 1:
        key = key.contiguous()
    hkv, d = kmin.shape[1], kmin.shape[2]
    _summary_update_kernel[(n, hkv)](key, slot_mapping, kmin, kmax, n, key.stride(0), key.stride(1),
                                     kmin.stride(0), kmin.stride(1), BLOCK_SIZE=block_size, HEAD_DIM=d)


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


def _launch_cfg(bs: int, k: int, num_splits: int | None, tile_blocks: int | None) -> tuple[int, int, int]:
    """(tile_blocks, blocks per split, splits) of the decode kernel for k selection slots."""
    tile_blocks = tile_blocks or max(1, 64 // bs)
    if num_splits is None:
        num_splits = max(1, min(16, triton.cdiv(k, 2 * tile_blocks)))
    per_split = triton.cdiv(triton.cdiv(k, num_splits), tile_blocks) * tile_blocks
    return tile_blocks, per_split, triton.cdiv(k, per_split)


def score_blocks(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, block_table: torch.Tensor,
                 seq_lens: torch.Tensor, params, score_tile: int = 64) -> torch.Tensor:
    """[N, Hkv, B] float32 Quest bounds (+inf forced); columns >= a sequence's block count are left unwritten."""
    N, Hq, D = q.shape
    Hkv = kmin.shape[1]
    G = Hq // Hkv
    B = block_table.shape[1]
    q = q.contiguous()
    scores = torch.empty(N, Hkv, B, dtype=torch.float32, device=q.device)
    dot_fp32 = _INTERPRET or kmin.dtype not in (torch.bfloat16, torch.float16) or q.dtype != kmin.dtype
    _masked_score_kernel[(N * Hkv, triton.cdiv(B, score_tile))](
        q, kmin, kmax, block_table, seq_lens, scores,
        q.stride(0), q.stride(1), kmin.stride(0), kmin.stride(1), block_table.stride(0), scores.stride(0),
        scores.stride(1),
        NUM_KV_HEADS=Hkv, GROUP=G, GROUP_PAD=max(16, triton.next_power_of_2(G)), HEAD_DIM=D, TILE=score_tile,
        REDUCE_MAX=params.gqa_reduce == "max", BLOCK_SIZE=params.block_size, SINK_BLOCKS=params.sink_blocks,
        RECENT_BLOCKS=params.recent_blocks, MIN_CONTEXT=params.min_context_tokens, DOT_FP32=dot_fp32)
    return scores


def select_top_blocks(scores: torch.Tensor, seq_lens: torch.Tensor, params, k: int) -> torch.Tensor:
    """[N, Hkv, k] int32 logical block indices: slots [0, budget) hold each sequence's budget of best blocks in
    ascending block order (budget from seq_lens, as ``planner.device_budgets``); later slots are unspecified.
    A row's scores stay in registers (next power of two of B): fine up to B = 16384 columns (256K tokens at
    16-token blocks); wider tables still work, slower (spills)."""
    N, Hkv, B = scores.shape
    k = min(k, B)
    if k >= 1 << 16:
        raise ValueError(f"select_top_blocks: {k} slots; at most 65535 (the packed scan's low field)")
    top_idx = torch.empty(N, Hkv, k, dtype=torch.int32, device=scores.device)
    width_pad = triton.next_power_of_2(B)

    def launch(early_exit: bool) -> None:
        _select_kernel[(N * Hkv,)](
            scores, seq_lens, top_idx, scores.stride(0), scores.stride(1),
            NUM_KV_HEADS=Hkv, WIDTH_PAD=width_pad, NUM_SEL=k, BLOCK_SIZE=params.block_size,
            BUDGET_TOKENS=params.budget_tokens, FRACTION=float(params.budget_fraction),
            MIN_BLOCKS=params.sink_blocks + params.recent_blocks, MIN_CONTEXT=params.min_context_tokens,
            EARLY_EXIT=early_exit, num_warps=max(4, min(8, width_pad // 1024)))  # H100, 8200 columns: 8 warps

    global SELECT_EARLY_EXIT
    if not SELECT_EARLY_EXIT:
        launch(False)
        return top_idx
    try:
        launch(True)
    except Exception as exc:  # a compiler that rejects the branchy loop: the first (eager) call falls back
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise
        SELECT_EARLY_EXIT = False
        warnings.warn(f"retrieval decode: select kernel with early exit failed to compile ({exc!r:.300}); "
                      "using the fixed 32-halving bisection", RuntimeWarning, stacklevel=2)
        launch(False)
    return top_idx


def attend_selected(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, block_table: torch.Tensor,
                    top_idx: torch.Tensor, seq_lens: torch.Tensor, params, scale: float,
                    out: torch.Tensor | None = None, num_splits: int | None = None,
                    tile_blocks: int | None = None) -> torch.Tensor:
    """Flash-decoding over the selected blocks (``select_top_blocks``' slots) + the split merge."""
    N, Hq, D = q.shape
    Hkv, bs = key_cache.shape[1], key_cache.shape[2]
    G = Hq // Hkv
    g_pad = max(16, triton.next_power_of_2(G))
    k = top_idx.shape[-1]
    q = q.contiguous()
    tile_blocks, per_split, num_splits = _launch_cfg(bs, k, num_splits, tile_blocks)
    m = torch.empty(N, Hkv, num_splits, g_pad, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    acc = torch.empty(N, Hkv, num_splits, g_pad, D, dtype=torch.float32, device=q.device)
    _topk_decode_kernel[(N * Hkv, num_splits)](
        q, key_cache, value_cache, block_table, top_idx, seq_lens, m, l, acc, scale,
        q.stride(0), q.stride(1), key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2), block_table.stride(0),
        NUM_KV_HEADS=Hkv, GROUP=G, GROUP_PAD=g_pad, HEAD_DIM=D, BLOCK_SIZE=bs, NUM_SEL=k,
        BLOCKS_PER_SPLIT=per_split, TILE_BLOCKS=tile_blocks, NUM_SPLITS=num_splits,
        BUDGET_TOKENS=params.budget_tokens, FRACTION=float(params.budget_fraction),
        MIN_BLOCKS=params.sink_blocks + params.recent_blocks, MIN_CONTEXT=params.min_context_tokens,
        DOT_FP32=_INTERPRET or q.dtype == torch.float32)
    if out is None:
        out = torch.empty(N, Hq, D, dtype=q.dtype, device=q.device)
    _merge_kernel[(N * Hkv,)](m, l, acc, out, out.stride(0), out.stride(1), NUM_KV_HEADS=Hkv, GROUP=G,
                              GROUP_PAD=g_pad, HEAD_DIM=D, NUM_SPLITS=num_splits,
                              SPLITS_PAD=max(2, triton.next_power_of_2(num_splits)))
    return out


def retrieval_decode(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, kmin: torch.Tensor,
                     kmax: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor, params, k: int,
                     scale: float, out: torch.Tensor | None = None, num_splits: int | None = None,
                     tile_blocks: int | None = None, score_tile: int = 64) -> torch.Tensor:
    """One decode step of retrieval attention on the GPU: q [N, Hq, D] (one token per sequence), key/value
    caches as [num_blocks, Hkv, block_size, D] views, summaries [num_blocks+1, Hkv, D], block_table [N, B],
    seq_lens [N]; ``params`` a planner.RetrievalParams, ``k`` the fixed selection slots. Writes into ``out``
    ([N, Hq, D], any row stride) if given. Sequences below params.min_context_tokens read all their blocks
    (k must cover them: planner.graph_k). 4 launches: score, select, attend, merge."""
    if key_cache.shape[2] != params.block_size:
        raise ValueError(f"KV cache blocks hold {key_cache.shape[2]} tokens, params.block_size is {params.block_size}")
    scores = score_blocks(q, kmin, kmax, block_table, seq_lens, params, score_tile)
    top_idx = select_top_blocks(scores, seq_lens, params, k)
    return attend_selected(q, key_cache, value_cache, block_table, top_idx, seq_lens, params, scale, out,
                           num_splits, tile_blocks)
