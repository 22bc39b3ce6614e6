"""Which kernel attends a sparse chunk (sparse_prefill.executor): kvplug's Triton kernels or vLLM's FA2 sparse one.

resolve() runs once per process and attention shape (the impls call it at build time); where FA2 was asked for
and cannot run it says why once in the log and the chunks run "triton", counted per layer call
(runner.STATS["executor_fallback_layer_calls"]). refusal() is the per-chunk check of what only forward knows
(the dtypes): a host-side look at tensor attributes, no device sync.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch

from kvplug import vllm_compat

logger = logging.getLogger("vllm.kvplug.sparse_prefill")

FA2_HEAD_DIMS = (128,)  # vLLM builds the sparse kernel for head_dim 128 only ("to keep binary small")
FA2_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Executor:
    name: str  # "triton" (on the CPU: the torch reference) or "fa2_sparse"
    kernel: Callable[..., Any] | None = None  # sparse_attn_varlen_func, or a stand-in with its signature (tests)
    why: str = ""  # the line the log says
    fallback: bool = False  # fa2_sparse was asked for and cannot run here: "triton" serves instead
    check_dtypes: bool = True  # the real kernel's dtype limits (a torch stand-in has none)

    @property
    def fa2(self) -> bool:
        return self.kernel is not None

    def refusal(self, query: torch.Tensor, key_cache: torch.Tensor) -> str | None:
        """Why this chunk cannot go through the FA2 kernel (None: it can)."""
        if not self.check_dtypes:
            return None
        if query.dtype not in FA2_DTYPES:
            return f"query dtype {query.dtype} (FA2 sparse takes fp16/bf16)"
        if key_cache.dtype != query.dtype:
            return f"KV cache dtype {key_cache.dtype} differs from the queries' {query.dtype} (e.g. an fp8 cache)"
        return None


_noted: set[str] = set()


def note_once(line: str, warning: bool = True) -> None:
    """Log ``line`` once per process."""
    if line not in _noted:
        _noted.add(line)
        (logger.warning if warning else logger.info)("kvplug sparse prefill: %s", line)


@functools.cache
def resolve(setting: str, platform: str, head_dim: int,
            lookup: Callable[[], tuple[Callable[..., Any] | None, str | None]] = vllm_compat.fa2_sparse_attention
            ) -> Executor:
    """The executor for sparse_prefill.executor = ``setting`` on ``platform`` with this head_dim."""
    if setting == "triton":
        return Executor("triton", why="sparse_prefill.executor=triton")
    if platform != "cuda":
        missing = f"the {platform} platform (vLLM's FlashAttention kernels are CUDA only)"
    elif head_dim not in FA2_HEAD_DIMS:
        missing = f"head_dim {head_dim} (vLLM builds FA2 sparse for head_dim {FA2_HEAD_DIMS} only)"
    else:
        kernel, missing = lookup()
        if missing is None:
            chosen = Executor("fa2_sparse", kernel, why=f"sparse_prefill.executor={setting}: vLLM's FA2 "
                              "sparse_attn_varlen_func over the index with 64-key windows")
            note_once(chosen.why, warning=False)
            return chosen
    explicit = setting == "fa2_sparse"
    line = f"sparse_prefill.executor={setting}: FA2 sparse cannot run here ({missing}); sparse chunks run triton"
    note_once(line, warning=explicit)
    return Executor("triton", why=line, fallback=explicit)
