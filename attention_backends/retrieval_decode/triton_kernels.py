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
ops per layer); ``_kv_write_kernel`` also writes the step's keys and values into the paged cache in that launch
(the dense backend's write and the summary update as one, ``retrieval_decode.fused_kv_write``). Shapes depend
only on (N, Hkv, table width, k): everything is CUDA-graph capturable. Also runs under ``TRITON_INTERPRET=1`` on
CPU (tests compare it with the torch selection + ``reference``, ``summaries.update_summaries_`` and
``summaries.write_kv_and_update_summaries_``).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

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
def _row(pid_nh, SEQ_LENS, NUM_KV_HEADS: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """(sequence, kv-head, seq_len, blocks) of a program over (sequence, kv-head) rows."""
    n = pid_nh // NUM_KV_HEADS
    seq_len = tl.load(SEQ_LENS + n).to(tl.int64)
    return n, pid_nh % NUM_KV_HEADS, seq_len, (seq_len + BLOCK_SIZE - 1) // BLOCK_SIZE


@triton.jit
def _masked_score_kernel(
    Q, KMIN, KMAX, TABLE, SEQ_LENS, SCORES, RESELECT,
    stride_qn, stride_qh, stride_sb, stride_sh, stride_tn, stride_on, stride_oh,
    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    TILE: tl.constexpr, REDUCE_MAX: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    SINK_BLOCKS: tl.constexpr, RECENT_BLOCKS: tl.constexpr, MIN_CONTEXT: tl.constexpr, DOT_FP32: tl.constexpr,
    HAS_REUSE: tl.constexpr = False,
):
    pid_nh = tl.program_id(0)
    tile = tl.program_id(1)
    n, h, seq_len, nb = _row(pid_nh, SEQ_LENS, NUM_KV_HEADS, BLOCK_SIZE)
    # The selection reads columns < nb only: tiles past them read and write nothing; nor do rows reusing their
    # stored selection this step (HAS_REUSE, reselect flag 0).
    if (tile * TILE < nb) & _selects(RESELECT, n, HAS_REUSE):
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
        r = _quest_bound(q, kmin, kmax, g, GROUP, REDUCE_MAX, DOT_FP32)
        r = tl.where(empty, -1e30, r)
        r = tl.where(forced, float("inf"), r)
        tl.store(SCORES + n * stride_on + h * stride_oh + b, r, mask=in_seq)


@triton.jit
def _selects(RESELECT, n, HAS_REUSE: tl.constexpr):
    """Whether row n scores and selects this step: always, or (HAS_REUSE) when its reselect flag is set."""
    if HAS_REUSE:
        return tl.load(RESELECT + n) != 0
    else:
        return n >= 0


@triton.jit
def _quest_bound(q, kmin, kmax, g, GROUP: tl.constexpr, REDUCE_MAX: tl.constexpr, DOT_FP32: tl.constexpr):
    """[T] group-reduced Quest bounds of T summaries (kmin/kmax [T, D], +-inf of unwritten ones as loaded)
    for the query rows q [GROUP_PAD, D] (rows g >= GROUP are padding)."""
    kmin = tl.where(kmin == float("inf"), 0.0, kmin).to(kmin.dtype)
    kmax = tl.where(kmax == float("-inf"), 0.0, kmax).to(kmax.dtype)
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
    return r


@triton.jit
def _order_key(x):
    """float32 -> int32 with the same order (-0.0 just below +0.0)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, -(bits & 0x7FFFFFFF) - 1, bits)


@triton.jit
def _select_kernel(
    SCORES, SEQ_LENS, TOP_IDX, RESELECT, stride_sn, stride_sh,
    NUM_KV_HEADS: tl.constexpr, WIDTH_PAD: tl.constexpr, NUM_SEL: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BUDGET_TOKENS: tl.constexpr, FRACTION: tl.constexpr, MIN_BLOCKS: tl.constexpr, MIN_CONTEXT: tl.constexpr,
    EARLY_EXIT: tl.constexpr, RADIX: tl.constexpr = False, HAS_REUSE: tl.constexpr = False,
):
    pid_nh = tl.program_id(0)
    n = pid_nh // NUM_KV_HEADS
    h = pid_nh % NUM_KV_HEADS
    seq_len = tl.load(SEQ_LENS + n).to(tl.int64)
    nb = (seq_len + BLOCK_SIZE - 1) // BLOCK_SIZE
    budget = tl.minimum(_budget_blocks(seq_len, nb, BLOCK_SIZE, BUDGET_TOKENS, FRACTION, MIN_BLOCKS, MIN_CONTEXT),
                        NUM_SEL).to(tl.int32)
    # An empty row (padding, or one the graph's dense path takes) selects nothing, nor does a row reusing its stored
    # selection (HAS_REUSE, flag 0): no scan at all.
    if (nb > 0) & _selects(RESELECT, n, HAS_REUSE):
        b = tl.arange(0, WIDTH_PAD)
        valid = b < nb
        x = tl.load(SCORES + n * stride_sn + h * stride_sh + b, mask=valid, other=float("-inf"))
        take, slot = _take_best(_order_key(x), valid, budget, WIDTH_PAD, EARLY_EXIT, RADIX)
        tl.store(TOP_IDX + pid_nh * NUM_SEL + slot, b.to(tl.int32), mask=take & (slot < NUM_SEL))


@triton.jit
def _take_best(key, valid, budget, WIDTH_PAD: tl.constexpr, EARLY_EXIT: tl.constexpr, RADIX: tl.constexpr):
    """The ``budget`` largest of the valid keys [WIDTH_PAD] (ties at the threshold: lowest columns first), and
    each taken column's rank in column order: (take [WIDTH_PAD] bool, slot [WIDTH_PAD] int32). The threshold
    (the budget-th largest key) by bisection, or RADIX: by 4 histogram passes over 8-bit digits."""
    if RADIX:
        t = _radix_threshold(key, valid, budget)
    else:
        t = _bisect_threshold(key, valid, budget, EARLY_EXIT)
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
    return take, slot


@triton.jit
def _radix_threshold(key, valid, budget):
    """The budget-th largest valid int32 key (budget >= 1 and <= the valid count; else any key), most significant
    8-bit digit first: each pass histograms the digit of the keys that still match the prefix so far and keeps
    the largest digit whose suffix count still reaches what is left of the budget. 4 passes instead of up to 32
    dependent halvings."""
    ukey = (key ^ -2147483648).to(tl.uint32, bitcast=True)  # signed order -> unsigned order
    match = valid
    left = budget
    digits = tl.arange(0, 256)
    t = (budget * 0).to(tl.uint32)
    for p in tl.static_range(4):
        # (p is a constexpr here, so is shift; no ``shift: tl.constexpr`` annotation: Triton 3.6 counts each
        # unrolled pass as a reassignment of the constexpr and rejects the kernel)
        shift = 24 - 8 * p
        digit = ((ukey >> shift) & 255).to(tl.int32)
        hist = tl.histogram(digit, 256, mask=match)
        suffix = tl.sum(hist, axis=0) - tl.cumsum(hist, axis=0) + hist  # matching keys with digit >= j
        j = tl.maximum(tl.max(tl.where(suffix >= left, digits, -1), axis=0), 0)
        left = left - tl.sum(tl.where(digits > j, hist, 0), axis=0)
        match = match & (digit == j)
        t = t | (j.to(tl.uint32) << shift)
    return t.to(tl.int32, bitcast=True) ^ -2147483648


@triton.jit
def _bisect_threshold(key, valid, budget, EARLY_EXIT: tl.constexpr):
    # A t with #{key >= t} == budget, else the largest t with #{key >= t} >= budget (the budget-th largest key,
    # then ties at t fill up): invariant count(lo) >= budget (lo starts below every key) and count(hi) < budget
    # (hi above every key); at most 32 halvings of the int32 range.
    lo = budget.to(tl.int64) * 0 - 2147483648
    hi = budget.to(tl.int64) * 0 + 2147483648
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
    return lo.to(tl.int32)


# --- two-level selection: group scores (with the lazy group summaries and, optionally, this step's summary
# update folded in), then one program per (sequence, kv-head) picks the candidate groups and the budget of blocks.

@triton.jit
def _group_score_kernel(
    Q, KMIN, KMAX, GMIN, GMAX, TABLE, SEQ_LENS, SCORES, KEY, SLOTS, RESELECT,
    stride_qn, stride_qh, stride_sb, stride_sh, stride_tn, stride_on, stride_oh, stride_kn, stride_kh,
    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    TILE: tl.constexpr, REDUCE_MAX: tl.constexpr, BLOCK_SIZE: tl.constexpr, GROUP_BLOCKS: tl.constexpr,
    SINK_BLOCKS: tl.constexpr, RECENT_BLOCKS: tl.constexpr, MIN_CONTEXT: tl.constexpr, DOT_FP32: tl.constexpr,
    FUSE_UPDATE: tl.constexpr, HAS_REUSE: tl.constexpr = False,
):
    """Per (sequence, kv-head, tile of groups): the Quest bound of each group's summary (+inf for groups holding a
    sink or recent block). A complete group whose row is empty gets it filled from its blocks' summaries first.
    FUSE_UPDATE: tile 0 also folds this decode step's key of the sequence (KEY row n, slot SLOTS[n]) into its
    block's summary, the work of ``update_summaries`` for one token per sequence; that block is the current one,
    always forced, so no other tile reads it."""
    pid_nh = tl.program_id(0)
    tile = tl.program_id(1)
    n, h, seq_len, nb = _row(pid_nh, SEQ_LENS, NUM_KV_HEADS, BLOCK_SIZE)
    ng = (nb + GROUP_BLOCKS - 1) // GROUP_BLOCKS
    d = tl.arange(0, HEAD_DIM)
    if FUSE_UPDATE:
        slot = tl.load(SLOTS + n).to(tl.int64)
        if (tile == 0) & (slot >= 0):
            u_ptrs = (slot // BLOCK_SIZE) * stride_sb + h * stride_sh + d
            k_new = tl.load(KEY + n * stride_kn + h * stride_kh + d).to(tl.float32)
            fresh = slot % BLOCK_SIZE == 0
            old_min = tl.load(KMIN + u_ptrs).to(tl.float32)
            old_max = tl.load(KMAX + u_ptrs).to(tl.float32)
            tl.store(KMIN + u_ptrs, tl.where(fresh, k_new, tl.minimum(old_min, k_new)).to(KMIN.dtype.element_ty))
            tl.store(KMAX + u_ptrs, tl.where(fresh, k_new, tl.maximum(old_max, k_new)).to(KMAX.dtype.element_ty))
            if fresh:  # the group keyed by a (re)allocated block is stale: empty it
                tl.store(GMAX + u_ptrs, tl.full([HEAD_DIM], float("-inf"), tl.float32).to(GMAX.dtype.element_ty))
    if (tile * TILE < ng) & _selects(RESELECT, n, HAS_REUSE):  # (the fused update above runs on every row)
        gi = tile * TILE + tl.arange(0, TILE)
        in_seq = gi < ng
        first = gi * GROUP_BLOCKS
        last = first + GROUP_BLOCKS - 1
        forced = (first < SINK_BLOCKS) | (last >= nb - RECENT_BLOCKS) | (seq_len < MIN_CONTEXT)
        need = in_seq & (forced == 0)  # complete groups: the last (partial) group always holds a recent block
        g = tl.arange(0, GROUP_PAD)
        q = tl.load(Q + n * stride_qn + (h * GROUP + g)[:, None] * stride_qh + d[None, :],
                    mask=(g < GROUP)[:, None], other=0.0)
        phys_last = tl.load(TABLE + n * stride_tn + last, mask=need, other=0).to(tl.int64)
        g_ptrs = phys_last[:, None] * stride_sb + h * stride_sh + d[None, :]
        gmin = tl.load(GMIN + g_ptrs, mask=need[:, None], other=0.0)
        gmax = tl.load(GMAX + g_ptrs, mask=need[:, None], other=0.0)
        stale = need & (tl.max(gmax.to(tl.float32), axis=1) == float("-inf"))
        # Fill empty rows from the blocks' summaries (masked lanes move no bytes: nothing to pay once filled).
        mn = tl.full([TILE, HEAD_DIM], float("inf"), tl.float32)
        mx = tl.full([TILE, HEAD_DIM], float("-inf"), tl.float32)
        for j in tl.static_range(GROUP_BLOCKS):
            pj = tl.load(TABLE + n * stride_tn + first + j, mask=stale, other=0).to(tl.int64)
            b_ptrs = pj[:, None] * stride_sb + h * stride_sh + d[None, :]
            mn = tl.minimum(mn, tl.load(KMIN + b_ptrs, mask=stale[:, None], other=float("inf")).to(tl.float32))
            mx = tl.maximum(mx, tl.load(KMAX + b_ptrs, mask=stale[:, None], other=float("-inf")).to(tl.float32))
        tl.store(GMIN + g_ptrs, mn.to(GMIN.dtype.element_ty), mask=stale[:, None])
        tl.store(GMAX + g_ptrs, mx.to(GMAX.dtype.element_ty), mask=stale[:, None])
        gmin = tl.where(stale[:, None], mn.to(GMIN.dtype.element_ty), gmin)
        gmax = tl.where(stale[:, None], mx.to(GMAX.dtype.element_ty), gmax)
        empty = tl.max(gmax.to(tl.float32), axis=1) == float("-inf")
        r = _quest_bound(q, gmin, gmax, g, GROUP, REDUCE_MAX, DOT_FP32)
        r = tl.where(empty, -1e30, r)
        r = tl.where(forced, float("inf"), r)
        tl.store(SCORES + n * stride_on + h * stride_oh + gi, r, mask=in_seq)


@triton.jit
def _refine_select_kernel(
    Q, KMIN, KMAX, TABLE, SEQ_LENS, GSCORES, CAND, FINE, TOP_IDX, RESELECT,
    stride_qn, stride_qh, stride_sb, stride_sh, stride_tn, stride_gn, stride_gh,
    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    REDUCE_MAX: tl.constexpr, BLOCK_SIZE: tl.constexpr, GROUP_BLOCKS: tl.constexpr, REFINE: tl.constexpr,
    FORCED_GROUPS: tl.constexpr, GROUPS_PAD: tl.constexpr, CAND_PAD: tl.constexpr, FINE_TILE: tl.constexpr,
    NUM_SEL: tl.constexpr, BUDGET_TOKENS: tl.constexpr, FRACTION: tl.constexpr, SINK_BLOCKS: tl.constexpr,
    RECENT_BLOCKS: tl.constexpr, MIN_CONTEXT: tl.constexpr, DOT_FP32: tl.constexpr, EARLY_EXIT: tl.constexpr,
    RADIX: tl.constexpr, HAS_REUSE: tl.constexpr = False,
):
    """One program per (sequence, kv-head): the candidate groups (forced ones + enough for REFINE x the budget,
    best group scores first), each candidate block's Quest bound, and exactly the budget of blocks among them,
    in ascending block order into slots [0, budget). Rows that read every block (below min_context, or a budget
    covering the sequence) write blocks 0..nb-1."""
    pid_nh = tl.program_id(0)
    n, h, seq_len, nb = _row(pid_nh, SEQ_LENS, NUM_KV_HEADS, BLOCK_SIZE)
    ng = (nb + GROUP_BLOCKS - 1) // GROUP_BLOCKS
    budget = tl.minimum(_budget_blocks(seq_len, nb, BLOCK_SIZE, BUDGET_TOKENS, FRACTION, SINK_BLOCKS + RECENT_BLOCKS,
                                       MIN_CONTEXT), NUM_SEL).to(tl.int32)
    if _selects(RESELECT, n, HAS_REUSE):  # a row reusing its stored selection (flag 0) writes nothing
        if budget >= nb:
            for i in range(0, NUM_SEL, 1024):
                b = i + tl.arange(0, 1024)
                tl.store(TOP_IDX + pid_nh * NUM_SEL + b, b.to(tl.int32), mask=(b < nb) & (b < NUM_SEL))
        else:
            want = FORCED_GROUPS + tl.ceil(budget.to(tl.float32) * REFINE / GROUP_BLOCKS).to(tl.int32)
            cgroups = tl.minimum(tl.minimum(want, ng.to(tl.int32)), CAND_PAD)  # (the host sizes CAND_PAD for want)
            gi = tl.arange(0, GROUPS_PAD)
            gvalid = gi < ng
            x = tl.load(GSCORES + n * stride_gn + h * stride_gh + gi, mask=gvalid, other=float("-inf"))
            take, slot = _take_best(_order_key(x), gvalid, cgroups, GROUPS_PAD, EARLY_EXIT, RADIX)
            tl.store(CAND + pid_nh * CAND_PAD + slot, gi.to(tl.int32), mask=take & (slot < CAND_PAD))
            tl.debug_barrier()  # the candidates (ascending group order) are read back by other threads
            g = tl.arange(0, GROUP_PAD)
            d = tl.arange(0, HEAD_DIM)
            q = tl.load(Q + n * stride_qn + (h * GROUP + g)[:, None] * stride_qh + d[None, :],
                        mask=(g < GROUP)[:, None], other=0.0)
            CAND_BLOCKS: tl.constexpr = CAND_PAD * GROUP_BLOCKS
            for t0 in range(0, cgroups * GROUP_BLOCKS, FINE_TILE):  # this row's candidates only
                c = t0 + tl.arange(0, FINE_TILE)
                ci = c // GROUP_BLOCKS
                live = ci < cgroups
                # Loads in this loop are unmasked at clamped, always-valid indices (candidate slot 0, table column 0)
                # and dead lanes are masked in the values, as in _topk_decode_kernel: masked loads feeding tl.dot in
                # a loop broke Triton 3.6's layout passes on sm_90 there.
                grp = tl.load(CAND + pid_nh * CAND_PAD + tl.where(live, ci, 0)).to(tl.int64)
                logical = grp * GROUP_BLOCKS + c % GROUP_BLOCKS
                in_seq = live & (logical < nb)
                forced = (logical < SINK_BLOCKS) | (logical >= nb - RECENT_BLOCKS)
                need = in_seq & (forced == 0)
                phys = tl.load(TABLE + n * stride_tn + tl.where(need, logical, 0)).to(tl.int64)
                s_ptrs = phys[:, None] * stride_sb + h * stride_sh + d[None, :]
                kmin = tl.where(need[:, None], tl.load(KMIN + s_ptrs), 0.0).to(KMIN.dtype.element_ty)
                kmax = tl.where(need[:, None], tl.load(KMAX + s_ptrs), 0.0).to(KMAX.dtype.element_ty)
                empty = need & (tl.max(kmax.to(tl.float32), axis=1) == float("-inf"))
                r = _quest_bound(q, kmin, kmax, g, GROUP, REDUCE_MAX, DOT_FP32)
                r = tl.where(empty, -1e30, r)
                r = tl.where(forced, float("inf"), r)
                r = tl.where(in_seq, r, float("-inf"))
                tl.store(FINE + pid_nh * CAND_BLOCKS + c, r)
            tl.debug_barrier()
            c = tl.arange(0, CAND_BLOCKS)
            ci = c // GROUP_BLOCKS
            grp = tl.load(CAND + pid_nh * CAND_PAD + ci, mask=ci < cgroups, other=0)
            logical = grp * GROUP_BLOCKS + c % GROUP_BLOCKS
            fvalid = (ci < cgroups) & (logical < nb)
            x = tl.load(FINE + pid_nh * CAND_BLOCKS + c, mask=fvalid, other=float("-inf"))
            take, slot = _take_best(_order_key(x), fvalid, budget, CAND_BLOCKS, EARLY_EXIT, RADIX)
            tl.store(TOP_IDX + pid_nh * NUM_SEL + slot, logical.to(tl.int32), mask=take & (slot < NUM_SEL))


@triton.jit
def _topk_decode_kernel(
    Q, K, V, TABLE, TOP_IDX, SEQ_LENS, M_OUT, L_OUT, ACC_OUT, RESELECT, SEL_SEQ_LENS,
    scale,
    stride_qn, stride_qh, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt, stride_tn,
    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, NUM_SEL: tl.constexpr, BLOCKS_PER_SPLIT: tl.constexpr, TILE_BLOCKS: tl.constexpr,
    NUM_SPLITS: tl.constexpr, BUDGET_TOKENS: tl.constexpr, FRACTION: tl.constexpr, MIN_BLOCKS: tl.constexpr,
    MIN_CONTEXT: tl.constexpr, DOT_FP32: tl.constexpr, HAS_REUSE: tl.constexpr = False,
    NUM_SLOTS: tl.constexpr = 0,
):
    """NUM_SLOTS (>= NUM_SEL): the slots the splits cover. HAS_REUSE: a row with reselect flag 0 reads the budget of
    its stored selection (made at length SEL_SEQ_LENS[n]), then the blocks started since, in slots after them."""
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
    if HAS_REUSE:
        sel_len = tl.where(tl.load(RESELECT + n) != 0, seq_len, tl.load(SEL_SEQ_LENS + n).to(tl.int64))
    else:
        sel_len = seq_len
    nb0 = (sel_len + BLOCK_SIZE - 1) // BLOCK_SIZE
    stored = tl.minimum(_budget_blocks(sel_len, nb0, BLOCK_SIZE, BUDGET_TOKENS, FRACTION, MIN_BLOCKS, MIN_CONTEXT),
                        NUM_SEL)
    budget = tl.where(seq_len > 0, stored + nb - nb0, 0)  # slots read: stored ones, then blocks started since
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
            in_range = (rank < NUM_SLOTS) & (i + slot_in_tile < BLOCKS_PER_SPLIT) & (rank < budget)
            # Every load in this loop is unmasked at a clamped, always-valid index (slot 0, logical block 0, the
            # physical block in table column 0) and dead lanes are masked only in the scores: masked loads here
            # broke Triton 3.6's layout passes on sm_90 ("mask type matches ptr type" / RemoveLayoutConversions).
            from_store = rank < stored
            safe_rank = tl.where(in_range & from_store, rank, 0)
            logical = tl.load(TOP_IDX + sel_base + safe_rank).to(tl.int64)
            logical = tl.where(from_store, logical, nb0 + rank - stored)
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
def _fold_block_run(KEY, SLOTS, KMIN, KMAX, GMAX, t, h, slot, num_tokens, stride_kt, stride_kh, stride_sb,
                    stride_sh, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_GROUPS: tl.constexpr):
    """Token ``t``'s part of the summary update for kv-head ``h``. A step's tokens of one block are one contiguous
    run of consecutive slots (a block belongs to one request; its tokens sit together in the batch), so the run's
    first token folds the whole run in (at most BLOCK_SIZE tokens) and the others do nothing: no atomics, no races.
    A run starting at offset 0 means the block was (re)allocated: it replaces the old summary instead of merging."""
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
        if HAS_GROUPS:
            if fresh:  # the group keyed by a (re)allocated block is stale: empty it (refilled when scored)
                tl.store(GMAX + s_ptrs, tl.full([HEAD_DIM], float("-inf"), tl.float32).to(GMAX.dtype.element_ty))


@triton.jit
def _summary_update_kernel(KEY, SLOTS, KMIN, KMAX, GMAX, num_tokens, stride_kt, stride_kh, stride_sb, stride_sh,
                           BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_GROUPS: tl.constexpr):
    """One program per (token, kv-head): ``_fold_block_run``."""
    t = tl.program_id(0)
    h = tl.program_id(1)
    slot = tl.load(SLOTS + t).to(tl.int64)
    _fold_block_run(KEY, SLOTS, KMIN, KMAX, GMAX, t, h, slot, num_tokens, stride_kt, stride_kh, stride_sb,
                    stride_sh, BLOCK_SIZE, HEAD_DIM, HAS_GROUPS)


def update_summaries(kmin: torch.Tensor, kmax: torch.Tensor, key: torch.Tensor, slot_mapping: torch.Tensor,
                     block_size: int, gmax: torch.Tensor | None = None) -> None:
    """``summaries.update_summaries_`` in one launch: key [T, Hkv, D] (T may exceed slot_mapping's length:
    vLLM pads tokens), slot_mapping [n] with -1 for padding; summaries [num_blocks + 1, Hkv, D]; ``gmax``: the
    group summaries of two-level selection (rows of (re)allocated blocks emptied)."""
    n = slot_mapping.shape[0]
    if n == 0:
        return
    if key.stride(-1) != 1:
        key = key.contiguous()
    hkv, d = kmin.shape[1], kmin.shape[2]
    _summary_update_kernel[(n, hkv)](key, slot_mapping, kmin, kmax, kmax if gmax is None else gmax, n,
                                     key.stride(0), key.stride(1), kmin.stride(0), kmin.stride(1),
                                     BLOCK_SIZE=block_size, HEAD_DIM=d, HAS_GROUPS=gmax is not None)


@triton.jit
def _kv_write_kernel(KEY, VALUE, KEY_CACHE, VALUE_CACHE, SLOTS, KMIN, KMAX, GMAX, num_tokens,
                     stride_kt, stride_kh, stride_vt, stride_vh, stride_kcb, stride_kch, stride_kcs,
                     stride_vcb, stride_vch, stride_vcs, stride_sb, stride_sh,
                     BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_GROUPS: tl.constexpr,
                     FOLD: tl.constexpr):
    """One program per (token, kv-head): the token's key and value rows of this head copied into its slot of the
    paged cache as they are (vLLM's reshape_and_cache_flash with cache dtype "auto"; slot -1 = padding, skipped),
    then (FOLD) the token's part of the summary update, ``_fold_block_run``: one launch for both."""
    t = tl.program_id(0)
    h = tl.program_id(1)
    slot = tl.load(SLOTS + t).to(tl.int64)
    if slot >= 0:
        blk = slot // BLOCK_SIZE
        off = slot % BLOCK_SIZE
        d = tl.arange(0, HEAD_DIM)
        k = tl.load(KEY + t * stride_kt + h * stride_kh + d)
        v = tl.load(VALUE + t * stride_vt + h * stride_vh + d)
        tl.store(KEY_CACHE + blk * stride_kcb + h * stride_kch + off * stride_kcs + d, k)
        tl.store(VALUE_CACHE + blk * stride_vcb + h * stride_vch + off * stride_vcs + d, v)
    if FOLD:
        _fold_block_run(KEY, SLOTS, KMIN, KMAX, GMAX, t, h, slot, num_tokens, stride_kt, stride_kh, stride_sb,
                        stride_sh, BLOCK_SIZE, HEAD_DIM, HAS_GROUPS)


def write_kv(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
             slot_mapping: torch.Tensor, kmin: torch.Tensor | None = None, kmax: torch.Tensor | None = None,
             gmax: torch.Tensor | None = None) -> None:
    """``summaries.write_kv_and_update_summaries_`` in one launch: key/value [T, Hkv, D] (T may exceed
    slot_mapping's length) written at slot_mapping [n] (-1: padding, skipped) into key_cache/value_cache
    ([num_blocks, Hkv, block_size, D] views, any strides but the last; the caches' dtype: the write copies bytes),
    and the keys folded into the summaries ``kmin``/``kmax`` [num_blocks + 1, Hkv, D] (``gmax``: the group
    summaries, as ``update_summaries``). Without ``kmin``/``kmax``: the write alone (the benchmark's stand-in
    for reshape_and_cache_flash where vLLM is not installed)."""
    n = slot_mapping.shape[0]
    if n == 0:
        return
    if key.dtype != key_cache.dtype or value.dtype != value_cache.dtype:
        raise ValueError(f"write_kv copies bytes: key/value {key.dtype}/{value.dtype} into a "
                         f"{key_cache.dtype}/{value_cache.dtype} cache")
    if key_cache.stride(-1) != 1 or value_cache.stride(-1) != 1:
        raise ValueError("write_kv: the caches' head_dim must be contiguous")
    key = key if key.stride(-1) == 1 else key.contiguous()
    value = value if value.stride(-1) == 1 else value.contiguous()
    hkv, bs, d = key_cache.shape[1], key_cache.shape[2], key_cache.shape[3]
    fold = kmin is not None
    summ = kmin if fold else key_cache
    _kv_write_kernel[(n, hkv)](
        key, value, key_cache, value_cache, slot_mapping, summ, kmax if fold else summ,
        gmax if gmax is not None else summ, n, key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        summ.stride(0), summ.stride(1), BLOCK_SIZE=bs, HEAD_DIM=d, HAS_GROUPS=gmax is not None, FOLD=fold)


@triton.jit
def _merge_kernel(M, L, ACC, OUT, SEQ_LENS, stride_on, stride_oh, NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr,
                  GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr,
                  SPLITS_PAD: tl.constexpr, KEEP_EMPTY: tl.constexpr = False):
    """The splits of (sequence, kv-head) into its output rows. KEEP_EMPTY: a sequence of length 0 (padding, or
    a row the graph's dense path wrote) keeps its output rows as they are; otherwise they get zeros."""
    pid_nh = tl.program_id(0)
    n = pid_nh // NUM_KV_HEADS
    if KEEP_EMPTY:
        if tl.load(SEQ_LENS + n) > 0:
            _merge_row(M, L, ACC, OUT, pid_nh, n, stride_on, stride_oh, NUM_KV_HEADS, GROUP, GROUP_PAD, HEAD_DIM,
                       NUM_SPLITS, SPLITS_PAD)
    else:
        _merge_row(M, L, ACC, OUT, pid_nh, n, stride_on, stride_oh, NUM_KV_HEADS, GROUP, GROUP_PAD, HEAD_DIM,
                   NUM_SPLITS, SPLITS_PAD)


@triton.jit
def _merge_row(M, L, ACC, OUT, pid_nh, n, stride_on, stride_oh, NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr,
               GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr):
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


@dataclass
class Reuse:
    """Selection reuse for one call (reuse.py): the rows' stored selections [N, Hkv, k] int32 (slots [0, budget)
    valid, ascending; written here for rows with reselect 1, read by every row), the per-row reselect flags [N] int32
    and lengths at the stored selection [N] int32, and the blocks a reused row may add (``reuse_extra_blocks``)."""

    store: torch.Tensor
    reselect: torch.Tensor
    sel_seq_lens: torch.Tensor
    extra: int


def _launch_cfg(bs: int, k: int, num_splits: int | None, tile_blocks: int | None) -> tuple[int, int, int]:
    """(tile_blocks, blocks per split, splits) of the decode kernel for k selection slots."""
    tile_blocks = tile_blocks or max(1, 64 // bs)
    if num_splits is None:
        num_splits = max(1, min(16, triton.cdiv(k, 2 * tile_blocks)))
    per_split = triton.cdiv(triton.cdiv(k, num_splits), tile_blocks) * tile_blocks
    return tile_blocks, per_split, triton.cdiv(k, per_split)


def score_blocks(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, block_table: torch.Tensor,
                 seq_lens: torch.Tensor, params, score_tile: int = 64,
                 reselect: torch.Tensor | None = None) -> torch.Tensor:
    """[N, Hkv, B] float32 Quest bounds (+inf forced); columns >= a sequence's block count are left unwritten, and
    so are the rows whose ``reselect`` flag [N] is 0."""
    N, Hq, D = q.shape
    Hkv = kmin.shape[1]
    G = Hq // Hkv
    B = block_table.shape[1]
    q = q.contiguous()
    scores = torch.empty(N, Hkv, B, dtype=torch.float32, device=q.device)
    dot_fp32 = _dot_fp32(q, kmin)
    _masked_score_kernel[(N * Hkv, triton.cdiv(B, score_tile))](
        q, kmin, kmax, block_table, seq_lens, scores, seq_lens if reselect is None else reselect,
        q.stride(0), q.stride(1), kmin.stride(0), kmin.stride(1), block_table.stride(0), scores.stride(0),
        scores.stride(1),
        NUM_KV_HEADS=Hkv, GROUP=G, GROUP_PAD=max(16, triton.next_power_of_2(G)), HEAD_DIM=D, TILE=score_tile,
        REDUCE_MAX=params.gqa_reduce == "max", BLOCK_SIZE=params.block_size, SINK_BLOCKS=params.sink_blocks,
        RECENT_BLOCKS=params.recent_blocks, MIN_CONTEXT=params.min_context_tokens, DOT_FP32=dot_fp32,
        HAS_REUSE=reselect is not None)
    return scores


def select_top_blocks(scores: torch.Tensor, seq_lens: torch.Tensor, params, k: int,
                      reuse: "Reuse | None" = None) -> torch.Tensor:
    """[N, Hkv, k] int32 logical block indices: slots [0, budget) hold each sequence's budget of best blocks in
    ascending block order (budget from seq_lens, as ``planner.device_budgets``); later slots are unspecified.
    A row's scores stay in registers (next power of two of B): fine up to B = 16384 columns (256K tokens at
    16-token blocks); wider tables still work, slower (spills). ``reuse``: written into its store, rows with
    reselect 0 untouched."""
    N, Hkv, B = scores.shape
    k = min(k, B)
    if k >= 1 << 16:
        raise ValueError(f"select_top_blocks: {k} slots; at most 65535 (the packed scan's low field)")
    top_idx = _top_idx(N, Hkv, k, scores.device, reuse)
    width_pad = triton.next_power_of_2(B)
    radix = params.select == "radix"  # (no early-exit fallback: the radix select has no data-dependent loop)

    def launch(early_exit: bool) -> None:
        _select_kernel[(N * Hkv,)](
            scores, seq_lens, top_idx, seq_lens if reuse is None else reuse.reselect, scores.stride(0),
            scores.stride(1),
            NUM_KV_HEADS=Hkv, WIDTH_PAD=width_pad, NUM_SEL=k, BLOCK_SIZE=params.block_size,
            BUDGET_TOKENS=params.budget_tokens, FRACTION=float(params.budget_fraction),
            MIN_BLOCKS=params.sink_blocks + params.recent_blocks, MIN_CONTEXT=params.min_context_tokens,
            EARLY_EXIT=early_exit, RADIX=radix, HAS_REUSE=reuse is not None,
            num_warps=max(4, min(8, width_pad // 1024)))  # H100, 8200 columns: 8 warps

    global SELECT_EARLY_EXIT
    if not SELECT_EARLY_EXIT or radix:
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


def _top_idx(N: int, Hkv: int, k: int, device: torch.device, reuse: "Reuse | None") -> torch.Tensor:
    """The select's output: a fresh [N, Hkv, k] int32, or the reuse store (checked to be that shape)."""
    if reuse is None:
        return torch.empty(N, Hkv, k, dtype=torch.int32, device=device)
    st = reuse.store
    if tuple(st.shape) != (N, Hkv, k) or st.dtype != torch.int32 or not st.is_contiguous():
        raise ValueError(f"selection reuse: the store must be a contiguous int32 [{N}, {Hkv}, {k}] (k = the select's "
                         f"slots), got {st.dtype} {tuple(st.shape)}")
    return st


def _dot_fp32(q: torch.Tensor, kmin: torch.Tensor) -> bool:
    return _INTERPRET or kmin.dtype not in (torch.bfloat16, torch.float16) or q.dtype != kmin.dtype


def score_groups(q: torch.Tensor, summ, block_table: torch.Tensor, seq_lens: torch.Tensor, params,
                 score_tile: int = 64, fuse_key: torch.Tensor | None = None,
                 fuse_slots: torch.Tensor | None = None, reselect: torch.Tensor | None = None) -> torch.Tensor:
    """Two-level, coarse pass: [N, Hkv, ceil(B / group_blocks)] float32 group bounds (+inf forced); fills empty
    group rows of ``summ`` (a summaries.BlockSummaries with group tensors). ``fuse_key`` [N, Hkv, D] /
    ``fuse_slots`` [N]: this decode step's keys, folded into the block summaries in the same launch."""
    if summ.gmin is None:
        raise ValueError("two-level selection (group_blocks > 1) needs block summaries allocated with groups=True")
    N, Hq, D = q.shape
    Hkv = summ.kmin.shape[1]
    gb = params.group_blocks
    ngw = triton.cdiv(block_table.shape[1], gb)
    q = q.contiguous()
    scores = torch.empty(N, Hkv, ngw, dtype=torch.float32, device=q.device)
    fuse = fuse_key is not None
    if fuse and fuse_key.stride(-1) != 1:
        fuse_key = fuse_key.contiguous()
    key = fuse_key if fuse else q
    slots = fuse_slots if fuse else seq_lens
    _group_score_kernel[(N * Hkv, triton.cdiv(ngw, score_tile))](
        q, summ.kmin, summ.kmax, summ.gmin, summ.gmax, block_table, seq_lens, scores, key, slots,
        seq_lens if reselect is None else reselect,
        q.stride(0), q.stride(1), summ.kmin.stride(0), summ.kmin.stride(1), block_table.stride(0), scores.stride(0),
        scores.stride(1), key.stride(0), key.stride(1),
        NUM_KV_HEADS=Hkv, GROUP=Hq // Hkv, GROUP_PAD=max(16, triton.next_power_of_2(Hq // Hkv)), HEAD_DIM=D,
        TILE=score_tile, REDUCE_MAX=params.gqa_reduce == "max", BLOCK_SIZE=params.block_size, GROUP_BLOCKS=gb,
        SINK_BLOCKS=params.sink_blocks, RECENT_BLOCKS=params.recent_blocks, MIN_CONTEXT=params.min_context_tokens,
        DOT_FP32=_dot_fp32(q, summ.kmin), FUSE_UPDATE=fuse, HAS_REUSE=reselect is not None)
    return scores


def refine_select(q: torch.Tensor, summ, block_table: torch.Tensor, seq_lens: torch.Tensor,
                  group_scores: torch.Tensor, params, k: int, fine_tile: int = 64,
                  reuse: "Reuse | None" = None) -> torch.Tensor:
    """Two-level, fine pass: [N, Hkv, k] int32 slots as ``select_top_blocks`` (the budget of best blocks among the
    candidate groups' blocks, ascending; later slots unspecified)."""
    N, Hq, D = q.shape
    Hkv = summ.kmin.shape[1]
    B = block_table.shape[1]
    k = min(k, B)
    if k >= 1 << 16:
        raise ValueError(f"refine_select: {k} slots; at most 65535 (the packed scan's low field)")
    gb = params.group_blocks
    ngw = group_scores.shape[-1]
    # The largest budget a row that does not read every block can have (rows reading every block skip the search).
    sparse_budget = min(k, params.max_budget_blocks(B * params.block_size))
    cand = min(ngw, params.candidate_groups(sparse_budget))
    cand_pad = max(2, triton.next_power_of_2(cand))
    fine_tile = min(fine_tile, cand_pad * gb)
    q = q.contiguous()
    top_idx = _top_idx(N, Hkv, k, q.device, reuse)
    cand_buf = torch.empty(N * Hkv, cand_pad, dtype=torch.int32, device=q.device)
    fine_buf = torch.empty(N * Hkv, cand_pad * gb, dtype=torch.float32, device=q.device)
    groups_pad = triton.next_power_of_2(ngw)
    forced = -(-params.sink_blocks // gb) + -(-params.recent_blocks // gb) + 1  # as RetrievalParams.candidate_groups
    _refine_select_kernel[(N * Hkv,)](
        q, summ.kmin, summ.kmax, block_table, seq_lens, group_scores, cand_buf, fine_buf, top_idx,
        seq_lens if reuse is None else reuse.reselect,
        q.stride(0), q.stride(1), summ.kmin.stride(0), summ.kmin.stride(1), block_table.stride(0),
        group_scores.stride(0), group_scores.stride(1),
        NUM_KV_HEADS=Hkv, GROUP=Hq // Hkv, GROUP_PAD=max(16, triton.next_power_of_2(Hq // Hkv)), HEAD_DIM=D,
        REDUCE_MAX=params.gqa_reduce == "max", BLOCK_SIZE=params.block_size, GROUP_BLOCKS=gb,
        REFINE=float(params.group_refine), FORCED_GROUPS=forced, GROUPS_PAD=groups_pad, CAND_PAD=cand_pad,
        FINE_TILE=fine_tile, NUM_SEL=k, BUDGET_TOKENS=params.budget_tokens, FRACTION=float(params.budget_fraction),
        SINK_BLOCKS=params.sink_blocks, RECENT_BLOCKS=params.recent_blocks, MIN_CONTEXT=params.min_context_tokens,
        DOT_FP32=_dot_fp32(q, summ.kmin), EARLY_EXIT=SELECT_EARLY_EXIT, RADIX=params.select == "radix",
        HAS_REUSE=reuse is not None,
        num_warps=max(4, min(8, max(groups_pad, cand_pad * gb) // 1024)))
    return top_idx


def attend_selected(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, block_table: torch.Tensor,
                    top_idx: torch.Tensor, seq_lens: torch.Tensor, params, scale: float,
                    out: torch.Tensor | None = None, num_splits: int | None = None,
                    tile_blocks: int | None = None, keep_empty_rows: bool = False,
                    reuse: "Reuse | None" = None) -> torch.Tensor:
    """Flash-decoding over the selected blocks (``select_top_blocks``' slots) + the split merge.
    ``keep_empty_rows``: rows of sequences with seq_len 0 keep what ``out`` holds (else: zeros). ``reuse``: rows
    with reselect 0 read their stored selection (``top_idx`` is the store) plus the blocks started since."""
    if keep_empty_rows and out is None:
        raise ValueError("keep_empty_rows needs out= (the rows to keep)")
    N, Hq, D = q.shape
    Hkv, bs = key_cache.shape[1], key_cache.shape[2]
    G = Hq // Hkv
    g_pad = max(16, triton.next_power_of_2(G))
    k = top_idx.shape[-1]
    slots = k + (reuse.extra if reuse is not None else 0)
    q = q.contiguous()
    tile_blocks, per_split, num_splits = _launch_cfg(bs, slots, num_splits, tile_blocks)
    m = torch.empty(N, Hkv, num_splits, g_pad, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    acc = torch.empty(N, Hkv, num_splits, g_pad, D, dtype=torch.float32, device=q.device)
    _topk_decode_kernel[(N * Hkv, num_splits)](
        q, key_cache, value_cache, block_table, top_idx, seq_lens, m, l, acc,
        seq_lens if reuse is None else reuse.reselect, seq_lens if reuse is None else reuse.sel_seq_lens, scale,
        q.stride(0), q.stride(1), key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2), block_table.stride(0),
        NUM_KV_HEADS=Hkv, GROUP=G, GROUP_PAD=g_pad, HEAD_DIM=D, BLOCK_SIZE=bs, NUM_SEL=k,
        BLOCKS_PER_SPLIT=per_split, TILE_BLOCKS=tile_blocks, NUM_SPLITS=num_splits,
        BUDGET_TOKENS=params.budget_tokens, FRACTION=float(params.budget_fraction),
        MIN_BLOCKS=params.sink_blocks + params.recent_blocks, MIN_CONTEXT=params.min_context_tokens,
        DOT_FP32=_INTERPRET or q.dtype == torch.float32, HAS_REUSE=reuse is not None, NUM_SLOTS=slots)
    if out is None:
        out = torch.empty(N, Hq, D, dtype=q.dtype, device=q.device)
    _merge_kernel[(N * Hkv,)](m, l, acc, out, seq_lens, out.stride(0), out.stride(1), NUM_KV_HEADS=Hkv, GROUP=G,
                              GROUP_PAD=g_pad, HEAD_DIM=D, NUM_SPLITS=num_splits,
                              SPLITS_PAD=max(2, triton.next_power_of_2(num_splits)), KEEP_EMPTY=keep_empty_rows)
    return out


def retrieval_decode(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, kmin: torch.Tensor,
                     kmax: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor, params, k: int,
                     scale: float, out: torch.Tensor | None = None, num_splits: int | None = None,
                     tile_blocks: int | None = None, score_tile: int = 64, summ=None,
                     fuse_key: torch.Tensor | None = None, fuse_slots: torch.Tensor | None = None,
                     keep_empty_rows: bool = False, reuse: "Reuse | None" = None) -> torch.Tensor:
    """One decode step of retrieval attention on the GPU: q [N, Hq, D] (one token per sequence), key/value
    caches as [num_blocks, Hkv, block_size, D] views, summaries [num_blocks+1, Hkv, D], block_table [N, B],
    seq_lens [N]; ``params`` a planner.RetrievalParams, ``k`` the fixed selection slots. Writes into ``out``
    ([N, Hq, D], any row stride) if given. Sequences below params.min_context_tokens read all their blocks
    (k must cover them: planner.graph_k). 4 launches: score, select, attend, merge.
    ``params.group_blocks`` > 1: two-level selection over ``summ`` (BlockSummaries with groups; kmin/kmax are
    its block summaries); ``fuse_key``/``fuse_slots`` then fold this step's summary update into the scoring
    (instead of a separate ``update_summaries`` launch). ``keep_empty_rows``: a sequence of length 0 reads
    nothing (its score tiles, select and attend splits return at once) and its rows of ``out`` keep what they hold
    (the graph's dense path wrote them: DecodeGraphPlan); without it they come out as zeros. ``reuse`` (Reuse,
    reselect_interval > 1): score and select run for rows with reselect 1 only, into ``reuse.store`` ([N, Hkv, k]);
    every row attends its stored selection plus the blocks started since it was made."""
    if key_cache.shape[2] != params.block_size:
        raise ValueError(f"KV cache blocks hold {key_cache.shape[2]} tokens, params.block_size is {params.block_size}")
    reselect = None if reuse is None else reuse.reselect
    if params.group_blocks > 1:
        if summ is None:
            raise ValueError("two-level selection (group_blocks > 1) needs summ= (BlockSummaries with groups)")
        gscores = score_groups(q, summ, block_table, seq_lens, params, score_tile, fuse_key, fuse_slots, reselect)
        top_idx = refine_select(q, summ, block_table, seq_lens, gscores, params, k, reuse=reuse)
    else:
        if fuse_key is not None:
            raise ValueError("the fused summary update needs two-level selection (group_blocks > 1)")
        scores = score_blocks(q, kmin, kmax, block_table, seq_lens, params, score_tile, reselect)
        top_idx = select_top_blocks(scores, seq_lens, params, k, reuse)
    return attend_selected(q, key_cache, value_cache, block_table, top_idx, seq_lens, params, scale, out,
                           num_splits, tile_blocks, keep_empty_rows, reuse)
