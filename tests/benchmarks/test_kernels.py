import json
import time
from pathlib import Path

import pytest
import torch

from benchmarks.cli import main
from benchmarks.kernels import KERNEL_SHAPES, KERNELS
from benchmarks.harness import time_cuda


def test_time_cuda_measures_cpu_work():
    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.002)

    r = time_cuda(fn, warmup=2, iters=5, device="cpu")
    assert len(calls) == 7
    assert r["timer"] == "perf_counter" and r["iters"] == 5
    assert r["p10"] <= r["median_ms"] <= r["p90"]
    assert r["median_ms"] >= 2.0


def test_time_cuda_rejects_zero_iters():
    with pytest.raises(ValueError):
        time_cuda(lambda: None, iters=0)


def test_registry_shapes():
    assert "dense-attention" in KERNELS
    for name in KERNELS:
        assert KERNEL_SHAPES[name], f"{name} needs a default shape sweep"


def test_dense_attention_matches_reference():
    shape = {"batch": 2, "heads": 4, "kv_heads": 2, "q_len": 16, "kv_len": 16, "head_dim": 8,
             "causal": True}
    fn = KERNELS["dense-attention"](shape, torch.device("cpu"), torch.float32)
    out = fn()
    # rebuild the inputs the factory drew and compute attention by hand
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 16, 8, generator=g)
    k = torch.randn(2, 2, 16, 8, generator=g).repeat_interleave(2, dim=1)
    v = torch.randn(2, 2, 16, 8, generator=g).repeat_interleave(2, dim=1)
    s = (q @ k.transpose(-1, -2)) / 8 ** 0.5
    s = s.masked_fill(torch.ones(16, 16, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(out, s.softmax(-1) @ v, rtol=1e-4, atol=1e-5)
    assert fn.flops == 4 * 2 * 4 * 16 * 16 * 8 / 2


def test_kernels_cli_writes_json(tmp_path, capsys):
    out = tmp_path / "k.json"
    shapes = [{"batch": 1, "heads": 4, "kv_heads": 4, "q_len": 64, "kv_len": 64, "head_dim": 32, "causal": True},
              {"batch": 1, "heads": 4, "kv_heads": 3, "q_len": 1, "kv_len": 64, "head_dim": 32}]
    rc = main(["kernels", "--which", "dense-attention", "--warmup", "1", "--iters", "3",
               "--device", "cpu", "--shapes", json.dumps(shapes), "--out", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    ok, bad = data["results"]
    assert ok["median_ms"] > 0 and ok["tflops"] > 0 and ok["timer"] == "perf_counter"
    assert "error" in bad and "kv_heads" in bad["error"]  # 4 heads over 3 kv heads: reported, not raised
    assert data["environment"]["device"] == "cpu"


def test_kernels_standalone_entry_needs_only_torch(tmp_path):
    """``python -m benchmarks.kernels.run`` is what runs on a GPU box without vLLM/httpx."""
    import subprocess
    import sys

    out = tmp_path / "k.json"
    code = ("import sys; sys.modules['httpx'] = None; sys.modules['vllm'] = None; "
            "from benchmarks.kernels.run import main; sys.exit(main(sys.argv[1:]))")
    shapes = [{"batch": 1, "heads": 2, "kv_heads": 1, "q_len": 32, "kv_len": 32, "head_dim": 16,
               "causal": True}]
    p = subprocess.run([sys.executable, "-c", code, "--device", "cpu", "--iters", "2", "--shapes",
                        json.dumps(shapes), "--out", str(out)], capture_output=True, text=True,
                       cwd=str(Path(__file__).resolve().parents[2]))
    assert p.returncode == 0, p.stderr
    (rec,) = json.loads(out.read_text())["results"]
    assert rec["kernel"] == "dense-attention" and rec["median_ms"] > 0 and rec["iters"] == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_time_cuda_uses_cuda_events_on_gpu():
    a = torch.randn(2048, 2048, device="cuda", dtype=torch.bfloat16)
    r = time_cuda(lambda: a @ a, warmup=2, iters=10)
    assert r["timer"] == "cuda-event" and 0 < r["p10"] <= r["median_ms"] <= r["p90"]
    # 8x the work takes longer than 1x: the events time the GPU work, not the launch
    b = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    r8 = time_cuda(lambda: b @ b, warmup=2, iters=10)
    assert r8["median_ms"] > 2 * r["median_ms"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kernels_cli_on_cuda(tmp_path):
    out = tmp_path / "k.json"
    from benchmarks.kernels.run import main as kernels_main  # the GPU box has torch, maybe not httpx

    rc = kernels_main(["--which", "dense-attention", "--warmup", "2", "--iters", "5", "--out", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["environment"]["device"].startswith("cuda")
    assert all(r["timer"] == "cuda-event" and r["median_ms"] > 0 for r in data["results"])


def test_an_fa2_only_kernel_is_missing_from_a_build_without_fa2(monkeypatch):
    """The Hopper-only vLLM 0.34 stage trims _vllm_fa2_C: sparse_attn_varlen_func still imports there, but the
    bench must skip it (and say why) instead of timing a call that fails."""
    import sys
    import types

    from benchmarks.kernels import sparse_prefill_bench as bench

    iface = types.ModuleType("vllm.vllm_flash_attn.flash_attn_interface")
    iface.FA2_AVAILABLE, iface.FA2_UNAVAILABLE_REASON = False, "No module named '_vllm_fa2_C'"
    iface.flash_attn_varlen_func = lambda *a, **k: "fa3"
    iface.sparse_attn_varlen_func = lambda *a, **k: "fa2 sparse"
    package = types.ModuleType("vllm.vllm_flash_attn")
    package.flash_attn_varlen_func = iface.flash_attn_varlen_func
    monkeypatch.setitem(sys.modules, "vllm.vllm_flash_attn", package)
    monkeypatch.setitem(sys.modules, "vllm.vllm_flash_attn.flash_attn_interface", iface)
    fn, why = bench._import_fa("sparse_attn_varlen_func")
    assert fn is None and why.startswith("FA2 is not in this vLLM build") and "_vllm_fa2_C" in why
    assert bench._import_fa("flash_attn_varlen_func") == (iface.flash_attn_varlen_func, None)  # FA3 stays
    iface.FA2_AVAILABLE = True
    assert bench._import_fa("sparse_attn_varlen_func") == (iface.sparse_attn_varlen_func, None)
