"""drop:streaming — StreamingLLM: keep the first ``sink_tokens`` (attention sinks) and the last
``window_tokens`` of the prefix; everything between is dropped (and masked on reload)."""
from __future__ import annotations

import torch

from cache_policies.base import check_kv
from cache_policies.config import StreamingParams
from cache_policies.masking import TokenDropPolicy, pack_kept, unpack_kept
from kvplug.kv_payload import BlockContext, Payload


class StreamingPolicy(TokenDropPolicy):
    name = "drop:streaming"
    params_key = "streaming"
    params_type = StreamingParams

    def __init__(self, sink_tokens: int = 4, window_tokens: int = 1024) -> None:
        self.sink_tokens = sink_tokens
        self.window_tokens = window_tokens

    def size_class(self, block_start: int, block_tokens: int, prefix_len: int) -> object:
        pos = range(block_start, block_start + block_tokens)
        return sum(1 for p in pos if p < self.sink_tokens or p >= prefix_len - self.window_tokens)

    def keep_mask(self, ctx: BlockContext, shape: torch.Size, device=None) -> torch.Tensor:
        n, n_layers, heads, n_tok, _ = shape
        pos = torch.tensor(ctx.block_start, device=device)[:, None] + torch.arange(n_tok, device=device)
        keep = (pos < self.sink_tokens) | (pos >= ctx.prefix_len - self.window_tokens)
        return keep[:, None, None, :].expand(n, n_layers, heads, n_tok)

    def encode(self, k: torch.Tensor, v: torch.Tensor, ctx: BlockContext) -> list[Payload]:
        check_kv(k, v, ctx)
        keep = self.keep_mask(ctx, k.shape, k.device)
        return [pack_kept(k[i], v[i], keep[i]) for i in range(k.shape[0])]

    def decode(self, payloads: list[Payload], like: torch.Tensor):
        return unpack_kept(payloads, like)
