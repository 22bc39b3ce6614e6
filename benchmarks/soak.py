"""Reliability soak: mixed cache policies on shared prefixes through the offload tiers, checked against a
server without offload.

    python -m benchmarks.soak --minutes 10 --out results/soak

1. ``kvplug serve --offload cpu:1GiB,disk:DIR:2GiB`` with a small KV cache (so prefixes leave it and come
   back from the tiers), and a ``kvplug bench run --repeat --policy-mix keep,quant:int8,quant:int4,
   drop:streaming`` load: every context is shared by one multi-turn session per policy, sessions start over
   until the time is up. The server's resident memory (all its processes) is sampled throughout.
2. The same model without offload runs the same load for the same time, then replays every distinct chat
   twice in a row (as it comes, then as a full prefix-cache hit); the sessions of one context send the same
   chats whatever their policy.

A keep prefix comes back from the tiers byte for byte (tests/offload), but the KV a CPU engine computes
for a token depends on the batch and chunk it was computed in (vLLM's CPU kernels round a whole-prompt
pass and a hit-plus-suffix pass differently), so greedy answers of a weak model flip on near-ties with or
without offload: strict identity with a second server is not a test of the KV store. The check is against
the no-offload server's own spread: the share of keep answers that differ from both replay answers must not
exceed the no-offload server's own share under the same load (its 95% interval). The lossy policies' shares,
reported beside it, show what the measurement sees when the KV does change.

Writes ``soak.json`` (errors, per-policy counts, agreement per policy with the replay, RSS samples and growth after warm-up, the
offload counters) and ``rss.png`` into --out; exit 1 when a check fails.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import json
import math
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from benchmarks import harness

POLICIES = "keep,quant:int8,quant:int4,drop:streaming"
RSS_GROWTH_LIMIT = 0.10


def _tree_rss_bytes(root_pid: int) -> int:
    """Resident memory of ``root_pid`` and all its descendants (API server, engine core, workers)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/statm") as f:
                rss[int(entry)] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [root_pid]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo += children.get(pid, [])
    return total


class RssSampler(threading.Thread):
    def __init__(self, pid: int, every_s: float) -> None:
        super().__init__(daemon=True)
        self.pid, self.every_s, self.samples = pid, every_s, []
        self._stop_event = threading.Event()
        self.t0 = time.monotonic()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.samples.append((round(time.monotonic() - self.t0, 1), _tree_rss_bytes(self.pid)))
            self._stop_event.wait(self.every_s)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def _offload_counters(base: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for s in harness.scrape_samples(base, ("kvplug_offload", "vllm:prefix_cache")):
        if not s["name"].endswith("_created"):
            label = ",".join(f"{k}={v}" for k, v in sorted(s["labels"].items()) if k not in ("engine", "model_name"))
            key = f"{s['name']}{{{label}}}" if label else s["name"]
            out[key] = out.get(key, 0.0) + s["value"]
    return out


def _ok_records(load_dir: Path, policy: str | None = None) -> list[dict]:
    return [r for r in json.loads((load_dir / "results.json").read_text())["requests"]
            if r["status"] == "ok" and (policy is None or r.get("policy") == policy)]


def replay_requests(base: str, model: str, load_dir: Path, max_tokens: int) -> dict:
    """Send every distinct request of the load in ``load_dir`` (every policy's sessions of a context send the
    same chat) to ``base`` twice, as it comes and then as a full prefix-cache hit: (case id, turn) -> answers."""
    from benchmarks.scbench.client import stream_chat
    from benchmarks.scbench.load import turn_messages
    from benchmarks.scbench.scoring import answer_text
    from benchmarks.scbench.tasks.base import Case

    cases = {c["id"]: Case.from_dict(c) for c in json.loads((load_dir / "cases.json").read_text())}
    distinct = sorted({(r["case_id"], r["turn"]) for r in _ok_records(load_dir)})

    async def go() -> dict:
        async with httpx.AsyncClient(timeout=httpx.Timeout(600)) as client:
            out = {}
            for case_id, turn in distinct:
                case = cases[case_id]
                replies = [answer_text(t.answer) for t in case.multi_turns[:turn - 1]]
                messages = turn_messages(case, turn - 1, replies)
                answers = []
                for _ in range(2):  # as it comes, then a full prefix-cache hit
                    res = await stream_chat(client, base + "/v1", model, messages, max_tokens, 0.0)
                    answers.append(res.text if res.status == "ok" else None)
                out[(case_id, turn)] = answers
            return out

    return asyncio.run(go())


def compare_with_no_offload(soak: list[dict], reference_load: list[dict], replay: dict) -> dict:
    """Every policy's answers on the soak server against the no-offload server's answers to the same chats.

    ``differ_from_replay``: the share of answers that are neither of the replay's two answers, per policy on the
    offload server and over all requests of the no-offload server under the same load (its own spread, the
    baseline); ``keep_unseen``: keep answers the no-offload server never gave (under load or in the replay)."""
    seen: dict[tuple, set] = {}
    for r in reference_load:
        seen.setdefault((r["case_id"], r["turn"]), set()).add(r["prediction"])
    for key, answers in replay.items():
        seen.setdefault(key, set()).update(answers)

    def differs(records: list[dict]) -> dict:
        judged = [r for r in records if (r["case_id"], r["turn"]) in replay]
        d = sum(r["prediction"] not in replay[(r["case_id"], r["turn"])] for r in judged)
        return {"n": len(judged), "differ": d, "rate": round(d / len(judged), 4) if judged else None,
                "ci95": harness.wilson(d, len(judged))}

    keep = [r for r in soak if r.get("policy") == "keep"]
    unseen = [{"case_id": r["case_id"], "turn": r["turn"], "round": r.get("round"), "soak": r["prediction"],
               "no_offload": sorted(seen.get((r["case_id"], r["turn"]), ()), key=str)}
              for r in keep if r["prediction"] not in seen.get((r["case_id"], r["turn"]), ())]
    policies = sorted({r.get("policy", "default") for r in soak})
    return {"distinct_requests": len(replay), "keep_requests": len(keep), "keep_unseen_count": len(unseen),
            "differ_from_replay": {"no_offload (baseline)": differs(reference_load),
                                   **{p: differs([r for r in soak if r.get("policy", "default") == p])
                                      for p in policies}},
            "replay_answers_differ": sum(a != b for a, b in replay.values()), "keep_unseen": unseen[:20],
            "replay": [{"case_id": c, "turn": t, "answers": a} for (c, t), a in sorted(replay.items())]}


def _plot(samples: list[tuple[float, int]], warmup_s: float, path: Path) -> None:
    fig, ax = harness.pyplot().subplots(figsize=(7, 3.5))
    ax.plot([t / 60 for t, _ in samples], [b / 2**30 for _, b in samples])
    ax.axvline(warmup_s / 60, color="grey", linestyle="--", label="end of warm-up")
    ax.set_xlabel("minutes")
    ax.set_ylabel("server RSS (GiB, all processes)")
    ax.set_title("kvplug soak: resident memory")
    ax.legend()
    harness.save_figure(fig, path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="kvplug model name or folder (default: kvplug's default)")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--warmup-minutes", type=float, default=2.0, help="RSS growth is measured after this")
    p.add_argument("--sessions", type=int, default=32)
    p.add_argument("--policies", default=POLICIES)
    p.add_argument("--context-tokens", type=int, default=3000)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--cpu-size", default="1GiB")
    p.add_argument("--disk-size", default="2GiB")
    p.add_argument("--disk-path", default=None, help="default: a fresh temporary folder")
    p.add_argument("--kv-cache-memory-bytes", default="512M",
                   help="the engine's own KV cache: small, so prefixes leave it and come back from the tiers")
    p.add_argument("--out", default="results/soak")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    disk = Path(args.disk_path) if args.disk_path else Path(tempfile.mkdtemp(prefix="kvplug-soak-disk-"))
    model = [args.model] if args.model else []
    engine = ["--kv-cache-memory-bytes", args.kv_cache_memory_bytes]
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    bench_cmd = ["bench", "run", "--task", "kv", "--mode", "multi-turn",
                 "--context-tokens", str(args.context_tokens), "--turns", str(args.turns),
                 "--sessions", str(args.sessions), "--concurrency", str(args.sessions),
                 "--policy-mix", args.policies, "--repeat", "--max-seconds", str(args.minutes * 60),
                 "--max-tokens", str(args.max_tokens), "--save-cases", "--out", str(out / "load")]
    offload = f"cpu:{args.cpu_size},disk:{disk}:{args.disk_size}"
    dev_env = dict(os.environ, VLLM_SERVER_DEV_MODE="1")
    with harness.serve_kvplug([*model, "--offload", offload, *engine], out / "server-offload.log", env=dev_env,
                              tag="soak") as server:
        sampler = RssSampler(server.proc.pid, every_s=5.0)
        sampler.start()
        before = _offload_counters(server.base)
        bench = harness.run_kvplug([*bench_cmd, "--endpoint", server.base])
        after = _offload_counters(server.base)
        sampler.stop()
        served = httpx.get(server.base + "/v1/models", timeout=30).json()["data"][0]["id"]
    if bench.returncode != 0:
        print(f"[soak] kvplug bench run failed with {bench.returncode}", file=sys.stderr)
        return 1
    load = json.loads((out / "load" / "results.json").read_text())
    with harness.serve_kvplug([*model, *engine], out / "server-reference.log", env=dev_env, tag="soak") as server:
        reference_bench = harness.run_kvplug([*bench_cmd[:-1], str(out / "load-no-offload"), "--endpoint", server.base])
        if reference_bench.returncode != 0:
            print(f"[soak] kvplug bench run (no offload) failed with {reference_bench.returncode}", file=sys.stderr)
            return 1
        replay = replay_requests(server.base, served, out / "load", args.max_tokens)
    agreement = compare_with_no_offload(_ok_records(out / "load"), _ok_records(out / "load-no-offload"), replay)

    warmup_s = args.warmup_minutes * 60
    after_warmup = [b for t, b in sampler.samples if t >= warmup_s]
    rss_growth = (max(after_warmup) / after_warmup[0] - 1) if after_warmup else None
    per_policy: dict[str, dict[str, int]] = {}
    for r in load["requests"]:
        c = per_policy.setdefault(r.get("policy", "default"), {"ok": 0, "error": 0, "cancelled": 0})
        c[r["status"]] = c.get(r["status"], 0) + 1
    errors = sum(c.get("error", 0) for c in per_policy.values())
    counters = {k: after[k] - before.get(k, 0.0) for k in after if after[k] - before.get(k, 0.0)}
    result = {
        "kind": "kvplug-soak", "started": started, "device": f"CPU ({platform.machine()}, {os.cpu_count()} cores)",
        "command": harness.command_line("benchmarks.soak", argv),
        "server": f"kvplug serve {' '.join(model)} --offload {offload} {' '.join(engine)}",
        "load": " ".join(["kvplug", *bench_cmd]),
        "requests": len(load["requests"]), "errors": errors, "per_policy": per_policy,
        "vs_no_offload": agreement, "rss_samples": sampler.samples, "rss_growth_after_warmup": rss_growth,
        "offload_counters": counters,
    }
    (out / "soak.json").write_text(json.dumps(result, indent=1) + "\n")
    _plot(sampler.samples, warmup_s, out / "rss.png")
    rates = agreement["differ_from_replay"]
    base, keep = rates["no_offload (baseline)"], rates.get("keep", {"n": 0})
    checks = {"0 errors": errors == 0,
              # Offload must add no disagreement for keep beyond the no-offload server's own spread.
              "keep differs from the replay no more than the no-offload server does (within its 95% interval)":
                  bool(keep["n"] and base["n"]) and keep["rate"] <= base["ci95"][1],
              f"RSS growth <= {RSS_GROWTH_LIMIT:.0%}": rss_growth is not None and rss_growth <= RSS_GROWTH_LIMIT}
    print(f"[soak] {len(load['requests'])} requests, {errors} errors; {agreement['distinct_requests']} distinct "
          f"chats replayed on the no-offload server; keep answers it never gave: {agreement['keep_unseen_count']}/"
          f"{agreement['keep_requests']}")
    for name, r in rates.items():
        print(f"[soak] differ from the replay, {name}: {r['differ']}/{r['n']} = {r['rate']} (95% CI {r['ci95']})")
    print(f"[soak] RSS growth after warm-up: " + (f"{rss_growth:.1%}" if rss_growth is not None else "no samples"))
    for name, ok in checks.items():
        print(f"[soak] {'PASS' if ok else 'FAIL'}: {name}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
