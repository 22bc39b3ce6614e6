"""head_config.build_index with IndexOptions(compiled_index=True) (sparse_prefill.compiled_index): the
torch.compile'd build gives the eager index element for element, in far fewer top-level ops (what makes it launch-bound on the GPU). CPU: inductor
compiles C++ here (gcc); the first call compiles (~30-60 s on 2 cores), the geometries after it mostly reuse it
(dynamic shapes), so the geometries share one test."""
from __future__ import annotations

import collections
from dataclasses import replace

import pytest
import torch
from torch._dynamo.utils import counters
from torch.profiler import ProfilerActivity, profile

from attention_backends.sparse_prefill import head_config
from attention_backends.sparse_prefill.head_config import HeadPattern, LayerPlan, PatternConfig, build_index
from attention_backends.sparse_prefill.index import ChunkGeometry
from attention_backends.sparse_prefill.index_options import IndexOptions

HQ, HKV, D = 8, 2, 32
FIELDS = ("block_mask", "cols", "col_count", "ranges", "range_count", "range_first")


def _inputs(n: int, L: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n, HQ, D, generator=gen).to(torch.bfloat16)
    k = torch.randn(L, HKV, D, generator=gen).to(torch.bfloat16)
    return q, k, ChunkGeometry(n, L)


def _mixed_plan() -> LayerPlan:
    """Heads 0-2 vertical-slash (two budgets), 3 block-sparse, 4-5 A-shape, 6-7 dense: every group kind
    build_index handles."""
    cfg = PatternConfig(default=HeadPattern(pattern="vertical_slash", budgets={"vertical": 40, "slash": 48}),
                        layers={0: {0: HeadPattern(pattern="vertical_slash", budgets={"vertical": 20, "slash": 30}),
                                    3: HeadPattern(pattern="block_sparse", budgets={"top_k": 3}),
                                    4: HeadPattern(pattern="a_shape", budgets={"sink": 64, "window": 128}),
                                    5: HeadPattern(pattern="a_shape", budgets={"sink": 64, "window": 128}),
                                    6: HeadPattern(pattern="dense"), 7: HeadPattern(pattern="dense")}}).validate()
    return LayerPlan.from_config(cfg, 0, HQ)


def _assert_same(got, want, what: str) -> None:
    for f in FIELDS:
        a, b = getattr(got, f), getattr(want, f)
        assert a.shape == b.shape and a.dtype == b.dtype, f"{what}: {f} {a.shape}/{a.dtype} != {b.shape}/{b.dtype}"
        assert torch.equal(a, b), f"{what}: {f} differs in {int((a != b).sum())} entries"


# (n, L): the whole prompt, a chunk at an offset, lengths that are not multiples of 64
GEOMETRIES = ((1024, 1024), (512, 2048), (700, 1999))
# (options, per call site keywords)
VARIANTS = ((IndexOptions(), dict(trim_columns=False, window_ranges=True)),  # as the fa2_sparse executor builds it
            (IndexOptions(), dict(trim_columns=True)),  # as the CPU path builds it
            (IndexOptions(group_shared_selection=True, dense_tail_rows=100), dict(trim_columns=False)),
            (IndexOptions(group_shared_selection=True, dense_tail_rows=64), dict(trim_columns=False, window_ranges=True)))
COMPILED = IndexOptions(compiled_index=True)


@torch._dynamo.config.patch(fail_on_recompile_limit_hit=True)  # a silent fallback to eager would prove nothing
def test_compiled_index_equals_eager():
    uniform = LayerPlan.uniform("vertical_slash", HQ, vertical=50, slash=64)
    for plan_name, plan in (("uniform", uniform), ("mixed", _mixed_plan())):
        for n, L in GEOMETRIES:
            q, k, geom = _inputs(n, L, seed=n + L)
            for options, kw in VARIANTS:
                want = build_index(q, k, geom, plan, D ** -0.5, options, **kw)
                got = build_index(q, k, geom, plan, D ** -0.5, replace(options, compiled_index=True), **kw)
                _assert_same(got, want, f"{plan_name} n={n} L={L} {options} {kw}")
    assert head_config.compiled_fallback is None  # compiled, not run eager after a failed compile


@torch._dynamo.config.patch(fail_on_recompile_limit_hit=True)
def test_equal_options_reuse_the_compiled_graph():
    """IndexOptions reaches the compiled build as a constant: dynamo guards on the values of the fields the build
    reads, not on the object. A runner's options rebuilt equal (set_override, a new runner) and fields the build
    does not read (fused_estimate: the caller's choice of keys; compiled_index) reuse the graph; a field that
    changes the build (group-shared selection) compiles another (the count is live)."""
    q, k, geom = _inputs(512, 2048, seed=3)
    plan = LayerPlan.uniform("vertical_slash", HQ, vertical=50, slash=64)

    def graphs_after(options: IndexOptions) -> int:
        build_index(q, k, geom, plan, D ** -0.5, options, trim_columns=False)
        return counters["stats"]["unique_graphs"]

    compiled = graphs_after(IndexOptions(compiled_index=True, dense_tail_rows=64))
    for options in (IndexOptions(compiled_index=True, dense_tail_rows=64),
                    IndexOptions(compiled_index=True, dense_tail_rows=64, fused_estimate=True)):
        assert graphs_after(options) == compiled, f"{options} compiled again"
    assert graphs_after(IndexOptions(compiled_index=True, dense_tail_rows=64, group_shared_selection=True)) > compiled
    assert head_config.compiled_fallback is None


def test_failed_compile_runs_eager_with_the_same_index(monkeypatch, caplog):
    """A compile error must not fail the chunk: the build runs eager (same index) and says why, once."""
    def broken(*args):
        raise torch._inductor.exc.InductorError(RuntimeError("no compiler"), None)

    monkeypatch.setattr(head_config, "_compiled_build", None)
    monkeypatch.setattr(head_config, "compiled_fallback", None)
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: broken)
    q, k, geom = _inputs(300, 700)
    plan = LayerPlan.uniform("vertical_slash", HQ, vertical=50, slash=64)
    want = build_index(q, k, geom, plan, D ** -0.5)
    with caplog.at_level("WARNING"):
        _assert_same(build_index(q, k, geom, plan, D ** -0.5, COMPILED), want, "fallback")
        _assert_same(build_index(q, k, geom, plan, D ** -0.5, COMPILED), want, "fallback, again")
    assert "no compiler" in head_config.compiled_fallback
    assert sum("could not compile" in r.getMessage() for r in caplog.records) == 1


def _top_level_ops(fn) -> collections.Counter:
    fn()  # warm: the compile (if any) stays out of the count
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return collections.Counter(e.name for e in prof.events() if e.name.startswith("aten::") and (
        e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))


def test_compiled_index_issues_fewer_ops():
    """A count, not a time: each top-level aten op is at least one kernel launch on the GPU."""
    q, k, geom = _inputs(1024, 4096)
    plan = LayerPlan.uniform("vertical_slash", HQ, vertical=50, slash=64)
    kw = dict(trim_columns=False, window_ranges=True)
    eager = _top_level_ops(lambda: build_index(q, k, geom, plan, D ** -0.5, **kw))
    compiled = _top_level_ops(lambda: build_index(q, k, geom, plan, D ** -0.5, COMPILED, **kw))
    n_eager, n_compiled = sum(eager.values()), sum(compiled.values())
    assert n_eager >= 150, eager.most_common(10)  # the eager build's op storm is what this replaces
    assert n_compiled * 3 <= n_eager, (n_eager, n_compiled, compiled.most_common(15))


@pytest.mark.parametrize("bad", ["yes please", 3])
def test_compiled_index_config_is_a_bool(bad):
    import msgspec

    from attention_backends.sparse_prefill.config import SparsePrefillConfig

    assert SparsePrefillConfig().compiled_index is False
    assert msgspec.convert({"compiled_index": True}, SparsePrefillConfig).compiled_index is True
    with pytest.raises(msgspec.ValidationError, match="compiled_index"):
        msgspec.convert({"compiled_index": bad}, SparsePrefillConfig)
