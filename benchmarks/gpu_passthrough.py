"""Passthrough check on a CUDA GPU: kvplug's CUSTOM backend (every feature off) vs vLLM's FLASH_ATTN.

Runs each backend in its own subprocess on the same model (a config.json of the real shape with
load_format="dummy", so no weights travel), then reports
  * greedy equivalence: token ids of the CUSTOM run == those of the FLASH_ATTN run, prompt by prompt;
  * TTFT at each prompt length (max_tokens=1, prefix caching off, fresh random prompts per repeat);
  * TPOT at batch 1 ((t(1+N tokens) - t(1 token)) / N);
  * overhead = CUSTOM / FLASH_ATTN - 1 for each figure.

    python -m benchmarks.gpu_passthrough --shape llama-3-8b --lengths 8192,32768 --out results/x.json

Backends are run in the order given (default FLASH_ATTN,CUSTOM,FLASH_ATTN,CUSTOM: interleaved so a drift of
the machine shows up as spread instead of as overhead).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from benchmarks import harness

def _worker(args: argparse.Namespace) -> None:
    """One backend, in this process: measure and print one JSON line."""
    import random

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    lengths = [int(x) for x in args.lengths.split(",")]
    llm = LLM(model=args.model_dir, load_format="dummy", skip_tokenizer_init=True, seed=0,
              attention_backend=args.backend, max_model_len=max(lengths) + args.tpot_tokens + 16,
              enable_prefix_caching=False, gpu_memory_utilization=args.gpu_mem, max_num_seqs=16)
    impls = harness.attention_impls(llm)
    rng = random.Random(1234)
    vocab = harness.SHAPES[args.shape]["vocab_size"]

    def prompt(n: int) -> TokensPrompt:
        return TokensPrompt(prompt_token_ids=[rng.randrange(1000, vocab - 1000) for _ in range(n)])

    def timed(p, max_tokens: int) -> float:
        sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, min_tokens=max_tokens, detokenize=False)
        t0 = time.perf_counter()
        llm.generate([p], sp, use_tqdm=False)
        return time.perf_counter() - t0

    # Greedy ids on fixed prompts (seeded separately so every backend run sees the same ones).
    grng = random.Random(42)
    greedy_prompts = [TokensPrompt(prompt_token_ids=[grng.randrange(1000, vocab - 1000) for _ in range(n)])
                      for n in (17, 300, 2048, 5000)]
    sp = SamplingParams(temperature=0.0, max_tokens=args.greedy_tokens, detokenize=False)
    greedy = [list(o.outputs[0].token_ids) for o in llm.generate(greedy_prompts, sp, use_tqdm=False)]

    for n in lengths:  # warm-up of every shape before timing
        timed(prompt(n), 1)
    ttft = {str(n): [timed(prompt(n), 1) for _ in range(args.repeats)] for n in lengths}
    tpot = {}
    for n in lengths[:1] + ([lengths[-1]] if len(lengths) > 1 else []):
        runs = []
        for _ in range(args.repeats):
            p = prompt(n)
            t1 = timed(p, 1)
            tn = timed(p, 1 + args.tpot_tokens)
            runs.append((tn - t1) / args.tpot_tokens)
        tpot[str(n)] = runs
    import vllm

    harness.emit_result({"backend": args.backend, "attention_impls": impls, "ttft_s": ttft, "tpot_s": tpot,
                         "greedy": greedy, "device": harness.device_name(), "vllm": vllm.__version__})


def run_backend(args: argparse.Namespace, backend: str) -> dict:
    env = harness.engine_env(vanilla=backend != "CUSTOM")  # vanilla vLLM: kvplug not even loaded
    worker_args = ["--model-dir", args.model_dir, "--shape", args.shape, "--lengths", args.lengths,
                   "--repeats", str(args.repeats), "--tpot-tokens", str(args.tpot_tokens),
                   "--greedy-tokens", str(args.greedy_tokens), "--gpu-mem", str(args.gpu_mem)]
    return harness.run_worker("benchmarks.gpu_passthrough", backend, worker_args, env)


def summarize(runs: list[dict]) -> dict:
    by = {}
    for r in runs:
        by.setdefault(r["backend"], []).append(r)
    base, ours = by.get("FLASH_ATTN", []), by.get("CUSTOM", [])
    out: dict = {"device": runs[0]["device"], "vllm": runs[0]["vllm"], "order": [r["backend"] for r in runs],
                 "attention_impls": {r["backend"]: r.get("attention_impls") for r in runs}}
    out["greedy_identical"] = bool(base and ours) and all(r["greedy"] == base[0]["greedy"] for r in base + ours)
    for metric in ("ttft_s", "tpot_s"):
        table = {}
        for n in base[0][metric]:
            b = statistics.median([x for r in base for x in r[metric][n]])
            o = statistics.median([x for r in ours for x in r[metric][n]])
            table[n] = {"flash_attn": b, "kvplug": o, "overhead_pct": 100 * (o / b - 1),
                        "flash_attn_runs": [statistics.median(r[metric][n]) for r in base],
                        "kvplug_runs": [statistics.median(r[metric][n]) for r in ours]}
        out[metric] = table
    return out


def main(argv: list[str] | None = None) -> int:
    p = harness.shape_parser("benchmarks.gpu_passthrough", __doc__, "results/gpu_passthrough.json",
                             backends="FLASH_ATTN,CUSTOM,FLASH_ATTN,CUSTOM")
    p.add_argument("--lengths", default="8192,32768")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tpot-tokens", type=int, default=128)
    p.add_argument("--greedy-tokens", type=int, default=32)
    p.add_argument("--merge", action="append", default=[], metavar="JSON",
                   help="earlier output of this script whose runs join this summary (same device and shape)")
    args = harness.parse_shape_args(p, argv, _worker)
    if args is None:
        return 0
    runs = [run for path in args.merge for run in json.loads(Path(path).read_text())["runs"]]
    runs += [run_backend(args, b) for b in args.backends.split(",") if b]
    summary = summarize(runs)
    harness.write_results(args.out, harness.command_line("benchmarks.gpu_passthrough", argv), summary, runs)
    print(f"device: {summary['device']}  vLLM {summary['vllm']}  greedy identical: {summary['greedy_identical']}")
    print(f"attention impls: {summary['attention_impls']}")
    harness.print_metric_rows(summary, ("ttft_s", "tpot_s"), lambda metric, n, row: (
        f"{metric:7s} {n:>7s}  FLASH_ATTN {row['flash_attn']*1e3:9.2f} ms  kvplug {row['kvplug']*1e3:9.2f} ms"
        f"  overhead {row['overhead_pct']:+.2f}%"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
