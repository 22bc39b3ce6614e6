"""sparse_prefill.gqa_shaped_estimate: vertical-slash's torch estimate scores whole GQA groups against their KV head's
keys in place (a slice of k, one GEMM per KV head) instead of gathering a copy of the keys per query head. The votes
are the per-head path's up to GEMM rounding, so the selected index is the same on random fp32 inputs; and with the
option on no key gather happens (the point of it: ~224 ms of copies in a 128K first turn on the H100)."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from attention_backends.sparse_prefill.head_config import HeadPattern, LayerPlan, PatternConfig, build_index
from attention_backends.sparse_prefill.index import ChunkGeometry
from attention_backends.sparse_prefill.index_options import IndexOptions
from attention_backends.sparse_prefill.patterns.vertical_slash import (HEADS_PER_STEP, column_votes, estimate_lines,
                                                                     gqa_steps)
from kvplug import settings
from tests.attention_backends.sparse_prefill.test_reference import _qkv

SCALE = 0.2
D = 16
FIELDS = ("block_mask", "cols", "col_count", "ranges", "range_count", "range_first")
# (query heads, KV heads): Llama-3-8B, Qwen2.5-0.5B, Qwen2.5-1.5B, a group of 3, MHA
GQA_SHAPES = [(32, 8), (14, 2), (12, 2), (9, 3), (6, 6)]


class KeyGathers(TorchDispatchMode):
    """Counts the aten index ops that copy rows out of a [Hkv, L, d] key tensor (an advanced-index gather of
    whole key rows: what the per-head estimate does once per step)."""

    def __init__(self, num_kv: int, head_dim: int):
        super().__init__()
        self.num_kv, self.head_dim, self.count = num_kv, head_dim, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.index.Tensor, torch.ops.aten.index_select.default):
            src = args[0]
            if src.dim() == 3 and src.shape[0] == self.num_kv and src.shape[-1] == self.head_dim:
                self.count += 1
        return func(*args, **(kwargs or {}))


def _heads(Hq, Hkv, n, L, seed):
    q, k, _ = _qkv(n, L, Hq=Hq, Hkv=Hkv, d=D, seed=seed)
    kv_ids = torch.arange(Hq) // (Hq // Hkv)
    return q.transpose(0, 1), k.transpose(0, 1), kv_ids


@pytest.mark.parametrize("Hq,Hkv", GQA_SHAPES)
@pytest.mark.parametrize("n,L", [(200, 700), (90, 1123), (40, 40)])
def test_gqa_votes_equal_the_per_head_votes_and_copy_no_keys(Hq, Hkv, n, L):
    qh, kh, kv_ids = _heads(Hq, Hkv, n, L, seed=Hq + n)
    geom = ChunkGeometry(n, L)
    host = tuple(kv_ids.tolist())
    with KeyGathers(Hkv, D) as per_head:
        want_v, want_s = estimate_lines(qh, kh, kv_ids, geom, SCALE)
        want_c = column_votes(qh, kh, kv_ids, geom, SCALE, n // 2 + 1)  # a segment's vote
    with KeyGathers(Hkv, D) as gqa:
        got_v, got_s = estimate_lines(qh, kh, kv_ids, geom, SCALE, host)
        got_c = column_votes(qh, kh, kv_ids, geom, SCALE, n // 2 + 1, host)
    for got, want in ((got_v, want_v), (got_s, want_s), (got_c, want_c)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert per_head.count > 0  # the spy sees the per-head gather ...
    assert gqa.count == 0  # ... and none with the option


@pytest.mark.parametrize("kv", [(0, 0, 1, 1, 1, 1, 2, 2),  # a per-head config's heads: unequal runs
                                (0, 0, 0, 0, 2, 2, 2, 2),  # whole groups, not consecutive KV heads
                                (1, 0, 1, 0), (0,) * 11])  # out of order; one group longer than a step
def test_any_heads_subset_scores_without_a_gather(kv):
    """Heads that are not whole consecutive groups (a per-head config's subset of a layer's heads) are stepped by
    runs of one KV head: the same votes as the per-head gather, and no gather."""
    qh, kh, _ = _heads(len(kv), 3, 100, 300, seed=5)
    kv_ids = torch.tensor(kv)
    geom = ChunkGeometry(100, 300)
    want = estimate_lines(qh, kh, kv_ids, geom, SCALE)
    with KeyGathers(3, D) as spy:
        got = estimate_lines(qh, kh, kv_ids, geom, SCALE, kv)
    assert spy.count == 0
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("group,kv_heads,steps", [
    (4, 8, [(0, 8, 0, 2), (8, 8, 2, 2), (16, 8, 4, 2), (24, 8, 6, 2)]),  # Llama-3-8B: two whole groups a step
    (7, 2, [(0, 7, 0, 1), (7, 7, 1, 1)]),  # Qwen2.5-0.5B: a group a step
    (6, 2, [(0, 6, 0, 1), (6, 6, 1, 1)]),  # Qwen2.5-1.5B
    (3, 3, [(0, 6, 0, 2), (6, 3, 2, 1)]),
    (1, 10, [(0, 8, 0, 8), (8, 2, 8, 2)]),  # MHA: 8 heads a step, as without the option
    (12, 2, [(0, 8, 0, 1), (8, 4, 0, 1), (12, 8, 1, 1), (20, 4, 1, 1)]),  # groups beyond a step: cut
])
def test_gqa_steps_cover_whole_groups_within_the_step_bound(group, kv_heads, steps):
    assert HEADS_PER_STEP == 8
    assert gqa_steps(tuple(h // group for h in range(group * kv_heads))) == steps


def test_gqa_steps_of_a_subset():
    assert gqa_steps((0, 0, 1, 1, 1, 1, 2, 2)) == [(0, 2, 0, 1), (2, 4, 1, 1), (6, 2, 2, 1)]
    assert gqa_steps((0, 0, 0, 0, 2, 2, 2, 2)) == [(0, 4, 0, 1), (4, 4, 2, 1)]
    assert gqa_steps((1, 0, 1, 0)) == [(0, 1, 1, 1), (1, 2, 0, 2), (3, 1, 0, 1)]  # heads 1, 2: KV heads 0, 1


def _per_head_plan(Hq: int) -> LayerPlan:
    """Vertical-slash on heads 0-3 and 6.. (whole groups of 2 and a split one), block-sparse on 4, A-shape on 5."""
    cfg = PatternConfig(default=HeadPattern(pattern="vertical_slash", budgets={"vertical": 30, "slash": 40}),
                        layers={0: {4: HeadPattern(pattern="block_sparse", budgets={"top_k": 3}),
                                    5: HeadPattern(pattern="a_shape", budgets={"sink": 64, "window": 128})}})
    return LayerPlan.from_config(cfg.validate(), 0, Hq)


@pytest.mark.parametrize("Hq,Hkv", GQA_SHAPES)
@pytest.mark.parametrize("extra", [IndexOptions(), IndexOptions(vertical_segment_rows=128),
                                   IndexOptions(group_shared_selection=True)])
def test_the_option_selects_the_same_index_and_reaches_the_estimate(Hq, Hkv, extra):
    """build_index with gqa_shaped_estimate: the index the default build selects, element for element (random fp32
    inputs: no near-ties), with no key gather in the uniform plan's build (the option reached the estimate)."""
    n, L = 400, 1300
    q, k, _ = _qkv(n, L, Hq=Hq, Hkv=Hkv, d=D, seed=Hq * Hkv)
    geom = ChunkGeometry(n, L)
    on = IndexOptions(**{**vars(extra), "gqa_shaped_estimate": True})
    for plan in (LayerPlan.uniform("vertical_slash", Hq, vertical=40, slash=64), _per_head_plan(Hq)):
        with KeyGathers(Hkv, D) as default_gathers:
            want = build_index(q, k, geom, plan, SCALE, extra)
        with KeyGathers(Hkv, D) as gqa_gathers:
            got = build_index(q, k, geom, plan, SCALE, on)
        for f in FIELDS:
            assert torch.equal(getattr(got, f), getattr(want, f)), f
        # vertical-slash gathers no keys with the option (block-sparse still does: the per-head plan's remaining ones)
        assert default_gathers.count > 0
        assert gqa_gathers.count == 0 if len(plan.groups) == 1 else gqa_gathers.count < default_gathers.count


def test_config_key_default_off_and_settable():
    assert settings.resolve(environ={}).sparse_prefill.gqa_shaped_estimate is False
    assert IndexOptions().gqa_shaped_estimate is False
    on = settings.resolve(sets=["sparse_prefill.gqa_shaped_estimate=true"], environ={}).sparse_prefill
    assert on.index_options("cuda").gqa_shaped_estimate is True
    with pytest.raises(settings.KvplugConfigError, match="gqa_shaped_estimate"):
        settings.resolve(sets=["sparse_prefill.gqa_shaped_estimate=maybe"], environ={})


@torch._dynamo.config.patch(fail_on_recompile_limit_hit=True)
def test_compiled_build_takes_the_option_and_is_keyed_on_it():
    """The compiled index build (compiled_index) with the option: the eager option's index, element for element, from
    a graph of its own (dynamo guards on the field; the default's graph is not reused for it)."""
    from torch._dynamo.utils import counters

    from attention_backends.sparse_prefill import head_config

    q, k, _ = _qkv(300, 900, Hq=8, Hkv=2, d=D, seed=21)
    geom = ChunkGeometry(300, 900)
    plan = LayerPlan.uniform("vertical_slash", 8, vertical=40, slash=64)

    def graphs_after(options: IndexOptions):
        index = build_index(q, k, geom, plan, SCALE, options, trim_columns=False)
        return index, counters["stats"]["unique_graphs"]

    _, default_graphs = graphs_after(IndexOptions(compiled_index=True))
    got, gqa_graphs = graphs_after(IndexOptions(compiled_index=True, gqa_shaped_estimate=True))
    assert gqa_graphs > default_graphs
    want = build_index(q, k, geom, plan, SCALE, IndexOptions(gqa_shaped_estimate=True), trim_columns=False)
    for f in FIELDS:
        assert torch.equal(getattr(got, f), getattr(want, f)), f
    assert head_config.compiled_fallback is None
