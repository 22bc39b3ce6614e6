"""Sparse prefill accuracy on a real model: attention recall per head of the pattern config in use, and
agreement of greedy answers, sparse vs dense prefill, on locally generated KV-retrieval / passkey prompts.

GPU (vLLM 0.26 staged, the model staged by ../shared/gpu/stage-model.sh qwen2.5-coder-0.5b; ~4-6 min on an H100):
    source benchmarks/gpu/env.sh
    python -m benchmarks.sparse_prefill_accuracy --model /tmp/kvstage/models/qwen2.5-coder-0.5b \\
        --tokens 30000 --cases 20 --out benchmarks/results/sparse_prefill_accuracy_qwen_32k_h100.json
Multi-turn questions where dense is strong (--tasks; n = tasks x contexts x cases x turns, with Wilson 95%
intervals, the paired difference to dense and answers kept where dense is right, per task and per turn):
    python -m benchmarks.sparse_prefill_accuracy --model /tmp/kvstage/models/qwen2.5-coder-0.5b \
        --tasks passkey,kv --contexts 8000,16000,24000 --cases 9 --turns 3 --recall-tokens 0 \
        --out benchmarks/results/sparse_prefill_accuracy_qwen_multiturn_h100.json
CPU dry run (SmolLM2, small):
    python -m benchmarks.sparse_prefill_accuracy --tokens 3000 --cases 2 --min-prompt-tokens 1024 \\
        --recall-tokens 2048 --out /results/sp_acc_cpu.json

Agreement: two engines (subprocesses), the same kvplug backend and flags, sparse prefill off vs on; chunked
prefill as vLLM schedules it. Each answer is classified 'same', 'near_tie' (sparse took dense's runner-up
where dense's top-2 logprobs were < --near-tie nats apart) or 'differ'; answer correctness is reported for
both. Recall: the model's post-RoPE Q/K of an unseen KV-retrieval prompt (transformers), replaying chunked
prefill with the config's per-head patterns (search.evaluate_config): mean dense attention mass captured,
per (layer, head), and the density computed. Writes JSON (+ a PNG heatmap of recall per head).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

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
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--min-prompt-tokens", type=int, default=8192, help="sparse prefill threshold in the sparse run")
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
    return ap.parse_args(argv)


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
    # The generators overshoot the target length by a few percent; stay inside the model's positions.
    limit = harness.model_config(path).get("max_position_embeddings", 1 << 20)
    longest = max(len(o) for o in _token_counts(path, cases))
    if longest + args.max_tokens > limit:
        raise SystemExit(f"a {longest}-token case + {args.max_tokens} new tokens exceeds the model's {limit} "
                         "positions: lower --tokens")
    llm = _engine(args, path, min(limit, longest + args.max_tokens + 64), prefix_caching=False)
    outs = llm.generate([c["prompt"] for c in cases], SamplingParams(temperature=0.0, max_tokens=args.max_tokens,
                                                                     logprobs=2), use_tqdm=False)
    _emit(args, llm, outs)


def _engine(args, path: str, max_model_len: int, prefix_caching: bool):
    from vllm import LLM

    kw = dict(model=path, max_model_len=max_model_len, seed=0, enable_prefix_caching=prefix_caching,
              max_num_batched_tokens=args.max_batched_tokens)
    kw.update(harness.kvplug_attention_kwargs())
    if harness.cuda_available():
        kw.update(gpu_memory_utilization=args.gpu_mem)
    else:
        kw.update(kv_cache_memory_bytes=2 << 30)
    return LLM(**kw)


def _emit(args, llm, outs) -> None:
    """Greedy ids, texts and dense/sparse top-2 logprobs of every output, plus sparse prefill's counters."""
    from attention_backends.sparse_prefill import runner

    stats = llm.collective_rpc(runner.stats_snapshot)[0]
    harness.emit_result({
        "backend": args.backend, "prompt_tokens": [len(o.prompt_token_ids) for o in outs],
        "token_ids": [list(o.outputs[0].token_ids) for o in outs], "texts": [o.outputs[0].text for o in outs],
        "top2": [[top2(step) for step in o.outputs[0].logprobs] for o in outs], "stats": stats})


def _chat_worker(args, path: str) -> None:
    """--tasks mode: every question as one chat (the conversation so far + the question), greedy, top-2."""
    from vllm import SamplingParams

    items = question_items(path, args)
    limit = harness.model_config(path).get("max_position_embeddings", 1 << 20)
    longest = max(int(c) for c in args.contexts.split(",")) + 256 * args.turns + args.max_tokens
    llm = _engine(args, path, min(limit, -(-longest // 1024) * 1024 + 1024), prefix_caching=True)
    sp = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, logprobs=2)
    _emit(args, llm, llm.chat([it["messages"] for it in items], sp, use_tqdm=False))


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
    env = harness.engine_env(clear_config=True,  # collective_rpc of a function
                             # cost_table off: every chunk past --min-prompt-tokens goes sparse, so what is
                             # measured is the sparse path's accuracy, not the cost model's choices
                             **harness.kvplug_env("sparse_prefill", enabled=sparse,
                                                  min_prompt_tokens=args.min_prompt_tokens,
                                                  pattern_config=pattern_config, cost_table="none"))
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


def measure_recall(args, path: Path, pattern_config: str) -> dict:
    from attention_backends.sparse_prefill import calibration, head_config, search

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    prompt, _ = calibration.kv_retrieval(lambda s: len(tok(s).input_ids), args.recall_tokens, seed=args.seed + 1000)
    dev = "cuda" if harness.cuda_available() else "cpu"
    qs, ks, scale, T = search.capture_qk(str(path), prompt, dev, max_tokens=args.recall_tokens)
    cfg = head_config.load(pattern_config)
    recall, density = search.evaluate_config([q.to(dev) for q in qs], [k.to(dev) for k in ks], scale, cfg,
                                             args.recall_chunk, args.recall_rows, seed=args.seed)
    recall, density = recall.cpu(), density.cpu()
    return {"tokens": T, "chunk": args.recall_chunk, "rows_per_chunk": args.recall_rows,
            "mean": float(recall.mean()), "min": float(recall.min()),
            "heads_below_0.95": int((recall < 0.95).sum()), "heads": int(recall.numel()),
            "density_mean": float(density.mean()),
            "per_head": [[round(float(x), 4) for x in row] for row in recall],
            "density_per_head": [[round(float(x), 4) for x in row] for row in density]}


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
    pattern_config = pattern_config_path(args.pattern_config, path)
    dense = run_engine(args, False, pattern_config)
    sparse = run_engine(args, True, pattern_config)
    if args.tasks:
        return run_tasks(args, path, pattern_config, dense, sparse)
    cases = make_cases(str(path), args.tokens, args.cases, args.seed)
    verdicts = [agreement(d, t, s, args.near_tie)
                for d, t, s in zip(dense["token_ids"], dense["top2"], sparse["token_ids"])]
    per_case = [{"kind": c["kind"], "answer": c["answer"], "prompt_tokens": n, "dense": dt, "sparse": st,
                 "dense_correct": c["answer"] in dt, "sparse_correct": c["answer"] in st, "verdict": v}
                for c, n, dt, st, v in zip(cases, dense["prompt_tokens"], dense["texts"], sparse["texts"], verdicts)]
    s = sparse["stats"]
    summary = {
        "model": str(path), "pattern_config": pattern_config, "cases": len(cases), "tokens": args.tokens,
        "min_prompt_tokens": args.min_prompt_tokens, "max_batched_tokens": args.max_batched_tokens,
        "exact_agreement": sum(v == "same" for v in verdicts) / len(verdicts),
        "agreement_up_to_near_ties": sum(v != "differ" for v in verdicts) / len(verdicts),
        "dense_accuracy": sum(c["dense_correct"] for c in per_case) / len(per_case),
        "sparse_accuracy": sum(c["sparse_correct"] for c in per_case) / len(per_case),
        "sparse_tokens": s["sparse_tokens"], "dense_prefill_tokens_in_sparse_run": s["dense_prefill_tokens"],
        "density": s["computed_pairs"] / s["causal_pairs"] if s["causal_pairs"] else None,
    }
    recall = measure_recall(args, path, pattern_config) if args.recall_tokens else None
    if recall:
        summary.update(recall_mean=recall["mean"], recall_min=recall["min"], recall_density=recall["density_mean"])
    summary["device"] = harness.device_name()
    return {"summary": summary, "cases": per_case, "recall": recall}


def run_tasks(args, path: Path, pattern_config: str, dense: dict, sparse: dict) -> dict:
    items = question_items(str(path), args)
    table = task_summary(items, dense, sparse, args.near_tie)
    s = sparse["stats"]
    summary = {"model": str(path), "pattern_config": pattern_config, "mode": "multi-turn tasks", "tasks": args.tasks,
               "contexts": args.contexts, "turns": args.turns, "min_prompt_tokens": args.min_prompt_tokens,
               "max_batched_tokens": args.max_batched_tokens, "overall": table["overall"],
               "per_task": table["per_task"], "per_turn": table["per_turn"],
               "sparse_tokens": s["sparse_tokens"], "dense_prefill_tokens_in_sparse_run": s["dense_prefill_tokens"],
               "density": s["computed_pairs"] / s["causal_pairs"] if s["causal_pairs"] else None,
               "device": harness.device_name()}
    if not s["sparse_tokens"]:
        # a "sparse" column that was dense would be a lie: say so loudly in the result
        summary["warning"] = "no chunk went through the sparse path (contexts under --min-prompt-tokens?)"
    recall = measure_recall(args, path, pattern_config) if args.recall_tokens else None
    if recall:
        summary.update(recall_mean=recall["mean"], recall_min=recall["min"], recall_density=recall["density_mean"])
    return {"summary": summary, "cases": table["rows"], "recall": recall}


def main(argv=None) -> int:
    args = _parse(argv)
    args.argv = argv
    if args.worker:
        _worker(args)
        return 0
    result = run(args)
    command = harness.command_line("benchmarks.sparse_prefill_accuracy", argv)
    harness.write_results(args.out, command, result["summary"], [{"cases": result["cases"], "recall": result["recall"]}])
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
