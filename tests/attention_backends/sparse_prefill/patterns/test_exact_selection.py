"""sparse_prefill.exact_selection (a diagnostic): patterns rank by the exact attention mass of every query row
instead of their estimate (issue 16: does the estimate pick the wrong keys, or are the budgets too small?)."""
from __future__ import annotations

import pytest
import torch

from attention_backends.sparse_prefill.head_config import LayerPlan, build_index
from attention_backends.sparse_prefill.index import BLOCK, ChunkGeometry
from attention_backends.sparse_prefill.index_options import IndexOptions
from attention_backends.sparse_prefill.patterns.block_sparse import exact_block_mass
from attention_backends.sparse_prefill.patterns.vertical_slash import exact_lines
from tests.attention_backends.sparse_prefill.test_reference import _qkv

SCALE = 0.2


def _dense_probs(q, k, geom):
    """[Hq, n, L] causal softmax of the chunk's rows, brute force."""
    Hq, Hkv = q.shape[1], k.shape[1]
    kk = k.repeat_interleave(Hq // Hkv, 1)
    s = torch.einsum("nhd,lhd->hnl", q, kk) * SCALE
    rows = geom.q_pos0 + torch.arange(geom.n)
    s = s.masked_fill(torch.arange(geom.L)[None, None, :] > rows[None, :, None], float("-inf"))
    return torch.softmax(s, -1)


def _heads(q, k):
    Hq, Hkv = q.shape[1], k.shape[1]
    return q.transpose(0, 1), k.transpose(0, 1), torch.arange(Hq) // (Hq // Hkv)


@pytest.mark.parametrize("n,L,rows", [(200, 328, (0, 200)), (257, 1123, (64, 200)), (700, 700, (0, 700))])
def test_exact_lines_are_the_dense_column_and_diagonal_mass(n, L, rows):
    q, k, _ = _qkv(n, L, seed=3)
    geom = ChunkGeometry(n, L)
    p = _dense_probs(q, k, geom)[:, rows[0]:rows[1]]
    vertical, slash = exact_lines(*_heads(q, k), geom, SCALE, *rows)
    torch.testing.assert_close(vertical, p.sum(1), atol=1e-4, rtol=1e-4)
    pos = geom.q_pos0 + torch.arange(*rows)
    diag = (pos[:, None] - torch.arange(L)[None, :]).clamp(min=0)  # [rows, L]: key j of row i lies on i - j
    want = torch.zeros_like(slash).index_add_(1, diag.flatten(), p.reshape(p.shape[0], -1))
    torch.testing.assert_close(slash, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("n,L", [(200, 328), (257, 1123)])
def test_exact_block_mass_is_each_query_blocks_dense_mass_per_key_block(n, L):
    q, k, _ = _qkv(n, L, seed=4)
    geom = ChunkGeometry(n, L)
    p = _dense_probs(q, k, geom)
    p = torch.nn.functional.pad(p, (0, geom.nkb * BLOCK - L, 0, geom.nqb * BLOCK - n))
    want = p.view(p.shape[0], geom.nqb, BLOCK, geom.nkb, BLOCK).sum((2, 4))
    torch.testing.assert_close(exact_block_mass(*_heads(q, k), geom, SCALE), want, atol=1e-4, rtol=1e-4)


def _needle_case(n=512, L=1536, needle=700, seed=5):
    """The chunk's first query block looks up one context key hard; the rest of the chunk (its last rows, which
    vertical-slash's estimate votes with) is blind to it, and its key block's mean (block-sparse's estimate) holds
    none of it (a key pointing the other way sits next to it)."""
    q, k, v = _qkv(n, L, seed=seed)
    u = torch.nn.functional.normalize(torch.randn(q.shape[-1], generator=torch.Generator().manual_seed(seed)), dim=0)
    q -= (q @ u)[..., None] * u
    k -= (k @ u)[..., None] * u
    k[needle] += 12 * u
    k[needle + 1] -= 12 * u
    q[:BLOCK] += 12 * u
    return q, k, ChunkGeometry(n, L), needle


@pytest.mark.parametrize("pattern, budgets", [("vertical_slash", {"vertical": 34, "slash": 64}),
                                              ("block_sparse", {"top_k": 4})])
def test_exact_selection_finds_what_the_estimate_misses(pattern, budgets):
    q, k, geom, needle = _needle_case()
    plan = LayerPlan.uniform(pattern, q.shape[1], **budgets)
    picked = {}
    for exact in (False, True):
        # vertical-slash chunk-wide (the estimate: the chunk's last 64 rows; exact: every row, summed)
        index = build_index(q, k, geom, plan, SCALE, IndexOptions(exact_selection=exact))
        if pattern == "vertical_slash":
            picked[exact] = bool((index.cols[:, 0] == needle).any(-1).all())  # every head, query block 0
        else:
            picked[exact] = bool(index.block_mask[:, 0, needle // BLOCK].all())
    assert picked == {False: False, True: True}


def test_exact_selection_is_eager_even_when_compiled_index_is_asked(monkeypatch):
    """A compiled build would unroll the exact pass's row loop per chunk length: exact builds run eager."""
    from attention_backends.sparse_prefill import head_config

    monkeypatch.setattr(head_config, "compiled_builder", lambda: pytest.fail("compiled build used"))
    q, k, geom, _ = _needle_case(n=128, L=256, needle=100)
    build_index(q, k, geom, LayerPlan.uniform("block_sparse", q.shape[1], top_k=2), SCALE,
                IndexOptions(compiled_index=True, exact_selection=True))
