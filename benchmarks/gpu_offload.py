"""Follow-up-turn TTFT when shared contexts do not all fit in the GPU KV cache (H100, vLLM 0.26 staged).

N contexts of L tokens (random token ids, Llama-3-8B shape, load_format="dummy"); turn 1 prefills every
context once (so later contexts evict earlier ones from vLLM's GPU prefix cache), turn 2 asks a short
follow-up on each context in the same order (max_tokens=1) and times it: that is the follow-up TTFT.
Modes, each in its own subprocess with the same engine flags:
  none        no offload (evicted contexts are recomputed)
  native      vLLM's --kv-offloading-size (OffloadingConnector) with the same CPU budget
  keep/int8/int4/fp8   kvplug's connector (offload/connector.py) with that cache policy

    python -m benchmarks.gpu_offload --contexts 32 --context-tokens 32768 --cpu-gib 64 \
        --gpu-mem 0.5 --modes none,native,keep,int8,int4 --out benchmarks/results/gpu_offload_h100.json

Pick --gpu-mem so about 8 contexts fit (the script prints vLLM's KV-cache capacity in tokens per mode).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.gpu_passthrough import SHAPES, write_shape

POLICY = {"keep": "keep", "int8": "quant:int8", "int4": "quant:int4", "fp8": "quant:fp8"}


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def _worker(args: argparse.Namespace) -> None:
    import random

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from kvplug import vllm_compat

    kw = {}
    if args.mode == "native":
        kw["kv_offloading_size"] = args.cpu_gib
    elif args.mode in POLICY:
        from vllm.config import KVTransferConfig

        kw["kv_transfer_config"] = KVTransferConfig(**vllm_compat.kv_transfer_config())
    llm = LLM(model=args.model_dir, load_format="dummy", skip_tokenizer_init=True, seed=0,
              max_model_len=args.context_tokens + 256, enable_prefix_caching=True,
              gpu_memory_utilization=args.gpu_mem, max_num_seqs=8, **kw)
    rng = random.Random(7)
    contexts = [[rng.randrange(1000, 120000) for _ in range(args.context_tokens)] for _ in range(args.contexts)]
    sp = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)

    def ask(ctx: list[int], turn: int) -> float:
        suffix = [rng.randrange(1000, 120000) for _ in range(32 + turn)]
        t0 = time.perf_counter()
        llm.generate([TokensPrompt(prompt_token_ids=ctx + suffix)], sp, use_tqdm=False)
        return time.perf_counter() - t0

    first = [ask(c, 1) for c in contexts]
    follow = [ask(c, 2) for c in contexts]
    print("RESULT " + json.dumps({"mode": args.mode, "first_turn_ttft_s": first, "follow_up_ttft_s": follow,
                                  "follow_up_p50_s": statistics.median(follow),
                                  "follow_up_p99_s": _percentile(follow, 0.99)}), flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-shape", default="llama-3-8b", choices=sorted(SHAPES))
    ap.add_argument("--contexts", type=int, default=32)
    ap.add_argument("--context-tokens", type=int, default=32768)
    ap.add_argument("--cpu-gib", type=float, default=64.0, help="CPU budget (same for native and kvplug)")
    ap.add_argument("--gpu-mem", type=float, default=0.5)
    ap.add_argument("--modes", default="none,native,keep,int8,int4")
    ap.add_argument("--out", default="benchmarks/results/gpu_offload.json")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        _worker(args)
        return 0
    model_dir = write_shape(args.model_shape, Path(tempfile.mkdtemp(prefix="kvplug-shape-")))
    results = []
    for mode in args.modes.split(","):
        if mode not in ("none", "native", *POLICY):
            ap.error(f"--modes: unknown mode {mode!r} (none, native, {', '.join(POLICY)})")
        env = dict(os.environ)
        env.pop("KVPLUG_CONFIG_JSON", None)
        if mode in POLICY:
            env.update(KVPLUG_OFFLOAD__ENABLED="true", KVPLUG_OFFLOAD__CPU_SIZE=f"{args.cpu_gib}GiB",
                       KVPLUG_CACHE_POLICY__DEFAULT=POLICY[mode])
        cmd = [sys.executable, "-m", "benchmarks.gpu_offload", "--worker", "--mode", mode, "--model-dir",
               str(model_dir), "--contexts", str(args.contexts), "--context-tokens", str(args.context_tokens),
               "--cpu-gib", str(args.cpu_gib), "--gpu-mem", str(args.gpu_mem)]
        print(f"[gpu_offload] mode {mode} ...", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            results.append({"mode": mode, "error": (proc.stderr or proc.stdout)[-2000:]})
            print(f"[gpu_offload] mode {mode} failed:\n{(proc.stderr or proc.stdout)[-2000:]}", file=sys.stderr)
            continue
        results.append(json.loads(line[len("RESULT "):]))
    base = next((r for r in results if r.get("mode") == "none" and "follow_up_p50_s" in r), None)
    native = next((r for r in results if r.get("mode") == "native" and "follow_up_p50_s" in r), None)
    print("| mode | follow-up TTFT p50 (s) | p99 (s) | vs none | vs native |\n|---|---|---|---|---|")
    for r in results:
        if "follow_up_p50_s" not in r:
            print(f"| {r['mode']} | failed | | | |")
            continue
        vs = lambda ref: f"{ref['follow_up_p50_s'] / r['follow_up_p50_s']:.2f}x" if ref else "-"
        print(f"| {r['mode']} | {r['follow_up_p50_s']:.3f} | {r['follow_up_p99_s']:.3f} | {vs(base)} | {vs(native)} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k not in
                                                   ("worker", "mode", "model_dir")}, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
