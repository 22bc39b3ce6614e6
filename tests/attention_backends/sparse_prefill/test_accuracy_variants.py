"""benchmarks/sparse_prefill_accuracy.py --variants in the real vLLM CPU engine (SmolLM2): one engine answers
the questions dense, then under each variant; the config switch reaches the engine and leaves nothing behind."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def result(smollm2_path, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("sp_variants") / "variants.json"
    env = dict(os.environ)
    env.pop("KVPLUG_CONFIG_JSON", None)
    # 2 conversations x 2 questions over ~2.5K tokens: chunks of 512, those past 1024 tokens sparse
    cmd = [sys.executable, "-m", "benchmarks.sparse_prefill_accuracy", "--model", str(smollm2_path),
           "--tasks", "passkey", "--contexts", "2500", "--cases", "2", "--turns", "2", "--max-tokens", "8",
           "--min-prompt-tokens", "1024", "--max-batched-tokens", "512", "--recall-tokens", "0",
           "--variants", "shipped;wide:budgets=16;again", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_every_variant_answered_every_question_sparsely(result):
    s = result["summary"]
    assert "partial" not in s and s["n"] == 4 and s["dense"]["accuracy"] is not None
    assert list(s["variants"]) == ["shipped", "wide", "again"]
    for v in s["variants"].values():
        assert v["overall"]["n"] == 4 and v["sparse_tokens"] > 0 and "warning" not in v
        assert v["chunks"].get("sparse/threshold", 0) > 0
    assert s["overall"] == s["variants"]["shipped"]["overall"]  # the first variant at the top (the gate's layout)
    assert [r["variant"] for r in result["runs"]] == ["shipped", "wide", "again"]


def test_the_switch_reaches_the_engine_and_switching_back_restores_it(result):
    v = result["summary"]["variants"]
    assert v["wide"]["density"] > v["shipped"]["density"] + 0.1  # 16x budgets computed far more pairs
    assert v["wide"]["config"]["budgets_scaled_by"] == 16
    # the same config after another one (and an emptied prefix cache): the same index, the same answers
    assert v["again"]["density"] == pytest.approx(v["shipped"]["density"])
    runs = {r["variant"]: r["cases"] for r in result["runs"]}
    assert [c["sparse"] for c in runs["again"]] == [c["sparse"] for c in runs["shipped"]]
