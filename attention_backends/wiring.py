"""What kvplug's attention backend is configured with in this process (kvplug/plugin.py register() sets it).

The backend hooks read ``current()``; no module of attention_backends resolves kvplug's config itself.
"""
from __future__ import annotations

from dataclasses import dataclass

from attention_backends.retrieval_decode.config import RetrievalDecodeConfig
from attention_backends.sparse_prefill.config import SparsePrefillConfig
from kvplug.metrics import MetricsConfig


@dataclass(frozen=True)
class AttentionWiring:
    sparse_prefill: SparsePrefillConfig
    retrieval_decode: RetrievalDecodeConfig
    metrics: MetricsConfig
    # Whether requests can reload blocks of a drop policy (offload on): the backend then plans masked
    # attention over the dropped slots.
    drop_masks_enabled: bool


_current: AttentionWiring | None = None


def configure(sparse_prefill: SparsePrefillConfig, retrieval_decode: RetrievalDecodeConfig, metrics: MetricsConfig,
              drop_masks_enabled: bool) -> AttentionWiring:
    global _current
    _current = AttentionWiring(sparse_prefill, retrieval_decode, metrics, drop_masks_enabled)
    return _current


def current() -> AttentionWiring:
    if _current is None:
        raise RuntimeError("kvplug's attention backend is not configured in this process: kvplug.plugin.register() "
                           "(vLLM's plugin loading) calls attention_backends.wiring.configure()")
    return _current
