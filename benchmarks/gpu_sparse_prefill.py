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
`--profile second` (or `both`) adds one more two-turn conversation, profiled in the engine's worker (torch.profiler:
GPU busy/idle time, kernel time by family, top kernels, host calls that wait for the GPU), to attribute the turns'
time on the device in the same run; the timed figures exclude it.
--tensor-parallel-size N [--distributed-executor-backend mp|ray] runs every engine (FLASH_ATTN and kvplug alike)
on N GPUs; the summary records both (tensor_parallel_size, distributed_executor_backend; each engine's `engine`
facts say which executor vLLM really took). kvplug's counters and the profile are rank 0's (1/N of the heads).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

from benchmarks import harness


def _worker(args: argparse.Namespace) -> None:
    import random

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    lengths = [int(x) for x in args.lengths.split(",")]
    started = time.perf_counter()
    llm = LLM(**engine_kwargs(args))
    start_s = time.perf_counter() - started  # engine start (compiled_index: the index build's compile inside)
    impls = harness.attention_impls(llm)
    ours = args.backend == "CUSTOM"
    if ours:
        from attention_backends.sparse_prefill.runner import stats_snapshot

        stats = lambda: llm.collective_rpc(stats_snapshot)[0]  # noqa: E731
    rng = random.Random(1234)
    vocab = harness.SHAPES[args.shape]["vocab_size"]

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
    def decisions(before: dict, after: dict) -> dict[str, int]:
        """Prefill chunks by sparse prefill's "decision/reason" between two snapshots."""
        a, b = after.get("chunks", {}), before.get("chunks", {})
        return {k: a[k] - b.get(k, 0) for k in a if a[k] != b.get(k, 0)}

    def executors(before: dict, after: dict) -> dict[str, int]:
        """Chunk-layers by executor (sparse_prefill.executor): FA2 sparse, and ones that asked for it but ran triton."""
        return {k: after.get(k, 0) - before.get(k, 0) for k in ("fa2_sparse_layer_calls", "executor_fallback_layer_calls")}

    ttft, dens, chunks, execs = {}, {}, {}, {}
    for n in lengths:
        before = stats() if ours else None
        ttft[str(n)] = [timed(tokens(n))[0] for _ in range(args.repeats)]
        if ours:
            after = stats()
            dens[str(n)], chunks[str(n)] = density(before, after), decisions(before, after)
            execs[str(n)] = executors(before, after)
    turn = {}
    if args.turn_length:
        # --repeats fresh conversations: one sample of a ~200 ms second turn is at the mercy of a stray JIT or a
        # host hiccup; the median over repeats is what the summary compares.
        firsts, seconds, cached_all, sparse_tokens, dens2, chunks2 = [], [], [], [], [], {}
        for _ in range(max(1, args.repeats)):
            first = tokens(args.turn_length)
            firsts.append(timed(first)[0])
            before = stats() if ours else None
            t2, cached = timed(first + tokens(args.suffix))
            seconds.append(t2)
            cached_all.append(cached)
            if ours:
                after = stats()
                sparse_tokens.append(after["sparse_tokens"] - before["sparse_tokens"])
                dens2.append(density(before, after))
                for k, v in decisions(before, after).items():
                    chunks2[k] = chunks2.get(k, 0) + v
        turn = {"turn_length": args.turn_length, "suffix": args.suffix, "first_ttft_s": statistics.median(firsts),
                "second_ttft_s": statistics.median(seconds), "second_ttft_samples_s": seconds,
                "second_cached_tokens": min(cached_all)}
        if ours:
            turn["second_sparse_tokens"] = sum(sparse_tokens)
            turn["second_density"] = dens2[-1]
            turn["second_chunks"] = chunks2
        if args.profile != "none":
            turn["profile"] = _profiled_conversation(llm, args, tokens, timed)
    import vllm

    harness.emit_result({"backend": args.backend, "attention_impls": impls, "ttft_s": ttft, "density": dens,
                         "chunks": chunks, "executor_calls": execs, "engine": harness.engine_facts(llm),
                         "engine_start_s": start_s, "index_warm_up": stats()["warm_up"] if ours else None,
                         "two_turn": turn, "device": harness.device_name(), "vllm": vllm.__version__})


def engine_kwargs(args: argparse.Namespace) -> dict:
    """LLM(...) arguments of a worker's engine (FLASH_ATTN and kvplug alike: only attention_backend differs)."""
    longest = max([int(x) for x in args.lengths.split(",")] + [args.turn_length + args.suffix])
    return dict(model=args.model_dir, load_format="dummy", skip_tokenizer_init=True, seed=0,
                attention_backend=args.backend, max_model_len=longest + 64, enable_prefix_caching=True,
                gpu_memory_utilization=args.gpu_mem, max_num_seqs=4,
                **({"max_num_batched_tokens": args.max_batched_tokens} if args.max_batched_tokens else {}),
                **harness.parallel_kwargs(args))


def _profiled_conversation(llm, args: argparse.Namespace, tokens, timed) -> dict:
    """One more two-turn conversation (not in the medians), torch.profiler on in the engine's worker around the
    second turn (--profile second) or each turn (--profile both): where each turn's time went on the GPU."""
    out = {}
    first = tokens(args.turn_length)
    for name, ids in (("first_turn", first), ("second_turn", first + tokens(args.suffix))):
        if name == "first_turn" and args.profile != "both":
            timed(ids)
            continue
        llm.collective_rpc(harness.profile_start)
        wall_s = timed(ids)[0]
        out[name] = {"ttft_s": wall_s, **llm.collective_rpc(harness.profile_stop, kwargs={"top": args.profile_top})[0]}
    return out


DEFAULTS = "KVPLUG_DEFAULTS"  # --with-defaults: kvplug as shipped (only sparse prefill on and the pattern set)


def run_backend(args: argparse.Namespace, backend: str) -> dict:
    if backend == DEFAULTS:
        env = harness.engine_env(vanilla=False)
        env.update(harness.kvplug_env("sparse_prefill", enabled=True, default_pattern=args.pattern,
                                      default_budgets=args.budgets))
        return {**_run(args, "CUSTOM", env), "backend": DEFAULTS}
    env = harness.engine_env(vanilla=backend != "CUSTOM")
    if backend == "CUSTOM":
        env.update(harness.kvplug_env("sparse_prefill", enabled=True, cost_table=args.cost_table,
                                      default_pattern=args.pattern, default_budgets=args.budgets,
                                      **({"min_prompt_tokens": args.min_prompt_tokens} if args.min_prompt_tokens else {}),
                                      **({"pattern_config": args.pattern_config} if args.pattern_config else {}),
                                      **harness.set_pairs(args.sparse_set, "sparse_prefill")))
    return _run(args, backend, env)


def _run(args: argparse.Namespace, backend: str, env: dict) -> dict:
    worker_args = ["--model-dir", args.model_dir, "--shape", args.shape, "--lengths", args.lengths,
                   "--repeats", str(args.repeats), "--gpu-mem", str(args.gpu_mem), "--turn-length", str(args.turn_length),
                   "--suffix", str(args.suffix), "--max-batched-tokens", str(args.max_batched_tokens),
                   "--profile", args.profile, "--profile-top", str(args.profile_top), *harness.parallel_argv(args)]
    return harness.run_worker("benchmarks.gpu_sparse_prefill", backend, worker_args, env)


def summarize(runs: list[dict]) -> dict:
    by: dict[str, list[dict]] = {}
    for r in runs:
        by.setdefault(r["backend"], []).append(r)
    # One side alone (--backends CUSTOM: a check that the sparse path runs) leaves the other's figures None.
    base, ours, shipped = by.get("FLASH_ATTN", []), by.get("CUSTOM", []), by.get(DEFAULTS, [])
    table = {}
    for n in (base or ours or shipped)[0]["ttft_s"]:
        b = statistics.median([x for r in base for x in r["ttft_s"][n]]) if base else None
        o = statistics.median([x for r in ours for x in r["ttft_s"][n]]) if ours else None
        table[n] = {"flash_attn_s": b, "kvplug_s": o, "speedup": b / o if b and o else None}
        if shipped:  # --with-defaults: kvplug as shipped, the figure the --set configuration must beat
            d = statistics.median([x for r in shipped for x in r["ttft_s"][n]])
            table[n].update(defaults_s=d, defaults_speedup=b / d if b else None,
                            speedup_vs_defaults=d / o if o else None, defaults_density=shipped[-1]["density"].get(n),
                            defaults_chunks=shipped[-1].get("chunks", {}).get(n))
        table[n].update({
            "density": ours[-1]["density"].get(n) if ours else None,
            "chunks": ours[-1].get("chunks", {}).get(n) if ours else None,
            "executor_calls": ours[-1].get("executor_calls", {}).get(n) if ours else None})
    out = {"device": runs[0]["device"], "vllm": runs[0]["vllm"], "ttft": table,
           "engine_start_s": {r["backend"]: r.get("engine_start_s") for r in runs},
           "index_warm_up": ours[-1].get("index_warm_up") if ours else None,
           "attention_impls": {r["backend"]: r["attention_impls"] for r in runs}}
    if base and ours and base[0]["two_turn"]:
        bt = statistics.median(r["two_turn"]["second_ttft_s"] for r in base)
        ot = statistics.median(r["two_turn"]["second_ttft_s"] for r in ours)
        out["two_turn"] = {"flash_attn_second_ttft_s": bt, "kvplug_second_ttft_s": ot, "speedup": bt / ot,
                           "kvplug": ours[-1]["two_turn"], "flash_attn": base[-1]["two_turn"]}
    profiles = {r["backend"]: r["two_turn"]["profile"] for r in runs if r.get("two_turn", {}).get("profile")}
    if profiles:
        out["profile"] = {turn: {b: harness.profile_digest(p[turn]) for b, p in profiles.items() if turn in p}
                          for turn in ("first_turn", "second_turn")}
    return out


def main(argv: list[str] | None = None) -> int:
    p = harness.shape_parser("benchmarks.gpu_sparse_prefill", __doc__, "benchmarks/results/gpu_sparse_prefill.json")
    p.add_argument("--lengths", default="8192,32768,65536,131072")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--turn-length", type=int, default=131072 - 1024, help="two-turn case: first turn tokens (0: skip)")
    p.add_argument("--suffix", type=int, default=1024, help="two-turn case: new tokens of the second turn")
    p.add_argument("--min-prompt-tokens", type=int, default=0, help="sparse prefill's floor (0: kvplug's default, "
                   "8192 with a cost table, 32768 without; 8192 with --cost-table none reproduces the first H100 run)")
    p.add_argument("--cost-table", default="auto", help="sparse_prefill.cost_table: auto (the shipped table for "
                   "the GPU), a file, or none (every chunk past the floor goes sparse: the pre-cost-model rule)")
    p.add_argument("--pattern", default="vertical_slash")
    p.add_argument("--budgets", default='{"vertical": 1000, "slash": 1024}')
    p.add_argument("--pattern-config", default="", help="per-head JSON instead of --pattern/--budgets")
    p.add_argument("--max-batched-tokens", type=int, default=0, help="engine chunk size (0: vLLM's default)")
    p.add_argument("--profile", choices=("none", "second", "both"), default="none",
                   help="after the timed repeats, one more two-turn conversation with torch.profiler on in the "
                        "engine's worker around its second turn (or both turns): GPU busy/idle time, kernel time "
                        "by family, top kernels, host calls that wait for the GPU, kvplug's own ranges")
    p.add_argument("--profile-top", type=int, default=25, help="kernels and CPU ops listed per profiled turn")
    p.add_argument("--set", dest="sparse_set", action="append", default=[], metavar="KEY=VALUE",
                   help="another sparse_prefill key for the kvplug run (repeatable), e.g. --set "
                        "group_shared_selection=true --set fused_estimate=true --set executor=fa2_sparse")
    p.add_argument("--with-defaults", action="store_true", help="also run kvplug as shipped (sparse prefill on, "
                   "--pattern/--budgets, every other key its default; --set, --cost-table and --min-prompt-tokens "
                   "not applied) in the same run: TTFT per length beside FLASH_ATTN and the --set configuration")
    harness.add_parallel_args(p)
    args = harness.parse_shape_args(p, argv, _worker)
    if args is None:
        return 0
    harness.check_parallel_args(args)
    print(f"[gpu_sparse_prefill] {harness.parallel_label(harness.parallel_facts(args))}", file=sys.stderr, flush=True)
    runs = [run_backend(args, b) for b in args.backends.split(",") if b]
    if args.with_defaults:
        runs.append(run_backend(args, DEFAULTS))
    summary = {**harness.parallel_facts(args), **summarize(runs)}
    harness.write_results(args.out, harness.command_line("benchmarks.gpu_sparse_prefill", argv), summary, runs)
    print_summary(summary)
    return 0


def print_summary(summary: dict) -> None:
    print(f"device: {summary['device']}  {harness.parallel_label(summary)}  vLLM {summary['vllm']}  "
          f"engine start {summary.get('engine_start_s')}  index warm-up {summary.get('index_warm_up')}")
    ms = lambda s: f"{s * 1e3:9.1f} ms" if s is not None else "        -"  # noqa: E731
    harness.print_metric_rows(summary, ("ttft",), lambda _, n, row: (
        f"TTFT {n:>7s}  FLASH_ATTN {ms(row['flash_attn_s'])}  kvplug {ms(row['kvplug_s'])}"
        f"  speedup {row['speedup'] and round(row['speedup'], 2)}x  density {row['density']}  chunks {row.get('chunks')}"
        f"  executor {row.get('executor_calls')}"
        + (f"  | shipped defaults {ms(row['defaults_s'])} ({row['defaults_speedup'] and round(row['defaults_speedup'], 2)}x)"
           f"  --set vs defaults {row['speedup_vs_defaults'] and round(row['speedup_vs_defaults'], 2)}x"
           if "defaults_s" in row else "")))
    if "two_turn" in summary:
        t = summary["two_turn"]
        print(f"second turn (prefix hit): FLASH_ATTN {t['flash_attn_second_ttft_s']*1e3:.1f} ms  kvplug "
              f"{t['kvplug_second_ttft_s']*1e3:.1f} ms  sparse tokens {t['kvplug'].get('second_sparse_tokens')}"
              f"  cached {t['kvplug'].get('second_cached_tokens')}  chunks {t['kvplug'].get('second_chunks')}")
    for turn, by_backend in summary.get("profile", {}).items():
        for backend, p in by_backend.items():
            print(f"profile {turn} {backend:10s}: TTFT {p['ttft_s']*1e3:.1f} ms  window {p['window_ms']:.1f} ms  GPU busy "
                  f"{p['gpu_busy_ms']:.1f} ms  idle {p['gpu_idle_ms']:.1f} ms  kernels {p['kernel_ms_by_group']}")
            print(f"    host waits {p['host_waits']}  kvplug ranges {p['kvplug_ranges']}")
            for k in p["top_kernels"][:5]:
                print(f"    {k['ms']:9.2f} ms  x{k['calls']:<5d} {k['name'][:110]}")


if __name__ == "__main__":
    sys.exit(main())
