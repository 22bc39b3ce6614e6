"""The one sparse-index format every pattern produces and every kernel consumes.

A prefill chunk has ``n`` query rows at absolute positions ``[L - n, L)`` and attends to ``L`` keys (the
cached context plus itself, causally). Query rows are grouped in blocks of ``BLOCK`` counted from the
chunk's first row; keys in ``BLOCK``-aligned blocks counted from position 0. Per query head and query
block the index holds a set of whole key blocks (``block_mask``), key ranges (``ranges``: at most BLOCK keys
each, at any offset, given relative to the query block's first row, the same for every query block of a
head: how vertical-slash serves its diagonals, MInference-style, instead of rounding them up to aligned
blocks) plus single key columns that fall outside both (``cols``, compacted, ``-1`` padded). Causality is
applied element-wise by the kernels, so the diagonal block may be selected whole.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

BLOCK = 64


@dataclass(frozen=True)
class ChunkGeometry:
    n: int  # query rows of this chunk
    L: int  # keys it attends to (context + chunk)

    def __post_init__(self) -> None:
        if not 0 < self.n <= self.L:
            raise ValueError(f"chunk of {self.n} rows cannot attend to {self.L} keys")

    @property
    def q_pos0(self) -> int:
        return self.L - self.n

    @property
    def nqb(self) -> int:
        return -(-self.n // BLOCK)

    @property
    def nkb(self) -> int:
        return -(-self.L // BLOCK)

    def q_block_bounds(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Absolute positions [a, b) of every query block."""
        a = self.q_pos0 + torch.arange(self.nqb, device=device) * BLOCK
        return a, torch.clamp(a + BLOCK, max=self.L)

    def causal_blocks(self, device=None) -> torch.Tensor:
        """[nqb, nkb] bool: key blocks holding at least one key some row of the query block may see."""
        _, b = self.q_block_bounds(device)
        kb_start = torch.arange(self.nkb, device=device) * BLOCK
        return kb_start[None, :] <= (b - 1)[:, None]

    def causal_pairs(self) -> int:
        """(query, key) pairs of the causal mask of this chunk."""
        lo, hi = self.q_pos0, self.L
        return (hi * (hi + 1) - lo * (lo + 1)) // 2


def dense_tail_start(geom: ChunkGeometry, rows: int) -> int:
    """The first query block holding one of the chunk's last ``rows`` rows (nqb: none; rows <= 0)."""
    return geom.nqb if rows <= 0 else max(0, geom.n - rows) // BLOCK


# Padding of ``ranges``: an empty range after every real one (real ranges end at most BLOCK after the row).
RANGE_PAD = BLOCK
# A query block's ranges that reach its own rows (end > 0) lie in (-BLOCK, BLOCK]: at most 2 of them (see
# ranges_from_diagonals), the rest end at or before the block's first row and are seen whole by every row.
RANGE_TAIL = 2


@dataclass
class SparseIndex:
    block_mask: torch.Tensor  # [H, nqb, nkb] bool
    cols: torch.Tensor  # [H, nqb, C] int64 key positions, valid first, -1 padded (C may be 0)
    col_count: torch.Tensor  # [H, nqb] int64
    # [H, R, 2] int64 (start, end) relative to the query block's first row: keys [a + start, a + end);
    # ascending, disjoint, end - start <= BLOCK, padded with (RANGE_PAD, RANGE_PAD). R may be 0.
    ranges: torch.Tensor | None = None
    range_count: torch.Tensor | None = None  # [H] int64
    range_first: torch.Tensor | None = None  # [H, nqb] int64: first range with a key >= 0 (skip the rest)

    def __post_init__(self) -> None:
        H, dev = self.block_mask.shape[0], self.block_mask.device
        if self.ranges is None:
            self.ranges = torch.zeros(H, 0, 2, dtype=torch.int64, device=dev)
            self.range_count = torch.zeros(H, dtype=torch.int64, device=dev)
            self.range_first = torch.zeros(H, self.block_mask.shape[1], dtype=torch.int64, device=dev)

    @property
    def num_heads(self) -> int:
        return self.block_mask.shape[0]

    def to(self, device) -> "SparseIndex":
        return SparseIndex(*(x.to(device) for x in (self.block_mask, self.cols, self.col_count, self.ranges,
                                                    self.range_count, self.range_first)))

    def is_group_shared(self, group: int) -> bool:
        """Every query head of each KV group (``group`` consecutive heads) holds the same entries: what the
        shared group kernel reads. A host sync: for tests and checks, not the serving path."""
        def same(x: torch.Tensor) -> bool:
            g = x.view(x.shape[0] // group, group, *x.shape[1:])
            return bool((g == g[:, :1]).all())

        return all(same(x) for x in (self.block_mask, self.cols, self.col_count, self.ranges, self.range_count,
                                     self.range_first))

    def ranges_on(self) -> torch.Tensor:
        """[H, nqb] bool: the query block visits some range (see the module doc: dense-tail blocks do not)."""
        return self.range_first < self.range_count[:, None]

    def with_dense_tail(self, geom: ChunkGeometry, rows: int) -> "SparseIndex":
        """Make the chunk's last ``rows`` query rows (rounded up to whole query blocks) attend every causal key:
        their blocks select every causal key block and drop their ranges and columns (in place; returns self).
        Why: the prompt's last rows (the question) are what retrieval heads look the answer up with; their K/V
        feed every decoded token, and they cost one or two query blocks x L keys per chunk."""
        qb0 = dense_tail_start(geom, rows)
        if qb0 < geom.nqb:
            self.block_mask[:, qb0:] = geom.causal_blocks(self.block_mask.device)[None, qb0:]
            self.cols[:, qb0:] = -1
            self.col_count[:, qb0:] = 0
            self.range_first[:, qb0:] = self.range_count[:, None]
        return self

    def in_ranges(self, rel: torch.Tensor) -> torch.Tensor:
        """rel [H, ...] key positions relative to a query block's first row -> bool: inside a range."""
        H, R = self.ranges.shape[:2]
        if R == 0:
            return torch.zeros(rel.shape, dtype=torch.bool, device=rel.device)
        flat = rel.reshape(H, -1).contiguous()
        j = torch.searchsorted(self.ranges[..., 0].contiguous(), flat, right=True) - 1
        end = torch.gather(self.ranges[..., 1], 1, j.clamp(min=0))
        inside = (j >= 0) & (j < self.range_count[:, None]) & (flat < end)
        return inside.view(rel.shape)

    def _range_pairs(self, geom: "ChunkGeometry", a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """[H] causal pairs computed through ``ranges``, without an [H, nqb, R] intermediate."""
        H, R = self.ranges.shape[:2]
        if R == 0:
            return torch.zeros(H, dtype=torch.int64, device=a.device)
        s, e = self.ranges[..., 0], self.ranges[..., 1]
        # All but the last RANGE_TAIL real ranges end at or before every row: rows x their width (clipped at key 0).
        width = torch.clamp(e - s, min=0)
        prefix = F.pad(torch.cumsum(width, 1), (1, 0))  # [H, R + 1]
        hi = torch.clamp(self.range_count - RANGE_TAIL, min=0)[:, None].expand(H, len(a))
        lo = torch.minimum(self.range_first, hi)
        full = torch.gather(prefix, 1, hi) - torch.gather(prefix, 1, lo)
        s_lo = torch.gather(s, 1, lo.clamp(max=R - 1))
        full -= torch.where(lo < hi, torch.clamp(-(a[None, :] + s_lo), min=0), torch.zeros_like(full))
        pairs = (full * (b - a)[None, :]).sum(1)  # 0 where range_first = range_count (lo = hi): dense-tail blocks
        # The tail: exact causal count per (query block, range).
        tail = torch.clamp(self.range_count[:, None] - RANGE_TAIL, min=0) + torch.arange(RANGE_TAIL, device=a.device)
        real = tail < self.range_count[:, None]  # [H, T]
        tail = tail.clamp(max=R - 1)
        ts, te = torch.gather(s, 1, tail), torch.gather(e, 1, tail)
        c = torch.clamp(a[None, :, None] + ts[:, None, :], min=0)  # [H, nqb, T]
        w = torch.clamp(torch.clamp(a[None, :, None] + te[:, None, :], max=geom.L) - c, min=0)

        def ramp(t: torch.Tensor) -> torch.Tensor:
            m = torch.clamp(t[None, :, None] - c, min=0)
            m_in = torch.minimum(m, w)
            return m_in * (m_in + 1) // 2 + (m - m_in) * w

        on = self.ranges_on()[..., None]  # dense-tail blocks count their keys through block_mask only
        return pairs + ((ramp(b) - ramp(a)) * (real[:, None, :] & on)).sum(dim=(1, 2))

    def computed_pairs(self, geom: ChunkGeometry) -> torch.Tensor:
        """[H] causal (query, key) pairs this index makes a kernel compute (what density reports)."""
        a, b = geom.q_block_bounds(self.block_mask.device)
        c = torch.arange(geom.nkb, device=a.device) * BLOCK
        w = torch.clamp(c + BLOCK, max=geom.L) - c

        def ramp(t: torch.Tensor) -> torch.Tensor:  # sum_{i<t} clamp(i + 1 - c, 0, w), for all (qb, kb)
            m = torch.clamp(t[:, None] - c[None, :], min=0)
            m_in = torch.minimum(m, w[None, :])
            return m_in * (m_in + 1) // 2 + (m - m_in) * w[None, :]

        per_block = ramp(b) - ramp(a)  # [nqb, nkb]
        blocks = (self.block_mask.long() * per_block[None]).sum(dim=(1, 2))
        valid = torch.arange(self.cols.shape[-1], device=a.device)[None, None, :] < self.col_count[..., None]
        col_rows = torch.clamp(b[None, :, None] - torch.maximum(self.cols, a[None, :, None]), min=0)
        return blocks + (col_rows * valid).sum(dim=(1, 2)) + self._range_pairs(geom, a, b)

    def density(self, geom: ChunkGeometry) -> float:
        """Fraction of the causal mask (all heads) actually computed."""
        return float(self.computed_pairs(geom).sum()) / (geom.causal_pairs() * self.num_heads)

    def dense_mask(self, geom: ChunkGeometry, rows: slice | None = None) -> torch.Tensor:
        """[H, r, L] bool element mask (causal applied) for query rows ``rows`` of the chunk; for tests/recall."""
        rows = rows or slice(0, geom.n)
        return self.element_mask(geom, torch.arange(rows.start, rows.stop, device=self.block_mask.device))

    def element_mask(self, geom: ChunkGeometry, r: torch.Tensor) -> torch.Tensor:
        """[H, len(r), L] bool element mask (causal applied) for the chunk's query rows ``r`` (any order)."""
        keys = torch.arange(geom.L, device=r.device)
        m = self.block_mask[:, r // BLOCK][:, :, keys // BLOCK]  # [H, r, L]
        H = self.num_heads
        if self.ranges.shape[1]:
            a = geom.q_pos0 + (r // BLOCK) * BLOCK
            m = m | self.in_ranges((keys[None, :] - a[:, None])[None].expand(H, -1, -1))
        if self.cols.shape[-1]:
            cols = self.cols[:, r // BLOCK]  # [H, r, C]
            valid = torch.arange(cols.shape[-1], device=r.device) < self.col_count[:, r // BLOCK][..., None]
            m = m.clone()
            hh = torch.arange(H, device=r.device)[:, None, None].expand_as(cols)
            rr = torch.arange(len(r), device=r.device)[None, :, None].expand_as(cols)
            m[hh[valid], rr[valid], cols[valid]] = True
        causal = keys[None, None, :] <= (geom.q_pos0 + r)[None, :, None]
        return m & causal


def compact_columns(cols: torch.Tensor, block_mask: torch.Tensor, geom: ChunkGeometry,
                    ranges: SparseIndex | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Vertical columns per head [H, V] or per query block [H, nqb, V] (-1 = unused) -> per query block, the
    ones not already inside a selected block (or a range of ``ranges``) and visible to the block's last row:
    (cols [H, nqb, V] valid-first, counts [H, nqb])."""
    H, V = cols.shape[0], cols.shape[-1]
    if V == 0:
        return cols.new_zeros((H, geom.nqb, 0)), cols.new_zeros((H, geom.nqb))
    a, b = geom.q_block_bounds(cols.device)
    c = cols if cols.dim() == 3 else cols[:, None, :].expand(H, geom.nqb, V)
    safe = torch.clamp(c, min=0)
    in_block = torch.gather(block_mask, 2, safe // BLOCK)
    if ranges is not None:
        in_block = in_block | ranges.in_ranges(c - a[None, :, None])
    valid = (c >= 0) & (c <= (b - 1)[None, :, None]) & ~in_block
    big = torch.iinfo(torch.int64).max
    keyed = torch.where(valid, c, torch.full_like(c, big))
    keyed, _ = torch.sort(keyed, dim=-1)
    count = valid.sum(-1)
    return torch.where(keyed == big, torch.full_like(keyed, -1), keyed), count


def empty_index(H: int, geom: ChunkGeometry, device=None) -> SparseIndex:
    return SparseIndex(torch.zeros(H, geom.nqb, geom.nkb, dtype=torch.bool, device=device),
                       torch.zeros(H, geom.nqb, 0, dtype=torch.int64, device=device),
                       torch.zeros(H, geom.nqb, dtype=torch.int64, device=device))


def ranges_from_diagonals(diagonals: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Selected diagonals [h, S] (d: key = row - d; ``keep`` [h, S] bool) -> key ranges relative to a query
    block's first row a: (ranges [h, S, 2] ascending, padded with RANGE_PAD, counts [h]).

    Diagonal d crosses keys [a - d, a - d + BLOCK) of the block's rows: the same relative interval for every
    query block, so this runs once per head, not per block. Overlapping or touching intervals merge into
    segments; each segment is cut into BLOCK-wide ranges (the last one shorter), so ranges never overlap and
    a segment of m diagonals needs at most m ranges (fixed shape, no host sync). All ranges with end > 0
    belong to the last segment (it holds every d < BLOCK), so at most RANGE_TAIL=2 of them reach the rows."""
    h, S = diagonals.shape
    dev = diagonals.device
    if S == 0:
        return torch.zeros(h, 0, 2, dtype=torch.int64, device=dev), torch.zeros(h, dtype=torch.int64, device=dev)
    d = torch.sort(torch.where(keep, diagonals, torch.full_like(diagonals, -1)), dim=-1, descending=True).values
    count = keep.sum(-1)
    j = torch.arange(S, device=dev)[None, :].expand(h, S)
    real = j < count[:, None]
    start = -d  # ascending over the real entries
    prev = F.pad(start[:, :-1], (1, 0), value=-(1 << 40))
    new_seg = real & (start > prev + BLOCK)
    first = torch.cummax(torch.where(new_seg, j, torch.zeros_like(j)), dim=-1).values
    is_last = real & (F.pad(new_seg[:, 1:], (0, 1), value=True) | (j == count[:, None] - 1))
    big = torch.full_like(j, S - 1)
    last = torch.flip(torch.cummin(torch.flip(torch.where(is_last, j, big), [-1]), dim=-1).values, [-1])
    seg_start = torch.gather(start, 1, first)
    seg_end = torch.gather(start, 1, last) + BLOCK
    p = j - first
    tiles = real & (p * BLOCK < seg_end - seg_start)
    t_start = seg_start + p * BLOCK
    t_end = torch.minimum(t_start + BLOCK, seg_end)
    key = torch.where(tiles, t_start, torch.full_like(t_start, RANGE_PAD))
    key, order = torch.sort(key, dim=-1, stable=True)
    t_end = torch.where(key == RANGE_PAD, torch.full_like(key, RANGE_PAD), torch.gather(t_end, 1, order))
    return torch.stack([key, t_end], -1), tiles.sum(-1)


def window_ranges(ranges: torch.Tensor, count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Key ranges (ranges_from_diagonals' form: [h, R, 2] ascending, disjoint, each at most BLOCK wide, padded with
    RANGE_PAD) -> disjoint ranges exactly BLOCK wide covering every key of them: (windows [h, R, 2], counts [h]).

    What a kernel that reads whole BLOCK-key windows at any offset (vLLM's FA2 sparse kernel) can compute exactly:
    a run of ranges closer than BLOCK to each other is covered by consecutive windows from the run's first
    key, so each run costs at most BLOCK - 1 keys more than its ranges (the gaps inside it and the last
    window's overhang), and no range needs more windows than before (at most one new window per range, so R
    still holds them all). Windows start below BLOCK (ranges end at most BLOCK after the row), so at most
    RANGE_TAIL of them reach a query block's rows, as before.

    Runs are a sequential notion (a run's grid depends on where it started); this computes them without a
    loop over ranges or a host sync: a run's grid is fixed by its start's phase mod BLOCK, so for all BLOCK
    phases at once it finds where a run of that phase would break, then follows the chain of run starts from
    the first range by pointer doubling."""
    h, R = ranges.shape[:2]
    dev = ranges.device
    if R == 0:
        return ranges, count
    j = torch.arange(R, device=dev)
    real = j[None, :] < count[:, None]
    big = 1 << 40  # pads sort last and never join a run
    s = torch.where(real, ranges[..., 0], torch.full_like(ranges[..., 0], big))
    e = torch.where(real, ranges[..., 1], torch.full_like(ranges[..., 1], big))
    phase = torch.arange(BLOCK, device=dev)[None, :, None]  # [1, BLOCK, 1]
    # A run on grid phase p covers up to the first grid point >= the end of its last range: range i breaks the
    # run when it starts at or after that point (range 0 always starts one).
    grid_end = phase + BLOCK * _ceil_div(e[:, None, :] - phase, BLOCK)  # [h, BLOCK, R]
    breaks = torch.ones(h, BLOCK, R, dtype=torch.bool, device=dev)
    breaks[..., 1:] = s[:, None, 1:] >= grid_end[..., :-1]
    # next_break[p, i]: the first j > i where a run on phase p breaks (R when none)
    at = torch.where(breaks, j, torch.full_like(j, R))
    at = torch.cat([at[..., 1:], torch.full_like(at[..., :1], R)], -1)
    next_break = torch.flip(torch.cummin(torch.flip(at, [-1]), -1).values, [-1])
    nxt = torch.gather(next_break, 1, torch.remainder(s, BLOCK)[:, None, :].clamp(max=BLOCK - 1)).squeeze(1)
    jump = torch.cat([nxt, torch.full_like(nxt[:, :1], R)], -1)  # node R: past the end, its own successor
    starts = torch.zeros(h, R + 1, dtype=torch.int64, device=dev)
    starts[:, 0] = 1
    # after k rounds every start fewer than 2**k runs from range 0; more rounds change nothing (node R is its own
    # successor). Compiled (IndexOptions.compiled_index) the count is fixed: R.bit_length() would pin the graph to
    # this R, i.e. to the slash budget, and every budget factor (head_config.budget_scale) would recompile.
    fixed = torch.compiler.is_compiling() and R < 1 << (COMPILED_DOUBLING_ROUNDS - 1)  # a range guard, not R's value
    rounds = COMPILED_DOUBLING_ROUNDS if fixed else max(1, R.bit_length() + 1)
    for _ in range(rounds):
        starts = torch.maximum(starts, torch.zeros_like(starts).scatter_reduce(1, jump, starts, "amax"))
        jump = torch.gather(jump, 1, jump)
    run_of = torch.cummax(torch.where(starts[:, :R].bool(), j, torch.zeros_like(j)), -1).values
    run_start = torch.gather(s, 1, run_of)
    first = run_start + BLOCK * torch.div(s - run_start, BLOCK, rounding_mode="floor")  # window holding s
    second = first + BLOCK  # the next one, where the range runs past the first
    cand = torch.cat([torch.where(real, first, torch.full_like(first, big)),
                      torch.where(real & (e > second), second, torch.full_like(second, big))], -1)
    cand = torch.sort(cand, -1).values
    dup = torch.zeros_like(cand, dtype=torch.bool)
    dup[:, 1:] = cand[:, 1:] == cand[:, :-1]
    cand = torch.sort(torch.where(dup, torch.full_like(cand, big), cand), -1).values[:, :R]
    live = cand < big
    start = torch.where(live, cand, torch.full_like(cand, RANGE_PAD))
    end = torch.where(live, cand + BLOCK, torch.full_like(cand, RANGE_PAD))
    return torch.stack([start, end], -1), live.sum(-1)


# Pointer-doubling rounds of a compiled window_ranges: enough for R < 2**16 ranges per head (R <= the slash budget;
# beyond, the compiled build counts them as eager does). Each round is a few fused kernels.
COMPILED_DOUBLING_ROUNDS = 17


def _ceil_div(x: torch.Tensor, m: int) -> torch.Tensor:
    return -torch.div(-x, m, rounding_mode="floor")
