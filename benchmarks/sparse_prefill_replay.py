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
tail<N> (sparse_prefill.dense_tail_rows=N), seg<N> (sparse_prefill.vertical_segment_rows=N), oracle
(sparse_prefill.exact_selection with vertical_segment_rows=64: each query block's columns and key blocks ranked by
its rows' exact attention mass, diagonals by every row's, same budgets; a dense pass more per chunk), oracle_chunk
(exact_selection alone: columns chunk-wide from every row), budgets<F> (the
config's length-proportional budgets times F on every head, as the accuracy run's budgets=F variant),
floor<N> (sparse_prefill.min_prompt_tokens=N), dense_first_chunk (floor = --max-batched-tokens + 1: the prompt's
first chunk dense, the later ones sparse), dense_layers<A>[-<B>][+...] (every head of those layers dense, e.g.
dense_layers20, dense_layers0-3+20). Mode names may be joined with "&" (budgets2&dense_first_chunk): their keys
combined. Per-head configs a mode derives are written next to --out (<out>_configs/). The result file is rewritten
after every answer.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from benchmarks import harness

# oracle: every query block ranks columns and key blocks by its own rows' exact attention mass (diagonals: the
# chunk's every row), under the config's budgets; oracle_chunk: columns from every row of the chunk, chunk-wide
OVERRIDES = {"dense": {"dense": True}, "sparse": {}, "oracle": {"exact_selection": True, "vertical_segment_rows": 64},
             "oracle_chunk": {"exact_selection": True}}


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


MODES = ("dense, sparse, oracle, oracle_chunk, tail<N>, seg<N>, budgets<F>, floor<N>, dense_first_chunk, dense_layers<A>[-<B>][+...], "
         "joined with &")


def _layers(spec: str, mode: str) -> tuple[int, ...]:
    """'0-3+20' -> (0, 1, 2, 3, 20); SystemExit naming ``mode`` when malformed."""
    out: set[int] = set()
    for part in spec.split("+"):
        lo, dash, hi = part.partition("-")
        if not lo.isdigit() or (dash and not hi.isdigit()) or (dash and int(hi) < int(lo)):
            raise SystemExit(f"--modes: {mode!r}: layers are A, A-B (A <= B) joined with +, got {part!r}")
        out.update(range(int(lo), int(hi if dash else lo) + 1))
    return tuple(sorted(out))


def mode_override(mode: str, chunk: int = 8192) -> dict:
    """A --modes entry -> the sparse prefill override (backend_hooks.set_override) it runs under, plus the
    replay's own keys that derive a per-head config (resolved by mode_config): "budgets" (a factor) and
    "dense_layers" (layer ids). ``chunk``: --max-batched-tokens (dense_first_chunk's floor)."""
    if "&" in mode:
        out: dict = {}
        for part in mode.split("&"):
            keys = mode_override(part, chunk)
            clash = sorted(set(keys) & set(out))
            if clash:
                raise SystemExit(f"--modes: {mode!r} sets {clash[0]} twice")
            out.update(keys)
        if "dense" in out and len(out) > 1:
            raise SystemExit(f"--modes: {mode!r}: dense takes no other mode")
        return out
    if mode in OVERRIDES:
        return OVERRIDES[mode]
    if mode == "dense_first_chunk":
        return {"min_prompt_tokens": chunk + 1}
    for prefix, key in (("tail", "dense_tail_rows"), ("seg", "vertical_segment_rows"), ("floor", "min_prompt_tokens")):
        if mode.startswith(prefix) and mode[len(prefix):].isdigit():
            return {key: int(mode[len(prefix):])}
    if mode.startswith("budgets"):
        try:
            factor = float(mode[7:])
        except ValueError:
            factor = 0.0
        if not 0 < factor < float("inf"):
            raise SystemExit(f"--modes: {mode!r}: budgets<F> takes a factor > 0 (budgets2, budgets0.5)")
        return {"budgets": factor}
    if mode.startswith("dense_layers"):
        return {"dense_layers": _layers(mode[12:], mode)}
    raise SystemExit(f"--modes: unknown mode {mode!r} ({MODES})")


def dense_layers_config(cfg, layers: tuple[int, ...]):
    """``cfg`` (head_config.PatternConfig) with every head of ``layers`` dense."""
    import msgspec

    from attention_backends.sparse_prefill import head_config

    if cfg.num_layers is not None and layers and layers[-1] >= cfg.num_layers:
        raise SystemExit(f"--modes: layer {layers[-1]} out of range (the config has {cfg.num_layers} layers)")
    if cfg.num_heads is None:
        raise SystemExit("--modes: dense_layers needs a per-head config that records num_heads")
    dense = head_config.HeadPattern(pattern="dense")
    heads = {li: dict(hs) for li, hs in cfg.layers.items()}
    for li in layers:
        heads[li] = {h: dense for h in range(cfg.num_heads)}
    return msgspec.structs.replace(cfg, layers=heads, calibration={**cfg.calibration, "dense_layers": list(layers)}
                                   ).validate()


def mode_config(mode: str, override: dict, base: str, folder) -> dict:
    """``override`` with the replay's own keys (budgets, dense_layers) turned into a per-head config derived
    from ``base`` (a pattern JSON), written into ``folder``: the set_override fields the engine takes."""
    if "budgets" not in override and "dense_layers" not in override:
        return override
    from pathlib import Path

    from attention_backends.sparse_prefill import head_config

    cfg = head_config.load(base)
    if "budgets" in override:
        cfg = harness.scaled_config(cfg, override["budgets"])
    if "dense_layers" in override:
        cfg = dense_layers_config(cfg, override["dense_layers"])
    path = Path(folder) / f"{Path(base).stem}_{mode.replace('&', '_')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(cfg.to_json())
    rest = {k: v for k, v in override.items() if k not in ("budgets", "dense_layers")}
    return {**rest, "pattern_config": str(path)}


def shipped_config(model_path: str) -> str:
    """The per-head config pattern_config=auto serves for this model (SystemExit when there is none)."""
    from attention_backends.sparse_prefill import model_identity

    path, why = model_identity.find_shipped(model_identity.model_identity(model_path))
    if path is None:
        raise SystemExit(f"budgets/dense_layers modes need the model's shipped per-head config: {why}")
    return str(path)


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
    ap.add_argument("--max-tokens", type=int, default=None,
                    help=f"new tokens per answer (default: the task's own budget: {harness.task_budgets_text()})")
    ap.add_argument("--out", default="benchmarks/results/sparse_prefill_replay.json")
    args = ap.parse_args(argv)
    wanted = parse_questions(args.questions)
    overrides = {m: mode_override(m, args.max_batched_tokens)
                 for m in filter(None, (x.strip() for x in args.modes.split(",")))}
    # the engine (spawned below) reads these; the config decides nothing else (cost_table none: every chunk past
    # the floor sparse, as in the accuracy run)
    os.environ.update(harness.sparse_prefill_env(args.min_prompt_tokens))
    os.environ.pop("KVPLUG_CONFIG_JSON", None)
    os.environ.setdefault("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", "3000")
    path = str(harness.prepare_model(args.model))
    if any("budgets" in o or "dense_layers" in o for o in overrides.values()):
        base, folder = shipped_config(path), str(args.out).rsplit(".", 1)[0] + "_configs"
        overrides = {m: mode_config(m, o, base, folder) for m, o in overrides.items()}
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

    budgets = harness.answer_budgets(args.tasks, args.max_tokens)
    positions = harness.model_config(path).get("max_position_embeddings")  # vLLM refuses a longer max_model_len
    max_model_len = harness.chat_max_model_len(max(c for _, c, _ in wanted), args.turns, max(budgets.values()),
                                               positions)
    llm = LLM(**harness.sparse_prefill_llm_kwargs(path, max_model_len, args.max_batched_tokens, prefix_caching=True))
    rows = []
    summary = {"model": path, "questions": args.questions, "modes": list(overrides), "device": harness.device_name(),
               "min_prompt_tokens": args.min_prompt_tokens, "max_batched_tokens": args.max_batched_tokens,
               "max_tokens": budgets, "cut_at_max_tokens": 0}
    for key in wanted:  # question-major: a run cut short still compares the modes of the questions it reached
        it = by_key[key]
        sp = SamplingParams(temperature=0.0, max_tokens=budgets[it["task"]])
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
            cut = harness.cut_at_budget([o])
            summary["cut_at_max_tokens"] += harness.count_cut(f"sparse_prefill_replay {it['case']} {mode}", cut,
                                                              [it["scorer"]])
            rows.append({"case": it["case"], "context_tokens": it["context_tokens"], "turn": it["turn"],
                         "mode": mode, "override": override, "answer": it["answer"], "text": text, "cut": cut[0],
                         "score": score(it["scorer"], text, it["answer"]),
                         "seconds": round(time.monotonic() - t0, 1), "prompt_tokens": len(o.prompt_token_ids),
                         **pairs, "density": pairs["computed_pairs"] / pairs["causal_pairs"]
                         if pairs["causal_pairs"] else None})
            print(f"[sparse_prefill_replay] {json.dumps(rows[-1])}", file=sys.stderr, flush=True)
            harness.write_results(args.out, "python -m benchmarks.sparse_prefill_replay " + " ".join(
                sys.argv[1:] if argv is None else argv), dict(summary), rows)


if __name__ == "__main__":
    main()
