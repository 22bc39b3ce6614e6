"""kvplug's KV connector: offloads prefix KV blocks to CPU and disk tiers, in the form the policy chooses.

Loaded by vLLM through ``--kv-transfer-config '{"kv_connector": "KvplugConnector",
"kv_connector_module_path": "offload.connector", "kv_role": "kv_both"}'`` (``kvplug serve --offload``
writes it). This module is the facade vLLM instantiates; the two halves vLLM's ABC asks for live in
offload/scheduler_side.py and offload/worker_side.py, the metadata between them in offload/metadata.py:

* Scheduler side (engine core): on a new request, counts the consecutive prefix blocks beyond vLLM's own
  GPU prefix-cache hit that the tiers hold (``get_num_new_matched_tokens``), remembers which GPU blocks vLLM
  allocated for them, and each step emits metadata: loads (entry key -> GPU block id), saves and the tier
  plan (offload/tiers/planner.py: what to store where, what to demote or delete).
* Worker side (each worker): executes it, layer by layer through vLLM's per-layer hooks
  (offload/layerwise.py). ``start_load_kv`` fetches the entries (CPU tier, pending disk writes, disk) and
  starts the first layers' host->device copies and decodes on a side stream; ``wait_for_layer_load(layer)``
  issues the next layers and makes the compute stream wait for that layer's event only. Saves happen in
  the step in which a request's prompt finishes prefilling (policies see the whole prefix: KIVI's recent
  tokens, SnapKV's window): ``save_kv_layer(layer)`` encodes that layer's blocks on a side stream and copies
  them into pinned host segments while later layers compute; ``wait_for_save`` applies the tier plan and
  returns without making the compute stream wait for those copies (the step, and the next one, do not
  pay for them). The blocks stay valid through vLLM's delay free: ``request_finished`` of a request whose
  save was planned returns True (vLLM keeps its blocks), and a worker's ``get_finished`` reports the request
  once its save's event has completed (polled, never a host sync); vLLM frees the blocks then. A preempted
  request's blocks are freed at once: when such a block is reallocated while its save is in flight, the
  compute stream waits for that save before the step writes it. A load of an entry whose save is in
  flight waits for it on the load stream. Disk writes (checksum, fsync) run on a background thread.
  Token-dropping policies store all layers of a block together, so they are saved (synchronously) in
  ``wait_for_save`` and loaded before layer 0. On CPU (no streams) the same calls do the work inline, saves
  are done when ``wait_for_save`` returns, and no request's free is delayed.

Entries are keyed by vLLM's chained block hash + policy + model/layout (offload/keys.py). A missing or
corrupt entry is reported to vLLM as a failed block load, which vLLM recomputes (kv_load_failure_policy
"recompute"), and the scheduler side forgets it; a full tier evicts and a failed store (host memory, disk)
skips the entry: neither fails a request.
"""
from __future__ import annotations

from typing import Any

import msgspec

from kvplug import metrics as kvplug_metrics
from kvplug import vllm_compat
from offload import layout as kv_layout
from offload import wiring
from offload.control import ControlServer
from offload.metadata import KvplugConnectorMetadata
from offload.scheduler_side import SchedulerSide
from offload.worker_side import WorkerSide

_Base, _, _Role, _ = vllm_compat.kv_connector_api()


class KvplugConnector(_Base):  # type: ignore[misc, valid-type]
    """vLLM KV connector (both roles) for kvplug's offload tiers and cache policies."""

    def __init__(self, vllm_config: Any, role: Any, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        w = wiring.current()
        cfg = w.offload
        if not cfg.enabled:
            # Loaded through --kv-transfer-config without `--offload`/config: use its defaults (CPU 8 GiB).
            cfg = msgspec.structs.replace(cfg, enabled=True)
        m = kvplug_metrics.get_offload(w.metrics)
        self.scheduler_side = (SchedulerSide(kv_layout.kv_layout(vllm_config, tp_rank=0), cfg, w.policies, m,
                                             defer_free=vllm_compat.kv_saves_defer_block_free())
                               if role == _Role.SCHEDULER else None)
        # The API server (our parent process) reads the inventory, events and reports through this channel.
        self.control = (ControlServer.for_parent(self.scheduler_side.answer)
                        if self.scheduler_side is not None else None)
        self.worker_side = (WorkerSide(kv_layout.kv_layout(vllm_config, vllm_compat.tensor_parallel_rank()), cfg,
                                       w.policies, m, vllm_config=vllm_config)
                            if role == _Role.WORKER else None)

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a best-effort cache: a dropped save is a future miss, nothing more

    # scheduler side
    def get_num_new_matched_tokens(self, request, num_computed_tokens):
        return self.scheduler_side.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request, blocks, num_external_tokens):
        self.scheduler_side.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output):
        return self.scheduler_side.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output):
        self.scheduler_side.update_connector_output(connector_output)

    def request_finished(self, request, block_ids):
        # True: a save of the request's blocks may still be copying; get_finished reports when it is done.
        # The kv_transfer_params returned reach the response (the cache report: serving/cache_api.py).
        params = self.scheduler_side.finish_report(request)
        return self.scheduler_side.request_finished(request, block_ids), params

    def bind_gpu_block_pool(self, gpu_block_pool):
        if self.scheduler_side is not None:
            self.scheduler_side.block_pool = gpu_block_pool

    # worker side
    def register_kv_caches(self, kv_caches):
        self.worker_side.register_kv_caches(kv_caches)

    def start_load_kv(self, forward_context, **kwargs):
        meta = self._get_connector_metadata()
        if isinstance(meta, KvplugConnectorMetadata):
            self.worker_side.start_load(meta)

    def wait_for_layer_load(self, layer_name):
        self.worker_side.wait_for_layer_load(layer_name)

    def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs):
        # The layer's KV is in the paged cache (the hook runs after attention): start saving it.
        self.worker_side.save_layer(layer_name, self._get_connector_metadata())

    def wait_for_save(self):
        meta = self._get_connector_metadata()
        if isinstance(meta, KvplugConnectorMetadata):
            self.worker_side.save(meta)

    def get_finished(self, finished_req_ids):
        if self.worker_side is None:
            return None, None
        return self.worker_side.finished_saves(finished_req_ids) or None, None

    def shutdown(self):
        if self.worker_side is not None:
            self.worker_side.close()
        if self.control is not None:
            self.control.close()

    def get_block_ids_with_load_errors(self):
        return self.worker_side.take_load_errors() if self.worker_side is not None else set()

    def build_connector_worker_meta(self):
        return self.worker_side.worker_meta() if self.worker_side is not None else None
