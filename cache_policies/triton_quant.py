"""Triton kernels of the quantizers. quant:int8 (both ways) and quant:fp8 (dequantize only, see quant_fp8.py):
per-(token, head) absmax, one program per row of ``head_dim`` values, scale in float32. quant:int4 (KIVI): packed
4-bit codes with fp16 (min, scale) per group (keys per channel, values per token), see the int4 section. The torch
functions in quant_int8.py / quant_fp8.py / quant_int4.py are the reference and the CPU path; the callers pick
these kernels for CUDA tensors (and for CPU tensors under TRITON_INTERPRET=1, which is how the tests run them
without a GPU). This module imports only torch and triton (GPU checks load it without the rest of kvplug).

Rounding matches torch.round (half to even) so int8 codes equal the reference's bit for bit.
"""
from __future__ import annotations

import logging
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
        # No ``other``: Triton cannot cast an int fill to fp8 codes, and masked lanes are never stored.
        q = tl.load(q_ptr + row * D + offs, mask=ok).to(tl.float32)
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


# --- quant:int4 (KIVI) -------------------------------------------------------------------------------------
# Same payload as the torch reference in quant_int4.py (so an entry written by either path loads with the
# other): codes of channels (2i, 2i+1) packed in byte i (low nibble even), fp16 (min, scale) per group.
# Kernels load a group's even and odd channels as two strided tiles, so packing needs no shuffles; each program
# handles whole groups, so there are no loops (Triton 3.6 on sm_90 rejected masked loads in loops elsewhere).
# Division is IEEE (div_rn) and rounding half to even, so codes and scales equal torch's bit for bit.
# Levels 15 and the 1e-6 scale floor are quant_int4.LEVELS / its clamp_min, written out in the kernels.
INT4_MAX_TILE = 1 << 14  # elements per program; larger groups use the reference (no register spill storms)

logger = logging.getLogger("vllm.kvplug.cache_policies")
_FAILED: set[str] = set()


def run_kernel(family: str, kernel, reference, *args):
    """``kernel(*args)``, or ``reference(*args)`` once a kernel of ``family`` failed to compile or launch: a
    kernel failure must never fail a request. Logged once; the family then stays on the reference."""
    if family not in _FAILED:
        try:
            return kernel(*args)
        except Exception as exc:  # noqa: BLE001 - compile errors come as several exception types
            _FAILED.add(family)
            logger.warning("%s Triton kernel failed (%s: %s); using the torch implementation from now on",
                           family, type(exc).__name__, str(exc)[:500])
    return reference(*args)


def kernel_failed(family: str) -> bool:
    return family in _FAILED


def _p2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def int4_keys_supported(n_tokens: int, head_dim: int, group: int) -> bool:
    return head_dim % 2 == 0 and n_tokens % group == 0 and _p2(group) * _p2(head_dim // 2) * 2 <= INT4_MAX_TILE


def int4_values_supported(head_dim: int, group: int) -> bool:
    # A byte must not straddle two channel groups: even groups only.
    return group % 2 == 0 and head_dim % group == 0 and _p2(group // 2) * 2 <= INT4_MAX_TILE


if triton is not None:
    @triton.jit
    def _round_half_even(y):
        """torch.round for 0 <= y < 2**22: floor and fraction are exact, so no tie is moved."""
        f = tl.floor(y)
        frac = y - f
        f_odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
        return tl.where((frac > 0.5) | ((frac == 0.5) & f_odd), f + 1.0, f)

    @triton.jit
    def _int4_min_scale(lo, hi):
        """Group (min, max) -> fp16 (min, scale), as stored; quantize against exactly these."""
        scale = tl.maximum(tl.math.div_rn(hi - lo, tl.full(hi.shape, 15.0, tl.float32)), 1e-6)
        return lo.to(tl.float16), scale.to(tl.float16)

    @triton.jit
    def _int4_codes(x, lo, scale):
        q = _round_half_even(tl.math.div_rn(x - lo, scale))
        return tl.minimum(tl.maximum(q, 0.0), 15.0).to(tl.int32)

    @triton.jit
    def _int4_quant_keys(x_ptr, q_ptr, min_ptr, scale_ptr, N: tl.constexpr, D: tl.constexpr, G: tl.constexpr,
                         BLOCK_G: tl.constexpr, BLOCK_P: tl.constexpr):
        """Program (r, g): tokens [g*G, (g+1)*G) of head-block r; per channel (min, scale) over those tokens."""
        r = tl.program_id(0).to(tl.int64)
        gi = tl.program_id(1)
        t = tl.arange(0, BLOCK_G)
        p = tl.arange(0, BLOCK_P)  # channel pair: channels 2p and 2p+1
        p_ok = p < D // 2
        ok = (t < G)[:, None] & p_ok[None, :]
        tok = gi * G + t
        x_off = r * (N * D) + tok[:, None] * D + 2 * p[None, :]
        xe = tl.load(x_ptr + x_off, mask=ok, other=0.0).to(tl.float32)
        xo = tl.load(x_ptr + x_off + 1, mask=ok, other=0.0).to(tl.float32)
        # Padding channels get (0, 0) stats, not (inf, -inf): no NaNs even in lanes that are never stored.
        lo_e, s_e = _int4_min_scale(tl.where(p_ok, tl.min(tl.where(ok, xe, float("inf")), axis=0), 0.0),
                                    tl.where(p_ok, tl.max(tl.where(ok, xe, float("-inf")), axis=0), 0.0))
        lo_o, s_o = _int4_min_scale(tl.where(p_ok, tl.min(tl.where(ok, xo, float("inf")), axis=0), 0.0),
                                    tl.where(p_ok, tl.max(tl.where(ok, xo, float("-inf")), axis=0), 0.0))
        s_off = r * (N // G * D) + gi * D + 2 * p
        tl.store(min_ptr + s_off, lo_e, mask=p_ok)
        tl.store(min_ptr + s_off + 1, lo_o, mask=p_ok)
        tl.store(scale_ptr + s_off, s_e, mask=p_ok)
        tl.store(scale_ptr + s_off + 1, s_o, mask=p_ok)
        qe = _int4_codes(xe, lo_e.to(tl.float32)[None, :], s_e.to(tl.float32)[None, :])
        qo = _int4_codes(xo, lo_o.to(tl.float32)[None, :], s_o.to(tl.float32)[None, :])
        q_off = r * (N * (D // 2)) + tok[:, None] * (D // 2) + p[None, :]
        tl.store(q_ptr + q_off, (qe | (qo << 4)).to(tl.uint8), mask=ok)

    @triton.jit
    def _int4_dequant_keys(q_ptr, min_ptr, scale_ptr, out_ptr, N: tl.constexpr, D: tl.constexpr,
                           G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_P: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)
        gi = tl.program_id(1)
        t = tl.arange(0, BLOCK_G)
        p = tl.arange(0, BLOCK_P)
        p_ok = p < D // 2
        ok = (t < G)[:, None] & p_ok[None, :]
        tok = gi * G + t
        b = tl.load(q_ptr + r * (N * (D // 2)) + tok[:, None] * (D // 2) + p[None, :], mask=ok, other=0)
        b = b.to(tl.int32)
        s_off = r * (N // G * D) + gi * D + 2 * p
        lo_e = tl.load(min_ptr + s_off, mask=p_ok, other=0.0).to(tl.float32)
        lo_o = tl.load(min_ptr + s_off + 1, mask=p_ok, other=0.0).to(tl.float32)
        s_e = tl.load(scale_ptr + s_off, mask=p_ok, other=0.0).to(tl.float32)
        s_o = tl.load(scale_ptr + s_off + 1, mask=p_ok, other=0.0).to(tl.float32)
        x_off = r * (N * D) + tok[:, None] * D + 2 * p[None, :]
        out_ty = out_ptr.dtype.element_ty
        tl.store(out_ptr + x_off, ((b & 15).to(tl.float32) * s_e[None, :] + lo_e[None, :]).to(out_ty), mask=ok)
        tl.store(out_ptr + x_off + 1, ((b >> 4).to(tl.float32) * s_o[None, :] + lo_o[None, :]).to(out_ty),
                 mask=ok)

    @triton.jit
    def _value_tile(t0, N: tl.constexpr, D: tl.constexpr, G: tl.constexpr, BLOCK_T: tl.constexpr,
                    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
        """[tokens, channel groups, pairs] indices of a value tile: offsets (in elements) of the even channel,
        of the packed byte, of the group's (min, scale), and the masks."""
        t = t0 + tl.arange(0, BLOCK_T)[:, None, None]
        c = tl.arange(0, BLOCK_C)[None, :, None]
        p = tl.arange(0, BLOCK_P)[None, None, :]
        stat_ok = (t < N) & (c < D // G)
        ok = stat_ok & (p < G // 2)
        return t * D + c * G + 2 * p, t * (D // 2) + c * (G // 2) + p, t * (D // G) + c, ok, stat_ok

    @triton.jit
    def _int4_quant_values(x_ptr, q_ptr, min_ptr, scale_ptr, N: tl.constexpr, D: tl.constexpr, G: tl.constexpr,
                           BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
        """Program (r, tile): BLOCK_T tokens of head-block r; per token (min, scale) over each G channels."""
        r = tl.program_id(0).to(tl.int64)
        x_off, q_off, s_off, ok, stat_ok = _value_tile(tl.program_id(1) * BLOCK_T, N, D, G, BLOCK_T, BLOCK_C,
                                                       BLOCK_P)
        x_off += r * (N * D)
        xe = tl.load(x_ptr + x_off, mask=ok, other=0.0).to(tl.float32)
        xo = tl.load(x_ptr + x_off + 1, mask=ok, other=0.0).to(tl.float32)
        lo = tl.minimum(tl.min(tl.where(ok, xe, float("inf")), axis=2),
                        tl.min(tl.where(ok, xo, float("inf")), axis=2))
        hi = tl.maximum(tl.max(tl.where(ok, xe, float("-inf")), axis=2),
                        tl.max(tl.where(ok, xo, float("-inf")), axis=2))
        # Padding tokens / groups get (0, 0) stats, not (inf, -inf): no NaNs even in lanes never stored.
        lo16, s16 = _int4_min_scale(tl.where(stat_ok, lo[:, :, None], 0.0), tl.where(stat_ok, hi[:, :, None], 0.0))
        s_off += r * (N * (D // G))
        tl.store(min_ptr + s_off, lo16, mask=stat_ok)
        tl.store(scale_ptr + s_off, s16, mask=stat_ok)
        lo32, s32 = lo16.to(tl.float32), s16.to(tl.float32)
        q = _int4_codes(xe, lo32, s32) | (_int4_codes(xo, lo32, s32) << 4)
        tl.store(q_ptr + r * (N * (D // 2)) + q_off, q.to(tl.uint8), mask=ok)

    @triton.jit
    def _int4_dequant_values(q_ptr, min_ptr, scale_ptr, out_ptr, N: tl.constexpr, D: tl.constexpr,
                             G: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
                             BLOCK_P: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)
        x_off, q_off, s_off, ok, stat_ok = _value_tile(tl.program_id(1) * BLOCK_T, N, D, G, BLOCK_T, BLOCK_C,
                                                       BLOCK_P)
        b = tl.load(q_ptr + r * (N * (D // 2)) + q_off, mask=ok, other=0).to(tl.int32)
        s_off += r * (N * (D // G))
        lo = tl.load(min_ptr + s_off, mask=stat_ok, other=0.0).to(tl.float32)
        s = tl.load(scale_ptr + s_off, mask=stat_ok, other=0.0).to(tl.float32)
        x_off += r * (N * D)
        out_ty = out_ptr.dtype.element_ty
        tl.store(out_ptr + x_off, ((b & 15).to(tl.float32) * s + lo).to(out_ty), mask=ok)
        tl.store(out_ptr + x_off + 1, ((b >> 4).to(tl.float32) * s + lo).to(out_ty), mask=ok)


def _rows(x: torch.Tensor) -> int:
    return x.numel() // (x.shape[-1] * x.shape[-2]) if x.numel() else 0


def _value_blocks(n: int, d: int, group: int) -> tuple[int, int, int]:
    block_c, block_p = _p2(d // group), _p2(group // 2)
    return min(_p2(n), max(1, 4096 // (2 * block_c * block_p))), block_c, block_p


def int4_quantize_keys(k: torch.Tensor, group: int) -> dict[str, torch.Tensor]:
    """k [..., N, D] -> {"kq" [..., N, D/2] uint8, "kmin"/"kscale" [..., N/group, 1, D] fp16}."""
    *lead, n, d = k.shape
    kc = k.contiguous()
    q = torch.empty(*lead, n, d // 2, dtype=torch.uint8, device=k.device)
    lo = torch.empty(*lead, n // group, 1, d, dtype=torch.float16, device=k.device)
    scale = torch.empty_like(lo)
    if (rows := _rows(k)):
        _int4_quant_keys[(rows, n // group)](kc, q, lo, scale, N=n, D=d, G=group, BLOCK_G=_p2(group),
                                             BLOCK_P=_p2(d // 2))
    return {"kq": q, "kmin": lo, "kscale": scale}


def int4_dequantize_keys(q: torch.Tensor, lo: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    *lead, n, half = q.shape
    d, group = half * 2, n // lo.shape[-3]
    out = torch.empty(*lead, n, d, dtype=dtype, device=q.device)
    if (rows := _rows(q)):
        _int4_dequant_keys[(rows, n // group)](q.contiguous(), lo.contiguous(), scale.contiguous(), out, N=n, D=d,
                                               G=group, BLOCK_G=_p2(group), BLOCK_P=_p2(d // 2))
    return out


def int4_quantize_values(v: torch.Tensor, group: int) -> dict[str, torch.Tensor]:
    """v [..., N, D] -> {"vq" [..., N, D/2] uint8, "vmin"/"vscale" [..., N, D/group, 1] fp16}."""
    *lead, n, d = v.shape
    q = torch.empty(*lead, n, d // 2, dtype=torch.uint8, device=v.device)
    lo = torch.empty(*lead, n, d // group, 1, dtype=torch.float16, device=v.device)
    scale = torch.empty_like(lo)
    block_t, block_c, block_p = _value_blocks(n, d, group)
    if (rows := _rows(v)):
        _int4_quant_values[(rows, triton.cdiv(n, block_t))](v.contiguous(), q, lo, scale, N=n, D=d, G=group,
                                                            BLOCK_T=block_t, BLOCK_C=block_c, BLOCK_P=block_p)
    return {"vq": q, "vmin": lo, "vscale": scale}


def int4_dequantize_values(q: torch.Tensor, lo: torch.Tensor, scale: torch.Tensor,
                           dtype: torch.dtype) -> torch.Tensor:
    *lead, n, half = q.shape
    d = half * 2
    group = d // lo.shape[-2]
    out = torch.empty(*lead, n, d, dtype=dtype, device=q.device)
    block_t, block_c, block_p = _value_blocks(n, d, group)
    if (rows := _rows(q)):
        _int4_dequant_values[(rows, triton.cdiv(n, block_t))](q.contiguous(), lo.contiguous(), scale.contiguous(),
                                                              out, N=n, D=d, G=group, BLOCK_T=block_t,
                                                              BLOCK_C=block_c, BLOCK_P=block_p)
    return out
