"""``kvplug bench``: SCBench-style shared-context benchmark, load tester, result
comparison and kernel microbenchmarks.

    kvplug bench run --endpoint http://127.0.0.1:8000 --task kv --mode multi-turn
    kvplug bench compare results/a results/b/results.json
    kvplug bench kernels --which dense-attention

``main(argv) -> int`` is the entry point (``kvplug`` calls it with the
arguments after ``bench``); ``python -m benchmarks.cli ...`` works too.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import json
import math
import platform
import shlex
import socket
import sys
import time
from pathlib import Path

PROG = "kvplug bench"
DEFAULT_ENDPOINT = "http://127.0.0.1:8000"  # kvplug serve's default


class UsageError(Exception):
    """Bad user input: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        raise UsageError(f"{self.prog}: error: {message}")


# ---------------------------------------------------------------- arg types
def _number(cast, minimum: float, strict: bool, what: str):
    """argparse type: ``cast(s)`` that must be finite and > (``strict``) or >= ``minimum``."""
    def parse(s: str):
        try:
            v = cast(s)
        except ValueError:
            v = None
        if v is None or math.isnan(v) or (v <= minimum if strict else v < minimum) or (
                math.isinf(v) and cast is float and not strict):
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}")
        return v
    return parse


_positive_int = _number(int, 0, True, "a positive integer")
_nonneg_int = _number(int, 0, False, "an integer >= 0")
_positive_float = _number(float, 0, True, "a positive number")
_nonneg_float = _number(float, 0, False, "a finite number >= 0")


def _json_object(s: str) -> dict:
    try:
        v = json.loads(s)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg} at char {e.pos})") from None
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {type(v).__name__}")
    return v


def _build_parser() -> argparse.ArgumentParser:
    from benchmarks.scbench.load import MODES
    from benchmarks.scbench.tasks import TASKS, budgets_text

    p = _Parser(prog=PROG, description="SCBench-style shared-context benchmark and load tester "
                "for OpenAI-compatible endpoints.")
    sub = p.add_subparsers(dest="command", metavar="{run,compare,report,kernels}", parser_class=_Parser)
    sub.required = True

    tasks_help = "\n".join(f"  {name:<14} {TASKS[name].summary}" for name in sorted(TASKS))
    r = sub.add_parser(
        "run", help="run a benchmark / load test against an endpoint",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run shared-context sessions against an OpenAI-compatible endpoint (streaming\n"
        "chat completions) and write results.json (every request), summary.md and PNG plots.",
        epilog=f"tasks:\n{tasks_help}\n\nexamples:\n"
        "  kvplug bench run     # kv, multi-turn, 4 sessions x 5 turns, 2048 tokens, 127.0.0.1:8000\n"
        "  kvplug bench run --endpoint http://127.0.0.1:8000 --task kv --mode multi-turn "
        "--context-tokens 4096 --sessions 8 --turns 3\n"
        "  kvplug bench run --task mixed --mix math-find,multihop --mode multi-request "
        "--concurrency 16 --rate 2\n"
        "  kvplug bench run --sessions 100 --max-seconds 300 --out results/soak   # load test\n"
        "  kvplug bench compare results/a results/b")
    r.add_argument("--endpoint", default=DEFAULT_ENDPOINT, metavar="URL",
                   help=f"server base URL, /v1 optional (default {DEFAULT_ENDPOINT}, "
                   "where `kvplug serve` listens)")
    r.add_argument("--model", help="model id (default: the first id from GET /v1/models)")
    r.add_argument("--tokenizer", metavar="PATH|ID|approx",
                   help="tokenizer that sizes the contexts: HF folder or id, .gguf file, or "
                   "'approx' (words+punctuation). Default: the served model's folder when the "
                   "model id is a local path or a kvplug model name, else kvplug's SmolLM2 "
                   "(with a warning)")
    r.add_argument("--task", choices=sorted(TASKS), default="kv", metavar="TASK",
                   help=f"{', '.join(sorted(TASKS))} (default kv; see 'tasks' below)")
    r.add_argument("--mix", default=None, metavar="A,B",
                   help="the two component tasks of --task mixed (default: kv,passkey)")
    r.add_argument("--mode", choices=MODES, default="multi-turn",
                   help="multi-turn (default): turn i re-sends the context, earlier questions and "
                   "golden answers, then asks a new question; multi-request: every question is an "
                   "independent request on the same context, all issued concurrently")
    r.add_argument("--context-tokens", type=_positive_int, default=2048, metavar="N",
                   help="shared context length in tokens of --tokenizer (default 2048)")
    r.add_argument("--turns", type=_positive_int, default=5, metavar="N",
                   help="questions per session (default 5)")
    r.add_argument("--sessions", type=_positive_int, default=4, metavar="N",
                   help="sessions, each with its own shared context (default 4)")
    r.add_argument("--concurrency", type=_positive_int, default=4, metavar="N",
                   help="max requests in flight (default 4)")
    r.add_argument("--rate", type=_positive_float, default=math.inf, metavar="REQ_PER_S",
                   help="Poisson arrival rate over all sessions (default inf: no pacing)")
    r.add_argument("--max-requests", type=_positive_int, default=None, metavar="N",
                   help="stop after issuing N requests (default: all turns of all sessions)")
    r.add_argument("--max-seconds", type=_positive_float, default=None, metavar="S",
                   help="stop after S seconds; requests still in flight are cancelled and "
                   "recorded as cancelled (default: no limit)")
    r.add_argument("--max-tokens", type=_positive_int, default=None, metavar="N",
                   help=f"max output tokens per request (default per task: {budgets_text()})")
    r.add_argument("--temperature", type=_nonneg_float, default=0.0,
                   help="sampling temperature (default 0: greedy)")
    r.add_argument("--extra-body", type=_json_object, default=None, metavar="JSON",
                   help="JSON object merged into every request body, e.g. "
                   "'{\"kv_transfer_params\": {...}}'")
    r.add_argument("--policy-mix", default=None, metavar="P1,P2,...",
                   help="kvplug cache policies given per session (kv_transfer_params.kvplug_policy): "
                   "each context is shared by one session per policy, so --sessions must be a multiple "
                   "of the number of policies, e.g. keep,quant:int8,quant:int4,drop:streaming")
    r.add_argument("--repeat", action="store_true",
                   help="multi-turn sessions start over at turn 1 until --max-seconds or --max-requests "
                   "stops the run (a soak)")
    r.add_argument("--request-timeout", type=_positive_float, default=600.0, metavar="S",
                   help="per-request timeout; a timed-out request counts as an error (default 600)")
    r.add_argument("--seed", type=_nonneg_int, default=0,
                   help="seeds contexts, questions and arrivals (default 0); the same seed gives "
                   "the same cases")
    r.add_argument("--own-answers", action="store_true",
                   help="multi-turn history uses the model's own answers instead of golden ones")
    r.add_argument("--out", default=None, metavar="DIR",
                   help="output folder (default results/bench-<timestamp>)")
    r.add_argument("--label", default=None, help="run label in compare tables (default: folder name)")
    r.add_argument("--reset-prefix-cache", action="store_true",
                   help="POST /reset_prefix_cache before the run so cache hits come from this run "
                   "only (vLLM serves it with VLLM_SERVER_DEV_MODE=1)")
    r.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    r.add_argument("--save-cases", action="store_true", help="also write the generated cases.json")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")

    c = sub.add_parser("compare", help="side-by-side table of result files",
                       description="Print a side-by-side Markdown table of results.json files "
                       "(or run folders).")
    c.add_argument("results", nargs="+", help="results.json files or run folders")
    c.add_argument("--out", default=None, help="also write the table to this file")

    rp = sub.add_parser("report", help="re-write summary.md and the plots of a run",
                        description="Re-write summary.md and the PNG plots next to a results.json "
                        "(e.g. after editing its label).")
    rp.add_argument("results", help="results.json file or run folder")

    k = sub.add_parser("kernels", help="attention kernel microbenchmarks",
                       description="Time registered kernels over a shape sweep; JSON out.")
    from benchmarks.kernels.run import add_arguments as add_kernel_arguments

    add_kernel_arguments(k)
    return p


def _eprint(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- run
def _timestamp() -> str:
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def _resolve_model(server_base: str, api_base: str, model: str | None, timeout: float) -> str:
    import httpx

    from benchmarks.scbench.client import list_models

    async def go():
        async with httpx.AsyncClient(timeout=timeout) as c:
            return await list_models(c, api_base)

    try:
        models = asyncio.run(go())
    except Exception as e:  # noqa: BLE001
        if model:  # endpoint may not implement /v1/models; requests will tell
            return model
        raise UsageError(f"{PROG} run: error: --endpoint {server_base}: cannot list models at "
                         f"{api_base}/models ({type(e).__name__}: {str(e) or 'failed'}); "
                         "is the server up? pass --model to skip") from None
    if model:
        return model
    if not models:
        raise UsageError(f"{PROG} run: error: --endpoint {server_base}: /v1/models lists no model; "
                         "pass --model")
    return models[0]


def _server_version(server_base: str) -> str | None:
    import httpx

    try:
        r = httpx.get(server_base + "/version", timeout=5)
        if r.status_code == 200:
            return r.json().get("version")
    except Exception:  # noqa: BLE001
        pass
    return None


def _reset_prefix_cache(client, server_base: str) -> bool:
    try:
        r = client.post(server_base + "/reset_prefix_cache")
        ok = r.status_code == 200
    except Exception:  # noqa: BLE001
        ok = False
    if not ok:
        _eprint(f"warning: {server_base}/reset_prefix_cache is not available (vLLM exposes it with "
                "VLLM_SERVER_DEV_MODE=1); prefix-cache hits may include earlier runs")
    return ok


def _policy_mix(args) -> list[str]:
    """--policy-mix as a list of known policy names ([] without it); --repeat needs a bound."""
    if args.repeat and args.max_seconds is None and args.max_requests is None:
        raise UsageError(f"{PROG} run: error: --repeat needs --max-seconds or --max-requests")
    if args.repeat and args.mode != "multi-turn":
        raise UsageError(f"{PROG} run: error: --repeat applies to --mode multi-turn")
    if args.policy_mix is None:
        return []
    from cache_policies.registry import POLICY_NAMES

    policies = [p.strip() for p in args.policy_mix.split(",") if p.strip()]
    bad = [p for p in policies if p not in POLICY_NAMES]
    if not policies or bad:
        raise UsageError(f"{PROG} run: error: --policy-mix: unknown cache policy "
                         f"{', '.join(map(repr, bad)) or repr(args.policy_mix)}; known: {', '.join(POLICY_NAMES)}")
    if args.sessions % len(policies):
        raise UsageError(f"{PROG} run: error: --policy-mix: --sessions {args.sessions} is not a multiple of "
                         f"the {len(policies)} policies")
    return policies


def cmd_run(args) -> int:
    import httpx

    from benchmarks.scbench import metrics as metrics_mod
    from benchmarks.scbench.client import normalize_endpoint
    from benchmarks.scbench.load import LoadConfig, planned_requests, run_load
    from benchmarks.scbench.report import summarize
    from benchmarks.scbench.tasks import TASKS, ContextTooSmall, generate_cases
    from benchmarks.scbench.tokenizer import TokenizerError, resolve_counter

    try:
        server_base, api_base = normalize_endpoint(args.endpoint)
    except ValueError as e:
        raise UsageError(f"{PROG} run: error: --endpoint: {e}") from None
    options = {}
    if args.mix is not None:
        if args.task != "mixed":
            raise UsageError(f"{PROG} run: error: --mix only applies to --task mixed")
        parts = [x.strip() for x in args.mix.split(",")]
        bad = [x for x in parts if x not in TASKS or x == "mixed"]
        if len(parts) != 2 or bad:
            raise UsageError(f"{PROG} run: error: --mix: expected two of "
                             f"{','.join(t for t in sorted(TASKS) if t != 'mixed')}, got {args.mix!r}")
        options["components"] = tuple(parts)
    policies = _policy_mix(args)
    out_dir = Path(args.out) if args.out else Path("results") / f"bench-{_timestamp()}"
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"{PROG} run: error: --out {out_dir}: exists and is not a folder")

    model = _resolve_model(server_base, api_base, args.model, min(args.request_timeout, 30))
    try:
        count_tokens, tok_desc = resolve_counter(args.tokenizer, model, warn=_eprint)
    except TokenizerError as e:
        raise UsageError(f"{PROG} run: error: --tokenizer: {e}") from None
    from tqdm import tqdm

    t_gen = time.perf_counter()
    gen_bar = tqdm(total=args.sessions, file=sys.stderr, desc="contexts", unit="ctx",
                   disable=args.no_progress or args.sessions < 2, dynamic_ncols=True, leave=False)
    try:
        cases = generate_cases(args.task, seed=args.seed, sessions=args.sessions // len(policies or [None]),
                               context_tokens=args.context_tokens, turns=args.turns,
                               count_tokens=count_tokens, on_case=lambda _: gen_bar.update(1),
                               **options)
    except ContextTooSmall as e:
        raise UsageError(f"{PROG} run: error: --context-tokens {args.context_tokens}: {e}") from None
    finally:
        gen_bar.close()
    gen_s = time.perf_counter() - t_gen
    if policies:  # one session per policy on every context: mixed policies on shared prefixes
        cases = [c for c in cases for _ in policies]
    if args.max_tokens is None:
        args.max_tokens = TASKS[args.task].default_max_tokens

    cfg = LoadConfig(api_base=api_base, model=model, mode=args.mode, concurrency=args.concurrency,
                     rate=args.rate, max_requests=args.max_requests, max_seconds=args.max_seconds,
                     max_tokens=args.max_tokens, temperature=args.temperature,
                     own_answers=args.own_answers, request_timeout=args.request_timeout,
                     seed=args.seed, extra_body=args.extra_body, repeat=args.repeat,
                     session_bodies=[{"kv_transfer_params": {"kvplug_policy": p}} for p in policies] or None)
    # --repeat without --max-requests: as many as --max-seconds allows (the bar counts without a total)
    planned = args.max_requests if args.repeat else planned_requests(cases, args.max_requests)
    _eprint(f"{PROG}: {args.task}/{args.mode} on {model} at {api_base}: {len(cases)} sessions × "
            f"{args.turns} turns, ~{args.context_tokens} context tokens, "
            + (f"{planned} requests planned" if planned is not None else "sessions repeat until --max-seconds"))

    with httpx.Client(timeout=30) as hc:
        reset = None
        if args.reset_prefix_cache:
            reset = _reset_prefix_cache(hc, server_base)
        before, before_err = metrics_mod.scrape(hc, server_base)
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")

    bar = tqdm(total=planned, file=sys.stderr, desc="requests", unit="req",
               disable=args.no_progress, dynamic_ncols=True)
    errors = 0

    def on_record(rec: dict) -> None:
        nonlocal errors
        if rec["status"] == "error":
            errors += 1
        bar.update(1)
        bar.set_postfix(errors=errors, refresh=False)

    try:
        outcome = asyncio.run(run_load(cases, cfg, on_record=on_record))
    finally:
        bar.close()
    if outcome["stop_reason"] == "interrupted":
        _eprint(f"{PROG}: interrupted; writing the results of the finished requests")

    with httpx.Client(timeout=10) as hc:
        after, after_err = metrics_mod.scrape(hc, server_base)
    metrics = metrics_mod.summarize(before, after)
    if before_err or after_err:
        metrics["error"] = before_err or after_err
    summary = summarize(outcome["records"], outcome["wall_s"], metrics)

    config = {k: (None if isinstance(v, float) and math.isinf(v) else v)
              for k, v in vars(args).items() if k not in ("command", "command_line")}
    config["rate"] = "inf" if math.isinf(args.rate) else args.rate
    config["mix"] = list(options.get("components", ())) or None
    result = {
        "kind": "kvplug-bench-results",
        "version": 1,
        "label": args.label or out_dir.name,
        "config": config,
        "command": args.command_line,
        "environment": {
            "endpoint": args.endpoint,
            "api_base": api_base,
            "model": model,
            "server_version": _server_version(server_base),
            "tokenizer": tok_desc,
            "started": started,
            "load_started_unix": outcome["started_unix"],  # records' ``start`` is seconds after this
            "host": socket.gethostname(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "case_generation_s": round(gen_s, 3),
            "prefix_cache_reset": reset,
        },
        "stop_reason": outcome["stop_reason"],
        # requests the run meant to issue (--max-requests included; None: --repeat until --max-seconds)
        "planned": planned,
        "cases": [{"id": c.id, "context_tokens": c.context_tokens, "turns": len(c.multi_turns)}
                  for c in cases],
        "requests": outcome["records"],
        "summary": summary,
        "plots": [],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_report(result, out_dir, plots=not args.no_plots)
    (out_dir / "results.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    if args.save_cases:
        (out_dir / "cases.json").write_text(json.dumps([c.to_dict() for c in cases], indent=1) + "\n")

    s = summary
    ttft = (s["ttft_s"] or {}).get("p50")
    hit = s["prefix_cache_hit_rate"]
    acc = "–" if s["accuracy"] is None else f"{s['accuracy']:.3f}"
    ttft_s = "–" if ttft is None else f"{ttft * 1000:.1f} ms"
    hit_s = "–" if hit is None else f"{hit:.3f}"
    print(f"{PROG}: {s['completed']}/{s['requests']} ok, {s['errors']} errors, "
          f"{s['cancelled']} cancelled ({outcome['stop_reason']}); accuracy {acc}; "
          f"TTFT p50 {ttft_s}; prefix-cache hit rate {hit_s}")
    print(f"{PROG}: wrote {out_dir}/results.json, summary.md"
          + (", " + ", ".join(result["plots"]) if result["plots"] else ""))
    if s["requests"] and not s["completed"]:
        _eprint(f"{PROG}: no request succeeded; first error: "
                f"{next((r['error'] for r in outcome['records'] if r['error']), '?')}")
        return 1
    return 0


# ------------------------------------------------------------------ compare
def cmd_compare(args) -> int:
    from benchmarks.scbench.compare import CompareError, table

    try:
        text = table(args.results)
    except CompareError as e:
        raise UsageError(f"{PROG} compare: error: {e}") from None
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text)
    return 0


def write_report(result: dict, out_dir: Path, plots: bool = True) -> None:
    """summary.md (+ plots) for ``result`` into ``out_dir``; also records the plot names."""
    from benchmarks.scbench.report import markdown

    if plots:
        from benchmarks.scbench.plots import write_plots

        result["plots"] = write_plots(result, out_dir)
    (out_dir / "summary.md").write_text(markdown(result))


def cmd_report(args) -> int:
    from benchmarks.scbench.compare import CompareError, load_result

    try:
        _, result = load_result(args.results)
    except CompareError as e:
        raise UsageError(f"{PROG} report: error: {e}") from None
    path = Path(args.results)
    out_dir = path if path.is_dir() else path.parent
    write_report(result, out_dir)
    (out_dir / "results.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"{PROG}: wrote {out_dir}/summary.md, " + ", ".join(result["plots"]))
    return 0


# ------------------------------------------------------------------ kernels
def cmd_kernels(args) -> int:
    from benchmarks.kernels.run import KernelError, run_from_args

    try:
        return run_from_args(args, log=_eprint)
    except KernelError as e:
        raise UsageError(f"{PROG} kernels: error: {e}") from None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = _build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # --help
            return int(e.code or 0)
        args.command_line = f"{PROG} {shlex.join(argv)}"
        return {"run": cmd_run, "compare": cmd_compare, "report": cmd_report,
                "kernels": cmd_kernels}[args.command](args)
    except UsageError as e:
        _eprint(str(e))
        return 2
    except KeyboardInterrupt:
        _eprint(f"{PROG}: interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
