from types import SimpleNamespace

import torch

from kvplug import vllm_compat


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
