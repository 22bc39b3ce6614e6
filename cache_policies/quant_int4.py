"""quant:int4 — KIVI: keys quantized per channel, values per token, groups of 32, recent tokens kept exact.

Keys have outlier *channels*, so each channel gets its own (min, scale) over a group of tokens; values
have no channel structure, so each token gets its own (min, scale) over a group of channels. The blocks
holding the last ``residual_tokens`` of the prefix stay in full precision (the most-attended tokens and,
in multi-turn use, the ones the next question follows). Two 4-bit codes are packed per byte.

The ``*_reference`` functions are the torch implementation (the CPU path and the tests' reference); on CUDA
the same payload is made and read by the Triton kernels in triton_quant.py (bit-equal codes and scales, so
an entry written by either path loads with the other), falling back to torch if a kernel fails to compile.
"""
from __future__ import annotations

import torch

from cache_policies import triton_quant
from cache_policies.base import CachePolicy, check_kv
from cache_policies.config import Int4Params
from kvplug.kv_payload import BlockContext, Payload, stack_field

LEVELS = 15.0
SCALE_DTYPE = torch.float16
KERNELS = "quant:int4"  # triton_quant.run_kernel family: one failure warning, then the torch path


def _pack(q: torch.Tensor) -> torch.Tensor:
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def _unpack(p: torch.Tensor) -> torch.Tensor:
    out = torch.empty(*p.shape[:-1], p.shape[-1] * 2, dtype=torch.uint8, device=p.device)
    out[..., 0::2] = p & 0xF
    out[..., 1::2] = p >> 4
    return out


def _asym_quant(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lo = x.amin(dim=dim, keepdim=True)
    scale = ((x.amax(dim=dim, keepdim=True) - lo) / LEVELS).clamp_min(1e-6)
    # Round the stored (fp16) min/scale first, so dequantization uses exactly what was quantized against.
    lo, scale = lo.to(SCALE_DTYPE).float(), scale.to(SCALE_DTYPE).float()
    q = torch.round((x - lo) / scale).clamp_(0, LEVELS)
    return q, lo, scale


def _group(size: int, group: int) -> int:
    return group if size % group == 0 else size


def _use_kernel(x: torch.Tensor) -> bool:
    return triton_quant.usable(x) and x.dim() >= 2


def quantize_keys_per_channel(k: torch.Tensor, group: int) -> Payload:
    """k [..., N, D] -> 4-bit codes; (min, scale) per channel per group of tokens. Triton on CUDA."""
    g = _group(k.shape[-2], group)
    if _use_kernel(k) and triton_quant.int4_keys_supported(k.shape[-2], k.shape[-1], g):
        return triton_quant.run_kernel(KERNELS, triton_quant.int4_quantize_keys, quantize_keys_reference, k, g)
    return quantize_keys_reference(k, g)


def quantize_keys_reference(k: torch.Tensor, group: int) -> Payload:
    *lead, n, d = k.shape
    g = _group(n, group)
    x = k.float().reshape(*lead, n // g, g, d)
    q, lo, scale = _asym_quant(x, dim=-2)
    return {"kq": _pack(q.reshape(*lead, n, d)), "kmin": lo.to(SCALE_DTYPE), "kscale": scale.to(SCALE_DTYPE)}


def dequantize_keys_per_channel(p: Payload, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    args = (p["kq"], p["kmin"], p["kscale"], dtype)
    if _use_kernel(p["kq"]) and triton_quant.int4_keys_supported(p["kq"].shape[-2], p["kq"].shape[-1] * 2,
                                                                 p["kq"].shape[-2] // p["kmin"].shape[-3]):
        return triton_quant.run_kernel(KERNELS, triton_quant.int4_dequantize_keys, dequantize_keys_reference, *args)
    return dequantize_keys_reference(*args)


def dequantize_keys_reference(kq: torch.Tensor, kmin: torch.Tensor, kscale: torch.Tensor,
                              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    codes = _unpack(kq).float()
    *lead, n, d = codes.shape
    groups = kmin.shape[-3]
    x = codes.reshape(*lead, groups, n // groups, d) * kscale.float() + kmin.float()
    return x.reshape(*lead, n, d).to(dtype)


def quantize_values_per_token(v: torch.Tensor, group: int) -> Payload:
    """v [..., N, D] -> 4-bit codes; (min, scale) per token per group of channels. Triton on CUDA."""
    g = _group(v.shape[-1], group)
    if _use_kernel(v) and triton_quant.int4_values_supported(v.shape[-1], g):
        return triton_quant.run_kernel(KERNELS, triton_quant.int4_quantize_values, quantize_values_reference, v, g)
    return quantize_values_reference(v, g)


def quantize_values_reference(v: torch.Tensor, group: int) -> Payload:
    *lead, n, d = v.shape
    g = _group(d, group)
    x = v.float().reshape(*lead, n, d // g, g)
    q, lo, scale = _asym_quant(x, dim=-1)
    return {"vq": _pack(q.reshape(*lead, n, d)), "vmin": lo.to(SCALE_DTYPE), "vscale": scale.to(SCALE_DTYPE)}


def dequantize_values_per_token(p: Payload, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    args = (p["vq"], p["vmin"], p["vscale"], dtype)
    d = p["vq"].shape[-1] * 2
    if _use_kernel(p["vq"]) and triton_quant.int4_values_supported(d, d // p["vmin"].shape[-2]):
        return triton_quant.run_kernel(KERNELS, triton_quant.int4_dequantize_values, dequantize_values_reference,
                                       *args)
    return dequantize_values_reference(*args)


def dequantize_values_reference(vq: torch.Tensor, vmin: torch.Tensor, vscale: torch.Tensor,
                                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    codes = _unpack(vq).float()
    *lead, n, d = codes.shape
    groups = vmin.shape[-2]
    x = codes.reshape(*lead, n, groups, d // groups) * vscale.float() + vmin.float()
    return x.reshape(*lead, n, d).to(dtype)


class Int4KiviPolicy(CachePolicy):
    name = "quant:int4"
    params_key = "int4"
    params_type = Int4Params

    def __init__(self, group_size: int = 32, residual_tokens: int = 32) -> None:
        self.group_size = group_size
        self.residual_tokens = residual_tokens

    def size_class(self, block_start: int, block_tokens: int, prefix_len: int) -> object:
        return block_start + block_tokens > prefix_len - self.residual_tokens  # kept exact?

    def encode(self, k: torch.Tensor, v: torch.Tensor, ctx: BlockContext) -> list[Payload]:
        out: list[Payload] = [{} for _ in range(k.shape[0])]
        for idx, batch in self.encode_groups(k, v, ctx):
            for j, i in enumerate(idx):
                out[i] = {key: t[j] for key, t in batch.items()}
        return out

    def encode_groups(self, k: torch.Tensor, v: torch.Tensor, ctx: BlockContext):
        check_kv(k, v, ctx)
        if k.shape[-1] % 2:
            raise ValueError(f"int4 packing needs an even head_dim, got {k.shape[-1]}")
        n_tok = k.shape[-2]
        exact_from = ctx.prefix_len - self.residual_tokens
        exact = [start + n_tok > exact_from for start in ctx.block_start]
        quant_idx = [i for i, e in enumerate(exact) if not e]
        exact_idx = [i for i, e in enumerate(exact) if e]
        groups = []
        if quant_idx:
            sel = torch.tensor(quant_idx, device=k.device) if exact_idx else slice(None)
            kq, vq = k[sel], v[sel]
            groups.append((quant_idx, {**quantize_keys_per_channel(kq, self.group_size),
                                       **quantize_values_per_token(vq, self.group_size)}))
        if exact_idx:
            sel = torch.tensor(exact_idx, device=k.device)
            groups.append((exact_idx, {"k": k[sel], "v": v[sel]}))
        return groups

    def decode(self, payloads: list[Payload], like: torch.Tensor):
        k = torch.empty(like.shape, dtype=like.dtype, device=like.device)
        v = torch.empty_like(k)
        exact = [i for i, p in enumerate(payloads) if "k" in p]
        quant = [i for i, p in enumerate(payloads) if "kq" in p]
        if exact:
            k[exact] = stack_field([payloads[i] for i in exact], "k").to(like.dtype)
            v[exact] = stack_field([payloads[i] for i in exact], "v").to(like.dtype)
        if quant:
            sub = [payloads[i] for i in quant]
            batch = {key: stack_field(sub, key) for key in sub[0]}
            k[quant] = dequantize_keys_per_channel(batch, like.dtype)
            v[quant] = dequantize_values_per_token(batch, like.dtype)
        return k, v, None

    def decode_stacked(self, batch: Payload, like: torch.Tensor):
        if "k" in batch:  # the exact (recent-token) blocks
            return batch["k"].to(like.dtype), batch["v"].to(like.dtype), None
        return (dequantize_keys_per_channel(batch).to(like.dtype), dequantize_values_per_token(batch).to(like.dtype),
                None)
