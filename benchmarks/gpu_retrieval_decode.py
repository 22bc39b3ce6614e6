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
Each backend runs in its own subprocess, in the order given by --backends. Both get the same KV-cache size
(--kv-cache-gib, per GPU; the block summaries of the retrieval backend, 1/16 of the KV bytes, live outside it).
--tensor-parallel-size N [--distributed-executor-backend mp|ray] runs every engine (baseline and kvplug alike) on
N GPUs; the summary records both (tensor_parallel_size, distributed_executor_backend; each engine's `engine` facts
say which executor vLLM really took), and kvplug's retrieval counters are rank 0's (each rank holds 1/N of the KV
heads and takes the same decisions per token).

Checks written into the JSON (and printed): which cudagraph mode the engine really ran; whether the
retrieval path ran in the CUSTOM run (tokens decoded by retrieval, fraction of KV read, layers holding block
summaries) -- a CUSTOM run that decoded everything densely is reported as "FELL BACK TO DENSE" and the
script exits with status 3; whether the prefix cache held the prompts between the timed calls (if not, the
timed calls re-prefilled and the numbers are not decode numbers).

--variant LABEL:KEY=VALUE[,...] adds a kvplug run with more retrieval_decode keys (its own speedups in the same
table), e.g. the graph's dense path beside the measured break-even:
    python -m benchmarks.gpu_retrieval_decode --phases tpot --lengths 8192,32768,131072 --repeats 2 \
        --kv-cache-gib 24 --set break_even=measured --variant dense_path:graph_dense_path=true
or the KV write and summary update in two launches (the default fuses them: fused_kv_write) beside the default:
    python -m benchmarks.gpu_retrieval_decode --phases tpot --lengths 32768,131072 --repeats 2 \
        --kv-cache-gib 24 --variant two_launch_write:fused_kv_write=false
``fused_kv_write_layers`` (per kvplug run) counts the layers whose KV writes went through the fused launch: the
layer count with fused_kv_write on, 0 with it off (or on a cache it does not apply to: fp8 KV).

To localize a device-side failure in the same batch: --enforce-eager (no torch.compile, no graphs),
--cudagraph-mode NONE|PIECEWISE|FULL_DECODE_ONLY|FULL_AND_PIECEWISE, --launch-blocking (CUDA_LAUNCH_BLOCKING=1).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from benchmarks import harness


def _worker(args: argparse.Namespace) -> None:
    import random

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    phases = args.phases.split(",")
    lengths = [int(x) for x in args.lengths.split(",")] if "tpot" in phases else []
    llm = LLM(**engine_kwargs(args))
    impls = harness.attention_impls(llm)
    engine = harness.engine_facts(llm)
    print(f"[{args.backend}] engine: {engine}", file=sys.stderr, flush=True)
    rng = random.Random(1234)
    vocab = harness.model_config(args.model_dir)["vocab_size"]

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

    def reset_stats():
        if args.backend == "CUSTOM":
            from attention_backends.retrieval_decode import runner

            llm.collective_rpc(runner.stats_reset)

    def measure(ps) -> dict:
        """Prefill once (the prefix cache keeps it), then 1 and 1 + N tokens from the cache."""
        prefill = timed(ps, 1)
        t1 = timed(ps, 1)
        tn = timed(ps, 1 + n_dec)
        return {"prefill_s": prefill, "t1_s": t1, "tn_s": tn}

    n_dec = args.decode_tokens
    result: dict = {"backend": args.backend, "attention_impls": impls, "engine": engine, "tpot_s": {},
                    "throughput_tok_s": {}, "timings": {}, "stats": {}}
    timed([prompt(512)], 4)  # warm-up
    reset_stats()
    for n in lengths:
        runs = [measure([prompt(n)]) for _ in range(args.repeats)]
        result["timings"][str(n)] = runs
        result["tpot_s"][str(n)] = [(r["tn_s"] - r["t1_s"]) / n_dec for r in runs]
    if lengths:
        result["stats"]["tpot"] = stats()
    if "throughput" in phases:
        reset_stats()
        key = f"{args.batch}x{args.batch_len}"
        runs = [measure([prompt(args.batch_len) for _ in range(args.batch)]) for _ in range(args.repeats)]
        result["timings"][key] = runs
        result["throughput_tok_s"][key] = [args.batch * n_dec / (r["tn_s"] - r["t1_s"]) for r in runs]
        result["stats"]["throughput"] = stats()
    import vllm

    result.update(device=harness.device_name(cpu="cpu (dry run)"), vllm=vllm.__version__)
    harness.emit_result(result)


def engine_kwargs(args: argparse.Namespace) -> dict:
    """LLM(...) arguments of a worker's engine (FLASH_ATTN and kvplug alike: only attention_backend differs)."""
    phases = args.phases.split(",")
    lengths = [int(x) for x in args.lengths.split(",")] if "tpot" in phases else []
    longest = max(lengths + ([args.batch_len] if "throughput" in phases else []))
    kw = harness.engine_memory_kwargs(args.kv_cache_gib, args.gpu_mem)
    if args.cudagraph_mode:
        kw["compilation_config"] = {"cudagraph_mode": args.cudagraph_mode}
    if args.enforce_eager:
        kw["enforce_eager"] = True
    return dict(model=args.model_dir, load_format="dummy", skip_tokenizer_init=True, seed=0,
                attention_backend=args.backend, max_model_len=longest + args.decode_tokens + 64,
                enable_prefix_caching=True, max_num_seqs=max(16, args.batch), **kw, **harness.parallel_kwargs(args))


PARENT_ONLY = ("--backends", "--out", "--variant")


def parse_variant(text: str) -> tuple[str, list[str]]:
    """--variant LABEL:KEY=VALUE[,KEY=VALUE...] -> (label, ["KEY=VALUE", ...])."""
    label, sep, pairs = text.partition(":")
    keys = [p.strip() for p in pairs.split(",") if p.strip()]
    if not sep or not label.strip() or not keys:
        raise SystemExit(f"--variant {text!r}: expected LABEL:KEY=VALUE[,KEY=VALUE...] (retrieval_decode keys)")
    return label.strip(), keys


def run_backend(args: argparse.Namespace, backend: str, argv: list[str], extra_set: list[str] = ()) -> dict:
    env = harness.engine_env(vanilla=backend != "CUSTOM", clear_config=backend == "CUSTOM")
    if args.launch_blocking:  # a device-side assert then names the kernel that raised it
        env["CUDA_LAUNCH_BLOCKING"] = "1"
    if backend == "CUSTOM":
        env.update(harness.kvplug_env("retrieval_decode", enabled=True, budget_tokens=args.budget_tokens,
                                      budget_fraction=args.budget_fraction, min_context_tokens=args.min_context,
                                      **harness.set_pairs([*args.rd_set, *extra_set], "retrieval_decode")))
    return harness.run_worker("benchmarks.gpu_retrieval_decode", backend,
                              ["--model-dir", args.model_dir, *harness.worker_argv(argv, PARENT_ONLY)], env)


def summarize(runs: list[dict]) -> dict:
    """Speedups of the CUSTOM run over FLASH_ATTN per metric and key; runs labelled ``variant`` (--variant: more
    CUSTOM runs with other retrieval_decode keys) get their own speedups in each row's ``variants``."""
    by: dict = {}
    variants: dict = {}
    for r in runs:
        if r.get("variant"):
            variants.setdefault(r["variant"], []).append(r)
        else:
            by.setdefault(r["backend"], []).append(r)
    base, ours = by.get("FLASH_ATTN", []), by.get("CUSTOM", [])
    out: dict = {"device": runs[0]["device"], "vllm": runs[0]["vllm"], "order": [r["backend"] for r in runs],
                 "attention_impls": {r["backend"]: r.get("attention_impls") for r in runs},
                 "engine": {r["backend"]: r.get("engine") for r in runs}}
    if ours:
        out["retrieval_stats"] = {phase: dict(s, fraction_kv_read=(s["blocks_read"] / s["blocks_total"])
                                              if s and s["blocks_total"] else None)
                                  for phase, s in (ours[-1].get("stats") or {}).items()}
        out["retrieval_path"] = retrieval_verdict(ours[-1])
    out["fused_kv_write_layers"] = {_label(r): fused_write_layers(r) for r in runs if r["backend"] == "CUSTOM"}
    if variants:
        out["variant_retrieval_path"] = {label: retrieval_verdict(rs[-1]) for label, rs in variants.items()}
        out["variant_retrieval_stats"] = {label: rs[-1].get("stats") for label, rs in variants.items()}
    out["prefix_cache_held"] = {f"{_label(r)} {key}": all(t["t1_s"] < 0.5 * t["prefill_s"] for t in ts)
                                for r in runs for key, ts in (r.get("timings") or {}).items()}

    def median(rs, metric, key):
        return statistics.median([x for r in rs for x in r[metric][key]]) if rs else None

    for metric, better in (("tpot_s", "lower"), ("throughput_tok_s", "higher")):
        table = {}
        for key in (base or ours or next(iter(variants.values())))[0][metric]:
            b = median(base, metric, key)

            def speedup(o):
                if not (b and o):
                    return None
                return b / o if better == "lower" else o / b
            o = median(ours, metric, key)
            table[key] = {"flash_attn": b, "kvplug": o, "speedup": speedup(o)}
            if variants:
                table[key]["variants"] = {label: {"kvplug": median(rs, metric, key),
                                                  "speedup": speedup(median(rs, metric, key))}
                                          for label, rs in variants.items()}
        out[metric] = table
    return out


def fused_write_layers(run: dict) -> int | None:
    """Layers of a kvplug run whose KV writes took the fused launch (retrieval_decode.fused_kv_write), from its
    last phase's statistics; None if the worker reported none."""
    counts = [s.get("fused_kv_write_layers") for s in (run.get("stats") or {}).values() if s]
    return counts[-1] if counts else None


def _label(run: dict) -> str:
    return f"{run['backend']}[{run['variant']}]" if run.get("variant") else run["backend"]


def gpu_total_gib() -> float | None:
    """Memory of GPU 0 from nvidia-smi (no CUDA context in this parent process), or None."""
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=30).stdout
        return float(out.split()[0]) / 1024
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None


def auto_kv_cache_gib(args: argparse.Namespace, config_json: Path, total_gib: float | None,
                      tensor_parallel_size: int = 1) -> float:
    """KV space per GPU (vLLM's kv_cache_memory_bytes is per GPU) for the largest phase (+10%), capped so the
    GPU's share of the weights, the retrieval backend's block summaries (1/16 of the KV bytes at bf16 and block
    size 16), activations and graphs still fit. With tensor parallelism each GPU holds kv_heads / N of the KV
    heads (one, replicated, when N exceeds them) and ~1/N of the weights. If the cap wins, the throughput phase
    cannot keep every sequence resident: the JSON's prefix_cache_held says so."""
    c = harness.model_config(config_json.parent)
    layers, hidden, kv_heads = c["num_hidden_layers"], c["hidden_size"], c["num_key_value_heads"]
    head_dim = c.get("head_dim") or hidden // c["num_attention_heads"]
    kv_per_token = harness.kv_bytes_per_token(c) * max(1, kv_heads // tensor_parallel_size) / kv_heads
    weights = 2 * (c["vocab_size"] * hidden * (1 if c.get("tie_word_embeddings") else 2)
                   + layers * (2 * hidden * hidden + 2 * hidden * kv_heads * head_dim
                               + 3 * hidden * c["intermediate_size"]))
    phases = args.phases.split(",")
    tokens = max(([int(x) for x in args.lengths.split(",")] if "tpot" in phases else [0])
                 + ([args.batch * args.batch_len] if "throughput" in phases else [0]))
    need = 1.1 * (tokens + args.batch * (args.decode_tokens + 64)) * kv_per_token / (1 << 30)
    if total_gib is None:
        return round(need, 1)
    room = (0.92 * total_gib - weights / tensor_parallel_size / (1 << 30) - 6.0) / (1 + 1 / 16)
    return round(max(4.0, min(need, room)), 1)


def retrieval_verdict(run: dict) -> str:
    """'ran' only if the CUSTOM run decoded tokens by retrieval in every phase and its layers hold summaries."""
    impls = run.get("attention_impls") or []
    if not any("KvplugAttentionImpl" in c for c in impls):
        return f"FELL BACK TO DENSE: attention impls are {impls}, not kvplug's"
    stats = run.get("stats") or {}
    if not stats:
        return "FELL BACK TO DENSE: no retrieval statistics came back from the worker"
    for phase, s in stats.items():
        if not s or not s.get("summary_layers"):
            return f"FELL BACK TO DENSE ({phase}): no layer allocated block summaries"
        if not s.get("sparse_tokens"):
            return (f"FELL BACK TO DENSE ({phase}): 0 tokens decoded by retrieval, "
                    f"{s.get('dense_decode_tokens')} decoded densely")
    return "ran"


def main(argv: list[str] | None = None) -> int:
    p = harness.shape_parser("benchmarks.gpu_retrieval_decode", __doc__, "results/gpu_retrieval_decode.json")
    p.add_argument("--phases", default="tpot,throughput")
    p.add_argument("--lengths", default="32768,131072", help="TPOT context lengths (batch 1)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--batch-len", type=int, default=32768)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--budget-tokens", type=int, default=2048, help="retrieval budget (tokens per kv-head)")
    p.add_argument("--budget-fraction", type=float, default=0.0, help="if > 0, budget as a fraction of the context")
    p.add_argument("--min-context", type=int, default=4096)
    p.add_argument("--set", dest="rd_set", action="append", default=[], metavar="KEY=VALUE",
                   help="another retrieval_decode key for the kvplug run (repeatable), e.g. --set group_blocks=4")
    p.add_argument("--variant", action="append", default=[], metavar="LABEL:KEY=VALUE[,KEY=VALUE]",
                   help="one more kvplug run after --backends, with these retrieval_decode keys on top of --set "
                        "(repeatable), e.g. --variant dense_path:graph_dense_path=true")
    p.add_argument("--kv-cache-gib", type=float, default=None,
                   help="KV cache per GPU of every engine (vLLM's kv_cache_memory_bytes, per GPU: with "
                        "--tensor-parallel-size N each GPU holds this much for its 1/N of the KV heads; the same "
                        "for every backend: fair); default: what the prompts need per GPU, capped by the GPU's "
                        "memory; 0 = let vLLM size it by --gpu-mem")
    p.add_argument("--cudagraph-mode", default=None, help="e.g. FULL_AND_PIECEWISE (default: vLLM's)")
    p.add_argument("--enforce-eager", action="store_true", help="no torch.compile, no CUDA graphs (localizing)")
    p.add_argument("--launch-blocking", action="store_true", help="CUDA_LAUNCH_BLOCKING=1 in the engines")
    harness.add_parallel_args(p)
    args = harness.parse_shape_args(p, argv, _worker)
    if args is None:
        return 0
    harness.check_parallel_args(args)
    argv = list(argv if argv is not None else sys.argv[1:])
    if args.kv_cache_gib is None:
        args.kv_cache_gib = auto_kv_cache_gib(args, Path(args.model_dir) / "config.json", gpu_total_gib(),
                                              args.tensor_parallel_size)
        argv += ["--kv-cache-gib", f"{args.kv_cache_gib:.1f}"]
    kv = f"{args.kv_cache_gib:.1f} GiB" if args.kv_cache_gib else f"vLLM's, by --gpu-mem {args.gpu_mem}"
    print(f"[gpu_retrieval_decode] {harness.parallel_label(harness.parallel_facts(args))}, KV cache per GPU of each "
          f"engine: {kv}", file=sys.stderr, flush=True)
    runs = [run_backend(args, b, argv) for b in args.backends.split(",") if b]
    for label, keys in (parse_variant(v) for v in args.variant):
        runs.append(dict(run_backend(args, "CUSTOM", argv, keys), variant=label))
    summary = {**harness.parallel_facts(args), **summarize(runs)}
    harness.write_results(args.out, harness.command_line("benchmarks.gpu_retrieval_decode", argv), summary, runs)
    print(f"device: {summary['device']}  {harness.parallel_label(summary)}  vLLM {summary['vllm']}")
    print(f"attention impls: {summary['attention_impls']}")
    print(f"engines: {summary['engine']}")
    print(f"retrieval path: {summary.get('retrieval_path')}  stats: {summary.get('retrieval_stats')}")
    print(f"prefix cache held the prompts between timed calls: {summary['prefix_cache_held']}")
    print(f"layers writing KV through the fused launch (fused_kv_write): {summary['fused_kv_write_layers']}")
    harness.print_metric_rows(summary, ("tpot_s", "throughput_tok_s"), lambda metric, key, row: (
        f"{metric:17s} {key:>10s}  FLASH_ATTN {row['flash_attn']}  kvplug {row['kvplug']}  speedup {row['speedup']}"
        + "".join(f"  [{label}] {v['kvplug']} speedup {v['speedup']}" for label, v in row.get("variants", {}).items())))
    for label, verdict in summary.get("variant_retrieval_path", {}).items():
        print(f"retrieval path [{label}]: {verdict}  stats: {summary['variant_retrieval_stats'][label]}")
    if summary.get("retrieval_path", "ran") != "ran":
        print(f"WARNING: {summary['retrieval_path']}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
