"""PNG plots of a run (matplotlib, Agg backend)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from benchmarks.scbench.client import CACHE_SOURCES

PLOTS = ("ttft_per_turn.png", "accuracy_per_turn.png", "latency_cdf.png")
CACHE_PLOT = "cache_sources.png"  # only for runs against kvplug serve --offload (the x-kvplug-cache header)
SOURCE_COLORS = {"gpu": "tab:green", "cpu": "tab:blue", "disk": "tab:purple", "recomputed": "tab:gray"}


def write_plots(result: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    ok = [r for r in result["requests"] if r["status"] == "ok"]
    title = f"{result['config']['task']} / {result['config']['mode']} — {result['environment']['model']}"
    turns = sorted({r["turn"] for r in result["requests"]})
    written = []

    # Seconds when latencies run into tens of seconds (slow CPU runs), else milliseconds.
    lat = [r[k] for r in ok for k in ("ttft", "e2e") if r[k]]
    unit, scale = ("s", 1.0) if lat and max(lat) > 10 else ("ms", 1000.0)

    # TTFT per turn (box plot + median line).
    fig, ax = plt.subplots(figsize=(6, 4))
    data = [[r["ttft"] * scale for r in ok if r["turn"] == t and r["ttft"] is not None] for t in turns]
    if any(data):
        ax.boxplot([d if d else [np.nan] for d in data], tick_labels=[str(t) for t in turns])
        med = [np.median(d) if d else np.nan for d in data]
        ax.plot(range(1, len(turns) + 1), med, marker="o", label="median")
        ax.legend()
    ax.set_xlabel("turn")
    ax.set_ylabel(f"TTFT ({unit})")
    ax.set_title(f"TTFT per turn\n{title}", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / PLOTS[0], dpi=110)
    plt.close(fig)
    written.append(PLOTS[0])

    # Accuracy per turn.
    fig, ax = plt.subplots(figsize=(6, 4))
    per_turn = defaultdict(list)
    for r in ok:
        per_turn[r["turn"]].append(r["score"])
    accs = [float(np.mean(per_turn[t])) if per_turn[t] else 0.0 for t in turns]
    bars = ax.bar([str(t) for t in turns], accs, color="tab:green")
    for b, t in zip(bars, turns):
        ax.annotate(f"{b.get_height():.2f}\n(n={len(per_turn[t])})",
                    (b.get_x() + b.get_width() / 2, b.get_height()),
                    ha="center", va="bottom", fontsize=8)
    ax.set_ylim(0, 1.15)
    ax.set_xlabel("turn")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Accuracy per turn\n{title}", fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(out_dir / PLOTS[1], dpi=110)
    plt.close(fig)
    written.append(PLOTS[1])

    # Latency CDFs.
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("ttft", "TTFT"), ("e2e", "end-to-end")):
        vals = np.sort([r[key] * scale for r in ok if r[key] is not None])
        if len(vals):
            ax.step(vals, np.arange(1, len(vals) + 1) / len(vals), where="post", label=label)
    if lat and max(lat) / max(min(lat), 1e-9) > 20:
        ax.set_xscale("log")
    ax.set_xlabel(f"latency ({unit})")
    ax.set_ylabel("fraction of requests")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"Latency CDF\n{title}", fontsize=9)
    ax.grid(alpha=0.3)
    if ok:
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / PLOTS[2], dpi=110)
    plt.close(fig)
    written.append(PLOTS[2])
    if (result["summary"].get("cache_sources")):
        _cache_plot(plt, result, ok, title, out_dir / CACHE_PLOT)
        written.append(CACHE_PLOT)
    return written


def _cache_plot(plt, result: dict, ok: list[dict], title: str, path: Path) -> None:
    """Which tier served each turn: the share of prompt tokens per source per turn (left), and every request's
    tokens per source in the order they were sent, grouped by session (right)."""
    import numpy as np

    per_turn = result["summary"]["cache_sources"]["per_turn"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [1, 2]})
    turns = list(per_turn)
    bottom = np.zeros(len(turns))
    for src in CACHE_SOURCES:
        share = np.array([per_turn[t][src] / max(1, sum(per_turn[t].values())) for t in turns])
        ax.bar(turns, share, bottom=bottom, color=SOURCE_COLORS[src], label=src)
        bottom += share
    ax.set_ylim(0, 1)
    ax.set_xlabel("turn")
    ax.set_ylabel("share of prompt tokens")
    ax.set_title("Where each turn's prompt KV came from", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    reqs = sorted((r for r in ok if r.get("cache")), key=lambda r: (str(r["session"]), r["turn"], r["start"]))
    x = np.arange(len(reqs))
    bottom = np.zeros(len(reqs))
    for src in CACHE_SOURCES:
        vals = np.array([r["cache"].get(src, 0) for r in reqs], dtype=float)
        ax2.bar(x, vals, bottom=bottom, color=SOURCE_COLORS[src], width=0.9)
        bottom += vals
    for i in range(1, len(reqs)):
        if reqs[i]["session"] != reqs[i - 1]["session"]:
            ax2.axvline(i - 0.5, color="black", lw=0.5, alpha=0.4)
    ax2.set_xlabel("request (grouped by session, turns in order)")
    ax2.set_ylabel("prompt tokens")
    ax2.set_title(f"Per request\n{title}", fontsize=9)
    ax2.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
