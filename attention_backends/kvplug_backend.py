"""kvplug's attention backend: a subclass of vLLM's dense backend for the platform.

With every feature off it is a passthrough: the parent's kernels run unchanged, so greedy outputs equal
vanilla vLLM. The metadata builder is where per-batch work belongs (flashinfer's plan/run split): it runs
once per step on host-side metadata, never inside a layer's forward, so it adds no device sync and stays
outside CUDA graphs. Sparse prefill and retrieval decode extend these classes.
"""
from __future__ import annotations

from attention_backends import dropped_attention, wiring
from attention_backends.retrieval_decode import backend_hooks as retrieval_decode
from attention_backends.sparse_prefill import backend_hooks as sparse_prefill
from kvplug import metrics, vllm_compat

_DenseBackend = vllm_compat.dense_backend_class()
_DenseBuilder = _DenseBackend.get_builder_cls()
_DenseImpl = _DenseBackend.get_impl_cls()
BACKEND_LABEL = f"kvplug-{vllm_compat.platform_name()}-dense"


class KvplugMetadataBuilder(_DenseBuilder):  # type: ignore[misc, valid-type]
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self._num_layers = len(layer_names)
        self._metrics = metrics.get(wiring.current().metrics)
        self._sparse_prefill = sparse_prefill.builder_hook(
            device, lambda: vllm_compat.builder_kv_facts(kv_cache_spec, vllm_config))
        self._retrieval_decode = retrieval_decode.builder_hook(self)
        self._dropped_tokens = dropped_attention.enabled()

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        attn_metadata = None
        if self._retrieval_decode is not None:  # long decodes read top-k blocks; the other rows build as below
            attn_metadata = self._retrieval_decode.build(
                common_attn_metadata, lambda cam: _DenseBuilder.build(self, common_prefix_len, cam, fast_build),
                lambda cam: self._build_rows(0, cam, fast_build),
                lambda cam: _DenseBuilder.build(self, 0, cam, fast_build))
        if attn_metadata is None:
            attn_metadata = self._build_rows(common_prefix_len, common_attn_metadata, fast_build)
        if self._metrics is not None:
            self._record(vllm_compat.batch_phases(common_attn_metadata))
        if self._dropped_tokens:  # masks resolve on the first layer, after this step's connector loads
            dropped_attention.plan(attn_metadata, common_attn_metadata,
                                   lambda cam: _DenseBuilder.build(self, 0, cam, fast_build))
        return attn_metadata

    def _build_rows(self, common_prefix_len, common_attn_metadata, fast_build: bool):
        attn_metadata = super().build(common_prefix_len, common_attn_metadata, fast_build)
        if self._sparse_prefill is not None:  # plan once per batch; the dense rows get their own metadata
            self._sparse_prefill.after_build(attn_metadata, common_attn_metadata,
                                             lambda cam: _DenseBuilder.build(self, 0, cam, fast_build))
        return attn_metadata

    def _record(self, phases: vllm_compat.BatchPhases) -> None:
        for phase, tokens in (("prefill", phases.prefill_tokens), ("decode", phases.decode_tokens)):
            if tokens:
                # Every layer of this KV-cache group runs attention once per batch for each phase present.
                self._metrics.attention_calls.labels(phase=phase, backend=BACKEND_LABEL).inc(self._num_layers)
                self._metrics.attention_tokens.labels(phase=phase, backend=BACKEND_LABEL).inc(tokens)


if vllm_compat.platform_name() == "cuda" and retrieval_decode.enabled():
    # Retrieval plans of mixed batches have host-picked shapes: full CUDA graphs for pure decode batches only.
    vllm_compat.limit_full_cudagraphs_to_pure_decode(KvplugMetadataBuilder)


class KvplugAttentionImpl(_DenseImpl):  # type: ignore[misc, valid-type]
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        m = metrics.get(wiring.current().metrics)
        if m is not None:
            m.backend_instances.labels(backend=BACKEND_LABEL, process=metrics.process_role()).inc()
        self._sparse_prefill = sparse_prefill.impl_runner(self)
        self._retrieval_decode = retrieval_decode.impl_runner(self)
        self._dropped_tokens = dropped_attention.enabled()

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        runner = self._retrieval_decode
        if runner is not None and runner.write_kv(key, value, kv_cache, slot_mapping):
            return  # one launch wrote the keys and values and folded the keys into the block summaries
        super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        if runner is not None:  # block summaries follow every key written to the cache
            runner.after_kv_write(key, kv_cache, slot_mapping)

    def after_external_kv_load(self, key_cache, block_index) -> None:
        """The KV connector wrote whole blocks ``block_index`` of this layer (``key_cache`` [num_blocks, kv_heads,
        block_size, head_dim]) without going through ``do_kv_cache_update``: refresh what follows every write
        (retrieval decode's block summaries), else decode over reloaded blocks would score stale summaries."""
        runner = self._retrieval_decode
        if runner is not None and runner.summaries is not None:
            runner.summaries.refresh(key_cache, block_index)
            retrieval_decode.record_refresh(block_index.numel())  # numel: host-side, no device sync

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        if attn_metadata is None and self._retrieval_decode is not None and query.is_cuda:
            # vLLM's memory profiling step: reserve the block summaries before it sizes the KV cache
            self._retrieval_decode.reserve_summary_memory(query.device)
        masked = dropped_attention.masked_batch_of(attn_metadata) if self._dropped_tokens else None
        if masked is not None:  # requests reading reloaded drop-policy blocks never attend dropped slots
            return dropped_attention.forward(super().forward, layer, query, key, value, kv_cache, masked, output,
                                             self.scale)
        retrieval = retrieval_decode.plan_of(attn_metadata) if self._retrieval_decode is not None else None
        if retrieval is not None:  # long decodes attend their top-k blocks; the other rows come back here
            def dense_forward(metadata=attn_metadata):  # the parent's kernel on the whole batch (a pure-decode
                # batch's dense layers; with other metadata, its rows that decode densely: the graph's dense path)
                return _DenseImpl.forward(self, layer, query, key, value, kv_cache, metadata, output,
                                          *args, **kwargs)
            return self._retrieval_decode.forward(self.forward, layer, query, key, value, kv_cache, retrieval, output,
                                                  dense_forward)
        plan = sparse_prefill.plan_of(attn_metadata) if self._sparse_prefill is not None else None
        if plan is not None:  # long prefill chunks attend sparsely; every other row goes to the parent
            return self._sparse_prefill.forward(super().forward, layer, query, key, value, kv_cache, plan, output)
        return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)


class KvplugAttentionBackend(_DenseBackend):  # type: ignore[misc, valid-type]
    @staticmethod
    def get_name() -> str:
        # The attention layer looks its backend up by this name in AttentionBackendEnum.
        return vllm_compat.backend_slot()

    @staticmethod
    def get_impl_cls() -> type:
        return KvplugAttentionImpl

    @staticmethod
    def get_builder_cls() -> type:
        return KvplugMetadataBuilder
