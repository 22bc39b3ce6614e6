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
                   scale: float, gqa_kv_heads: tuple[int, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Column and diagonal attention mass [h, L] each, from the chunk's last LAST_Q queries. q [h, n, d];
    k [Hkv, L, d] (not expanded to the query heads: kv_ids [h] picks each head's KV head per step), or PagedKeys:
    then one fused Triton pass over the paged cache (estimate_kernels.estimate_lines_paged). ``gqa_kv_heads``:
    kv_ids on the host, to score whole GQA groups without copying keys (_line_votes; None: per-head gather)."""
    if isinstance(k, PagedKeys):
        from attention_backends.sparse_prefill.estimate_kernels import estimate_lines_paged

        # a Triton launch on the paged cache: kept out of a compiled build (IndexOptions.compiled_index)
        return torch.compiler.disable(estimate_lines_paged)(q, k, kv_ids, geom, scale, LAST_Q)
    return _line_votes(q, k, kv_ids, geom, scale, geom.n, diagonals=True, gqa_kv_heads=gqa_kv_heads)


def _line_votes(q: torch.Tensor, k: torch.Tensor, kv_ids: torch.Tensor, geom: ChunkGeometry, scale: float,
                row_end: int, diagonals: bool, gqa_kv_heads: tuple[int, ...] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The torch estimate: column (and, with ``diagonals``, diagonal) attention mass [h, L] of the last LAST_Q rows
    of the chunk's rows [0, row_end), each row against the keys up to itself (row_end < n: a segment's vote, no
    key past the segment's last row; its entries beyond are 0). q [h, n, d], k [Hkv, L, d].

    ``gqa_kv_heads`` (sparse_prefill.gqa_shaped_estimate): kv_ids on the host. The steps (gqa_steps) then hold runs
    of heads sharing a KV head, whole GQA groups where the heads are, and each step multiplies its rows at once with
    its KV heads' keys, a slice of k (one GEMM of group x LAST_Q rows per KV head): no [heads, keys, d] copy of the
    keys per step. The same scores up to GEMM rounding."""
    h = q.shape[0]
    last = min(LAST_Q, row_end)
    keys = geom.q_pos0 + row_end
    rows_pos = keys - last + torch.arange(last, device=q.device)  # absolute positions of the voting rows
    causal = torch.arange(keys, device=q.device)[None, :] <= rows_pos[:, None]  # [last, keys]
    vertical = q.new_zeros((h, geom.L), dtype=torch.float32)
    slash = q.new_zeros((h, geom.L), dtype=torch.float32) if diagonals else None
    if gqa_kv_heads is None:
        steps = [(s, min(HEADS_PER_STEP, h - s), None, 0) for s in range(0, h, HEADS_PER_STEP)]
    else:
        steps = gqa_steps(gqa_kv_heads)
    for s, heads, kv0, num_kv in steps:
        qs = q[s:s + heads, row_end - last:row_end]
        # scores in the cache dtype (tensor cores on the GPU), softmax in fp32
        if kv0 is None:
            scores = torch.matmul(qs, k[kv_ids[s:s + heads], :keys].transpose(1, 2))
        else:
            rows = qs.reshape(num_kv, heads // num_kv * last, qs.shape[-1])  # a copy of the step's LAST_Q rows only
            scores = torch.matmul(rows, k[kv0:kv0 + num_kv, :keys].transpose(1, 2)).view(heads, last, keys)
        att = (scores.float() * scale).masked_fill(~causal[None], float("-inf"))
        att = torch.softmax(att, dim=-1)
        vertical[s:s + heads, :keys] = att.sum(1)
        if diagonals:
            slash[s:s + heads, :keys] = diagonal_sums(att, keys - last)
    return vertical, slash


def gqa_steps(kv: tuple[int, ...]) -> list[tuple[int, int, int, int]]:
    """The estimate steps of gqa_shaped_estimate for heads whose KV heads are ``kv`` (host ints, head order): (first
    head, heads, first KV head, KV heads), each step equal runs of heads over consecutive KV heads (what one
    GQA-shaped GEMM scores), at most HEADS_PER_STEP heads (the bound on the [heads, LAST_Q, L] scores). Runs are
    the maximal spans of consecutive heads sharing a KV head (cut into HEADS_PER_STEP pieces where longer); runs
    of one length on consecutive KV heads share a step while it has room: whole groups of 4 (Llama-3-8B) two per
    step, of 7 or 6 (Qwen2.5 0.5B / 1.5B) one per step, MHA heads 8 per step. A per-head config's subset of a
    group is a shorter run, its own step: no head's keys are ever gathered."""
    runs: list[list[int]] = []  # [first head, heads, KV head]
    for i, x in enumerate(kv):
        if runs and runs[-1][2] == x and runs[-1][1] < HEADS_PER_STEP:
            runs[-1][1] += 1
        else:
            runs.append([i, 1, x])
    steps: list[list[int]] = []  # [first head, heads, first KV head, KV heads]
    for first, heads, x in runs:
        prev = steps[-1] if steps else None
        if (prev and prev[1] // prev[3] == heads and prev[2] + prev[3] == x and prev[0] + prev[1] == first
                and prev[1] + heads <= HEADS_PER_STEP):
            prev[1] += heads
            prev[3] += 1
        else:
            steps.append([first, heads, x, 1])
    return [tuple(step) for step in steps]


def segment_ends(geom: ChunkGeometry, segment_rows: int) -> list[int]:
    """The chunk-relative end row of each segment of ``segment_rows`` rows (one segment, [n], when
    ``segment_rows`` <= 0 or covers the chunk)."""
    if segment_rows <= 0 or segment_rows >= geom.n:
        return [geom.n]
    return list(range(segment_rows, geom.n, segment_rows)) + [geom.n]


def column_votes(q: torch.Tensor, k: torch.Tensor, kv_ids: torch.Tensor, geom: ChunkGeometry, scale: float,
                 row_end: int, gqa_kv_heads: tuple[int, ...] | None = None) -> torch.Tensor:
    """[h, L] column attention mass of the LAST_Q rows of the chunk ending at chunk row ``row_end`` (causal:
    keys up to each row). q [h, n, d], k [Hkv, L, d]: one segment's vote (segment_rows)."""
    return _line_votes(q, k, kv_ids, geom, scale, row_end, diagonals=False, gqa_kv_heads=gqa_kv_heads)[0]


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
               segment_rows=0, exact=False, gqa_kv_heads=None):
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
            vertical, slash = estimate_lines(q, k, kv_ids, geom, scale, gqa_kv_heads)
        if len(ends) > 1 and not exact:  # [h, segments, L]: the last segment's vote is the chunk's (estimate_lines)
            vertical = torch.stack([column_votes(q, k, kv_ids, geom, scale, e, gqa_kv_heads) for e in ends[:-1]]
                                   + [vertical], 1)
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
