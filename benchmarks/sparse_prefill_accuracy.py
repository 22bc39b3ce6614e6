"""Sparse prefill accuracy on a real model: attention recall per head of the pattern config in use, and
agreement of greedy answers, sparse vs dense prefill, on locally generated KV-retrieval / passkey prompts.

GPU (vLLM 0.26 staged, the model staged by ../shared/gpu/stage-model.sh qwen2.5-coder-0.5b; ~4-6 min on an H100):
    source benchmarks/gpu/env.sh
    python -m benchmarks.sparse_prefill_accuracy --model /tmp/kvstage/models/qwen2.5-coder-0.5b \\
        --tokens 30000 --cases 20 --out benchmarks/results/sparse_prefill_accuracy_qwen_32k_h100.json
Multi-turn questions where dense is strong (--tasks; n = tasks x contexts x cases x turns, with Wilson 95%
intervals, the paired difference to dense and answers kept where dense is right, per task and per turn):
    python -m benchmarks.sparse_prefill_accuracy --model /tmp/kvstage/models/qwen2.5-coder-0.5b \\
        --tasks passkey,kv --contexts 8000,16000,24000 --cases 9 --turns 3 --recall-tokens 0 \\
        --out benchmarks/results/sparse_prefill_accuracy_qwen_multiturn_h100.json
Variants (--tasks mode): one engine answers every question dense once, then under each variant (the config
switched in the engine between sweeps, the prefix cache emptied), so n questions cost one engine start. A
variant may search its own per-head config first, on the served length and chunk (`kvplug patterns search`
on the GPU, written next to --out), scale the config's budgets, or set sparse_prefill keys:
    python -m benchmarks.sparse_prefill_accuracy --model /tmp/kvstage/models/qwen2.5-coder-0.5b --tasks passkey \\
        --contexts 8000,16000,24000 --cases 12 --turns 3 --recall-tokens 0 \\
        --variants "shipped;shipped_gs:group_shared_selection=true;search24k_r98:search_tokens=24000,target_recall=0.98"
CPU dry run (SmolLM2, small):
    python -m benchmarks.sparse_prefill_accuracy --tokens 3000 --cases 2 --min-prompt-tokens 1024 \\
        --recall-tokens 2048 --out /results/sp_acc_cpu.json

Agreement (without --tasks): two engines (subprocesses), the same kvplug backend and flags, sparse prefill off vs on; chunked
prefill as vLLM schedules it. Each answer is classified 'same', 'near_tie' (sparse took dense's runner-up
where dense's top-2 logprobs were < --near-tie nats apart) or 'differ'; answer correctness is reported for
both. Recall: the model's post-RoPE Q/K of an unseen KV-retrieval prompt (transformers), replaying chunked
prefill with the config's per-head patterns (search.evaluate_config): mean dense attention mass captured,
per (layer, head), and the density computed. Writes JSON (+ a PNG heatmap of recall per head).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from attention_backends.sparse_prefill.index_options import IndexOptions  # no torch: the CLI starts fast
from benchmarks import harness



def _parse(argv):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.sparse_prefill_accuracy", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder (e.g. /tmp/kvstage/models/qwen2.5-coder-0.5b) or "
                    "kvplug model name (default: the default model)")
    ap.add_argument("--pattern-config", default="auto", help="per-head pattern JSON; auto = the shipped config "
                    "whose name the model folder's name starts (qwen2.5-coder-0.5b -> qwen2.5-coder-0.5b-instruct)")
    ap.add_argument("--tokens", type=int, default=30000, help="prompt length of the agreement cases (the "
                    "generators overshoot a little: 30000 stays inside Qwen2.5's 32768 positions)")
    ap.add_argument("--cases", type=int, default=20, help="agreement cases (KV retrieval and passkey alternate)")
    ap.add_argument("--tasks", default="", help="multi-turn question mode instead of the agreement cases: "
                    "comma list of kvplug bench tasks (e.g. passkey,kv,multihop); each case is a conversation over "
                    "one context, --turns questions, earlier turns answered with the reference answers; prefix "
                    "caching on, so later turns' chunks run against the cached context")
    ap.add_argument("--contexts", default="8000,16000,24000", help="--tasks mode: context lengths (tokens)")
    ap.add_argument("--turns", type=int, default=3, help="--tasks mode: questions per case")
    ap.add_argument("--variants", default="", help="--tasks mode: 'LABEL[:KEY=VALUE,...];...' sparse runs to "
                    "compare on the same questions against one dense run (default: one run, LABEL 'sparse', the "
                    "config as given). KEYs: " + "; ".join(f"{k} ({v})" for k, v in VARIANT_KEYS.items()))
    ap.add_argument("--max-tokens", type=int, default=None, help="new tokens per answer (default: --tasks mode, the "
                    f"task's own budget: {harness.task_budgets_text()}; the agreement cases {AGREEMENT_MAX_TOKENS})")
    ap.add_argument("--min-prompt-tokens", type=int, default=8192, help="sparse prefill threshold in the sparse run")
    ap.add_argument("--cost-table", default="none", help="sparse_prefill.cost_table of the sparse run: none (default: "
                    "every chunk from --min-prompt-tokens on goes sparse, so what is measured is the sparse path), "
                    "or auto / a file: the cost model decides each chunk as serving does (the counts are in the "
                    "result's chunks)")
    ap.add_argument("--max-batched-tokens", type=int, default=8192, help="chunked prefill chunk (tokens per step)")
    ap.add_argument("--near-tie", type=float, default=0.5)
    ap.add_argument("--recall-tokens", type=int, default=32000, help="0 skips the recall measurement")
    ap.add_argument("--recall-chunk", type=int, default=4096)
    ap.add_argument("--recall-rows", type=int, default=256, help="query rows sampled per chunk for recall")
    ap.add_argument("--gpu-mem", type=float, default=0.6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/sparse_prefill_accuracy.json")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--backend", default="", help=argparse.SUPPRESS)
    ap.add_argument("--sweeps", default="", help=argparse.SUPPRESS)  # --tasks worker: JSON file of the sweeps
    return ap.parse_args(argv)


AGREEMENT_MAX_TOKENS = 16  # new tokens per agreement case (without --tasks) unless --max-tokens says otherwise

# --variants keys: how a variant gets its per-head config (search / config / budgets) and the sparse_prefill keys
# the engine switches at run time (attention_backends/sparse_prefill/backend_hooks.set_override).
VARIANT_KEYS = {
    "config": "a per-head pattern JSON (default: --pattern-config)",
    "search_tokens": "search a config first at this prompt length (kvplug patterns search --tokens)",
    "target_recall": "the search's target recall per head (default 0.95)",
    "search_task": "the search's calibration prompt: kv (default) or passkey",
    "search_chunk": "the search's chunk (default: --max-batched-tokens, the chunk served)",
    "budgets": "multiply the config's length-proportional budgets (vertical, slash, top_k) by this",
    "group_shared_selection": "sparse_prefill key (true/false)",
    "fused_estimate": "sparse_prefill key (true/false; CUDA only)",
    "budget_scale_limit": "sparse_prefill key (budgets grow beyond the searched length up to this factor)",
    "dense_tail_rows": "sparse_prefill key (each sparse chunk's last rows, whole 64-row blocks, attend densely)",
    "vertical_segment_rows": "sparse_prefill key (vertical-slash columns per segment of this many rows, a multiple of 64)",
    "exact_selection": "sparse_prefill key (true/false; rank by exact attention mass: a diagnostic, dense cost again)",
    "min_prompt_tokens": "sparse_prefill key (chunks whose sequence holds fewer tokens stay dense)",
    "gqa_shaped_estimate": "sparse_prefill key (true/false; vertical-slash's estimate per GQA group, no key copy)",
}
# passed to the engine as is (checked here against the config section first)
OVERRIDDEN = ("group_shared_selection", "fused_estimate", "budget_scale_limit", "dense_tail_rows",
              "vertical_segment_rows", "exact_selection", "min_prompt_tokens", "gqa_shaped_estimate")


@dataclass(frozen=True)
class Search:
    tokens: int
    target_recall: float
    task: str
    chunk: int

    def file_name(self) -> str:
        return f"search_{self.task}_{self.tokens}t_r{self.target_recall:g}_c{self.chunk}.json"


@dataclass
class Variant:
    label: str
    config: str | None = None  # an explicit per-head config
    search: Search | None = None
    budgets: float = 1.0
    keys: dict = field(default_factory=dict)  # sparse_prefill keys overridden in the engine


def parse_variants(spec: str, chunk: int) -> list[Variant]:
    """--variants 'LABEL[:KEY=VALUE,...];...' -> variants; an unknown key, bad value or repeated label is a
    SystemExit naming it. ``chunk``: the chunk served (a search's default chunk)."""
    out: list[Variant] = []
    for item in filter(None, (p.strip() for p in spec.split(";"))):
        label, _, body = (x.strip() for x in item.partition(":"))
        if not label:
            raise SystemExit(f"--variants: {item!r} has no label (LABEL[:KEY=VALUE,...])")
        if any(v.label == label for v in out):
            raise SystemExit(f"--variants: label {label!r} used twice")
        fields: dict[str, str] = {}
        for pair in filter(None, (p.strip() for p in body.split(","))):
            key, eq, value = (x.strip() for x in pair.partition("="))
            if not eq or not key or not value:
                raise SystemExit(f"--variants {label}: {pair!r} is not KEY=VALUE")
            if key not in VARIANT_KEYS:
                raise SystemExit(f"--variants {label}: unknown key {key!r} (keys: {', '.join(VARIANT_KEYS)})")
            fields[key] = value

        def number(key: str, cast, default, ok, what: str):
            if key not in fields:
                return default
            try:
                value = cast(fields[key])
            except ValueError:
                value = None
            if value is None or not ok(value):
                raise SystemExit(f"--variants {label}: {key} must be {what}, got {fields[key]!r}")
            return value

        v = Variant(label, config=fields.get("config"),
                    budgets=number("budgets", float, 1.0, lambda x: 0 < x < float("inf"), "a number > 0"))
        if "search_tokens" in fields:
            if v.config:
                raise SystemExit(f"--variants {label}: config and search_tokens exclude each other")
            task = fields.get("search_task", "kv")
            if task not in ("kv", "passkey"):
                raise SystemExit(f"--variants {label}: search_task must be kv or passkey, got {task!r}")
            v.search = Search(number("search_tokens", int, 0, lambda x: x >= 256, "an integer >= 256"),
                              number("target_recall", float, 0.95, lambda x: 0 < x <= 1, "in (0, 1]"), task,
                              number("search_chunk", int, chunk, lambda x: x >= 64, "an integer >= 64"))
        elif {"target_recall", "search_task", "search_chunk"} & set(fields):
            raise SystemExit(f"--variants {label}: target_recall / search_task / search_chunk need search_tokens")
        v.keys = {k: fields[k] for k in OVERRIDDEN if k in fields}
        _check_keys(label, v.keys)
        out.append(v)
    return out


def _check_keys(label: str, keys: dict) -> None:
    """A variant's sparse_prefill keys as the engine will check them (set_override), before any engine starts."""
    if not keys:
        return
    from attention_backends.sparse_prefill.config import SparsePrefillConfig
    from kvplug.config import KvplugConfigError

    try:
        msgspec.convert(keys, SparsePrefillConfig, strict=False).validate("sparse_prefill")
    except (msgspec.ValidationError, KvplugConfigError) as exc:
        raise SystemExit(f"--variants {label}: {exc}") from None


def config_facts(path: str) -> dict:
    """What a variant's per-head config is: heads per pattern, mean recall/density the search recorded, length."""
    from attention_backends.sparse_prefill import head_config

    cfg = head_config.load(path)
    heads = [cfg.head(li, h) for li in range(cfg.num_layers or 0) for h in range(cfg.num_heads or 0)]
    patterns: dict[str, int] = {}
    for hp in heads:
        patterns[hp.pattern] = patterns.get(hp.pattern, 0) + 1
    recorded = [hp.recall for hp in heads if hp.recall is not None]
    return {"file": path, "searched_tokens": cfg.searched_tokens, "target_recall": cfg.calibration.get("target_recall"),
            "heads_per_pattern": patterns,
            "search_recall_mean": round(sum(recorded) / len(recorded), 4) if recorded else None,
            "budgets_scaled_by": cfg.calibration.get("budgets_scaled_by")}


def prepare_variants(args, path: Path, pattern_config: str, variants: list[Variant]) -> list[dict]:
    """Each variant's config file (searching and scaling as asked; searches shared between variants) ->
    the sweeps the worker runs: {"label", "pattern_config", "keys", "config"}."""
    from attention_backends.sparse_prefill import head_config

    folder = Path(args.out).with_suffix("")
    folder = folder.with_name(folder.name + "_configs")
    searched: dict[Search, str] = {}
    sweeps = []
    for v in variants:
        source = v.config or pattern_config
        if v.search is not None:
            source = searched.get(v.search) or run_search(path, v.search, folder / v.search.file_name())
            searched[v.search] = source
        elif not Path(source).is_file():
            raise SystemExit(f"--variants {v.label}: config {source} not found")
        if v.budgets != 1.0:
            scaled = harness.scaled_config(head_config.load(source), v.budgets)
            source = str(folder / f"{Path(source).stem}_budgets_x{v.budgets:g}.json")
            folder.mkdir(parents=True, exist_ok=True)
            Path(source).write_bytes(scaled.to_json())
        sweeps.append({"label": v.label, "pattern_config": str(source), "keys": v.keys, "config": config_facts(source)})
    return sweeps


def run_search(path: Path, s: Search, out: Path) -> str:
    """`kvplug patterns search` (the user command) in a subprocess: its GPU memory is gone before the engine starts."""
    cmd = [*harness.KVPLUG_CLI, "patterns", "search", str(path), "--tokens", str(s.tokens), "--target-recall",
           str(s.target_recall), "--task", s.task, "--chunk", str(s.chunk), "--out", str(out)]
    print(f"[sparse_prefill_accuracy] {shlex.join(cmd[2:])}", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    if subprocess.run(cmd, env=dict(os.environ)).returncode != 0:
        raise SystemExit(f"pattern search failed: {shlex.join(cmd[2:])}")
    print(f"[sparse_prefill_accuracy] search done in {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
    return str(out)


def pattern_config_path(setting: str, model: Path) -> str:
    """An explicit file, else the shipped config for the model's identity (its config.json, not its name)."""
    if setting != "auto":
        return setting
    from attention_backends.sparse_prefill import model_identity

    path, reason = model_identity.find_shipped(model_identity.model_identity(model))
    if path is None:
        raise SystemExit(f"no shipped pattern config for {model}: {reason}; pass --pattern-config")
    return str(path)


def make_cases(tokenizer_path: str, tokens: int, n: int, seed: int) -> list[dict]:
    from transformers import AutoTokenizer

    from attention_backends.sparse_prefill import calibration

    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    count = lambda s: len(tok(s).input_ids)  # noqa: E731
    out = []
    for i in range(n):
        kind = "passkey" if i % 2 else "kv"
        prompt, answer = calibration.GENERATORS[kind](count, tokens, seed=seed + i)
        out.append({"kind": kind, "prompt": prompt, "answer": answer})
    return out


def _token_counts(path: str, cases: list[dict]) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    return [tok(c["prompt"]).input_ids for c in cases]


def question_items(path: str, args) -> list[dict]:
    return harness.question_items(path, args.tasks, args.contexts, args.cases, args.turns, args.seed, multi_turn=True)


def _worker(args) -> None:
    from vllm import SamplingParams

    path = str(harness.prepare_model(args.model))
    if args.tasks:
        return _chat_worker(args, path)
    cases = make_cases(path, args.tokens, args.cases, args.seed)
    max_tokens = AGREEMENT_MAX_TOKENS if args.max_tokens is None else args.max_tokens
    # The generators overshoot the target length by a few percent; stay inside the model's positions.
    limit = harness.model_config(path).get("max_position_embeddings", 1 << 20)
    longest = max(len(o) for o in _token_counts(path, cases))
    if longest + max_tokens > limit:
        raise SystemExit(f"a {longest}-token case + {max_tokens} new tokens exceeds the model's {limit} "
                         "positions: lower --tokens")
    llm = _engine(args, path, min(limit, longest + max_tokens + 64), prefix_caching=False)
    outs = llm.generate([c["prompt"] for c in cases], SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                                                     logprobs=2), use_tqdm=False)
    _emit(args, llm, outs)


def _engine(args, path: str, max_model_len: int, prefix_caching: bool):
    from vllm import LLM

    return LLM(**harness.sparse_prefill_llm_kwargs(path, max_model_len, args.max_batched_tokens, prefix_caching,
                                                   args.gpu_mem))


def _emit(args, llm, outs) -> None:
    """Greedy ids, texts and dense/sparse top-2 logprobs of every output, plus sparse prefill's counters."""
    from attention_backends.sparse_prefill import runner

    harness.emit_result({"backend": args.backend, **outputs(outs), "stats": llm.collective_rpc(runner.stats_snapshot)[0]})


def _chat_worker(args, path: str) -> None:
    """--tasks mode: one engine with sparse prefill on; every question as one chat (the conversation so far + the
    question), greedy, top-2: once dense, then once per sweep (--sweeps), the config switched in the engine and
    the prefix cache emptied in between, so every sweep prefills the contexts itself. The summary so far goes to
    --out after every sweep (a run cut short keeps what it measured)."""
    from vllm import SamplingParams

    from attention_backends.sparse_prefill import backend_hooks, runner

    items = question_items(path, args)
    sweeps = json.loads(Path(args.sweeps).read_text())
    budgets = harness.answer_budgets(args.tasks, args.max_tokens)
    limit = harness.model_config(path).get("max_position_embeddings", 1 << 20)
    max_model_len = harness.chat_max_model_len(max(int(c) for c in args.contexts.split(",")), args.turns,
                                               max(budgets.values()), limit)
    t0 = time.monotonic()
    llm = _engine(args, path, max_model_len, prefix_caching=True)
    progress(f"engine up in {time.monotonic() - t0:.0f} s; {len(items)} questions x {1 + len(sweeps)} sweeps")
    sp = [SamplingParams(temperature=0.0, max_tokens=budgets[it["task"]], logprobs=2) for it in items]
    done: dict[str, dict] = {}
    for sweep in [{"label": DENSE}, *sweeps]:
        override = {"dense": True} if sweep["label"] == DENSE else {"pattern_config": sweep["pattern_config"],
                                                                     **sweep["keys"]}
        llm.collective_rpc(backend_hooks.set_override, kwargs=override)
        if not llm.reset_prefix_cache():  # else a sweep would reuse the previous sweep's KV of the contexts
            raise SystemExit("could not empty the prefix cache between sweeps")
        before = llm.collective_rpc(runner.stats_snapshot)[0]
        t0 = time.monotonic()
        # vLLM 0.26's offline progress bar divides by tqdm's elapsed time, which is 0 under TQDM_DISABLE=1
        # (benchmarks/gpu/env.sh): show the bar only when tqdm is on.
        outs = llm.chat([it["messages"] for it in items], sp, use_tqdm=not os.environ.get("TQDM_DISABLE"))
        done[sweep["label"]] = {**outputs(outs), "seconds": round(time.monotonic() - t0, 1),
                                "stats": stats_delta(before, llm.collective_rpc(runner.stats_snapshot)[0])}
        harness.count_cut(f"sparse_prefill_accuracy {sweep['label']}", done[sweep["label"]]["cut"],
                          [it["scorer"] for it in items])
        summary, runs = variants_result(args, path, items, done, sweeps)
        v = summary["variants"].get(sweep["label"])
        progress(f"[{sweep['label']}] {done[sweep['label']]['seconds']:.0f} s: " + (
            f"dense accuracy {summary['dense']['accuracy']:.3f}" if v is None else verdict_line(v)))
        harness.write_results(args.out, "(partial: the parent process rewrites this file when it ends)",
                              dict(summary, partial=True), runs)
    harness.emit_result({"sweeps": done})


DENSE = "dense"


def progress(line: str) -> None:
    print(f"[sparse_prefill_accuracy] {line}", file=sys.stderr, flush=True)


def outputs(outs) -> dict:
    """Prompt lengths, greedy ids, texts, top-2 logprobs of every output, and whether it stopped at its token
    budget (cut)."""
    return {"prompt_tokens": [len(o.prompt_token_ids) for o in outs],
            "token_ids": [list(o.outputs[0].token_ids) for o in outs], "texts": [o.outputs[0].text for o in outs],
            "top2": [[top2(step) for step in o.outputs[0].logprobs] for o in outs], "cut": harness.cut_at_budget(outs)}


def stats_delta(before: dict, after: dict) -> dict:
    """Sparse prefill's counters (runner.stats_snapshot) over one sweep: ``after`` minus ``before``."""
    out = {k: v - before.get(k, 0) for k, v in after.items() if isinstance(v, (int, float))}
    chunks = {k: n - before.get("chunks", {}).get(k, 0) for k, n in after.get("chunks", {}).items()}
    out["chunks"] = {k: n for k, n in chunks.items() if n}
    return out


def density(stats: dict) -> float | None:
    return stats["computed_pairs"] / stats["causal_pairs"] if stats.get("causal_pairs") else None


def verdict_line(v: dict) -> str:
    o = v["overall"]
    diff = o["sparse_minus_dense"]
    kept = "-" if o["kept_where_dense_right"] is None else f"{o['kept_where_dense_right']:.3f}"
    dens = "-" if v["density"] is None else f"{v['density']:.3f}"
    return (f"n={o['n']} accuracy {o['sparse_accuracy']:.3f} {list(o['sparse_ci95'])} vs dense "
            f"{100 * diff['mean']:+.1f} points [{100 * diff['ci95'][0]:+.1f}, {100 * diff['ci95'][1]:+.1f}], "
            f"kept where dense right {kept} (dense right on {o['dense_right']}), density {dens}"
            + (f", recall {v['recall']['mean']:.4f} at {v['recall']['tokens']} tokens" if v.get("recall") else ""))


def variants_result(args, path: str | Path, items: list[dict], done: dict[str, dict], sweeps: list[dict]
                    ) -> tuple[dict, list[dict]]:
    """(summary, runs) of the sweeps done so far: dense accuracy, and per variant the task summary against the
    same dense answers, the density computed, the config used; the first variant's figures also at the top."""
    from benchmarks.scbench.scoring import score

    dense = done[DENSE]
    d = [score(it["scorer"], txt, it["answer"]) for it, txt in zip(items, dense["texts"])]
    summary = {"model": str(path), "mode": "multi-turn tasks", "tasks": args.tasks, "contexts": args.contexts,
               "turns": args.turns, "min_prompt_tokens": args.min_prompt_tokens, "cost_table": args.cost_table,
               "max_batched_tokens": args.max_batched_tokens, "n": len(items),
               "max_tokens": harness.answer_budgets(args.tasks, args.max_tokens),
               "dense": {"accuracy": sum(d) / len(d), "ci95": harness.wilson(round(sum(d)), len(d)),
                         "seconds": dense["seconds"], "cut_at_max_tokens": sum(dense["cut"])},
               "variants": {}, "device": harness.device_name()}
    runs = []
    for sweep in sweeps:
        sparse = done.get(sweep["label"])
        if sparse is None:
            continue
        table = task_summary(items, dense, sparse, args.near_tie)
        s = sparse["stats"]
        v = {"pattern_config": sweep["pattern_config"], "keys": sweep["keys"], "config": sweep["config"],
             "overall": table["overall"], "per_task": table["per_task"], "per_turn": table["per_turn"],
             "density": density(s), "recall": sweep.get("recall"), "sparse_tokens": s.get("sparse_tokens", 0),
             "dense_prefill_tokens_in_sparse_run": s.get("dense_prefill_tokens", 0), "chunks": s.get("chunks", {}),
             "seconds": sparse["seconds"], "cut_at_max_tokens": sum(sparse["cut"])}
        if not v["sparse_tokens"]:
            # a "sparse" column that was dense would be a lie: say so loudly in the result
            v["warning"] = ("no chunk went through the sparse path (contexts under --min-prompt-tokens, or, with "
                            "--cost-table, the cost model sent every chunk dense: see chunks)")
        summary["variants"][sweep["label"]] = v
        runs.append({"variant": sweep["label"], "cases": table["rows"]})
    if summary["variants"]:  # the layout of a one-variant run (the gate's file) at the top
        first = next(iter(summary["variants"].values()))
        summary.update({k: first[k] for k in ("pattern_config", "overall", "per_task", "per_turn", "density",
                                              "sparse_tokens", "dense_prefill_tokens_in_sparse_run")})
        if first["recall"]:
            summary.update(recall_mean=first["recall"]["mean"], recall_min=first["recall"]["min"],
                           recall_density=first["recall"]["density_mean"])
        if "warning" in first:
            summary["warning"] = first["warning"]
    return summary, runs


def task_summary(items: list[dict], dense: dict, sparse: dict, near_tie: float) -> dict:
    """Per task and overall: dense and sparse accuracy (Wilson 95%), the paired difference, answers equal to
    dense (exact / up to near ties), and how many of the questions dense gets right keep dense's answer."""
    from benchmarks.scbench.scoring import score

    rows = []
    for it, n, d_ids, d_top2, s_ids, d_txt, s_txt in zip(items, dense["prompt_tokens"], dense["token_ids"],
                                                         dense["top2"], sparse["token_ids"], dense["texts"],
                                                         sparse["texts"]):
        rows.append({"case": it["case"], "task": it["task"], "turn": it["turn"], "context_tokens": it["context_tokens"],
                     "prompt_tokens": n, "answer": it["answer"], "dense": d_txt, "sparse": s_txt,
                     "dense_score": score(it["scorer"], d_txt, it["answer"]),
                     "sparse_score": score(it["scorer"], s_txt, it["answer"]),
                     "verdict": agreement(d_ids, d_top2, s_ids, near_tie)})

    def block(rs: list[dict]) -> dict:
        n = len(rs)
        dense_right = [r for r in rs if r["dense_score"] >= 1.0]
        d = [r["dense_score"] for r in rs]
        sp = [r["sparse_score"] for r in rs]
        return {"n": n, "dense_accuracy": sum(d) / n, "dense_ci95": harness.wilson(round(sum(d)), n),
                "sparse_accuracy": sum(sp) / n, "sparse_ci95": harness.wilson(round(sum(sp)), n),
                "sparse_minus_dense": harness.paired_difference(sp, d),
                "identical": sum(r["verdict"] == "same" for r in rs) / n,
                "identical_up_to_near_ties": sum(r["verdict"] != "differ" for r in rs) / n,
                "dense_right": len(dense_right),
                "kept_where_dense_right": (sum(r["verdict"] == "same" for r in dense_right) / len(dense_right))
                if dense_right else None}

    tasks = sorted({r["task"] for r in rows})
    return {"overall": block(rows), "per_task": {t: block([r for r in rows if r["task"] == t]) for t in tasks},
            "per_turn": {str(t): block([r for r in rows if r["turn"] == t]) for t in sorted({r["turn"] for r in rows})},
            "rows": rows}


def run_engine(args, sparse: bool, pattern_config: str) -> dict:
    env = harness.sparse_prefill_env(args.min_prompt_tokens, args.cost_table, enabled=sparse,
                                     pattern_config=pattern_config)
    argv = harness.worker_argv(sys.argv[1:] if args.argv is None else args.argv, drop=("--out", "--pattern-config"))
    return harness.run_worker("benchmarks.sparse_prefill_accuracy", "sparse" if sparse else "dense", argv, env)


def top2(step_logprobs) -> list[list[float]]:
    """vLLM's {token_id: Logprob} of one step -> [[token_id, logprob], ...] best first (top 2)."""
    ranked = sorted(step_logprobs.items(), key=lambda kv: -kv[1].logprob)[:2]
    return [[int(t), float(lp.logprob)] for t, lp in ranked]


def agreement(dense_ids: list[int], dense_top2: list, sparse_ids: list[int], near_tie: float = 0.5) -> str:
    """'same', 'near_tie' (first divergence where sparse took dense's runner-up and dense's top-2 were
    < near_tie nats apart) or 'differ'."""
    for t, (a, b) in enumerate(zip(dense_ids, sparse_ids)):
        if a != b:
            (_, lp1), (second, lp2) = dense_top2[t]
            return "near_tie" if b == second and lp1 - lp2 < near_tie else "differ"
    return "same" if len(dense_ids) == len(sparse_ids) else "differ"


def recall_options(keys: dict[str, str]) -> IndexOptions:
    """The index options a variant's sparse_prefill ``keys`` give that attention recall measures: group-shared
    selection, vertical segment rows and the GQA-shaped estimate (recall samples rows: a dense tail is not in it;
    exact selection is not replayed)."""
    return IndexOptions(
        group_shared_selection=msgspec.convert(keys.get("group_shared_selection", False), bool, strict=False),
        vertical_segment_rows=msgspec.convert(keys.get("vertical_segment_rows", 0), int, strict=False),
        gqa_shaped_estimate=msgspec.convert(keys.get("gqa_shaped_estimate", False), bool, strict=False))


def measure_recall(args, path: Path, configs: list[tuple[str, str, IndexOptions]]) -> dict[str, dict]:
    """Attention recall per head of each (label, config file, index options: recall_options) on one unseen
    KV-retrieval prompt of --recall-tokens (its Q/K captured once), replaying chunked prefill with
    --recall-chunk. Measured once per (config, options): it samples rows, so a dense tail (a block per chunk) is
    not in it."""
    from attention_backends.sparse_prefill import calibration, head_config, search

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    prompt, _ = calibration.kv_retrieval(lambda s: len(tok(s).input_ids), args.recall_tokens, seed=args.seed + 1000)
    dev = "cuda" if harness.cuda_available() else "cpu"
    qs, ks, scale, T = search.capture_qk(str(path), prompt, dev, max_tokens=args.recall_tokens)
    qs, ks = [q.to(dev) for q in qs], [k.to(dev) for k in ks]
    out = {}
    done: dict[tuple[str, IndexOptions], tuple] = {}  # variants differing only in keys recall ignores
    for label, config, options in configs:
        if (config, options) not in done:
            recall, dens = search.evaluate_config(qs, ks, scale, head_config.load(config), args.recall_chunk,
                                                  args.recall_rows, seed=args.seed, index_options=options)
            done[config, options] = recall.cpu(), dens.cpu()
        recall, dens = done[config, options]
        out[label] = {"tokens": T, "chunk": args.recall_chunk, "rows_per_chunk": args.recall_rows,
                      "group_shared": options.group_shared_selection, "mean": float(recall.mean()), "min": float(recall.min()),
                      "heads_below_0.95": int((recall < 0.95).sum()), "heads": int(recall.numel()),
                      "density_mean": float(dens.mean()),
                      "per_head": [[round(float(x), 4) for x in row] for row in recall],
                      "density_per_head": [[round(float(x), 4) for x in row] for row in dens]}
        progress(f"[{label}] recall at {T} tokens: mean {out[label]['mean']:.4f}, min {out[label]['min']:.4f}, "
                 f"density {out[label]['density_mean']:.3f}")
    del qs, ks
    if dev == "cuda":  # an engine may start next in another process
        import torch

        torch.cuda.empty_cache()
    return out


def plot(recall: dict, path: Path, title: str) -> None:
    fig, ax = harness.pyplot().subplots(figsize=(7, 5))
    im = ax.imshow(recall["per_head"], aspect="auto", vmin=min(0.8, recall["min"]), vmax=1.0, cmap="viridis")
    ax.set_xlabel("query head")
    ax.set_ylabel("layer")
    ax.set_title(f"{title}: attention recall per head (mean {recall['mean']:.3f}, density {recall['density_mean']:.2f})",
                 fontsize=9)
    fig.colorbar(im, ax=ax)
    harness.save_figure(fig, path, dpi=110)


def run(args) -> dict:
    path = harness.prepare_model(args.model)
    if args.tasks:
        own = variants_bring_configs(args)  # a new model's first run: every variant searches or names one
        return run_tasks(args, path, None if own else pattern_config_path(args.pattern_config, path))
    pattern_config = pattern_config_path(args.pattern_config, path)
    if args.variants:
        raise SystemExit("--variants needs --tasks (the multi-turn question mode)")
    dense = run_engine(args, False, pattern_config)
    sparse = run_engine(args, True, pattern_config)
    cases = make_cases(str(path), args.tokens, args.cases, args.seed)
    verdicts = [agreement(d, t, s, args.near_tie)
                for d, t, s in zip(dense["token_ids"], dense["top2"], sparse["token_ids"])]
    per_case = [{"kind": c["kind"], "answer": c["answer"], "prompt_tokens": n, "dense": dt, "sparse": st,
                 "dense_correct": c["answer"] in dt, "sparse_correct": c["answer"] in st, "verdict": v}
                for c, n, dt, st, v in zip(cases, dense["prompt_tokens"], dense["texts"], sparse["texts"], verdicts)]
    s = sparse["stats"]
    summary = {
        "model": str(path), "pattern_config": pattern_config, "cases": len(cases), "tokens": args.tokens,
        "min_prompt_tokens": args.min_prompt_tokens, "cost_table": args.cost_table,
        "max_batched_tokens": args.max_batched_tokens, "exact_agreement": sum(v == "same" for v in verdicts) / len(verdicts),
        "agreement_up_to_near_ties": sum(v != "differ" for v in verdicts) / len(verdicts),
        "dense_accuracy": sum(c["dense_correct"] for c in per_case) / len(per_case),
        "sparse_accuracy": sum(c["sparse_correct"] for c in per_case) / len(per_case),
        "sparse_tokens": s["sparse_tokens"], "dense_prefill_tokens_in_sparse_run": s["dense_prefill_tokens"],
        "density": density(s),
        # kv and passkey answers are matched whole (substring)
        "cut_at_max_tokens": {name: harness.count_cut(f"sparse_prefill_accuracy {name}", out["cut"],
                                                      ["substring"] * len(cases))
                              for name, out in (("dense", dense), ("sparse", sparse))},
    }
    recall = (measure_recall(args, path, [("sparse", pattern_config, IndexOptions())])["sparse"]
              if args.recall_tokens else None)
    if recall:
        summary.update(recall_mean=recall["mean"], recall_min=recall["min"], recall_density=recall["density_mean"])
    summary["device"] = harness.device_name()
    return {"summary": summary, "cases": per_case, "recall": recall}


def variants_bring_configs(args) -> bool:
    """True when every --variants entry names its own config or searches one: then a model without a shipped
    config (a new model's first run, `search_tokens=...`) needs no --pattern-config, and an explicit one is unused."""
    variants = parse_variants(args.variants, args.max_batched_tokens) if args.variants else []
    return bool(variants) and all(v.config or v.search for v in variants)


def run_tasks(args, path: Path, pattern_config: str | None) -> dict:
    """--tasks mode: variants prepared here (searches in subprocesses, then each config's recall measured in this
    process, before the engine, so a run cut short keeps them), then one worker engine for the dense sweep and
    every variant. ``pattern_config`` None: every variant brings its own (the engine starts on the first's)."""
    variants = parse_variants(args.variants, args.max_batched_tokens) or [Variant("sparse")]
    sweeps = prepare_variants(args, path, pattern_config, variants)
    pattern_config = pattern_config or sweeps[0]["pattern_config"]
    recall = {}
    if args.recall_tokens:
        recall = measure_recall(args, path, [(sw["label"], sw["pattern_config"], recall_options(sw["keys"]))
                                             for sw in sweeps])
        for sw in sweeps:
            r = recall[sw["label"]]
            sw["recall"] = {k: r[k] for k in ("tokens", "chunk", "mean", "min", "heads_below_0.95", "density_mean")}
    spec = Path(tempfile.mkdtemp(prefix="sp_acc_")) / "sweeps.json"
    spec.write_text(json.dumps(sweeps, indent=1))
    env = harness.sparse_prefill_env(args.min_prompt_tokens, args.cost_table, pattern_config=pattern_config)
    argv = harness.worker_argv(sys.argv[1:] if args.argv is None else args.argv,
                               drop=("--pattern-config", "--variants", "--sweeps"))
    done = harness.run_worker("benchmarks.sparse_prefill_accuracy", "sweeps", [*argv, "--sweeps", str(spec)],
                              env)["sweeps"]
    summary, runs = variants_result(args, path, question_items(str(path), args), done, sweeps)
    for run in runs:
        run["recall"] = recall.get(run["variant"])
    return {"summary": summary, "cases": runs, "recall": recall.get(sweeps[0]["label"])}


def main(argv=None) -> int:
    args = _parse(argv)
    args.argv = argv
    if args.worker:
        _worker(args)
        return 0
    result = run(args)
    command = harness.command_line("benchmarks.sparse_prefill_accuracy", argv)
    runs = result["cases"] if args.tasks else [{"cases": result["cases"], "recall": result["recall"]}]
    harness.write_results(args.out, command, result["summary"], runs)
    print(json.dumps(result["summary"], indent=1))
    if result["recall"]:
        try:
            png = Path(args.out).with_suffix(".png")
            plot(result["recall"], png, Path(result["summary"]["model"]).name)
            print(f"wrote {png}")
        except ImportError as exc:  # no matplotlib on this host: the JSON has the same numbers
            print(f"no plot: {exc}", file=sys.stderr)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
