"""Analysis selectors: where do a retrieval budget's answers go? (benchmarks only, eager engines)

The production path scores blocks with Quest bounds shared by a GQA group and attends them in one Triton step.
To separate "the summaries pick the wrong blocks" from "the budget is too small" and "a group shares one
choice", ``benchmarks.retrieval_decode_accuracy --variants`` swaps the selection for one of these, computed in
torch over the whole paged context (it reads every key: an oracle, never a fast path):

* ``quest_torch``: the production rule (Quest bound, group-reduced), in torch: a control for the kernel.
* ``quest_qhead``: Quest bounds, but every query head picks its own blocks (Quest's original per-head rule).
* ``oracle_max``: exact block scores, the largest q.k in the block (reduced over the group as configured).
* ``oracle_mass``: the blocks holding the most softmax mass of the group's heads (the best a shared choice of
  this many blocks can do for the output).
* ``oracle_mass_qhead``: the same, per query head.
* ``centroid``: q . mean key of the block (a mean summary instead of min/max bounds).
* ``refine2`` / ``refine4``: two-level: Quest picks 2x / 4x the budget as candidates, exact block scores (largest
  q.k) choose the budget among them (reads the candidates' keys: what a refining kernel would cost).
* ``refine4_mass``: the same candidates, ranked by the group's softmax mass over the candidates' keys.
* ``sparq8`` / ``sparq16``: approximate q.k of every key from the 8 / 16 channels where the group's queries are
  largest (SparQ / Double Sparsity: reads r/head_dim of the keys), blocks ranked by their approximate softmax mass.
* ``keychan16``: the same from 16 channels fixed per (sequence, kv-head) by the keys alone (largest mean |k|): what
  a compact per-block copy of 16 key channels (Double Sparsity's label cache), chosen at prefill, could score.

``gqa_reduce`` may also be "mass" here (Quest selectors): each query head's bounds become a softmax over the
blocks, summed over the group, so a head with one sharp peak is not outvoted by flat ones.

Sink blocks and the recent window are forced in as in production; each (sequence, kv-head or query head) reads
exactly its budget of blocks.
"""
from __future__ import annotations

import torch

SELECTORS = ("quest", "quest_torch", "quest_qhead", "oracle_max", "oracle_mass", "oracle_mass_qhead", "centroid",
             "refine2", "refine4", "refine4_mass", "sparq8", "sparq16", "keychan16")


def block_scores(selector: str, logits: torch.Tensor, q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor,
                 bs: int, gqa_reduce: str, scale: float = 1.0) -> torch.Tensor:
    """[N, Hkv, G, W] per-block scores (G = 1 when the group shares one choice).
    logits [N, Hkv, G, W*bs] (masked: -inf past the sequence); q [N, Hkv, G, D]; kmin/kmax [N, W, Hkv, D]."""
    N, Hkv, G, T = logits.shape
    W = T // bs
    if selector == "centroid":
        raise ValueError("centroid scores need the keys: analysis_decode computes them")
    if selector.startswith("oracle_mass"):
        s = torch.softmax(logits, dim=-1).view(N, Hkv, G, W, bs).sum(-1)
        reduce = "sum"
    elif selector == "oracle_max":
        s = logits.view(N, Hkv, G, W, bs).amax(-1)
        reduce = gqa_reduce
    else:  # Quest bound: sum_d max(q_d kmin_d, q_d kmax_d)
        qf = q.float()
        s = (torch.matmul(qf.clamp(min=0), kmax.float().permute(0, 2, 3, 1))
             + torch.matmul(qf.clamp(max=0), kmin.float().permute(0, 2, 3, 1)))
        s = torch.nan_to_num(s, nan=-1e30, posinf=-1e30, neginf=-1e30)
        reduce = gqa_reduce
        if gqa_reduce == "mass":  # each head's bounds as a softmax over blocks: heads vote with their mass
            s = torch.softmax(s * scale, dim=-1)
            reduce = "sum"
    if selector.endswith("_qhead"):
        return s
    return s.amax(dim=2, keepdim=True) if reduce == "max" else s.sum(dim=2, keepdim=True)


def analysis_decode(selector: str, q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    kmin: torch.Tensor, kmax: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                    budget_blocks: torch.Tensor, sink_blocks: int, recent_blocks: int, gqa_reduce: str,
                    scale: float) -> torch.Tensor:
    """q [N, Hq, D] one decode token per sequence; caches [num_blocks, Hkv, bs, D]; summaries [num_blocks+1, Hkv, D];
    block_table [N, W]; seq_lens, budget_blocks [N]. Returns [N, Hq, D]."""
    N, Hq, D = q.shape
    chosen, logits, vals, in_seq = _select(selector, q, key_cache, value_cache, kmin, kmax, block_table, seq_lens,
                                           budget_blocks, sink_blocks, recent_blocks, gqa_reduce, scale)
    bs = key_cache.shape[2]
    token_mask = chosen.repeat_interleave(bs, dim=-1) & in_seq  # [N, Hkv, G', W*bs]
    probs = torch.softmax(logits.masked_fill(~token_mask, float("-inf")), dim=-1)
    return torch.matmul(probs.to(vals.dtype), vals).reshape(N, Hq, D).to(q.dtype)


def selected_blocks(selector: str, q: torch.Tensor, key_cache: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor,
                    block_table: torch.Tensor, seq_lens: torch.Tensor, budget_blocks: torch.Tensor, sink_blocks: int,
                    recent_blocks: int, gqa_reduce: str, scale: float) -> torch.Tensor:
    """[N, Hkv, G', W] bool: the blocks ``selector`` reads (G' = 1 when the group shares one choice)."""
    return _select(selector, q, key_cache, key_cache, kmin, kmax, block_table, seq_lens, budget_blocks, sink_blocks,
                   recent_blocks, gqa_reduce, scale)[0]


def block_agreement(chosen: torch.Tensor, reference: torch.Tensor, forced: torch.Tensor) -> tuple[int, int]:
    """(picked blocks of ``chosen`` that ``reference`` picked too, picked blocks of ``reference``), both over the
    blocks not forced in (sink / recent window): how much of a selection's own choice another one shares."""
    free = ~forced
    return int((chosen & reference & free).sum()), int((reference & free).sum())


def _select(selector, q, key_cache, value_cache, kmin, kmax, block_table, seq_lens, budget_blocks, sink_blocks,
            recent_blocks, gqa_reduce, scale):
    if selector not in SELECTORS[1:]:
        raise ValueError(f"unknown analysis selector {selector!r}; one of {SELECTORS[1:]}")
    N, Hq, D = q.shape
    _, Hkv, bs, _ = key_cache.shape
    G = Hq // Hkv
    W = block_table.shape[1]
    phys = block_table.long().clamp(min=0, max=key_cache.shape[0] - 1)
    keys = key_cache[phys].permute(0, 2, 1, 3, 4).reshape(N, Hkv, W * bs, D)
    vals = value_cache[phys].permute(0, 2, 1, 3, 4).reshape(N, Hkv, W * bs, D)
    qg = q.view(N, Hkv, G, D)
    tok = torch.arange(W * bs, device=q.device)
    in_seq = (tok.view(1, -1) < seq_lens.view(N, 1)).view(N, 1, 1, W * bs)
    logits = torch.matmul(qg.to(keys.dtype), keys.transpose(-1, -2)).float() * scale
    logits = logits.masked_fill(~in_seq, float("-inf"))
    kmin_b, kmax_b = kmin[phys], kmax[phys]  # the sequences' block summaries [N, W, Hkv, D], gathered once
    blk = torch.arange(W, device=q.device).view(1, 1, 1, W)
    nb = ((seq_lens + bs - 1) // bs).view(N, 1, 1, 1)
    forced = (blk < sink_blocks) | (blk >= nb - recent_blocks)
    if selector == "centroid":
        filled = in_seq.view(N, 1, W, bs, 1).to(keys.dtype)
        kb = keys.view(N, Hkv, W, bs, D).float()
        mean = (kb * filled).sum(3) / filled.sum(3).clamp(min=1)  # [N, Hkv, W, D]
        s = torch.matmul(qg.float(), mean.transpose(-1, -2))  # [N, Hkv, G, W]
        s = s.amax(dim=2, keepdim=True) if gqa_reduce == "max" else s.sum(dim=2, keepdim=True)
    elif selector.startswith(("sparq", "keychan")):
        r = int(selector.removeprefix("sparq").removeprefix("keychan"))
        if selector.startswith("sparq"):
            chan = torch.topk(qg.float().abs().sum(2), r, dim=-1).indices  # [N, Hkv, r]: shared by the group
        else:  # by the keys only: channels with the largest mean |k| over the sequence
            weight = (keys.float().abs() * in_seq.view(N, 1, -1, 1)).sum(2)
            chan = torch.topk(weight, r, dim=-1).indices
        q_r = torch.gather(qg.float(), 3, chan.unsqueeze(2).expand(-1, -1, G, -1))  # [N, Hkv, G, r]
        k_r = torch.gather(keys.float(), 3, chan.unsqueeze(2).expand(-1, -1, keys.shape[2], -1))  # [N, Hkv, T, r]
        # scale as the full product would be (the r channels carry this share of |q|, as SparQ does)
        share = (q_r.abs().sum(-1, keepdim=True) / qg.float().abs().sum(-1, keepdim=True).clamp(min=1e-6))
        approx = torch.matmul(q_r, k_r.transpose(-1, -2)) * scale / share.clamp(min=1e-3).sqrt()
        s = block_scores("oracle_mass", approx.masked_fill(~in_seq, float("-inf")), qg, kmin_b, kmax_b, bs,
                         gqa_reduce, scale)
    elif selector.startswith("refine"):
        factor = int(selector[len("refine"):].split("_")[0])
        coarse = block_scores("quest_torch", logits, qg, kmin_b, kmax_b, bs, gqa_reduce, scale)
        coarse = torch.where(forced, torch.full_like(coarse, float("inf")), coarse)
        coarse = torch.where(blk < nb, coarse, torch.full_like(coarse, float("-inf")))
        kc = min(factor * int(budget_blocks.max()), W)
        cand_idx = torch.topk(coarse, kc, dim=-1).indices
        crank = torch.arange(kc, device=q.device).view(1, 1, 1, -1)
        cand = torch.zeros_like(coarse, dtype=torch.bool).scatter_(
            -1, cand_idx, (crank < factor * budget_blocks.view(N, 1, 1, 1)).expand_as(cand_idx))
        if selector.endswith("_mass"):  # softmax over the candidates' (and forced blocks') keys only
            seen = (cand | (forced & (blk < nb))).repeat_interleave(bs, dim=-1)
            exact = block_scores("oracle_mass", logits.masked_fill(~seen, float("-inf")), qg, kmin_b, kmax_b,
                                 bs, gqa_reduce, scale)
        else:
            exact = block_scores("oracle_max", logits, qg, kmin_b, kmax_b, bs, gqa_reduce, scale)
        s = torch.where(cand, exact, torch.full_like(exact, -1e30))
    else:
        s = block_scores(selector, logits, qg, kmin_b, kmax_b, bs, gqa_reduce, scale)
    s = torch.where(forced, torch.full_like(s, float("inf")), s)
    s = torch.where(blk < nb, s, torch.full_like(s, float("-inf")))
    k = int(budget_blocks.max())
    top = torch.topk(s, min(k, W), dim=-1).indices  # [N, Hkv, G', k]
    rank = torch.arange(top.shape[-1], device=q.device).view(1, 1, 1, -1)
    keep = rank < budget_blocks.view(N, 1, 1, 1)
    chosen = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, top, keep.expand_as(top))  # [N, Hkv, G', W]
    return chosen, logits, vals, in_seq
