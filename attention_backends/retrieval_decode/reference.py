"""Torch reference: decode attention over the selected blocks of a paged KV cache (and the dense oracle).

``key_cache``/``value_cache`` are [num_blocks, kv_heads, block_size, head_dim] views (any strides; see
``vllm_compat.paged_kv_views``). Used as the oracle for the Triton kernel and the CPU kernel path.
"""
from __future__ import annotations

import torch

from attention_backends.retrieval_decode.selection import Selection


def selected_block_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                             block_table: torch.Tensor, seq_lens: torch.Tensor, sel: Selection,
                             scale: float) -> torch.Tensor:
    """q [N, Hq, D] (one decode token per sequence) -> out [N, Hq, D] attending only the selected blocks."""
    N, Hq, D = q.shape
    _, Hkv, bs, _ = key_cache.shape
    G = Hq // Hkv
    k = sel.blocks.shape[-1]
    phys = torch.gather(block_table.long().unsqueeze(1).expand(N, Hkv, -1), 2, sel.blocks)  # [N, Hkv, k]
    heads = torch.arange(Hkv, device=q.device).view(1, Hkv, 1).expand_as(phys)
    keys = key_cache[phys, heads]  # [N, Hkv, k, bs, D]
    vals = value_cache[phys, heads]
    pos = sel.blocks.unsqueeze(-1) * bs + torch.arange(bs, device=q.device)  # [N, Hkv, k, bs]
    mask = sel.valid.unsqueeze(-1) & (pos < seq_lens.view(N, 1, 1, 1))
    keys = keys.reshape(N, Hkv, k * bs, D).float()
    vals = vals.reshape(N, Hkv, k * bs, D).float()
    mask = mask.reshape(N, Hkv, 1, k * bs)
    qg = q.view(N, Hkv, G, D).float()
    logits = torch.matmul(qg, keys.transpose(-1, -2)) * scale  # [N, Hkv, G, k*bs]
    logits = logits.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.matmul(probs, vals).reshape(N, Hq, D).to(q.dtype)


def dense_decode_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                           block_table: torch.Tensor, seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """The dense oracle: every block of every sequence."""
    N = q.shape[0]
    B = block_table.shape[1]
    Hkv = key_cache.shape[1]
    bs = key_cache.shape[2]
    blocks = torch.arange(B, device=q.device).view(1, 1, B).expand(N, Hkv, B)
    valid = blocks < ((seq_lens + bs - 1) // bs).view(N, 1, 1)
    return selected_block_attention(q, key_cache, value_cache, block_table, seq_lens,
                                    Selection(blocks.clone(), valid), scale)


def split_decode_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                           block_table: torch.Tensor, seq_lens: torch.Tensor, sel: Selection,
                           retrieval: torch.Tensor, scale: float) -> torch.Tensor:
    """A pure-decode graph step with the dense path (planner.DecodeGraphPlan with dense_metadata): rows
    ``retrieval`` [N] bool attend their selected blocks, every other row all of its blocks. (A row of length 0
    comes out NaN on the dense side; ``where`` picks per row, so it never reaches another row.)"""
    sparse = selected_block_attention(q, key_cache, value_cache, block_table, seq_lens, sel, scale)
    dense = dense_decode_attention(q, key_cache, value_cache, block_table, seq_lens, scale)
    return torch.where(retrieval.view(-1, 1, 1), sparse, dense)
