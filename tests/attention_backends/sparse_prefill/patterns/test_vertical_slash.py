"""Vertical-slash with sparse_prefill.vertical_segment_rows: each segment of a chunk's rows picks its own columns
from its own last rows (issue 16: the question's columns no longer go to every row of the chunk)."""
from __future__ import annotations

import pytest
import torch

from attention_backends.sparse_prefill.head_config import LayerPlan, build_index
from attention_backends.sparse_prefill.index import BLOCK, ChunkGeometry
from attention_backends.sparse_prefill.index_options import IndexOptions
from attention_backends.sparse_prefill.patterns.vertical_slash import (HEADS_PER_STEP, LAST_Q, VerticalSlash,
                                                                     column_votes, estimate_lines, segment_ends)
from attention_backends.sparse_prefill.reference import sparse_attention
from tests.attention_backends.sparse_prefill.test_reference import TIGHT, _qkv

SCALE = 0.2
SHAPES = [(700, 700), (300, 1000), (257, 1123)]  # one-shot, after a context, unaligned


def _select(q, k, geom, segment_rows=0, group_shared=False, vertical=40):
    """VerticalSlash.select on [n, Hq, d] queries / [L, Hkv, d] keys, every head with budgets (vertical, 120)."""
    Hq, Hkv = q.shape[1], k.shape[1]
    kv_ids = torch.arange(Hq) // (Hq // Hkv)
    budgets = {"vertical": torch.full((Hq,), vertical), "slash": torch.full((Hq,), 120)}
    return VerticalSlash.select(q.transpose(0, 1), k.transpose(0, 1), kv_ids, geom, budgets,
                                {"vertical": vertical, "slash": 120}, SCALE, group_shared=group_shared,
                                segment_rows=segment_rows)


def _kept(cols):
    return sorted(int(c) for c in cols if c >= 0)


@pytest.mark.parametrize("n,rows,ends", [(700, 256, [256, 512, 700]), (700, 64, list(range(64, 700, 64)) + [700]),
                                         (700, 704, [700]), (700, 0, [700]), (128, 128, [128])])
def test_segment_ends(n, rows, ends):
    assert segment_ends(ChunkGeometry(n, n + 10), rows) == ends


@pytest.mark.parametrize("group_shared", [False, True])
@pytest.mark.parametrize("segment_rows", [128, 192])
@pytest.mark.parametrize("n,L", SHAPES)
def test_each_segment_picks_what_its_own_estimate_picks(n, L, segment_rows, group_shared):
    """A segment ending at chunk row e gets the columns a chunk of rows [0, e) (keys up to its last row) picks:
    its own last LAST_Q rows vote, causally; its query blocks hold them, not the chunk's last rows' columns."""
    q, k, _ = _qkv(n, L, seed=7)
    geom = ChunkGeometry(n, L)
    _, cols, _ = _select(q, k, geom, segment_rows, group_shared)
    assert cols.shape[:2] == (q.shape[1], geom.nqb)
    differs = False
    for e in segment_ends(geom, segment_rows):
        own = ChunkGeometry(e, geom.q_pos0 + e)
        _, want, _ = _select(q[:e], k[:own.L], own, group_shared=group_shared)
        blocks = range((e - 1) // segment_rows * segment_rows // BLOCK, -(-e // BLOCK))
        for h in range(q.shape[1]):
            for qb in blocks:
                assert _kept(cols[h, qb]) == _kept(want[h]), (e, h, qb)
            differs |= _kept(cols[h, 0]) != _kept(cols[h, -1])
    assert differs  # the first segment's columns are not the chunk's last rows' (what every row got before)


@pytest.mark.parametrize("group_shared", [False, True])
@pytest.mark.parametrize("n,L", [*SHAPES, (5, 900)])
def test_one_segment_is_todays_index(n, L, group_shared):
    """Segments of the whole chunk (or more) give exactly the index without segments."""
    q, k, _ = _qkv(n, L, seed=8)
    geom = ChunkGeometry(n, L)
    plan = LayerPlan.uniform("vertical_slash", q.shape[1], **TIGHT["vertical_slash"])
    today = build_index(q, k, geom, plan, SCALE, IndexOptions(group_shared_selection=group_shared))
    for rows in (-(-n // BLOCK) * BLOCK, 1 << 16):
        seg = build_index(q, k, geom, plan, SCALE,
                          IndexOptions(group_shared_selection=group_shared, vertical_segment_rows=rows))
        for name in ("block_mask", "cols", "col_count", "ranges", "range_count", "range_first"):
            assert torch.equal(getattr(seg, name), getattr(today, name)), (rows, name)


def _naive_lines(q, k, kv_ids, q_pos0, row_end, L):
    """Column and diagonal mass [h, L] of the last LAST_Q rows of rows [0, row_end), row by row in float64."""
    vertical = torch.zeros(q.shape[0], L, dtype=torch.float64)
    slash = torch.zeros_like(vertical)
    for h in range(q.shape[0]):
        for r in range(max(0, row_end - LAST_Q), row_end):
            pos = q_pos0 + r
            p = torch.softmax(k[kv_ids[h], :pos + 1].double() @ q[h, r].double() * SCALE, -1)
            vertical[h, :pos + 1] += p
            slash[h, :pos + 1] += p.flip(0)  # key pos - d lies on diagonal d
    return vertical, slash


# more query heads than HEADS_PER_STEP (two steps); segments ending before and after LAST_Q rows, unaligned
VOTE_CASES = [(200, 700, [40, 64, 130, 200]), (700, 700, [100, 256, 700]), (90, 1123, [1, 63, 90])]


@pytest.mark.parametrize("n,L,ends", VOTE_CASES)
def test_estimate_lines_is_the_last_rows_softmax_mass(n, L, ends):
    """estimate_lines == the row-by-row column and diagonal mass of the chunk's last LAST_Q rows."""
    q, k, _ = _qkv(n, L, Hq=HEADS_PER_STEP + 4, Hkv=4, seed=10)
    kv_ids = torch.arange(q.shape[1]) // 3
    vertical, slash = estimate_lines(q.transpose(0, 1), k.transpose(0, 1), kv_ids, ChunkGeometry(n, L), SCALE)
    want_v, want_s = _naive_lines(q.transpose(0, 1), k.transpose(0, 1), kv_ids, L - n, n, L)
    torch.testing.assert_close(vertical.double(), want_v, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(slash.double(), want_s, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n,L,ends", VOTE_CASES)
def test_column_votes_are_estimate_lines_of_the_rows_up_to_the_segment_end(n, L, ends):
    """A segment's column vote (column_votes, ending at chunk row e) == estimate_lines' columns of the chunk cut at
    row e (keys up to its last row; zero beyond); at e = n, estimate_lines' columns themselves."""
    q, k, _ = _qkv(n, L, Hq=HEADS_PER_STEP + 4, Hkv=4, seed=11)
    qh, kh = q.transpose(0, 1), k.transpose(0, 1)
    kv_ids = torch.arange(q.shape[1]) // 3
    geom = ChunkGeometry(n, L)
    for e in ends:
        got = column_votes(qh, kh, kv_ids, geom, SCALE, e)
        keys = geom.q_pos0 + e
        want, _ = estimate_lines(qh[:, :e], kh[:, :keys], kv_ids, ChunkGeometry(e, keys), SCALE)
        assert got.shape == (q.shape[1], L) and not got[:, keys:].any(), e
        torch.testing.assert_close(got[:, :keys], want, rtol=1e-6, atol=1e-7, msg=f"segment end {e}")
        torch.testing.assert_close(got.double(), _naive_lines(qh, kh, kv_ids, geom.q_pos0, e, L)[0],
                                   rtol=1e-5, atol=1e-5, msg=f"segment end {e}")


def _masked_dense(q, k, v, mask, scale):
    """Softmax attention of q [n, Hq, d] over k/v [L, Hkv, d] restricted to mask [Hq, n, L] (bool)."""
    group = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = torch.einsum("nhd,lhd->hnl", q.double(), kk.double()) * scale
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), -1)
    return torch.einsum("hnl,lhd->nhd", p, vv.double()).float()


@pytest.mark.parametrize("group_shared", [False, True])
@pytest.mark.parametrize("n,L", SHAPES)
def test_reference_attends_each_segments_columns(n, L, group_shared):
    """The torch reference on a segmented index == dense attention restricted to its element mask, and each row's
    mask holds its own segment's columns (causally), not only the last segment's."""
    q, k, v = _qkv(n, L, seed=9)
    geom = ChunkGeometry(n, L)
    plan = LayerPlan.uniform("vertical_slash", q.shape[1], **TIGHT["vertical_slash"])
    index = build_index(q, k, geom, plan, SCALE,
                        IndexOptions(group_shared_selection=group_shared, vertical_segment_rows=128))
    mask = index.dense_mask(geom)
    torch.testing.assert_close(sparse_attention(q, k, v, index, SCALE), _masked_dense(q, k, v, mask, SCALE),
                               rtol=1e-4, atol=1e-4)
    _, cols, _ = _select(q, k, geom, 128, group_shared)
    for h in range(q.shape[1]):
        for r in (0, 127, 200, n - 1):
            row_cols = torch.tensor(_kept(cols[h, r // BLOCK]), dtype=torch.int64)
            seen = row_cols[row_cols <= geom.q_pos0 + r]
            assert mask[h, r, seen].all()
    assert index.computed_pairs(geom).sum() == mask.sum()
