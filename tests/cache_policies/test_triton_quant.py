"""Triton quantizers (quant:int8 codes and scales, dequantization) vs the torch reference, under
TRITON_INTERPRET=1 on the CPU; on a GPU box the same tests run the compiled kernels (and fp8)."""
from __future__ import annotations

import os
import sys

import pytest
import torch

# The interpreter only works if triton is first imported with TRITON_INTERPRET=1; when something earlier in the
# session imported it, test_triton_quant_fresh.py runs this file in a fresh interpreter instead.
_FRESH_TRITON = "triton" not in sys.modules
if _FRESH_TRITON:
    os.environ.setdefault("TRITON_INTERPRET", "1")
IN_PROCESS = torch.cuda.is_available() or (_FRESH_TRITON and os.environ.get("TRITON_INTERPRET") == "1")
if not IN_PROCESS:
    pytest.skip("triton was imported before TRITON_INTERPRET=1; test_triton_quant_fresh.py runs this file",
                allow_module_level=True)
pytest.importorskip("triton", reason="triton is not installed")

from cache_policies import quant_fp8, quant_int8, triton_quant  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _kv(shape, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.linspace(0.1, 8.0, shape[-1])  # per-channel spread
    x[..., 3] = 0.0
    x[0, 0] = 0.0  # an all-zero row: scale falls back to the floor
    return x.to(dtype).to(DEVICE)


@pytest.mark.parametrize("shape", [(2, 3, 16, 64), (5, 1, 7, 48)])
def test_int8_kernel_equals_reference(shape):
    x = _kv(shape)
    assert triton_quant.usable(x)
    q, s = quant_int8.quantize_int8(x)
    q_ref, s_ref = quant_int8.quantize_int8_reference(x)
    assert q.dtype == torch.int8 and s.shape == s_ref.shape
    torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=0)
    # Codes equal the reference; on a GPU a non-IEEE division may move an exact tie by one code.
    diff = (q.int() - q_ref.int()).abs()
    assert int(diff.max()) <= (1 if x.is_cuda else 0)
    out = quant_int8.dequantize_int8(q, s, torch.bfloat16)
    torch.testing.assert_close(out, quant_int8.dequantize_reference(q, s, torch.bfloat16))
    err = (out.float() - x.float()).abs()
    assert bool((err <= s * 0.5 + x.float().abs() * 2 ** -7).all())  # half a step + bf16 rounding


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton interpreter has no fp8 type")
def test_fp8_kernel_matches_reference_on_gpu():
    x = _kv((4, 2, 16, 128))
    q, s = quant_fp8.quantize_fp8(x)
    q_ref, s_ref = quant_fp8.quantize_fp8_reference(x)
    torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(q.float(), q_ref.float(), rtol=0.07, atol=0)  # e4m3: one ulp at most
    torch.testing.assert_close(quant_fp8.dequantize_fp8(q, s, torch.float32), q.float() * s)


def test_policy_round_trip_uses_the_kernels():
    from cache_policies.base import BlockContext
    from cache_policies.quant_int8 import Int8Policy

    k, v = _kv((3, 2, 2, 32, 64), seed=1), _kv((3, 2, 2, 32, 64), seed=2)
    pol = Int8Policy()
    payloads = pol.encode(k, v, BlockContext.contiguous(3, 32))
    k2, v2, keep = pol.decode(payloads, k)
    # Keys are quantized per channel: rows of the transposed block.
    kt = k.transpose(-1, -2)
    ref = quant_int8.dequantize_reference(*quant_int8.quantize_int8_reference(kt), k.dtype).transpose(-1, -2)
    assert keep is None and k2.dtype == k.dtype
    # bf16 tolerance: the interpreter rounds float32 -> bf16 differently from torch (one bf16 ulp).
    torch.testing.assert_close(k2, ref)
