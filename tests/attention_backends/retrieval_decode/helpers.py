"""A small paged KV cache with random block tables, shared by the retrieval-decode tests."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from attention_backends.retrieval_decode.summaries import BlockSummaries


@dataclass
class PagedCase:
    key_cache: torch.Tensor  # [num_blocks, Hkv, bs, D]
    value_cache: torch.Tensor
    block_table: torch.Tensor  # [N, B] int32 physical ids
    seq_lens: torch.Tensor  # [N]
    summaries: BlockSummaries
    q: torch.Tensor  # [N, Hq, D]


def make_case(seq_lens=(300, 517, 64), hkv=2, group=3, d=16, bs=16, num_blocks=128, seed=0,
              dtype=torch.float32) -> PagedCase:
    g = torch.Generator().manual_seed(seed)
    n = len(seq_lens)
    width = max(-(-s // bs) for s in seq_lens) + 2
    perm = torch.randperm(num_blocks, generator=g)
    table = torch.zeros(n, width, dtype=torch.int32)
    used = 0
    for i, s in enumerate(seq_lens):
        nb = -(-s // bs)
        table[i, :nb] = perm[used:used + nb].int()
        used += nb
    key_cache = torch.zeros(num_blocks, hkv, bs, d, dtype=dtype)
    value_cache = torch.zeros_like(key_cache)
    summ = BlockSummaries.allocate(num_blocks, hkv, d, bs)
    # Write the sequences token by token through slot mappings, in two "chunks" each, like vLLM does.
    for i, s in enumerate(seq_lens):
        pos = torch.arange(s)
        slots = table[i, pos // bs].long() * bs + pos % bs
        k = torch.randn(s, hkv, d, generator=g, dtype=dtype)
        v = torch.randn(s, hkv, d, generator=g, dtype=dtype)
        blk, off = slots // bs, slots % bs
        key_cache[blk, :, off] = k
        value_cache[blk, :, off] = v
        cut = s // 3
        summ.update(k[:cut], slots[:cut])
        summ.update(k[cut:], slots[cut:])
    q = torch.randn(n, hkv * group, d, generator=g, dtype=dtype)
    return PagedCase(key_cache, value_cache, table, torch.tensor(seq_lens), summ, q)
