"""Accuracy of offloaded shared contexts per cache policy, turn by turn (SCBench multi-turn style).

One engine, kvplug's connector on. Each case is one shared context asked ``--turns`` questions in one chat
(earlier turns' gold answers in the history, as SCBench's multi-turn mode). For every policy, turn 1
computes the context and the connector saves it in the policy's form; before every later turn
``reset_prefix_cache`` empties vLLM's own cache, so the context (and earlier turns) come back from the
CPU tier in that form -- the SCBench question "does compression fail in later turns?". The baseline
("none") opts out of the tiers per request (``kv_transfer_params.kvplug_offload = false``) and keeps
vLLM's prefix cache. Per policy and turn: accuracy against the gold answers, agreement with the baseline's
outputs (same text), and the blocks the connector actually loaded (a run that loaded nothing is reported as
a no-op, not as a pass).

    python -m benchmarks.offload_accuracy                         # SmolLM2-135M on CPU (passkey + kv lookups)
    python -m benchmarks.offload_accuracy --model /tmp/kvstage/models/qwen2.5-coder-0.5b --contexts 8192 \\
        --cases 4 --block-size 16 --max-model-len 12288 --cpu-tier 16GiB --out results/offload_qwen.json  # (GPU)

Writes JSON (every answer), a PNG plot and a Markdown table next to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from benchmarks import harness

DEFAULT_OUT = "benchmarks/results/offload_accuracy_smollm2_cpu.json"
POLICIES = "keep,quant:int8,quant:int4,quant:fp8,drop:streaming,drop:snapkv"
BASELINE = "none"
# Targets (issue): points of accuracy lost vs no offload, all turns together.
TARGET_POINTS = {"keep": 0.0, "quant:int8": 0.5, "quant:int4": 3.0}


def _parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="kvplug model name (default SmolLM2-135M-Instruct) or a prepared "
                    "HF folder")
    ap.add_argument("--tasks", default="passkey,kv", help="benchmarks/scbench task generators")
    ap.add_argument("--contexts", default="1536", help="context lengths (tokens of the model's tokenizer)")
    ap.add_argument("--cases", type=int, default=4, help="cases per (task, context)")
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--policies", default=POLICIES)
    ap.add_argument("--block-size", type=int, default=32, help="KV block size (CPU: multiple of 32)")
    ap.add_argument("--max-tokens", type=int, default=40)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--streaming-window", type=int, default=None,
                    help="drop:streaming window in tokens (default: the config's)")
    ap.add_argument("--snapkv-keep-ratio", type=float, default=None, help="drop:snapkv budget (default: the config's)")
    ap.add_argument("--cpu-tier", default="4GiB")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eager", action=argparse.BooleanOptionalAction, default=True,
                    help="skip torch.compile (saves minutes on CPU)")
    ap.add_argument("--out", default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    from cache_policies import registry

    for name in args.policies.split(","):
        try:
            registry.check_name(name)
        except registry.UnknownPolicyError as exc:
            ap.error(f"--policies: {exc}")
    return args


def _env(args) -> None:
    # Policy parameters are nested under their policy: KVPLUG_CACHE_POLICY__STREAMING__WINDOW_TOKENS.
    policy = {k: v for k, v in (("streaming__window_tokens", args.streaming_window),
                                ("snapkv__keep_ratio", args.snapkv_keep_ratio)) if v is not None}
    os.environ.update(VLLM_ALLOW_INSECURE_SERIALIZATION="1",
                      **harness.kvplug_env("offload", enabled=True, cpu_size=args.cpu_tier, disk_path=""),
                      **harness.kvplug_env("cache_policy", **policy))
    os.environ.pop("KVPLUG_CONFIG_JSON", None)


def _cases(args, model_path):
    return harness.scbench_cases(model_path, args.tasks, args.contexts, args.cases, args.turns, args.seed)


def _messages(case, turn: int) -> list[dict]:
    """SCBench multi-turn: context with the first question, then earlier questions with their gold answers."""
    from benchmarks.scbench.scoring import answer_text

    msgs: list[dict] = []
    for t in range(turn + 1):
        q = case.multi_turns[t].input
        msgs.append({"role": "user", "content": case.context + "\n\n" + q if t == 0 else q})
        if t < turn:
            msgs.append({"role": "assistant", "content": answer_text(case.multi_turns[t].answer)})
    return msgs


def connector_counters(_worker=None) -> dict:
    """In the worker: blocks the connector loaded per tier and batches the backend masked."""
    from kvplug.dropped_tokens import registry

    side = harness.connector_worker_side()
    return {"loaded": dict(side.stats.loaded_blocks), "saved": side.stats.saved_blocks, "masked": registry().stats()}


def _sampling(args, policy: str):
    from vllm import SamplingParams

    from cache_policies.registry import REQUEST_OFFLOAD_KEY, REQUEST_POLICY_KEY

    params = {REQUEST_OFFLOAD_KEY: False} if policy == BASELINE else {REQUEST_POLICY_KEY: policy}
    return SamplingParams(temperature=0.0, max_tokens=args.max_tokens, extra_args={"kv_transfer_params": params})


def run(args) -> dict:
    _env(args)
    from vllm import LLM

    from benchmarks.scbench.scoring import score

    model_path = harness.prepare_model(args.model)
    cases = _cases(args, model_path)
    cuda = harness.cuda_available()
    mem = {"gpu_memory_utilization": 0.85} if cuda else {"kv_cache_memory_bytes": 2 << 30}
    llm = LLM(model=str(model_path), max_model_len=args.max_model_len, block_size=args.block_size,
              enable_prefix_caching=True, seed=0, enforce_eager=args.eager, **mem,
              **harness.kvplug_attention_kwargs(),  # drop policies mask in our backend
              **harness.kvplug_connector_kwargs())
    results = {"model": str(model_path), "device": "cuda" if cuda else "cpu", "args": vars(args),
               "date": harness.utc_now(), "runs": []}
    baseline: list[list[str]] | None = None
    for policy in [BASELINE] + args.policies.split(","):
        sp = _sampling(args, policy)
        llm.reset_prefix_cache()  # every policy starts from an empty vLLM cache
        before = llm.collective_rpc(connector_counters)[0]
        t0 = time.perf_counter()
        texts: list[list[str]] = [[] for _ in cases]
        turn_loads = []
        for t in range(args.turns):
            if t > 0 and policy != BASELINE:
                assert llm.reset_prefix_cache(), "vLLM refused to reset its prefix cache"
            try:
                c0 = llm.collective_rpc(connector_counters)[0]
                outs = llm.chat([_messages(c, t) for c in cases], sp, use_tqdm=False)
                c1 = llm.collective_rpc(connector_counters)[0]
            except Exception as exc:  # e.g. EngineDeadError: its root cause is in the EngineCore's log above
                raise PolicyRunError(policy, t, args.turns, exc) from exc
            turn_loads.append(sum(c1["loaded"].values()) - sum(c0["loaded"].values()))
            for i, o in enumerate(outs):
                texts[i].append(o.outputs[0].text)
            print(f"[{policy}] turn {t + 1}/{args.turns}: loaded {turn_loads[-1]} blocks", flush=True)
        after = llm.collective_rpc(connector_counters)[0]
        if baseline is None:
            baseline = texts
        scores = [[score(c.multi_turns[t].scorer, texts[i][t], c.multi_turns[t].answer) for t in range(args.turns)]
                  for i, c in enumerate(cases)]
        agree = [[texts[i][t] == baseline[i][t] for t in range(args.turns)] for i in range(len(cases))]
        n = len(cases)
        per_turn = [{"turn": t + 1, "accuracy": sum(s[t] for s in scores) / n,
                     "agreement": sum(a[t] for a in agree) / n, "loaded_blocks": turn_loads[t]}
                    for t in range(args.turns)]
        per_task = {}
        for i, c in enumerate(cases):
            d = per_task.setdefault(c.task, {"score": [], "agree": []})
            d["score"] += scores[i]
            d["agree"] += agree[i]
        loaded = {k: after["loaded"][k] - before["loaded"][k] for k in after["loaded"]}
        run_ = {"policy": policy, "seconds": round(time.perf_counter() - t0, 1),
                "accuracy": sum(map(sum, scores)) / (n * args.turns),
                "agreement": sum(map(sum, agree)) / (n * args.turns),
                "later_turns_accuracy": (sum(sum(s[1:]) for s in scores) / (n * (args.turns - 1))
                                         if args.turns > 1 else None),
                "per_turn": per_turn,
                "per_task": {k: {"accuracy": sum(d["score"]) / len(d["score"]),
                                 "agreement": sum(d["agree"]) / len(d["agree"])} for k, d in per_task.items()},
                "loaded_blocks": loaded, "saved_blocks": after["saved"] - before["saved"],
                "masked_batches": after["masked"]["batches"] - before["masked"]["batches"],
                # A policy run whose later turns loaded nothing measured vLLM recomputing, not the policy.
                "offload_no_op": policy != BASELINE and args.turns > 1 and sum(turn_loads[1:]) == 0,
                "answers": [{"case": c.id, "task": c.task, "turn": t + 1, "answer": c.multi_turns[t].answer,
                             "output": texts[i][t], "score": scores[i][t]}
                            for i, c in enumerate(cases) for t in range(args.turns)]}
        results["runs"].append(run_)
        print(f"[{policy}] accuracy={run_['accuracy']:.3f} agreement={run_['agreement']:.3f} "
              f"loaded={loaded} masked_batches={run_['masked_batches']} ({run_['seconds']:.0f}s)", flush=True)
    base = results["runs"][0]["accuracy"]
    for r in results["runs"][1:]:
        r["points_vs_none"] = round(100 * (r["accuracy"] - base), 2)
        target = TARGET_POINTS.get(r["policy"])
        r["target_points"] = target
        if target is not None:
            r["meets_target"] = (not r["offload_no_op"]) and (
                r["agreement"] == 1.0 if target == 0.0 else -r["points_vs_none"] <= target)
    return results


class PolicyRunError(RuntimeError):
    """The engine failed while running one policy's turn: which one, in one line."""

    def __init__(self, policy: str, turn: int, turns: int, exc: BaseException) -> None:
        super().__init__(f"policy {policy!r} failed at turn {turn + 1}/{turns}: {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else '(no message)'} (the engine's own error, "
                         "if it died, is logged above by EngineCore)")
        self.policy = policy


def markdown(results: dict) -> str:
    a = results["args"]
    turns = a["turns"]
    lines = [f"Model {Path(results['model']).name}, {results['device']}, {results['date']}; tasks {a['tasks']}, "
             f"contexts {a['contexts']} tokens, {a['cases']} cases per task x {turns} turns, block size "
             f"{a['block_size']}. Cell: accuracy / agreement with no offload. Later turns reload the context "
             "from the CPU tier in the policy's form.", "",
             "| policy | " + " | ".join(f"turn {t + 1}" for t in range(turns))
             + " | all turns | points vs none | target | blocks loaded | masked batches |",
             "|---|" + "---|" * turns + "---|---|---|---|---|"]
    for r in results["runs"]:
        cells = " | ".join(f"{p['accuracy']:.2f} / {p['agreement']:.2f}" for p in r["per_turn"])
        tgt = r.get("target_points")
        verdict = "" if tgt is None else ("no-op!" if r["offload_no_op"] else
                                          ("met" if r.get("meets_target") else "MISSED")) + f" (<= {tgt})"
        pts = "" if r["policy"] == BASELINE else f"{r['points_vs_none']:+.1f}"
        loaded = "-" if r["policy"] == BASELINE else "cpu {cpu} / disk {disk}".format(**r["loaded_blocks"])
        lines.append(f"| {r['policy']} | {cells} | {r['accuracy']:.3f} / {r['agreement']:.2f} | {pts} | {verdict} | "
                     f"{loaded} | {r['masked_batches']} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    fig, axes = harness.pyplot().subplots(1, 2, figsize=(10, 4), sharey=True)
    for r in results["runs"]:
        x = [p["turn"] for p in r["per_turn"]]
        style = "k--" if r["policy"] == BASELINE else "o-"
        axes[0].plot(x, [p["accuracy"] for p in r["per_turn"]], style, label=r["policy"])
        axes[1].plot(x, [p["agreement"] for p in r["per_turn"]], style, label=r["policy"])
    axes[0].set_title("accuracy per turn")
    axes[1].set_title("agreement with no offload per turn")
    for ax in axes:
        ax.set_xlabel("turn (2+ reload the context from the CPU tier)")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xticks(range(1, results["args"]["turns"] + 1))
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Offload policies, {Path(results['model']).name} ({results['device']})")
    harness.save_figure(fig, path, dpi=120)


def main(argv=None) -> int:
    args = _parse(argv)
    out = Path(args.out)
    try:
        results = run(args)
    except PolicyRunError as exc:
        print(f"offload_accuracy: error: {exc}", file=sys.stderr)
        return 2
    out.parent.mkdir(parents=True, exist_ok=True)
    table = markdown(results)
    written = [out, out.with_suffix(".md"), out.with_suffix(".png")]
    out.write_text(json.dumps(results, indent=1))
    written[1].write_text(table)
    plot(results, written[2])
    print(table + "\nwrote " + ", ".join(map(str, written)))
    missed = [r["policy"] for r in results["runs"] if r.get("meets_target") is False]
    if missed:
        print(f"targets missed: {', '.join(missed)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
