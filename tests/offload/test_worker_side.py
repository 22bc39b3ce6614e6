"""The connector worker's kernel warm-up (offload/worker_side.py): when the caches register on a device whose
policy kernels compile on first use (CUDA: Triton JIT), every policy is run once on tiny tensors of the cache's
dtype and head shape, once per process, so no request pays a compile. On CPU the kernels are mocked."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from cache_policies import quant_int8, triton_quant
from cache_policies import registry as policy_registry
from offload import worker_side
from offload.config import OffloadConfig
from offload.worker_side import WorkerSide
from tests.offload.test_layerwise import POLICIES

HEADS, TOKENS, DIM = 2, 16, 32


@pytest.fixture(autouse=True)
def fresh_process(monkeypatch):
    """Each test starts as a new process would: nothing warmed up yet, warm-up on CPU too."""
    monkeypatch.setattr(worker_side, "_warmed", set())
    monkeypatch.setattr(worker_side, "WARM_UP_DEVICES", ("cuda", "cpu"))


class Recorder:
    """A PolicyProvider whose policies record what the worker encodes and decodes (and do the real work)."""

    def __init__(self, names=("keep", "quant:int8", "drop:streaming")) -> None:
        self._names = tuple(names)
        self.calls: list[tuple] = []

    def names(self):
        return self._names

    def create(self, name):
        real, calls = POLICIES.create(name), self.calls

        class Spy:
            def __getattr__(self, attr):
                fn = getattr(real, attr)
                if attr in ("encode", "encode_groups", "decode", "decode_stacked"):
                    def spy(first, second, *rest):
                        t = first if isinstance(first, torch.Tensor) else next(iter(
                            (first[0] if isinstance(first, list) else first).values()))
                        like = second if attr.startswith("decode") else first
                        calls.append((name, attr, tuple(like.shape), like.dtype, t.device.type))
                        return fn(first, second, *rest)
                    return spy
                return fn
        return Spy()


def views(dtype=torch.bfloat16, blocks=8):
    return [(f"model.layers.{i}.self_attn.attn", torch.zeros(blocks, HEADS, TOKENS, DIM, dtype=dtype),
             torch.zeros(blocks, HEADS, TOKENS, DIM, dtype=dtype)) for i in range(3)]


def worker(policies) -> WorkerSide:
    return WorkerSide(SimpleNamespace(tp_rank=0), OffloadConfig(enabled=True, cpu_size="64MiB"), policies)


def test_registering_the_caches_runs_every_policy_once_on_the_caches_dtype_and_head_shape():
    rec = Recorder()
    side = worker(rec)
    side.register_views(views())
    shape = (2, 1, HEADS, TOKENS, DIM)  # two blocks of one layer
    assert {c[0] for c in rec.calls} == {"keep", "quant:int8", "drop:streaming"}
    for name in ("keep", "quant:int8"):  # layer-wise: the save and load path's calls
        assert (name, "encode_groups", shape, torch.bfloat16, "cpu") in rec.calls
        assert (name, "decode_stacked", shape, torch.bfloat16, "cpu") in rec.calls
    assert ("drop:streaming", "encode", shape, torch.bfloat16, "cpu") in rec.calls  # whole-block path
    assert ("drop:streaming", "decode", shape, torch.bfloat16, "cpu") in rec.calls
    # once per process: a second worker (or a re-registration) of the same shape does nothing
    n = len(rec.calls)
    side.register_views(views())
    other = worker(rec)
    other.register_views(views())
    assert len(rec.calls) == n
    # another dtype is another compilation
    other.register_views(views(torch.float16))
    assert len(rec.calls) > n and rec.calls[-1][3] == torch.float16


def test_no_warm_up_where_kernels_do_not_compile(monkeypatch):
    monkeypatch.setattr(worker_side, "WARM_UP_DEVICES", ("cuda",))
    rec = Recorder()
    worker(rec).register_views(views())
    assert rec.calls == []


def test_a_policy_that_fails_to_warm_up_is_logged_and_the_others_still_run(caplog):
    rec = Recorder(("keep", "quant:int8"))
    real_create = rec.create

    def create(name):
        if name == "keep":
            raise RuntimeError("no kernel for you")
        return real_create(name)

    rec.create = create
    side = worker(rec)
    with caplog.at_level("INFO", logger="vllm.kvplug.offload"):
        side.register_views(views())
    assert {c[0] for c in rec.calls} == {"quant:int8"}
    assert "warmed up the cache policies' kernels for [2 x 16 x 32] bfloat16" in caplog.text
    assert "quant:int8; failed: keep (RuntimeError: no kernel for you)" in caplog.text


def test_int8_kernels_are_compiled_for_the_shapes_a_load_and_a_save_launch(monkeypatch):
    """The Triton entry points (mocked: the torch reference does the work) see the row lengths and dtypes the
    connector's own calls give them: key rows of TOKENS (keys are quantized per channel) and value rows of DIM,
    codes int8, dequantized into the cache's dtype."""
    launched = []

    def quantize(x, code_dtype, qmax, min_scale):
        launched.append(("quant", x.shape[-1], x.dtype, code_dtype))
        return quant_int8.quantize_int8_reference(x)

    def dequantize(q, scale, dtype):
        launched.append(("dequant", q.shape[-1], q.dtype, dtype))
        return quant_int8.dequantize_reference(q, scale, dtype)

    monkeypatch.setattr(triton_quant, "usable", lambda x: True)
    monkeypatch.setattr(triton_quant, "quantize", quantize)
    monkeypatch.setattr(triton_quant, "dequantize", dequantize)
    side = worker(Recorder(("quant:int8",)))
    side.register_views(views())
    want = {("quant", TOKENS, torch.bfloat16, torch.int8), ("quant", DIM, torch.bfloat16, torch.int8),
            ("dequant", TOKENS, torch.int8, torch.bfloat16), ("dequant", DIM, torch.int8, torch.bfloat16)}
    assert set(launched) == want
    # ... the same set a real save and load of the connector launch
    warm = set(launched)
    launched.clear()
    from tests.offload.test_layerwise import run_step, save_meta
    from offload import metadata

    meta, keys = save_meta("quant:int8", [0, 1, 2])
    run_step(side, meta)
    run_step(side, metadata.KvplugConnectorMetadata(loads=[metadata.LoadSpec("quant:int8", keys, [4, 5, 6])]))
    assert set(launched) == warm


@pytest.mark.parametrize("name", policy_registry.POLICY_NAMES)
def test_every_registered_policy_warms_up_on_the_cpu(name, caplog):
    with caplog.at_level("INFO", logger="vllm.kvplug.offload"):
        side = worker(Recorder((name,)))
        side.register_views(views())
    assert "failed" not in caplog.text, caplog.text
