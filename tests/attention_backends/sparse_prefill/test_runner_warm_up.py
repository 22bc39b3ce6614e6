"""compiled_index warm-up (runner.SparsePrefillRunner.warm_up, backend_hooks.warm_up): after the start-up
warm-up no later chunk compiles the index build again, whatever its length, chunk offset or budget factor."""
from __future__ import annotations

import logging
import weakref
from types import SimpleNamespace

import pytest
import torch
from torch._dynamo.utils import counters

from attention_backends import wiring
from attention_backends.retrieval_decode.config import RetrievalDecodeConfig
from attention_backends.sparse_prefill import backend_hooks, head_config, runner
from attention_backends.sparse_prefill.config import SparsePrefillConfig
from attention_backends.sparse_prefill.executor import Executor
from attention_backends.sparse_prefill.fa2_sparse import SequenceKV
from attention_backends.sparse_prefill.head_config import HeadPattern, LayerPlan, PatternConfig
from attention_backends.sparse_prefill.index import ChunkGeometry
from attention_backends.sparse_prefill.index_options import IndexOptions
from kvplug.compat.common import BuilderKvFacts
from kvplug.metrics import MetricsConfig

HQ, HKV, D, PAGE, SCALE = 4, 2, 32, 16, 0.15
CFG = PatternConfig(default=HeadPattern(pattern="vertical_slash", budgets={"vertical": 30, "slash": 130})).validate()


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def _chunk(r: runner.SparsePrefillRunner, n: int, L: int, factor: float, fa2: bool, offset: int = 0) -> None:
    """One chunk of n rows over L keys through the runner's own path (what forward runs per segment), its queries
    laid out as serving's are: rows [offset, offset + n) of the batch, split out of a fused QKV projection, and
    its K/V in a paged cache of another layout than the warm-up's (head-major blocks, as CPU_ATTN's)."""
    g = torch.Generator().manual_seed(n + L)
    nb = -(-L // PAGE)
    kc, vc = (torch.randn(nb + 2, HKV, PAGE, D, generator=g) for _ in range(2))
    blocks = torch.randperm(nb + 2, generator=g)[:nb]
    qkv = torch.randn(offset + n, (HQ + 2 * HKV) * D, generator=g)
    q = qkv[offset:, :HQ * D].unflatten(1, (HQ, D))
    geom = ChunkGeometry(n, L)
    seq = SequenceKV.build(blocks, PAGE, geom) if fa2 else None
    with torch.inference_mode():  # as vLLM runs forward
        r._attend(q, kc, vc, blocks, geom, LayerPlan.from_config(r.pattern_config, 0, HQ, "cpu", factor),
                  torch.empty_like(q), seq)


@pytest.mark.parametrize("fa2", [False, True], ids=["torch", "fa2_executor"])
def test_after_warm_up_no_chunk_compiles(fa2):
    torch._dynamo.reset()  # forget graphs other tests compiled: the warm-up must compile its own
    # the FA2 path's index build and conversion; its kernel a no-op (what is counted here is compiles, and the
    # torch model of the kernel loops over heads and query blocks: minutes at these lengths)
    ex = Executor("fa2_sparse", lambda *args, **kwargs: None, check_dtypes=False) if fa2 else None
    r = runner.SparsePrefillRunner(CFG, HQ, HKV, SCALE, executor=ex, index_options=IndexOptions(compiled_index=True))
    before = _graphs()
    plans, shapes = r.warm_up(range(3), torch.float32, torch.float32, PAGE, D, torch.device("cpu"), small_chunks=True)
    assert plans == 1  # every layer alike: one plan
    assert _graphs() > before, "the warm-up compiled nothing"
    assert shapes[0][0] < shapes[0][1] and shapes[1][0] == shapes[1][1] and shapes[2][0] < 64 == shapes[3][0]
    warmed = _graphs()
    # longer sequences, whole prompts, later chunks, a chunk of one query block, a scaled budget (factor 2),
    # a batch's later request (rows at an offset)
    for n, L, factor, offset in ((3000, 12000, 1.0, 0), (12000, 12000, 1.0, 0), (40, 9000, 1.0, 0), (64, 9000, 1.0, 0),
                                 (1024, 20000, 2.0, 0), (2000, 10000, 1.0, 700), (2, 9000, 1.0, 300)):
        _chunk(r, n, L, factor, fa2, offset)
        assert _graphs() == warmed, f"n={n} L={L} factor={factor} offset={offset} compiled again"
    assert head_config.compiled_fallback is None


def test_warm_up_geometries_exceed_every_budget():
    big = LayerPlan.from_config(PatternConfig(default=HeadPattern(
        pattern="vertical_slash", budgets={"vertical": 6000, "slash": 5000})).validate(), 0, HQ, "cpu")
    geoms = runner.warm_up_geometries([big], small_chunks=False)
    assert all(g.L > 2 * 6000 and g.L % 64 == 0 for g in geoms) and len(geoms) == 2
    plain = [LayerPlan.from_config(CFG, 0, HQ, "cpu")]
    assert runner.warm_up_geometries(plain, True)[0].L == runner.WARM_UP_TOKENS
    # a floor below WARM_UP_TOKENS: the same chunks at the floor too (on the CPU up to 4096 keys is another graph)
    assert [(g.n, g.L) for g in runner.warm_up_geometries(plain, False, floor=2000)] == [
        (4096, 8192), (8192, 8192), (1024, 2048), (2048, 2048)]


@pytest.fixture
def hooks(monkeypatch):
    monkeypatch.setattr(wiring, "_current", None)
    wiring.configure(SparsePrefillConfig(enabled=True, compiled_index=True, cost_table="none"),
                     RetrievalDecodeConfig(), MetricsConfig(), False)
    for name, value in (("_override", {}), ("_runners", weakref.WeakSet()), ("_context", None), ("_model", ""),
                        ("_warmed_up", set())):
        monkeypatch.setattr(backend_hooks, name, value)
    monkeypatch.setattr(backend_hooks.vllm_compat, "current_model_name", lambda: "served-model")
    monkeypatch.setattr(runner, "WARM_UP", {})
    calls = []
    monkeypatch.setattr(runner.SparsePrefillRunner, "warm_up", lambda self, layers, *a, **kw: calls.append(
        (layers, a, kw)) or (1, [(4096, 8192), (8192, 8192)]))
    return calls


def _impl():
    return SimpleNamespace(num_heads=HQ, num_kv_heads=HKV, scale=SCALE, head_size=D)


FACTS = BuilderKvFacts(PAGE, torch.bfloat16, torch.bfloat16)


def test_builder_hook_warms_up_once_per_setting(hooks):
    impls = [backend_hooks.impl_runner(_impl()) for _ in range(3)]  # noqa: F841 - the runners live while held
    assert backend_hooks.builder_hook("cpu", lambda: FACTS) is not None
    assert backend_hooks.builder_hook("cpu", lambda: FACTS) is not None  # a second builder: no second warm-up
    assert len(hooks) == 1 and hooks[0][0] == range(3)  # every layer this process built
    assert runner.WARM_UP["plans"] == 1 and runner.stats_snapshot()["warm_up"]["geometries"]
    assert hooks[0][1][:3] == (torch.bfloat16, torch.bfloat16, PAGE)
    # no cost table: a chunk of one query block may go sparse; the threshold rule's floor
    assert hooks[0][2] == {"small_chunks": True, "floor": 32768}


def test_builder_hook_without_compiled_index_does_not_warm_up(hooks):
    wiring.configure(SparsePrefillConfig(enabled=True, compiled_index=False), RetrievalDecodeConfig(),
                     MetricsConfig(), False)
    impls = [backend_hooks.impl_runner(_impl())]  # noqa: F841
    backend_hooks.builder_hook("cpu", lambda: FACTS)
    assert hooks == [] and runner.WARM_UP == {}


def test_failed_warm_up_is_logged_and_the_engine_goes_on(hooks, monkeypatch, caplog):
    def boom(self, *a, **kw):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(runner.SparsePrefillRunner, "warm_up", boom)
    impls = [backend_hooks.impl_runner(_impl())]  # noqa: F841
    with caplog.at_level(logging.WARNING):
        assert backend_hooks.builder_hook("cpu", lambda: FACTS) is not None
    assert any("warm-up failed" in r.getMessage() and "out of memory" in r.getMessage() for r in caplog.records)
