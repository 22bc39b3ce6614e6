"""Tier-aware vs prefix-affinity vs round-robin routing over replicas, measured with `kvplug bench run`.

Two ways to run it; for each mode in --modes it runs the same seeded SCBench-style multi-turn workload, then
writes one JSON with the cache hit rate (GPU prefix cache, and all tiers: GPU + kvplug's CPU/disk tiers through
vLLM's external-prefix-cache counters), follow-up-turn TTFT, errors, where each request went and why
(x-kvplug-route) and the router's counters per run, and prints a Markdown table.

* --serve "ARGS": a fresh `kvplug serve ARGS --routing MODE` per mode (empty GPU caches *and* offload tiers,
  which /reset_prefix_cache does not empty):

    python -m benchmarks.replica_routing --modes tier-aware,affinity,round-robin \\
        --serve "--replicas 2 --offload cpu:256MiB --kv-cache-memory-bytes 64M --max-model-len 2048" \\
        --out benchmarks/results/tier_routing_cpu.json -- --context-tokens 1024 --turns 3 --sessions 8

* --endpoint URL: one running `kvplug serve --replicas N` (replicas started with VLLM_SERVER_DEV_MODE=1): the
  router's mode is switched at run time (PUT /router/routing) and every replica's prefix cache reset:

    VLLM_SERVER_DEV_MODE=1 kvplug serve --replicas 2 --port 8000 &
    python -m benchmarks.replica_routing --endpoint http://127.0.0.1:8000 --modes affinity,round-robin \\
        --out benchmarks/results/replica_routing_cpu.json -- --context-tokens 1500 --turns 4 --sessions 4
Arguments after `--` go to `kvplug bench run` unchanged.

--kill-replica-after S (with --serve): S seconds after each mode's `kvplug bench run` starts (its case generation
included), SIGKILL the process group of one replica's vLLM server (the healthy one with the most requests in
flight, by the router's GET /replicas: its pid; a local Ray cluster); the run records which, when (on the load's
clock) and the requests that ended before, were in flight at, or started after the kill: total, ok, errors,
cancelled, and those ended only by the bench's --request-timeout (`every_request_ended` is false if any).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import shlex
import signal
import sys
import threading
import time
from pathlib import Path

import httpx

from benchmarks import harness

ROUTER_COUNTERS = ("kvplug_router_affinity_hits_total", "kvplug_router_fallbacks_total",
                   "kvplug_router_routed_total", "kvplug_router_errors_total", "kvplug_router_retries_total")


def _router_deltas(deltas: dict[str, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in deltas.items():
        name = key.split("{", 1)[0]
        if name in ROUTER_COUNTERS:
            out[name] = out.get(name, 0.0) + value
    return out


def _sum_deltas(deltas: dict[str, float], name: str) -> float:
    return sum(v for k, v in deltas.items() if k.split("{", 1)[0] == name)


def all_tier_hit_rate(deltas: dict[str, float]) -> float | None:
    """Prompt tokens served from any cache tier over prompt tokens queried: vLLM's GPU prefix-cache hits plus
    the hits through kvplug's connector (CPU/disk tiers), which vLLM counts as external prefix-cache hits."""
    queries = _sum_deltas(deltas, "vllm:prefix_cache_queries_total")
    if queries <= 0:
        return None
    return (_sum_deltas(deltas, "vllm:prefix_cache_hits_total")
            + _sum_deltas(deltas, "vllm:external_prefix_cache_hits_total")) / queries


def routes(requests: list[dict]) -> dict:
    """Where requests went and why, from their x-kvplug-replica / x-kvplug-route headers."""
    reasons = collections.Counter()
    per_replica = collections.Counter()
    for r in requests:
        fields = dict(p.split("=", 1) for p in (r.get("route") or "").split("; ") if "=" in p)
        reasons[fields.get("reason", "none")] += 1
        per_replica[r.get("replica") or "none"] += 1
    return {"reasons": dict(reasons), "per_replica": dict(per_replica)}


def run_mode(endpoint: str, mode: str, out_dir: Path, bench_args: list[str], switch: bool = True) -> dict:
    if switch:
        r = httpx.put(endpoint.rstrip("/") + "/router/routing", json={"mode": mode}, timeout=30)
        if r.status_code != 200:
            raise SystemExit(f"{endpoint} did not switch to {mode}: HTTP {r.status_code} {r.text[:200]} "
                             "(is it `kvplug serve --replicas N`?)")
    rc = harness.run_kvplug(["bench", "run", "--endpoint", endpoint, *(["--reset-prefix-cache"] if switch else []),
                             "--out", str(out_dir), "--label", out_dir.name, "--no-progress", *bench_args]).returncode
    if rc != 0:
        raise SystemExit(f"kvplug bench run failed for {mode} (exit {rc})")
    res = json.loads((out_dir / "results.json").read_text())
    s = res["summary"]
    m = s.get("metrics") or {}
    deltas = m.get("deltas") or {}
    return {"mode": mode, "label": out_dir.name, "results": str(out_dir / "results.json"),
            "prefix_cache_hit_rate": m.get("prefix_cache_hit_rate"),
            "all_tier_hit_rate": all_tier_hit_rate(deltas),
            "external_prefix_cache_hit_tokens": _sum_deltas(deltas, "vllm:external_prefix_cache_hits_total"),
            "prefix_cache_reset": res["environment"].get("prefix_cache_reset"),
            "ttft_followup_s": s.get("ttft_followup_s"), "ttft_s": s.get("ttft_s"),
            "ttft_per_turn_s": s.get("ttft_per_turn_s"), "requests": s.get("requests"),
            "errors": s.get("errors"), "router": _router_deltas(deltas), "routes": routes(res.get("requests") or [])}


def pick_replica(replicas: list[dict]) -> dict | None:
    """The replica to kill: the healthy one with the most requests in flight (the first of equals), None if none is
    healthy. Killing it mid-run cuts requests off, which is what the router must survive."""
    healthy = [r for r in replicas if r.get("healthy")]
    return max(healthy, key=lambda r: r.get("in_flight") or 0) if healthy else None


def kill_replica(endpoint: str) -> dict:
    """SIGKILL one replica's vLLM server and its engine (its own process group, serving/replicas.py) by the pid the
    router lists; no serving API is involved, so it only works where the replicas run on this host."""
    listing = httpx.get(endpoint.rstrip("/") + "/replicas", timeout=30).json()["replicas"]
    victim = pick_replica(listing)
    if victim is None:
        return {"error": "no healthy replica to kill", "killed_unix": None}
    pid = int(victim["pid"])
    out = {"replica": victim["name"], "pid": pid, "url": victim["url"], "in_flight": victim.get("in_flight"),
           "killed_unix": None}
    try:
        if os.getpgid(pid) != pid:  # not a session leader: not the replica's server, leave it alone
            return {**out, "error": f"pid {pid} does not lead its process group"}
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError) as exc:
        return {**out, "error": f"{type(exc).__name__}: pid {pid} (a replica on another host?)"}
    return {**out, "killed_unix": time.time()}


def _kill_into(kill: dict, endpoint: str) -> None:
    """kill_replica in the timer's thread: what went wrong lands in the result, not on a dead thread's stderr."""
    try:
        kill.update(kill_replica(endpoint))
    except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
        kill.update({"error": f"{type(exc).__name__}: {exc}", "killed_unix": None})


def _is_timeout(rec: dict) -> bool:
    return rec.get("status") == "error" and "timeout" in (rec.get("error") or "").split(":", 1)[0].lower()


def planned_from_results(results: dict) -> tuple[int | None, str | None]:
    """The requests a bench run planned, as it recorded them (``planned``: --max-requests and --repeat included),
    and a note when an older results.json lacks it and the count falls back to the cases' turns."""
    if "planned" in results:
        return results["planned"], None
    return (sum(c["turns"] for c in results.get("cases") or []),
            "results.json has no 'planned' (older kvplug bench): counted as the cases' turns, "
            "wrong if --max-requests or --repeat was given")


def kill_bookkeeping(records: list[dict], kill_at_s: float | None, planned: int | None) -> dict:
    """Requests by where they stand to the kill (``kill_at_s``: seconds after the load started; None: no kill):
    ended before it, in flight at it, started after it; in each total, ok, errors, cancelled (cut by a bench
    bound) and timed_out (ended only by --request-timeout: it hung). ``every_request_ended``: all ``planned``
    requests were issued (None: no count was planned, --repeat until --max-seconds) and each ended by itself
    (ok or an error, not a timeout or a cancel)."""
    def tally(rs: list[dict]) -> dict:
        return {"total": len(rs), "ok": sum(r["status"] == "ok" for r in rs),
                "errors": sum(r["status"] == "error" for r in rs),
                "cancelled": sum(r["status"] == "cancelled" for r in rs), "timed_out": sum(map(_is_timeout, rs))}

    groups: dict[str, list[dict]] = {"before": [], "in_flight": [], "after": []}
    for r in records:
        end = r["start"] + (r.get("e2e") or 0.0)
        if kill_at_s is None or end <= kill_at_s:
            groups["before"].append(r)
        elif r["start"] < kill_at_s:
            groups["in_flight"].append(r)
        else:
            groups["after"].append(r)
    out = {name: tally(rs) for name, rs in groups.items()}
    every = tally(records)
    out["all"] = every
    out["planned"] = planned
    out["every_request_ended"] = ((planned is None or every["total"] == planned) and every["cancelled"] == 0
                                  and every["timed_out"] == 0)
    return out


def serve_and_run(serve_args: list[str], mode: str, out_dir: Path, bench_args: list[str],
                  kill_after_s: float | None = None) -> dict:
    """A fresh `kvplug serve ... --routing MODE` for this mode only: every cache tier starts empty."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with harness.serve_kvplug([*serve_args, "--routing", mode], out_dir / "serve.log", timeout_s=2400,
                              stop_timeout_s=120, tag=mode) as server:
        kill: dict = {}
        timer = None
        if kill_after_s is not None:
            timer = threading.Timer(kill_after_s, _kill_into, (kill, server.base))
            timer.start()
        try:
            run = run_mode(server.base, mode, out_dir, bench_args, switch=False)
        finally:
            if timer is not None:
                timer.cancel()
                timer.join()
        run["serve_command"] = server.command
        run["replicas"] = httpx.get(server.base + "/replicas", timeout=30).json()
    if kill_after_s is not None:
        res = json.loads((out_dir / "results.json").read_text())
        started = res["environment"].get("load_started_unix")
        kill_at = None if not kill.get("killed_unix") or started is None else kill["killed_unix"] - started
        planned, planned_note = planned_from_results(res)
        run["kill"] = {**kill, "after_s": kill_after_s, "at_load_s": kill_at, "fired": bool(kill),
                       "requests": kill_bookkeeping(res.get("requests") or [], kill_at, planned),
                       **({"planned_note": planned_note} if planned_note else {})}
    return run


MODE_COLORS = {"tier-aware": "tab:green", "affinity": "tab:blue", "round-robin": "tab:orange"}


def table(runs: list[dict]) -> str:
    def ms(d, k):
        return "–" if not d or d.get(k) is None else f"{d[k] * 1000:.0f}"

    def pct(v):
        return "–" if v is None else f"{v:.1%}"

    lines = ["| routing | hit rate, all tiers | GPU prefix-cache hit rate | follow-up TTFT p50 (ms) | "
             "follow-up TTFT p99 (ms) | turn-1 TTFT p50 (ms) | routed by reason | errors |",
             "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        t1 = (r["ttft_per_turn_s"] or {}).get("1")
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(((r.get("routes") or {}).get("reasons") or {}).items()))
        lines.append(f"| {r['mode']} | {pct(r.get('all_tier_hit_rate'))} | {pct(r['prefix_cache_hit_rate'])} | "
                     f"{ms(r['ttft_followup_s'], 'p50')} | {ms(r['ttft_followup_s'], 'p99')} | {ms(t1, 'p50')} | "
                     f"{reasons or '–'} | {r['errors']} |")
    for r in runs:
        if k := r.get("kill"):
            q = k["requests"]
            lines.append(f"\n{r['mode']}: killed {k.get('replica', '–')} at "
                         f"{'–' if k['at_load_s'] is None else format(k['at_load_s'], '.1f')} s "
                         f"({k.get('error') or 'ok'}); errors before/in flight/after "
                         f"{q['before']['errors']}/{q['in_flight']['errors']}/{q['after']['errors']} of "
                         f"{q['before']['total']}/{q['in_flight']['total']}/{q['after']['total']}; timed out "
                         f"{q['all']['timed_out']}; every request ended: {q['every_request_ended']}")
    return "\n".join(lines)


def plot(runs: list[dict], path: Path) -> None:
    """TTFT p50 per turn, one line per run: turn 2 is where round-robin lands on a cold replica."""
    fig, ax = harness.pyplot().subplots(figsize=(6, 3.6))
    once = len({r["mode"] for r in runs}) == len(runs)
    for i, r in enumerate(runs):
        turns = sorted((r["ttft_per_turn_s"] or {}), key=int)
        ys = [(r["ttft_per_turn_s"][t] or {}).get("p50") for t in turns]
        ax.plot([int(t) for t in turns], ys, marker="o", linestyle="--" if r["mode"] == "round-robin" else "-",
                color=MODE_COLORS.get(r["mode"], "tab:gray"), label=r["mode"] if once else f"{r['mode']} ({i + 1})")
    ax.set_xticks(sorted({int(t) for r in runs for t in (r["ttft_per_turn_s"] or {})}))
    ax.set_xlabel("turn")
    ax.set_ylabel("TTFT p50 (s)")
    ax.set_title(f"{len(runs[0].get('replicas', {}).get('replicas', [])) or 'N'} replicas: "
                 + " vs ".join(dict.fromkeys(r["mode"] for r in runs)))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    harness.save_figure(fig, path, dpi=110)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.replica_routing", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--endpoint", default="http://127.0.0.1:8000")
    p.add_argument("--serve", default=None, metavar="ARGS",
                   help="start a fresh `kvplug serve ARGS --routing MODE` per mode instead of using --endpoint")
    p.add_argument("--modes", default="tier-aware,affinity,round-robin", help="comma list, run in this order")
    p.add_argument("--out", default="benchmarks/results/replica_routing.json")
    p.add_argument("--runs-dir", default="results/replica_routing", help="bench run folders (bulky, git-ignored)")
    p.add_argument("--plot-only", action="store_true", help="redraw the PNG and table from --out")
    p.add_argument("--kill-replica-after", type=float, default=None, metavar="SECONDS",
                   help="with --serve: kill one replica's vLLM server this long into each mode's bench run")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    bench_args: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, bench_args = argv[:i], argv[i + 1:]
    p = parser()
    args = p.parse_args(argv)
    if args.kill_replica_after is not None and args.serve is None:
        p.error("--kill-replica-after needs --serve (it kills a replica this script started)")
    png = Path(args.out).with_suffix(".png")
    if args.plot_only:
        runs = json.loads(Path(args.out).read_text())["runs"]
        plot(runs, png)
        print(table(runs))
        return 0
    runs = []
    out = {"command": harness.command_line("benchmarks.replica_routing", [*argv, "--", *bench_args]),
           "device": f"{harness.device_name()} ({os.cpu_count()} cores)", "date": harness.utc_now(), "load_average": os.getloadavg(),
           "bench_args": bench_args, "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for i, mode in enumerate(m for m in args.modes.split(",") if m):
        run_dir = Path(args.runs_dir) / f"{i}-{mode}"
        if args.serve is not None:
            runs.append(serve_and_run(shlex.split(args.serve), mode, run_dir, bench_args, args.kill_replica_after))
        else:
            runs.append(run_mode(args.endpoint, mode, run_dir, bench_args))
        Path(args.out).write_text(json.dumps(out, indent=2))  # a run cut short keeps what it measured
    if args.serve is None:
        out["replicas"] = httpx.get(args.endpoint.rstrip("/") + "/replicas", timeout=30).json()
    Path(args.out).write_text(json.dumps(out, indent=2))
    plot(runs, png)
    print(table(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
