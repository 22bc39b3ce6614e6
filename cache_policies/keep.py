"""keep: full precision, byte-identical round trip (the reference every other policy is judged against)."""
from __future__ import annotations

import torch

from cache_policies.base import CachePolicy, check_kv
from kvplug.kv_payload import BlockContext, Payload, stack_field


class KeepPolicy(CachePolicy):
    name = "keep"
    lossless = True

    def encode(self, k: torch.Tensor, v: torch.Tensor, ctx: BlockContext) -> list[Payload]:
        check_kv(k, v, ctx)
        return [{"k": k[i], "v": v[i]} for i in range(k.shape[0])]

    def encode_groups(self, k: torch.Tensor, v: torch.Tensor, ctx: BlockContext):
        check_kv(k, v, ctx)
        return [(list(range(k.shape[0])), {"k": k, "v": v})]

    def decode(self, payloads: list[Payload], like: torch.Tensor):
        return self.decode_stacked({"k": stack_field(payloads, "k"), "v": stack_field(payloads, "v")}, like)

    def decode_stacked(self, batch: Payload, like: torch.Tensor):
        return batch["k"].to(like.dtype), batch["v"].to(like.dtype), None
