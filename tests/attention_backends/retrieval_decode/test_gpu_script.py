"""The GPU benchmark script's CPU-testable parts: argument forwarding, the summary table, the fallback verdict
and the KV-cache sizing."""
import argparse

from benchmarks import harness
from benchmarks.harness import write_shape
from benchmarks.gpu_retrieval_decode import auto_kv_cache_gib, retrieval_verdict, summarize

_IMPLS = ["attention_backends.kvplug_backend.KvplugAttentionImpl"]
_STATS = {"sparse_tokens": 10, "dense_decode_tokens": 0, "blocks_read": 50, "blocks_total": 500, "batches": 10,
          "summary_layers": 32, "summary_bytes": 1 << 30}


def _timings(prefill, t1):
    return [{"prefill_s": prefill, "t1_s": t1, "tn_s": t1 + 1.0}]


def test_worker_argv_drops_parent_only_flags():
    argv = ["--lengths", "32768", "--backends", "FLASH_ATTN,CUSTOM", "--out=x.json", "--budget-tokens", "1024"]
    assert harness.worker_argv(argv) == ["--lengths", "32768", "--budget-tokens", "1024"]


def test_summary_speedups_fraction_read_and_cache_check():
    base = {"backend": "FLASH_ATTN", "device": "H100", "vllm": "0.26", "tpot_s": {"131072": [0.030, 0.031, 0.029]},
            "throughput_tok_s": {"16x32768": [400.0]}, "stats": {}, "attention_impls": [],
            "timings": {"131072": _timings(10.0, 0.2), "16x32768": _timings(20.0, 0.3)}}
    ours = {"backend": "CUSTOM", "device": "H100", "vllm": "0.26", "tpot_s": {"131072": [0.015, 0.016, 0.014]},
            "throughput_tok_s": {"16x32768": [1000.0]}, "attention_impls": _IMPLS,
            "stats": {"tpot": dict(_STATS), "throughput": dict(_STATS, blocks_read=100)},
            "timings": {"131072": _timings(10.0, 0.2), "16x32768": _timings(20.0, 15.0)}}
    s = summarize([base, ours])
    assert abs(s["tpot_s"]["131072"]["speedup"] - 2.0) < 1e-9
    assert abs(s["throughput_tok_s"]["16x32768"]["speedup"] - 2.5) < 1e-9
    assert s["retrieval_stats"]["tpot"]["fraction_kv_read"] == 0.1
    assert s["retrieval_stats"]["throughput"]["fraction_kv_read"] == 0.2
    assert s["retrieval_path"] == "ran"
    # the CUSTOM throughput run re-prefilled (t1 close to the prefill): flagged, the others are fine
    assert s["prefix_cache_held"] == {"FLASH_ATTN 131072": True, "FLASH_ATTN 16x32768": True,
                                      "CUSTOM 131072": True, "CUSTOM 16x32768": False}


def test_a_custom_run_that_decoded_densely_is_reported_as_fallback():
    ran = {"attention_impls": _IMPLS, "stats": {"tpot": dict(_STATS)}}
    assert retrieval_verdict(ran) == "ran"
    dense = {"attention_impls": _IMPLS, "stats": {"tpot": dict(_STATS, sparse_tokens=0, dense_decode_tokens=256)}}
    assert retrieval_verdict(dense).startswith("FELL BACK TO DENSE (tpot): 0 tokens")
    no_summaries = {"attention_impls": _IMPLS, "stats": {"tpot": dict(_STATS, summary_layers=0)}}
    assert "no layer allocated block summaries" in retrieval_verdict(no_summaries)
    vanilla = {"attention_impls": ["vllm.v1.attention.backends.flash_attn.FlashAttentionImpl"], "stats": {}}
    assert "not kvplug's" in retrieval_verdict(vanilla)


def test_kv_cache_size_covers_the_prompts_and_fits_the_gpu(tmp_path):
    cfg = write_shape("llama-3-8b", tmp_path) / "config.json"

    def gib(phases, total):
        a = argparse.Namespace(phases=phases, lengths="32768,131072", batch=16, batch_len=32768, decode_tokens=128)
        return auto_kv_cache_gib(a, cfg, total)

    per_token = 2 * 32 * 8 * 128 * 2  # Llama-3-8B, bf16
    assert gib("tpot", 80) * (1 << 30) >= 131072 * per_token  # one 128K prompt fits
    assert gib("tpot,throughput", 140) * (1 << 30) >= 16 * 32768 * per_token  # H200: all 16 resident
    h100 = gib("tpot,throughput", 80)  # capped: weights (15 GiB) + summaries + slack must fit in 80 GB
    assert h100 * (1 + 1 / 16) + 15 + 6 <= 0.92 * 80 + 1e-6 and h100 * (1 << 30) < 16 * 32768 * per_token


def test_variant_runs_get_their_own_speedups_and_stay_out_of_the_workers_flags():
    """--variant LABEL:KEY=VALUE adds a kvplug run (e.g. the graph's dense path) measured in the same command:
    its speedup vs the same FLASH_ATTN run sits beside the plain kvplug run's; the parent-only flag never
    reaches a worker; a malformed one names the expected form."""
    import pytest

    from benchmarks.gpu_retrieval_decode import PARENT_ONLY, parse_variant

    assert parse_variant("dense_path:graph_dense_path=true, break_even=measured") == (
        "dense_path", ["graph_dense_path=true", "break_even=measured"])
    with pytest.raises(SystemExit, match="LABEL:KEY=VALUE"):
        parse_variant("graph_dense_path=true")
    argv = ["--lengths", "8192", "--variant", "d:graph_dense_path=true", "--variant=e:x=1", "--set", "break_even=measured"]
    assert harness.worker_argv(argv, PARENT_ONLY) == ["--lengths", "8192", "--set", "break_even=measured"]

    def run(backend, tpot, variant=None):
        r = {"backend": backend, "device": "H100", "vllm": "0.26", "tpot_s": {"8192": tpot}, "throughput_tok_s": {},
             "attention_impls": _IMPLS if backend == "CUSTOM" else [], "timings": {"8192": _timings(1.0, 0.05)},
             "stats": {"tpot": dict(_STATS)} if backend == "CUSTOM" else {}}
        return dict(r, variant=variant) if variant else r
    s = summarize([run("FLASH_ATTN", [0.010]), run("CUSTOM", [0.0125]), run("CUSTOM", [0.0100], "dense_path")])
    row = s["tpot_s"]["8192"]
    assert abs(row["speedup"] - 0.8) < 1e-9 and abs(row["variants"]["dense_path"]["speedup"] - 1.0) < 1e-9
    assert s["variant_retrieval_path"] == {"dense_path": "ran"}
    assert set(s["prefix_cache_held"]) == {"FLASH_ATTN 8192", "CUSTOM 8192", "CUSTOM[dense_path] 8192"}


def test_fused_kv_write_variant_reaches_the_engine_and_its_layers_are_reported():
    """--variant two_launch_write:fused_kv_write=false: the key reaches the engine's config; each kvplug run
    reports how many layers wrote KV through the fused launch (the default run: all; the variant: none)."""
    from benchmarks.gpu_retrieval_decode import parse_variant
    from kvplug import settings

    label, keys = parse_variant("two_launch_write:fused_kv_write=false")
    env = harness.kvplug_env("retrieval_decode", enabled=True, **harness.set_pairs(keys, "retrieval_decode"))
    assert settings.resolve(None, [], env).retrieval_decode.fused_kv_write is False
    assert settings.resolve(None, [], {}).retrieval_decode.fused_kv_write is True

    def run(backend, fused, variant=None):
        r = {"backend": backend, "device": "H100", "vllm": "0.26", "tpot_s": {"8192": [0.01]}, "throughput_tok_s": {},
             "attention_impls": _IMPLS if backend == "CUSTOM" else [], "timings": {"8192": _timings(1.0, 0.05)},
             "stats": {"tpot": dict(_STATS, fused_kv_write_layers=fused)} if backend == "CUSTOM" else {}}
        return dict(r, variant=variant) if variant else r
    s = summarize([run("FLASH_ATTN", None), run("CUSTOM", 30), run("CUSTOM", 0, label)])
    assert s["fused_kv_write_layers"] == {"CUSTOM": 30, "CUSTOM[two_launch_write]": 0}


def test_reuse_variant_reaches_the_engine_config_as_reselect_interval():
    """--variant reuse4:reselect_interval=4: the key travels as KVPLUG_RETRIEVAL_DECODE__RESELECT_INTERVAL and the
    engine's config resolves it (a bad value is named)."""
    import pytest

    from benchmarks.gpu_retrieval_decode import parse_variant
    from kvplug import settings

    label, keys = parse_variant("reuse4:reselect_interval=4")
    env = harness.kvplug_env("retrieval_decode", enabled=True, **harness.set_pairs(keys, "retrieval_decode"))
    assert label == "reuse4" and env["KVPLUG_RETRIEVAL_DECODE__RESELECT_INTERVAL"] == "4"
    resolved = settings.resolve(None, [], env)
    assert resolved.retrieval_decode.reselect_interval == 4
    with pytest.raises(settings.KvplugConfigError, match="reselect_interval"):
        settings.resolve(None, [], dict(env, KVPLUG_RETRIEVAL_DECODE__RESELECT_INTERVAL="0"))
