"""Triton kernels vs the torch reference, under TRITON_INTERPRET=1 on the CPU (small shapes)."""
from __future__ import annotations

import os
import sys

import pytest
import torch

# The interpreter only works if triton is first imported with TRITON_INTERPRET=1; when something earlier in the
# session (vLLM) imported it, test_triton_kernels_fresh.py runs this file in a fresh interpreter instead.
_FRESH_TRITON = "triton" not in sys.modules
if _FRESH_TRITON:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: run kernels on the CPU
IN_PROCESS = torch.cuda.is_available() or (_FRESH_TRITON and os.environ.get("TRITON_INTERPRET") == "1")
if not IN_PROCESS:
    pytest.skip("triton was imported before TRITON_INTERPRET=1; test_triton_kernels_fresh.py runs this file "
                "in a fresh interpreter", allow_module_level=True)
triton = pytest.importorskip("triton", reason="triton is not installed (pip install triton); kernels untested")

from attention_backends.sparse_prefill.group_index import union_index  # noqa: E402
from attention_backends.sparse_prefill.head_config import HeadPattern, LayerPlan, PatternConfig, build_index  # noqa: E402
from attention_backends.sparse_prefill.index import ChunkGeometry  # noqa: E402
from attention_backends.sparse_prefill.index_options import IndexOptions  # noqa: E402
from attention_backends.sparse_prefill.patterns import registry  # noqa: E402
from attention_backends.sparse_prefill.reference import sparse_attention  # noqa: E402

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("triton was imported before TRITON_INTERPRET=1 was set and there is no GPU", allow_module_level=True)

from attention_backends.sparse_prefill import triton_kernels  # noqa: E402

# Interpreted kernels take CPU tensors; compiled ones (TRITON_INTERPRET=0 on a GPU box) take CUDA tensors.
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"

BUDGETS = {"a_shape": {"sink": 64, "window": 100}, "vertical_slash": {"vertical": 40, "slash": 70},
           "block_sparse": {"top_k": 2}}


def _paged(x: torch.Tensor, page: int, transposed: bool, seed: int = 0):
    """Scatter [L, H, d] into a shuffled paged cache [num_blocks, H, page, d]; return (cache view, pages)."""
    L, H, d = x.shape
    nb = -(-L // page)
    perm = torch.randperm(nb + 3, generator=torch.Generator().manual_seed(seed))[:nb]
    padded = torch.zeros(nb * page, H, d)
    padded[:L] = x
    blocks = padded.view(nb, page, H, d).permute(0, 2, 1, 3)
    if transposed:  # CPU_ATTN 'vec' keys: [num_blocks, H, d, page] memory
        cache = torch.zeros(nb + 3, H, d, page)
        cache[perm] = blocks.transpose(-1, -2)
        return cache.transpose(-1, -2), perm
    cache = torch.zeros(nb + 3, H, page, d)
    cache[perm] = blocks
    return cache, perm


def test_compact_blocks_matches_nonzero():
    mask = torch.rand(3, 5, 200, generator=torch.Generator().manual_seed(0)) < 0.3
    ids, counts = (x.cpu() for x in triton_kernels.compact_blocks(mask.to(DEVICE)))
    for h in range(3):
        for qb in range(5):
            expected = mask[h, qb].nonzero().flatten()
            assert counts[h, qb] == len(expected)
            assert ids[h, qb, :len(expected)].long().tolist() == expected.tolist()


KERNELS = {"group": triton_kernels.sparse_attention_paged_group, "per_head": triton_kernels.sparse_attention_paged_per_head,
           "default": triton_kernels.sparse_attention_paged}


@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize("pattern", sorted(registry.PATTERNS))
@pytest.mark.parametrize("n,L,page,transposed", [(130, 130, 16, False), (70, 300, 32, True), (1, 200, 32, False)])
def test_sparse_kernel_matches_reference(kernel, pattern, n, L, page, transposed):
    g = torch.Generator().manual_seed(1)
    Hq, Hkv, d = 4, 2, 32
    q, k, v = torch.randn(n, Hq, d, generator=g), torch.randn(L, Hkv, d, generator=g), torch.randn(L, Hkv, d, generator=g)
    geom = ChunkGeometry(n, L)
    index = build_index(q, k, geom, LayerPlan.uniform(pattern, Hq, **BUDGETS[pattern]), 0.3, trim_columns=False)
    kc, pages = _paged(k, page, transposed)
    vc, _ = _paged(v, page, False)
    expected = sparse_attention(q, k, v, index, 0.3)
    dev_index = index.to(DEVICE)
    got = KERNELS[kernel](q.to(DEVICE), kc.to(DEVICE), vc.to(DEVICE), pages.to(DEVICE), dev_index, geom, 0.3)
    tol = 2e-3 if DEVICE == "cpu" else 2e-2  # tf32 dots on the GPU
    torch.testing.assert_close(got.cpu(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunk_path_matches_reference(dtype):
    """sparse_prefill_paged (index from the paged keys + kernel) == reference on the gathered sequence."""
    g = torch.Generator().manual_seed(2)
    n, L, Hq, Hkv, d = 96, 333, 4, 1, 32
    q, k, v = (torch.randn(s, h, d, generator=g).to(dtype) for s, h in ((n, Hq), (L, Hkv), (L, Hkv)))
    plan = LayerPlan.uniform("vertical_slash", Hq, vertical=40, slash=70)
    geom = ChunkGeometry(n, L)
    kc, pages = _paged(k.float(), 32, False)
    vc, _ = _paged(v.float(), 32, False)
    out = torch.empty(n, Hq, d, dtype=dtype, device=DEVICE)
    pairs = triton_kernels.sparse_prefill_paged(q.to(DEVICE), kc.to(dtype).to(DEVICE), vc.to(dtype).to(DEVICE),
                                                pages.to(DEVICE), geom, plan.__class__.uniform(
                                                    "vertical_slash", Hq, DEVICE, vertical=40, slash=70), 0.3, out)
    index = build_index(q, k, geom, plan, 0.3)
    assert int(pairs) == int(index.computed_pairs(geom).sum())
    tol = 1e-3 if dtype == torch.float32 and DEVICE == "cpu" else 3e-2
    torch.testing.assert_close(out.float().cpu(), sparse_attention(q, k, v, index, 0.3).float(), rtol=tol, atol=tol)


def _mixed_cfg(Hq: int) -> PatternConfig:
    heads = {0: HeadPattern(pattern="block_sparse", budgets={"top_k": 2}),
             Hq - 1: HeadPattern(pattern="a_shape", budgets={"sink": 64, "window": 100}),
             1: HeadPattern(pattern="vertical_slash", budgets={"vertical": 7, "slash": 130})}
    return PatternConfig(default=HeadPattern(pattern="vertical_slash", budgets={"vertical": 30, "slash": 40}),
                         layers={0: heads}).validate()


def _mixed_case(Hq: int, Hkv: int, n: int = 150, L: int = 330, d: int = 32, seed: int = 3):
    """Heads of one group with different patterns and budgets (their keys differ per head)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = torch.randn(n, Hq, d, generator=g), torch.randn(L, Hkv, d, generator=g), torch.randn(L, Hkv, d, generator=g)
    geom = ChunkGeometry(n, L)
    index = build_index(q, k, geom, LayerPlan.from_config(_mixed_cfg(Hq), 0, Hq), 0.3, trim_columns=False)
    return q, k, v, geom, index


@pytest.mark.parametrize("Hq,Hkv,tiles", [(8, 2, (32, 64)), (8, 2, (16, 128)), (6, 2, (16, 64)), (2, 2, (64, 64)),
                                         (8, 2, "solo")])
def test_group_kernel_mixed_heads(Hq, Hkv, tiles):
    """The group kernel, exact per head and in union mode, against the reference (union: on union_index),
    with a group mixing block, range and column patterns, a group of 3 (padded to 4) and of 1."""
    q, k, v, geom, index = _mixed_case(Hq, Hkv)
    kc, pages = _paged(k, 16, False)
    vc, _ = _paged(v, 16, True)
    args = (q.to(DEVICE), kc.to(DEVICE), vc.to(DEVICE), pages.to(DEVICE), index.to(DEVICE), geom, 0.3)
    tol = 2e-3 if DEVICE == "cpu" else 2e-2
    solo = tiles == "solo"  # one program per query head (share_kv=False)
    bm, bn = (64, 64) if solo else tiles
    for union, idx in ((False, index), (True, union_index(index.to(DEVICE), geom, Hq // Hkv).to("cpu"))):
        if solo and union:
            continue
        out = torch.full((geom.n, Hq, q.shape[-1]), float("nan"), device=DEVICE)  # every element must be written
        got = triton_kernels.sparse_attention_paged(*args, out=out, kernel="group", block_m=bm, block_n=bn, union=union,
                                                    share_kv=not solo)
        torch.testing.assert_close(got.cpu(), sparse_attention(q, k, v, idx, 0.3), rtol=tol, atol=tol)


def test_union_index_is_the_group_union():
    """union_index: every head's element mask is the OR of its group's (and so density only grows)."""
    Hq, Hkv = 8, 2
    _, _, _, geom, index = _mixed_case(Hq, Hkv)
    union = union_index(index.to(DEVICE), geom, Hq // Hkv).to("cpu")
    want = index.dense_mask(geom).view(Hkv, Hq // Hkv, geom.n, geom.L).any(1).repeat_interleave(Hq // Hkv, 0)
    assert torch.equal(union.dense_mask(geom), want)
    assert union.density(geom) >= index.density(geom)
    per_head = union.computed_pairs(geom).view(Hkv, -1)
    assert (per_head == per_head[:, :1]).all()


@pytest.mark.parametrize("pattern", sorted(registry.PATTERNS))
@pytest.mark.parametrize("Hq,Hkv,n,L,page", [(8, 2, 150, 330, 16), (6, 2, 70, 400, 32), (2, 2, 130, 130, 16),
                                             (8, 2, 1, 200, 16), (8, 2, 98, 160, 16)])
def test_shared_group_kernel_matches_reference(pattern, Hq, Hkv, n, L, page):
    """The shared group kernel on a group-shared index == the torch reference (groups of 4, 3 padded to 4, 1;
    interior tiles skip masks, diagonal/edge/partial tiles keep them: a wrong split changes the output)."""
    g = torch.Generator().manual_seed(4)
    d = 32
    q, k, v = torch.randn(n, Hq, d, generator=g), torch.randn(L, Hkv, d, generator=g), torch.randn(L, Hkv, d, generator=g)
    geom = ChunkGeometry(n, L)
    index = build_index(q, k, geom, LayerPlan.uniform(pattern, Hq, **BUDGETS[pattern]), 0.3,
                        IndexOptions(group_shared_selection=True), trim_columns=False)
    assert index.is_group_shared(Hq // Hkv)
    kc, pages = _paged(k, page, False)
    vc, _ = _paged(v, page, True)
    out = torch.full((n, Hq, d), float("nan"), device=DEVICE)  # every element must be written
    got = triton_kernels.sparse_attention_paged(q.to(DEVICE), kc.to(DEVICE), vc.to(DEVICE), pages.to(DEVICE),
                                                index.to(DEVICE), geom, 0.3, out=out, kernel="group_shared")
    tol = 2e-3 if DEVICE == "cpu" else 2e-2
    torch.testing.assert_close(got.cpu(), sparse_attention(q, k, v, index, 0.3), rtol=tol, atol=tol)


@pytest.mark.parametrize("n,L,page,transposed", [(130, 330, 16, False), (30, 200, 32, True), (1, 97, 16, False),
                                                 (64, 64, 16, False)])
def test_paged_estimate_matches_torch(n, L, page, transposed):
    """estimate_kernels.estimate_lines_paged (keys read through the block table, votes fused) == the torch
    estimate on the gathered keys, for a head subset with its own KV heads."""
    from attention_backends.sparse_prefill.estimate_kernels import estimate_lines_paged
    from attention_backends.sparse_prefill.paged_keys import PagedKeys
    from attention_backends.sparse_prefill.patterns.vertical_slash import estimate_lines

    g = torch.Generator().manual_seed(5)
    Hq, Hkv, d = 6, 2, 32
    q, k = torch.randn(n, Hq, d, generator=g), torch.randn(L, Hkv, d, generator=g) * 2
    geom = ChunkGeometry(n, L)
    heads = torch.tensor([0, 3, 5])
    kv_ids = heads // 3
    want_v, want_s = estimate_lines(q[:, heads].transpose(0, 1), k.transpose(0, 1), kv_ids, geom, 0.3)
    kc, pages = _paged(k, page, transposed)
    got_v, got_s = estimate_lines_paged(q[:, heads].transpose(0, 1).to(DEVICE), PagedKeys(kc.to(DEVICE),
                                        pages.to(DEVICE), L), kv_ids.to(DEVICE), geom, 0.3, programs=8)
    tol = 1e-5 if DEVICE == "cpu" else 2e-2  # tf32 dots on the GPU
    torch.testing.assert_close(got_v.cpu(), want_v, rtol=tol, atol=tol)
    torch.testing.assert_close(got_s.cpu(), want_s, rtol=tol, atol=tol)


def test_build_index_from_paged_keys_matches():
    """build_index on PagedKeys (fused estimate; block-sparse gathers) == on the key tensor, group-shared too."""
    from attention_backends.sparse_prefill.paged_keys import PagedKeys

    q, k, v, geom, _ = _mixed_case(8, 2)
    cfg = PatternConfig(default=HeadPattern(pattern="vertical_slash", budgets={"vertical": 30, "slash": 40}),
                        layers={0: {0: HeadPattern(pattern="block_sparse", budgets={"top_k": 2})}}).validate()
    plan = LayerPlan.from_config(cfg, 0, 8)
    kc, pages = _paged(k, 16, False)
    for shared in (False, True):
        options = IndexOptions(group_shared_selection=shared)
        want = build_index(q, k, geom, plan, 0.3, options, trim_columns=False)
        got = build_index(q.to(DEVICE), PagedKeys(kc.to(DEVICE), pages.to(DEVICE), geom.L), geom,
                          LayerPlan.from_config(cfg, 0, 8, DEVICE), 0.3, options, trim_columns=False)
        got_mask, want_mask = got.to("cpu").dense_mask(geom), want.dense_mask(geom)
        if DEVICE == "cpu":
            assert torch.equal(got_mask, want_mask)
        else:  # tf32 scores may swap near-tied columns/diagonals at the budget's edge
            assert (got_mask & want_mask).sum() >= 0.97 * (got_mask | want_mask).sum()


@pytest.mark.parametrize("group_shared,fused_estimate,dense_tail_rows,segments", [
    (True, False, 0, 0), (False, True, 0, 0), (True, True, 0, 0), (False, False, 64, 0), (True, True, 100, 0),
    (False, False, 0, 64), (True, True, 0, 64)])
def test_chunk_path_options_match_reference(group_shared, fused_estimate, dense_tail_rows, segments):
    """sparse_prefill_paged with sparse_prefill.group_shared_selection / fused_estimate / dense_tail_rows /
    vertical_segment_rows (the CUDA serving path: shared group kernel on a group-uniform plan, estimate from the
    paged cache (segments: the torch estimate on gathered keys), the chunk's last blocks dense, columns per query
    block) == the reference on the index build_index gives the gathered keys with the same selection."""
    g = torch.Generator().manual_seed(6)
    n, L, Hq, Hkv, d = 150, 333, 8, 2, 32
    q, k, v = (torch.randn(s, h, d, generator=g) for s, h in ((n, Hq), (L, Hkv), (L, Hkv)))
    geom = ChunkGeometry(n, L)
    kc, pages = _paged(k, 16, False)
    vc, _ = _paged(v, 16, False)
    out = torch.full((n, Hq, d), float("nan"), device=DEVICE)
    plan = LayerPlan.uniform("vertical_slash", Hq, DEVICE, vertical=40, slash=70)
    options = IndexOptions(group_shared_selection=group_shared, fused_estimate=fused_estimate,
                           dense_tail_rows=dense_tail_rows, vertical_segment_rows=segments)
    pairs = triton_kernels.sparse_prefill_paged(q.to(DEVICE), kc.to(DEVICE), vc.to(DEVICE), pages.to(DEVICE), geom,
                                                plan, 0.3, out, options)
    from attention_backends.sparse_prefill.paged_keys import PagedKeys

    # the same keys the path estimates from (on the GPU tf32 votes may order near-ties differently from torch)
    keys = PagedKeys(kc.to(DEVICE), pages.to(DEVICE), L) if fused_estimate else k.to(DEVICE)
    index = build_index(q.to(DEVICE), keys, geom, plan, 0.3, options, trim_columns=False).to("cpu")
    assert index.is_group_shared(Hq // Hkv) == group_shared
    assert int(pairs) == int(index.computed_pairs(geom).sum())
    if dense_tail_rows:  # the tail's pairs are counted
        plain = build_index(q.to(DEVICE), keys, geom, plan, 0.3, IndexOptions(group_shared_selection=group_shared),
                            trim_columns=False)
        assert int(pairs) > int(plain.computed_pairs(geom).sum())
    tol = 2e-3 if DEVICE == "cpu" else 3e-2
    torch.testing.assert_close(out.float().cpu(), sparse_attention(q, k, v, index, 0.3).float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("kernel", ["per_head", "group", "group_union", "group_shared"])
@pytest.mark.parametrize("n,L", [(150, 330), (130, 130), (40, 300)])
def test_dense_tail_in_every_kernel(kernel, n, L):
    """sparse_prefill.dense_tail_rows: the tail blocks' causal blocks (and no ranges or columns) in each kernel ==
    the reference, whose tail rows are dense attention (mixed block / range / column heads; group-shared for the
    shared kernel; union mode on union_index)."""
    from attention_backends.sparse_prefill.index import dense_tail_start
    from attention_backends.sparse_prefill.reference import dense_attention

    Hq, Hkv, d = 8, 2, 32
    q, k, v, geom, _ = _mixed_case(Hq, Hkv, n=n, L=L, seed=7)
    shared = kernel == "group_shared"
    plan = (LayerPlan.uniform("vertical_slash", Hq, vertical=30, slash=40) if shared else
            LayerPlan.from_config(_mixed_cfg(Hq), 0, Hq))
    index = build_index(q, k, geom, plan, 0.3, IndexOptions(group_shared_selection=shared, dense_tail_rows=64),
                        trim_columns=False)
    union = kernel == "group_union"
    ref_index = union_index(index.to(DEVICE), geom, Hq // Hkv).to("cpu") if union else index
    kc, pages = _paged(k, 16, False)
    vc, _ = _paged(v, 16, True)
    out = torch.full((n, Hq, d), float("nan"), device=DEVICE)  # every element must be written
    options = {"union": union} if kernel.startswith("group_") and not shared else {}
    got = triton_kernels.sparse_attention_paged(q.to(DEVICE), kc.to(DEVICE), vc.to(DEVICE), pages.to(DEVICE),
                                                index.to(DEVICE), geom, 0.3, out=out,
                                                kernel="group" if union else kernel, **options)
    expected = sparse_attention(q, k, v, ref_index, 0.3)
    tol = 2e-3 if DEVICE == "cpu" else 2e-2
    torch.testing.assert_close(got.cpu(), expected, rtol=tol, atol=tol)
    r0 = dense_tail_start(geom, 64) * 64
    torch.testing.assert_close(expected[r0:], dense_attention(q, k, v, 0.3)[r0:], rtol=1e-4, atol=1e-4)

