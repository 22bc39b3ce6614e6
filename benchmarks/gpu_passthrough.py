"""Passthrough check on a CUDA GPU: kvplug's CUSTOM backend (every feature off) vs vLLM's FLASH_ATTN.

Runs each backend in its own subprocess on the same model (a config.json of the real shape with
load_format="dummy", so no weights travel), then reports
  * greedy equivalence: token ids of the CUSTOM run == those of the FLASH_ATTN run, prompt by prompt;
  * TTFT at each prompt length (max_tokens=1, prefix caching off, fresh random prompts per repeat);
  * TPOT at batch 1 ((t(1+N tokens) - t(1 token)) / N);
  * overhead = CUSTOM / FLASH_ATTN - 1 for each figure.

    python -m benchmarks.gpu_passthrough --model-shape llama-3-8b --lengths 8192,32768 --out results/x.json

Backends are run in the order given (default FLASH_ATTN,CUSTOM,FLASH_ATTN,CUSTOM: interleaved so a drift of
the machine shows up as spread instead of as overhead).
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

SHAPES = {
    # Meta-Llama-3-8B's config.json, with the context raised so a 128K prompt plus its decode tokens stays
    # inside the RoPE table (positions >= max_position_embeddings index past vLLM's cos/sin cache: that was the
    # "index out of bounds ... < 131072" device assert of the 128K decode run). RoPE scaling is irrelevant to speed.
    "llama-3-8b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 262144,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "hidden_act": "silu", "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "bos_token_id": 128000, "eos_token_id": 128001,
        "attention_bias": False, "mlp_bias": False, "initializer_range": 0.02,
    },
}


def write_shape(name: str, into: Path) -> Path:
    into.mkdir(parents=True, exist_ok=True)
    (into / "config.json").write_text(json.dumps(SHAPES[name], indent=2))
    return into


def _worker(args: argparse.Namespace) -> None:
    """One backend, in this process: measure and print one JSON line."""
    import random

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from kvplug.vllm_compat import attention_impl_names

    lengths = [int(x) for x in args.lengths.split(",")]
    llm = LLM(model=args.model_dir, load_format="dummy", skip_tokenizer_init=True, seed=0,
              attention_backend=args.backend, max_model_len=max(lengths) + args.tpot_tokens + 16,
              enable_prefix_caching=False, gpu_memory_utilization=args.gpu_mem, max_num_seqs=16)
    impls = sorted({c for per_worker in llm.collective_rpc(attention_impl_names) for c in per_worker})
    rng = random.Random(1234)
    vocab = SHAPES[args.shape]["vocab_size"]

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
    import torch
    import vllm

    print("RESULT " + json.dumps({"backend": args.backend, "attention_impls": impls, "ttft_s": ttft, "tpot_s": tpot, "greedy": greedy,
                                  "device": torch.cuda.get_device_name(0), "vllm": vllm.__version__}), flush=True)


def run_backend(args: argparse.Namespace, backend: str) -> dict:
    # collective_rpc of a local function (to read the attention impl class in the worker) needs pickle.
    env = dict(os.environ, VLLM_ALLOW_INSECURE_SERIALIZATION="1")
    if backend != "CUSTOM":
        env["VLLM_PLUGINS"] = "none"  # vanilla vLLM: kvplug not even loaded
    worker_args = ["--model-dir", args.model_dir, "--shape", args.shape, "--lengths", args.lengths,
                   "--repeats", str(args.repeats), "--tpot-tokens", str(args.tpot_tokens),
                   "--greedy-tokens", str(args.greedy_tokens), "--gpu-mem", str(args.gpu_mem)]
    return gpu_common.run_worker("benchmarks.gpu_passthrough", backend, worker_args, env)


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
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_passthrough", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama-3-8b", choices=sorted(SHAPES))
    p.add_argument("--model-dir", help="folder with config.json (default: a temp folder with --shape)")
    p.add_argument("--lengths", default="8192,32768")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tpot-tokens", type=int, default=128)
    p.add_argument("--greedy-tokens", type=int, default=32)
    p.add_argument("--gpu-mem", type=float, default=0.85)
    p.add_argument("--backends", default="FLASH_ATTN,CUSTOM,FLASH_ATTN,CUSTOM")
    p.add_argument("--out", default="results/gpu_passthrough.json")
    p.add_argument("--merge", action="append", default=[], metavar="JSON",
                   help="earlier output of this script whose runs join this summary (same device and shape)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--backend", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        _worker(args)
        return 0
    if args.model_dir is None:
        args.model_dir = str(write_shape(args.shape, Path(tempfile.mkdtemp(prefix="kvplug-shape-"))))
    runs = [run for path in args.merge for run in json.loads(Path(path).read_text())["runs"]]
    runs += [run_backend(args, b) for b in args.backends.split(",") if b]
    summary = summarize(runs)
    gpu_common.write_results(args.out, "python -m benchmarks.gpu_passthrough "
                             + " ".join(argv if argv is not None else sys.argv[1:]), summary, runs)
    print(f"device: {summary['device']}  vLLM {summary['vllm']}  greedy identical: {summary['greedy_identical']}")
    print(f"attention impls: {summary['attention_impls']}")
    for metric in ("ttft_s", "tpot_s"):
        for n, row in summary[metric].items():
            print(f"{metric:7s} {n:>7s}  FLASH_ATTN {row['flash_attn']*1e3:9.2f} ms  kvplug {row['kvplug']*1e3:9.2f} ms"
                  f"  overhead {row['overhead_pct']:+.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
