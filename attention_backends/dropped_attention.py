"""Attention that never sees dropped tokens: the backend side of drop:streaming / drop:snapkv reloads.

The connector writes a reloaded drop-policy block into vLLM's paged cache with zeros where tokens were
dropped and records the block's keep-mask by physical block id (kvplug/dropped_tokens.py). A zero key
still scores 0 and takes softmax mass, so the backend must mask those slots. kvplug's backend does it in
two halves (plan/run, like every other per-batch decision in it):

* ``plan`` (metadata builder, once per batch): attaches a DroppedTokenPlan to the metadata when a drop
  policy is configured. vLLM builds metadata before the connector's ``start_load_kv`` of the same step,
  so the plan resolves the masks lazily, on the first layer's forward, once per batch -- after this step's
  loads -- and is a no-op (one dict check) while no loaded block holds dropped tokens.
* ``forward`` (every layer): requests whose blocks carry a mask attend through a masked torch path over
  their gathered paged K/V (per layer and kv head: SnapKV keeps different tokens per head); every other
  request goes to the dense kernel with metadata built for just its rows.

The masked path is host-driven (it reads the keep-masks); on CUDA it is for eager/piecewise-graph
execution, which vLLM uses for the prefill step that follows a load.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from attention_backends import wiring
from attention_backends.row_subset import forward_rows
from kvplug import vllm_compat
from kvplug.dropped_tokens import registry

PLAN_ATTR = "kvplug_dropped_tokens"


class MaskedBatch:
    """The resolved plan of one batch: masked requests (with their keep-masks) and the dense rest."""

    def __init__(self, reqs: list[int], keep: torch.Tensor, qsl: torch.Tensor, seq_lens: torch.Tensor,
                 block_table: torch.Tensor, dense_rows: torch.Tensor | None, dense_metadata: Any) -> None:
        self.reqs = reqs  # batch indices of masked requests
        self.keep = keep  # [len(reqs), blocks, layers, kv_heads, block_size] bool
        self.qsl = qsl  # host query_start_loc of the batch
        self.seq_lens = seq_lens  # host
        self.block_table = block_table  # [len(reqs), blocks] int64 on the KV cache's device
        self.dense_rows = dense_rows  # token rows of the other requests (None: no other request)
        self.dense_metadata = dense_metadata
        self._device_keep: dict[torch.device, torch.Tensor] = {}

    def keep_on(self, device: torch.device) -> torch.Tensor:
        if device not in self._device_keep:
            self._device_keep[device] = self.keep.to(device)
        return self._device_keep[device]


class DroppedTokenPlan:
    def __init__(self, common_attn_metadata: Any, build_dense: Callable[[Any], Any]) -> None:
        self._cam = common_attn_metadata
        self._build_dense = build_dense
        self._resolved = False
        self._batch: MaskedBatch | None = None

    def resolve(self) -> MaskedBatch | None:
        """Once per batch (first layer): which requests read blocks that hold dropped tokens."""
        if self._resolved:
            return self._batch
        self._resolved = True
        reg = registry()
        if not len(reg):
            return None
        cam = self._cam
        num_reqs = int(cam.num_reqs)
        qsl = cam.query_start_loc_cpu[:num_reqs + 1]
        seq_lens = vllm_compat.host_seq_lens(cam)[:num_reqs].to(torch.int64)
        table = cam.block_table_tensor[:num_reqs].to("cpu", torch.int64)
        block_size = None
        reqs, masks = [], []
        for r in range(num_reqs):
            row_keep = None
            for c in range(table.shape[1]):
                m = reg.keep_mask(int(table[r, c]))
                if m is None:
                    continue
                block_size = m.shape[-1]
                if c * block_size >= int(seq_lens[r]):  # stale id beyond the sequence
                    continue
                if row_keep is None:
                    row_keep = torch.ones(table.shape[1], *m.shape, dtype=torch.bool)
                row_keep[c] = m
            if row_keep is not None:
                reqs.append(r)
                masks.append(row_keep)
        if not reqs:
            return None
        others = [r for r in range(num_reqs) if r not in reqs]
        dense_rows, dense_metadata = None, None
        if others:
            req_ids = torch.tensor(others, dtype=torch.int64)
            dense_rows = torch.cat([torch.arange(int(qsl[r]), int(qsl[r + 1])) for r in others])
            dense_metadata = self._build_dense(vllm_compat.subset_common_metadata(cam, req_ids, dense_rows))
            dense_rows = dense_rows.to(cam.query_start_loc.device)
        self._batch = MaskedBatch(reqs, torch.stack(masks), qsl, seq_lens,
                                  table[reqs].to(cam.block_table_tensor.device), dense_rows, dense_metadata)
        reg.record_masked(sum(int(qsl[r + 1] - qsl[r]) for r in reqs))
        self._cam = self._build_dense = None  # type: ignore[assignment]
        return self._batch


def enabled() -> bool:
    """Whether any request can get a drop policy (config default or rules; requests may also name one): the
    composition layer says so when it configures the backend (offload on)."""
    return wiring.current().drop_masks_enabled


def plan(attn_metadata: Any, common_attn_metadata: Any, build_dense: Callable[[Any], Any]) -> None:
    if attn_metadata is not None:
        setattr(attn_metadata, PLAN_ATTR, DroppedTokenPlan(common_attn_metadata, build_dense))


def masked_batch_of(attn_metadata: Any) -> MaskedBatch | None:
    p = getattr(attn_metadata, PLAN_ATTR, None)
    return None if p is None else p.resolve()


def forward(dense_forward: Callable[..., Any], layer: Any, query: torch.Tensor, key: torch.Tensor | None,
            value: torch.Tensor | None, kv_cache: torch.Tensor, batch: MaskedBatch, output: torch.Tensor,
            scale: float) -> torch.Tensor:
    if batch.dense_rows is not None:
        forward_rows(dense_forward, layer, query, key, value, kv_cache, batch.dense_metadata, batch.dense_rows,
                     output)
    key_cache, value_cache = vllm_compat.paged_kv_views(kv_cache, layer)
    li = vllm_compat.layer_index(layer.layer_name)
    keep_all = batch.keep_on(query.device)
    for i, r in enumerate(batch.reqs):
        r0, r1, seq_len = int(batch.qsl[r]), int(batch.qsl[r + 1]), int(batch.seq_lens[r])
        out = output[r0:r1]
        masked_attention(query[r0:r1], key_cache, value_cache, batch.block_table[i], keep_all[i, :, li], seq_len,
                         scale, out=out)
    return output


def masked_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, blocks: torch.Tensor,
                     keep: torch.Tensor, seq_len: int, scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of the last ``len(q)`` positions of a paged sequence, never attending dropped slots.

    q [n, Hq, d]; key/value_cache [num_blocks, Hkv, block_size, d]; blocks [>= ceil(seq_len/bs)] the
    sequence's block ids; keep [>= that many blocks, Hkv, block_size] bool (False = dropped)."""
    n, hq, d = q.shape
    _, hkv, bs, _ = key_cache.shape
    nb = -(-seq_len // bs)
    ids = blocks[:nb].long()
    k = key_cache[ids].permute(1, 0, 2, 3).reshape(hkv, nb * bs, d)[:, :seq_len]
    v = value_cache[ids].permute(1, 0, 2, 3).reshape(hkv, nb * bs, d)[:, :seq_len]
    kept = keep[:nb].permute(1, 0, 2).reshape(hkv, nb * bs)[:, :seq_len]  # [Hkv, S]
    q_pos = seq_len - n + torch.arange(n, device=q.device)
    causal = torch.arange(seq_len, device=q.device)[None, :] <= q_pos[:, None]  # [n, S]
    mask = (causal[None] & kept[:, None, :]).repeat_interleave(hq // hkv, dim=0)  # [Hq, n, S]
    o = F.scaled_dot_product_attention(q.transpose(0, 1)[None].float(), k[None].float(), v[None].float(),
                                       attn_mask=mask[None], scale=scale, enable_gqa=hq != hkv)
    result = o[0].transpose(0, 1).nan_to_num(0.0).to(q.dtype)
    if out is None:
        return result
    out.copy_(result)
    return out
