"""The FA2 sparse executor's index conversion: vLLM's kernel semantics (a torch model of them) over the converted
index == our torch reference over our index, for every pattern, chunk offsets, GQA, mixed-pattern layers."""
from __future__ import annotations

import random

import pytest
import torch

from attention_backends.sparse_prefill import fa2_sparse
from attention_backends.sparse_prefill.fa2_sparse import SequenceKV, fa2_index, fa2_sparse_reference, gather_kv
from attention_backends.sparse_prefill.head_config import HeadPattern, LayerPlan, PatternConfig, build_index
from attention_backends.sparse_prefill.index import BLOCK, RANGE_PAD, ChunkGeometry, ranges_from_diagonals, window_ranges
from attention_backends.sparse_prefill.index_options import IndexOptions
from attention_backends.sparse_prefill.patterns import registry
from attention_backends.sparse_prefill.reference import dense_attention, sparse_attention

TIGHT = {"a_shape": {"sink": 64, "window": 128}, "vertical_slash": {"vertical": 40, "slash": 120},
         "block_sparse": {"top_k": 3}}
# (chunk rows, total keys): whole prompts, chunks at an offset (unaligned too), a tiny last chunk, a chunk whose
# last query block is short and whose first reaches back past key 0 only through its ranges.
SHAPES = [(700, 700), (300, 1000), (257, 1123), (5, 900), (130, 190)]
SCALE = 0.2


def _qkv(n, L, Hq=6, Hkv=2, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = torch.randn(n, Hq, d, generator=g), torch.randn(L, Hkv, d, generator=g), torch.randn(L, Hkv, d, generator=g)
    k[:4] *= 3
    return q, k, v


def _paged(x, page=16, seed=1):
    """[L, H, d] -> a paged cache [num_blocks, H, page, d] (shuffled blocks, spare ones) and the sequence's blocks."""
    L, H, d = x.shape
    n = -(-L // page)
    perm = torch.randperm(n + 3, generator=torch.Generator().manual_seed(seed))[:n]
    cache = torch.randn(n + 3, H, page, d)
    padded = torch.zeros(n * page, H, d)
    padded[:L] = x
    cache[perm] = padded.view(n, page, H, d).transpose(1, 2)
    return cache, perm


def _fa2(q, k, v, index, geom, with_blocks=True):
    kc, blocks = _paged(k)
    vc, _ = _paged(v)
    seq = SequenceKV.build(blocks, 16, geom)
    out = torch.full_like(q, float("nan"))
    return fa2_sparse.attend(fa2_sparse_reference, q, gather_kv(kc, seq), gather_kv(vc, seq), index, geom, SCALE, out,
                             seq, with_blocks)


@pytest.mark.parametrize("pattern", sorted(registry.PATTERNS))
@pytest.mark.parametrize("n,L", SHAPES)
def test_fa2_semantics_over_converted_index_equal_ours(pattern, n, L):
    q, k, v = _qkv(n, L)
    geom = ChunkGeometry(n, L)
    plan = LayerPlan.uniform(pattern, q.shape[1], **TIGHT[pattern])
    index = build_index(q, k, geom, plan, SCALE, window_ranges=True)
    assert index.density(geom) < 1.0 or L < 200
    torch.testing.assert_close(_fa2(q, k, v, index, geom, fa2_sparse.plan_has_blocks(plan)),
                               sparse_attention(q, k, v, index, SCALE), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n,L", SHAPES)
def test_mixed_pattern_layer_and_dense_heads(n, L):
    """Heads of one layer with different patterns (blocks on some, ranges on others) and dense heads."""
    cfg = PatternConfig(default=HeadPattern(pattern="vertical_slash", budgets=TIGHT["vertical_slash"]),
                        layers={0: {1: HeadPattern(pattern="block_sparse", budgets={"top_k": 2}),
                                    2: HeadPattern(pattern="dense"),
                                    4: HeadPattern(pattern="a_shape", budgets=TIGHT["a_shape"])}}).validate()
    q, k, v = _qkv(n, L, seed=3)
    geom = ChunkGeometry(n, L)
    plan = LayerPlan.from_config(cfg, 0, q.shape[1])
    assert fa2_sparse.plan_has_blocks(plan)
    index = build_index(q, k, geom, plan, SCALE, window_ranges=True)
    torch.testing.assert_close(_fa2(q, k, v, index, geom), sparse_attention(q, k, v, index, SCALE),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("pattern", sorted(registry.PATTERNS))
@pytest.mark.parametrize("n,L", SHAPES)
def test_dense_tail_converts(pattern, n, L):
    """sparse_prefill.dense_tail_rows through the FA2 conversion: a range-only plan's tail blocks take their causal
    blocks (plan_has_blocks says so), no key twice, and the tail rows equal dense attention."""
    q, k, v = _qkv(n, L, seed=4)
    geom = ChunkGeometry(n, L)
    plan = LayerPlan.uniform(pattern, q.shape[1], **TIGHT[pattern])
    assert fa2_sparse.plan_has_blocks(plan, dense_tail_rows=64)
    index = build_index(q, k, geom, plan, SCALE, IndexOptions(dense_tail_rows=64), window_ranges=True)
    got = _fa2(q, k, v, index, geom, fa2_sparse.plan_has_blocks(plan, 64))
    torch.testing.assert_close(got, sparse_attention(q, k, v, index, SCALE), rtol=1e-4, atol=1e-4)
    r0 = (max(0, n - 64) // BLOCK) * BLOCK
    torch.testing.assert_close(got[r0:], dense_attention(q, k, v, SCALE)[r0:], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n,L", SHAPES)
def test_vertical_segments_convert(n, L):
    """sparse_prefill.vertical_segment_rows through the FA2 conversion: columns that differ per query block."""
    q, k, v = _qkv(n, L, seed=6)
    geom = ChunkGeometry(n, L)
    plan = LayerPlan.uniform("vertical_slash", q.shape[1], **TIGHT["vertical_slash"])
    index = build_index(q, k, geom, plan, SCALE, IndexOptions(vertical_segment_rows=64), window_ranges=True)
    torch.testing.assert_close(_fa2(q, k, v, index, geom, fa2_sparse.plan_has_blocks(plan)),
                               sparse_attention(q, k, v, index, SCALE), rtol=1e-4, atol=1e-4)


def test_converted_index_lists_every_key_once_and_masks_only_what_it_must():
    """Structural check of the conversion on a chunk at an unaligned offset: each (head, query block) lists
    exactly the keys of our element mask's union over the block's rows, no key twice, and only windows/columns
    in the kernel's masked steps hold keys beyond the block's first row."""
    n, L = 257, 1123
    q, k, _ = _qkv(n, L, seed=5)
    geom = ChunkGeometry(n, L)
    index = build_index(q, k, geom, LayerPlan.uniform("vertical_slash", 6, **TIGHT["vertical_slash"]), SCALE,
                        window_ranges=True)
    bc, bo, cc, ci = fa2_index(index, geom, with_blocks=False)
    a, b = geom.q_block_bounds()
    for h in range(6):
        mask = index.dense_mask(geom)[h]
        for m in range(geom.nqb):
            nb, nc = int(bc[0, h, m]), int(cc[0, h, m])
            win = (bo[0, h, m, :nb].long()[:, None] + torch.arange(BLOCK)).flatten()
            col = ci[0, h, m, :nc].long()
            listed = torch.cat([win, col])
            assert listed.unique().numel() == listed.numel(), "a key listed twice counts twice"
            want = mask[m * BLOCK:min(n, (m + 1) * BLOCK)].any(0).nonzero().flatten()
            assert set(want.tolist()) <= set(listed.tolist())
            extra = set(listed.tolist()) - set(want.tolist())
            assert all(x > int(b[m]) - 1 for x in extra), "only keys no row of the block sees may be extra"
            late_win = (win.view(nb, BLOCK) > a[m]).any(1).nonzero().flatten()
            assert (late_win >= nb - fa2_sparse.MASKED_STEPS).all()
            late_col = (col > a[m]).nonzero().flatten()
            assert (late_col // BLOCK >= -(-nc // BLOCK) - fa2_sparse.MASKED_STEPS).all()
            assert (col[1:] > col[:-1]).all()


def test_dropping_a_block_fails_the_comparison():
    """The oracle sees a dropped window: a conversion that loses one gives a different output."""
    n, L = 300, 1000
    q, k, v = _qkv(n, L, seed=2)
    geom = ChunkGeometry(n, L)
    index = build_index(q, k, geom, LayerPlan.uniform("block_sparse", 6, top_k=4), SCALE, window_ranges=True)
    kc, blocks = _paged(k)
    vc, _ = _paged(v)
    seq = SequenceKV.build(blocks, 16, geom)
    kk, vv = gather_kv(kc, seq), gather_kv(vc, seq)
    bc, bo, cc, ci = fa2_index(index, geom)
    ours = sparse_attention(q, k, v, index, SCALE)
    full = fa2_sparse_reference(q, kk, vv, bc, bo, cc, ci, seq.cu_seqlens_q, seq.cu_seqlens_k, n, L,
                                softmax_scale=SCALE, causal=True)
    torch.testing.assert_close(full, ours, rtol=1e-4, atol=1e-4)
    dropped = bc.clone()
    dropped[0, 0, 2] -= 1  # head 0, query block 2 loses its first window (the masked ones stay last)
    bo_dropped = bo.clone()
    bo_dropped[0, 0, 2, :-1] = bo[0, 0, 2, 1:]
    worse = fa2_sparse_reference(q, kk, vv, dropped, bo_dropped, cc, ci, seq.cu_seqlens_q, seq.cu_seqlens_k, n, L,
                                 softmax_scale=SCALE, causal=True)
    assert not torch.allclose(worse, ours, rtol=1e-4, atol=1e-4)


def test_short_ranges_are_not_convertible_without_windowing():
    """Why build_index(window_ranges=True): the kernel reads 64 keys per offset, so our ranges as they are
    (a segment's last range is shorter) would make it compute keys the index does not hold."""
    n = L = 700
    q, k, v = _qkv(n, L, seed=4)
    geom = ChunkGeometry(n, L)
    index = build_index(q, k, geom, LayerPlan.uniform("vertical_slash", 6, **TIGHT["vertical_slash"]), SCALE)
    width = index.ranges[..., 1] - index.ranges[..., 0]
    assert ((width < BLOCK) & (torch.arange(width.shape[1]) < index.range_count[:, None])).any()
    assert not torch.allclose(_fa2(q, k, v, index, geom, False), sparse_attention(q, k, v, index, SCALE),
                              rtol=1e-4, atol=1e-4)


def _greedy_windows(ranges):
    """The sequential rule window_ranges computes in parallel: a window starts at the first uncovered key."""
    out, end = [], None
    for s, e in ranges:
        if end is None or s >= end:
            out.append(s)
            end = s + BLOCK
        while end < e:
            out.append(end)
            end += BLOCK
    return out


def test_window_ranges_is_the_greedy_cover():
    rng = random.Random(0)
    for _ in range(200):
        S, L = rng.randint(1, 40), rng.choice([100, 300, 2000])
        g = torch.Generator().manual_seed(rng.randrange(1 << 30))
        diagonals = torch.stack([torch.randperm(L, generator=g)[:S] for _ in range(3)])
        ranges, count = ranges_from_diagonals(diagonals, torch.rand(3, S, generator=g) < 0.8)
        windows, wcount = window_ranges(ranges, count)
        for h in range(3):
            rs = [tuple(x) for x in ranges[h, :count[h]].tolist()]
            got = windows[h, :wcount[h], 0].tolist()
            assert got == _greedy_windows(rs)
            assert (windows[h, :wcount[h], 1] - windows[h, :wcount[h], 0] == BLOCK).all()
            assert (windows[h, wcount[h]:] == RANGE_PAD).all() and wcount[h] <= count[h]
            keys = {x for s, e in rs for x in range(s, e)}
            covered = [x for s in got for x in range(s, s + BLOCK)]
            assert keys <= set(covered) and len(covered) == len(set(covered))


def _flash_layout_cache(x, page, dtype, seed=1, tail=float("nan")):
    """[L, H, d] -> FlashAttention's cache layout ([num_blocks, page, H, d] memory viewed [num_blocks, H, page, d]),
    shuffled blocks, spare ones, the last block's rows past L and the spare blocks ``tail`` (what stale or
    another sequence's rows may hold), and the sequence's blocks."""
    L, H, d = x.shape
    n = -(-L // page)
    perm = torch.randperm(n + 3, generator=torch.Generator().manual_seed(seed))[:n]
    memory = torch.full((n + 3, page, H, d), tail, dtype=dtype)
    padded = torch.full((n * page, H, d), tail, dtype=dtype)
    padded[:L] = x.to(dtype)
    memory[perm] = padded.view(n, page, H, d)
    return memory.transpose(1, 2), perm


def _packed_kv_cache(k, v, page, dtype, tail=float("nan")):
    """vLLM 0.26's FlashAttention cache: K and V packed per token and head ([num_blocks, page, H, 2d] memory, logical
    [num_blocks, H, page, 2d]), split into K and V views as kvplug's compat does (kvplug/compat/common.py)."""
    kc, blocks = _flash_layout_cache(k, page, dtype, tail=tail)
    vc, _ = _flash_layout_cache(v, page, dtype, tail=tail)
    packed = torch.cat([kc.transpose(1, 2), vc.transpose(1, 2)], -1).transpose(1, 2)  # memory [nb, page, H, 2d]
    d = k.shape[-1]
    return (packed[..., :d], packed[..., d:]), blocks


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("page", [16, 128])
@pytest.mark.parametrize("L", [1, 700, 1024, 1123])
def test_whole_page_gather_is_the_per_token_gather(dtype, page, L):
    """sparse_prefill.fa2_whole_page_gather: the same K/V rows as the per-token gather, bit for bit, and zero rows
    past L however many the kernel may reach (the last block's tail is NaN here), in FlashAttention's layout, vLLM
    0.26's packed one (K and V of a token and head side by side) and a head-major one."""
    g = torch.Generator().manual_seed(L)
    x, y = torch.randn(L, 2, 32, generator=g), torch.randn(L, 2, 32, generator=g)
    geom = ChunkGeometry(min(L, 5), L)
    (packed_k, packed_v), packed_blocks = _packed_kv_cache(x, y, page, dtype)
    assert fa2_sparse._wide_words_ok(packed_v.transpose(1, 2))  # V's view starts d elements in: still whole words
    layouts = [_flash_layout_cache(x, page, dtype), _paged(x.to(dtype), page), (packed_k, packed_blocks)]
    for cache, blocks in layouts:
        seq = SequenceKV.build(blocks, page, geom)
        per_token, pages = gather_kv(cache, seq), gather_kv(cache, seq, whole_pages=True)
        assert pages.is_contiguous() and pages.shape[0] >= L + fa2_sparse.PAD_KEYS
        assert torch.equal(pages[:L], per_token[:L]) and torch.equal(pages[:L], x.to(dtype))
        assert not pages[L:].any() and not per_token[L:].any()
    seq = SequenceKV.build(packed_blocks, page, geom)
    assert torch.equal(gather_kv(packed_v, seq, whole_pages=True)[:L], y.to(dtype))


def test_whole_page_gather_without_wide_words_is_the_same():
    """A layout whose rows cannot be read as 8-byte words (odd head dim) takes the element copy: the same rows."""
    x = torch.randn(300, 2, 6).to(torch.bfloat16)[..., :5]  # head dim 5: no whole 8-byte words
    cache, blocks = _paged(x.contiguous().float(), 16)
    cache = cache.to(torch.bfloat16)
    assert not fa2_sparse._wide_words_ok(cache.transpose(1, 2))
    seq = SequenceKV.build(blocks, 16, ChunkGeometry(100, 300))
    assert torch.equal(gather_kv(cache, seq, whole_pages=True)[:300], gather_kv(cache, seq)[:300])


@pytest.mark.parametrize("n,L", [(300, 1000), (257, 1123), (130, 190)])
def test_whole_page_gather_attends_the_same(n, L):
    """Over the whole-page K/V (token-major, NaN past L in the cache) the kernel's semantics give today's output
    exactly: the same index from the same keys, the same pairs from the same values."""
    q, k, v = _qkv(n, L)
    geom = ChunkGeometry(n, L)
    plan = LayerPlan.uniform("vertical_slash", q.shape[1], **TIGHT["vertical_slash"])
    kc, blocks = _flash_layout_cache(k, 16, torch.float32)
    vc, _ = _flash_layout_cache(v, 16, torch.float32)
    seq = SequenceKV.build(blocks, 16, geom)
    outs = []
    for pages in (False, True):
        kk, vv = gather_kv(kc, seq, pages), gather_kv(vc, seq, pages)
        index = build_index(q, kk[:L], geom, plan, SCALE, trim_columns=False, window_ranges=True)
        outs.append(fa2_sparse.attend(fa2_sparse_reference, q, kk, vv, index, geom, SCALE,
                                      torch.full_like(q, float("nan")), seq))
    assert torch.equal(outs[0], outs[1]) and not outs[1].isnan().any()
