"""Summary statistics and the Markdown report of a run."""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np

from benchmarks.scbench.client import CACHE_SOURCES

PCTS = (50, 90, 99)


def _pct(values: list[float]) -> dict | None:
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    arr = np.asarray(vals, dtype=float)
    out = {f"p{p}": float(np.percentile(arr, p)) for p in PCTS}
    out["mean"] = float(arr.mean())
    out["n"] = len(vals)
    return out


def _mean(values: list[float]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def summarize(records: list[dict], wall_s: float, metrics: dict | None = None) -> dict:
    ok = [r for r in records if r["status"] == "ok"]
    errors = [r for r in records if r["status"] == "error"]
    cancelled = [r for r in records if r["status"] == "cancelled"]
    by_turn: dict[int, list[dict]] = defaultdict(list)
    by_task: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_turn[r["turn"]].append(r)
        by_task[r["task"]].append(r)

    def acc(rs: list[dict]) -> dict:
        scored = [r["score"] for r in rs if r["status"] == "ok"]
        attempted = [r for r in rs if r["status"] != "cancelled"]
        return {
            "accuracy": _mean(scored),
            # errors count as 0 here
            "accuracy_incl_errors": (sum(scored) / len(attempted)) if attempted else None,
            "n": len(scored),
        }

    out_tokens = sum(r["output_tokens"] or 0 for r in ok)
    prompt_tokens = sum(r["prompt_tokens"] or 0 for r in ok)
    cached = [r["cached_tokens"] for r in ok if r.get("cached_tokens") is not None]
    err_kinds = Counter()
    for r in errors:
        kind = (r.get("error") or "error").split(":", 1)[0]
        err_kinds[kind] += 1
    summary = {
        "requests": len(records),
        "completed": len(ok),
        "errors": len(errors),
        "cancelled": len(cancelled),
        "error_kinds": dict(err_kinds),
        "wall_s": wall_s,
        **acc(records),
        "accuracy_per_turn": {str(t): acc(rs) for t, rs in sorted(by_turn.items())},
        "accuracy_per_task": {k: acc(rs) for k, rs in sorted(by_task.items())},
        "ttft_s": _pct([r["ttft"] for r in ok]),
        # turns >= 2 re-send a prefix the server has seen: the number prefix caching improves
        "ttft_followup_s": _pct([r["ttft"] for r in ok if r["turn"] > 1]),
        "tpot_s": _pct([r["tpot"] for r in ok]),
        "e2e_s": _pct([r["e2e"] for r in ok]),
        "ttft_per_turn_s": {str(t): _pct([r["ttft"] for r in rs if r["status"] == "ok"])
                            for t, rs in sorted(by_turn.items())},
        "prompt_tokens_per_turn": {str(t): _mean([r["prompt_tokens"] for r in rs
                                                  if r["status"] == "ok"])
                                   for t, rs in sorted(by_turn.items())},
        "throughput": {
            "requests_per_s": len(ok) / wall_s if wall_s > 0 else None,
            "output_tokens_per_s": out_tokens / wall_s if wall_s > 0 else None,
            "total_tokens_per_s": (out_tokens + prompt_tokens) / wall_s if wall_s > 0 else None,
            "output_tokens": out_tokens,
            "prompt_tokens": prompt_tokens,
        },
        "server_cached_prompt_tokens": sum(cached) if cached else None,
        "cache_sources": cache_sources(ok),
        "prefix_cache_hit_rate": (metrics or {}).get("prefix_cache_hit_rate"),
        "metrics": metrics,
    }
    return summary


def cache_sources(ok: list[dict]) -> dict | None:
    """Prompt tokens by where their KV came from (the x-kvplug-cache header of kvplug serve --offload): in
    total and per turn, with the first-miss reasons; None when no request carried the header."""
    reported = [r for r in ok if r.get("cache")]
    if not reported:
        return None

    def tokens(rs: list[dict]) -> dict:
        return {s: sum(r["cache"].get(s, 0) for r in rs) for s in CACHE_SOURCES}

    by_turn: dict[int, list[dict]] = defaultdict(list)
    for r in reported:
        by_turn[r["turn"]].append(r)
    return {"requests": len(reported), "tokens": tokens(reported),
            "per_turn": {str(t): tokens(rs) for t, rs in sorted(by_turn.items())},
            "miss_reasons": dict(Counter(r["cache"].get("miss", "none") for r in reported).most_common())}


def _f(v, scale: float = 1.0, digits: int = 3, suffix: str = "") -> str:
    if v is None:
        return "–"
    return f"{v * scale:.{digits}f}{suffix}"


def _pct_row(name: str, d: dict | None, scale: float = 1000.0) -> str:
    if not d:
        return f"| {name} | – | – | – | – |"
    return (f"| {name} | {_f(d['p50'], scale, 1)} | {_f(d['p90'], scale, 1)} | "
            f"{_f(d['p99'], scale, 1)} | {_f(d['mean'], scale, 1)} |")


def markdown(result: dict) -> str:
    cfg, env, s = result["config"], result["environment"], result["summary"]
    lines = [
        f"# kvplug bench: {cfg['task']} / {cfg['mode']}",
        "",
        f"- command: `{result.get('command', '?')}`",
        f"- endpoint: `{env['endpoint']}`, model: `{env['model']}`, server version: "
        f"{env.get('server_version') or '?'}, client host: {env.get('host', '?')}",
        f"- started: {env['started']}, wall: {s['wall_s']:.1f} s, stop: {result['stop_reason']}",
        f"- sessions: {cfg['sessions']}, turns: {cfg['turns']}, context: {cfg['context_tokens']} "
        f"tokens ({env.get('tokenizer')}), concurrency: {cfg['concurrency']}, "
        f"rate: {cfg['rate']}, max_tokens: {cfg['max_tokens']}, seed: {cfg['seed']}, "
        f"own answers: {cfg['own_answers']}",
        "",
        "## Headline",
        "",
        "| metric | value |",
        "| --- | --- |",
        f"| requests (ok / errors / cancelled) | {s['completed']} / {s['errors']} / {s['cancelled']} |",
        f"| accuracy (ok requests) | {_f(s['accuracy'])} |",
        f"| accuracy (errors as 0) | {_f(s['accuracy_incl_errors'])} |",
        f"| TTFT p50 (ms) | {_f((s['ttft_s'] or {}).get('p50'), 1000, 1)} |",
        f"| TTFT p50 follow-up turns (ms) | {_f((s['ttft_followup_s'] or {}).get('p50'), 1000, 1)} |",
        f"| TPOT p50 (ms) | {_f((s['tpot_s'] or {}).get('p50'), 1000, 1)} |",
        f"| E2E p50 (ms) | {_f((s['e2e_s'] or {}).get('p50'), 1000, 1)} |",
        f"| throughput (req/s) | {_f(s['throughput']['requests_per_s'])} |",
        f"| output tokens/s | {_f(s['throughput']['output_tokens_per_s'], 1, 1)} |",
        f"| prefix-cache hit rate (server) | {_f(s['prefix_cache_hit_rate'])}"
        f"{' (cache reset before the run)' if env.get('prefix_cache_reset') else ''} |",
        "",
        "## Latency (ms)",
        "",
        "| | p50 | p90 | p99 | mean |",
        "| --- | --- | --- | --- | --- |",
        _pct_row("TTFT", s["ttft_s"]),
        _pct_row("TTFT follow-up turns", s["ttft_followup_s"]),
        _pct_row("TPOT", s["tpot_s"]),
        _pct_row("E2E", s["e2e_s"]),
        "",
        "## Per turn",
        "",
        "| turn | n ok | accuracy | TTFT p50 (ms) | TTFT p90 (ms) | mean prompt tokens |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for t, a in s["accuracy_per_turn"].items():
        tt = s["ttft_per_turn_s"].get(t) or {}
        lines.append(f"| {t} | {a['n']} | {_f(a['accuracy'])} | {_f(tt.get('p50'), 1000, 1)} | "
                     f"{_f(tt.get('p90'), 1000, 1)} | {_f(s['prompt_tokens_per_turn'].get(t), 1, 0)} |")
    cs = s.get("cache_sources")
    if cs:
        lines += ["", f"## Where the prompt KV came from ({cs['requests']} requests with x-kvplug-cache)", "",
                  "| turn | " + " | ".join(CACHE_SOURCES) + " |", "| --- |" + " --- |" * len(CACHE_SOURCES)]
        for t, tok in [*cs["per_turn"].items(), ("all", cs["tokens"])]:
            total = sum(tok.values()) or 1
            lines.append(f"| {t} | " + " | ".join(f"{tok[k]} ({tok[k] / total:.0%})" for k in CACHE_SOURCES) + " |")
        lines += ["", "first miss: " + ", ".join(f"{k} {v}" for k, v in cs["miss_reasons"].items())]
    if len(s["accuracy_per_task"]) > 1:
        lines += ["", "## Per task", "", "| task | n ok | accuracy |", "| --- | --- | --- |"]
        for k, a in s["accuracy_per_task"].items():
            lines.append(f"| {k} | {a['n']} | {_f(a['accuracy'])} |")
    if s["errors"]:
        lines += ["", "## Errors", ""]
        for k, n in s["error_kinds"].items():
            lines.append(f"- {k}: {n}")
        first = next(r for r in result["requests"] if r["status"] == "error")
        lines.append(f"- first: session {first['session']} turn {first['turn']}: `{first['error']}`")
    m = s.get("metrics") or {}
    if m.get("available"):
        deltas = m.get("deltas") or {}
        lines += ["", "## Server metrics (delta over the run)", ""]
        nonzero = {k: v for k, v in deltas.items() if v}
        if nonzero:
            lines += ["| sample | delta |", "| --- | --- |"]
            lines += [f"| `{k}` | {v:g} |" for k, v in nonzero.items()]
        if len(nonzero) < len(deltas):
            lines += ["", f"({len(deltas) - len(nonzero)} more kvplug/headline samples unchanged; "
                      "all deltas are in results.json)"]
        if not deltas:
            lines.append("(no kvplug or headline samples)")
    elif m:
        lines += ["", f"Server metrics unavailable: {m.get('error', 'no /metrics')}"]
    plots = result.get("plots") or []
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"
