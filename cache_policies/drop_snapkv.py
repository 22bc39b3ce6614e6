"""drop:snapkv — keep, per layer and kv-head, the tokens an observation window attends to most.

SnapKV scores every prefix token by the attention the last ``window_tokens`` queries give it (softmax
over the keys, summed over the window and over the query heads of a GQA group), smooths the scores with
a 1-D pooling of width ``pool_kernel`` so neighbours of a hit survive too, and keeps the top
``keep_ratio`` of each block's tokens per head; the window itself is always kept.

In the KV connector the queries are not available (vLLM hands connectors K/V only), so it passes the
window's *keys* as query proxies: after RoPE a token's key and query share position and content
features, and the selection it gives is close to SnapKV's on our models (see tests). The softmax
normaliser is taken over the blocks encoded together (the whole prompt when the connector saves at the
end of prefill).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cache_policies.base import check_kv
from cache_policies.config import SnapKVParams
from cache_policies.masking import TokenDropPolicy, pack_kept, unpack_kept
from kvplug.kv_payload import BlockContext, Payload


class SnapKVPolicy(TokenDropPolicy):
    name = "drop:snapkv"
    params_key = "snapkv"
    params_type = SnapKVParams

    def __init__(self, keep_ratio: float = 0.5, window_tokens: int = 32, pool_kernel: int = 5) -> None:
        self.keep_ratio = keep_ratio
        self.window_tokens = window_tokens
        self.pool_kernel = pool_kernel

    def size_class(self, block_start: int, block_tokens: int, prefix_len: int) -> object:
        # Upper bound: the per-head budget plus the block's tokens inside the observation window.
        in_window = max(0, block_start + block_tokens - max(block_start, prefix_len - self.window_tokens))
        return min(block_tokens, math.ceil(self.keep_ratio * block_tokens) + in_window)

    def observation_window_tokens(self, prompt_len: int) -> int:
        return min(self.window_tokens, prompt_len)

    def scores(self, k: torch.Tensor, obs_q: torch.Tensor) -> torch.Tensor:
        """k [n, L, H, N, D], obs_q [L, Hq, W, D] -> attention mass per token [n, L, H, N]."""
        n, n_layers, heads, n_tok, d = k.shape
        hq = obs_q.shape[1]
        if hq % heads:
            raise ValueError(f"{hq} query heads do not group onto {heads} kv heads")
        q = obs_q.float().reshape(n_layers, heads, hq // heads, -1, d)  # [L, H, G, W, D]
        keys = k.float().permute(1, 2, 0, 3, 4).reshape(n_layers, heads, n * n_tok, d)  # [L, H, T, D]
        logits = torch.einsum("lhgwd,lhtd->lhgwt", q, keys) / math.sqrt(d)
        mass = logits.softmax(dim=-1).sum(dim=(2, 3))  # [L, H, T]
        if self.pool_kernel > 1:
            mass = F.avg_pool1d(mass.reshape(-1, 1, n * n_tok), self.pool_kernel, stride=1,
                                padding=self.pool_kernel // 2, count_include_pad=False).reshape(mass.shape)
        return mass.reshape(n_layers, heads, n, n_tok).permute(2, 0, 1, 3)

    def keep_mask(self, k: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        n, n_layers, heads, n_tok, _ = k.shape
        obs = ctx.obs_queries
        if obs is None:
            raise ValueError("drop:snapkv needs observation-window queries (BlockContext.obs_queries)")
        score = self.scores(k, obs)
        budget = max(1, math.ceil(self.keep_ratio * n_tok))
        top = score.topk(min(budget, n_tok), dim=-1).indices
        keep = torch.zeros_like(score, dtype=torch.bool).scatter_(-1, top, True)
        pos = torch.tensor(ctx.block_start, device=k.device)[:, None] + torch.arange(n_tok, device=k.device)
        in_window = pos >= ctx.prefix_len - self.window_tokens
        return keep | in_window[:, None, None, :]

    def encode(self, k: torch.Tensor, v: torch.Tensor, ctx: BlockContext) -> list[Payload]:
        check_kv(k, v, ctx)
        keep = self.keep_mask(k, ctx)
        return [pack_kept(k[i], v[i], keep[i]) for i in range(k.shape[0])]

    def decode(self, payloads: list[Payload], like: torch.Tensor):
        return unpack_kept(payloads, like)
