"""The sparse prefill bench's xformers columns on the CPU: the density-matched window's arithmetic, the GQA
layout handed to xformers, each op timed or its failure recorded, and a missing xformers reported, not raised.
xformers' kernels need CUDA; here a stand-in module with xformers' call signature computes the attention with
torch, so the plumbing (layout, bias, columns) is what is tested. The window semantics are checked against the
real xformers bias where xformers is importable."""
from __future__ import annotations

import sys
import types

import pytest
import torch

from attention_backends.sparse_prefill.index import ChunkGeometry
from benchmarks.harness import time_cuda
from benchmarks.kernels import xformers_baseline as xb


def brute_band_pairs(n, L, w):
    rows = torch.arange(L - n, L)[:, None]
    keys = torch.arange(L)[None, :]
    return int(((keys <= rows) & (keys > rows - w)).sum())


@pytest.mark.parametrize("n,L", [(1, 1), (7, 7), (100, 100), (30, 100), (1, 64)])
def test_band_pairs_counts_the_window(n, L):
    for w in sorted({1, 2, 5, 29, 30, 31, 70, 99, 100, L}):
        assert xb.band_pairs(n, L, w) == brute_band_pairs(n, L, w), (n, L, w)
    assert xb.band_pairs(n, L, L) == ChunkGeometry(n, L).causal_pairs()


@pytest.mark.parametrize("n,L,density", [(100, 100, 0.3), (30, 100, 0.05), (4096, 4096, 0.25), (1024, 131072, 0.01)])
def test_matched_window_is_the_smallest_with_the_pairs(n, L, density):
    target = density * xb.band_pairs(n, L, L)
    w = xb.matched_window(n, L, target)
    assert xb.band_pairs(n, L, w) >= target
    assert w == 1 or xb.band_pairs(n, L, w - 1) < target
    assert xb.matched_window(n, L, xb.band_pairs(n, L, L)) == L


def test_gqa_layout_maps_query_head_to_its_kv_head():
    n, L, Hq, Hkv, d = 5, 6, 8, 2, 4
    q, k, v = torch.randn(n, Hq, d), torch.randn(L, Hkv, d), torch.randn(L, Hkv, d)
    q5, k5, v5 = xb.to_bmghk(q, k, v)
    g = Hq // Hkv
    assert q5.shape == (1, n, Hkv, g, d) and k5.shape == v5.shape == (1, L, Hkv, g, d)
    assert k5.stride(3) == 0 and v5.stride(3) == 0  # expanded, not copied: xformers' GQA form
    for h in range(Hq):
        assert torch.equal(q5[0, :, h // g, h % g], q[:, h])
        assert torch.equal(k5[0, :, h // g, h % g], k[:, h // g])
        assert torch.equal(v5[0, :, h // g, h % g], v[:, h // g])
    assert torch.equal(xb.from_bmghk(q5), q)


def fake_fmha(fail_cutlass: bool = True):
    """xformers.ops.fmha's surface the bench uses, computing attention with torch on the 5-D inputs as
    xformers defines them (head (g, h) of the query reads head (g, h) of the expanded K/V)."""
    class BottomRight:
        window = None

        def materialize(self, shape):
            n, L = shape
            rows, keys = torch.arange(L - n, L)[:, None], torch.arange(L)[None, :]
            ok = (keys <= rows) & ((keys > rows - self.window) if self.window else True)
            return ok

    class Local(BottomRight):
        def __init__(self, window):
            self.window = window

    class Flash:
        NAME = "fa2F@fake-pt"

    class Cutlass:
        NAME = "cutlassF-pt"

    calls = []

    def forward(q5, k5, v5, attn_bias=None, scale=None, op=None):
        calls.append((op.NAME, q5.shape, k5.stride(), getattr(attn_bias, "window", None)))
        if op is Cutlass and fail_cutlass:
            raise ValueError("Operator cutlassF-pt does not support inputs: (why)")
        _, n, G, H, d = q5.shape
        L = k5.shape[1]
        qt, kt, vt = (x.reshape(x.shape[1], G * H, d).transpose(0, 1) for x in (q5, k5, v5))
        mask = attn_bias.materialize((n, L))
        out = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale)
        return out.transpose(0, 1).reshape(1, n, G, H, d)

    fmha = types.SimpleNamespace(
        attn_bias=types.SimpleNamespace(LowerTriangularFromBottomRightMask=BottomRight,
                                        LowerTriangularFromBottomRightLocalAttentionMask=Local),
        flash=types.SimpleNamespace(FwOp=Flash), cutlass=types.SimpleNamespace(FwOp=Cutlass),
        memory_efficient_attention_forward=forward, calls=calls)
    return fmha


def timing(fn):
    return time_cuda(fn, warmup=0, iters=1, device="cpu")


@pytest.fixture(scope="module")
def qkv():
    from benchmarks.kernels.sparse_prefill_bench import synthetic_qkv

    return tuple(synthetic_qkv(300, 4, 2, 16, "cpu", torch.float32))


def test_dense_columns_time_each_op_and_record_a_failing_one(qkv):
    q, k, v = qkv
    fmha = fake_fmha()
    dense = torch.nn.functional.scaled_dot_product_attention(
        *(x.transpose(0, 1)[None] for x in (q, k, v)), is_causal=True, scale=0.25, enable_gqa=True)[0].transpose(0, 1)
    cols = xb.dense_columns(fmha, q, k, v, 300, 300, 0.25, timing, dense)
    assert cols["xformers_dense_op"] == "fa2F@fake-pt" and cols["xformers_dense_ms"] > 0
    assert set(cols["xformers_dense_ops_ms"]) == {"fa2F@fake-pt"}
    assert "does not support" in cols["xformers_dense_errors"]["cutlassF-pt"]
    assert cols["rel_err_xformers_dense_vs_sdpa"] < 1e-5  # the layout round trip is exact
    assert all(c[1] == (1, 300, 2, 2, 16) and c[2][3] == 0 and c[3] is None for c in fmha.calls)


def test_local_columns_match_the_index_pairs_and_the_band_reference(qkv):
    q, k, v = qkv
    fmha = fake_fmha(fail_cutlass=False)
    n = 100  # a later chunk: the last 100 rows against all 300 keys
    cols = xb.local_columns(fmha, q[-n:], k, v, n, 300, 0.2, 0.25, timing)
    w = cols["xformers_local_window"]
    assert w == xb.matched_window(n, 300, 0.2 * ChunkGeometry(n, 300).causal_pairs())
    causal = ChunkGeometry(n, 300).causal_pairs()
    assert 0.2 <= cols["xformers_local_density"] < 0.2 + n / causal  # one key more per row would pass it
    assert set(cols["xformers_local_ops_ms"]) == {"fa2F@fake-pt", "cutlassF-pt"} and "xformers_local_errors" not in cols
    assert cols["xformers_local_ms_per_gpair"] > 0
    assert cols["max_abs_err_xformers_local_vs_reference"] < 1e-5
    assert {c[3] for c in fmha.calls} == {w}


def test_no_op_running_leaves_no_timing(qkv):
    q, k, v = qkv
    fmha = fake_fmha()
    fmha.flash = types.SimpleNamespace()  # no FA2 op in this xformers
    cols = xb.local_columns(fmha, q, k, v, 300, 300, 0.5, 0.25, timing)
    assert "xformers_local_ms" not in cols and "cutlassF-pt" in cols["xformers_local_errors"]


def test_load_says_why_xformers_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "xformers", None)  # import fails as if not installed
    fmha, info = xb.load()
    assert fmha is None and info["missing"].startswith("xformers is not importable")


def test_window_semantics_match_real_xformers():
    """Our band (row i attends keys (i - w, i], aligned to the last key) is the one xformers' bias computes."""
    xformers = pytest.importorskip("xformers")
    from xformers.ops import fmha

    assert xb.load()[1]["version"] == xformers.__version__
    for n, L, w in ((40, 40, 7), (10, 40, 7), (10, 40, 40), (1, 9, 3)):
        got = torch.isfinite(xb.biases(fmha, w).materialize((n, L)))
        rows, keys = torch.arange(L - n, L)[:, None], torch.arange(L)[None, :]
        assert torch.equal(got, (keys <= rows) & (keys > rows - w)), (n, L, w)
        assert int(got.sum()) == xb.band_pairs(n, L, w)
        assert torch.equal(torch.isfinite(xb.biases(fmha).materialize((n, L))), keys <= rows)
    assert {"cutlassF-pt"} <= set(xb.forward_ops(fmha))


def test_load_reports_the_extension_loader_error(monkeypatch):
    """xformers imports but its _C.so does not load (0.0.35 on a CUDA 13 torch: no libcudart.so.12): the
    report names the loader's own error, and the fmha ops (torch's kernels) stay usable."""
    try:
        try:
            raise OSError("libcudart.so.12: cannot open shared object file")
        except OSError as inner:
            raise OSError("Could not load this library: _C.so") from inner
    except OSError as outer:
        try:
            raise RuntimeError("xFormers can't load C++/CUDA extensions") from outer
        except RuntimeError as top:
            failure = top
    package = types.ModuleType("xformers")
    package.__version__ = "9.9.9"
    package.__path__ = []
    ops = types.ModuleType("xformers.ops")
    ops.fmha = fake_fmha()
    cpp = types.ModuleType("xformers._cpp_lib")
    cpp._cpp_library_load_exception = failure
    package._cpp_lib = cpp
    for name, module in (("xformers", package), ("xformers.ops", ops), ("xformers._cpp_lib", cpp)):
        monkeypatch.setitem(sys.modules, name, module)
    fmha, info = xb.load()
    assert fmha is ops.fmha and info["version"] == "9.9.9"
    assert info["cpp_extension"] == "not loaded: OSError: libcudart.so.12: cannot open shared object file"
    cpp._cpp_library_load_exception = None
    assert xb.load()[1]["cpp_extension"] == "loaded"


def test_refusal_keeps_xformers_reasons_not_the_shapes():
    """The H100 run of 2026-12-07 stored 400 characters of shapes and lost the reason every op refused."""
    shapes = "     query       : shape=(1, 32768, 8, 4, 128) (torch.bfloat16)\n" * 8
    exc = ValueError("Operator `memory_efficient_attention` does not support inputs:\n" + shapes
                     + "`fa2F@2.5.7-pt` is not supported because:\n    xFormers wasn't build with CUDA support")
    assert xb.why_refused(exc) == "ValueError: xFormers wasn't build with CUDA support"
    assert xb.why_refused(RuntimeError("out of memory")) == "RuntimeError: out of memory"
