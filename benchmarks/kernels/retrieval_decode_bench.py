"""Kernel benchmark of retrieval decoding (attention layers of one decode step) on a CUDA GPU.

Llama-3-8B attention shape (32 query / 8 kv heads, head_dim 128, bf16), paged KV in FlashAttention's layout
([2, blocks, block_size, kv_heads, head_dim], block_size 16), random block tables as wide as vLLM makes them
under CUDA graphs (--table-width columns = max_model_len / 16; junk ids past each sequence), retrieval params
= the config defaults (sink 1 block, recent 256 tokens, min_context 4096, 2 dense layers) at --budget tokens,
and k = planner.graph_k (the slots vLLM captures). Per (batch, context):
  * dense: torch SDPA (flash) over contiguous K/V — a stand-in for FlashAttention's paged decode kernel;
  * each stage of the retrieval step captured alone in a CUDA graph: score, select, attend+merge, the summary
    update of one decode token per sequence, and torch.topk over the table width (what select replaced);
  * --layers distinct layers (own KV + summaries, so nothing stays in L2) of summary update + retrieval step
    captured in ONE graph, as vLLM's full decode graphs run them: ``per_layer_ms`` is what a sparse layer
    costs in the TPOT, to compare with ``dense_sdpa_ms``;
  * checks: the step equals the torch selection + reference attention, and a graph replay with new
    sequence lengths / queries equals an eager run;
  * --variants: the same per-layer graph for each selection variant (``single``: the production step above;
    ``two_level``: one summary per --group-blocks blocks scored first, the best groups refined per block;
    ``two_level_fused``: the same with the summary update folded into the group-score launch), each checked
    against its torch reference, with the share of ``single``'s blocks it also reads; ``reuse<N>``: selection
    reuse (reselect_interval N, single-level): the graph of layers timed for the reselect step (every row scores
    and selects into its stored selection) and for a reuse step (score and select exit at once; attend reads
    the stored selection plus the blocks started since, as many as the interval's last step has), and
    ``per_layer_ms`` = (reselect + (N - 1) x reuse) / N, the cost per layer averaged over the interval;
    ``fused_kv_write``: the KV write and the summary update in one launch (retrieval_decode.fused_kv_write) vs the
    dense backend's write (vLLM's reshape_and_cache_flash where vLLM is installed, else the fused kernel's write
    alone as a stand-in) followed by the summary update: the cache bytes and summaries compared, each per layer in
    a graph of WRITE_GRAPH_LAYERS layers, with the retrieval step around it (``per_layer_ms`` vs
    ``two_launch_per_layer_ms``) and for a prefill chunk; in the break-even sweep against dense SDPA + its write;
  * --break-even-contexts: batch 1, the per-layer graph of each variant vs dense SDPA in a graph of as many
    layers, at each context; the crossover per variant (``break_even.crossover``); --write-break-even stores it
    in attention_backends/retrieval_decode/break_even.json for ``retrieval_decode.break_even="measured"``. At
    each context also what a sequence under min_context costs a pure-decode graph: read whole by the retrieval
    kernels (``single_read_all``, graph_dense_path off) or through the graph's dense path (``dense_path_ms``:
    dense kernel + empty retrieval launches, ``dense_path_empty_retrieval_ms`` those launches alone).

    python -m benchmarks.kernels.retrieval_decode_bench --out benchmarks/results/retrieval_decode_kernels_h100.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from attention_backends.retrieval_decode import break_even, planner, triton_kernels
from attention_backends.retrieval_decode.reference import selected_block_attention
from attention_backends.retrieval_decode.selection import select_for_queries
from attention_backends.retrieval_decode.summaries import BlockSummaries
from benchmarks.harness import time_cuda

HQ, HKV, D, BS = 32, 8, 128, 16
# CPU (TRITON_INTERPRET=1, tiny shapes) only for the CI smoke test of this script: no graphs, no timings worth a look.
DEV = "cuda" if torch.cuda.is_available() else "cpu"



def error_text(exc: BaseException, limit: int = 4000) -> str:
    """What failed, root cause first: Triton's CompilationError puts the kernel source in its message and the
    reason in its __cause__ chain, so a cut message alone loses the reason."""
    causes, c = [], exc.__cause__ or exc.__context__
    while c is not None and len(causes) < 4:
        causes.append(f"{type(c).__name__}: {c}")
        c = c.__cause__ or c.__context__
    head = " <- ".join(reversed(causes)) if causes else ""
    text = f"{head} | {type(exc).__name__}: {exc}" if head else f"{type(exc).__name__}: {exc}"
    return text[:limit]

def _scale() -> float:
    return D ** -0.5


# kvplug.config's retrieval_decode defaults (a test checks they agree; kvplug.config needs msgspec, which the bare
# GPU machine lacks).
CONFIG_DEFAULTS = {"sink_blocks": 1, "recent_tokens": 256, "min_context_tokens": 4096, "gqa_reduce": "max"}


def _params(budget: int) -> planner.RetrievalParams:
    return planner.RetrievalParams(block_size=BS, budget_tokens=budget, budget_fraction=0.0, **CONFIG_DEFAULTS)


# single: the production step; two_level: group summaries scored first (--group-blocks), refined per block;
# _fused: the summary update folded into the group-score launch; _radix: the histogram select instead of bisection.
VARIANTS = ("single", "single_radix", "two_level", "two_level_fused", "two_level_fused_radix")
# reuse<N>: selection reuse (reselect_interval N) of the single-level step; any N > 1 is accepted.
REUSE_VARIANTS = ("reuse4", "reuse8")
# fused_kv_write: the KV write and the summary update in one launch (retrieval_decode.fused_kv_write) vs the dense
# backend's write followed by the summary update, in graphs of WRITE_GRAPH_LAYERS layers (single-level step).
FUSED_WRITE = "fused_kv_write"
WRITE_VARIANTS = (FUSED_WRITE,)
WRITE_GRAPH_LAYERS = 32
PREFILL_CHUNK_TOKENS = 2048


def _reuse_interval(name: str) -> int | None:
    """N of a ``reuse<N>`` variant name, else None."""
    if not name.startswith("reuse"):
        return None
    if not name[5:].isdigit() or int(name[5:]) < 2:
        raise SystemExit(f"--variants: {name!r}: a reuse variant is reuse<N> with N >= 2 (e.g. reuse4)")
    return int(name[5:])


def _variant(name: str, base: planner.RetrievalParams, group_blocks: int, group_refine: float):
    """(params, fold the summary update into the step) of a --variants name."""
    if name in WRITE_VARIANTS:  # the production step; the write around it is what differs
        return base, False
    interval = _reuse_interval(name)
    if interval is not None:
        return dataclasses.replace(base, reselect_interval=interval), False
    if name not in VARIANTS:
        raise SystemExit(f"--variants: unknown variant {name!r}; one of {', '.join(VARIANTS + WRITE_VARIANTS)}, "
                         "reuse<N>")
    params = dataclasses.replace(base, select="radix" if name.endswith("_radix") else "bisect")
    if name.startswith("two_level"):
        params = dataclasses.replace(params, group_blocks=group_blocks, group_refine=group_refine)
    return params, "_fused" in name


def _layer(batch: int, nblk: int, dev: str, g: torch.Generator) -> dict:
    """One layer's paged KV cache (FlashAttention layout) and its block summaries."""
    num_blocks = batch * nblk + 1
    kv = torch.randn(2, num_blocks, BS, HKV, D, device=dev, dtype=torch.bfloat16, generator=g)
    kview, vview = kv[0].permute(0, 2, 1, 3), kv[1].permute(0, 2, 1, 3)
    summ = BlockSummaries.allocate(num_blocks, HKV, D, BS, torch.bfloat16, dev, groups=True)
    summ.refresh(kview, torch.arange(num_blocks, device=dev))
    return dict(kv=kv, kview=kview, vview=vview, summ=summ)


def _setup(batch: int, ctx: int, budget: int, width: int, layers: int, seed: int = 0) -> dict:
    g = torch.Generator(device=DEV).manual_seed(seed)
    dev = DEV
    nblk = -(-ctx // BS)
    width = max(width, nblk)
    num_blocks = batch * nblk + 1
    own = (torch.randperm(num_blocks - 1, device=dev, generator=g)[:batch * nblk] + 1).view(batch, nblk)
    junk = torch.randint(0, num_blocks, (batch, width - nblk), device=dev, generator=g)
    table = torch.cat([own, junk], dim=1).int()
    seq_lens = torch.full((batch,), ctx, device=dev, dtype=torch.int32)
    q = torch.randn(batch, HQ, D, device=dev, dtype=torch.bfloat16, generator=g)
    params = _params(budget)
    new_slots = table[:, nblk - 1].long() * BS + (ctx - 1) % BS
    return dict(layers=[_layer(batch, nblk, dev, g) for _ in range(layers)], table=table, seq_lens=seq_lens, q=q,
                params=params, k=planner.graph_k(params, width * BS), out=torch.empty_like(q), new_slots=new_slots,
                new_keys=torch.randn(batch, HKV, D, device=dev, dtype=torch.bfloat16, generator=g), nblk=nblk, ctx=ctx)


def retrieval_step(s, layer: dict, out=None, params=None, fuse: bool = False):
    """What the backend runs per sparse layer on CUDA (DecodeGraphPlan): score, select, attend, merge
    (``params``: a variant's; ``fuse``: the summary update folded into the two-level scoring launch)."""
    summ = layer["summ"]
    return triton_kernels.retrieval_decode(s["q"], layer["kview"], layer["vview"], summ.kmin, summ.kmax, s["table"],
                                           s["seq_lens"], params or s["params"], s["k"], _scale(),
                                           out=s["out"] if out is None else out, summ=summ,
                                           fuse_key=s["new_keys"] if fuse else None,
                                           fuse_slots=s["new_slots"] if fuse else None)


def reuse_step(s, layer: dict, out, params, reselect: torch.Tensor):
    """The step with selection reuse (reuse.py): ``reselect`` [N] int32 flags (1: score + select into the layer's
    store; 0: attend the stored selection, made at s["sel_seq_lens"], plus the blocks started since)."""
    summ = layer["summ"]
    r = triton_kernels.Reuse(layer["store"], reselect, s["sel_seq_lens"], params.reuse_extra_blocks)
    return triton_kernels.retrieval_decode(s["q"], layer["kview"], layer["vview"], summ.kmin, summ.kmax, s["table"],
                                           s["seq_lens"], params, s["k"], _scale(), out=out, summ=summ, reuse=r)


def _reuse_setup(s, params) -> None:
    """Per layer a store of selections made at seq_lens - (N - 1) (the interval's first step), so the timed reuse
    step is the interval's last one: the most blocks started since; and the flag vectors of both steps."""
    n = s["q"].shape[0]
    s["sel_seq_lens"] = (s["seq_lens"] - (params.reselect_interval - 1)).clamp(min=1)
    s["flags_select"] = torch.ones(n, dtype=torch.int32, device=DEV)
    s["flags_reuse"] = torch.zeros(n, dtype=torch.int32, device=DEV)
    lens = s["seq_lens"].clone()
    s["seq_lens"].copy_(s["sel_seq_lens"])
    for lay in s["layers"]:
        lay["store"] = torch.zeros(n, HKV, s["k"], dtype=torch.int32, device=DEV)
        reuse_step(s, lay, torch.empty_like(s["q"]), params, s["flags_select"])
    s["seq_lens"].copy_(lens)


def reuse_stacked_ms(s, params) -> dict:
    """reuse<N>: the graph of layers (summary update + step) with every flag 1 (the reselect step) and with every
    flag 0 (a reuse step), per layer; ``per_layer_ms`` averages them over the interval."""
    _reuse_setup(s, params)
    outs = [torch.empty_like(s["q"]) for _ in s["layers"]]

    def run(flags):
        def step():
            for lay, out in zip(s["layers"], outs):
                summary_update_step(s, lay)
                reuse_step(s, lay, out, params, flags)
        return _graph_ms(step, iters=20) / len(s["layers"])
    reuse_ms = run(s["flags_reuse"])  # first: the reselect run would overwrite the interval's first selection
    select_ms = run(s["flags_select"])
    _reuse_setup(s, params)  # the stores back to the interval's first step
    n = params.reselect_interval
    return {"per_layer_ms": (select_ms + (n - 1) * reuse_ms) / n, "reselect_step_per_layer_ms": select_ms,
            "reuse_step_per_layer_ms": reuse_ms, "reselect_interval": n, "graph_layers": len(s["layers"])}


def reuse_reference_check(s, params) -> float:
    """Max |reuse step - reuse.reused_selection over the layer's store + reference attention| on layer 0."""
    from attention_backends.retrieval_decode import reuse

    lay = s["layers"][0]
    _reuse_setup(s, params)
    sel = reuse.reused_selection(lay["store"], s["flags_reuse"], s["sel_seq_lens"], s["seq_lens"], params,
                                 params.reuse_extra_blocks)
    want = selected_block_attention(s["q"], lay["kview"], lay["vview"], s["table"], s["seq_lens"], sel, _scale())
    got = reuse_step(s, lay, torch.empty_like(s["q"]), params, s["flags_reuse"])
    return (got.float() - want.float()).abs().max().item()


def summary_update_step(s, layer: dict):
    """Per-layer summary update of one decode token per sequence (the do_kv_cache_update hook)."""
    layer["summ"].update(s["new_keys"], s["new_slots"])


def layer_step(s, layer: dict, out, params, fuse: bool):
    """One sparse layer as vLLM's decode graph runs it: the summary update, then the step."""
    if not fuse:
        summary_update_step(s, layer)
    retrieval_step(s, layer, out, params, fuse)


def dense_kv_write():
    """(name, write(key, value, kview, vview, slots)): the dense backend's KV write. vLLM's reshape_and_cache_flash
    where vLLM is installed on a CUDA machine; else the fused kernel's write alone (one launch, the same bytes: a
    stand-in)."""
    if DEV == "cuda":
        try:
            from vllm import _custom_ops as ops

            one = torch.ones((), dtype=torch.float32, device=DEV)

            def vllm_write(key, value, kview, vview, slots):  # vLLM's views are [blocks, block_size, heads, D]
                ops.reshape_and_cache_flash(key, value, kview.transpose(1, 2), vview.transpose(1, 2), slots, "auto",
                                            one, one)
            return "vllm reshape_and_cache_flash", vllm_write
        except Exception:  # plain torch + Triton on the GPU host: no vLLM
            pass
    return "triton write_kv without summaries (stand-in)", triton_kernels.write_kv


def two_launch_write(write, key, value, layer: dict, slots) -> None:
    """What the backend ran before fused_kv_write: the dense backend's write, then the summary update."""
    write(key, value, layer["kview"], layer["vview"], slots)
    layer["summ"].update(key, slots)


def fused_write(key, value, layer: dict, slots) -> None:
    layer["summ"].write_and_update(key, value, layer["kview"], layer["vview"], slots)


def _write_check_cases(s, g: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(key, value, slots) of a padded decode step (one token per sequence, then -1 rows as a CUDA graph pads the
    batch) and of a prefill chunk of 3 blocks starting fresh in sequence 0's blocks, keys as strided views."""
    n, nblk = s["q"].shape[0], s["nblk"]
    dec = torch.cat([s["new_slots"], torch.full((3,), -1, dtype=torch.long, device=DEV)])
    blocks = s["table"][0, max(0, nblk - 4):max(0, nblk - 4) + 3].long()
    chunk = (blocks.view(-1, 1) * BS + torch.arange(BS, device=DEV)).flatten()
    cases = []
    for slots in (dec, chunk):
        t = slots.numel() + 2  # vLLM pads the token dim beyond slot_mapping
        kv = torch.randn(t, 2, HKV * D, device=DEV, dtype=torch.bfloat16, generator=g)
        cases.append((kv[:, 0].view(t, HKV, D), kv[:, 1].view(t, HKV, D), slots))
    return cases


def fused_write_check(s, write) -> dict:
    """The fused write vs the two launches on copies of layer 0 (cache and summaries): the same cache bytes and the
    same summaries, after a padded decode step and a prefill chunk."""
    g = torch.Generator(device=DEV).manual_seed(7)
    lay = s["layers"][0]
    copies = []
    for _ in range(2):
        kv = lay["kv"].clone()
        summ = BlockSummaries.allocate(lay["summ"].num_blocks, HKV, D, BS, torch.bfloat16, DEV, groups=True)
        for a, b in ((summ.kmin, lay["summ"].kmin), (summ.kmax, lay["summ"].kmax), (summ.gmin, lay["summ"].gmin),
                     (summ.gmax, lay["summ"].gmax)):
            a.copy_(b)
        copies.append(dict(kv=kv, kview=kv[0].permute(0, 2, 1, 3), vview=kv[1].permute(0, 2, 1, 3), summ=summ))
    two, fused = copies
    for key, value, slots in _write_check_cases(s, g):
        two_launch_write(write, key, value, two, slots)
        fused_write(key, value, fused, slots)
    same_cache = torch.equal(two["kv"].view(torch.int16), fused["kv"].view(torch.int16))
    same_summaries = all(torch.equal(getattr(two["summ"], f)[:-1].view(torch.int16),
                                     getattr(fused["summ"], f)[:-1].view(torch.int16))
                         for f in ("kmin", "kmax", "gmax"))
    return {"cache_bytes_equal": same_cache, "summaries_equal": same_summaries}


def _prefill_layer(tokens: int) -> dict:
    """A scratch layer (own cache and summaries) for a prefill chunk's write: the chunk's blocks and one more."""
    return _layer(1, -(-tokens // BS), DEV, torch.Generator(device=DEV).manual_seed(3))


def fused_write_row(s) -> dict:
    """fused_kv_write: per layer, in graphs of WRITE_GRAPH_LAYERS layers (s["layers"] cycled): the dense write +
    the summary update (two launches) vs the fused launch vs the write alone (what dense decoding pays too), for
    one decode token per sequence; the same around the retrieval step (graph of the distinct layers:
    ``per_layer_ms`` vs ``two_launch_per_layer_ms``); a prefill chunk's write in one layer; the byte checks."""
    name, write = dense_kv_write()
    row: dict = {"dense_write": name, "write_graph_layers": WRITE_GRAPH_LAYERS}
    row.update(fused_write_check(s, write))
    g = torch.Generator(device=DEV).manual_seed(11)
    n = s["q"].shape[0]
    value = torch.randn(n, HKV, D, device=DEV, dtype=torch.bfloat16, generator=g)
    key, slots, layers = s["new_keys"], s["new_slots"], s["layers"]
    cycle = [layers[i % len(layers)] for i in range(WRITE_GRAPH_LAYERS)]

    def per_layer(fn, group=cycle) -> float:
        return _graph_ms(lambda: [fn(lay) for lay in group], iters=30) / len(group)
    row["write_two_launch_ms"] = per_layer(lambda lay: two_launch_write(write, key, value, lay, slots))
    row["write_fused_ms"] = per_layer(lambda lay: fused_write(key, value, lay, slots))
    row["write_alone_ms"] = per_layer(lambda lay: write(key, value, lay["kview"], lay["vview"], slots))
    row["write_saving_per_layer_ms"] = row["write_two_launch_ms"] - row["write_fused_ms"]
    outs = [torch.empty_like(s["q"]) for _ in layers]

    def with_step(fused: bool):
        def step():
            for lay, out in zip(layers, outs):
                fused_write(key, value, lay, slots) if fused else two_launch_write(write, key, value, lay, slots)
                retrieval_step(s, lay, out)
        return _graph_ms(step, iters=20) / len(layers)
    row["two_launch_per_layer_ms"] = with_step(False)
    row["per_layer_ms"] = with_step(True)
    row["max_err_vs_torch_reference"] = reference_check(s)
    tokens = PREFILL_CHUNK_TOKENS
    scratch = _prefill_layer(tokens)
    chunk = torch.arange(tokens, device=DEV) + BS  # the scratch layer's blocks 1.., block 0 left alone
    pk = torch.randn(tokens, HKV, D, device=DEV, dtype=torch.bfloat16, generator=g)
    pv = torch.randn_like(pk)
    row["prefill_chunk_tokens"] = tokens
    row["prefill_write_two_launch_ms"] = per_layer(lambda lay: two_launch_write(write, pk, pv, lay, chunk), [scratch])
    row["prefill_write_fused_ms"] = per_layer(lambda lay: fused_write(pk, pv, lay, chunk), [scratch])
    return row


def _graph_ms(fn, iters: int = 30) -> float:
    """Median ms of replaying ``fn`` captured alone in a CUDA graph."""
    fn()
    if DEV == "cpu":
        return time_cuda(fn, warmup=0, iters=1, device="cpu")["median_ms"]
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return time_cuda(graph.replay, warmup=3, iters=iters)["median_ms"]


def stage_times(s) -> dict:
    """Each stage of the step (layer 0) in its own graph; torch.topk over the same scores for comparison."""
    lay, p = s["layers"][0], s["params"]
    scores = triton_kernels.score_blocks(s["q"], lay["summ"].kmin, lay["summ"].kmax, s["table"], s["seq_lens"], p)
    top = triton_kernels.select_top_blocks(scores, s["seq_lens"], p, s["k"])
    scores.copy_(torch.nan_to_num(scores, nan=float("-inf")))  # torch.topk sees defined values
    early_exit = triton_kernels.SELECT_EARLY_EXIT
    triton_kernels.SELECT_EARLY_EXIT = False
    try:
        fixed_top = triton_kernels.select_top_blocks(scores, s["seq_lens"], p, s["k"])
        fixed_ms = _graph_ms(lambda: triton_kernels.select_top_blocks(scores, s["seq_lens"], p, s["k"]))
    finally:
        triton_kernels.SELECT_EARLY_EXIT = early_exit
    _, budget = planner.device_budgets(p, s["seq_lens"])
    live = torch.arange(top.shape[-1], device=top.device) < budget.view(-1, 1, 1)
    same = torch.equal(torch.where(live, top, -1).sort(-1).values, torch.where(live, fixed_top, -1).sort(-1).values)
    return {
        "select_early_exit": triton_kernels.SELECT_EARLY_EXIT,
        "select_32_halvings_ms": fixed_ms,
        "select_early_exit_same_blocks": same,
        "score_ms": _graph_ms(lambda: triton_kernels.score_blocks(s["q"], lay["summ"].kmin, lay["summ"].kmax,
                                                                  s["table"], s["seq_lens"], p)),
        "select_ms": _graph_ms(lambda: triton_kernels.select_top_blocks(scores, s["seq_lens"], p, s["k"])),
        "torch_topk_ms": _graph_ms(lambda: torch.topk(scores, s["k"], dim=-1, sorted=True)),
        "attend_merge_ms": _graph_ms(lambda: triton_kernels.attend_selected(
            s["q"], lay["kview"], lay["vview"], s["table"], top, s["seq_lens"], p, _scale(), out=s["out"])),
        "summary_update_ms": _graph_ms(lambda: summary_update_step(s, lay)),
    }


def stacked_layers_ms(s, params=None, fuse: bool = False) -> dict:
    """All layers' summary update + retrieval step in one graph (distinct KV per layer), per layer (reuse<N>:
    averaged over the interval, reuse_stacked_ms)."""
    outs = [torch.empty_like(s["q"]) for _ in s["layers"]]
    params = params or s["params"]
    if params.reselect_interval > 1:
        return reuse_stacked_ms(s, params)

    def step():
        for lay, out in zip(s["layers"], outs):
            layer_step(s, lay, out, params, fuse)
    total = _graph_ms(step, iters=20)
    return {"per_layer_ms": total / len(s["layers"]), "graph_layers": len(s["layers"])}


def _dense_kv(s) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's K/V of the sequences as contiguous [N, Hkv, ctx, D] (what SDPA reads)."""
    n, nblk, ctx = s["q"].shape[0], s["nblk"], s["ctx"]
    own = s["table"][:, :nblk].long()
    kvs = []
    for lay in s["layers"]:
        k = lay["kview"][own].permute(0, 2, 1, 3, 4).reshape(n, HKV, nblk * BS, D)[:, :, :ctx].contiguous()
        v = lay["vview"][own].permute(0, 2, 1, 3, 4).reshape(n, HKV, nblk * BS, D)[:, :, :ctx].contiguous()
        kvs.append((k, v))
    return kvs


def _sdpa(s, k, v) -> torch.Tensor:
    n = s["q"].shape[0]
    return torch.nn.functional.scaled_dot_product_attention(s["q"].view(n, HQ, 1, D), k, v, enable_gqa=True)


def dense_stacked_ms(s) -> float:
    """Dense SDPA over each layer's own contiguous K/V, all layers in one graph, per layer (the break-even
    sweep's comparator: timed as the sparse layers are)."""
    kvs = _dense_kv(s)

    def step():
        for k, v in kvs:
            _sdpa(s, k, v)
    return _graph_ms(step, iters=20) / len(kvs)


def write_stacked_ms(s, params) -> tuple[float, float]:
    """fused_kv_write in the break-even sweep, per layer in one graph of the layers: (fused write + retrieval
    step, the dense backend's write + dense SDPA): the KV write is on both sides, the summary update on neither."""
    _, write = dense_kv_write()
    value = torch.randn_like(s["new_keys"])
    key, slots = s["new_keys"], s["new_slots"]
    kvs = _dense_kv(s)
    outs = [torch.empty_like(s["q"]) for _ in s["layers"]]

    def sparse():
        for lay, out in zip(s["layers"], outs):
            fused_write(key, value, lay, slots)
            retrieval_step(s, lay, out, params)

    def dense():
        for lay, (k, v) in zip(s["layers"], kvs):
            write(key, value, lay["kview"], lay["vview"], slots)
            _sdpa(s, k, v)
    n = len(s["layers"])
    return _graph_ms(sparse, iters=20) / n, _graph_ms(dense, iters=20) / n


def dense_path_stacked(s) -> dict:
    """A sequence under min_context with graph_dense_path (DecodeGraphPlan with dense metadata): per layer, in one
    graph of all layers, what vLLM's decode graph runs for it: the summary update, the dense kernel (SDPA standing
    in for FlashAttention) writing its output rows, and the retrieval step at length 0 (every launch returns at
    once, the rows are kept). ``dense_path_ms`` is to compare with ``single_read_all`` (the same sequence read
    whole by the retrieval kernels, what runs without the dense path) and ``dense_sdpa_graph_ms``;
    ``dense_path_empty_retrieval_ms``: the retrieval launches alone, the fixed cost each dense row's layer pays.
    Checked: the rows the dense kernel wrote are still there after the step."""
    params = dataclasses.replace(s["params"], graph_dense_path=True)
    k = planner.graph_k(params, s["table"].shape[1] * BS)
    kvs = _dense_kv(s)
    zero = torch.zeros_like(s["seq_lens"])
    outs = [torch.empty_like(s["q"]) for _ in s["layers"]]

    def empty_retrieval(lay, out):
        triton_kernels.retrieval_decode(s["q"], lay["kview"], lay["vview"], lay["summ"].kmin, lay["summ"].kmax,
                                        s["table"], zero, params, k, _scale(), out=out, summ=lay["summ"],
                                        keep_empty_rows=True)

    def step():
        for lay, (kk, vv), out in zip(s["layers"], kvs, outs):
            summary_update_step(s, lay)
            out.copy_(_sdpa(s, kk, vv).view_as(out))
            empty_retrieval(lay, out)
    total = _graph_ms(step, iters=20)
    want = _sdpa(s, *kvs[0]).view_as(outs[0])
    kept = bool(torch.equal(outs[0], want))
    empty = _graph_ms(lambda: [empty_retrieval(lay, out) for lay, out in zip(s["layers"], outs)], iters=20)
    return {"dense_path_ms": total / len(kvs), "dense_path_empty_retrieval_ms": empty / len(kvs),
            "dense_path_k_slots": k, "dense_path_rows_kept": kept}


def _torch_selection(s, lay, params):
    nb, budget = planner.device_budgets(params, s["seq_lens"])
    groups = params.candidate_groups(budget) if params.group_blocks > 1 else None
    return select_for_queries(s["q"], lay["summ"].kmin, lay["summ"].kmax, s["table"], nb, budget, s["k"],
                              params.sink_blocks, params.recent_blocks, params.gqa_reduce, params.group_blocks,
                              groups)


def reference_check(s, params=None) -> float:
    """Max |step - torch selection + reference attention| on layer 0."""
    lay, p = s["layers"][0], params or s["params"]
    sel = _torch_selection(s, lay, p)
    want = selected_block_attention(s["q"], lay["kview"], lay["vview"], s["table"], s["seq_lens"], sel, _scale())
    got = retrieval_step(s, lay, torch.empty_like(s["q"]), p)
    return (got.float() - want.float()).abs().max().item()


def block_overlap(s, params) -> float:
    """Share of the single-level selection's blocks (torch, layer 0) that a variant's selection also reads."""
    lay = s["layers"][0]
    a, b = _torch_selection(s, lay, s["params"]), _torch_selection(s, lay, params)
    width = s["table"].shape[1]

    def mask(sel):
        hits = torch.zeros(*sel.blocks.shape[:2], width, dtype=torch.int32, device=sel.blocks.device)
        return hits.scatter_add_(-1, sel.blocks, sel.valid.to(torch.int32)) > 0
    ma, mb = mask(a), mask(b)
    return float((ma & mb).sum()) / max(1, int(ma.sum()))


def variant_row(s, params, fuse: bool) -> dict:
    """A variant's stages (layer 0) each in their own graph, the per-layer graph, the checks."""
    if params.reselect_interval > 1:  # reuse<N>: the two steps and their average; the reuse step's own check
        row = {"max_err_vs_torch_reference": reference_check(s, params),
               "reuse_max_err_vs_torch_reference": reuse_reference_check(s, params)}
        row.update(reuse_stacked_ms(s, params))
        row["max_err_vs_torch_reference"] = max(row["max_err_vs_torch_reference"],
                                                row["reuse_max_err_vs_torch_reference"])
        return row
    lay = s["layers"][0]
    summ = lay["summ"]
    row: dict = {"group_blocks": params.group_blocks, "group_refine": params.group_refine, "fused_update": fuse,
                 "select": params.select, "max_err_vs_torch_reference": reference_check(s, params),
                 "blocks_shared_with_single": block_overlap(s, params)}
    if params.group_blocks > 1:
        gscores = triton_kernels.score_groups(s["q"], summ, s["table"], s["seq_lens"], params)
        top = triton_kernels.refine_select(s["q"], summ, s["table"], s["seq_lens"], gscores, params, s["k"])
        fk, fs = (s["new_keys"], s["new_slots"]) if fuse else (None, None)
        row["group_score_ms"] = _graph_ms(lambda: triton_kernels.score_groups(
            s["q"], summ, s["table"], s["seq_lens"], params, fuse_key=fk, fuse_slots=fs))
        row["refine_select_ms"] = _graph_ms(lambda: triton_kernels.refine_select(
            s["q"], summ, s["table"], s["seq_lens"], gscores, params, s["k"]))
    else:
        scores = triton_kernels.score_blocks(s["q"], summ.kmin, summ.kmax, s["table"], s["seq_lens"], params)
        top = triton_kernels.select_top_blocks(scores, s["seq_lens"], params, s["k"])
        row["select_ms"] = _graph_ms(lambda: triton_kernels.select_top_blocks(scores, s["seq_lens"], params, s["k"]))
    row["attend_merge_ms"] = _graph_ms(lambda: triton_kernels.attend_selected(
        s["q"], lay["kview"], lay["vview"], s["table"], top, s["seq_lens"], params, _scale(), out=s["out"]))
    row.update(stacked_layers_ms(s, params, fuse))
    row.update({f"graph_{key}": val for key, val in graph_check(s, params, fuse).items()})
    return row


def graph_check(s, params=None, fuse: bool = False) -> dict:
    """Capture the step, change the inputs in place, replay, compare with eager (inputs restored after)."""
    lay = s["layers"][0]
    out = torch.empty_like(s["q"])
    retrieval_step(s, lay, out, params, fuse)
    if DEV == "cpu":
        return {"replay_matches_eager": None}
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        retrieval_step(s, lay, out, params, fuse)
    q0, lens0 = s["q"].clone(), s["seq_lens"].clone()
    s["q"].copy_(torch.randn_like(s["q"]))
    s["seq_lens"].copy_(s["seq_lens"] - torch.arange(s["seq_lens"].numel(), device=DEV, dtype=torch.int32) * 37)
    graph.replay()
    eager = retrieval_step(s, lay, torch.empty_like(s["q"]), params, fuse)
    err = (out.float() - eager.float()).abs().max().item()
    res = {"replay_matches_eager": err < 1e-2, "max_abs_err": err,
           "replay_ms": time_cuda(graph.replay, warmup=3, iters=30)["median_ms"]}
    s["q"].copy_(q0)
    s["seq_lens"].copy_(lens0)
    return res


def bench(batch: int, ctx: int, budget: int, width: int, layers: int, variants=(), group_blocks: int = 4,
          group_refine: float = 2.0) -> dict:
    t0 = time.time()
    s = _setup(batch, ctx, budget, width, layers)
    lay = s["layers"][0]
    row: dict = {"batch": batch, "context": ctx, "budget_tokens": budget, "table_width": s["table"].shape[1],
                 "k_slots": s["k"], "kv_bytes_dense_per_layer": 2 * batch * ctx * HKV * D * 2}
    n, nblk = batch, s["nblk"]
    own = s["table"][:, :nblk].long()
    k = lay["kview"][own].permute(0, 2, 1, 3, 4).reshape(n, HKV, nblk * BS, D)[:, :, :ctx].contiguous()
    v = lay["vview"][own].permute(0, 2, 1, 3, 4).reshape(n, HKV, nblk * BS, D)[:, :, :ctx].contiguous()
    qs = s["q"].view(batch, HQ, 1, D)
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(qs, k, v, enable_gqa=True)  # noqa: E731
    row["dense_sdpa_ms"] = time_cuda(sdpa, iters=20, device=DEV)["median_ms"]
    del k, v
    row["max_err_vs_torch_reference"] = reference_check(s)
    row.update(stage_times(s))
    row.update(stacked_layers_ms(s))
    row.update({f"graph_{key}": val for key, val in graph_check(s).items()})
    row["speedup_per_layer_vs_sdpa"] = row["dense_sdpa_ms"] / row["per_layer_ms"]
    row["dense_sdpa_GBps"] = row["kv_bytes_dense_per_layer"] / row["dense_sdpa_ms"] / 1e6
    row["variants"] = {}
    for name in variants:
        params, fuse = _variant(name, s["params"], group_blocks, group_refine)
        if name == "single":
            v = {"per_layer_ms": row["per_layer_ms"], "max_err_vs_torch_reference": row["max_err_vs_torch_reference"]}
        else:
            try:
                v = fused_write_row(s) if name in WRITE_VARIANTS else variant_row(s, params, fuse)
            except Exception as exc:  # one variant failing to compile on this GPU must not cost the others
                v = {"error": error_text(exc)}
                print(f"variant {name} failed at {batch}x{ctx}: {v['error'][:300]}", file=sys.stderr, flush=True)
        if "per_layer_ms" in v:
            v["speedup_per_layer_vs_sdpa"] = row["dense_sdpa_ms"] / v["per_layer_ms"]
            # fused_kv_write's layers include the KV write: against single's with the write in two launches
            v["speedup_vs_single"] = v.get("two_launch_per_layer_ms", row["per_layer_ms"]) / v["per_layer_ms"]
        row["variants"][name] = v
    row["wall_s"] = round(time.time() - t0, 1)
    return row


def break_even_sweep(contexts: list[int], budget: int, width: int, layers: int, variants, group_blocks: int,
                     group_refine: float) -> dict:
    """Batch 1: per-layer graph ms of each variant and of dense SDPA at each context; the crossover per variant."""
    points: dict = {name: [] for name in variants}
    rows = []
    for ctx in contexts:
        s = _setup(1, ctx, budget, width, layers)
        dense = dense_stacked_ms(s)
        r = {"context": ctx, "dense_sdpa_graph_ms": dense}
        for name in variants:
            params, fuse = _variant(name, s["params"], group_blocks, group_refine)
            # Below min_context the step already reads every block: time the sparse path itself.
            params = dataclasses.replace(params, min_context_tokens=0)
            try:
                if name in WRITE_VARIANTS:  # both sides with their KV write: fused + step vs dense write + SDPA
                    ms, versus = write_stacked_ms(s, params)
                    r[f"{name}_dense_with_write"] = versus
                else:
                    ms, versus = stacked_layers_ms(s, params, fuse)["per_layer_ms"], dense
            except Exception as exc:
                r[name] = {"error": error_text(exc, 500)}
                continue
            r[name] = ms
            points[name].append((ctx, ms, versus))
        # What a pure-decode CUDA graph pays for a sequence under min_context (break_even=measured raises it):
        # the same kernels, every block read. Compared with dense in the table.
        try:
            read_all = dataclasses.replace(s["params"], min_context_tokens=ctx + 1)
            r["single_read_all"] = stacked_layers_ms(s, read_all, False)["per_layer_ms"]
        except Exception as exc:
            r["single_read_all"] = {"error": error_text(exc, 500)}
        try:  # ... and what it pays with graph_dense_path: the dense kernel + empty retrieval launches
            r.update(dense_path_stacked(s))
        except Exception as exc:
            r["dense_path_ms"] = {"error": error_text(exc, 500)}
        rows.append(r)
        print(json.dumps(r), flush=True)
        del s
        if DEV == "cuda":
            torch.cuda.empty_cache()
    cross = {name: break_even.crossover(pts) if pts else None for name, pts in points.items()}
    return {"rows": rows, "points": points, "crossover_tokens": cross}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default="1x32768,1x131072,16x32768", help="BATCHxCONTEXT,...")
    ap.add_argument("--budget", type=int, default=2048)
    ap.add_argument("--table-width", type=int, default=131200 // BS,
                    help="block-table columns (vLLM under CUDA graphs: max_model_len / block_size); 0 = tight")
    ap.add_argument("--layers", type=int, default=4, help="distinct layers captured in one graph")
    ap.add_argument("--variants", default=",".join(VARIANTS + REUSE_VARIANTS + WRITE_VARIANTS),
                    help=f"selection variants: {', '.join(VARIANTS)}, reuse<N> (selection reuse, interval N); "
                         f"{FUSED_WRITE}: the KV write and the summary update in one launch vs two")
    ap.add_argument("--group-blocks", type=int, default=4, help="two-level: blocks per group (4 = 64 tokens)")
    ap.add_argument("--group-refine", type=float, default=2.0, help="two-level: candidates = this x the budget")
    ap.add_argument("--break-even-contexts", default="4096,8192,16384,24576,32768,49152,65536",
                    help="batch-1 contexts of the break-even sweep ('' skips it)")
    ap.add_argument("--write-break-even", action="store_true",
                    help="store the crossovers in attention_backends/retrieval_decode/break_even.json")
    ap.add_argument("--out", default="benchmarks/results/retrieval_decode_kernels.json")
    ap.add_argument("--allow-cpu", action="store_true", help=argparse.SUPPRESS)  # CI smoke test only
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() and not args.allow_cpu:
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for name in variants:
        _variant(name, _params(args.budget), args.group_blocks, args.group_refine)  # unknown names fail first
    t_start = time.time()
    rows = []
    for cfg in args.configs.split(","):
        b, c = (int(x) for x in cfg.split("x"))
        row = bench(b, c, args.budget, args.table_width, args.layers, variants, args.group_blocks, args.group_refine)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if DEV == "cuda":
            torch.cuda.empty_cache()
    device = torch.cuda.get_device_name(0) if DEV == "cuda" else "cpu"
    command = "python -m benchmarks.kernels.retrieval_decode_bench " + " ".join(argv if argv is not None else sys.argv[1:])
    out = {"device": device, "torch": torch.__version__, "triton": __import__("triton").__version__,
           "command": command, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows}
    contexts = [int(c) for c in args.break_even_contexts.split(",") if c.strip()]
    if contexts:
        out["break_even"] = break_even_sweep(contexts, args.budget, args.table_width, args.layers, variants,
                                             args.group_blocks, args.group_refine)
        if args.write_break_even:  # the variants the backend runs (it does not fold the summary update yet)
            for name, cross in out["break_even"]["crossover_tokens"].items():
                params, fuse = _variant(name, _params(args.budget), args.group_blocks, args.group_refine)
                if out["break_even"]["points"][name] and not fuse and params.reselect_interval == 1 \
                        and name not in WRITE_VARIANTS:
                    break_even.write(device, params.group_blocks, cross,
                                     {"variant": name, "command": command, "date": out["date"],
                                      "points": out["break_even"]["points"][name]}, params.select)
    out["wall_s"] = round(time.time() - t_start, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print("| batch x context | table width | dense SDPA ms | score | select (torch.topk) | attend+merge | "
          "summary update | per sparse layer, graph of layers ms | speedup vs SDPA |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']}x{r['context']} | {r['table_width']} | {r['dense_sdpa_ms']:.3f} | {r['score_ms']:.3f} | "
              f"{r['select_ms']:.3f} ({r['torch_topk_ms']:.3f}) | {r['attend_merge_ms']:.3f} | "
              f"{r['summary_update_ms']:.3f} | {r['per_layer_ms']:.3f} | {r['speedup_per_layer_vs_sdpa']:.2f}x |")
    if variants:
        print("\n| batch x context | dense SDPA ms | " + " | ".join(f"{v} per layer ms (vs SDPA)" for v in variants) + " |")
        print("|---|---|" + "---|" * len(variants))
        for r in rows:
            cells = []
            for v in variants:
                x = r["variants"][v]
                cells.append(f"{x['per_layer_ms']:.3f} ({x['speedup_per_layer_vs_sdpa']:.2f}x)" if "per_layer_ms" in x
                             else "error")
            print(f"| {r['batch']}x{r['context']} | {r['dense_sdpa_ms']:.3f} | " + " | ".join(cells) + " |")
    fused_rows = [(r, r["variants"][FUSED_WRITE]) for r in rows if FUSED_WRITE in r["variants"]]
    if fused_rows:
        print(f"\n| batch x context | dense write | cache bytes / summaries equal | write + summary update, "
              f"two launches ms | fused ms | write alone ms | per layer with the step: two launches / fused ms | "
              f"prefill {PREFILL_CHUNK_TOKENS} tokens: two launches / fused ms |\n|---|---|---|---|---|---|---|---|")
        for r, x in fused_rows:
            if "error" in x:
                print(f"| {r['batch']}x{r['context']} | error: {x['error'][:200]} |")
                continue
            print(f"| {r['batch']}x{r['context']} | {x['dense_write']} | {x['cache_bytes_equal']} / "
                  f"{x['summaries_equal']} | {x['write_two_launch_ms']:.4f} | {x['write_fused_ms']:.4f} | "
                  f"{x['write_alone_ms']:.4f} | {x['two_launch_per_layer_ms']:.4f} / {x['per_layer_ms']:.4f} | "
                  f"{x['prefill_write_two_launch_ms']:.4f} / {x['prefill_write_fused_ms']:.4f} |")
    if contexts:
        print("\nbreak-even context (batch 1, tokens):", json.dumps(out["break_even"]["crossover_tokens"]))
        print("\n| context (batch 1, under min_context) | dense SDPA ms | read all (retrieval kernels) | "
              "dense path (graph_dense_path) | of which empty retrieval launches |\n|---|---|---|---|---|")
        for r in out["break_even"]["rows"]:
            cells = [r.get(key) for key in ("dense_sdpa_graph_ms", "single_read_all", "dense_path_ms",
                                             "dense_path_empty_retrieval_ms")]
            print(f"| {r['context']} | " + " | ".join(f"{c:.4f}" if isinstance(c, float) else "error" for c in cells)
                  + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
