"""GPU check of the quant:int4 (KIVI) Triton kernels against the torch path: compile, bit-equality of the
packed payload, dequantization error, and speed on a block set (default: 32K tokens in 16-token blocks,
8 KV heads, head_dim 128, bf16; one layer and all 32 layers of a Llama-3-8B shape).

Imports only torch, triton and cache_policies (no vLLM, no msgspec/kvplug.config), so it runs on a bare GPU
box from the repository root:

    python tests/cache_policies/gpu_check_int4_kernels.py --out "$OUT/int4_kernels.json"

On a CPU it is a dry run under the Triton interpreter with a tiny shape (``--tokens 64 --layers 1 --reps 1``).
Exit status 1 if the kernel's payload differs from torch's or a kernel fell back to torch.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cache_policies import quant_int4, triton_quant  # noqa: E402
from kvplug.kv_payload import BlockContext  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def timed_ms(fn, reps: int) -> float:
    """Median wall time of ``fn`` in ms (CUDA events on the GPU)."""
    times = []
    for _ in range(reps):
        if DEVICE == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def check_shape(layers: int, args) -> dict:
    n_blocks = args.tokens // args.block
    shape = (n_blocks, layers, args.heads, args.block, args.dim)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    k = (torch.randn(shape, generator=g, device=DEVICE) * torch.linspace(0.1, 8.0, args.dim, device=DEVICE)
         ).to(torch.bfloat16)
    v = torch.randn(shape, generator=g, device=DEVICE).to(torch.bfloat16)
    gk = quant_int4._group(args.block, args.group)
    gv = quant_int4._group(args.dim, args.group)

    t0 = time.perf_counter()
    keys = triton_quant.int4_quantize_keys(k, gk)
    vals = triton_quant.int4_quantize_values(v, gv)
    k_out = triton_quant.int4_dequantize_keys(keys["kq"], keys["kmin"], keys["kscale"], torch.bfloat16)
    v_out = triton_quant.int4_dequantize_values(vals["vq"], vals["vmin"], vals["vscale"], torch.bfloat16)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    first_call_s = time.perf_counter() - t0  # includes compiling the four kernels (cached after)

    keys_ref, vals_ref = quant_int4.quantize_keys_reference(k, gk), quant_int4.quantize_values_reference(v, gv)
    differ = {name: int((got[name] != ref[name]).sum())
              for got, ref in ((keys, keys_ref), (vals, vals_ref)) for name in ref}
    k_ref = quant_int4.dequantize_keys_reference(*keys_ref.values(), torch.bfloat16)
    v_ref = quant_int4.dequantize_values_reference(*vals_ref.values(), torch.bfloat16)
    dequant_max_abs_diff = max(float((k_out.float() - k_ref.float()).abs().max()),
                               float((v_out.float() - v_ref.float()).abs().max()))
    del k_out, v_out, k_ref, v_ref

    def kernel_quant():
        triton_quant.int4_quantize_keys(k, gk), triton_quant.int4_quantize_values(v, gv)

    def torch_quant():
        quant_int4.quantize_keys_reference(k, gk), quant_int4.quantize_values_reference(v, gv)

    def kernel_dequant():
        triton_quant.int4_dequantize_keys(keys["kq"], keys["kmin"], keys["kscale"], torch.bfloat16)
        triton_quant.int4_dequantize_values(vals["vq"], vals["vmin"], vals["vscale"], torch.bfloat16)

    def torch_dequant():
        quant_int4.dequantize_keys_reference(keys["kq"], keys["kmin"], keys["kscale"], torch.bfloat16)
        quant_int4.dequantize_values_reference(vals["vq"], vals["vmin"], vals["vscale"], torch.bfloat16)

    for fn in (kernel_quant, torch_quant, kernel_dequant, torch_dequant):
        fn()  # warm-up (allocator, torch's own kernels)
    ms = {name: timed_ms(fn, args.reps) for name, fn in (("kernel_quant", kernel_quant), ("torch_quant", torch_quant),
                                                          ("kernel_dequant", kernel_dequant),
                                                          ("torch_dequant", torch_dequant))}

    # The policy as the connector calls it (residual tail kept exact, one payload dict per block).
    policy = quant_int4.Int4KiviPolicy(group_size=args.group, residual_tokens=32)
    ctx = BlockContext.contiguous(n_blocks, args.block)
    policy_ms = {"kernel_encode": timed_ms(lambda: policy.encode(k, v, ctx), max(1, args.reps // 2))}
    payloads = policy.encode(k, v, ctx)
    policy_ms["kernel_decode"] = timed_ms(lambda: policy.decode(payloads, k), max(1, args.reps // 2))
    use_kernel = quant_int4._use_kernel
    quant_int4._use_kernel = lambda x: False
    try:
        policy_ms["torch_encode"] = timed_ms(lambda: policy.encode(k, v, ctx), max(1, args.reps // 2))
        policy_ms["torch_decode"] = timed_ms(lambda: policy.decode(payloads, k), max(1, args.reps // 2))
    finally:
        quant_int4._use_kernel = use_kernel

    raw_bytes = 2 * k.numel() * k.element_size()
    return {"shape": list(shape), "group_keys": gk, "group_values": gv, "first_call_s": round(first_call_s, 3),
            "payload_elements_differing": differ, "dequant_bf16_max_abs_diff": dequant_max_abs_diff,
            "ms": {name: round(t, 4) for name, t in ms.items()},
            "speedup_quant": round(ms["torch_quant"] / ms["kernel_quant"], 2),
            "speedup_dequant": round(ms["torch_dequant"] / ms["kernel_dequant"], 2),
            "kernel_quant_gbps": round(raw_bytes / ms["kernel_quant"] / 1e6, 1),
            "kernel_dequant_gbps": round(raw_bytes / ms["kernel_dequant"] / 1e6, 1),
            "policy_ms": {name: round(t, 3) for name, t in policy_ms.items()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--block", type=int, default=16, help="tokens per KV block (vLLM's block_size)")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--group", type=int, default=32)
    parser.add_argument("--layers", default="1,32", help="comma-separated layer counts to check")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    import triton

    result = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (TRITON_INTERPRET=1)",
              "torch": torch.__version__, "triton": triton.__version__, "command": " ".join(sys.argv),
              "runs": [check_shape(int(n), args) for n in args.layers.split(",")],
              "fell_back_to_torch": triton_quant.kernel_failed(quant_int4.KERNELS)}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    exact = all(not any(run["payload_elements_differing"].values()) for run in result["runs"])
    return 0 if exact and not result["fell_back_to_torch"] else 1


if __name__ == "__main__":
    sys.exit(main())
