"""Triton quantizers (quant:int8 codes and scales, quant:int4 KIVI packed codes and fp16 (min, scale),
dequantization) vs the torch reference, under TRITON_INTERPRET=1 on the CPU; on a GPU box the same tests run
the compiled kernels (and fp8)."""
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

from cache_policies import quant_fp8, quant_int4, quant_int8, triton_quant  # noqa: E402
from kvplug.kv_payload import BlockContext  # noqa: E402

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
    assert not triton_quant.kernel_failed(quant_int8.KERNELS)  # the kernels ran, not the torch fallback


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton interpreter has no fp8 type")
def test_fp8_kernel_matches_reference_on_gpu():
    x = _kv((4, 2, 16, 128))
    q, s = quant_fp8.quantize_fp8(x)
    q_ref, s_ref = quant_fp8.quantize_fp8_reference(x)
    torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(q.float(), q_ref.float(), rtol=0, atol=0)  # quantize: torch ops on CUDA too
    torch.testing.assert_close(quant_fp8.dequantize_fp8(q, s, torch.float32), q.float() * s)  # the kernel
    assert not triton_quant.kernel_failed(quant_fp8.KERNELS)  # the kernels ran, not the torch fallback


@pytest.mark.parametrize("module", [quant_int8, quant_fp8], ids=lambda m: m.KERNELS)
def test_row_quant_kernel_failure_falls_back_to_torch_with_one_warning(module, monkeypatch, caplog):
    # quant:fp8's dequantize kernel once failed to compile on sm_90 (an int fill cast to fp8) and killed the
    # engine: a kernel failure must cost one warning, never a request.
    def broken(*args):
        raise RuntimeError("cannot cast int32 to fp8e4nv")

    monkeypatch.setattr(triton_quant, "_FAILED", set())
    monkeypatch.setattr(triton_quant, "dequantize", broken)
    monkeypatch.setattr(triton_quant, "quantize", broken)
    if module is quant_fp8:
        monkeypatch.setattr(quant_fp8, "_use_kernel", lambda x: True)  # the CPU interpreter has no fp8 type
        quantize, reference, dequantize = (quant_fp8.quantize_fp8, quant_fp8.quantize_fp8_reference,
                                           quant_fp8.dequantize_fp8)
    else:
        quantize, reference, dequantize = (quant_int8.quantize_int8, quant_int8.quantize_int8_reference,
                                           quant_int8.dequantize_int8)
    x = _kv((2, 3, 16, 64))
    with caplog.at_level("WARNING", logger="vllm.kvplug.cache_policies"):
        q, s = quantize(x)
        out = dequantize(q, s, torch.bfloat16)
        dequantize(q, s, torch.bfloat16)
    q_ref, s_ref = reference(x)
    assert torch.equal(q.float(), q_ref.float()) and torch.equal(s, s_ref)
    torch.testing.assert_close(out, quant_int8.dequantize_reference(q_ref, s_ref, torch.bfloat16))
    warnings = [r for r in caplog.records if f"{module.KERNELS} Triton kernel failed" in r.getMessage()]
    assert len(warnings) == 1 and "fp8e4nv" in warnings[0].getMessage()
    assert triton_quant.kernel_failed(module.KERNELS)


def test_policy_round_trip_uses_the_kernels():
    from kvplug.kv_payload import BlockContext
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


# --- quant:int4 (KIVI) ---
# (blocks, layers, heads, block tokens, head_dim, group): full groups; a block shorter than the group (keys
# fall back to one group of 16 tokens); non-power-of-two groups (48 tokens, 48 channels: padded tiles);
# 3 value groups of 32 (padded to 4); 7 tokens; two key groups per block (group 16).
INT4_SHAPES = [(2, 2, 2, 32, 64, 32), (3, 1, 2, 16, 128, 32), (1, 2, 1, 48, 48, 32), (2, 1, 2, 32, 96, 32),
               (3, 1, 1, 7, 64, 32), (2, 1, 2, 32, 64, 16)]


def _int4_kv(shape, seed):
    x = _kv(shape, seed=seed)
    x[0, 0, 0, 2, :] = -0.75  # a constant value token and key channel: scale falls back to the floor
    x[0, 0, 0, :, 5] = 1.5
    # Exact ties (min 0, max 15: scale 1, codes of 0.5, 1.5, ...): rounded half to even, as torch.round.
    ties = torch.tensor([0.0, 15.0] + [i + 0.5 for i in range(14)])
    x[0, 0, 0, 3, :] = 7.0
    x[0, 0, 0, 3, :min(16, shape[-1])] = ties[:shape[-1]]
    x[0, 0, 0, :, 6] = 7.0
    x[0, 0, 0, :min(16, shape[-2]), 6] = ties[:shape[-2]]
    return x


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", INT4_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_int4_kernels_equal_reference(shape, dtype):
    *kv_shape, group = shape
    x = _int4_kv(tuple(kv_shape), seed=3).to(dtype)
    n, d = x.shape[-2:]
    gk, gv = quant_int4._group(n, group), quant_int4._group(d, group)
    # Quantize: packed bytes and fp16 (min, scale) bit for bit (IEEE division, ties to even, like torch).
    keys, keys_ref = triton_quant.int4_quantize_keys(x, gk), quant_int4.quantize_keys_reference(x, gk)
    vals, vals_ref = triton_quant.int4_quantize_values(x, gv), quant_int4.quantize_values_reference(x, gv)
    for got, ref in ((keys, keys_ref), (vals, vals_ref)):
        assert got.keys() == ref.keys()
        for name in ref:
            assert got[name].dtype == ref[name].dtype and got[name].shape == ref[name].shape, name
            assert torch.equal(got[name], ref[name]), f"{name}: {(got[name] != ref[name]).sum()} differ"
    # Dequantize: float32 equal up to an FMA's rounding; output dtype rounded like torch (the interpreter
    # rounds float32 -> bf16 toward zero: one bf16 ulp).
    k_out = triton_quant.int4_dequantize_keys(keys["kq"], keys["kmin"], keys["kscale"], dtype)
    v_out = triton_quant.int4_dequantize_values(vals["vq"], vals["vmin"], vals["vscale"], dtype)
    torch.testing.assert_close(k_out, quant_int4.dequantize_keys_reference(*keys_ref.values(), dtype))
    torch.testing.assert_close(v_out, quant_int4.dequantize_values_reference(*vals_ref.values(), dtype))
    # And the round trip is within half a step of the input (plus the output dtype's rounding).
    for out, scale in ((k_out, keys["kscale"].float().repeat_interleave(gk, dim=-3).reshape(x.shape)),
                       (v_out, vals["vscale"].float().repeat_interleave(gv, dim=-2).reshape(x.shape))):
        err = (out.float() - x.float()).abs()
        assert bool((err <= scale * 0.5 + x.float().abs() * 2 ** -7 + 1e-6).all())


def _count_calls(monkeypatch, names):
    calls = dict.fromkeys(names, 0)

    def wrap(name, fn):
        def counted(*args):
            calls[name] += 1
            return fn(*args)
        return counted

    for name in names:
        monkeypatch.setattr(triton_quant, name, wrap(name, getattr(triton_quant, name)))
    return calls


@pytest.mark.parametrize("prefix_len", [80, 75])  # residual tail on a block boundary / inside a block
def test_int4_policy_payloads_interchange_between_kernel_and_torch(monkeypatch, prefix_len):
    """Entries written by the Triton path load with the torch path and back: same payload bytes."""
    k, v = _int4_kv((5, 2, 2, 16, 64), seed=4), _int4_kv((5, 2, 2, 16, 64), seed=5)
    ctx = BlockContext(tuple(i * 16 for i in range(5)), prefix_len)
    policy = quant_int4.Int4KiviPolicy(group_size=32, residual_tokens=32)
    calls = _count_calls(monkeypatch, ["int4_quantize_keys", "int4_quantize_values", "int4_dequantize_keys",
                                       "int4_dequantize_values"])
    kernel_payloads = policy.encode(k, v, ctx)
    k_kernel, v_kernel, _ = policy.decode(kernel_payloads, k)
    assert all(calls.values()) and not triton_quant.kernel_failed(quant_int4.KERNELS), calls
    n_exact = sum(start + 16 > prefix_len - 32 for start in ctx.block_start)
    assert [("k" in p) for p in kernel_payloads] == [False] * (5 - n_exact) + [True] * n_exact
    assert torch.equal(k_kernel[-n_exact:], k[-n_exact:]) and torch.equal(v_kernel[-n_exact:], v[-n_exact:])

    monkeypatch.setattr(quant_int4, "_use_kernel", lambda x: False)  # the torch path (as on CPU)
    torch_payloads = policy.encode(k, v, ctx)
    for got, ref in zip(kernel_payloads, torch_payloads):
        assert got.keys() == ref.keys() and all(torch.equal(got[key], ref[key]) for key in ref)
    k_torch, v_torch, _ = policy.decode(kernel_payloads, k)  # written by the kernel, read by torch
    torch.testing.assert_close(k_kernel, k_torch)
    torch.testing.assert_close(v_kernel, v_torch)
    assert not torch.equal(k_torch[0], k[0])  # the old blocks really were quantized


def test_int4_kernel_failure_falls_back_to_torch_with_one_warning(monkeypatch, caplog):
    def broken(*args):
        raise RuntimeError("PassManager::run failed (layout verification failed)")

    monkeypatch.setattr(triton_quant, "_FAILED", set())
    monkeypatch.setattr(triton_quant, "int4_quantize_keys", broken)
    x = _int4_kv((2, 1, 2, 32, 64), seed=6)
    with caplog.at_level("WARNING", logger="vllm.kvplug.cache_policies"):
        first = quant_int4.quantize_keys_per_channel(x, 32)
        second = quant_int4.quantize_keys_per_channel(x, 32)
        quant_int4.quantize_values_per_token(x, 32)  # the family stays on torch
    ref = quant_int4.quantize_keys_reference(x, 32)
    assert all(torch.equal(first[key], ref[key]) and torch.equal(second[key], ref[key]) for key in ref)
    warnings = [r for r in caplog.records if "quant:int4 Triton kernel failed" in r.getMessage()]
    assert len(warnings) == 1 and "layout verification failed" in warnings[0].getMessage()
    assert triton_quant.kernel_failed(quant_int4.KERNELS)
