"""What the per-request cache report costs: the control-channel round trip (API server -> engine core) that a
streamed answer waits for before its first chunk (the x-kvplug-cache header), idle and while the engine
serves streaming requests.

    python -m benchmarks.cache_report_cost [--calls 500] [--load 4] [--out benchmarks/results/cache_report_cost.json]

Starts `kvplug serve --offload` on the default model, finds its engine's control socket (named after the API
server's pid, offload/control.py) and times the same ``report`` call the middleware makes.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks import harness
from offload import control


def engine_socket(launcher_pid: int) -> Path:
    """The control socket of the API server started by ``kvplug serve`` (its child)."""
    for pid in harness.child_pids(launcher_pid):
        path = control.socket_path(pid)
        if path.exists():
            return path
    raise SystemExit(f"no control socket of a child of pid {launcher_pid} in {control.runtime_dir()}")


def time_calls(path: Path, calls: int) -> list[float]:
    async def go() -> list[float]:
        out = []
        for _ in range(calls):
            t0 = time.perf_counter()
            await control.call({"op": "report", "id": "none"}, path=path)
            out.append(time.perf_counter() - t0)
        return out
    return asyncio.run(go())


def stats(ms: list[float]) -> dict:
    s = sorted(x * 1000 for x in ms)
    return {"n": len(s), "p50_ms": round(harness._quantile(s, 0.5), 3), "p99_ms": round(harness._quantile(s, 0.99), 3),
            "max_ms": round(s[-1], 3)}


def load(base: str, model: str, stop: threading.Event, n: int) -> None:
    import httpx

    def one(i: int) -> None:
        while not stop.is_set():
            body = {"model": model, "prompt": f"Load {i}: " + "word " * 300, "max_tokens": 32, "stream": True,
                    "ignore_eos": True}
            with httpx.stream("POST", base + "/v1/completions", json=body, timeout=300) as r:
                for _ in r.iter_bytes():
                    pass
    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cache_report_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=500)
    p.add_argument("--load", type=int, default=4, help="concurrent streaming requests during the loaded phase")
    p.add_argument("--out", default="benchmarks/results/cache_report_cost.json")
    args = p.parse_args(argv)
    harness.prepare_model(None)
    log = Path(tempfile.mkdtemp(prefix="kvplug-report-cost-")) / "serve.log"
    with harness.serve_kvplug(["--offload", "cpu:256MiB", "--enforce-eager", "--max-model-len", "2048"], log) as srv:
        path = engine_socket(srv.proc.pid)
        import httpx

        model = httpx.get(srv.base + "/v1/models", timeout=30).json()["data"][0]["id"]
        time_calls(path, 20)  # warm-up
        idle = stats(time_calls(path, args.calls))
        stop = threading.Event()
        load(srv.base, model, stop, args.load)
        time.sleep(5)  # the engine is busy stepping
        busy = stats(time_calls(path, args.calls))
        stop.set()
        summary = {"device": harness.device_name(), "cores": os.cpu_count(), "idle": idle,
                   f"busy_{args.load}_streams": busy, "server": srv.command}
    harness.write_results(args.out, harness.command_line("benchmarks.cache_report_cost", argv), summary, [])
    for name, s in (("idle", idle), (f"{args.load} streams", busy)):
        print(f"report round trip, {name}: p50 {s['p50_ms']} ms, p99 {s['p99_ms']} ms, max {s['max_ms']} ms "
              f"(n={s['n']})")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
