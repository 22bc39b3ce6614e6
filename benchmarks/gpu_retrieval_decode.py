"""Retrieval decoding on a CUDA GPU: kvplug's CUSTOM backend (retrieval_decode on) vs vLLM's FLASH_ATTN.

Llama-3-8B shape with load_format="dummy" (no weights travel), CUDA graphs on in both (vLLM's default
compilation; pass --cudagraph-mode to force one), prefix caching on so a prompt is prefilled once and the
timed calls only decode:
  * TPOT at batch 1 for each --lengths (default 32K and 128K): prefill p once, then
    (t(p, 1 + N tokens) - t(p, 1 token)) / N, both calls hitting the prefix cache;
  * output tokens/s with --batch sequences x --batch-len tokens decoding together (default 16 x 32K):
    batch * N / (t(batch, 1 + N) - t(batch, 1)), again after one prefill of the batch;
  * from the CUSTOM run: tokens that took the retrieval path and the fraction of KV blocks read.

    python -m benchmarks.gpu_retrieval_decode --out benchmarks/results/gpu_retrieval_decode_h100.json
    python -m benchmarks.gpu_retrieval_decode --phases throughput --out ...   # only 16 x 32K

16 x 32K of Llama-3-8B KV is 64 GiB: on an 80 GB H100 vLLM holds ~13 of them at once (the rest queue) —
the same for both backends, but run the throughput phase on an H200 to have all 16 resident.
Each backend runs in its own subprocess, in the order given by --backends.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import gpu_common
from benchmarks.gpu_passthrough import SHAPES, write_shape


def _worker(args: argparse.Namespace) -> None:
    import random

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from kvplug.vllm_compat import attention_impl_names

    phases = args.phases.split(",")
    lengths = [int(x) for x in args.lengths.split(",")] if "tpot" in phases else []
    longest = max(lengths + ([args.batch_len] if "throughput" in phases else []))
    kw = {}
    if args.cudagraph_mode:
        kw["compilation_config"] = {"cudagraph_mode": args.cudagraph_mode}
    llm = LLM(model=args.model_dir, load_format="dummy", skip_tokenizer_init=True, seed=0,
              attention_backend=args.backend, max_model_len=longest + args.decode_tokens + 64,
              enable_prefix_caching=True, gpu_memory_utilization=args.gpu_mem, max_num_seqs=max(16, args.batch),
              **kw)
    impls = sorted({c for per_worker in llm.collective_rpc(attention_impl_names) for c in per_worker})
    rng = random.Random(1234)
    vocab = SHAPES[args.shape]["vocab_size"]

    def prompt(n: int) -> TokensPrompt:
        return TokensPrompt(prompt_token_ids=[rng.randrange(1000, vocab - 1000) for _ in range(n)])

    def timed(ps, max_tokens: int) -> float:
        sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, min_tokens=max_tokens, detokenize=False,
                            ignore_eos=True)
        t0 = time.perf_counter()
        llm.generate(ps, sp, use_tqdm=False)
        return time.perf_counter() - t0

    def stats():
        if args.backend != "CUSTOM":
            return None
        from attention_backends.retrieval_decode import runner

        return llm.collective_rpc(runner.stats_snapshot)[0]

    n_dec = args.decode_tokens
    result: dict = {"backend": args.backend, "attention_impls": impls, "tpot_s": {}, "throughput_tok_s": {}}
    timed([prompt(512)], 4)  # warm-up
    for n in lengths:
        runs = []
        for _ in range(args.repeats):
            p = [prompt(n)]
            timed(p, 1)  # prefill once (the prefix cache keeps it)
            t1 = timed(p, 1)
            tn = timed(p, 1 + n_dec)
            runs.append((tn - t1) / n_dec)
        result["tpot_s"][str(n)] = runs
    result["stats_after_tpot"] = stats()
    if "throughput" in phases:
        key = f"{args.batch}x{args.batch_len}"
        runs = []
        for _ in range(args.repeats):
            ps = [prompt(args.batch_len) for _ in range(args.batch)]
            timed(ps, 1)
            t1 = timed(ps, 1)
            tn = timed(ps, 1 + n_dec)
            runs.append(args.batch * n_dec / (tn - t1))
        result["throughput_tok_s"][key] = runs
    result["stats_final"] = stats()
    import torch
    import vllm

    result.update(device=torch.cuda.get_device_name(0), vllm=vllm.__version__)
    print("RESULT " + json.dumps(result), flush=True)


def run_backend(args: argparse.Namespace, backend: str, argv: list[str]) -> dict:
    env = dict(os.environ, VLLM_ALLOW_INSECURE_SERIALIZATION="1")  # collective_rpc of local functions
    if backend == "CUSTOM":
        env.update({"KVPLUG_RETRIEVAL_DECODE__ENABLED": "true",
                    "KVPLUG_RETRIEVAL_DECODE__BUDGET_TOKENS": str(args.budget_tokens),
                    "KVPLUG_RETRIEVAL_DECODE__BUDGET_FRACTION": str(args.budget_fraction),
                    "KVPLUG_RETRIEVAL_DECODE__MIN_CONTEXT_TOKENS": str(args.min_context)})
        env.pop("KVPLUG_CONFIG_JSON", None)
    else:
        env["VLLM_PLUGINS"] = "none"  # vanilla vLLM: kvplug not even loaded
    return gpu_common.run_worker("benchmarks.gpu_retrieval_decode", backend,
                                 ["--model-dir", args.model_dir, *gpu_common.worker_argv(argv)], env)


def summarize(runs: list[dict]) -> dict:
    by: dict = {}
    for r in runs:
        by.setdefault(r["backend"], []).append(r)
    base, ours = by.get("FLASH_ATTN", []), by.get("CUSTOM", [])
    out: dict = {"device": runs[0]["device"], "vllm": runs[0]["vllm"], "order": [r["backend"] for r in runs],
                 "attention_impls": {r["backend"]: r.get("attention_impls") for r in runs}}
    if ours and ours[-1].get("stats_final"):
        s = ours[-1]["stats_final"]
        out["retrieval_stats"] = dict(s, fraction_kv_read=(s["blocks_read"] / s["blocks_total"]) if s["blocks_total"]
                                      else None)
    for metric, better in (("tpot_s", "lower"), ("throughput_tok_s", "higher")):
        table = {}
        for key in (base or ours)[0][metric]:
            b = statistics.median([x for r in base for x in r[metric][key]]) if base else None
            o = statistics.median([x for r in ours for x in r[metric][key]]) if ours else None
            speedup = None
            if b and o:
                speedup = b / o if better == "lower" else o / b
            table[key] = {"flash_attn": b, "kvplug": o, "speedup": speedup}
        out[metric] = table
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_retrieval_decode", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama-3-8b", choices=sorted(SHAPES))
    p.add_argument("--model-dir", help="folder with config.json (default: a temp folder with --shape)")
    p.add_argument("--phases", default="tpot,throughput")
    p.add_argument("--lengths", default="32768,131072", help="TPOT context lengths (batch 1)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--batch-len", type=int, default=32768)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--budget-tokens", type=int, default=2048, help="retrieval budget (tokens per kv-head)")
    p.add_argument("--budget-fraction", type=float, default=0.0, help="if > 0, budget as a fraction of the context")
    p.add_argument("--min-context", type=int, default=4096)
    p.add_argument("--gpu-mem", type=float, default=0.9)
    p.add_argument("--cudagraph-mode", default=None, help="e.g. FULL_AND_PIECEWISE (default: vLLM's)")
    p.add_argument("--backends", default="FLASH_ATTN,CUSTOM")
    p.add_argument("--out", default="results/gpu_retrieval_decode.json")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--backend", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        _worker(args)
        return 0
    if args.model_dir is None:
        args.model_dir = str(write_shape(args.shape, Path(tempfile.mkdtemp(prefix="kvplug-shape-"))))
    argv = list(argv if argv is not None else sys.argv[1:])
    runs = [run_backend(args, b, argv) for b in args.backends.split(",") if b]
    summary = summarize(runs)
    gpu_common.write_results(args.out, "python -m benchmarks.gpu_retrieval_decode " + " ".join(argv), summary, runs)
    print(f"device: {summary['device']}  vLLM {summary['vllm']}")
    print(f"attention impls: {summary['attention_impls']}")
    print(f"retrieval: {summary.get('retrieval_stats')}")
    for metric in ("tpot_s", "throughput_tok_s"):
        for key, row in summary[metric].items():
            print(f"{metric:17s} {key:>10s}  FLASH_ATTN {row['flash_attn']}  kvplug {row['kvplug']}  "
                  f"speedup {row['speedup']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
