"""PNG plots of a run (matplotlib, Agg backend)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

PLOTS = ("ttft_per_turn.png", "accuracy_per_turn.png", "latency_cdf.png")


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
    return written
