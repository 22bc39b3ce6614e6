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

``--peers native,lmcache-0.5.3`` adds other offload systems after kvplug's policies, each in its own engine
subprocess without kvplug's connector, with the same cases, turns, prompts, sampling and the same
``reset_prefix_cache`` before turns 2+: vLLM's native offloading (``kv_offloading_size`` = the --cpu-tier in
GiB, as benchmarks/gpu_offload.py's native mode) and LMCache (the transfer config, environment and probe of
benchmarks/peers/lmcache.py, as gpu_offload's LMCache modes; ``lmcache`` or a staged ``lmcache-<version>``
under --lmcache-root; ``lmcache-mp[-<version>]``: LMCache's multi-process mode, its own server with the
--cpu-tier budget for the peer's duration, the peer to use on vLLM >= 0.26, where the in-process rows carry
``known_issue``: LMCache #4463). Their rows join the same table, JSON and plot. Evidence that a peer loaded
from its CPU tier in turns 2+: native and lmcache-mp, vLLM's ``vllm:external_prefix_cache_hits`` counter
(tokens a connector supplied; lmcache-mp's row also has ``lmcache_server``: what its server logged); in-process
LMCache, the tokens its own log says it retrieved (benchmarks/peers/lmcache.py's LMCacheLog). A
peer whose later turns loaded nothing is a NO-OP row with the reason; a peer that cannot run (not staged,
import failed, engine failed) is a row with its one-line error. A peer runs vLLM's own attention backend
(kvplug's rows run kvplug's): its turn 1, computed without a load, shows what that alone changes against
"none".

Writes JSON (every answer), a PNG plot and a Markdown table next to --out.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

from benchmarks import harness
from benchmarks.peers import lmcache

DEFAULT_OUT = "benchmarks/results/offload_accuracy_smollm2_cpu.json"
POLICIES = "keep,quant:int8,quant:int4,quant:fp8,drop:streaming,drop:snapkv"
BASELINE = "none"
# Targets (issue): points of accuracy lost vs no offload, all turns together.
TARGET_POINTS = {"keep": 0.0, "quant:int8": 0.5, "quant:int4": 3.0}
NATIVE = "native"  # vLLM's own CPU offloading (--kv-offloading-size); the other peers are LMCache modes
EXTERNAL_HITS = lmcache.EXTERNAL_HITS  # prompt tokens a connector supplied (vLLM's metrics)
PEER_STDERR_TAIL = 8  # error lines of a peer's engine process kept in its row


def check_peer(name: str) -> None:
    if name != NATIVE and not lmcache.is_lmcache(name):
        raise ValueError(f"unknown peer {name!r} (known: {NATIVE}, {lmcache.LMCACHE}, "
                         f"{lmcache.LMCACHE}-<version>, {lmcache.LMCACHE_MP}, {lmcache.LMCACHE_MP}-<version>)")


def peer_names(args) -> list[str]:
    return [p for p in args.peers.split(",") if p]


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
    ap.add_argument("--max-tokens", type=int, default=None,
                    help=f"new tokens per answer (default: the task's own budget: {harness.task_budgets_text()})")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--streaming-window", type=int, default=None,
                    help="drop:streaming window in tokens (default: the config's)")
    ap.add_argument("--snapkv-keep-ratio", type=float, default=None, help="drop:snapkv budget (default: the config's)")
    ap.add_argument("--cpu-tier", default="4GiB")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eager", action=argparse.BooleanOptionalAction, default=True,
                    help="skip torch.compile (saves minutes on CPU)")
    ap.add_argument("--peers", default="",
                    help=f"comma list of {NATIVE}, {lmcache.LMCACHE}[-mp], {lmcache.LMCACHE}[-mp]-<version>: other "
                         "offload systems, each in its own engine after kvplug's policies (see above)")
    ap.add_argument("--lmcache-root", default=lmcache.LMCACHE_ROOT,
                    help="where lmcache-<version> peers find lmcache-<version>/ and lmcache-deps/")
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--peer-worker", default=None, help=argparse.SUPPRESS)  # in a peer's own process
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # a peer's process gets the same flags
    from cache_policies import registry

    for name in args.policies.split(","):
        try:
            registry.check_name(name)
        except registry.UnknownPolicyError as exc:
            ap.error(f"--policies: {exc}")
    for name in peer_names(args):
        try:
            check_peer(name)
        except ValueError as exc:
            ap.error(f"--peers: {exc}")
    try:
        cpu_tier_gib(args.cpu_tier)
    except ValueError as exc:
        ap.error(f"--cpu-tier: {exc}")
    return args


def cpu_tier_gib(cpu_tier: str) -> float:
    """--cpu-tier in GiB: the budget a peer's CPU tier gets (native's kv_offloading_size, LMCache's local CPU)."""
    from kvplug.config import parse_size

    return parse_size(cpu_tier, "--cpu-tier") / (1 << 30)


def _env(args) -> None:
    # Policy parameters are nested under their policy: KVPLUG_CACHE_POLICY__STREAMING__WINDOW_TOKENS.
    policy = {k: v for k, v in (("streaming__window_tokens", args.streaming_window),
                                ("snapkv__keep_ratio", args.snapkv_keep_ratio)) if v is not None}
    os.environ.update(VLLM_ALLOW_INSECURE_SERIALIZATION="1",
                      **harness.kvplug_env("offload", enabled=True, cpu_size=args.cpu_tier, disk_path=""),
                      **harness.kvplug_env("cache_policy", **policy))
    os.environ.pop("KVPLUG_CONFIG_JSON", None)
    # Something in this process touches CUDA before the first engine starts (on the H100, 2026-12-07, the engine
    # core then died with "Cannot re-initialize CUDA in forked subprocess"): start vLLM's processes by spawn.
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")


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


def _sampling(args, policy: str | None, cases) -> list:
    """One per case: greedy, its task's answer budget (--max-tokens where given); kvplug's policies (and "none")
    name theirs per request; a peer's (None) carry none."""
    from vllm import SamplingParams

    from cache_policies.registry import REQUEST_OFFLOAD_KEY, REQUEST_POLICY_KEY

    new_tokens = harness.answer_budgets(args.tasks, args.max_tokens)
    if policy is None:
        return [SamplingParams(temperature=0.0, max_tokens=new_tokens[c.task]) for c in cases]
    params = {REQUEST_OFFLOAD_KEY: False} if policy == BASELINE else {REQUEST_POLICY_KEY: policy}
    return [SamplingParams(temperature=0.0, max_tokens=new_tokens[c.task], extra_args={"kv_transfer_params": params})
            for c in cases]


def engine_kwargs(args, model_path, cuda: bool) -> dict:
    """LLM(...) arguments every engine of a run shares (kvplug's and the peers')."""
    mem = {"gpu_memory_utilization": 0.85} if cuda else {"kv_cache_memory_bytes": 2 << 30}
    return {"model": str(model_path), "max_model_len": args.max_model_len, "block_size": args.block_size,
            "enable_prefix_caching": True, "seed": 0, "enforce_eager": args.eager, **mem}


def peer_engine_kwargs(peer: str, args, model_path, cuda: bool) -> dict:
    """A peer's LLM(...) arguments: the shared ones, vLLM's metrics on (native's evidence), no kvplug connector
    or attention backend; native offloads --cpu-tier GiB, LMCache is benchmarks/peers/lmcache.py's transfer
    config."""
    kw = {**engine_kwargs(args, model_path, cuda), "disable_log_stats": False}
    if peer == NATIVE:
        kw["kv_offloading_size"] = cpu_tier_gib(args.cpu_tier)
    else:
        from vllm.config import KVTransferConfig

        kw["kv_transfer_config"] = KVTransferConfig(**lmcache.lmcache_transfer_config(peer))
    return kw


def peer_env(peer: str, args, base: dict[str, str]) -> dict[str, str]:
    """A peer's engine environment: ``base`` without kvplug's config (its tiers are off there), plus what
    benchmarks/peers/lmcache.py gives the same mode (LMCache: its configuration with the --cpu-tier budget, staged
    folders)."""
    clean = {k: v for k, v in base.items() if not k.startswith("KVPLUG_")}
    mode_args = argparse.Namespace(cpu_gib=cpu_tier_gib(args.cpu_tier), lmcache_root=args.lmcache_root)
    return lmcache.mode_env(peer, mode_args, clean)


def ask_turns(llm, name: str, cases, sp, turns: int, reset_later: bool, evidence, on_turn=None):
    """Every case's turns, one batch a turn (``sp``: one SamplingParams per case); with ``reset_later`` vLLM's
    prefix cache is emptied before turns 2+ so the context comes back from the CPU tier. Returns the texts per
    case and, per turn, what ``evidence()`` (numeric counters) grew by plus the prompt tokens vLLM reported cached
    (``cached_tokens``) and asked, and the answers cut at their token budget (``cut_at_max_tokens``).
    ``on_turn(t)`` runs first in each turn (a peer marks its log there). PolicyRunError names a failed turn."""
    texts: list[list[str]] = [[] for _ in cases]
    per_turn: list[dict] = []
    for t in range(turns):
        if on_turn is not None:
            on_turn(t)
        if t > 0 and reset_later:
            assert llm.reset_prefix_cache(), "vLLM refused to reset its prefix cache"
        try:
            c0 = evidence()
            outs = llm.chat([_messages(c, t) for c in cases], sp, use_tqdm=False)
            c1 = evidence()
        except Exception as exc:  # e.g. EngineDeadError: its root cause is in the EngineCore's log above
            raise PolicyRunError(name, t, turns, exc) from exc
        grew = {k: c1[k] - c0[k] for k in c1 if k in c0}
        grew["cached_tokens"] = sum(int(getattr(o, "num_cached_tokens", 0) or 0) for o in outs)
        grew["prompt_tokens"] = sum(len(getattr(o, "prompt_token_ids", None) or ()) for o in outs)
        grew["cut_at_max_tokens"] = harness.count_cut(f"offload_accuracy {name} turn {t + 1}",
                                                      harness.cut_at_budget(outs),
                                                      [c.multi_turns[t].scorer for c in cases])
        per_turn.append(grew)
        for i, o in enumerate(outs):
            texts[i].append(o.outputs[0].text)
        print(f"[{name}] turn {t + 1}/{turns}: " + ", ".join(f"{k} {v}" for k, v in grew.items()), flush=True)
    return texts, per_turn


def scored(name: str, cases, texts: list[list[str]], baseline: list[list[str]] | None, turns: int,
           per_turn_evidence: list[dict]) -> dict:
    """One row: accuracy and agreement with the baseline's texts (itself where None), all turns, per turn (with
    the turn's evidence), per task, and every answer."""
    from benchmarks.scbench.scoring import score

    baseline = texts if baseline is None else baseline
    scores = [[score(c.multi_turns[t].scorer, texts[i][t], c.multi_turns[t].answer) for t in range(turns)]
              for i, c in enumerate(cases)]
    agree = [[texts[i][t] == baseline[i][t] for t in range(turns)] for i in range(len(cases))]
    n = len(cases)
    per_task: dict = {}
    for i, c in enumerate(cases):
        d = per_task.setdefault(c.task, {"score": [], "agree": []})
        d["score"] += scores[i]
        d["agree"] += agree[i]
    return {"policy": name, "accuracy": sum(map(sum, scores)) / (n * turns),
            "agreement": sum(map(sum, agree)) / (n * turns),
            "later_turns_accuracy": sum(sum(s[1:]) for s in scores) / (n * (turns - 1)) if turns > 1 else None,
            "cut_at_max_tokens": sum(e.get("cut_at_max_tokens", 0) for e in per_turn_evidence),
            "per_turn": [{"turn": t + 1, "accuracy": sum(s[t] for s in scores) / n,
                          "agreement": sum(a[t] for a in agree) / n, **per_turn_evidence[t]} for t in range(turns)],
            "per_task": {k: {"accuracy": sum(d["score"]) / len(d["score"]),
                             "agreement": sum(d["agree"]) / len(d["agree"])} for k, d in per_task.items()},
            "answers": [{"case": c.id, "task": c.task, "turn": t + 1, "answer": c.multi_turns[t].answer,
                         "output": texts[i][t], "score": scores[i][t]} for i, c in enumerate(cases) for t in range(turns)]}


def run(args) -> dict:
    _env(args)
    model_path = harness.prepare_model(args.model)
    cases = _cases(args, model_path)
    cuda = harness.cuda_available()
    results = {"model": str(model_path), "device": "cuda" if cuda else "cpu", "args": vars(args),
               "date": harness.utc_now(), "runs": kvplug_rows(args, cases, model_path, cuda)}
    gc.collect()  # kvplug's engine (its process, its memory) ends with its last reference: the peers need the device
    outputs = [a["output"] for a in results["runs"][0]["answers"]]  # case by case, turn by turn
    baseline = [outputs[i * args.turns:(i + 1) * args.turns] for i in range(len(cases))]
    for peer in peer_names(args):
        row = run_peer(peer, args, cases, baseline)
        results["runs"].append(row)
        print(f"[{peer}] " + (f"could not run: {row['error']}" if "error" in row else
                              f"accuracy={row['accuracy']:.3f} agreement={row['agreement']:.3f} "
                              f"({row['seconds']:.0f}s)"), flush=True)
    add_points(results["runs"])
    return results


def kvplug_rows(args, cases, model_path, cuda: bool) -> list[dict]:
    """The baseline's and kvplug's policies' rows, all in one engine with kvplug's connector."""
    from vllm import LLM

    llm = LLM(**engine_kwargs(args, model_path, cuda),
              **harness.kvplug_attention_kwargs(),  # drop policies mask in our backend
              **harness.kvplug_connector_kwargs())
    rows: list[dict] = []
    baseline: list[list[str]] | None = None

    def loaded_blocks() -> dict:
        return {"loaded_blocks": sum(llm.collective_rpc(connector_counters)[0]["loaded"].values())}

    for policy in [BASELINE] + args.policies.split(","):
        sp = _sampling(args, policy, cases)
        llm.reset_prefix_cache()  # every policy starts from an empty vLLM cache
        before = llm.collective_rpc(connector_counters)[0]
        t0 = time.perf_counter()
        texts, evidence = ask_turns(llm, policy, cases, sp, args.turns, policy != BASELINE, loaded_blocks)
        after = llm.collective_rpc(connector_counters)[0]
        if baseline is None:
            baseline = texts
        turn_loads = [e["loaded_blocks"] for e in evidence]
        loaded = {k: after["loaded"][k] - before["loaded"][k] for k in after["loaded"]}
        row = {**scored(policy, cases, texts, baseline, args.turns, evidence),
               "seconds": round(time.perf_counter() - t0, 1),
               "loaded_blocks": loaded, "saved_blocks": after["saved"] - before["saved"],
               "masked_batches": after["masked"]["batches"] - before["masked"]["batches"],
               # A policy run whose later turns loaded nothing measured vLLM recomputing, not the policy.
               "offload_no_op": policy != BASELINE and args.turns > 1 and sum(turn_loads[1:]) == 0}
        rows.append(row)
        print(f"[{policy}] accuracy={row['accuracy']:.3f} agreement={row['agreement']:.3f} "
              f"loaded={loaded} masked_batches={row['masked_batches']} ({row['seconds']:.0f}s)", flush=True)
    return rows


def add_points(runs: list[dict]) -> None:
    """Points of accuracy vs the baseline (the first row) and each kvplug policy's target verdict."""
    base = runs[0]["accuracy"]
    for r in runs[1:]:
        if "error" in r:
            continue
        r["points_vs_none"] = round(100 * (r["accuracy"] - base), 2)
        target = TARGET_POINTS.get(r["policy"]) if not r.get("peer") else None
        r["target_points"] = target
        if target is not None:
            r["meets_target"] = (not r["offload_no_op"]) and (
                r["agreement"] == 1.0 if target == 0.0 else -r["points_vs_none"] <= target)


def peer_evidence(llm) -> dict:
    """In a peer's process: vLLM's count of prompt tokens a connector supplied (absent where this vLLM's
    metrics do not have it)."""
    hits = lmcache.external_hit_tokens(llm)
    return {} if hits is None else {"external_hit_tokens": hits}


def peer_worker(args) -> None:
    """In a peer's own process: the same cases, turns and resets as kvplug's policies; emits texts and evidence."""
    from vllm import LLM

    model_path = harness.prepare_model(args.model)
    cases = _cases(args, model_path)
    peer = args.peer_worker
    lmcache.mark_phase("startup")
    t0 = time.perf_counter()
    llm = LLM(**peer_engine_kwargs(peer, args, model_path, harness.cuda_available()))
    startup_s = time.perf_counter() - t0

    def mark(t: int) -> None:  # LMCacheLog counts LMCache's lines per phase, and its retrieves per later turn
        if t < 2:
            lmcache.mark_phase(("turn1", "follow_ups")[t])
        if t > 0:
            print(lmcache.FOLLOW_UP_MARK + str(t + 1), file=sys.stderr, flush=True)

    llm.reset_prefix_cache()
    t1 = time.perf_counter()
    try:
        texts, evidence = ask_turns(llm, peer, cases, _sampling(args, None, cases), args.turns, True,
                                    lambda: peer_evidence(llm), mark)
    except PolicyRunError as exc:
        harness.emit_result({"error": str(exc)})
        return
    harness.emit_result({"texts": texts, "evidence": evidence, "startup_s": round(startup_s, 1),
                         "seconds": round(time.perf_counter() - t1, 1)})


def peer_no_op(peer: str, evidence: list[dict], log=None) -> str | None:
    """Why a peer's turns 2+ measured recomputation, not its CPU tier (None where its own evidence shows loads):
    native, vLLM's external-hit counter (or, where this vLLM has none, cached tokens under half the prompts
    after the reset); LMCache, the tokens its log says it retrieved (benchmarks/peers/lmcache.py's reasons)."""
    later = evidence[1:]
    if not later:
        return None
    if log is not None:
        if sum(log.follow_up_retrieved):
            return None
        return lmcache.no_op_reason({"no_op": True, "lmcache_log": log.counts}, 0)
    if all("external_hit_tokens" in e for e in later):
        if sum(e["external_hit_tokens"] for e in later):
            return None
        return f"vLLM's {EXTERNAL_HITS} stayed 0 in turns 2+ after reset_prefix_cache: nothing came from its CPU tier"
    cached, prompt = sum(e["cached_tokens"] for e in later), sum(e["prompt_tokens"] for e in later)
    if prompt and 2 * cached >= prompt:
        return None
    return (f"this vLLM has no {EXTERNAL_HITS} counter, and after reset_prefix_cache turns 2+ got {cached} of "
            f"{prompt} prompt tokens cached (under half)")


def peer_worker_argv(argv: list[str]) -> list[str]:
    """The parent's flags a peer's process needs (it regenerates the same cases from them)."""
    return harness.worker_argv(argv, drop=("--peers", "--out", "--policies", "--peer-worker"))


def run_peer(peer: str, args, cases, baseline: list[list[str]]) -> dict:
    """A peer's row, scored like kvplug's, or ``{"policy", "peer", "error"}`` saying in one line why there is
    none (LMCache not staged or not importable, its engine failed)."""
    env = peer_env(peer, args, harness.engine_env(clear_config=True))
    extra, failed, log = lmcache.prepare(peer, args.lmcache_root, env)
    head = {"policy": peer, "peer": True, **extra}
    if failed:
        return {**head, "error": failed}
    cmd = [sys.executable, "-m", "benchmarks.offload_accuracy", *peer_worker_argv(args.argv), "--peer-worker", peer]

    def run(worker_env: dict[str, str]) -> dict:
        try:
            return harness.run_result_process(cmd, worker_env, f"{peer} run failed", stderr_tail=PEER_STDERR_TAIL,
                                              on_line=log.feed if log else None)
        except SystemExit as exc:
            return {"error": str(exc)}

    # an LMCache MP peer's server runs for the duration of its engine's process, with the same CPU budget
    r = lmcache.serve(peer, cpu_tier_gib(args.cpu_tier), env, run, extra.get("lmcache"))
    if "lmcache_server" in r:
        head["lmcache_server"] = r.pop("lmcache_server")
    if log is not None:
        head["lmcache_log"] = log.counts
    if "error" in r:  # one line: how it failed and the first error its log kept (the root cause, e.g. the platform)
        lines = r["error"].splitlines() or ["(no message)"]
        return {**head, "error": ": ".join(lines[:2]), "error_tail": r["error"]}
    evidence = r["evidence"]
    if log is not None:  # LMCache's own retrieves per later turn: what its connector loaded
        retrieved = [0] + list(log.follow_up_retrieved)
        for t, e in enumerate(evidence):
            e["lmcache_retrieved_tokens"] = retrieved[t] if t < len(retrieved) else None
    reason = peer_no_op(peer, evidence, log)
    return {**scored(peer, cases, r["texts"], baseline, args.turns, evidence), **head,
            "seconds": r["seconds"], "startup_s": r["startup_s"],
            "offload_no_op": args.turns > 1 and reason is not None, "no_op_reason": reason}


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
             "from the CPU tier in the policy's form; a peer (own engine, vLLM's attention backend) reloads it "
             "from its own CPU tier.", "",
             "| policy | " + " | ".join(f"turn {t + 1}" for t in range(turns))
             + " | all turns | points vs none | target | loaded (kvplug: blocks; peers: tokens in turns 2+) | masked batches |",
             "|---|" + "---|" * turns + "---|---|---|---|---|"]
    notes = []
    for r in results["runs"]:
        if "error" in r:
            lines.append(f"| {r['policy']} | could not run: {r['error']} |" + " |" * (turns + 4))
            if r.get("known_issue"):
                notes.append(f"KNOWN ISSUE {r['policy']}: {r['known_issue']}")
            continue
        cells = " | ".join(f"{p['accuracy']:.2f} / {p['agreement']:.2f}" for p in r["per_turn"])
        tgt = r.get("target_points")
        verdict = "" if tgt is None else ("no-op!" if r["offload_no_op"] else
                                          ("met" if r.get("meets_target") else "MISSED")) + f" (<= {tgt})"
        if r.get("peer") and r["offload_no_op"]:
            verdict = "NO-OP"
            notes.append(f"NO-OP {r['policy']}: {r['no_op_reason']}")
        if r.get("known_issue"):
            verdict = (verdict + " " if verdict else "") + "KNOWN ISSUE"
            notes.append(f"KNOWN ISSUE {r['policy']}: {r['known_issue']}")
        pts = "" if r["policy"] == BASELINE else f"{r['points_vs_none']:+.1f}"
        lines.append(f"| {r['policy']} | {cells} | {r['accuracy']:.3f} / {r['agreement']:.2f} | {pts} | {verdict} | "
                     f"{loaded_cell(r)} | {r.get('masked_batches', '-')} |")
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def loaded_cell(r: dict) -> str:
    """What came back from the CPU tier in turns 2+, by the row's own evidence: kvplug's blocks per tier; a
    peer's tokens (native: vLLM's external prefix-cache hits; LMCache: its log's retrieved tokens)."""
    if r["policy"] == BASELINE:
        return "-"
    if not r.get("peer"):
        return "cpu {cpu} / disk {disk}".format(**r["loaded_blocks"])
    later = r["per_turn"][1:]
    for key, source in (("lmcache_retrieved_tokens", "LMCache's log"), ("external_hit_tokens", "vLLM external hits")):
        if later and all(p.get(key) is not None for p in later):
            return f"{sum(p[key] for p in later)} tokens ({source})"
    return f"{sum(p['cached_tokens'] for p in later)} tokens (vLLM cached)"


def plot(results: dict, path: Path) -> None:
    fig, axes = harness.pyplot().subplots(1, 2, figsize=(10, 4), sharey=True)
    for r in results["runs"]:
        if "error" in r:
            continue
        x = [p["turn"] for p in r["per_turn"]]
        style = "k--" if r["policy"] == BASELINE else ("s:" if r.get("peer") else "o-")
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
    if args.peer_worker:
        peer_worker(args)
        return 0
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
