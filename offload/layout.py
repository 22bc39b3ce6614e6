"""Entry identity: what a stored block's bytes mean (model weights, dtype, heads, block size, TP rank).

Part of every entry key (offload/keys.py), so two models or layouts never share an entry. Reads vLLM's config
objects through plain attributes only.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any


# Files whose change means other weights: their names, sizes and modification times identify the weights.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".index.json")


def model_fingerprint(vllm_config: Any) -> str:
    """Identity of the weights and model config behind a path: the resolved HF config (overrides and RoPE
    scaling included), the revision, the weight files' names/sizes/mtimes and, for dummy weights, the seed.
    New weights or a changed override at the same path never get a previous run's stored KV."""
    mc = vllm_config.model_config
    load = getattr(vllm_config, "load_config", None)
    hf = getattr(mc, "hf_config", None)
    parts: dict[str, Any] = {
        "hf_config": hf.to_dict() if hasattr(hf, "to_dict") else repr(hf),
        "hf_overrides": getattr(mc, "hf_overrides", None),
        "revision": getattr(mc, "revision", None),
        "quantization": getattr(mc, "quantization", None),
        "load_format": str(getattr(load, "load_format", "")),
    }
    if parts["load_format"].endswith("dummy"):
        parts["seed"] = getattr(mc, "seed", None)
    path = str(mc.model)
    files = []
    if os.path.isdir(path):
        for name in sorted(os.listdir(path)):
            if name.endswith(_WEIGHT_SUFFIXES) or name == "config.json":
                st = os.stat(os.path.join(path, name))
                files.append((name, st.st_size, st.st_mtime_ns))
    elif os.path.isfile(path):
        st = os.stat(path)
        files.append((os.path.basename(path), st.st_size, st.st_mtime_ns))
    parts["files"] = files
    blob = json.dumps(parts, sort_keys=True, default=repr).encode()
    return hashlib.blake2b(blob, digest_size=16).hexdigest()


@dataclass(frozen=True)
class KvLayout:
    """What a stored block's bytes mean; part of every entry key, so two models/layouts never share."""

    model: str
    dtype: str
    num_layers: int
    kv_heads: int  # per rank
    head_dim: int
    block_size: int
    kv_cache_dtype: str
    tp_rank: int
    tp_size: int
    model_id: str = ""  # model_fingerprint(): weights and config behind ``model``

    def identity(self) -> bytes:
        return repr(self).encode()


def kv_layout(vllm_config: Any, tp_rank: int) -> KvLayout:
    mc, pc, cc = vllm_config.model_config, vllm_config.parallel_config, vllm_config.cache_config
    return KvLayout(model=str(mc.model), dtype=str(mc.dtype).removeprefix("torch."),
                    num_layers=mc.get_num_layers(pc), kv_heads=mc.get_num_kv_heads(pc),
                    head_dim=mc.get_head_size(), block_size=cc.block_size, kv_cache_dtype=str(cc.cache_dtype),
                    tp_rank=tp_rank, tp_size=pc.tensor_parallel_size, model_id=model_fingerprint(vllm_config))
