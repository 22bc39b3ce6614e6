"""Quest block selection: per (sequence, kv-head), a fixed number of blocks by upper bound of q.k.

For a block with per-channel key bounds [kmin, kmax], ``sum_d max(q_d * kmin_d, q_d * kmax_d)`` bounds
q.k of every key in it (Quest). Written as ``relu(q).kmax + min(q, 0).kmin`` it is two batched matmuls,
so scoring a 128K-token sequence never materialises a [blocks, heads, head_dim] product.

GQA: the blocks of a kv-head are shared by its query heads, so each query head of the group scores every
block and the group keeps the blocks with the best score of any of its heads (``gqa_reduce="max"``; "sum"
adds them). Sink blocks and the recent window are forced in; slots beyond a sequence's own budget or its
block count come back as invalid. All shapes depend only on (batch, heads, table width, k): no host sync.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

FORCED = float("inf")
INVALID = float("-inf")
# Score of a block whose summary is empty or undefined (e.g. KV loaded behind the backend's back): finite,
# so it can still fill a budget slot and every sequence gets exactly its budget of blocks.
UNKNOWN = -1e30


def quest_scores(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, gqa_reduce: str = "max") -> torch.Tensor:
    """q [N, Hkv, G, D]; kmin/kmax [N, B, Hkv, D] (the summaries gathered through the block table).
    Returns [N, Hkv, B] float32 upper bounds."""
    qf = q.float()
    pos, neg = qf.clamp(min=0), qf.clamp(max=0)
    # [N, Hkv, G, D] x [N, Hkv, D, B] -> [N, Hkv, G, B]
    s = torch.matmul(pos, kmax.float().permute(0, 2, 3, 1)) + torch.matmul(neg, kmin.float().permute(0, 2, 3, 1))
    # An unwritten block has kmin=+inf, kmax=-inf: the bound is -inf or nan (0 * inf).
    s = torch.nan_to_num(s, nan=UNKNOWN, posinf=UNKNOWN, neginf=UNKNOWN)
    return s.amax(dim=2) if gqa_reduce == "max" else s.sum(dim=2)


@dataclass
class Selection:
    """Per (sequence, kv-head): ``k`` logical block indices, ascending with the valid ones first;
    ``valid`` marks real picks (invalid slots hold the sequence's last block index, always safe to read)."""

    blocks: torch.Tensor  # [N, Hkv, k] int64 logical block index
    valid: torch.Tensor  # [N, Hkv, k] bool


def select_blocks(scores: torch.Tensor, num_blocks: torch.Tensor, budget_blocks: torch.Tensor, k: int,
                  sink_blocks: int, recent_blocks: int) -> Selection:
    """scores [N, Hkv, B]; num_blocks / budget_blocks [N] (device int): blocks of each sequence and how many
    it may read (budget_blocks >= sink + recent is the planner's job); k: fixed slots per step (>= max budget).
    """
    N, H, B = scores.shape
    k = min(k, B)
    ar = torch.arange(B, device=scores.device)
    nb = num_blocks.view(N, 1, 1)
    in_seq = ar.view(1, 1, B) < nb
    forced = (ar.view(1, 1, B) < sink_blocks) | (ar.view(1, 1, B) >= nb - recent_blocks)
    s = torch.where(forced, torch.full_like(scores, FORCED), scores)
    s = torch.where(in_seq, s, torch.full_like(scores, INVALID))
    top_scores, top_idx = torch.topk(s, k, dim=-1)  # sorted descending: forced first, then best scores
    rank = torch.arange(k, device=scores.device).view(1, 1, k)
    valid = (top_scores > INVALID) & (rank < budget_blocks.view(N, 1, 1)) & (top_idx < nb)
    # Ascending block order (the last, partial block ends up last; dense kernels expect that), invalid last.
    key = torch.where(valid, top_idx, top_idx + B)
    order = torch.argsort(key, dim=-1)
    blocks = torch.gather(top_idx, -1, order)
    valid = torch.gather(valid, -1, order)
    blocks = torch.where(valid, blocks, (nb - 1).clamp(min=0).expand(N, H, k))
    return Selection(blocks, valid)


def gather_summaries(kmin: torch.Tensor, kmax: torch.Tensor, block_table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summaries of each sequence's blocks: block_table [N, B] physical ids -> [N, B, Hkv, D] each.
    Padding entries of the table may hold anything in range; the selection masks them by num_blocks."""
    idx = block_table.long().clamp(min=0, max=kmin.shape[0] - 1)
    return kmin[idx], kmax[idx]


def group_summaries(smin: torch.Tensor, smax: torch.Tensor, group_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, B, Hkv, D] block summaries -> [N, ceil(B / g), Hkv, D]: each group's min / max over its g blocks."""
    N, B, H, D = smin.shape
    pad = (-B) % group_blocks
    if pad:
        smin = torch.cat([smin, smin.new_full((N, pad, H, D), float("inf"))], dim=1)
        smax = torch.cat([smax, smax.new_full((N, pad, H, D), float("-inf"))], dim=1)
    return (smin.view(N, -1, group_blocks, H, D).amin(2), smax.view(N, -1, group_blocks, H, D).amax(2))


def candidate_blocks(group_scores: torch.Tensor, num_blocks: torch.Tensor, num_groups: torch.Tensor, group_blocks: int,
                     sink_blocks: int, recent_blocks: int, B: int) -> torch.Tensor:
    """Two-level, coarse pass: [N, Hkv, NG] group scores and [N] groups to keep -> [N, Hkv, B] bool, the blocks of
    the kept groups (groups holding a sink or recent block are forced in, as blocks are)."""
    N, H, NG = group_scores.shape
    g = torch.arange(NG, device=group_scores.device).view(1, 1, NG)
    nb = num_blocks.view(N, 1, 1)
    ng = (nb + group_blocks - 1) // group_blocks
    forced = (g * group_blocks < sink_blocks) | ((g + 1) * group_blocks - 1 >= nb - recent_blocks)
    s = torch.where(forced, torch.full_like(group_scores, FORCED), group_scores)
    s = torch.where(g < ng, s, torch.full_like(s, INVALID))
    kc = int(min(NG, int(num_groups.max())))
    top_s, top_g = torch.topk(s, kc, dim=-1)
    keep = (torch.arange(kc, device=s.device).view(1, 1, kc) < num_groups.view(N, 1, 1)) & (top_s > INVALID)
    kept = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, top_g, keep)
    return kept.repeat_interleave(group_blocks, dim=-1)[..., :B]


def select_for_queries(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, block_table: torch.Tensor,
                       num_blocks: torch.Tensor, budget_blocks: torch.Tensor, k: int, sink_blocks: int,
                       recent_blocks: int, gqa_reduce: str = "max", group_blocks: int = 1,
                       candidate_groups: torch.Tensor | None = None) -> Selection:
    """q [N, Hq, D] decode queries -> Selection. kmin/kmax: the layer's summaries [num_blocks+1, Hkv, D].
    ``group_blocks`` > 1: two-level (the torch reference of the kernel's): groups of that many blocks scored by
    their group min/max first, the ``candidate_groups`` [N] best (``RetrievalParams.candidate_groups``) kept, and
    the budget picked among their blocks by the block bounds (exactly the budget, as single-level)."""
    N, Hq, D = q.shape
    Hkv = kmin.shape[1]
    smin, smax = gather_summaries(kmin, kmax, block_table)
    qg = q.view(N, Hkv, Hq // Hkv, D)
    scores = quest_scores(qg, smin, smax, gqa_reduce)
    if group_blocks > 1:
        if candidate_groups is None:
            raise ValueError("two-level selection needs candidate_groups")
        gscores = quest_scores(qg, *group_summaries(smin, smax, group_blocks), gqa_reduce)
        cand = candidate_blocks(gscores, num_blocks, candidate_groups, group_blocks, sink_blocks, recent_blocks,
                                scores.shape[-1])
        scores = torch.where(cand, scores, torch.full_like(scores, INVALID))
    return select_blocks(scores, num_blocks, budget_blocks, k, sink_blocks, recent_blocks)
