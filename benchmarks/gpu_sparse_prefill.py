"""Sparse prefill end to end on a CUDA GPU: TTFT of kvplug's CUSTOM backend (sparse prefill on) vs vLLM's
FLASH_ATTN, same engine flags, plus a 128K two-turn case whose second turn hits the prefix cache.

    source benchmarks/gpu/env.sh
    python -m benchmarks.gpu_sparse_prefill --lengths 8192,32768,65536,131072 --out benchmarks/results/gpu_sparse_prefill_h100.json

Each backend runs in its own subprocess on a config.json of the real shape (load_format="dummy": no
weights travel). Fresh random prompts per repeat, so the TTFT runs never hit the prefix cache; the
two-turn case sends a --turn-length prompt, then the same prompt + --suffix new tokens, and records the
second turn's TTFT, its cached tokens and (kvplug) how many of its tokens went through the sparse path.
With dummy weights attention has no real structure, so the density a pattern reaches here is not what a
trained model gets; the density actually computed is read from kvplug's counters and reported beside
every figure. `--pattern/--budgets` choose the pattern for every head (default: vertical_slash).
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

    lengths = [int(x) for x in args.lengths.split(",")]
    longest = max(lengths + [args.turn_length + args.suffix])
    llm = LLM(model=args.model_dir, load_format="dummy", skip_tokenizer_init=True, seed=0,
              attention_backend=args.backend, max_model_len=longest + 64, enable_prefix_caching=True,
              gpu_memory_utilization=args.gpu_mem, max_num_seqs=4,
              **({"max_num_batched_tokens": args.max_batched_tokens} if args.max_batched_tokens else {}))
    impls = sorted({c for per_worker in llm.collective_rpc(attention_impl_names) for c in per_worker})
    ours = args.backend == "CUSTOM"
    if ours:
        from attention_backends.sparse_prefill.runner import stats_snapshot

        stats = lambda: llm.collective_rpc(stats_snapshot)[0]  # noqa: E731
    rng = random.Random(1234)
    vocab = SHAPES[args.shape]["vocab_size"]

    def tokens(n: int) -> list[int]:
        return [rng.randrange(1000, vocab - 1000) for _ in range(n)]

    def timed(ids: list[int]) -> tuple[float, int]:
        sp = SamplingParams(temperature=0.0, max_tokens=1, detokenize=False)
        t0 = time.perf_counter()
        out = llm.generate([TokensPrompt(prompt_token_ids=ids)], sp, use_tqdm=False)
        return time.perf_counter() - t0, int(out[0].num_cached_tokens or 0)

    def density(before: dict, after: dict) -> float | None:
        causal = after["causal_pairs"] - before["causal_pairs"]
        return (after["computed_pairs"] - before["computed_pairs"]) / causal if causal else None

    for n in lengths:  # warm-up of every shape
        timed(tokens(n))
    ttft, dens = {}, {}
    for n in lengths:
        before = stats() if ours else None
        ttft[str(n)] = [timed(tokens(n))[0] for _ in range(args.repeats)]
        if ours:
            dens[str(n)] = density(before, stats())
    turn = {}
    if args.turn_length:
        first = tokens(args.turn_length)
        t1, _ = timed(first)
        before = stats() if ours else None
        t2, cached = timed(first + tokens(args.suffix))
        turn = {"turn_length": args.turn_length, "suffix": args.suffix, "first_ttft_s": t1, "second_ttft_s": t2,
                "second_cached_tokens": cached}
        if ours:
            after = stats()
            turn["second_sparse_tokens"] = after["sparse_tokens"] - before["sparse_tokens"]
            turn["second_density"] = density(before, after)
    import torch
    import vllm

    print("RESULT " + json.dumps({"backend": args.backend, "attention_impls": impls, "ttft_s": ttft, "density": dens,
                                  "two_turn": turn, "device": torch.cuda.get_device_name(0),
                                  "vllm": vllm.__version__}), flush=True)


def run_backend(args: argparse.Namespace, backend: str) -> dict:
    env = dict(os.environ, VLLM_ALLOW_INSECURE_SERIALIZATION="1")
    if backend == "CUSTOM":
        env.update(KVPLUG_SPARSE_PREFILL__ENABLED="true",
                   KVPLUG_SPARSE_PREFILL__MIN_PROMPT_TOKENS=str(args.min_prompt_tokens),
                   KVPLUG_SPARSE_PREFILL__DEFAULT_PATTERN=args.pattern,
                   KVPLUG_SPARSE_PREFILL__DEFAULT_BUDGETS=args.budgets)
        if args.pattern_config:
            env["KVPLUG_SPARSE_PREFILL__PATTERN_CONFIG"] = args.pattern_config
    else:
        env["VLLM_PLUGINS"] = "none"
    worker_args = ["--model-dir", args.model_dir, "--shape", args.shape, "--lengths", args.lengths,
                   "--repeats", str(args.repeats), "--gpu-mem", str(args.gpu_mem), "--turn-length", str(args.turn_length),
                   "--suffix", str(args.suffix), "--max-batched-tokens", str(args.max_batched_tokens)]
    return gpu_common.run_worker("benchmarks.gpu_sparse_prefill", backend, worker_args, env)


def summarize(runs: list[dict]) -> dict:
    by: dict[str, list[dict]] = {}
    for r in runs:
        by.setdefault(r["backend"], []).append(r)
    base, ours = by["FLASH_ATTN"], by["CUSTOM"]
    table = {}
    for n in base[0]["ttft_s"]:
        b = statistics.median([x for r in base for x in r["ttft_s"][n]])
        o = statistics.median([x for r in ours for x in r["ttft_s"][n]])
        table[n] = {"flash_attn_s": b, "kvplug_s": o, "speedup": b / o, "density": ours[-1]["density"].get(n)}
    out = {"device": runs[0]["device"], "vllm": runs[0]["vllm"], "ttft": table,
           "attention_impls": {r["backend"]: r["attention_impls"] for r in runs}}
    if base[0]["two_turn"]:
        bt = statistics.median(r["two_turn"]["second_ttft_s"] for r in base)
        ot = statistics.median(r["two_turn"]["second_ttft_s"] for r in ours)
        out["two_turn"] = {"flash_attn_second_ttft_s": bt, "kvplug_second_ttft_s": ot, "speedup": bt / ot,
                           "kvplug": ours[-1]["two_turn"], "flash_attn": base[-1]["two_turn"]}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_sparse_prefill", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama-3-8b", choices=sorted(SHAPES))
    p.add_argument("--model-dir", help="folder with config.json (default: a temp folder with --shape)")
    p.add_argument("--lengths", default="8192,32768,65536,131072")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--turn-length", type=int, default=131072 - 1024, help="two-turn case: first turn tokens (0: skip)")
    p.add_argument("--suffix", type=int, default=1024, help="two-turn case: new tokens of the second turn")
    p.add_argument("--min-prompt-tokens", type=int, default=32768, help="kvplug's default (8192 reproduces the "
                   "first H100 run)")
    p.add_argument("--pattern", default="vertical_slash")
    p.add_argument("--budgets", default='{"vertical": 1000, "slash": 1024}')
    p.add_argument("--pattern-config", default="", help="per-head JSON instead of --pattern/--budgets")
    p.add_argument("--max-batched-tokens", type=int, default=0, help="engine chunk size (0: vLLM's default)")
    p.add_argument("--gpu-mem", type=float, default=0.85)
    p.add_argument("--backends", default="FLASH_ATTN,CUSTOM")
    p.add_argument("--out", default="benchmarks/results/gpu_sparse_prefill.json")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--backend", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        _worker(args)
        return 0
    if args.model_dir is None:
        args.model_dir = str(write_shape(args.shape, Path(tempfile.mkdtemp(prefix="kvplug-shape-"))))
    runs = [run_backend(args, b) for b in args.backends.split(",") if b]
    summary = summarize(runs)
    gpu_common.write_results(args.out, "python -m benchmarks.gpu_sparse_prefill "
                             + " ".join(argv if argv is not None else sys.argv[1:]), summary, runs)
    print(f"device: {summary['device']}  vLLM {summary['vllm']}")
    for n, row in summary["ttft"].items():
        print(f"TTFT {n:>7s}  FLASH_ATTN {row['flash_attn_s']*1e3:9.1f} ms  kvplug {row['kvplug_s']*1e3:9.1f} ms"
              f"  speedup {row['speedup']:.2f}x  density {row['density']}")
    if "two_turn" in summary:
        t = summary["two_turn"]
        print(f"second turn (prefix hit): FLASH_ATTN {t['flash_attn_second_ttft_s']*1e3:.1f} ms  kvplug "
              f"{t['kvplug_second_ttft_s']*1e3:.1f} ms  sparse tokens {t['kvplug'].get('second_sparse_tokens')}"
              f"  cached {t['kvplug'].get('second_cached_tokens')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
