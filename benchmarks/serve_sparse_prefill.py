"""Sparse prefill through the server, as a user runs it (issue 16): `kvplug serve MODEL` twice on the same
flags, once with sparse prefill off (dense) and once on (kvplug's defaults: the cost model decides each chunk,
the model's shipped pattern config found by identity), and the same multi-turn `kvplug bench run` through each
(same seed, tasks, contexts: the same questions). What it reports, per arm and side by side:

* TTFT p50 per context length and turn (turn 1 prefills the context; later turns hit the prefix cache), and
  dense / sparse (> 1: sparse prefill is faster);
* accuracy per turn and per task over the questions both servers answered: n, each arm's accuracy with its 95%
  Wilson interval, sparse - dense paired per question with its 95% interval;
* answers identical to dense, overall and where dense is right (the gate: >= 95%);
* what sparse prefill did: kvplug's sparse prefill chunk counters per decision and reason (a sparse arm whose
  chunks all stayed dense says so), errors per arm.

    python -m benchmarks.serve_sparse_prefill --model /tmp/kvstage/models/qwen2.5-coder-0.5b \\
        --tasks kv,passkey --context-tokens 12000,26000 --sessions 12 --turns 3 --out $OUT/serve_sparse_prefill

Output: OUT/serve_sparse_prefill.json (summary + per-run result paths), OUT/summary.md (the tables),
OUT/serve_sparse_prefill.png (TTFT and accuracy per turn), and each bench run's own folder
OUT/ARM/TASK-CONTEXT/ (results.json, summary.md). ``--sparse-set cost_table=none`` forces every chunk from the
floor on sparse (what is measured is then the sparse path, not the product's decision).
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import statistics
import sys
import time
from pathlib import Path

from benchmarks import harness

ARMS = ("dense", "sparse")
CHUNKS_METRIC = "kvplug_sparse_prefill_chunks_total"  # a counter's samples (its _created is a timestamp)
LABEL = re.compile(r'(\w+)="([^"]*)"')


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serve_sparse_prefill", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct",
                   help="a model folder, or an embedded model's name (kvplug models list)")
    p.add_argument("--tasks", default="kv,passkey", help="kvplug bench tasks, comma-separated")
    p.add_argument("--context-tokens", default="12000,26000", help="shared context lengths, comma-separated")
    p.add_argument("--sessions", type=int, default=12, help="sessions (contexts) per task and length")
    p.add_argument("--turns", type=int, default=3, help="questions per session")
    p.add_argument("--concurrency", type=int, default=1,
                   help="requests in flight (default 1: each TTFT is the request's own, not a queue's)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="new tokens per answer (default: each task's own budget, as kvplug bench)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=V",
                   help="kvplug config for both servers (repeatable)")
    p.add_argument("--sparse-set", dest="sparse_sets", action="append", default=[], metavar="KEY=V",
                   help="sparse_prefill keys of the sparse server only (repeatable), e.g. cost_table=none")
    p.add_argument("--serve-args", default="", help="more `kvplug serve` / vLLM flags for both servers, one string")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="default: the longest context + the turns + the answer budget, within the model's positions")
    p.add_argument("--start-timeout", type=float, default=900, help="seconds a server may take to answer /health")
    p.add_argument("--out", default=None, help="output folder (default results/serve_sparse_prefill-<timestamp>)")
    p.add_argument("--no-plot", action="store_true")
    return p


def _ints(text: str, what: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"{what}: comma-separated integers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise SystemExit(f"{what}: positive integers, got {text!r}")
    return values


def check_args(args: argparse.Namespace) -> None:
    """Bad values stop the run at once with one line naming the flag (before a server starts)."""
    from benchmarks.scbench.tasks import TASKS

    for task in args.tasks.split(","):
        if task not in TASKS:
            raise SystemExit(f"--tasks: unknown task {task!r} (known: {', '.join(sorted(TASKS))})")
    args.contexts = _ints(args.context_tokens, "--context-tokens")
    for flag in ("sessions", "turns", "concurrency"):
        if getattr(args, flag) < 1:
            raise SystemExit(f"--{flag}: at least 1, got {getattr(args, flag)}")
    for kv in args.sparse_sets:
        key, sep, _ = kv.partition("=")
        if not sep or not key or "." in key:
            raise SystemExit(f"--sparse-set: KEY=VALUE of a sparse_prefill key (no section), got {kv!r}")
    for kv in args.sets:
        if kv.split("=", 1)[0].strip() == "sparse_prefill.enabled":
            raise SystemExit("--set sparse_prefill.enabled: each arm sets it (dense off, sparse on)")


def serve_args(args: argparse.Namespace, arm: str, model: str, max_model_len: int) -> list[str]:
    """`kvplug serve` arguments of one arm: the model, the same length, --set's and --serve-args for both, sparse
    prefill off (dense) or on with the --sparse-set keys (sparse)."""
    out = [model, "--max-model-len", str(max_model_len), *[x for kv in args.sets for x in ("--set", kv)],
           "--set", f"sparse_prefill.enabled={'true' if arm == 'sparse' else 'false'}"]
    if arm == "sparse":
        out += [x for kv in args.sparse_sets for x in ("--set", f"sparse_prefill.{kv}")]
    return out + shlex.split(args.serve_args)


def bench_argv(args: argparse.Namespace, endpoint: str, model: str, task: str, context: int, out_dir: Path,
               label: str) -> list[str]:
    argv = ["bench", "run", "--endpoint", endpoint, "--task", task, "--mode", "multi-turn",
            "--context-tokens", str(context), "--turns", str(args.turns), "--sessions", str(args.sessions),
            "--concurrency", str(args.concurrency), "--seed", str(args.seed), "--tokenizer", model,
            "--out", str(out_dir), "--label", label, "--no-plots"]
    return argv + (["--max-tokens", str(args.max_tokens)] if args.max_tokens is not None else [])


def run_arm(args: argparse.Namespace, arm: str, model: str, max_model_len: int, out: Path) -> dict:
    """One server for the arm, every (task, context) bench run through it; {run key: results.json path}."""
    arm_dir = out / arm
    arm_dir.mkdir(parents=True, exist_ok=True)
    runs = {}
    with harness.serve_kvplug(serve_args(args, arm, model, max_model_len), arm_dir / "serve.log",
                              timeout_s=args.start_timeout, stop_timeout_s=120,
                              tag=f"serve_sparse_prefill {arm}") as server:
        for task in args.tasks.split(","):
            for context in args.contexts:
                key = f"{task}-{context}"
                run_dir = arm_dir / key
                print(f"[serve_sparse_prefill] {arm}: {task} at {context} tokens, {args.sessions} sessions x "
                      f"{args.turns} turns", file=sys.stderr, flush=True)
                rc = harness.run_kvplug(bench_argv(args, server.base, model, task, context, run_dir,
                                                   f"{arm} {key}")).returncode
                if rc != 0:
                    raise SystemExit(f"[serve_sparse_prefill] kvplug bench run failed ({arm}, {key}, exit {rc}); "
                                     f"server log {arm_dir / 'serve.log'}")
                runs[key] = str(run_dir / "results.json")
        command = server.command
    return {"serve_command": command, "runs": runs}


def _records(results: dict[str, dict]) -> list[dict]:
    """Every request of an arm's runs (keys TASK-CONTEXT), its case id made unique across runs (the run key in
    front) and its run's target context length as ``context`` (``context_tokens`` is each case's own count)."""
    return [{**r, "case_id": f"{key}/{r['case_id']}", "context": int(key.rsplit("-", 1)[1])}
            for key, res in results.items() for r in res["requests"]]


def _p50(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def ttft_table(dense: list[dict], sparse: list[dict]) -> list[dict]:
    """Per context length and turn: TTFT p50 of each arm over its answered requests, and dense / sparse."""
    rows = []
    keys = sorted({(r["context"], r["turn"]) for r in dense + sparse})
    for context, turn in keys:
        row = {"context_tokens": context, "turn": turn}
        for arm, recs in (("dense", dense), ("sparse", sparse)):
            ttfts = [r["ttft"] for r in recs if r.get("status") == "ok" and r["context"] == context
                     and r["turn"] == turn and r.get("ttft") is not None]
            row[arm] = {"n": len(ttfts), "p50_s": _p50(ttfts)}
        d, s = row["dense"]["p50_s"], row["sparse"]["p50_s"]
        row["dense_over_sparse"] = round(d / s, 3) if d and s else None
        rows.append(row)
    return rows


def chunk_counts(results: dict[str, dict]) -> dict[str, float]:
    """kvplug's sparse prefill chunk counters summed over an arm's runs: '<decision>/<reason>' -> chunks."""
    out: dict[str, float] = {}
    for res in results.values():
        for name, value in harness.kvplug_deltas(res).items():
            if name.split("{", 1)[0] != CHUNKS_METRIC:
                continue
            labels = dict(LABEL.findall(name))
            key = f"{labels.get('decision', '?')}/{labels.get('reason', '?')}"
            out[key] = out.get(key, 0.0) + value
    return dict(sorted(out.items()))


def summarize(args: argparse.Namespace, model: str, arms: dict[str, dict], results: dict[str, dict[str, dict]]
              ) -> dict:
    dense, sparse = _records(results["dense"]), _records(results["sparse"])
    per_task = {}
    for task in args.tasks.split(","):
        d = [r for r in dense if r["task"] == task]
        s = [r for r in sparse if r["task"] == task]
        per_task[task] = {"accuracy": harness.paired_accuracy_per_turn(d, s, "dense", "sparse", overall=True)["all"],
                          "identical": harness.identical_answers(d, s)}
    chunks = {arm: chunk_counts(results[arm]) for arm in ARMS}
    sparse_chunks = sum(v for k, v in chunks["sparse"].items() if k.startswith("sparse/"))
    summary = {
        "model": model, "device": harness.device_name(), "tasks": args.tasks, "contexts": args.contexts,
        "sessions": args.sessions, "turns": args.turns, "concurrency": args.concurrency,
        "max_tokens": harness.answer_budgets(args.tasks, args.max_tokens), "sparse_sets": args.sparse_sets,
        "serve_commands": {arm: arms[arm]["serve_command"] for arm in ARMS},
        "errors": {arm: sum(res["summary"]["errors"] for res in results[arm].values()) for arm in ARMS},
        "ttft": ttft_table(dense, sparse),
        "accuracy_per_turn": harness.paired_accuracy_per_turn(dense, sparse, "dense", "sparse", overall=True),
        "accuracy_per_task": per_task,
        "identical": harness.identical_answers(dense, sparse),
        "sparse_prefill_chunks": chunks,
        "results": {arm: arms[arm]["runs"] for arm in ARMS},
    }
    if not sparse_chunks:
        summary["warning"] = ("no chunk went sparse in the sparse arm (the cost model or the floor kept every chunk "
                              "dense: see sparse_prefill_chunks); its figures are the dense path's")
    return summary


def markdown(summary: dict) -> str:
    def sec(v):
        return "–" if v is None else f"{1000 * v:.1f} ms"

    lines = [f"# Sparse prefill through the server: {Path(summary['model']).name}", "",
             f"{summary['device']}, {summary['date']}. Command: `{summary['command']}`", "",
             f"Servers: `{summary['serve_commands']['dense']}` / `{summary['serve_commands']['sparse']}`. "
             f"Errors: dense {summary['errors']['dense']}, sparse {summary['errors']['sparse']}.", ""]
    if "warning" in summary:
        lines += [f"**{summary['warning']}**", ""]
    lines += ["## TTFT p50 per context and turn", "",
              "| context | turn | n | dense | sparse | dense / sparse |", "|---|---|---|---|---|---|"]
    for r in summary["ttft"]:
        ratio = "–" if r["dense_over_sparse"] is None else f"{r['dense_over_sparse']:.2f}x"
        lines.append(f"| {r['context_tokens']} | {r['turn']} | {r['sparse']['n']} | {sec(r['dense']['p50_s'])} | "
                     f"{sec(r['sparse']['p50_s'])} | {ratio} |")
    lines += ["", "## Accuracy per turn (paired over the questions both answered)", "",
              harness.paired_accuracy_table(summary["accuracy_per_turn"], "dense", "sparse", "dense", "sparse"), "",
              "## Per task", "", "| task | n | dense [95%] | sparse [95%] | sparse - dense [95%, paired] | identical | "
              "identical where dense right |", "|---|---|---|---|---|---|---|"]
    for task, t in summary["accuracy_per_task"].items():
        a, i = t["accuracy"], t["identical"]
        d = a["sparse_minus_dense"]
        where = "–" if i["rate_where_a_right"] is None else \
            f"{i['identical_where_a_right']} / {i['a_right']} ({i['rate_where_a_right']:.3f})"
        lines.append(f"| {task} | {a['n']} | {harness.accuracy_cell(a['dense'])} | "
                     f"{harness.accuracy_cell(a['sparse'])} | {d['mean']:+.3f} [{d['ci95'][0]:+.3f}, "
                     f"{d['ci95'][1]:+.3f}] | {i['identical']} / {i['n']} | {where} |")
    lines += ["", "## Sparse prefill chunks (kvplug_sparse_prefill_chunks, decision/reason)", "",
              "| arm | chunks |", "|---|---|"]
    for arm, counts in summary["sparse_prefill_chunks"].items():
        lines.append(f"| {arm} | " + (", ".join(f"{k} {v:.0f}" for k, v in counts.items()) or "none") + " |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    plt = harness.pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    rows = summary["ttft"]
    xs = range(len(rows))
    for offset, arm in ((-0.2, "dense"), (0.2, "sparse")):
        left.bar([x + offset for x in xs], [(r[arm]["p50_s"] or 0) * 1000 for r in rows], width=0.4, label=arm)
    left.set_xticks(list(xs), [f"{r['context_tokens'] // 1000}K t{r['turn']}" for r in rows], rotation=45)
    left.set_ylabel("TTFT p50 (ms)")
    left.set_title("TTFT per context and turn")
    left.legend()
    turns = [t for t in summary["accuracy_per_turn"] if t != "all"]
    for offset, arm in ((-0.1, "dense"), (0.1, "sparse")):
        acc = [summary["accuracy_per_turn"][t][arm] for t in turns]
        ys = [a["accuracy"] or 0 for a in acc]
        err = [[y - (a["ci95"] or (y, y))[0] for y, a in zip(ys, acc)], [(a["ci95"] or (y, y))[1] - y
                                                                         for y, a in zip(ys, acc)]]
        right.errorbar([int(t) + offset for t in turns], ys, yerr=err, fmt="o", capsize=4, label=arm)
    right.set_xticks([int(t) for t in turns])
    right.set_xlabel("turn")
    right.set_ylabel("accuracy (95% interval)")
    right.set_ylim(0, 1.05)
    right.set_title("Accuracy per turn")
    right.legend()
    fig.suptitle(f"Sparse prefill through kvplug serve: {Path(summary['model']).name}, {summary['device']}")
    harness.save_figure(fig, path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    check_args(args)
    model = str(harness.prepare_model(args.model))
    budgets = harness.answer_budgets(args.tasks, args.max_tokens)
    positions = harness.model_config(model).get("max_position_embeddings")
    max_model_len = args.max_model_len or harness.chat_max_model_len(max(args.contexts), args.turns,
                                                                     max(budgets.values()), positions)
    out = Path(args.out or f"results/serve_sparse_prefill-{time.strftime('%Y%m%d-%H%M%S')}")
    arms = {arm: run_arm(args, arm, model, max_model_len, out) for arm in ARMS}
    results = {arm: {k: json.loads(Path(p).read_text()) for k, p in arms[arm]["runs"].items()} for arm in ARMS}
    summary = summarize(args, model, arms, results)
    summary["command"] = harness.command_line("benchmarks.serve_sparse_prefill", argv)
    summary["date"] = harness.utc_now()
    harness.write_results(out / "serve_sparse_prefill.json", summary["command"], summary, [])
    text = markdown(summary)
    (out / "summary.md").write_text(text)
    if not args.no_plot:
        plot(summary, out / "serve_sparse_prefill.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
