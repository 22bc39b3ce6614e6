"""The CUDA compatibility check of a vLLM release: kvplug's engine paths on one GPU, each through the benchmark
script that measures it (run as a subprocess: scripts never import each other), with small lengths so that the
whole check fits two calls of the device's 10-minute command limit.

    source /tmp/kvstage-0.34.0/env.sh && source benchmarks/gpu/env.sh
    python -m benchmarks.gpu_compat_check      # the steps not passed yet, as many as fit --budget-s; run it
                                               # again until it prints "all steps passed" (or a step fails)

Steps, in order (Llama-3-8B shape with load_format="dummy": no weights travel):
  cli               ``kvplug serve MODEL --help`` reaches vLLM's API server parser (what serve imports; no engine)
  passthrough       gpu_passthrough: FLASH_ATTN with VLLM_PLUGINS=none, then kvplug's CUSTOM backend (every
                    feature off), 8K and 32K, 3 repeats: greedy ids identical; TTFT/TPOT overhead reported
                    against the <= 2% target (a figure, not the verdict)
  sparse_prefill    gpu_sparse_prefill, CUSTOM only, one 32K prompt, threshold rule from 8K: chunks went sparse
  retrieval_decode  gpu_retrieval_decode, CUSTOM only, TPOT at 32K: decodes took the retrieval path
  offload           gpu_offload --modes keep, 4 contexts x 8K, GPU cache for 2, 8 GiB CPU tier: follow-ups were
                    served by blocks the connector loaded
  serve             ``kvplug serve --offload cpu:4GiB`` (dummy weights, word-level tokenizer written beside the
                    config): a completion answers 200 with the x-kvplug-cache header, a bad kvplug_policy 400
                    (the --middleware), /metrics has kvplug samples

Results: each step's own JSON is ``<results>/compat_cuda_<X_Y>_<gpu>_<step>.json``; the verdicts go to
``<results>/compat_cuda_<X_Y>_<gpu>.json`` (merged by step across calls; --fresh starts over). Engine logs go to
--log-dir (the tail of a failing step's log is printed). Exit status: 0 all passed, 1 a step failed, 2 steps left
for another call (time budget).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from benchmarks import harness

REPO = Path(__file__).resolve().parent.parent
SHAPE = "llama-3-8b"
OVERHEAD_TARGET_PCT = 2.0


# ------------------------------------------------------------------------------------------------- verdicts
# Each reads its step's result JSON ({"summary": ..., "runs": ...}) and answers "pass" or "fail: <why>".

def _kvplug_impl(impls) -> bool:
    return any("KvplugAttentionImpl" in c for c in impls or [])


def passthrough_verdict(result: dict) -> str:
    s = result["summary"]
    impls = s.get("attention_impls") or {}
    if not _kvplug_impl(impls.get("CUSTOM")):
        return f"fail: the CUSTOM run did not run kvplug's backend (impls {impls.get('CUSTOM')})"
    if _kvplug_impl(impls.get("FLASH_ATTN")):
        return "fail: the FLASH_ATTN run loaded kvplug's backend (VLLM_PLUGINS=none not honoured)"
    if not s.get("greedy_identical"):
        return "fail: greedy ids of CUSTOM differ from vanilla FLASH_ATTN"
    return "pass"


def passthrough_overheads(result: dict) -> dict:
    """{"ttft_s 8192": pct, ...} and whether every one is within the target (reported beside the verdict)."""
    s = result["summary"]
    pct = {f"{metric} {n}": round(row["overhead_pct"], 2) for metric in ("ttft_s", "tpot_s")
           for n, row in (s.get(metric) or {}).items()}
    return {"overhead_pct": pct, "target_pct": OVERHEAD_TARGET_PCT,
            "within_target": bool(pct) and all(v <= OVERHEAD_TARGET_PCT for v in pct.values())}


def sparse_prefill_verdict(result: dict) -> str:
    s = result["summary"]
    if not _kvplug_impl((s.get("attention_impls") or {}).get("CUSTOM")):
        return f"fail: the CUSTOM run did not run kvplug's backend (impls {s.get('attention_impls')})"
    for n, row in (s.get("ttft") or {}).items():
        sparse = sum(c for k, c in (row.get("chunks") or {}).items() if k.startswith("sparse/"))
        if not sparse:
            return f"fail: no prefill chunk of the {n}-token prompts went sparse (chunks {row.get('chunks')})"
        if row.get("density") is None or row["density"] >= 1.0:
            return f"fail: {n} tokens: density {row.get('density')} (the sparse path computed every pair)"
    return "pass" if s.get("ttft") else "fail: no prompt was timed"


def retrieval_decode_verdict(result: dict) -> str:
    s = result["summary"]
    path = s.get("retrieval_path")
    if path != "ran":
        return f"fail: {path}"
    held = s.get("prefix_cache_held") or {}
    if not all(held.values()):
        return f"fail: the prefix cache did not hold the prompts between timed calls ({held})"
    return "pass"


def offload_verdict(result: dict) -> str:
    runs = [r for r in result.get("runs", []) if r.get("mode") == "keep"]
    if not runs:
        return "fail: no keep-mode run in the results"
    r = runs[-1]
    if "error" in r:
        return f"fail: {r['error']}"
    loaded = sum((r.get("connector_loaded_blocks") or {}).values())
    if r.get("no_op") or not loaded:
        return (f"fail: the follow-ups were recomputed (cached fraction {r.get('follow_up_cached_fraction')}, "
                f"connector loaded {loaded} blocks)")
    return "pass"


def cli_verdict(returncode: int, output: str) -> str:
    if returncode != 0:
        return f"fail: kvplug serve --help exited {returncode}"
    if "--attention-backend" not in output or "--kv-transfer-config" not in output:
        return "fail: kvplug serve --help did not print vLLM's server flags"
    return "pass"


# ------------------------------------------------------------------------------------------------- steps

@dataclass(frozen=True)
class Step:
    name: str
    estimate_s: float  # H100, engine start included: what must be left of the budget to start it
    module: str
    args: tuple[str, ...]
    verdict: Callable[[dict], str] | None  # None: the step decides in-process (cli, serve)


STEPS = (
    Step("cli", 40, "kvplug.cli", (), None),
    Step("passthrough", 300, "benchmarks.gpu_passthrough",
         ("--lengths", "8192,32768", "--repeats", "3", "--tpot-tokens", "64", "--backends", "FLASH_ATTN,CUSTOM"),
         passthrough_verdict),
    Step("sparse_prefill", 150, "benchmarks.gpu_sparse_prefill",
         ("--backends", "CUSTOM", "--lengths", "32768", "--repeats", "1", "--turn-length", "0",
          "--cost-table", "none", "--min-prompt-tokens", "8192"), sparse_prefill_verdict),
    Step("retrieval_decode", 150, "benchmarks.gpu_retrieval_decode",
         ("--backends", "CUSTOM", "--phases", "tpot", "--lengths", "32768", "--repeats", "1",
          "--decode-tokens", "64", "--batch", "1"), retrieval_decode_verdict),
    Step("offload", 150, "benchmarks.gpu_offload",
         ("--modes", "keep", "--contexts", "4", "--context-tokens", "8192", "--fit-contexts", "2",
          "--cpu-gib", "8", "--followups", "1", "--fresh"), offload_verdict),
    Step("serve", 150, "kvplug.cli", (), None),
)
STEP_NAMES = tuple(s.name for s in STEPS)


def release_tag(version: str) -> str:
    """'0.34.0+cu130' -> '0_34' (the release line)."""
    parts = [int("".join(ch for ch in p if ch.isdigit()) or 0) for p in version.split(".")[:2]]
    return f"{parts[0]}_{parts[1] if len(parts) > 1 else 0}"


def gpu_tag(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100'; no GPU -> 'cpu'."""
    m = re.search(r"\b([A-Z]\d{2,4}[A-Z]?)\b", name or "")
    return m.group(1).lower() if m else (re.sub(r"[^a-z0-9]+", "", (name or "cpu").lower())[:16] or "cpu")


def installed_vllm() -> str:
    from importlib import metadata

    try:
        return metadata.version("vllm")
    except metadata.PackageNotFoundError:
        out = subprocess.run([sys.executable, "-c", "import vllm; print(vllm.__version__)"], capture_output=True,
                             text=True, timeout=300)
        return out.stdout.strip() or "unknown"


def gpu_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", "0"],
                             capture_output=True, text=True, timeout=30).stdout.strip()
        return out or "cpu"
    except (OSError, subprocess.SubprocessError):
        return "cpu"


def pending_steps(recorded: dict, asked: list[str] | None) -> list[str]:
    """The steps to run: those asked for, else every step whose recorded verdict is not a pass."""
    if asked:
        return [s for s in STEP_NAMES if s in asked]
    return [s for s in STEP_NAMES if (recorded.get(s) or {}).get("verdict") != "pass"]


def run_logged(cmd: list[str], log_path: Path, timeout_s: float, env: dict | None = None) -> int | None:
    """Run ``cmd`` (its own session) with output into ``log_path``; None if it ran past ``timeout_s`` (it and the
    engine processes it started are terminated, then killed)."""
    proc = harness.start_session(cmd, log_path, env=env, cwd=REPO)
    try:
        return proc.wait(timeout=max(timeout_s, 1))
    except subprocess.TimeoutExpired:
        harness.stop_process_tree(proc, grace_s=20)
        return None


def tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def shape_with_tokenizer(into: Path) -> Path:
    """The dummy shape's config.json plus a word-level tokenizer over its vocabulary (text prompts for a server)."""
    shape = harness.SHAPES[SHAPE]
    return harness.write_word_tokenizer(harness.write_shape(SHAPE, into), shape["vocab_size"],
                                        bos=shape["bos_token_id"], eos=shape["eos_token_id"])


# vLLM flags of the serve step: dummy weights, eager (the server path is what it checks, not kernels).
SERVE_ENGINE_ARGS = ("--load-format", "dummy", "--max-model-len", "4096", "--gpu-memory-utilization", "0.5",
                     "--enforce-eager")


def serve_check(model_dir: Path, log_path: Path, timeout_s: float, engine_args: tuple[str, ...] = SERVE_ENGINE_ARGS,
                offload: str = "cpu:4GiB") -> dict:
    """Start ``kvplug serve`` with the offload tier; one good and one bad completion; /metrics."""
    name = model_dir.name
    with harness.kvplug_server([str(model_dir), "--offload", offload, *engine_args], log_path, cwd=REPO,
                               stop_timeout_s=30, tag="serve") as server:
        out: dict = {"command": server.command}
        t0 = time.monotonic()
        if why := harness.health_failure(server, timeout_s):
            out["verdict"] = f"fail: {why}"
            return out
        out["ready_s"] = round(time.monotonic() - t0, 1)
        prompt = " ".join(f"t{1000 + i}" for i in range(600))
        good = {"model": name, "prompt": prompt, "max_tokens": 4, "temperature": 0}
        status, headers, text = harness.http_request("POST", server.base + "/v1/completions", good)
        out["completion"] = {"status": status, "x-kvplug-cache": headers.get("x-kvplug-cache"), "body": text[:300]}
        bad = dict(good, kv_transfer_params={"kvplug_policy": "no-such-policy"})
        status_bad, _, text_bad = harness.http_request("POST", server.base + "/v1/completions", bad)
        out["bad_policy"] = {"status": status_bad, "body": text_bad[:300]}
        metrics = harness.http_request("GET", server.base + "/metrics")[2]
        out["kvplug_metric_lines"] = sum(1 for ln in metrics.splitlines() if ln.startswith("kvplug"))
        out["verdict"] = serve_verdict(out)
        return out


def serve_verdict(out: dict) -> str:
    c, b = out.get("completion") or {}, out.get("bad_policy") or {}
    if c.get("status") != 200:
        return f"fail: completion answered {c.get('status')}: {c.get('body')}"
    if not c.get("x-kvplug-cache"):
        return "fail: the completion has no x-kvplug-cache header (kvplug's middleware or cache report missing)"
    if b.get("status") != 400 or "kvplug_policy" not in (b.get("body") or ""):
        return f"fail: a bad kvplug_policy answered {b.get('status')}, not 400 naming it: {b.get('body')}"
    if not out.get("kvplug_metric_lines"):
        return "fail: /metrics has no kvplug samples"
    return "pass"


def run_step(step: Step, files: dict[str, Path], log_dir: Path, timeout_s: float, model_dir: Path) -> dict:
    log_path = log_dir / f"{step.name}.log"
    t0 = time.monotonic()
    if step.name == "serve":
        rec = serve_check(shape_with_tokenizer(model_dir / "serve-model"), log_path, timeout_s)
    elif step.name == "cli":
        # a free --port: serve checks the port before it hands --help to vLLM's parser
        cmd = [sys.executable, "-m", "kvplug.cli", "serve", str(harness.write_shape(SHAPE, model_dir / "cli-model")),
               "--port", str(harness.free_port()), "--help"]
        rc = run_logged(cmd, log_path, timeout_s)
        rec = {"command": "python -m " + " ".join(cmd[2:]),
               "verdict": cli_verdict(-1 if rc is None else rc, log_path.read_text(errors="replace"))}
    else:
        out = files[step.name]
        cmd = [sys.executable, "-m", step.module, *step.args, "--out", str(out)]
        rc = run_logged(cmd, log_path, timeout_s)
        rec = {"command": "python -m " + " ".join(cmd[2:]), "returncode": rc, "result_file": str(out.relative_to(REPO))
               if out.is_relative_to(REPO) else str(out)}
        if rc is None:
            rec["verdict"] = f"fail: timed out after {timeout_s:.0f} s (budget); run again with a larger --budget-s"
        elif not out.exists():
            rec["verdict"] = f"fail: exited {rc} without writing {out.name}"
        else:
            result = json.loads(out.read_text())
            rec["verdict"] = step.verdict(result)
            if step.name == "passthrough":
                rec.update(passthrough_overheads(result))
            if rc != 0 and rec["verdict"] == "pass":
                rec["verdict"] = f"fail: exited {rc}"
    rec["seconds"] = round(time.monotonic() - t0, 1)
    rec["log"] = str(log_path)
    if rec["verdict"] != "pass":
        rec["log_tail"] = tail(log_path)
    return rec


def copy_out(into: Path, paths: list[Path]) -> None:
    import shutil

    into.mkdir(parents=True, exist_ok=True)
    for p in paths:
        if p.exists():
            shutil.copy2(p, into / p.name)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_compat_check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", default="", help=f"comma list of {', '.join(STEP_NAMES)} (default: those not passed)")
    ap.add_argument("--budget-s", type=float, default=560.0,
                    help="wall seconds this call may use; a step starts only if its estimate fits what is left")
    ap.add_argument("--results", default="benchmarks/results", help="folder of the result files")
    ap.add_argument("--tag", default="", help="file tag instead of compat_cuda_<X_Y>_<gpu> (e.g. from the version)")
    ap.add_argument("--log-dir", default="/tmp/kvplug-compat-logs")
    ap.add_argument("--fresh", action="store_true", help="forget earlier verdicts in the summary file")
    ap.add_argument("--copy-to", default="", help="also copy the result files (and a failed step's log) here after "
                                                  "every step (the device's $OUT)")
    args = ap.parse_args(argv)
    asked = [s for s in args.steps.split(",") if s]
    unknown = sorted(set(asked) - set(STEP_NAMES))
    if unknown:
        ap.error(f"--steps: unknown step(s) {unknown} (known: {', '.join(STEP_NAMES)})")
    t_start = time.monotonic()
    version, device = installed_vllm(), gpu_name()
    tag = args.tag or f"compat_cuda_{release_tag(version)}_{gpu_tag(device)}"
    results = (REPO / args.results) if not Path(args.results).is_absolute() else Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    summary_path = results / f"{tag}.json"
    summary = {} if args.fresh or not summary_path.exists() else json.loads(summary_path.read_text())
    recorded: dict = summary.get("steps", {})
    todo = pending_steps(recorded, asked)
    files = {s.name: results / f"{tag}_{s.name}.json" for s in STEPS}
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    model_dir = Path(os.environ.get("TMPDIR", "/tmp")) / "kvplug-compat-model"
    print(f"[compat] vLLM {version} on {device}: steps {todo or 'none left'} -> {summary_path}", flush=True)
    left_over = []
    for step in (s for s in STEPS if s.name in todo):
        remaining = args.budget_s - (time.monotonic() - t_start)
        if remaining < step.estimate_s:
            left_over.append(step.name)
            continue
        print(f"[compat] {step.name} (estimate {step.estimate_s:.0f} s, {remaining:.0f} s left) ...", flush=True)
        rec = run_step(step, files, log_dir, remaining, model_dir)
        recorded[step.name] = dict(rec, date=harness.utc_now())
        summary.update(vllm=version, device=device, steps=recorded,
                       command="python -m benchmarks.gpu_compat_check " + " ".join(sys.argv[1:] if argv is None else argv))
        summary_path.write_text(json.dumps(summary, indent=2))  # after every step: a cut call keeps what it did
        if args.copy_to:
            copy_out(Path(args.copy_to), [summary_path, files[step.name]]
                     + ([Path(rec["log"])] if rec["verdict"] != "pass" else []))
        print(f"[compat] {step.name}: {rec['verdict']} ({rec['seconds']} s)"
              + (f"  overhead {rec['overhead_pct']}" if "overhead_pct" in rec else ""), flush=True)
        if rec["verdict"] != "pass" and rec.get("log_tail"):
            print(rec["log_tail"], flush=True)
    failed = [n for n, r in recorded.items() if r.get("verdict") != "pass"]
    missing = [n for n in STEP_NAMES if n not in recorded]
    print(f"[compat] {summary_path}: " + ", ".join(f"{n}={recorded[n]['verdict']}" for n in STEP_NAMES
                                                   if n in recorded), flush=True)
    if left_over:
        print(f"[compat] not started (time budget): {left_over}; run the same command again", flush=True)
        return 2
    if failed:
        return 1
    if missing:
        return 2
    print("[compat] all steps passed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
