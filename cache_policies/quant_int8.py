"""quant:int8 — symmetric int8 per (token, head) with a float32 absmax scale over head_dim.

Per-token scales follow the outliers of each token (KV outliers are mostly per channel in keys, but int8
has enough range that per-token absmax stays accurate; int4 is where KIVI's per-channel keys matter).
"""
from __future__ import annotations

import torch

from cache_policies import triton_quant
from cache_policies.base import BlockContext, CachePolicy, Payload, check_kv, stack_field

INT8_MAX = 127.0


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (int8 [..., D], float32 scale [..., 1]); Triton on CUDA, the torch reference elsewhere."""
    if triton_quant.usable(x):
        return triton_quant.quantize(x, torch.int8, INT8_MAX, 1e-8)
    return quantize_int8_reference(x)


def quantize_int8_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / INT8_MAX).clamp_min(1e-8)
    q = torch.round(xf / scale).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if triton_quant.usable(q):
        return triton_quant.dequantize(q, scale, dtype)
    return dequantize_reference(q, scale, dtype)


def dequantize_reference(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """codes * per-row scale (int8 and fp8 alike)."""
    return (q.float() * scale).to(dtype)


class Int8Policy(CachePolicy):
    name = "quant:int8"

    def encode(self, k: torch.Tensor, v: torch.Tensor, ctx: BlockContext) -> list[Payload]:
        check_kv(k, v, ctx)
        kq, ks = quantize_int8(k)
        vq, vs = quantize_int8(v)
        return [{"kq": kq[i], "ks": ks[i], "vq": vq[i], "vs": vs[i]} for i in range(k.shape[0])]

    def decode(self, payloads: list[Payload], like: torch.Tensor):
        k = dequantize_int8(stack_field(payloads, "kq"), stack_field(payloads, "ks"), like.dtype)
        v = dequantize_int8(stack_field(payloads, "vq"), stack_field(payloads, "vs"), like.dtype)
        return k, v, None
