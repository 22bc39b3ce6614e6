"""Sparse prefill inside the real vLLM CPU engine (SmolLM2): chunked prefill, prefix-cache hits, agreement
of greedy answers with dense prefill on locally generated KV-retrieval / passkey prompts."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from benchmarks import sparse_prefill_accuracy
from tests.conftest import REPO

pytestmark = pytest.mark.engine
# 6 prompts (3 KV retrieval, 3 passkey) of ~3.3K tokens: >= 3 chunks of 1024 each, the later ones sparse.
N_PROMPTS, PROMPT_TOKENS = 6, 3300
# A greedy answer that leaves the dense one only where dense itself was this close to a tie (e.g. the
# filler after a correct pass key) is not a sparse-prefill error.
NEAR_TIE_NATS = 0.5


def _run(tmp_path, name: str, sparse: bool) -> dict:
    env = dict(os.environ, VLLM_ALLOW_INSECURE_SERIALIZATION="1",  # collective_rpc of a function
               KVPLUG_SPARSE_PREFILL__ENABLED=str(sparse).lower(), KVPLUG_SPARSE_PREFILL__MIN_PROMPT_TOKENS="2048",
               # the threshold rule: every chunk from 2048 tokens on through the sparse path, which is what this
               # tests (the CPU cost table, cost_tables/cpu.json, would send them all dense: sparse never wins here)
               KVPLUG_SPARSE_PREFILL__COST_TABLE="none",
               # vLLM's FA2 sparse kernel asked for where it cannot run (the CPU platform): the torch path serves
               KVPLUG_SPARSE_PREFILL__EXECUTOR="fa2_sparse")
    env.pop("KVPLUG_CONFIG_JSON", None)
    out = tmp_path / f"{name}.json"
    proc = subprocess.run([sys.executable, "-m", "tests.attention_backends.sparse_prefill.engine_run", str(out),
                           str(N_PROMPTS), str(PROMPT_TOKENS)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=3600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def runs(smollm2_path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sparse_prefill")
    return _run(tmp, "dense", False), _run(tmp, "sparse", True)


def test_sparse_path_ran_in_chunks_and_skipped_work(runs):
    dense, sparse = runs
    assert min(sparse["prompt_tokens"]) > 2048 + 1024  # several 1024-token chunks per prompt, later ones sparse
    s = sparse["stats_first"]
    assert s["sparse_tokens"] > 0 and s["sparse_layer_calls"] > 0
    assert s["dense_prefill_tokens"] > 0  # the first chunks (< min_prompt_tokens) stayed dense
    # cost_table=none: the threshold rule decided every chunk, and each decision was counted
    assert s["chunks"].get("sparse/threshold", 0) > 0 and s["chunks"].get("dense/below_floor", 0) > 0
    assert set(s["chunks"]) <= {"sparse/threshold", "dense/below_floor"}
    assert s["computed_pairs"] / s["causal_pairs"] < 0.95
    assert dense["stats"]["sparse_tokens"] == 0 and dense["stats"]["sparse_layer_calls"] == 0
    # sparse_prefill.executor=fa2_sparse on the CPU: every sparse layer call fell back, counted, none went to FA2
    assert s["fa2_sparse_layer_calls"] == 0 and 0 < s["executor_fallback_layer_calls"] <= s["sparse_layer_calls"]


def test_prefix_cache_hit_suffix_goes_sparse(runs):
    _, sparse = runs
    assert all(c >= 2048 for c in sparse["second_cached_tokens"])  # the shared context came from the cache
    grew = sparse["stats"]["sparse_tokens"] - sparse["stats_first"]["sparse_tokens"]
    assert grew > 0  # ... and the new suffix (seq >= threshold) attended it through the sparse path


def agreement(dense_ids: list[int], dense_top2: list, sparse_ids: list[int]) -> str:
    return sparse_prefill_accuracy.agreement(dense_ids, dense_top2, sparse_ids, NEAR_TIE_NATS)


def test_agreement_classifier():
    top2 = [[[5, -0.1], [6, -2.0]], [[7, -0.6], [8, -0.8]]]
    assert agreement([5, 7], top2, [5, 7]) == "same"
    assert agreement([5, 7], top2, [5, 8]) == "near_tie"  # 0.2 nats apart
    assert agreement([5, 7], top2, [6, 7]) == "differ"  # 1.9 nats apart: a real change
    assert agreement([5, 7], top2, [5, 9]) == "differ"  # not even dense's runner-up


def divergence(dense_ids: list[int], dense_top2: list, sparse_ids: list[int]) -> str:
    """Where and how close to a tie dense was at the first differing token (for the failure message)."""
    for t, (a, b) in enumerate(zip(dense_ids, sparse_ids)):
        if a != b:
            (_, lp1), (second, lp2) = dense_top2[t]
            return f"step {t}: dense {a} (top-2 gap {lp1 - lp2:.3f} nats, runner-up {second}), sparse {b}"
    return "none"


def test_answers_agree_with_dense(runs):
    """Greedy answers, sparse vs dense prefill, on the cases where dense prefill finds the answer: equal (a
    divergence only after the answer, at a dense near-tie, counts as equal). SmolLM2 fails the 3.3K KV
    cases even densely (2026-11-23: all 3 pass keys found, no KV value); its output there is low-margin noise (an fp32 transformers replay of the engine's
    chunking measured top-2 gaps of 0.01-0.18 nats along such an answer), so those cases are reported,
    not asserted: 2026-11-23 run: 4 same, 1 near-tie after the answer, 1 differ on a case dense got wrong."""
    dense, sparse = runs
    verdicts = [agreement(d, top2, s) for d, top2, s in zip(dense["token_ids"], dense["top2"], sparse["token_ids"])]
    where = [divergence(d, top2, s) for d, top2, s in zip(dense["token_ids"], dense["top2"], sparse["token_ids"])]
    # 8 greedy tokens hold the whole 5-digit pass key but only the start of a UUID: compare 8 characters
    solved = [i for i, text in enumerate(dense["texts"]) if text.strip().startswith(dense["answers"][i][:8])]
    report = (f"verdicts {verdicts}; dense found the answer in {solved}; divergences {where}; "
              f"dense {dense['texts']}; sparse {sparse['texts']}")
    print(report)
    assert len(solved) >= len(verdicts) // 2, f"SmolLM2 should solve most of these prompts densely: {report}"
    ok = [i for i in solved if verdicts[i] != "differ"]
    assert len(ok) / len(solved) >= 0.95, report
