"""The ``retrieval_decode`` config section (kvplug/settings.py composes it into kvplug's config)."""
from __future__ import annotations

from kvplug.config import KvplugConfigError, Section


class RetrievalDecodeConfig(Section):
    """Retrieval-based (Quest-style) sparse decoding: attention_backends/retrieval_decode/."""

    enabled: bool = False
    # Tokens of KV each decode token reads per kv-head (whole blocks, sink and recent window included).
    budget_tokens: int = 2048
    # If > 0, the budget is this fraction of each sequence's context instead of budget_tokens.
    budget_fraction: float = 0.0
    # Leading blocks always read (attention sinks).
    sink_blocks: int = 1
    # The most recent tokens always read (the current block is always read).
    recent_tokens: int = 256
    # Sequences shorter than this, or not longer than their budget, decode densely.
    min_context_tokens: int = 4096
    # GQA: a kv-head's blocks are ranked by the "max" (or "sum") of its query heads' Quest bounds.
    gqa_reduce: str = "max"
    # The first layers attend broadly (Quest keeps its first two dense): they decode densely.
    dense_layers: int = 2
    # Two-level selection: 1 = every block's summary is scored each step (Quest). N > 1: one summary per group of
    # N consecutive blocks (64 tokens at N=4, block 16) is scored first; the best groups' blocks, group_refine x
    # the budget of them (plus the forced groups), are then scored per block and the budget picked among them.
    # Cuts the summary scan ~N x (it dominates at 16 x 32K); on CUDA it costs a second summary tensor.
    group_blocks: int = 1
    group_refine: float = 2.0
    # How the select kernels find each sequence's budget-th best score on CUDA: "bisect" (dependent halvings of
    # the key range, early exit) or "radix" (4 histogram passes over 8-bit digits); the same blocks either way.
    select: str = "bisect"
    # "measured": sequences shorter than the break-even context of this device (break_even.json, written by
    # benchmarks/kernels/retrieval_decode_bench.py --write-break-even) decode densely too; "off": only
    # min_context_tokens applies. The larger of the two wins.
    break_even: str = "off"
    # CUDA, pure-decode batches (one full CUDA graph, fixed at capture): true = sequences that decode densely
    # (below the min_context above, or within their budget) go to the dense backend's own kernel inside the same
    # graph, beside the retrieval kernels for the others (each path masked by per-step lengths, no branch);
    # false = they read every block through the retrieval kernels. Off until measured end to end on the GPU.
    graph_dense_path: bool = False
    # Selection reuse across decode steps: 1 = score and select every step (Quest). N > 1: a sequence scores and
    # selects on every N-th decode step (and whenever its batch row changed hands, after a prefill, a preemption or
    # a batch with a prefill chunk in it); in between every (layer, kv-head) reads its last selection plus the
    # blocks started since (so the sink and the recent window stay covered). Cuts the score + select cost ~N x;
    # costs an int32 [max batch, kv heads, k] selection store per layer, reserved with the summaries. Default 8, the
    # largest interval measured to keep the answers and pay (H100, 2026-12-07: identical to dense on 108 Qwen
    # passkey questions at 8-24K at intervals 4 and 8; TPOT 7.11 vs 7.38 ms at 32K; BENCHMARKS.md "Selection reuse").
    reselect_interval: int = 8
    # CUDA, FlashAttention with the KV cache in the model's dtype (kv_cache_dtype "auto"): true = one Triton launch
    # per layer and step writes the new keys and values into the paged cache and folds the keys into the block
    # summaries (the bytes of vLLM's reshape_and_cache_flash followed by the summary update, one launch fewer);
    # false = those two launches. fp8 KV caches, the CPU and other layouts always take the two launches.
    fused_kv_write: bool = True

    def validate(self, path: str) -> None:
        if self.budget_tokens < 1:
            raise KvplugConfigError(f"{path}.budget_tokens must be >= 1, got {self.budget_tokens}")
        if not 0.0 <= self.budget_fraction <= 1.0:
            raise KvplugConfigError(f"{path}.budget_fraction must be in [0, 1], got {self.budget_fraction}")
        if self.sink_blocks < 0:
            raise KvplugConfigError(f"{path}.sink_blocks must be >= 0, got {self.sink_blocks}")
        if self.recent_tokens < 1:
            raise KvplugConfigError(f"{path}.recent_tokens must be >= 1 (the current block), got {self.recent_tokens}")
        if self.min_context_tokens < 0:
            raise KvplugConfigError(f"{path}.min_context_tokens must be >= 0, got {self.min_context_tokens}")
        if self.dense_layers < 0:
            raise KvplugConfigError(f"{path}.dense_layers must be >= 0, got {self.dense_layers}")
        if self.group_blocks < 1 or self.group_blocks & (self.group_blocks - 1):
            raise KvplugConfigError(f"{path}.group_blocks must be a power of two >= 1, got {self.group_blocks}")
        if self.group_refine < 1.0:
            raise KvplugConfigError(f"{path}.group_refine must be >= 1 (candidates cover the budget), "
                                    f"got {self.group_refine}")
        if self.reselect_interval < 1:
            raise KvplugConfigError(f"{path}.reselect_interval must be >= 1 (1 = select every step), "
                                    f"got {self.reselect_interval}")
        if self.select not in ("bisect", "radix"):
            raise KvplugConfigError(f"{path}.select must be 'bisect' or 'radix', got {self.select!r}")
        if self.break_even not in ("off", "measured"):
            raise KvplugConfigError(f"{path}.break_even must be 'off' or 'measured', got {self.break_even!r}")
        if self.gqa_reduce not in ("max", "sum"):
            raise KvplugConfigError(f"{path}.gqa_reduce must be 'max' or 'sum', got {self.gqa_reduce!r}")
        if self.budget_fraction == 0.0 and self.budget_tokens < self.recent_tokens:
            raise KvplugConfigError(f"{path}.budget_tokens ({self.budget_tokens}) must be >= "
                                    f"{path}.recent_tokens ({self.recent_tokens}): the window is part of the budget")
