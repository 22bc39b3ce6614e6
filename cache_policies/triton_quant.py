"""Triton kernels of the per-(token, head) quantizers (quant:int8, quant:fp8): one program per row of
``head_dim`` values, absmax scale in float32. The torch functions in quant_int8.py / quant_fp8.py are the
reference and the CPU path; ``quantize``/``dequantize`` here pick the kernel for CUDA tensors (and for CPU
tensors under TRITON_INTERPRET=1, which is how the tests run them without a GPU).

Rounding matches torch.round (half to even) so int8 codes equal the reference's bit for bit.
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch reference runs instead
    triton = None

INT8_MAX = 127.0


def usable(x: torch.Tensor) -> bool:
    return triton is not None and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


if triton is not None:
    @triton.jit
    def _quant_rows(x_ptr, q_ptr, s_ptr, D: tl.constexpr, BLOCK_D: tl.constexpr, QMAX: tl.constexpr,
                    MIN_SCALE: tl.constexpr, TO_INT: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK_D)
        ok = offs < D
        x = tl.load(x_ptr + row * D + offs, mask=ok, other=0.0).to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(x), axis=0) / QMAX, MIN_SCALE)
        y = x / scale
        if TO_INT:
            r = tl.floor(y + 0.5)
            odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
            r = tl.where(((r - y) == 0.5) & odd, r - 1.0, r)  # ties to even, as torch.round
            y = tl.minimum(tl.maximum(r, -QMAX), QMAX)
        else:
            y = tl.minimum(tl.maximum(y, -QMAX), QMAX)
        tl.store(q_ptr + row * D + offs, y.to(q_ptr.dtype.element_ty), mask=ok)
        tl.store(s_ptr + row, scale)

    @triton.jit
    def _dequant_rows(q_ptr, s_ptr, out_ptr, D: tl.constexpr, BLOCK_D: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK_D)
        ok = offs < D
        q = tl.load(q_ptr + row * D + offs, mask=ok, other=0).to(tl.float32)
        scale = tl.load(s_ptr + row)
        tl.store(out_ptr + row * D + offs, (q * scale).to(out_ptr.dtype.element_ty), mask=ok)


def quantize(x: torch.Tensor, code_dtype: torch.dtype, qmax: float, min_scale: float):
    """x [..., D] -> (codes [..., D] of ``code_dtype``, float32 scale [..., 1])."""
    d = x.shape[-1]
    xc = x.contiguous()
    q = torch.empty(x.shape, dtype=code_dtype, device=x.device)
    s = torch.empty(*x.shape[:-1], 1, dtype=torch.float32, device=x.device)
    rows = xc.numel() // d
    if rows:
        _quant_rows[(rows,)](xc, q, s, D=d, BLOCK_D=triton.next_power_of_2(d), QMAX=qmax, MIN_SCALE=min_scale,
                             TO_INT=not code_dtype.is_floating_point)
    return q, s


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    d = q.shape[-1]
    qc, sc = q.contiguous(), scale.to(torch.float32).contiguous()
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    rows = qc.numel() // d
    if rows:
        _dequant_rows[(rows,)](qc, sc, out, D=d, BLOCK_D=triton.next_power_of_2(d))
    return out
