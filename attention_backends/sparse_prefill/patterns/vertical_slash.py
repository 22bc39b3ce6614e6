"""Vertical-slash: the last LAST_Q queries of the chunk, softmaxed against all keys, vote for key columns
(vertical lines) and diagonals (slash lines); keep the top ``vertical`` columns and top ``slash``
diagonals, always including the first columns and the nearest diagonals. Slashes are served as the
BLOCK-aligned key blocks they cross, verticals as single columns."""
from __future__ import annotations

import torch

from attention_backends.sparse_prefill.index import BLOCK, ChunkGeometry
from attention_backends.sparse_prefill.patterns.base import SparsePattern, rank_mask

LAST_Q = 64
FORCED_COLUMNS = 30  # attention sinks: MInference keeps the first ~30 columns
FORCED_DIAGONALS = 100  # local attention: and the ~100 nearest diagonals
HEADS_PER_STEP = 8  # bounds the [heads, LAST_Q, L] estimation scores at long contexts


def estimate_lines(q: torch.Tensor, k: torch.Tensor, geom: ChunkGeometry, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Column and diagonal attention mass [h, L] each, from the chunk's last LAST_Q queries."""
    h, L = k.shape[0], geom.L
    last = min(LAST_Q, geom.n)
    rows_pos = geom.L - last + torch.arange(last, device=q.device)  # absolute positions of the voting rows
    keys = torch.arange(L, device=q.device)
    causal = keys[None, :] <= rows_pos[:, None]  # [last, L]
    diag = torch.clamp(rows_pos[:, None] - keys[None, :], min=0)  # [last, L]
    vertical = q.new_zeros((h, L), dtype=torch.float32)
    slash = q.new_zeros((h, L), dtype=torch.float32)
    for s in range(0, h, HEADS_PER_STEP):
        qs = q[s:s + HEADS_PER_STEP, -last:].float()
        att = torch.einsum("hqd,hkd->hqk", qs, k[s:s + HEADS_PER_STEP].float()) * scale
        att = torch.softmax(att.masked_fill(~causal[None], float("-inf")), dim=-1)
        vertical[s:s + HEADS_PER_STEP] = att.sum(1)
        att = att * causal[None]
        slash[s:s + HEADS_PER_STEP].scatter_add_(1, diag.reshape(1, -1).expand(att.shape[0], -1), att.reshape(att.shape[0], -1))
    return vertical, slash


class VerticalSlash(SparsePattern):
    name = "vertical_slash"
    budgets = {"vertical": (1000, 1), "slash": (1024, 1)}
    search_candidates = ({"vertical": 100, "slash": 256}, {"vertical": 500, "slash": 512},
                         {"vertical": 1000, "slash": 1024}, {"vertical": 2000, "slash": 2048})

    @classmethod
    def select(cls, q, k, geom: ChunkGeometry, budgets, budget_max, scale):
        dev = q.device
        vertical, slash = estimate_lines(q, k, geom, scale)
        L = geom.L
        pos = torch.arange(L, device=dev)
        vertical = torch.where(pos[None, :] < FORCED_COLUMNS, torch.full_like(vertical, float("inf")), vertical)
        slash = torch.where(pos[None, :] < FORCED_DIAGONALS, torch.full_like(slash, float("inf")), slash)
        v_max = min(budget_max["vertical"], L)
        s_max = min(budget_max["slash"], L)
        cols = torch.topk(vertical, v_max, dim=-1).indices
        cols = torch.where(rank_mask(v_max, budgets["vertical"]), cols, torch.full_like(cols, -1))
        offsets = torch.topk(slash, s_max, dim=-1).indices  # diagonal d: key = row - d
        keep = rank_mask(s_max, budgets["slash"])  # [h, S]
        # A diagonal d seen by query block [a, b) crosses keys [a - d, b - 1 - d]: at most two key blocks.
        a, b = geom.q_block_bounds(dev)
        hi = b[None, :, None] - 1 - offsets[:, None, :]  # [h, nqb, S]
        lo = torch.clamp(a[None, :, None] - offsets[:, None, :], min=0)
        valid = keep[:, None, :] & (hi >= 0)
        dump = geom.nkb  # scatter invalid entries into an extra column, dropped below
        mask = torch.zeros(q.shape[0], geom.nqb, geom.nkb + 1, dtype=torch.bool, device=dev)
        for edge in (lo, hi):
            idx = torch.where(valid, torch.clamp(edge, min=0) // BLOCK, torch.full_like(edge, dump))
            mask.scatter_(2, idx, True)
        return mask[..., :dump] & geom.causal_blocks(dev)[None], cols
