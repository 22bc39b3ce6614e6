"""Side-by-side table of several result files (``kvplug bench compare``)."""

from __future__ import annotations

import json
from pathlib import Path


class CompareError(ValueError):
    pass


def load_result(path: str) -> tuple[str, dict]:
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise CompareError(f"{path}: no such results file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CompareError(f"{path}: not a JSON results file ({e})") from None
    if not isinstance(data, dict) or "summary" not in data or "config" not in data:
        raise CompareError(f"{path}: not a kvplug bench results file (no summary/config)")
    label = data.get("label") or (p.parent.name if p.name == "results.json" else p.stem)
    return label, data


def _g(d, *keys):
    for k in keys:
        if d is None:
            return None
        d = d.get(k) if isinstance(d, dict) else None
    return d


def _fmt(v, scale=1.0, digits=3):
    if v is None:
        return "–"
    if isinstance(v, str):
        return v
    return f"{v * scale:.{digits}f}"


ROWS = [
    ("endpoint", lambda r: _g(r, "environment", "endpoint")),
    ("model", lambda r: _g(r, "environment", "model")),
    ("task / mode", lambda r: f"{_g(r, 'config', 'task')} / {_g(r, 'config', 'mode')}"),
    ("context tokens", lambda r: str(_g(r, "config", "context_tokens"))),
    ("sessions × turns", lambda r: f"{_g(r, 'config', 'sessions')} × {_g(r, 'config', 'turns')}"),
    ("requests ok / err / cancelled", lambda r: "{} / {} / {}".format(
        _g(r, "summary", "completed"), _g(r, "summary", "errors"), _g(r, "summary", "cancelled"))),
    ("accuracy", lambda r: _fmt(_g(r, "summary", "accuracy"))),
    ("TTFT p50 (ms)", lambda r: _fmt(_g(r, "summary", "ttft_s", "p50"), 1000, 1)),
    ("TTFT p90 (ms)", lambda r: _fmt(_g(r, "summary", "ttft_s", "p90"), 1000, 1)),
    ("TTFT follow-up p50 (ms)", lambda r: _fmt(_g(r, "summary", "ttft_followup_s", "p50"), 1000, 1)),
    ("TTFT follow-up p99 (ms)", lambda r: _fmt(_g(r, "summary", "ttft_followup_s", "p99"), 1000, 1)),
    ("TPOT p50 (ms)", lambda r: _fmt(_g(r, "summary", "tpot_s", "p50"), 1000, 1)),
    ("E2E p50 (ms)", lambda r: _fmt(_g(r, "summary", "e2e_s", "p50"), 1000, 1)),
    ("E2E p99 (ms)", lambda r: _fmt(_g(r, "summary", "e2e_s", "p99"), 1000, 1)),
    ("throughput (req/s)", lambda r: _fmt(_g(r, "summary", "throughput", "requests_per_s"))),
    ("output tok/s", lambda r: _fmt(_g(r, "summary", "throughput", "output_tokens_per_s"), 1, 1)),
    ("prefix-cache hit rate", lambda r: _fmt(_g(r, "summary", "prefix_cache_hit_rate"))),
]


def _predictions(result: dict) -> dict[tuple, str]:
    return {(r["case_id"], r["turn"]): r["prediction"] for r in result.get("requests") or []
            if r.get("status") == "ok"}


def _agreement(base: dict[tuple, str], other: dict[tuple, str]) -> float | None:
    """Fraction of requests (same case and turn, ok in both) whose output text is identical:
    with greedy decoding, how far a feature changes what the model says."""
    common = base.keys() & other.keys()
    if not common:
        return None
    return sum(base[k] == other[k] for k in common) / len(common)


def table(paths: list[str]) -> str:
    runs = [load_result(p) for p in paths]
    turns = sorted({t for _, r in runs for t in (_g(r, "summary", "accuracy_per_turn") or {})},
                   key=int)
    rows = list(ROWS)
    for t in turns:
        rows.append((f"accuracy turn {t}",
                     lambda r, t=t: _fmt(_g(r, "summary", "accuracy_per_turn", t, "accuracy"))))
        rows.append((f"TTFT p50 turn {t} (ms)",
                     lambda r, t=t: _fmt(_g(r, "summary", "ttft_per_turn_s", t, "p50"), 1000, 1)))
    kv_keys = sorted({k for _, r in runs for k in (_g(r, "summary", "metrics", "deltas") or {})
                      if k.startswith(("kvplug_", "kvplug:"))
                      and any(_g(r, "summary", "metrics", "deltas", k) for _, r in runs)})
    for k in kv_keys:
        rows.append((f"Δ `{k}`", lambda r, k=k: _fmt(_g(r, "summary", "metrics", "deltas", k), 1, 0)))
    base = _predictions(runs[0][1])
    rows.append((f"same answer text as {runs[0][0]}",
                 lambda r: _fmt(_agreement(base, _predictions(r)))))
    header = "| metric | " + " | ".join(label for label, _ in runs) + " |"
    sep = "| --- |" + " --- |" * len(runs)
    body = [f"| {name} | " + " | ".join(str(fn(r)) for _, r in runs) + " |" for name, fn in rows]
    return "\n".join([header, sep, *body]) + "\n"
