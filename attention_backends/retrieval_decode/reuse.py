"""Selection reuse across decode steps (``retrieval_decode.reselect_interval`` N > 1).

A sequence scores and selects on its first decode step and then every N-th; on the steps in between each (layer,
kv-head) reads the blocks it selected last time (kept per batch row in a persistent buffer, ``SelectionStore``)
plus every block started since. Those new blocks hold the only tokens written since the selection, so the
recent window and the sink stay covered: the stored selection had both forced in, and the window has only moved
onto the new blocks. A reused step reads its stored budget plus at most ``reuse_extra_blocks`` blocks.

Flashinfer style and CUDA-graph safe: ``ReuseTracker.step`` runs once per batch in the metadata builder, as device
ops on persistent per-row buffers (no host sync), and writes each row's reselect flag and the length its stored
selection was made at; every layer's kernels then read them (score and select exit at once for rows with flag 0,
attend reads the stored slots + the new blocks). A row reuses only if it holds the same request as in the previous
step, one token longer, and both steps decoded by retrieval. "Same request" needs no request ids: the block that
took the row's last token in the previous step (a block being written is owned by that request alone) must sit at
the same logical index of this step's block table. Another request there (rows swapped, a finished request's row
refilled, a preemption, a dummy run) has another block at that index: the row reselects. A batch with a prefill
chunk in it resets every row (``reset``), on every platform, so the CPU path and the CUDA paths agree.
"""
from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import torch

from attention_backends.retrieval_decode import memory, planner
from attention_backends.retrieval_decode.selection import Selection

_trackers: "weakref.WeakSet[ReuseTracker]" = weakref.WeakSet()
_lock = threading.Lock()


@dataclass
class ReuseRows:
    """What a plan's kernels need to reuse selections (``RetrievalPlan.reuse`` / ``DecodeGraphPlan.reuse``)."""

    rows: torch.Tensor  # [N] device int64: each retrieval sequence's row slot in the stores
    reselect: torch.Tensor  # [N] device int32: 1 = score and select this step, 0 = reuse the stored selection
    sel_seq_lens: torch.Tensor  # [N] device int32: the sequence's length when its stored selection was made
    capacity: int  # row slots of every layer's store
    slots: int  # stored slots per (row, kv-head): the fixed k
    extra: int  # blocks a reused selection may add (RetrievalParams.reuse_extra_blocks)


class ReuseTracker:
    """One per metadata builder (KV-cache group): the per-row state, persistent buffers of ``capacity`` rows."""

    def __init__(self, capacity: int, device: torch.device | str) -> None:
        self.capacity = capacity
        kw = {"device": device}
        self.prev_block = torch.full((capacity,), -1, dtype=torch.int64, **kw)  # -1: the row did not retrieve
        self.prev_seq_len = torch.zeros(capacity, dtype=torch.int64, **kw)
        self.age = torch.zeros(capacity, dtype=torch.int64, **kw)  # steps since the row's last reselect
        self.reselect = torch.ones(capacity, dtype=torch.int32, **kw)
        self.sel_seq_lens = torch.zeros(capacity, dtype=torch.int32, **kw)
        self.reused = torch.zeros((), dtype=torch.int64, **kw)  # sequence-steps that reused (metrics)
        self.reselected = torch.zeros((), dtype=torch.int64, **kw)  # retrieval sequence-steps that selected
        with _lock:
            _trackers.add(self)

    # Under inference mode whatever the caller's mode: the engine makes these tensors there (inference tensors,
    # updatable in place only inside it).
    @torch.inference_mode()
    def reset(self) -> None:
        """Every row reselects at its next retrieval step (a batch with prefill chunks, or reuse off)."""
        self.prev_block.fill_(-1)

    @torch.inference_mode()
    def step(self, block_table: torch.Tensor, seq_lens: torch.Tensor, retrieval: torch.Tensor, interval: int,
             block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One pure-decode batch of rows 0..n-1 (``retrieval`` [n] bool: the rows that decode by retrieval) ->
        views of the persistent (reselect [n] int32, sel_seq_lens [n] int32). Device ops only."""
        n = int(seq_lens.shape[0])
        if n > self.capacity:
            raise RuntimeError(f"retrieval decode: a decode batch of {n} rows exceeds the selection-reuse buffers "
                               f"({self.capacity} rows)")
        width = block_table.shape[1]
        seq = seq_lens.long()
        prev_len = self.prev_seq_len[:n]
        prev_col = ((prev_len - 1).clamp(min=0) // block_size).clamp(max=width - 1)
        then = torch.gather(block_table[:n], 1, prev_col.view(n, 1)).view(n).long()
        same = (then == self.prev_block[:n]) & (seq == prev_len + 1) & (prev_len > 0)
        keep = same & retrieval & (self.age[:n] + 1 < interval)
        cur_col = ((seq - 1).clamp(min=0) // block_size).clamp(max=width - 1)
        now = torch.gather(block_table[:n], 1, cur_col.view(n, 1)).view(n).long()
        self.prev_block[:n] = torch.where(retrieval, now, torch.full_like(now, -1))
        self.prev_block[n:] = -1  # rows past the batch did not decode in this step
        self.prev_seq_len[:n] = seq
        self.age[:n] = torch.where(keep, self.age[:n] + 1, torch.zeros_like(prev_len))
        self.reselect[:n] = (~keep).to(torch.int32)
        self.sel_seq_lens[:n] = torch.where(keep, self.sel_seq_lens[:n], seq.to(torch.int32))
        self.reused += keep.sum()
        self.reselected += (retrieval & ~keep).sum()
        return self.reselect[:n], self.sel_seq_lens[:n]

    def reset_counts(self) -> None:
        self.reused.zero_()
        self.reselected.zero_()


def counts() -> dict[str, int]:
    """Sequence-steps that reused / selected, summed over this process's trackers (a device read: metrics only)."""
    with _lock:
        trackers = list(_trackers)
    return {"reused_selection_steps": sum(int(t.reused) for t in trackers),
            "reselect_steps": sum(int(t.reselected) for t in trackers)}


def reset_counts() -> None:
    with _lock:
        trackers = list(_trackers)
    # The engine makes its trackers under inference mode (the metadata builder runs there): their tensors can only
    # be updated in place inside it, and a benchmark resets the counts from outside (collective_rpc).
    with torch.inference_mode():
        for t in trackers:
            t.reset_counts()


class SelectionStore:
    """One per layer: each row's last selection, [capacity, Hkv, slots] logical block indices (slots [0, budget)
    valid, ascending). Made on first use, which must be an eager step (never inside graph capture), out of the
    memory reserved before vLLM sized its cache (memory.py; the runner reserves it), else allocated."""

    def __init__(self) -> None:
        self.blocks: torch.Tensor | None = None

    def get(self, capacity: int, hkv: int, slots: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        b = self.blocks
        if b is None or b.shape != (capacity, hkv, slots) or b.device != device or b.dtype != dtype:
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("retrieval decode: the selection store was first needed inside CUDA-graph "
                                   "capture; it must be allocated in an eager warm-up step")
            raw = memory.carve_extra(capacity * hkv * slots * dtype.itemsize)
            if raw is not None and raw.device.type == torch.device(device).type and raw.numel():
                b = raw.view(dtype).view(capacity, hkv, slots).zero_()
            else:
                b = torch.zeros(capacity, hkv, slots, dtype=dtype, device=device)
            self.blocks = b
        return b


def reused_selection(stored: torch.Tensor, reselect: torch.Tensor, sel_seq_lens: torch.Tensor,
                     seq_lens: torch.Tensor, params, extra: int) -> Selection:
    """The torch reference of what a step reads: stored [N, Hkv, K] (the rows' stored selections, this step's fresh
    ones already written for rows with reselect 1) -> Selection [N, Hkv, K + extra]: slots [0, budget at
    sel_seq_len) from the store, then the blocks started since (sel_seq_len's block count .. this step's), invalid
    after (they hold the last block). A row with reselect 1 reads exactly its fresh selection."""
    N, H, K = stored.shape
    seq = seq_lens.long()
    sl0 = torch.where(reselect.bool(), seq, sel_seq_lens.long())
    nb0, budget0 = planner.device_budgets(params, sl0)
    budget0 = budget0.clamp(max=K)
    nb = (seq + params.block_size - 1) // params.block_size
    rank = torch.arange(K + extra, device=stored.device).view(1, 1, -1)
    b0, n0 = budget0.view(N, 1, 1), nb0.view(N, 1, 1)
    from_store = rank < b0
    new = (rank >= b0) & (rank < b0 + nb.view(N, 1, 1) - n0)
    kept = torch.gather(stored.long(), 2, rank.clamp(max=K - 1).expand(N, H, -1))
    blocks = torch.where(from_store, kept, n0 + rank - b0)
    valid = (from_store | new) & (seq.view(N, 1, 1) > 0)
    blocks = torch.where(valid, blocks, (nb.view(N, 1, 1) - 1).clamp(min=0).expand_as(blocks))
    return Selection(blocks, valid.expand(N, H, -1).clone())


def selected_counts(reselect: torch.Tensor, sel_seq_lens: torch.Tensor, seq_lens: torch.Tensor, params,
                    slots: int) -> torch.Tensor:
    """[N] blocks each row reads this step (``reused_selection``'s valid slots)."""
    seq = seq_lens.long()
    sl0 = torch.where(reselect.bool(), seq, sel_seq_lens.long())
    nb0, budget0 = planner.device_budgets(params, sl0)
    nb = (seq + params.block_size - 1) // params.block_size
    return budget0.clamp(max=slots) + nb - nb0

