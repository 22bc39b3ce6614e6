"""SparseIndex.with_dense_tail (sparse_prefill.dense_tail_rows): a chunk's last query blocks attend every causal key
through the index, so every executor and computed_pairs() see them; the other rows keep their sparse keys."""
from __future__ import annotations

import pytest
import torch

from attention_backends.sparse_prefill.head_config import LayerPlan, build_index
from attention_backends.sparse_prefill.index import BLOCK, ChunkGeometry, dense_tail_start
from attention_backends.sparse_prefill.index_options import IndexOptions
from attention_backends.sparse_prefill.patterns import registry
from attention_backends.sparse_prefill.reference import dense_attention, sparse_attention

# the reference tests' budgets and data (test_reference.py), plus a chunk of fewer rows than the tail
from tests.attention_backends.sparse_prefill.test_reference import SHAPES as REFERENCE_SHAPES
from tests.attention_backends.sparse_prefill.test_reference import TIGHT, _qkv

SHAPES = [*REFERENCE_SHAPES, (130, 190)]
SCALE = 0.2


@pytest.mark.parametrize("n,rows,first", [(130, 64, 1), (130, 1, 2), (128, 64, 1), (128, 65, 0), (700, 100, 9),
                                          (5, 64, 0), (700, 0, 11), (700, -3, 11)])
def test_dense_tail_rounds_up_to_whole_query_blocks(n, rows, first):
    assert dense_tail_start(ChunkGeometry(n, n + 50), rows) == first


@pytest.mark.parametrize("group_shared", [False, True])
@pytest.mark.parametrize("rows", [64, 100])
@pytest.mark.parametrize("pattern", sorted(registry.PATTERNS))
@pytest.mark.parametrize("n,L", SHAPES)
def test_tail_rows_attend_densely_and_the_others_keep_their_keys(pattern, n, L, rows, group_shared):
    q, k, v = _qkv(n, L)
    geom = ChunkGeometry(n, L)
    plan = LayerPlan.uniform(pattern, q.shape[1], **TIGHT[pattern])
    sparse = build_index(q, k, geom, plan, SCALE, IndexOptions(group_shared_selection=group_shared))
    tail = build_index(q, k, geom, plan, SCALE, IndexOptions(group_shared_selection=group_shared, dense_tail_rows=rows))
    r0 = dense_tail_start(geom, rows) * BLOCK
    assert r0 <= max(0, n - rows)
    got, dense = sparse_attention(q, k, v, tail, SCALE), dense_attention(q, k, v, SCALE)
    torch.testing.assert_close(got[r0:], dense[r0:], rtol=1e-5, atol=1e-5)
    # the other rows: the same element mask, the same output (up to the reference's per-step key gather)
    assert torch.equal(tail.dense_mask(geom, slice(0, r0)), sparse.dense_mask(geom, slice(0, r0)))
    torch.testing.assert_close(got[:r0], sparse_attention(q, k, v, sparse, SCALE)[:r0], rtol=1e-6, atol=1e-6)
    # the tail's rows are whole causal rows, and the pair count is the mask's (no key counted twice)
    causal = torch.arange(L)[None, :] <= (L - n + torch.arange(r0, n))[:, None]
    assert torch.equal(tail.dense_mask(geom, slice(r0, n)), causal[None].expand(q.shape[1], -1, -1))
    assert int(tail.computed_pairs(geom).sum()) == int(tail.dense_mask(geom).sum())
    if group_shared:
        assert tail.is_group_shared(3)


def test_tail_cost_is_a_few_blocks_of_an_8k_chunk():
    """The cost the config documents: one 64-row block x L keys per 8K chunk after 16K of context, < 1% of its
    causal pairs (a_shape: an index cheap to build at this size)."""
    n, L = 8192, 24576
    geom = ChunkGeometry(n, L)
    q, k, _ = _qkv(n, L, Hq=2, Hkv=1, d=8)
    plan = LayerPlan.uniform("a_shape", 2, sink=64, window=256)
    extra = (build_index(q, k, geom, plan, SCALE, IndexOptions(dense_tail_rows=64)).computed_pairs(geom)
             - build_index(q, k, geom, plan, SCALE).computed_pairs(geom))
    assert (extra > 0).all() and float(extra.max()) < 0.01 * geom.causal_pairs()
