"""Worker-side registry of KV positions that hold no data because a drop policy removed them.

The connector writes reloaded blocks into vLLM's paged cache; for drop:streaming / drop:snapkv some token
slots of those blocks are zeros. They must never be attended, so the attention backend asks this registry,
by physical block id (the ids the connector loaded into), which slots are dropped. Entries are cleared when
the scheduler hands a block id out for new content (the connector passes those ids every step).

Backend contract (attention_backends/kvplug_backend.py): in the metadata builder (once per batch), call
``registry().masks_for(block_table)``; when it returns a mask, the impl must give those (request, position)
slots -inf scores in every layer (per layer and kv head: index the mask with the layer index).
"""
from __future__ import annotations

import threading

import torch


class DroppedTokenRegistry:
    def __init__(self) -> None:
        self._masks: dict[int, torch.Tensor] = {}  # block id -> keep mask [layers, kv_heads, block_size] bool
        self._lock = threading.Lock()
        # Batches / query tokens whose attention the backend masked (tests and the accuracy script read them).
        self.masked_batches = 0
        self.masked_query_tokens = 0

    def __len__(self) -> int:
        return len(self._masks)

    def set_loaded(self, block_ids: list[int], keep_masks: torch.Tensor | None) -> None:
        """Blocks the connector just loaded; ``keep_masks`` [n, L, H, N] (None = nothing dropped)."""
        with self._lock:
            for i, b in enumerate(block_ids):
                if keep_masks is None or bool(keep_masks[i].all()):
                    self._masks.pop(b, None)
                else:
                    self._masks[b] = keep_masks[i].to("cpu", copy=True)

    def clear(self, block_ids) -> None:
        """Blocks reallocated for new content: their slots are real KV again."""
        if not self._masks:
            return
        with self._lock:
            for b in block_ids:
                self._masks.pop(int(b), None)

    def record_masked(self, query_tokens: int) -> None:
        self.masked_batches += 1
        self.masked_query_tokens += query_tokens

    def stats(self) -> dict[str, int]:
        return {"blocks": len(self._masks), "batches": self.masked_batches, "query_tokens": self.masked_query_tokens}

    def keep_mask(self, block_id: int) -> torch.Tensor | None:
        return self._masks.get(block_id)

    def masks_for(self, block_table: torch.Tensor) -> torch.Tensor | None:
        """block_table [reqs, max_blocks] (CPU) -> keep mask [reqs, max_blocks, L, H, N] or None when no block
        of the batch has dropped tokens (the common case: one dict check, no tensor work)."""
        if not self._masks:
            return None
        ids = block_table.tolist()
        hit = [(r, c, self._masks[b]) for r, row in enumerate(ids) for c, b in enumerate(row) if b in self._masks]
        if not hit:
            return None
        sample = hit[0][2]
        out = torch.ones(len(ids), len(ids[0]) if ids else 0, *sample.shape, dtype=torch.bool)
        for r, c, m in hit:
            out[r, c] = m
        return out


_registry = DroppedTokenRegistry()


def registry() -> DroppedTokenRegistry:
    return _registry
