"""`kvplug serve` with retrieval decoding on, at vLLM's default memory settings: does it start, and does it stay
inside the memory share vLLM was given (the block summaries included)?

    python -m benchmarks.gpu_serve_memory --model /tmp/kvstage/models/qwen2.5-coder-0.5b

Starts the server with `--set retrieval_decode.enabled=true --set retrieval_decode.budget_fraction=0.1` and no
memory flags, sends one long chat (the retrieval path must run: its metric moves), and records the GPU memory
in use (nvidia-smi) against gpu_memory_utilization x total, plus what the server logged about its KV cache.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

from benchmarks import harness

DEFAULT_OUT = "benchmarks/results/gpu_serve_memory.json"
DEFAULT_UTILIZATION = 0.9  # vLLM's default --gpu-memory-utilization


def gpu_memory_mib() -> tuple[int, int]:
    used, total = subprocess.run(["nvidia-smi", "--query-gpu=memory.used,memory.total", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, check=True).stdout.splitlines()[0].split(",")
    return int(used), int(total)


def retrieval_tokens(base: str) -> float:
    return sum(s["value"] for s in harness.scrape_samples(base, ("kvplug_retrieval_decode_tokens",))
               if s["labels"].get("mode") == "sparse")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--context-words", type=int, default=2400, help="words of filler text around the secret (~8K tokens)")
    ap.add_argument("--extra", default="", help="more `kvplug serve` arguments, space separated")
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                    help="also start the same server with retrieval decoding off: the memory it uses is the yardstick "
                         "(vLLM itself goes past gpu_memory_utilization by its CUDA graphs and context)")
    args = ap.parse_args(argv)
    result = measure(args, ["--set", "retrieval_decode.enabled=true", "--set", "retrieval_decode.budget_fraction=0.1"])
    if args.baseline:
        base = measure(args, [])
        result["baseline_retrieval_off"] = base
        if result.get("started") and base.get("started"):
            result["extra_mib_vs_baseline"] = (result["gpu_memory_used_after_request_mib"]
                                               - base["gpu_memory_used_after_request_mib"])
    harness.write_results(args.out, harness.command_line("benchmarks.gpu_serve_memory", argv), result, [])
    print({k: v for k, v in result.items() if k != "log_tail"})
    return 0 if result.get("started") else 1


def measure(args, feature_args: list[str]) -> dict:
    serve_args = [args.model, *feature_args, *args.extra.split()]
    log = Path(tempfile.mkdtemp()) / "serve.log"
    result = {"model": args.model, "serve_args": serve_args, "device": harness.device_name()}
    try:
        with harness.serve_kvplug(serve_args, log, timeout_s=600, tag="serve-memory") as server:
            used_idle, total = gpu_memory_mib()
            filler = " ".join(f"item{i % 97} is blue." for i in range(args.context_words // 3))
            secret = "The secret code is 48213."
            body = {"model": httpx.get(server.base + "/v1/models", timeout=30).json()["data"][0]["id"],
                    "messages": [{"role": "user", "content": filler + " " + secret + " " + filler +
                                  "\n\nWhat is the secret code? Answer with the number only."}],
                    "max_tokens": 16, "temperature": 0}
            before = retrieval_tokens(server.base) if feature_args else 0.0
            resp = httpx.post(server.base + "/v1/chat/completions", json=body, timeout=300)
            if resp.status_code != 200:
                raise RuntimeError(f"HTTP {resp.status_code}: {resp.text[:300]}")
            out = resp.json()
            used_after, _ = gpu_memory_mib()
            result.update({
                "started": True, "answer": out["choices"][0]["message"]["content"],
                "prompt_tokens": out["usage"]["prompt_tokens"],
                "retrieval_decode_sparse_tokens": retrieval_tokens(server.base) - before if feature_args else 0.0,
                "gpu_memory_total_mib": total, "gpu_memory_used_idle_mib": used_idle,
                "gpu_memory_used_after_request_mib": used_after,
                "gpu_memory_share_given_mib": round(DEFAULT_UTILIZATION * total),
                "within_share": max(used_idle, used_after) <= DEFAULT_UTILIZATION * total})
    except Exception as exc:  # the finding is that it did not start or answer: keep the log's tail
        result.update({"started": False, "error": f"{type(exc).__name__}: {exc}"[:500]})
    text = log.read_text(errors="replace") if log.exists() else ""
    result["kv_cache_log"] = [ln.strip()[-200:] for ln in text.splitlines()
                              if re.search(r"KV cache|kv cache|summar|reserv|OutOfMemory", ln)][-12:]
    if not result.get("started"):
        result["log_tail"] = text.splitlines()[-40:]
    return result


if __name__ == "__main__":
    sys.exit(main())
