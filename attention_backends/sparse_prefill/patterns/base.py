"""What a sparse prefill pattern is: budgets per head in, selected key blocks (+ vertical columns) out."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from attention_backends.sparse_prefill.index import ChunkGeometry


class PatternBudgetError(ValueError):
    """A budget is missing, unknown or out of range; the message names it."""


class SparsePattern(ABC):
    name: ClassVar[str]
    # budget name -> (default, minimum); budgets are token/column/diagonal/block counts, per head.
    budgets: ClassVar[dict[str, tuple[int, int]]]
    # Candidate budgets the offline search tries, cheapest first.
    search_candidates: ClassVar[tuple[dict[str, int], ...]]
    # Budgets that count a share of the context (columns, diagonals, blocks) rather than a fixed local
    # structure: head_config.scaled_budgets grows them beyond the length a config was searched at.
    length_scaled: ClassVar[tuple[str, ...]] = ()

    @classmethod
    @abstractmethod
    def keys_per_row(cls, budgets: dict[str, int]) -> float:
        """Expected keys one query row attends under ``budgets`` (complete, checked), far from the sequence
        start: what the cost model (cost_model.py) prices a head at when its config records no measured
        density. An estimate, corrected at run time by the densities the kernel reports."""

    @classmethod
    def check_budgets(cls, given: dict[str, int], where: str = "") -> dict[str, int]:
        """Fill defaults, reject unknown/negative budgets (naming them); returns the full budget dict."""
        unknown = sorted(set(given) - set(cls.budgets))
        if unknown:
            raise PatternBudgetError(f"{where}unknown budget {unknown[0]!r} for pattern {cls.name!r} "
                                     f"(budgets: {', '.join(cls.budgets)})")
        out = {}
        for key, (default, minimum) in cls.budgets.items():
            value = given.get(key, default)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise PatternBudgetError(f"{where}{cls.name}.{key} must be an integer >= {minimum}, got {value!r}")
            out[key] = value
        return out

    @classmethod
    @abstractmethod
    def select(cls, q: torch.Tensor, k: torch.Tensor, kv_ids: torch.Tensor, geom: ChunkGeometry,
               budgets: dict[str, torch.Tensor], budget_max: dict[str, int], scale: float,
               group_shared: bool = False, segment_rows: int = 0, exact: bool = False,
               gqa_kv_heads: tuple[int, ...] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None, tuple[torch.Tensor, torch.Tensor] | None]:
        """q [h, n, d] this chunk's queries of the heads using this pattern; k [Hkv, L, d] the sequence's
        keys (not expanded: head i uses k[kv_ids[i]]); budgets name -> [h] int64 on q's device, budget_max
        name -> their maximum as a host int (so shapes never need a device sync). Returns (block_mask
        [h, nqb, nkb] bool, vertical columns [h, V] int64 with -1 for unused (or [h, nqb, V]: per query block,
        see ``segment_rows``), or None, key ranges as
        index.ranges_from_diagonals returns them, or None).

        ``group_shared``: the heads sharing a KV head rank their candidates (columns, diagonals, key blocks) by
        the sum of their votes, so they select the same keys (head j keeps the first budget_j of the group's
        ranking) and a group-shared kernel computes no more pairs than one head's index. Patterns whose
        selection does not depend on Q/K (A-shape) are group-shared already. ``k`` may be a
        paged_keys.PagedKeys (the estimate then reads the paged cache; keys() gathers it where needed).

        ``segment_rows`` (sparse_prefill.vertical_segment_rows, a multiple of BLOCK; 0 = the whole chunk): patterns
        that pick columns from the chunk's last rows (vertical-slash) pick them per segment of that many rows
        instead, returning them per query block; others ignore it.

        ``exact`` (sparse_prefill.exact_selection, a diagnostic): rank the same candidates by the exact attention
        mass of every query row instead of the pattern's estimate (vertical-slash: every row of the chunk, or of
        the segment, votes instead of its last 64; block-sparse: each query block's softmax mass per key block
        instead of mean-pooled scores). Costs a dense attention pass on top of the sparse one.

        ``gqa_kv_heads`` (sparse_prefill.gqa_shaped_estimate; None = off): ``kv_ids`` on the host. Vertical-slash's
        torch estimate then scores whole GQA groups against their KV head's keys in place instead of a per-head
        copy of them (the same votes up to rounding); others ignore it."""


EXACT_ROWS = 64  # query rows per exact-mass step (exact_row_blocks): bounds its [heads, rows, L] scores
EXACT_HEADS = 8


def exact_row_blocks(q: torch.Tensor, k: torch.Tensor, kv_ids: torch.Tensor, geom: ChunkGeometry, scale: float,
                     row_start: int, row_end: int):
    """Yield (head slice, first row, softmax [hs, m, keys]) for chunk rows [row_start, row_end) in steps of
    EXACT_ROWS rows and EXACT_HEADS heads: each step's rows against every key they may see (keys = the step's last
    row + 1; row i of the step sits at absolute position keys - m + i). q [h, n, d], k [Hkv, L, d]."""
    h = q.shape[0]
    for r0 in range(row_start, row_end, EXACT_ROWS):
        r1 = min(r0 + EXACT_ROWS, row_end)
        keys = geom.q_pos0 + r1
        rows_pos = keys - (r1 - r0) + torch.arange(r1 - r0, device=q.device)
        causal = torch.arange(keys, device=q.device)[None, :] <= rows_pos[:, None]
        for s in range(0, h, EXACT_HEADS):
            hs = slice(s, min(s + EXACT_HEADS, h))
            att = (torch.matmul(q[hs, r0:r1], k[kv_ids[hs], :keys].transpose(1, 2)).float() * scale)
            yield hs, r0, torch.softmax(att.masked_fill(~causal[None], float("-inf")), dim=-1)


def rank_mask(order_len: int, budget: torch.Tensor) -> torch.Tensor:
    """[h, order_len] bool: position r of a top-k list is kept when r < the head's budget."""
    return torch.arange(order_len, device=budget.device)[None, :] < budget[:, None]


def group_votes(votes: torch.Tensor, kv_ids: torch.Tensor, num_kv: int) -> torch.Tensor:
    """[h, ...] per-head votes -> [num_kv, ...]: summed over the heads that share each KV head (zero rows for
    KV heads none of them uses). Rank on these and index the result with ``kv_ids`` to get one selection
    per group."""
    return votes.new_zeros((num_kv, *votes.shape[1:])).index_add_(0, kv_ids, votes)
