"""One layer's prefill attention at long context: kvplug sparse prefill (Triton, paged KV) vs dense and
sparse baselines. Plain torch + triton; FA3 and vLLM's FA2 sparse kernel join when vLLM is importable.

    python -m benchmarks.kernels.sparse_prefill_bench --lengths 32768,65536,131072 --out benchmarks/results/x.json

Per length it times (CUDA events, median):
  * kvplug index   : pattern estimation + index build (vertical-slash, torch ops on the device) + compaction
  * kvplug attn    : the Triton sparse attention kernel over the paged cache (page size 16, shuffled pages)
  * kvplug total   : both
  * sdpa dense     : torch scaled_dot_product_attention, causal (contiguous K/V)
  * flex sparse    : torch FlexAttention with a block mask of the same key blocks (+ the blocks holding the
                     vertical columns: a block mask cannot express single columns), coarsened to the
                     128x128 blocks its Hopper kernel needs (so it computes more than we do)
  * fa3 dense      : vLLM's flash_attn_varlen_func (fa_version=3), if vLLM is staged
  * fa2 sparse     : vLLM's sparse_attn_varlen_func with block offsets/columns converted from the same index
Q/K are synthetic with the structure real models show (a few sink keys, locality): random Q/K would make
every diagonal equally likely and the pattern meaningless. Density of the index is reported beside.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
from pathlib import Path


def synthetic_qkv(L: int, Hq: int, Hkv: int, d: int, device, dtype, seed: int = 0):
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(L, Hq, d, generator=g)
    k = torch.randn(L, Hkv, d, generator=g)
    v = torch.randn(L, Hkv, d, generator=g)
    # Locality: a smooth positional component shared by q and k (window ~128 tokens).
    walk = torch.randn(L + 128, d, generator=g).cumsum(0)
    smooth = (walk[128:] - walk[:-128]) / math.sqrt(128)
    q += 0.6 * smooth[:, None, :]
    k += 0.6 * smooth[:, None, :]
    sink = torch.randn(d, generator=g)
    k[:4] += 4 * sink
    q += 0.5 * sink
    return (x.to(device=device, dtype=dtype) for x in (q, k, v))


def paged(x, page: int, seed: int = 1):
    """[L, H, d] -> (cache view [num_pages, H, page, d] over FlashAttention's [num_pages, page, H, d] memory,
    shuffled pages; the sequence's page ids). Same seed -> same pages for K and V."""
    import torch

    L, H, d = x.shape
    n = -(-L // page)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(x.device)
    padded = torch.zeros(n * page, H, d, dtype=x.dtype, device=x.device)
    padded[:L] = x
    cache = torch.empty(n, page, H, d, dtype=x.dtype, device=x.device)
    cache[perm] = padded.view(n, page, H, d)
    return cache.permute(0, 2, 1, 3), perm


def run(args) -> dict:
    import torch

    from attention_backends.sparse_prefill import triton_kernels
    from attention_backends.sparse_prefill.head_config import LayerPlan, build_index
    from attention_backends.sparse_prefill.index import BLOCK, ChunkGeometry
    from benchmarks.kernels.harness import time_cuda

    dev = torch.device(args.device)
    dtype = torch.bfloat16
    Hq, Hkv, d = args.heads, args.kv_heads, args.head_dim
    scale = d ** -0.5
    plan = LayerPlan.uniform(args.pattern, Hq, dev, **json.loads(args.budgets))
    if dev.type == "cuda":
        flash_attn_varlen_func, fa_missing = _import_fa("flash_attn_varlen_func")
        sparse_attn_varlen_func, fa2_sparse_missing = _import_fa("sparse_attn_varlen_func")
    else:
        flash_attn_varlen_func = sparse_attn_varlen_func = None
        fa_missing = fa2_sparse_missing = "vLLM's FlashAttention kernels need a CUDA device"
    results = []
    for L in [int(x) for x in args.lengths.split(",")]:
        q, k, v = synthetic_qkv(L, Hq, Hkv, d, dev, dtype)
        geom = ChunkGeometry(L, L)
        kc, pages = paged(k, args.page)
        vc, _ = paged(v, args.page)
        out = torch.empty_like(q)

        def index():
            return build_index(q, k, geom, plan, scale, trim_columns=False)

        idx = index()
        density = idx.density(geom)
        row = {"L": L, "density": density, "pattern": args.pattern, "budgets": json.loads(args.budgets)}
        timing = lambda fn: time_cuda(fn, warmup=args.warmup, iters=args.iters)  # noqa: E731
        row["kvplug_index_ms"] = timing(lambda: triton_kernels.compact_blocks(index().block_mask))["median_ms"]
        configs = {}
        for cfg in args.kernel_configs.split(","):  # num_warps x num_stages
            w, st = (int(x) for x in cfg.split("x"))
            configs[cfg] = timing(lambda: triton_kernels.sparse_attention_paged(
                q, kc, vc, pages, idx, geom, scale, out, num_warps=w, num_stages=st))["median_ms"]
        row["kvplug_attn_configs_ms"] = configs
        row["kvplug_attn_ms"] = min(configs.values())
        row["kvplug_total_ms"] = row["kvplug_index_ms"] + row["kvplug_attn_ms"]
        qt, kt, vt = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
        dense = None
        if not args.skip_sdpa:
            sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
                qt, kt, vt, is_causal=True, scale=scale, enable_gqa=True)
            row["sdpa_dense_ms"] = timing(sdpa)["median_ms"]
            dense = sdpa()[0].transpose(0, 1)
        try:
            row["flex_sparse_ms"] = _flex(qt, kt, vt, idx, geom, scale, timing)
        except Exception as exc:  # FlexAttention missing or failing on this torch: record why
            row["flex_sparse_error"] = f"{type(exc).__name__}: {exc}"[:300]
        cu = torch.tensor([0, L], dtype=torch.int32, device=dev)
        if flash_attn_varlen_func is not None:
            row["fa3_dense_ms"] = timing(lambda: flash_attn_varlen_func(
                q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=L, max_seqlen_k=L, softmax_scale=scale,
                causal=True, fa_version=3))["median_ms"]
        if sparse_attn_varlen_func is not None:
            bc, bo, cc, ci = _fa2_sparse_index(idx, geom)
            row["fa2_sparse_ms"] = timing(lambda: sparse_attn_varlen_func(
                q, k, v, bc, bo, cc, ci, cu, cu, L, L, softmax_scale=scale, causal=True))["median_ms"]
        if dense is not None:
            # quality of the sparse output vs dense on this synthetic data (not a correctness test)
            err = (out.float() - dense.float()).norm() / dense.float().norm()
            row["rel_err_vs_dense"] = float(err)
        for base in ("sdpa_dense_ms", "flex_sparse_ms", "fa3_dense_ms", "fa2_sparse_ms"):
            if base in row:
                row[f"speedup_vs_{base[:-3]}"] = row[base] / row["kvplug_total_ms"]
        results.append(row)
        print(json.dumps(row), flush=True)
        del q, k, v, kc, vc, out, idx
        torch.cuda.empty_cache() if dev.type == "cuda" else None
    return {"device": torch.cuda.get_device_name(0) if dev.type == "cuda" else platform.processor(),
            "torch": torch.__version__, "fa_missing": fa_missing, "fa2_sparse_missing": fa2_sparse_missing, "shape": {"heads": Hq, "kv_heads": Hkv,
            "head_dim": d, "page": args.page}, "results": results}


def _import_fa(name: str):
    """(vLLM's FlashAttention function ``name`` or None, why it is missing): vLLM 0.26 exports
    flash_attn_varlen_func from vllm.vllm_flash_attn but sparse_attn_varlen_func only from its interface module."""
    errors = []
    for module in ("vllm.vllm_flash_attn", "vllm.vllm_flash_attn.flash_attn_interface"):
        try:
            return getattr(__import__(module, fromlist=[name]), name), None
        except Exception as exc:  # not staged, or not exported there
            errors.append(f"{module}: {type(exc).__name__}: {exc}"[:200])
    return None, "; ".join(errors)


def _flex(qt, kt, vt, idx, geom, scale, timing) -> float:
    import torch
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    from attention_backends.sparse_prefill.index import BLOCK

    bm = idx.block_mask.clone()
    H, nqb, nkb = bm.shape
    valid = torch.arange(idx.cols.shape[-1], device=bm.device) < idx.col_count[..., None]
    cb = torch.where(valid, idx.cols // BLOCK, torch.zeros_like(idx.cols))
    bm.scatter_(2, cb, valid | bm.gather(2, cb))
    # FlexAttention's Hopper kernels need 128-token blocks: a 128 block is on if any of its 64 sub-blocks is.
    fb = 2 * BLOCK
    bm = torch.nn.functional.pad(bm, (0, nkb % 2, 0, nqb % 2)).view(H, -(-nqb // 2), 2, -(-nkb // 2), 2)
    bm = bm.any(4).any(2)
    counts = bm.sum(-1).to(torch.int32)
    order = torch.sort((~bm).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    mask = BlockMask.from_kv_blocks(counts[None], order[None], BLOCK_SIZE=fb, mask_mod=causal,
                                    seq_lengths=(geom.L, geom.L))
    fn = torch.compile(flex_attention)
    return timing(lambda: fn(qt, kt, vt, block_mask=mask, scale=scale, enable_gqa=True))["median_ms"]


def _fa2_sparse_index(idx, geom):
    """Our index -> vLLM FA2 sparse kernel's (block_count, block_offset, column_count, column_index),
    each with a leading batch dimension: key blocks become their start offsets."""
    import torch

    from attention_backends.sparse_prefill import triton_kernels
    from attention_backends.sparse_prefill.index import BLOCK

    ids, counts = triton_kernels.compact_blocks(idx.block_mask)
    offsets = (ids * BLOCK).to(torch.int32)
    return (counts[None].contiguous(), offsets[None].contiguous(), idx.col_count.to(torch.int32)[None].contiguous(),
            idx.cols.clamp(min=0).to(torch.int32)[None].contiguous())


def markdown(report: dict) -> str:
    """The report as a Markdown table (what BENCHMARKS.md shows)."""
    cols = [("L", "L"), ("pattern", "pattern"), ("density", "density"), ("kvplug_index_ms", "ours: index ms"),
            ("kvplug_attn_ms", "ours: attn ms"), ("kvplug_total_ms", "ours: total ms"), ("sdpa_dense_ms", "SDPA dense ms"),
            ("flex_sparse_ms", "Flex sparse ms"), ("fa3_dense_ms", "FA3 dense ms"), ("fa2_sparse_ms", "FA2 sparse ms")]
    rows = report["results"]
    present = [(k, t) for k, t in cols if any(k in r for r in rows)]
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) and v < 1 else (f"{v:.1f}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = ["| " + " | ".join(t for _, t in present) + " |", "|" + "---|" * len(present)]
    lines += ["| " + " | ".join(fmt(r.get(k, "-")) for k, _ in present) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.kernels.sparse_prefill_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="32768,65536,131072")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--page", type=int, default=16)
    p.add_argument("--pattern", default="vertical_slash")
    p.add_argument("--budgets", default='{"vertical": 1000, "slash": 1024}', help="JSON budgets of --pattern")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--skip-sdpa", action="store_true")
    p.add_argument("--kernel-configs", default="4x2", help="Triton num_warps x num_stages to time, e.g. 4x2,8x3")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default="benchmarks/results/sparse_prefill_kernels.json")
    p.add_argument("--markdown", metavar="JSON", help="print an earlier report as a Markdown table and exit")
    args = p.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())))
        return 0
    report = run(args)
    report["command"] = "python -m benchmarks.kernels.sparse_prefill_bench " + " ".join(argv if argv is not None else sys.argv[1:])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
