"""CPU-testable parts of the CUDA decode path: CUDA-graph padding, the full-graph support cap, dense layers of a
pure-decode batch going to the dense backend's own kernel."""
import dataclasses
import enum
from types import SimpleNamespace

import pytest
import torch

from attention_backends.retrieval_decode import backend_hooks, planner, runner
from kvplug import vllm_compat
from kvplug.compat import common, v0_26
from attention_backends.retrieval_decode.config import RetrievalDecodeConfig


def _hook(max_model_len=4096):
    builder = SimpleNamespace(kv_cache_spec=SimpleNamespace(block_size=16, num_kv_heads=2),
                              vllm_config=SimpleNamespace(model_config=SimpleNamespace(max_model_len=max_model_len),
                                                          scheduler_config=SimpleNamespace(max_num_seqs=8),
                                                          compilation_config=SimpleNamespace()),
                              device=torch.device("cpu"), supports_update_block_table=True)
    cfg = RetrievalDecodeConfig(enabled=True, budget_tokens=256, recent_tokens=32, min_context_tokens=512)
    hook = backend_hooks.BuilderHook(builder, cfg)
    hook.graph_safe = True  # as on CUDA
    return hook, builder


def test_padded_cuda_graph_decode_batch_gets_the_graph_plan():
    """A pure-decode batch padded to a captured graph size (padding requests: query length 0, seq_len 0) is
    still pure decode: it takes the device-only plan, over every row of the padded buffers."""
    hook, builder = _hook()
    assert builder.supports_update_block_table is False  # every KV-cache group builds its own plan
    qsl = torch.tensor([0, 1, 2, 2, 2], dtype=torch.int32)  # 2 decodes + 2 padding requests
    seq = torch.tensor([3000, 100, 0, 0], dtype=torch.int32)
    cam = SimpleNamespace(query_start_loc_cpu=qsl, num_reqs=4, seq_lens=seq, seq_lens_cpu=seq,
                          block_table_tensor=torch.zeros(4, 256, dtype=torch.int32), num_actual_tokens=2)
    assert vllm_compat.batch_phases(cam) == vllm_compat.BatchPhases(2, 2, 0, 0)
    runner.stats_reset()
    md = hook.build(cam, lambda c: SimpleNamespace(), lambda c: None)
    plan = backend_hooks.plan_of(md)
    assert isinstance(plan, planner.DecodeGraphPlan)
    assert plan.seq_lens is cam.seq_lens and plan.block_table is cam.block_table_tensor
    assert plan.k >= 512 // 16  # short sequences read all their blocks through the same k slots
    s = runner.stats_snapshot()
    assert s["sparse_tokens"] == 1 and s["dense_decode_tokens"] == 1  # only the 3000-token one is sparse
    assert s["blocks_read"] == 256 // 16 and s["blocks_total"] == 3000 // 16 + 1


@dataclasses.dataclass
class _Cam:  # the CommonAttentionMetadata fields the planner and the batch subset touch
    query_start_loc: torch.Tensor
    query_start_loc_cpu: torch.Tensor
    seq_lens: torch.Tensor
    seq_lens_cpu: torch.Tensor
    block_table_tensor: torch.Tensor
    slot_mapping: torch.Tensor
    num_reqs: int
    num_actual_tokens: int
    max_query_len: int
    max_seq_len: int


def test_mixed_batch_takes_the_host_plan(monkeypatch):
    monkeypatch.setattr(vllm_compat, "platform_name", lambda: "cuda")  # no CPU_ATTN kernel metadata
    hook, _ = _hook()
    qsl = torch.tensor([0, 1, 300], dtype=torch.int32)  # a decode and a prefill chunk
    seq = torch.tensor([3000, 300], dtype=torch.int32)
    cam = _Cam(qsl, qsl, seq, seq, torch.zeros(2, 256, dtype=torch.int32), torch.arange(300), 2, 300, 299, 3000)
    built = []
    md = hook.build(cam, lambda c: SimpleNamespace(), lambda c: built.append(c) or "rest")
    plan = backend_hooks.plan_of(md)
    assert isinstance(plan, planner.RetrievalPlan) and plan.req_ids.tolist() == [0]
    assert plan.rest_metadata == "rest" and built[0].num_reqs == 1 and built[0].slot_mapping.shape[0] == 299


def test_full_cudagraph_support_is_capped_at_pure_decode_never_raised():
    class CG(enum.Enum):
        NEVER = 0
        UNIFORM_SINGLE_TOKEN_DECODE = 1
        UNIFORM_BATCH = 2
        ALWAYS = 3

    class FA3Builder:
        _cudagraph_support = CG.ALWAYS

    class OldStyleBuilder:
        cudagraph_support = CG.UNIFORM_BATCH

    class NeverBuilder:
        _cudagraph_support = CG.NEVER

    # 0.32 reads _cudagraph_support (the installed release: through vllm_compat); 0.26's module caps both names.
    cases = [(FA3Builder, "_cudagraph_support", vllm_compat.limit_full_cudagraphs_to_pure_decode)]
    cases += [(cls, name, lambda b: common.limit_full_cudagraphs_to_pure_decode(b, v0_26.CUDAGRAPH_SUPPORT_ATTRS))
              for cls, name in ((FA3Builder, "_cudagraph_support"), (OldStyleBuilder, "cudagraph_support"))]
    for cls, name, limit in cases:
        sub = type("Sub", (cls,), {})
        limit(sub)
        assert getattr(sub, name) is CG.UNIFORM_SINGLE_TOKEN_DECODE
        assert getattr(cls, name) is not CG.UNIFORM_SINGLE_TOKEN_DECODE  # the parent is untouched
    vllm_compat.limit_full_cudagraphs_to_pure_decode(NeverBuilder)
    assert NeverBuilder._cudagraph_support is CG.NEVER


def test_dense_layers_of_a_pure_decode_batch_use_the_dense_backend():
    params = planner.RetrievalParams(block_size=16, budget_tokens=64, budget_fraction=0.0, sink_blocks=1,
                                     recent_tokens=16, min_context_tokens=64, dense_layers=2)
    plan = planner.DecodeGraphPlan(torch.tensor([500]), torch.zeros(1, 40, dtype=torch.int32), 8, params)
    r = runner.RetrievalDecodeRunner(SimpleNamespace(scale=1.0))
    layer = SimpleNamespace(layer_name="model.layers.1.self_attn.attn")
    got = r.forward(None, layer, torch.zeros(1, 4, 8), None, None, torch.zeros(0), plan, torch.zeros(1, 4, 8),
                    dense_forward=lambda: "dense kernel")
    assert got == "dense kernel"


def _dense_path_hook(max_num_seqs=8):
    """A BuilderHook with graph_dense_path over a stand-in FlashAttention builder: one persistent AOT-schedule
    buffer that each of its builds rewrites (FA3 under full CUDA graphs)."""
    builder = SimpleNamespace(
        kv_cache_spec=SimpleNamespace(block_size=16, num_kv_heads=2), device="cpu", supports_update_block_table=True,
        vllm_config=SimpleNamespace(model_config=SimpleNamespace(max_model_len=4096),
                                    scheduler_config=SimpleNamespace(max_num_seqs=max_num_seqs),
                                    compilation_config=SimpleNamespace(max_cudagraph_capture_size=4)),
        scheduler_metadata=torch.zeros(1 + 4 * max_num_seqs, dtype=torch.int32))
    cfg = RetrievalDecodeConfig(enabled=True, budget_tokens=256, recent_tokens=32, min_context_tokens=512,
                                graph_dense_path=True)
    monkey = backend_hooks.vllm_compat
    real = monkey.platform_name
    monkey.platform_name = lambda: "cuda"  # the hook sizes its buffers at construction, as on CUDA
    try:
        hook = backend_hooks.BuilderHook(builder, cfg)
    finally:
        monkey.platform_name = real
    return hook, builder


def _fa_build(builder, calls):
    """FlashAttention's build as far as the plan cares: its schedule (here: the lengths + 1) written into the
    builder's one shared buffer, handed out as a view of it."""
    def build(cam):
        n = cam.seq_lens.shape[0]
        builder.scheduler_metadata[:n] = cam.seq_lens + 1
        builder.scheduler_metadata[n:] = 0
        calls.append(cam)
        return SimpleNamespace(seq_lens=cam.seq_lens, scheduler_metadata=builder.scheduler_metadata[:n])
    return build


def test_graph_dense_path_plan_splits_lengths_into_persistent_buffers_with_its_own_schedule():
    """A pure-decode batch with graph_dense_path: the dense backend's metadata sees the retrieval rows at length 0
    and keeps its own AOT schedule (the full build after it rewrites the builder's shared buffer); the retrieval
    kernels see the dense rows at length 0; k holds only sparse budgets. The buffers are persistent: the next
    step's plan points at the same memory (what a captured graph replays), and host caches of the old lengths
    are dropped from the dense path's metadata."""
    hook, builder = _dense_path_hook()
    assert hook.graph_k == 256 // 16  # no read-all slots for the sequences under min_context
    seq = torch.tensor([3000, 100, 0, 0], dtype=torch.int32)  # a long decode, a short one, 2 padding rows
    qsl = torch.tensor([0, 1, 2, 2, 2], dtype=torch.int32)
    cam = _Cam(qsl, qsl, seq, seq, torch.zeros(4, 256, dtype=torch.int32), torch.arange(2), 4, 2, 1, 3000)
    calls = []
    full = _fa_build(builder, calls)
    md = hook.build(cam, full, lambda c: None, _fa_build(builder, calls))
    plan = backend_hooks.plan_of(md)
    assert plan.dense_metadata.seq_lens.tolist() == [0, 100, 0, 0]
    assert plan.retrieval_seq_lens.tolist() == [3000, 0, 0, 0]
    assert calls[0].seq_lens_cpu is None and calls[1] is cam  # the dense one first, then the full batch
    assert plan.dense_metadata.scheduler_metadata.tolist() == [1, 101, 1, 1]  # survived the full build
    assert md.scheduler_metadata.tolist() == [3001, 101, 1, 1]
    ptrs = (plan.dense_metadata.seq_lens.data_ptr(), plan.retrieval_seq_lens.data_ptr(),
            plan.dense_metadata.scheduler_metadata.data_ptr())
    cam2 = dataclasses.replace(cam, seq_lens=torch.tensor([3001, 600, 0, 0], dtype=torch.int32))
    plan2 = backend_hooks.plan_of(hook.build(cam2, full, lambda c: None, _fa_build(builder, calls)))
    assert (plan2.dense_metadata.seq_lens.data_ptr(), plan2.retrieval_seq_lens.data_ptr(),
            plan2.dense_metadata.scheduler_metadata.data_ptr()) == ptrs
    assert plan2.retrieval_seq_lens.tolist() == [3001, 600, 0, 0]  # 600 >= min_context: retrieval now


def test_graph_dense_path_refuses_a_batch_larger_than_its_buffers():
    hook, _ = _dense_path_hook(max_num_seqs=2)  # capacity max(2, capture size 4) = 4
    seq = torch.full((5,), 3000, dtype=torch.int32)
    qsl = torch.arange(6, dtype=torch.int32)
    cam = _Cam(qsl, qsl, seq, seq, torch.zeros(5, 256, dtype=torch.int32), torch.arange(5), 5, 5, 1, 3000)
    build = lambda c: SimpleNamespace(seq_lens=c.seq_lens, scheduler_metadata=None)  # noqa: E731
    with pytest.raises(RuntimeError, match="exceeds the dense path's buffers"):
        hook.build(cam, build, lambda c: None, build)


def test_graph_plan_with_selection_reuse_flags_rows_from_persistent_buffers(monkeypatch):
    """reselect_interval=4: the graph plan carries the tracker's persistent per-row flags (the graph reads them in
    place): the first step and every 4th select, a retrieval row one token longer with the same block reuses,
    short (dense) and padding rows always select, a batch with a prefill chunk resets every row."""
    builder = SimpleNamespace(kv_cache_spec=SimpleNamespace(block_size=16, num_kv_heads=2), device="cpu",
                              vllm_config=SimpleNamespace(model_config=SimpleNamespace(max_model_len=4096),
                                                          scheduler_config=SimpleNamespace(max_num_seqs=8),
                                                          compilation_config=SimpleNamespace(
                                                              max_cudagraph_capture_size=4)),
                              supports_update_block_table=True)
    cfg = RetrievalDecodeConfig(enabled=True, budget_tokens=256, recent_tokens=32, min_context_tokens=512,
                                reselect_interval=4)
    monkeypatch.setattr(vllm_compat, "platform_name", lambda: "cuda")  # no CPU_ATTN kernel metadata
    hook = backend_hooks.BuilderHook(builder, cfg)
    hook.graph_safe = True
    table = torch.arange(4 * 256, dtype=torch.int32).view(4, 256) + 1
    qsl = torch.tensor([0, 1, 2, 2, 2], dtype=torch.int32)
    flags, ptrs = [], set()
    for t in range(6):
        seq = torch.tensor([3000 + t, 100 + t, 0, 0], dtype=torch.int32)
        cam = SimpleNamespace(query_start_loc_cpu=qsl, num_reqs=4, seq_lens=seq, seq_lens_cpu=seq,
                              block_table_tensor=table, num_actual_tokens=2)
        plan = backend_hooks.plan_of(hook.build(cam, lambda c: SimpleNamespace(), lambda c: None))
        flags.append(plan.reuse.reselect.tolist())
        ptrs.add(plan.reuse.reselect.data_ptr())
        assert plan.reuse.slots == plan.k and plan.reuse.extra == 1
    assert flags == [[1, 1, 1, 1], [0, 1, 1, 1], [0, 1, 1, 1], [0, 1, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1]]
    assert len(ptrs) == 1  # the same buffer every step
    mixed = _Cam(torch.tensor([0, 1, 300]), torch.tensor([0, 1, 300], dtype=torch.int32),
                 torch.tensor([3006, 300]), torch.tensor([3006, 300]), table[:2], torch.arange(300), 2, 300, 299, 3006)
    hook.build(mixed, lambda c: SimpleNamespace(), lambda c: "rest")
    seq = torch.tensor([3007, 101, 0, 0], dtype=torch.int32)
    cam = SimpleNamespace(query_start_loc_cpu=qsl, num_reqs=4, seq_lens=seq, seq_lens_cpu=seq,
                          block_table_tensor=table, num_actual_tokens=2)
    assert backend_hooks.plan_of(hook.build(cam, lambda c: SimpleNamespace(), lambda c: None)).reuse.reselect[0] == 1
    assert runner.stats_snapshot()["reused_selection_steps"] >= 4
