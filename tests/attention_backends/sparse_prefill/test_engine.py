"""Sparse prefill inside the real vLLM CPU engine (SmolLM2): chunked prefill, prefix-cache hits, agreement
of greedy answers with dense prefill on locally generated KV-retrieval / passkey prompts."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.engine
# 10 prompts keep this test ~10 min on our 2 CPU cores (two engines); >= 95% agreement then means all 10.
N_PROMPTS, PROMPT_TOKENS = 10, 4096


def _run(tmp_path, name: str, sparse: bool) -> dict:
    env = dict(os.environ, VLLM_ALLOW_INSECURE_SERIALIZATION="1",  # collective_rpc of a function
               KVPLUG_SPARSE_PREFILL__ENABLED=str(sparse).lower(), KVPLUG_SPARSE_PREFILL__MIN_PROMPT_TOKENS="2048")
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
    assert s["computed_pairs"] / s["causal_pairs"] < 0.95
    assert dense["stats"]["sparse_tokens"] == 0 and dense["stats"]["sparse_layer_calls"] == 0


def test_prefix_cache_hit_suffix_goes_sparse(runs):
    _, sparse = runs
    assert all(c >= 2048 for c in sparse["second_cached_tokens"])  # the shared context came from the cache
    grew = sparse["stats"]["sparse_tokens"] - sparse["stats_first"]["sparse_tokens"]
    assert grew > 0  # ... and the new suffix (seq >= threshold) attended it through the sparse path


@pytest.mark.xfail(reason="issue 4 open: in the full-suite run of 2026-11-23 (fresh clone, 2-core CPU) sparse and "
                          "dense SmolLM2 answers did not agree on all 10 prompts; the target needs >= 95%",
                   strict=False)
def test_answers_agree_with_dense(runs):
    dense, sparse = runs
    same = [a == b for a, b in zip(dense["token_ids"], sparse["token_ids"])]
    agreement = sum(same) / len(same)
    assert agreement >= 0.95, f"greedy answers equal on {sum(same)}/{len(same)} prompts"
