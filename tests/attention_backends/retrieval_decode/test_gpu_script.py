"""The GPU benchmark script's CPU-testable parts: argument forwarding and the summary table."""
from benchmarks import gpu_common
from benchmarks.gpu_retrieval_decode import summarize


def test_worker_argv_drops_parent_only_flags():
    argv = ["--lengths", "32768", "--backends", "FLASH_ATTN,CUSTOM", "--out=x.json", "--budget-tokens", "1024"]
    assert gpu_common.worker_argv(argv) == ["--lengths", "32768", "--budget-tokens", "1024"]


def test_summary_speedups_and_fraction_read():
    base = {"backend": "FLASH_ATTN", "device": "H100", "vllm": "0.26", "tpot_s": {"131072": [0.030, 0.031, 0.029]},
            "throughput_tok_s": {"16x32768": [400.0]}, "stats_final": None}
    ours = {"backend": "CUSTOM", "device": "H100", "vllm": "0.26", "tpot_s": {"131072": [0.015, 0.016, 0.014]},
            "throughput_tok_s": {"16x32768": [1000.0]},
            "stats_final": {"sparse_tokens": 10, "dense_decode_tokens": 0, "blocks_read": 50, "blocks_total": 500,
                            "batches": 10}}
    s = summarize([base, ours])
    assert abs(s["tpot_s"]["131072"]["speedup"] - 2.0) < 1e-9
    assert abs(s["throughput_tok_s"]["16x32768"]["speedup"] - 2.5) < 1e-9
    assert s["retrieval_stats"]["fraction_kv_read"] == 0.1
