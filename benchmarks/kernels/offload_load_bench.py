"""What one follow-up's offload load costs: the connector's host-side work (CPU) and its copies (CUDA).

A follow-up whose 32K-token context sits in kvplug's CPU tier loads 2048 blocks (block 16) into 32 layers.

``--part host`` (any machine; the CPU numbers of issue 19): microseconds of the connector's Python work for that
load, on synthetic tiers and payloads (Llama-3-8B's 32 layers; a tiny head shape, so the inline CPU copies do not
drown the bookkeeping): the scheduler side for gpu_offload's follow-up (the context + a 35-token question whose 2
blocks miss and are saved: ``get_num_new_matched_tokens``, the tier lookup of 2048 keys; ``update_state_after_alloc``;
``build_connector_meta`` of its first step, its next step and an idle step; ``request_finished``; alone with
``--scheduler-only``) and the worker side (``start_load`` = fetch, locate,
metrics and in-flight checks per block, plan_runs; then every layer's issue through ``wait_for_layer_load``;
``load_step_overlapped``: the same with a staging ring, the overlapped path's structure run inline), median over --reps.

``--part device`` (CUDA, plain torch + Triton, no vLLM): kvplug's load code path (offload/layerwise.py's
``LoadJobs`` over a CPU tier of pinned segments, as offload/worker_side.py plans it) for one 2048-block context of
the 8B shape (32 layers, 8 kv heads, head_dim 128, bf16, block 16) into a paged cache, per policy (keep, int8),
against one big host->device copy of the same bytes from pinned memory (the PCIe ceiling): ms and GB/s, median
over --reps, after a warm-up (the quant kernels compiled). Also per policy: the host->device copies that path
issues, alone (``h2d_only``: no decode, no scatter; ``decode_and_scatter_share`` = what the rest adds), and a
prototype of the same load with the copies on one stream and decode + scatter on a second, through two staging
slots (``overlap_ms``, ``overlap_speedup`` over kvplug's path, ``overlap_staging_bytes``: the device memory it
adds). Checks that the loaded cache equals the source (keep: bitwise; int8: the policy's decode of the same
payloads) for both. Since the overlap is kvplug's own load path (offload.load_overlap, off by default until this bench shows it on the GPU),
``load_ms`` times it (``load_overlap`` true, ``load_overlap_units_per_layer``, ``load_overlap_decodes_per_layer``:
decode + scatter batches per layer, ``load_staging_bytes``: the ring's device memory), ``load_serial_ms`` the same load with the ring taken away (the serial path before it; its
``load_serial_equal``), and ``load_overlap_speedup`` = serial / overlapped.
Reading it: load ~ h2d_only ~ memcpy x stored/raw bytes: the copy structure is not why a follow-up is slower
than LMCache's (look at the host side and the scheduling: benchmarks/gpu_offload.py --profile); load_ms well
above overlap_ms: the real path's overlap falls short of the prototype's; h2d_only far below memcpy's GB/s: the
copies are too small or not pinned (``segments_pinned``).

    python -m benchmarks.kernels.offload_load_bench --part host     # CPU, ~20 s
    python -m benchmarks.kernels.offload_load_bench --part device   # H100, ~1.5 min (msgspec: vLLM 0.26 staged)
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import statistics
import sys
import time
from types import SimpleNamespace

import torch

from benchmarks import harness

LAYERS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16
CONTEXT_BLOCKS = 2048
HOST_OUT = "benchmarks/results/offload_load_host_cpu.json"
DEVICE_OUT = "benchmarks/results/offload_load_h100.json"
POLICY_NAMES = {"keep": "keep", "int8": "quant:int8"}


def _policies():
    from cache_policies.config import CachePolicyConfig
    from cache_policies.provider import RegistryPolicyProvider

    return RegistryPolicyProvider(CachePolicyConfig())


def make_worker(blocks: int, layers: int, heads: int, dim: int, dtype: torch.dtype, device: str,
                cpu_bytes: int, metrics=None):
    """A connector worker side over a synthetic paged cache ([blocks + 1, heads, BLOCK, dim] per layer, K and V)."""
    from offload.config import OffloadConfig
    from offload.worker_side import WorkerSide

    cfg = OffloadConfig(enabled=True, cpu_size=cpu_bytes, load_overlap=True)  # the option under test
    side = WorkerSide(SimpleNamespace(tp_rank=0), cfg, _policies(), metrics)
    g = torch.Generator(device=device).manual_seed(0)
    views = [(f"model.layers.{i}.self_attn.attn",
              torch.randn(blocks + 1, heads, BLOCK, dim, generator=g, device=device).to(dtype),
              torch.randn(blocks + 1, heads, BLOCK, dim, generator=g, device=device).to(dtype))
             for i in range(layers)]
    side.register_views(views)
    return side


def save_context(side, policy: str, block_ids: list[int]) -> list[str]:
    """Save ``block_ids`` of every layer through the connector's layer-wise save (entries: segment slots)."""
    from offload import metadata
    from offload.tiers.planner import store

    keys = [f"{policy}-{b}" for b in block_ids]
    spec = metadata.SaveSpec(policy, keys, list(block_ids), [i * BLOCK for i in range(len(block_ids))],
                             len(block_ids) * BLOCK)
    meta = metadata.KvplugConnectorMetadata(saves=[spec], tier_ops=[store("cpu", k) for k in keys])
    side.start_load(meta)
    for name, _, _ in side.layers:
        side.save_layer(name, meta)
    side.save(meta)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return keys


def load_meta(policy: str, keys: list[str], block_ids: list[int]):
    from offload import metadata

    return metadata.KvplugConnectorMetadata(loads=[metadata.LoadSpec(policy, list(keys), list(block_ids))])


def run_load(side, meta) -> None:
    """One step's load as vLLM drives it: start_load, then each layer's wait, then the step's end."""
    side.start_load(meta)
    for name, _, _ in side.layers:
        side.wait_for_layer_load(name)
    side._finish_loads()


# --- host part -----------------------------------------------------------------------------------------------

def _median_us(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times) * 1e6, 1)


def _scheduler(blocks: int):
    """A scheduler side whose CPU tier holds one ``blocks``-block context, and a follow-up request for it."""
    from kvplug import metrics
    from offload.config import OffloadConfig
    from offload.layout import KvLayout
    from offload.scheduler_side import SchedulerSide

    layout = KvLayout(model="m", dtype="bfloat16", num_layers=LAYERS, kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                      block_size=BLOCK, kv_cache_dtype="auto", tp_rank=0, tp_size=1)
    cfg = OffloadConfig(enabled=True, cpu_size=48 << 30)
    side = SchedulerSide(layout, cfg, _policies(), metrics.get_offload())
    context = list(range(blocks * BLOCK))
    prompt_len = len(context) + 35
    hashes = [hashlib.sha256(b"h%d" % i).digest() for i in range(blocks)]  # vLLM's block hashes: 32 bytes

    def request(rid: str):
        """The context + a question of its own (35 tokens, as gpu_offload's follow-ups): 2 new full blocks,
        which miss (the report names why) and are saved."""
        salt = int.from_bytes(hashlib.sha256(rid.encode()).digest()[:4], "little")
        question = [salt + i for i in range(prompt_len - len(context))]
        tail = [hashlib.sha256(b"%s-%d" % (rid.encode(), i)).digest() for i in range(len(question) // BLOCK)]
        prompt = context + question
        return SimpleNamespace(request_id=rid, prompt_token_ids=prompt, num_tokens=len(prompt),
                               block_hashes=hashes + tail, kv_transfer_params={}, cache_salt=None)

    class Blocks:
        def __init__(self, ids):
            self.ids = ids

        def get_block_ids(self):
            return (self.ids,)

    def step(rid: str | None, computed: int, ids: list[int] | None):
        """The scheduler output of ``rid``'s first step (``ids``: its blocks), of its next step (``ids`` None: one
        decode token), or of an idle step (``rid`` None: a finished request's save still draining)."""
        cached = SimpleNamespace(req_ids=[], new_block_ids=[], num_computed_tokens=[], resumed_req_ids=set())
        if rid is None:
            return SimpleNamespace(scheduled_new_reqs=[], scheduled_cached_reqs=cached, num_scheduled_tokens={})
        if ids is None:
            cached = SimpleNamespace(req_ids=[rid], new_block_ids=[None], num_computed_tokens=[prompt_len],
                                     resumed_req_ids=set())
            return SimpleNamespace(scheduled_new_reqs=[], scheduled_cached_reqs=cached, num_scheduled_tokens={rid: 1})
        news = [SimpleNamespace(req_id=rid, block_ids=(ids,), num_computed_tokens=computed)]
        return SimpleNamespace(scheduled_new_reqs=news, scheduled_cached_reqs=cached,
                               num_scheduled_tokens={rid: prompt_len - computed})

    ids = list(range(blocks + 3))
    first = request("turn1")
    side.get_num_new_matched_tokens(first, 0)
    side.update_state_after_alloc(first, Blocks(ids), 0)
    side.build_connector_meta(step("turn1", 0, ids))
    side.request_finished(first, (ids,))
    return side, request, Blocks, step, ids


def scheduler_profile(blocks: int, reps: int) -> dict:
    """Microseconds of the scheduler side's calls for one follow-up as vLLM 0.26 makes them (async scheduling):
    the lookup, the allocation, the first step's metadata (the load, the saves of the new blocks, the inventory),
    the request's next step's, finishing it, and an idle step's (the engine steps on while a save drains)."""
    side, request, Blocks, step, ids = _scheduler(blocks)
    timings: dict[str, list[float]] = {name: [] for name in (
        "get_num_new_matched_tokens", "update_state_after_alloc", "build_connector_meta",
        "build_connector_meta_next_step", "request_finished", "build_connector_meta_idle")}
    for n in range(reps):
        r = request(f"f{n}")
        t = [time.perf_counter()]
        matched, _ = side.get_num_new_matched_tokens(r, 0)
        t.append(time.perf_counter())
        side.update_state_after_alloc(r, Blocks(ids), matched)
        t.append(time.perf_counter())
        meta = side.build_connector_meta(step(r.request_id, 0, ids))
        t.append(time.perf_counter())
        side.build_connector_meta(step(r.request_id, 0, None))
        t.append(time.perf_counter())
        side.finish_report(r)
        side.request_finished(r, (ids,))
        t.append(time.perf_counter())
        side.build_connector_meta(step(None, 0, None))
        t.append(time.perf_counter())
        assert matched == blocks * BLOCK and len(meta.loads[0].keys) == blocks, (matched, meta.loads)
        for name, t0, t1 in zip(timings, t, t[1:]):
            timings[name].append(t1 - t0)
    sched = {name: round(statistics.median(v) * 1e6, 1) for name, v in timings.items()}
    sched["total"] = round(sum(sched.values()), 1)
    return sched


def host_profile(blocks: int, reps: int, worker_part: bool = True) -> dict:
    from kvplug import metrics

    sched = scheduler_profile(blocks, reps)
    if not worker_part:
        return {"blocks": blocks, "layers": LAYERS, "reps": reps, "scheduler_us": sched}

    # Worker side: tiny heads so the inline CPU copies cost little next to the bookkeeping.
    worker = {}
    for label, policy in POLICY_NAMES.items():
        w = make_worker(blocks, LAYERS, 1, 8, torch.float32, "cpu", 1 << 30, metrics.get_offload())
        keys = save_context(w, policy, list(range(blocks)))
        meta = load_meta(policy, keys, list(range(blocks)))
        from offload.layerwise import Lane, LoadJobs, StagingRing

        def plan():
            jobs = LoadJobs(w.layers, w._load_lane)
            w._plan_load(meta.loads[0], jobs)
            return jobs

        worker[label] = {"plan_load": _median_us(plan, reps), "start_load": _median_us(lambda: w.start_load(meta), reps),
                         "load_step": _median_us(lambda: run_load(w, meta), reps)}
        # The overlapped path's host work (offload.load_overlap; CUDA only in kvplug): its lanes inline here.
        w._decode_lane, w._staging = Lane(torch.device("cpu")), StagingRing(16 << 20, "cpu")
        worker[label]["load_step_overlapped"] = _median_us(lambda: run_load(w, meta), reps)
        w.close()
    return {"blocks": blocks, "layers": LAYERS, "reps": reps, "scheduler_us": sched, "worker_us": worker,
            "note": "worker head shape 1 x 8 (tiny): load_step includes the inline CPU copies of that shape"}


# --- device part -----------------------------------------------------------------------------------------------

def device_bench(blocks: int, reps: int, device: str = "cuda") -> dict:
    """Per policy: kvplug's load path (``load``), the host->device copies that path issues alone (``h2d_only``:
    the same slices of the same pinned segments, no decode, no scatter into the paged cache) and one copy of
    the raw context's bytes (``memcpy``). load ~ h2d_only ~ memcpy: the copy structure is not the problem;
    load >> h2d_only: decode and scatter serialize with the copies on the load stream (overlap them on a second
    stream); h2d_only >> memcpy (scaled by stored bytes): the copies are too small or not from pinned memory."""
    from offload.layerwise import Lane, LoadJobs, StagingRing

    def ms(fn) -> float:  # median ms per call (CUDA events; perf_counter on CPU), after a warm-up call
        return harness.time_cuda(fn, warmup=1, iters=reps, device=device)["median_ms"]

    out: dict = {"blocks": blocks, "shape": {"layers": LAYERS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM,
                                             "block": BLOCK, "dtype": "bfloat16"}}
    raw = 2 * LAYERS * blocks * KV_HEADS * BLOCK * HEAD_DIM * 2  # K + V bytes of the context
    host = torch.empty(raw, dtype=torch.uint8)
    host = host.pin_memory() if device == "cuda" else host
    dst = torch.empty(raw, dtype=torch.uint8, device=device)
    memcpy = ms(lambda: dst.copy_(host, non_blocking=True))
    out["memcpy"] = {"bytes": raw, "ms": round(memcpy, 3), "gb_s": round(raw / memcpy / 1e6, 1),
                     "pinned": host.is_pinned()}
    del dst, host
    for label, policy in POLICY_NAMES.items():
        # A cache of two contexts: the context is saved from the first half and loaded into the second half.
        w = make_worker(2 * blocks, LAYERS, KV_HEADS, HEAD_DIM, torch.bfloat16, device, raw + (raw >> 2))
        if device != "cuda" and w._staging is None:  # CPU smoke run: the overlapped path's structure, inline
            w._decode_lane, w._staging = Lane(torch.device(device)), StagingRing(16 << 20, device)
        src_ids, dst_ids = list(range(blocks)), list(range(blocks, 2 * blocks))
        keys = save_context(w, policy, src_ids)
        stored = sum(t.numel() * t.element_size() for k in keys for t in w.tiers["cpu"].get(k).values())
        meta = load_meta(policy, keys, dst_ids)
        host_s: list[float] = []

        def load():
            t0 = time.perf_counter()
            run_load(w, meta)
            host_s.append(time.perf_counter() - t0)

        t_load = ms(load)  # kvplug's path as shipped: overlapped where the worker has a staging ring
        ok = _check(w, policy, keys, src_ids, dst_ids)
        units, decodes = _units_per_layer(w, meta)
        serial = _timed_serial(w, meta, lambda: ms(load), lambda: _check(w, policy, keys, src_ids, dst_ids))
        jobs = LoadJobs(w.layers, w._load_lane)
        w._plan_load(meta.loads[0], jobs)
        segments_pinned = all(t.is_pinned() for run in jobs.runs for t in run.segment.fields.values())

        def h2d_only():
            for layer in range(LAYERS):
                for run in jobs.runs:
                    for t in run.segment.fields.values():
                        t[layer, run.start:run.stop].to(device, non_blocking=True)

        t_h2d = ms(h2d_only)
        # The candidate structure: copies on one stream, decode + scatter on a second (two staging slots).
        loaded = [kc.clone() for _, kc, _ in w.layers[:2]]
        dst = torch.tensor(dst_ids, device=device)
        for _, kc, vc in w.layers:  # what kvplug's path loaded goes: the prototype must write it again
            kc.index_fill_(0, dst, 0)
            vc.index_fill_(0, dst, 0)
        overlapped = OverlappedLoad(w.layers, jobs.runs, device)
        t_overlap = ms(overlapped.run)
        overlap_equal = all(torch.equal(kc, want) for (_, kc, _), want in zip(w.layers[:2], loaded)) and _check(
            w, policy, keys, src_ids, dst_ids)
        out[label] = {"stored_bytes": stored, "runs_per_layer": len(jobs.runs),
                      "copies_per_layer": sum(len(r.segment.fields) for r in jobs.runs),
                      "segments_pinned": segments_pinned,
                      "load_ms": round(t_load, 3), "load_gb_s_stored": round(stored / t_load / 1e6, 1),
                      "load_gb_s_raw_equivalent": round(raw / t_load / 1e6, 1),
                      "load_vs_memcpy_of_raw": round(memcpy / t_load, 3),
                      "h2d_only_ms": round(t_h2d, 3), "h2d_only_gb_s": round(stored / t_h2d / 1e6, 1),
                      "decode_and_scatter_share": round(1 - t_h2d / t_load, 3),
                      "overlap_ms": round(t_overlap, 3), "overlap_speedup": round(t_load / t_overlap, 3),
                      "overlap_equal": overlap_equal,
                      "overlap_staging_bytes": overlapped.staging_bytes,
                      "host_issue_ms": round(statistics.median(host_s) * 1e3, 3), "equal": ok,
                      # the real path's overlap (offload.load_overlap): load_ms above is it where load_overlap
                      "load_overlap": units is not None, "load_overlap_units_per_layer": units,
                      "load_overlap_decodes_per_layer": decodes,
                      "load_staging_bytes": w._staging.nbytes if w._staging is not None else 0, **serial}
        if "load_serial_ms" in out[label]:
            out[label]["load_overlap_speedup"] = round(out[label]["load_serial_ms"] / t_load, 3)
        w.close()
        del w, jobs, overlapped
        if device == "cuda":
            torch.cuda.empty_cache()
    return out


def _units_per_layer(w, meta) -> tuple[int | None, int | None]:
    """Copy units and decode batches per layer of this load on the real path (None: it loads serially)."""
    from offload.layerwise import LoadJobs, plan_decode_batches, plan_staged_units

    if w._staging is None:
        return None, None
    jobs = LoadJobs(w.layers, w._load_lane)
    w._plan_load(meta.loads[0], jobs)
    units = plan_staged_units(jobs.runs, w._staging.slot_bytes)
    if units is None:
        return None, None
    return len(units), sum(len(plan_decode_batches(unit)) for unit in units)


def _timed_serial(w, meta, timed, check) -> dict:
    """The same load with the worker's staging ring taken away (today's serial path before the overlap):
    ``load_serial_ms``, its ``equal`` check, and ``load_overlap_speedup`` = serial / load. {} without a ring."""
    if w._staging is None:
        return {}
    ring, w._staging = w._staging, None
    try:
        dst = torch.tensor(meta.loads[0].block_ids, device=w.layers[0][1].device)
        for _, kc, vc in w.layers:  # the overlapped load's bytes go: the serial one must write them again
            kc.index_fill_(0, dst, 0)
            vc.index_fill_(0, dst, 0)
        t = timed()
        return {"load_serial_ms": round(t, 3), "load_serial_equal": check()}
    finally:
        w._staging = ring


class OverlappedLoad:
    """The prototype of the overlapped load that offload/layerwise.py's LoadJobs now runs (``load_ms``), kept
    as the reference the real path is read against: layer l's host->device copies go on a copy stream into one
    of two preallocated staging slots while a decode stream decodes and scatters layer l - 1; the copy stream
    reuses a slot only after the decode stream is done with it (bounded memory: two layers of the load). On CPU (the smoke test) the same steps run inline."""

    def __init__(self, layers, runs, device: str) -> None:
        self.layers, self.runs, self.device = layers, runs, device
        cuda = device == "cuda"
        self.copy = torch.cuda.Stream() if cuda else None
        self.decode = torch.cuda.Stream() if cuda else None
        self.slots = [[{n: torch.empty((r.stop - r.start, *t.shape[2:]), dtype=t.dtype, device=device)
                        for n, t in r.segment.fields.items()} for r in runs] for _ in range(2)]
        self.staging_bytes = sum(b.numel() * b.element_size() for slot in self.slots for run in slot
                                 for b in run.values())
        self.indexes = [torch.tensor(r.block_ids, device=device) for r in runs]

    def _on(self, stream):
        return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()

    def _record(self, stream):
        if stream is None:
            return None
        ev = torch.cuda.Event()
        ev.record(stream)
        return ev

    def run(self) -> None:
        if self.copy is not None:
            self.copy.wait_stream(torch.cuda.current_stream())
        decoded: list = []
        for layer, (_, kc, vc) in enumerate(self.layers):
            slot = self.slots[layer % 2]
            with self._on(self.copy):
                if layer >= 2 and decoded[layer - 2] is not None:
                    self.copy.wait_event(decoded[layer - 2])  # the slot's previous layer is decoded
                for run, buf in zip(self.runs, slot):
                    for name, t in run.segment.fields.items():
                        buf[name].copy_(t[layer, run.start:run.stop], non_blocking=self.copy is not None)
                copied = self._record(self.copy)
            with self._on(self.decode):
                if copied is not None:
                    self.decode.wait_event(copied)
                for run, buf, index in zip(self.runs, slot, self.indexes):
                    m = len(run.block_ids)
                    like = torch.empty((), dtype=kc.dtype, device=kc.device).expand(m, 1, *kc.shape[1:])
                    k, v, _ = run.policy.decode_stacked({n: b.unsqueeze(1) for n, b in buf.items()}, like)
                    kc.index_copy_(0, index, k[:, 0])
                    vc.index_copy_(0, index, v[:, 0])
                decoded.append(self._record(self.decode))
        if decoded and decoded[-1] is not None:
            torch.cuda.current_stream().wait_event(decoded[-1])


def _check(w, policy: str, keys: list[str], src_ids: list[int], dst_ids: list[int]) -> bool:
    """The loaded blocks equal the source (keep) or the policy's decode of the stored payloads (lossy)."""
    dst = torch.tensor(dst_ids, device=w.layers[0][1].device)
    if policy == "keep":
        src = torch.tensor(src_ids, device=dst.device)
        return all(torch.equal(kc[dst], kc[src]) and torch.equal(vc[dst], vc[src]) for _, kc, vc in w.layers)
    pol = w.policy(policy)
    sample = [0, len(keys) // 2, len(keys) - 1]
    payloads = [{k: t.to(dst.device) for k, t in w.tiers["cpu"].get(keys[i]).items()} for i in sample]
    kc0 = w.layers[0][1]
    like = torch.empty(len(sample), len(w.layers), *kc0.shape[1:], dtype=kc0.dtype, device=dst.device)
    k, v, _ = pol.decode(payloads, like)
    return all(torch.equal(kc[dst[i]], k[j, layer]) and torch.equal(vc[dst[i]], v[j, layer])
               for layer, (_, kc, vc) in enumerate(w.layers) for j, i in enumerate(sample))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("host", "device"), default="host")
    ap.add_argument("--blocks", type=int, default=CONTEXT_BLOCKS)
    ap.add_argument("--reps", type=int, default=None, help="default: 20 (host), 10 (device)")
    ap.add_argument("--scheduler-only", action="store_true", help="host part: the scheduler side alone (~5 s)")
    ap.add_argument("--device", default=None, help="device part: cuda (default where present), or cpu (smoke test)")
    ap.add_argument("--out", default=None, help=f"default: {HOST_OUT} / {DEVICE_OUT}")
    args = ap.parse_args(argv)
    command = harness.command_line("benchmarks.kernels.offload_load_bench", argv)
    if args.part == "host":
        result = host_profile(args.blocks, args.reps or 20, worker_part=not args.scheduler_only)
        out = args.out or HOST_OUT
        device = "cpu (host-side Python work)"
    else:
        dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        result = device_bench(args.blocks, args.reps or 10, dev)
        out = args.out or DEVICE_OUT
        device = harness.device_name() if dev == "cuda" else "cpu"
    harness.write_results(out, command, {"device": device, "torch": torch.__version__}, result)
    import json

    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
