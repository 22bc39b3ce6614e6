"""Replay a few questions of the sparse prefill accuracy run (benchmarks/sparse_prefill_accuracy.py --tasks) dense,
sparse and under sparse_prefill keys, one question at a time in every mode, on one engine: to see whether a loss
reproduces (e.g. on the CPU, where a whole sweep is too slow) and what fixes it. A diagnostic: n is a handful of
questions, never an accuracy figure.

The issue-16 losses (H100 gate run: first turns at 16K/24K) on the CPU, the shipped per-head config, chunks of 8192,
every chunk past 8192 tokens sparse (~10-25 min per question and mode on a 2-core CPU; VLLM_EXECUTE_MODEL_TIMEOUT_
SECONDS is raised to 3000 here, a sparse 8K chunk takes minutes there):
    python -m benchmarks.sparse_prefill_replay --model qwen2.5-coder-0.5b-instruct \\
        --questions passkey-0-4@16000,passkey-0-7@16000,passkey-0-1@24000 --modes dense,sparse,tail64,tail256,seg1024 \\
        --out benchmarks/results/sparse_prefill_replay_qwen_cpu.json
Questions are CASE@CONTEXT[:TURN] (turn 0 = the first question, the whole context prefilled), generated as the
accuracy run generates them (--cases/--turns/--seed must match it). Modes: dense, sparse (the config as given),
tail<N> (sparse_prefill.dense_tail_rows=N), seg<N> (sparse_prefill.vertical_segment_rows=N). The result file is rewritten after every answer.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from benchmarks import harness

OVERRIDES = {"dense": {"dense": True}, "sparse": {}}


def parse_questions(spec: str) -> list[tuple[str, int, int]]:
    """'CASE@CONTEXT[:TURN],...' -> [(case, context, turn)]; SystemExit naming a malformed one."""
    out = []
    for item in filter(None, (x.strip() for x in spec.split(","))):
        case, _, rest = item.partition("@")
        ctx, _, turn = rest.partition(":")
        try:
            out.append((case, int(ctx), int(turn or 0)))
        except ValueError:
            raise SystemExit(f"--questions: {item!r} is not CASE@CONTEXT[:TURN]") from None
        if not case:
            raise SystemExit(f"--questions: {item!r} has no case")
    return out


def mode_override(mode: str) -> dict:
    """A --modes entry -> the sparse prefill override (backend_hooks.set_override) it runs under."""
    if mode in OVERRIDES:
        return OVERRIDES[mode]
    if mode.startswith("tail") and mode[4:].isdigit():
        return {"dense_tail_rows": int(mode[4:])}
    if mode.startswith("seg") and mode[3:].isdigit():
        return {"vertical_segment_rows": int(mode[3:])}
    raise SystemExit(f"--modes: unknown mode {mode!r} (dense, sparse, tail<N>, seg<N>)")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.sparse_prefill_replay", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct", help="model folder or kvplug model name")
    ap.add_argument("--questions", required=True, help="CASE@CONTEXT[:TURN],... (see above)")
    ap.add_argument("--modes", default="dense,sparse,tail64")
    ap.add_argument("--tasks", default="passkey")
    ap.add_argument("--cases", type=int, default=12)
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-prompt-tokens", type=int, default=8192)
    ap.add_argument("--max-batched-tokens", type=int, default=8192)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--out", default="benchmarks/results/sparse_prefill_replay.json")
    args = ap.parse_args(argv)
    wanted = parse_questions(args.questions)
    overrides = {m: mode_override(m) for m in filter(None, (x.strip() for x in args.modes.split(",")))}
    # the engine (spawned below) reads these; the config decides nothing else (cost_table none: every chunk past
    # the floor sparse, as in the accuracy run)
    os.environ.update(harness.sparse_prefill_env(args.min_prompt_tokens))
    os.environ.pop("KVPLUG_CONFIG_JSON", None)
    os.environ.setdefault("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", "3000")
    path = str(harness.prepare_model(args.model))
    contexts = ",".join(sorted({str(c) for _, c, _ in wanted}, key=int))
    by_key = {(it["case"], it["context_tokens"], it["turn"]): it for it in harness.question_items(
        path, args.tasks, contexts, args.cases, args.turns, args.seed, multi_turn=True)}
    missing = [w for w in wanted if w not in by_key]
    if missing:
        raise SystemExit(f"--questions: {missing[0]} is not a question of --tasks {args.tasks} --cases {args.cases} "
                         f"--turns {args.turns}")
    from vllm import LLM, SamplingParams

    from attention_backends.sparse_prefill import backend_hooks, runner
    from benchmarks.scbench.scoring import score

    max_model_len = harness.chat_max_model_len(max(c for _, c, _ in wanted), args.turns, args.max_tokens)
    llm = LLM(**harness.sparse_prefill_llm_kwargs(path, max_model_len, args.max_batched_tokens, prefix_caching=True))
    sp = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    rows = []
    summary = {"model": path, "questions": args.questions, "modes": list(overrides), "device": harness.device_name(),
               "min_prompt_tokens": args.min_prompt_tokens, "max_batched_tokens": args.max_batched_tokens}
    for key in wanted:  # question-major: a run cut short still compares the modes of the questions it reached
        it = by_key[key]
        for mode, override in overrides.items():
            llm.collective_rpc(backend_hooks.set_override, kwargs=override)
            if not llm.reset_prefix_cache():
                raise SystemExit("could not empty the prefix cache between modes")
            before = llm.collective_rpc(runner.stats_snapshot)[0]
            t0 = time.monotonic()
            o = llm.chat([it["messages"]], sp, use_tqdm=False)[0]
            after = llm.collective_rpc(runner.stats_snapshot)[0]
            pairs = {k: after[k] - before[k] for k in ("computed_pairs", "causal_pairs", "sparse_tokens")}
            text = o.outputs[0].text
            rows.append({"case": it["case"], "context_tokens": it["context_tokens"], "turn": it["turn"],
                         "mode": mode, "answer": it["answer"], "text": text,
                         "score": score(it["scorer"], text, it["answer"]),
                         "seconds": round(time.monotonic() - t0, 1), "prompt_tokens": len(o.prompt_token_ids),
                         **pairs, "density": pairs["computed_pairs"] / pairs["causal_pairs"]
                         if pairs["causal_pairs"] else None})
            print(f"[sparse_prefill_replay] {json.dumps(rows[-1])}", file=sys.stderr, flush=True)
            harness.write_results(args.out, "python -m benchmarks.sparse_prefill_replay " + " ".join(
                sys.argv[1:] if argv is None else argv), dict(summary), rows)


if __name__ == "__main__":
    main()
