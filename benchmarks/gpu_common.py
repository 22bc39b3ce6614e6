"""Shared plumbing of the GPU end-to-end scripts: one backend per subprocess, one RESULT line back."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Sequence


def run_worker(module: str, backend: str, argv: Sequence[str], env: dict) -> dict:
    """Run ``python -m module --worker --backend B <argv>`` and return its last ``RESULT {json}`` line.
    The child's stderr streams through; its other stdout lines are echoed to stderr."""
    cmd = [sys.executable, "-m", module, "--worker", "--backend", backend, *argv]
    print(f"[{module.rsplit('.', 1)[-1]}] running {backend} ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=None, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    sys.stderr.write("".join(ln + "\n" for ln in proc.stdout.splitlines() if not ln.startswith("RESULT ")))
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{backend} run failed (exit {proc.returncode})")
    return json.loads(lines[-1][len("RESULT "):])


def engine_memory_kwargs(kv_cache_gib: float | None, gpu_memory_utilization: float) -> dict:
    """LLM(...) memory arguments: a fixed KV-cache size when asked and this vLLM knows the argument (every
    backend then gets the same KV space, whatever its own extra memory), else the utilization fraction."""
    if kv_cache_gib:
        import dataclasses

        from vllm.engine.arg_utils import EngineArgs

        if "kv_cache_memory_bytes" in {f.name for f in dataclasses.fields(EngineArgs)}:
            return {"kv_cache_memory_bytes": int(kv_cache_gib * (1 << 30))}
        print(f"this vLLM has no kv_cache_memory_bytes; using gpu_memory_utilization={gpu_memory_utilization}",
              file=sys.stderr, flush=True)
    return {"gpu_memory_utilization": gpu_memory_utilization}


def worker_argv(argv: Sequence[str], drop: Sequence[str] = ("--backends", "--out")) -> list[str]:
    """The parent's own flags minus those only the parent uses (``--flag value`` or ``--flag=value``)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in drop:
            skip = "=" not in a
            continue
        out.append(a)
    return out


def write_results(out: str, command: str, summary: dict, runs: list[dict]) -> None:
    summary["command"] = command
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({"summary": summary, "runs": runs}, indent=2))
