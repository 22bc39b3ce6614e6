"""--profile of the GPU scripts: torch.profiler in the engine's worker, summarized as device busy/idle time,
kernel families, top kernels, host calls that wait for the device and kvplug's own ranges
(harness.profile_*); gpu_sparse_prefill puts each backend's profiled turns side by side."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from benchmarks import gpu_sparse_prefill, harness


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
