"""Group-shared selection (build_index with IndexOptions(group_shared_selection=True)): one set of keys per KV group
from summed votes."""
from __future__ import annotations

import pytest
import torch

from attention_backends.sparse_prefill.head_config import HeadPattern, LayerPlan, PatternConfig, build_index
from attention_backends.sparse_prefill.index import ChunkGeometry
from attention_backends.sparse_prefill.index_options import IndexOptions
from attention_backends.sparse_prefill.patterns import registry
from attention_backends.sparse_prefill.patterns.vertical_slash import estimate_lines

SHARED = IndexOptions(group_shared_selection=True)


def _case(Hq=6, Hkv=2, n=200, L=700, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, Hq, d, generator=g), torch.randn(L, Hkv, d, generator=g), ChunkGeometry(n, L)


@pytest.mark.parametrize("pattern,budgets", [("vertical_slash", {"vertical": 40, "slash": 70}),
                                             ("block_sparse", {"top_k": 3})])
def test_group_shared_index_is_one_selection_per_group(pattern, budgets):
    q, k, geom = _case()
    plan = LayerPlan.uniform(pattern, 6, **budgets)
    per_head = build_index(q, k, geom, plan, 0.3, trim_columns=False)
    shared = build_index(q, k, geom, plan, 0.3, SHARED, trim_columns=False)
    assert not per_head.is_group_shared(3)  # random Q: the heads of a group disagree (else this test says nothing)
    assert shared.is_group_shared(3)
    # same budget per head: the shared index computes about as many pairs per head as a per-head one
    ratio = shared.computed_pairs(geom).sum() / per_head.computed_pairs(geom).sum()
    assert 0.8 < float(ratio) < 1.25


def test_group_shared_columns_are_the_top_summed_votes():
    """The group's columns are the top-k of the summed per-head vertical votes (forced first columns aside)."""
    q, k, geom = _case(n=64, L=900)
    budgets = {"vertical": 40, "slash": 1}
    shared = build_index(q, k, geom, LayerPlan.uniform("vertical_slash", 6, **budgets), 0.3, SHARED,
                         trim_columns=False)
    kv_ids = torch.arange(6) // 3
    vertical, _ = estimate_lines(q.transpose(0, 1), k.transpose(0, 1), kv_ids, geom, 0.3)
    for grp in range(2):
        votes = vertical[grp * 3:grp * 3 + 3].sum(0)
        votes[:30] = float("inf")  # FORCED_COLUMNS
        want = set(torch.topk(votes, 40).indices.tolist())
        # columns inside the selected ranges are dropped from cols (compact_columns); the rest must be the top-k
        mask = shared.dense_mask(geom)[grp * 3, -1]  # last row sees every selected column
        got_cols = set(mask.nonzero().flatten().tolist())
        assert want <= got_cols
        for j in range(1, 3):
            assert torch.equal(shared.dense_mask(geom)[grp * 3 + j], shared.dense_mask(geom)[grp * 3])


def test_group_shared_keeps_per_head_budgets_as_prefixes():
    """Heads of one group with different budgets take prefixes of the group's ranking (the smaller budget's
    keys are a subset of the larger's), and a head in another pattern is left alone."""
    q, k, geom = _case()
    heads = {0: HeadPattern(pattern="vertical_slash", budgets={"vertical": 10, "slash": 20}),
             2: HeadPattern(pattern="a_shape", budgets={"sink": 64, "window": 100})}
    cfg = PatternConfig(default=HeadPattern(pattern="vertical_slash", budgets={"vertical": 40, "slash": 70}),
                        layers={0: heads}).validate()
    plan = LayerPlan.from_config(cfg, 0, 6)
    shared = build_index(q, k, geom, plan, 0.3, SHARED, trim_columns=False).dense_mask(geom)
    alone = build_index(q, k, geom, plan, 0.3, trim_columns=False).dense_mask(geom)
    assert (shared[0] <= shared[1]).all() and not torch.equal(shared[0], shared[1])
    assert torch.equal(shared[2], alone[2])  # a_shape is static
    assert torch.equal(shared[3], shared[4]) and torch.equal(shared[4], shared[5])


def test_every_pattern_accepts_group_shared():
    q, k, geom = _case()
    for name in registry.PATTERNS:
        plan = LayerPlan.uniform(name, 6)
        assert build_index(q, k, geom, plan, 0.3, SHARED).is_group_shared(3)


def test_group_uniform_plan_compacts_once_per_group_with_the_same_result(monkeypatch):
    """A group-uniform plan compacts columns once per KV group; the index equals compacting every head."""
    from attention_backends.sparse_prefill import head_config

    q, k, geom = _case(Hq=8, Hkv=2)
    plan = LayerPlan.uniform("vertical_slash", 8, vertical=40, slash=70)
    assert plan.group_uniform(4) and not LayerPlan.from_config(PatternConfig(
        layers={0: {1: HeadPattern(pattern="a_shape")}}).validate(), 0, 8).group_uniform(4)
    calls = []
    real = head_config.compact_columns
    monkeypatch.setattr(head_config, "compact_columns", lambda cols, *a: calls.append(cols.shape[0]) or real(cols, *a))
    fast = build_index(q, k, geom, plan, 0.3, SHARED, trim_columns=False)
    monkeypatch.setattr(LayerPlan, "group_uniform", lambda self, group: False)
    slow = build_index(q, k, geom, plan, 0.3, SHARED, trim_columns=False)
    assert calls == [2, 8]  # once per KV group, then once per query head
    for name in ("block_mask", "cols", "col_count", "ranges", "range_count", "range_first"):
        assert torch.equal(getattr(fast, name), getattr(slow, name)), name
