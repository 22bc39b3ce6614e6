"""A-shape (StreamingLLM-style): every query sees the first ``sink`` keys and the last ``window`` keys."""
from __future__ import annotations

import torch

from attention_backends.sparse_prefill.index import BLOCK, ChunkGeometry
from attention_backends.sparse_prefill.patterns.base import SparsePattern


class AShape(SparsePattern):
    name = "a_shape"
    budgets = {"sink": (64, 0), "window": (1024, 1)}
    search_candidates = ({"sink": 64, "window": 512}, {"sink": 128, "window": 1024}, {"sink": 128, "window": 2048})

    @classmethod
    def keys_per_row(cls, budgets):
        # whole key blocks: the sink rounded up to a block, the window plus the block it starts in
        return -(-budgets["sink"] // BLOCK) * BLOCK + budgets["window"] + BLOCK

    @classmethod
    def select(cls, q, k, kv_ids, geom: ChunkGeometry, budgets, budget_max, scale, group_shared=False,
               segment_rows=0, exact=False, gqa_kv_heads=None):
        # segment_rows, gqa_kv_heads: vertical-slash's; exact: static, nothing to rank
        # Static (no votes): heads with equal budgets select the same blocks, group_shared or not.
        dev = q.device
        a, b = geom.q_block_bounds(dev)
        kb = torch.arange(geom.nkb, device=dev)
        kb_start, kb_end = kb * BLOCK, torch.clamp(kb * BLOCK + BLOCK, max=geom.L)
        sink = budgets["sink"][:, None, None]
        window = budgets["window"][:, None, None]
        in_sink = kb_start[None, None, :] < sink
        # Keys [row - window + 1, row] for the block's rows; the union over rows is [a - window + 1, b - 1].
        lo = torch.clamp(a[None, :, None] - window + 1, min=0)
        in_window = (kb_end[None, None, :] > lo) & (kb_start[None, None, :] <= (b - 1)[None, :, None])
        return (in_sink | in_window) & geom.causal_blocks(dev)[None], None, None
