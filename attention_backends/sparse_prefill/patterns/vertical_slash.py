"""Vertical-slash: the last LAST_Q queries of the chunk, softmaxed against all keys, vote for key columns
(vertical lines) and diagonals (slash lines); keep the top ``vertical`` columns and top ``slash``
diagonals, always including the first columns and the nearest diagonals. Diagonals are served as merged
key ranges (index.ranges_from_diagonals: a diagonal costs one BLOCK-wide range per query block, neighbours
share it), verticals as single columns.

``segment_rows`` (sparse_prefill.vertical_segment_rows): the chunk's rows are split into segments of that many
rows, each picking its own columns from its own last LAST_Q rows (diagonals stay chunk-wide: they are
position-relative). Why: a chunk's last rows may be a question about one part of the context; without
segments every row of the chunk, a needle far from the question included, attends the question's columns
(issue 16)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from attention_backends.sparse_prefill.index import BLOCK, ChunkGeometry, ranges_from_diagonals
from attention_backends.sparse_prefill.paged_keys import PagedKeys, key_tensor, num_kv_heads
from attention_backends.sparse_prefill.patterns.base import SparsePattern, exact_row_blocks, group_votes, rank_mask

LAST_Q = 64
FORCED_COLUMNS = 30  # attention sinks: MInference keeps the first ~30 columns
FORCED_DIAGONALS = 100  # local attention: and the ~100 nearest diagonals
HEADS_PER_STEP = 8  # bounds the [heads, LAST_Q, L] estimation scores at long contexts
# Forced lines rank above every voted one (a line's vote is at most LAST_Q) and among themselves by
# distance, so a budget smaller than the forced set keeps the first columns / nearest diagonals.
FORCED_SCORE = 1e4


def diagonal_sums(att: torch.Tensor, rows_pos0: int) -> torch.Tensor:
    """att [h, m, L] (row i at absolute position rows_pos0 + i = L - m + i) -> [h, L]: the mass on each
    diagonal d (key = row - d), by reading the rows skewed (a strided view) instead of a scatter-add."""
    h, m, L = att.shape
    width = L + m
    rev = F.pad(torch.flip(att, [-1]), (0, m)).contiguous()  # rev[i, t] = att[i, L - 1 - t], zero past L
    # row i, diagonal d -> rev[i, d + (m - 1 - i)] = element i * (width - 1) + (m - 1) + d of the row block
    skew = rev.as_strided((h, m, L), (m * width, width - 1, 1), storage_offset=m - 1)
    return skew.sum(1)


def estimate_lines(q: torch.Tensor, k: torch.Tensor, kv_ids: torch.Tensor, geom: ChunkGeometry,
                   scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Column and diagonal attention mass [h, L] each, from the chunk's last LAST_Q queries. q [h, n, d];
    k [Hkv, L, d] (not expanded to the query heads: kv_ids [h] picks each head's KV head per step), or PagedKeys:
    then one fused Triton pass over the paged cache (estimate_kernels.estimate_lines_paged)."""
    if isinstance(k, PagedKeys):
        from attention_backends.sparse_prefill.estimate_kernels import estimate_lines_paged

        # a Triton launch on the paged cache: kept out of a compiled build (IndexOptions.compiled_index)
        return torch.compiler.disable(estimate_lines_paged)(q, k, kv_ids, geom, scale, LAST_Q)
    return _line_votes(q, k, kv_ids, geom, scale, geom.n, diagonals=True)


def _line_votes(q: torch.Tensor, k: torch.Tensor, kv_ids: torch.Tensor, geom: ChunkGeometry, scale: float,
                row_end: int, diagonals: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The torch estimate: column (and, with ``diagonals``, diagonal) attention mass [h, L] of the last LAST_Q rows
    of the chunk's rows [0, row_end), each row against the keys up to itself (row_end < n: a segment's vote, no
    key past the segment's last row; its entries beyond are 0). q [h, n, d], k [Hkv, L, d]."""
    h = q.shape[0]
    last = min(LAST_Q, row_end)
    keys = geom.q_pos0 + row_end
    rows_pos = keys - last + torch.arange(last, device=q.device)  # absolute positions of the voting rows
    causal = torch.arange(keys, device=q.device)[None, :] <= rows_pos[:, None]  # [last, keys]
    vertical = q.new_zeros((h, geom.L), dtype=torch.float32)
    slash = q.new_zeros((h, geom.L), dtype=torch.float32) if diagonals else None
    for s in range(0, h, HEADS_PER_STEP):
        qs = q[s:s + HEADS_PER_STEP, row_end - last:row_end]
        ks = k[kv_ids[s:s + HEADS_PER_STEP], :keys]
        # scores in the cache dtype (tensor cores on the GPU), softmax in fp32
        att = (torch.matmul(qs, ks.transpose(1, 2)).float() * scale).masked_fill(~causal[None], float("-inf"))
        att = torch.softmax(att, dim=-1)
        vertical[s:s + HEADS_PER_STEP, :keys] = att.sum(1)
        if diagonals:
            slash[s:s + HEADS_PER_STEP, :keys] = diagonal_sums(att, keys - last)
    return vertical, slash


def segment_ends(geom: ChunkGeometry, segment_rows: int) -> list[int]:
    """The chunk-relative end row of each segment of ``segment_rows`` rows (one segment, [n], when
    ``segment_rows`` <= 0 or covers the chunk)."""
    if segment_rows <= 0 or segment_rows >= geom.n:
        return [geom.n]
    return list(range(segment_rows, geom.n, segment_rows)) + [geom.n]


def column_votes(q: torch.Tensor, k: torch.Tensor, kv_ids: torch.Tensor, geom: ChunkGeometry, scale: float,
                 row_end: int) -> torch.Tensor:
    """[h, L] column attention mass of the LAST_Q rows of the chunk ending at chunk row ``row_end`` (causal:
    keys up to each row). q [h, n, d], k [Hkv, L, d]: one segment's vote (segment_rows)."""
    return _line_votes(q, k, kv_ids, geom, scale, row_end, diagonals=False)[0]


def exact_lines(q: torch.Tensor, k: torch.Tensor, kv_ids: torch.Tensor, geom: ChunkGeometry, scale: float,
                row_start: int, row_end: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Column and diagonal attention mass [h, L] each, summed over every chunk row in [row_start, row_end): the
    exact ranking estimate_lines / column_votes estimate from the last LAST_Q rows (sparse_prefill.exact_selection)."""
    h, L = q.shape[0], geom.L
    vertical = q.new_zeros((h, L), dtype=torch.float32)
    diagonal = q.new_zeros((h, L), dtype=torch.float32)
    for hs, _, att in exact_row_blocks(q, k, kv_ids, geom, scale, row_start, row_end):
        keys = att.shape[-1]
        vertical[hs, :keys] += att.sum(1)
        diagonal[hs, :keys] += diagonal_sums(att, keys - att.shape[1])
    return vertical, diagonal


def _force_first(scores: torch.Tensor, n_forced: int) -> torch.Tensor:
    pos = torch.arange(scores.shape[-1], device=scores.device)
    forced = FORCED_SCORE + (n_forced - pos).to(scores.dtype)
    return torch.where(pos[None, :] < n_forced, forced[None, :], scores)


class VerticalSlash(SparsePattern):
    name = "vertical_slash"
    budgets = {"vertical": (1000, 1), "slash": (1024, 1)}
    search_candidates = ({"vertical": 100, "slash": 256}, {"vertical": 500, "slash": 512},
                         {"vertical": 1000, "slash": 1024}, {"vertical": 2000, "slash": 2048})
    length_scaled = ("vertical", "slash")
    # A selected diagonal is served as part of a 64-key range (index.ranges_from_diagonals): alone it costs
    # a row 64 keys, merged with its neighbours about one. Measured keys per row beyond the vertical budget,
    # per slash diagonal: shipped configs' searched heads median 3.2 / 90th percentile 7.0 (Qwen2.5-Coder-0.5B
    # at 32K), 2.2 / 4.9 (SmolLM2 at 8K); the kernel bench's synthetic Q/K ~15 at 128K; dummy weights ~1.
    # 8: the cost model's estimate before run-time densities correct it, on the expensive side.
    KEYS_PER_DIAGONAL = 8

    @classmethod
    def keys_per_row(cls, budgets):
        return budgets["vertical"] + cls.KEYS_PER_DIAGONAL * budgets["slash"]

    @classmethod
    def select(cls, q, k, kv_ids, geom: ChunkGeometry, budgets, budget_max, scale, group_shared=False,
               segment_rows=0, exact=False):
        ends = segment_ends(geom, segment_rows)
        if (len(ends) > 1 or exact) and isinstance(k, PagedKeys):
            # fused_estimate votes for the chunk's last rows only: segments (and exact_selection) take the torch
            # estimate on keys gathered from the cache (the same index, one key copy more)
            k = key_tensor(k)
        if exact:  # every row votes: diagonals chunk-wide, columns per segment
            votes = [exact_lines(q, k, kv_ids, geom, scale, a, e) for a, e in zip([0] + ends[:-1], ends)]
            slash = torch.stack([d for _, d in votes]).sum(0)
            vertical = torch.stack([v for v, _ in votes], 1) if len(ends) > 1 else votes[0][0]
        else:
            vertical, slash = estimate_lines(q, k, kv_ids, geom, scale)
        if len(ends) > 1 and not exact:  # [h, segments, L]: the last segment's vote is the chunk's (estimate_lines)
            vertical = torch.stack([column_votes(q, k, kv_ids, geom, scale, e) for e in ends[:-1]] + [vertical], 1)
        if group_shared:  # rank once per KV head on the group's summed votes, then hand each head its group's
            num_kv = num_kv_heads(k)
            vertical, slash = group_votes(vertical, kv_ids, num_kv), group_votes(slash, kv_ids, num_kv)
        L = geom.L
        vertical = _force_first(vertical, FORCED_COLUMNS)
        slash = _force_first(slash, FORCED_DIAGONALS)
        v_max = min(budget_max["vertical"], L)
        s_max = min(budget_max["slash"], L)
        cols = torch.topk(vertical, v_max, dim=-1).indices
        diagonals = torch.topk(slash, s_max, dim=-1).indices  # diagonal d: key = row - d
        if group_shared:
            cols, diagonals = cols[kv_ids], diagonals[kv_ids]
        keep = rank_mask(v_max, budgets["vertical"])
        if len(ends) > 1:  # each query block takes its segment's columns: [h, nqb, v_max]
            keep = keep[:, None, :]
            seg_of_block = torch.arange(geom.nqb, device=q.device) * BLOCK // segment_rows
            cols = cols[:, seg_of_block]
        cols = torch.where(keep, cols, torch.full_like(cols, -1))
        ranges, count = ranges_from_diagonals(diagonals, rank_mask(s_max, budgets["slash"]))
        mask = torch.zeros(q.shape[0], geom.nqb, geom.nkb, dtype=torch.bool, device=q.device)
        return mask, cols, (ranges, count)
