"""Prefix-affinity vs round-robin routing over replicas, measured with `kvplug bench run`.

Against a running `kvplug serve --replicas N` endpoint (start its replicas with VLLM_SERVER_DEV_MODE=1 so
the prefix caches can be reset between runs), for each mode in --modes: switch the router's mode at run
time (PUT /router/routing), reset every replica's prefix cache, run the same seeded SCBench-style
multi-turn workload, then write one JSON with the prefix-cache hit rate, follow-up-turn TTFT and the
router's own counters per run, and print a Markdown table.

    VLLM_SERVER_DEV_MODE=1 kvplug serve --replicas 2 --port 8000 &
    python -m benchmarks.replica_routing --endpoint http://127.0.0.1:8000 \\
        --out benchmarks/results/replica_routing_cpu.json -- --context-tokens 1500 --turns 4 --sessions 4
Arguments after `--` go to `kvplug bench run` unchanged.
"""
from __future__ import annotations

import argparse
import json
import sys
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


def run_mode(endpoint: str, mode: str, out_dir: Path, bench_args: list[str]) -> dict:
    r = httpx.put(endpoint.rstrip("/") + "/router/routing", json={"mode": mode}, timeout=30)
    if r.status_code != 200:
        raise SystemExit(f"{endpoint} did not switch to {mode}: HTTP {r.status_code} {r.text[:200]} "
                         "(is it `kvplug serve --replicas N`?)")
    rc = harness.run_kvplug(["bench", "run", "--endpoint", endpoint, "--reset-prefix-cache", "--out", str(out_dir),
                             "--label", out_dir.name, "--no-progress", *bench_args]).returncode
    if rc != 0:
        raise SystemExit(f"kvplug bench run failed for {mode} (exit {rc})")
    res = json.loads((out_dir / "results.json").read_text())
    s = res["summary"]
    m = s.get("metrics") or {}
    return {"mode": mode, "label": out_dir.name, "results": str(out_dir / "results.json"),
            "prefix_cache_hit_rate": m.get("prefix_cache_hit_rate"),
            "prefix_cache_reset": res["environment"].get("prefix_cache_reset"),
            "ttft_followup_s": s.get("ttft_followup_s"), "ttft_s": s.get("ttft_s"),
            "ttft_per_turn_s": s.get("ttft_per_turn_s"), "requests": s.get("requests"),
            "errors": s.get("errors"), "router": _router_deltas(m.get("deltas") or {})}


def table(runs: list[dict]) -> str:
    def ms(d, k):
        return "–" if not d or d.get(k) is None else f"{d[k] * 1000:.0f}"

    lines = ["| routing | prefix-cache hit rate | follow-up TTFT p50 (ms) | follow-up TTFT p90 (ms) | "
             "turn-1 TTFT p50 (ms) | affinity hits | fallbacks | errors |",
             "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        hit = r["prefix_cache_hit_rate"]
        t1 = (r["ttft_per_turn_s"] or {}).get("1")
        lines.append(f"| {r['mode']} | {'–' if hit is None else f'{hit:.1%}'} | {ms(r['ttft_followup_s'], 'p50')} | "
                     f"{ms(r['ttft_followup_s'], 'p90')} | {ms(t1, 'p50')} | "
                     f"{r['router'].get('kvplug_router_affinity_hits_total', 0):.0f} | "
                     f"{r['router'].get('kvplug_router_fallbacks_total', 0):.0f} | {r['errors']} |")
    return "\n".join(lines)


def plot(runs: list[dict], path: Path) -> None:
    """TTFT p50 per turn, one line per run: turn 2 is where round-robin lands on a cold replica."""
    fig, ax = harness.pyplot().subplots(figsize=(6, 3.6))
    for i, r in enumerate(runs):
        turns = sorted((r["ttft_per_turn_s"] or {}), key=int)
        ys = [(r["ttft_per_turn_s"][t] or {}).get("p50") for t in turns]
        ax.plot([int(t) for t in turns], ys, marker="o", linestyle="-" if r["mode"] == "affinity" else "--",
                color="tab:blue" if r["mode"] == "affinity" else "tab:orange", label=f"{r['mode']} (run {i + 1})")
    ax.set_xticks(sorted({int(t) for r in runs for t in (r["ttft_per_turn_s"] or {})}))
    ax.set_xlabel("turn")
    ax.set_ylabel("TTFT p50 (s)")
    ax.set_title("2 replicas: prefix affinity vs round-robin")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    harness.save_figure(fig, path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    bench_args: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, bench_args = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(prog="python -m benchmarks.replica_routing", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--endpoint", default="http://127.0.0.1:8000")
    p.add_argument("--modes", default="affinity,round-robin", help="comma list, run in this order")
    p.add_argument("--out", default="benchmarks/results/replica_routing.json")
    p.add_argument("--runs-dir", default="/results/replica_routing", help="bench run folders (bulky)")
    p.add_argument("--plot-only", action="store_true", help="redraw the PNG and table from --out")
    args = p.parse_args(argv)
    png = Path(args.out).with_suffix(".png")
    if args.plot_only:
        runs = json.loads(Path(args.out).read_text())["runs"]
        plot(runs, png)
        print(table(runs))
        return 0
    runs = []
    for i, mode in enumerate(m for m in args.modes.split(",") if m):
        runs.append(run_mode(args.endpoint, mode, Path(args.runs_dir) / f"{i}-{mode}", bench_args))
    replicas = httpx.get(args.endpoint.rstrip("/") + "/replicas", timeout=30).json()
    out = {"command": harness.command_line("benchmarks.replica_routing", [*argv, "--", *bench_args]),
           "bench_args": bench_args, "replicas": replicas, "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    plot(runs, png)
    print(table(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
