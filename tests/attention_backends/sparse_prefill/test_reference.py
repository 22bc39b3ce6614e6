"""Sparse prefill torch reference: every pattern, chunked (context + chunk), GQA, against dense attention."""
from __future__ import annotations

import pytest
import torch

from attention_backends.sparse_prefill import head_config
from attention_backends.sparse_prefill.head_config import HeadPattern, LayerPlan, PatternConfig, build_index
from attention_backends.sparse_prefill.index import BLOCK, ChunkGeometry
from attention_backends.sparse_prefill.patterns import registry
from attention_backends.sparse_prefill.patterns.base import PatternBudgetError
from attention_backends.sparse_prefill.reference import attention_recall, dense_attention, sparse_attention

FULL = {"a_shape": {"sink": 0, "window": 1 << 20}, "vertical_slash": {"vertical": 1 << 20, "slash": 1},
        "block_sparse": {"top_k": 1 << 20}}
TIGHT = {"a_shape": {"sink": 64, "window": 128}, "vertical_slash": {"vertical": 40, "slash": 120},
         "block_sparse": {"top_k": 3}}
# (chunk rows, total keys): one-shot prefill, chunks after a context (unaligned, too), a tiny last chunk.
SHAPES = [(700, 700), (300, 1000), (257, 1123), (5, 900)]


def _qkv(n, L, Hq=6, Hkv=2, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, Hq, d, generator=g)
    k = torch.randn(L, Hkv, d, generator=g)
    v = torch.randn(L, Hkv, d, generator=g)
    k[:4] *= 3  # a sink-like key, as real models have
    return q, k, v


@pytest.mark.parametrize("pattern", sorted(registry.PATTERNS))
@pytest.mark.parametrize("n,L", SHAPES)
def test_full_budget_equals_dense(pattern, n, L):
    q, k, v = _qkv(n, L)
    geom = ChunkGeometry(n, L)
    index = build_index(q, k, geom, LayerPlan.uniform(pattern, q.shape[1], **FULL[pattern]), 0.2)
    assert index.density(geom) == pytest.approx(1.0)
    torch.testing.assert_close(sparse_attention(q, k, v, index, 0.2), dense_attention(q, k, v, 0.2),
                               rtol=1e-5, atol=1e-5)
    assert torch.allclose(attention_recall(q, k, index, 0.2), torch.ones(q.shape[1]), atol=1e-5)


@pytest.mark.parametrize("pattern", sorted(registry.PATTERNS))
@pytest.mark.parametrize("n,L", SHAPES)
def test_tight_budget_matches_masked_dense(pattern, n, L):
    """Sparse attention == dense softmax restricted to the index's element mask (computed independently)."""
    q, k, v = _qkv(n, L, seed=1)
    geom = ChunkGeometry(n, L)
    index = build_index(q, k, geom, LayerPlan.uniform(pattern, q.shape[1], **TIGHT[pattern]), 0.2)
    mask = index.dense_mask(geom)  # [H, n, L], causal applied
    assert mask.any(-1).all(), "every query row must see at least one key"
    from attention_backends.sparse_prefill.reference import _gqa_keys
    s = torch.einsum("qhd,hkd->hqk", q, _gqa_keys(k, 6)) * 0.2
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), -1)
    expected = torch.einsum("hqk,hkd->qhd", p, _gqa_keys(v, 6))
    torch.testing.assert_close(sparse_attention(q, k, v, index, 0.2), expected, rtol=1e-4, atol=1e-4)
    # density counts exactly the mask's pairs
    assert index.computed_pairs(geom).sum().item() == mask.sum().item()
    if L >= 900:
        assert index.density(geom) < 0.9


def test_a_shape_is_sink_plus_window_at_block_granularity():
    geom = ChunkGeometry(256, 1024)  # rows at 768..1023
    q, k, _ = _qkv(256, 1024)
    index = build_index(q, k, geom, LayerPlan.uniform("a_shape", 6, sink=64, window=64), 1.0)
    bm = index.block_mask[0]
    # query block 0 (rows 768..831) sees key block 0 (sink) and blocks 11, 12 (window 705..831)
    assert bm[0].nonzero().flatten().tolist() == [0, 11, 12]
    assert bm[3].nonzero().flatten().tolist() == [0, 14, 15]


def test_vertical_slash_finds_planted_column_and_diagonal():
    n = L = 1024
    q, k, v = _qkv(n, L, Hq=2, Hkv=1, d=16)
    q, k = q * 0.1, k * 0.1
    k[500] = q[-64:, 0].mean(0) * 200  # a key every late query loves: a vertical line
    index = build_index(q, k, ChunkGeometry(n, L), LayerPlan.uniform("vertical_slash", 2, vertical=31, slash=100), 1.0)
    cols = index.cols[0, -1, :index.col_count[0, -1]].tolist()
    assert 500 in cols and set(range(30)) <= set(cols) | set(range(64))


def test_block_sparse_keeps_budget_and_forced_blocks():
    geom = ChunkGeometry(1024, 1024)
    q, k, _ = _qkv(1024, 1024)
    index = build_index(q, k, geom, LayerPlan.uniform("block_sparse", 6, top_k=4), 1.0)
    counts = index.block_mask.sum(-1)
    assert (counts <= 4).all() and (counts[:, 4:] == 4).all()
    assert index.block_mask[:, :, 0].all()  # first block always
    assert index.block_mask[:, torch.arange(16), torch.arange(16)].all()  # diagonal always


def test_per_head_config_mixes_patterns_and_dense():
    cfg = PatternConfig(default=HeadPattern(pattern="a_shape", budgets={"sink": 64, "window": 64}),
                        layers={0: {1: HeadPattern(pattern="dense"), 2: HeadPattern(pattern="block_sparse", budgets={"top_k": 2})}})
    plan = LayerPlan.from_config(cfg.validate(), 0, 6)
    geom = ChunkGeometry(512, 1024)
    q, k, v = _qkv(512, 1024)
    index = build_index(q, k, geom, plan, 0.2)
    pairs = index.computed_pairs(geom)
    assert pairs[1] == geom.causal_pairs() and (pairs[[0, 2, 3]] < geom.causal_pairs()).all()
    dense = dense_attention(q, k, v, 0.2)
    torch.testing.assert_close(sparse_attention(q, k, v, index, 0.2)[:, 1], dense[:, 1], rtol=1e-5, atol=1e-5)


def test_recall_is_below_one_when_sparse_and_ordered_by_budget():
    q, k, _ = _qkv(512, 2048)
    geom = ChunkGeometry(512, 2048)
    small = attention_recall(q, k, build_index(q, k, geom, LayerPlan.uniform("block_sparse", 6, top_k=2), .2), .2)
    big = attention_recall(q, k, build_index(q, k, geom, LayerPlan.uniform("block_sparse", 6, top_k=16), .2), .2)
    assert (small < 0.99).all() and (big >= small - 1e-6).all()


@pytest.mark.parametrize("bad,needle", [
    ({"default": {"pattern": "nope"}}, "'nope'"),
    ({"default": {"pattern": "a_shape", "budgets": {"windw": 3}}}, "'windw'"),
    ({"default": {"pattern": "block_sparse", "budgets": {"top_k": 0}}}, "block_sparse.top_k"),
    ({"layers": {"3": {"0": {"pattern": "dense", "budgets": {"x": 1}}}}}, "layers.3.0"),
    ({"num_heads": 2, "layers": {"0": {"5": {"pattern": "dense"}}}}, "layers.0.5"),
    ({"default": {"pattern": "a_shape", "budget": {}}}, "budget"),
])
def test_bad_pattern_config_names_the_key(tmp_path, bad, needle):
    import json
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(PatternBudgetError, match=needle.replace(".", r"\.")) as info:
        head_config.load(path)
    assert str(path) in str(info.value)


def test_config_json_round_trip(tmp_path):
    cfg = PatternConfig(model="m", num_layers=2, num_heads=3,
                        layers={1: {2: HeadPattern(pattern="vertical_slash", budgets={"vertical": 10, "slash": 20}, recall=0.97)}})
    path = tmp_path / "c.json"
    path.write_bytes(cfg.to_json())
    assert head_config.load(path) == cfg


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ranges_from_diagonals_cover_exactly_the_diagonal_intervals(seed):
    """Merged BLOCK-wide ranges == the union of every kept diagonal's interval [-d, -d + BLOCK); disjoint,
    ascending, at most BLOCK wide, no more ranges than diagonals, at most RANGE_TAIL reaching the rows."""
    from attention_backends.sparse_prefill.index import RANGE_PAD, RANGE_TAIL, ranges_from_diagonals

    g = torch.Generator().manual_seed(seed)
    h, S, L = 4, 60, 3000
    diags = torch.stack([torch.cat([torch.arange(5), 5 + torch.randperm(L - 5, generator=g)[:S - 5]]) for _ in range(h)])
    keep = torch.arange(S)[None, :] < torch.tensor([S, 40, 7, 1])[:, None]
    ranges, count = ranges_from_diagonals(diags, keep)
    rel = torch.arange(-L, BLOCK)
    for i in range(h):
        expected = torch.zeros(len(rel), dtype=torch.bool)
        for d in diags[i][keep[i]].tolist():
            expected |= (rel >= -d) & (rel < -d + BLOCK)
        r = ranges[i, :count[i]]
        got = ((rel[:, None] >= r[None, :, 0]) & (rel[:, None] < r[None, :, 1])).sum(1)
        assert (got <= 1).all(), "ranges overlap"
        assert torch.equal(got.bool(), expected)
        assert (r[:, 1] - r[:, 0] <= BLOCK).all() and (r[1:, 0] >= r[:-1, 1]).all()
        assert count[i] <= keep[i].sum() and (ranges[i, count[i]:] == RANGE_PAD).all()
        assert int((r[:, 1] > 0).sum()) <= RANGE_TAIL


def test_scattered_slashes_cost_one_range_per_diagonal_not_two_blocks():
    """Far-apart diagonals: each costs at most BLOCK keys per query row (MInference-style ranges), where
    rounding them to aligned key blocks cost up to 2 * BLOCK; computed pairs still equal the element mask."""
    from attention_backends.sparse_prefill.patterns.vertical_slash import FORCED_DIAGONALS

    n, L = 128, 16384
    q, k, v = _qkv(n, L, Hq=2, Hkv=1, d=16, seed=3)
    geom = ChunkGeometry(n, L)
    index = build_index(q, k, geom, LayerPlan.uniform("vertical_slash", 2, vertical=1, slash=FORCED_DIAGONALS + 40), 0.2)
    assert index.computed_pairs(geom).sum().item() == index.dense_mask(geom).sum().item()
    keys_per_row = index.computed_pairs(geom).double() / n
    assert (keys_per_row <= (FORCED_DIAGONALS + BLOCK) + 40 * BLOCK + 1).all(), keys_per_row
