"""quant:int8 — symmetric int8 with float32 absmax scales: keys per channel (over the block's tokens),
values per (token, head) over head_dim.

Keys carry outlier channels (KIVI's finding): a per-token scale set by one outlier channel leaves the other
channels a few codes each, and on SmolLM2 that flipped answers (per-token keys: 1 of 30 multi-turn answers
lost, agreement with no offload 0.83). Values have no channel structure, so per-token absmax is accurate.
"""
from __future__ import annotations

import torch

from cache_policies import triton_quant
from cache_policies.base import StackedPolicy, check_kv
from kvplug.kv_payload import BlockContext, Payload, stack_field

INT8_MAX = 127.0
KERNELS = "quant:int8"  # triton_quant.run_kernel family: one failure warning, then the torch path


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (int8 [..., D], float32 scale [..., 1]); Triton on CUDA, the torch reference elsewhere."""
    if triton_quant.usable(x):
        return triton_quant.run_kernel(KERNELS, _quantize_kernel, quantize_int8_reference, x)
    return quantize_int8_reference(x)


def quantize_int8_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / INT8_MAX).clamp_min(1e-8)
    q = torch.round(xf / scale).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if triton_quant.usable(q):
        return triton_quant.run_kernel(KERNELS, triton_quant.dequantize, dequantize_reference, q, scale, dtype)
    return dequantize_reference(q, scale, dtype)


def _quantize_kernel(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return triton_quant.quantize(x, torch.int8, INT8_MAX, 1e-8)


def dequantize_reference(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """codes * per-row scale (int8 and fp8 alike)."""
    return (q.float() * scale).to(dtype)


class Int8Policy(StackedPolicy):
    name = "quant:int8"

    def encode_groups(self, k: torch.Tensor, v: torch.Tensor, ctx: BlockContext):
        check_kv(k, v, ctx)
        kq, ks = quantize_int8(k.transpose(-1, -2))  # rows = channels: [n, L, H, D, N], scale [.., D, 1]
        vq, vs = quantize_int8(v)
        return [(list(range(k.shape[0])), {"kq": kq, "ks": ks, "vq": vq, "vs": vs})]

    def decode(self, payloads: list[Payload], like: torch.Tensor):
        return self.decode_stacked({name: stack_field(payloads, name) for name in ("kq", "ks", "vq", "vs")}, like)

    def decode_stacked(self, batch: Payload, like: torch.Tensor):
        k = dequantize_int8(batch["kq"], batch["ks"], like.dtype).transpose(-1, -2)
        v = dequantize_int8(batch["vq"], batch["vs"], like.dtype)
        return k, v, None
