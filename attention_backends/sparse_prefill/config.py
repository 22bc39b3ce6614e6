"""The ``sparse_prefill`` config section (kvplug/settings.py composes it into kvplug's config)."""
from __future__ import annotations

from dataclasses import fields
from typing import Literal

from attention_backends.sparse_prefill.index_options import IndexOptions
from kvplug.config import KvplugConfigError, Section

EXECUTORS = ("triton", "fa2_sparse", "auto")  # sparse_prefill.executor (fa2_sparse.py resolves it)


class SparsePrefillConfig(Section):
    """Dynamic sparse prefill (MInference patterns): attention_backends/sparse_prefill/."""

    enabled: bool = False
    # The floor: a prefill chunk whose sequence (cached context + chunk) holds fewer tokens is always dense.
    # Above it, with a cost table for this device (cost_table), a cost model decides per chunk: sparse only
    # when its predicted time (index build + kernel at the density the plan gives) beats dense attention by
    # cost_margin. Without a table every chunk above the floor goes sparse (the pre-cost-model rule).
    # null (default) = 8192 with a table (the H100 table never picks sparse below ~20K anyway), 32768 without
    # (on the H100 the index build alone cost more than dense attention below ~32K; BENCHMARKS.md).
    min_prompt_tokens: int | None = None
    # "auto" = the table shipped for this device (attention_backends/sparse_prefill/cost_tables/, matched
    # by device name; cpu.json on the CPU platform), a path to a table (`python -m
    # benchmarks.kernels.sparse_prefill_bench ... --cost-table FILE` measures one), or "none" (threshold rule).
    cost_table: str = "auto"
    # Sparse only when predicted dense time >= cost_margin x predicted sparse time. 1.2: the fitted table's
    # errors are up to ~25% on the index build at 4K (BENCHMARKS.md, "Sparse prefill").
    cost_margin: float = 1.2
    # Per-head pattern JSON (`kvplug patterns search` writes one); "auto" = the shipped config whose model
    # identity (architecture, layer/head counts, head dim, config.json hash; not the folder's name) is the
    # served model's, if there is one, else default_pattern on every head.
    pattern_config: str = "auto"
    default_pattern: str = "vertical_slash"
    # Budgets of default_pattern (omitted ones take the pattern's defaults).
    default_budgets: dict[str, int] = {}
    # Beyond the length a config was searched at, its length-proportional budgets (vertical, slash, top_k)
    # grow with the context, keeping their fraction of it, up to this many times the searched budget
    # (head_config.budget_scale). 1 = budgets exactly as searched.
    budget_scale_limit: float = 4.0
    # One selection per KV group: the query heads sharing a KV head rank columns/diagonals (vertical-slash) or
    # key blocks (block-sparse) by their summed votes, each keeping its own budget, so a group computes no
    # more distinct keys than its largest-budget head. On CUDA, where every group's heads share a pattern and
    # budgets, the shared group kernel then reads each K/V tile once per group and masks only diagonal and
    # edge tiles. Off by default until measured on the GPU (BENCHMARKS.md, "Sparse prefill").
    group_shared_selection: bool = False
    # CUDA: vertical-slash estimates straight from the paged cache (one Triton pass, keys gathered through the
    # block table, column/diagonal votes fused) instead of copying the sequence's keys out of the cache and
    # running the torch estimate. Same index up to float rounding. Off by default until measured.
    fused_estimate: bool = False
    # Which kernel attends a sparse chunk on CUDA: "auto" (the default: vLLM's FlashAttention-2
    # sparse_attn_varlen_func where it can run, else kvplug's Triton kernels; with the compiled index it is the
    # fastest end to end on the H100: BENCHMARKS.md, "Sparse prefill"), "fa2_sparse" (FA2 over the same index,
    # its key ranges widened to whole 64-key windows (fa2_sparse.py); needs vLLM's FA2 library, head_dim 128,
    # fp16/bf16; where it is missing the chunk runs "triton", logged once and counted) or "triton" (kvplug's
    # kernels). The cost model prices the executor that runs (a table's executors map; without one, Triton's
    # terms). The CPU path is torch.
    executor: str = "auto"
    # Every sparse chunk's last dense_tail_rows query rows (rounded up to whole 64-row query blocks) attend every
    # causal key, whatever their heads' patterns. Why: a prompt ends with its question, whose rows retrieval
    # heads use to look the answer up; sparse K/V there is what a sparse prefill loses answers through (issue 16:
    # the passkey answers lost on the H100 were first turns at 16K-24K). Cost: one or two query blocks x L keys
    # per chunk, under 1% of the causal pairs from 8K chunks on. Applied to every sparse chunk (only the
    # prompt's last one holds the question, but a chunk does not know it is the last, and the rest cost as
    # little). 0 = off (the default until measured: BENCHMARKS.md, "Sparse prefill").
    dense_tail_rows: int = 0
    # Vertical-slash picks each chunk's key columns from the chunk's last 64 rows and gives them to every row of
    # the chunk. With vertical_segment_rows > 0 (a multiple of 64) the chunk's rows are split into segments of
    # that many rows, each picking its own top columns from its own last 64 rows (diagonals stay chunk-wide).
    # Why: in a prompt's last chunk the last rows are the question; issue 16's lost 16K answers had the right
    # needle in the first chunk and the wrong one in the last, whose rows then attended the question's columns
    # (the right needle's). Cost: one 64-row estimate per segment (8K chunk, 1024 = 8 estimates instead of 1).
    # With fused_estimate (CUDA) segmented chunks use the torch estimate on keys gathered from the cache.
    # 0 = off (one segment: the whole chunk; the default until measured: BENCHMARKS.md, "Sparse prefill").
    vertical_segment_rows: int = 0
    # Build the sparse index (estimate + selection + bookkeeping) through torch.compile (dynamic shapes). Why: the
    # eager build issues ~250 small ops per layer call, host-launch-bound on the GPU (the 2.5-6 ms floor per chunk
    # and layer, BENCHMARKS.md); inductor fuses them into a few kernels. Same index element for element. The
    # compile (tens of seconds per graph on the H100) happens at engine start, when the metadata builder is built
    # (backend_hooks.warm_up: every distinct layer plan on synthetic chunks), so no request pays it; the cost model
    # then prices the compiled build (cost tables' executors.*.index_compiled). "auto" (the default): on CUDA for a
    # uniform pattern config (one layer plan, one graph set: 34 s at engine start on the H100), eager for a
    # per-head config (one graph set per distinct layer plan: minutes at start, not measured on the GPU yet) and
    # on the CPU (inductor's CPU compile: 412 s for SmolLM2's per-head config). true / false force it.
    compiled_index: bool | Literal["auto"] = "auto"
    # A diagnostic, not a serving mode: patterns rank their candidates by the exact attention mass of every query
    # row instead of their estimate, under the same budgets (vertical-slash: every row of the chunk, or of each
    # vertical_segment_rows segment, votes for columns and diagonals instead of its last 64; block-sparse: each
    # query block keeps the key blocks holding most of its rows' softmax mass instead of the top mean-pooled
    # scores). With vertical_segment_rows=64 every query block gets its own exact top columns and blocks. Why:
    # separates "the estimate picks the wrong keys" from "the budgets are too small" (issue 16's lost passkey
    # answers; BENCHMARKS.md, "Sparse prefill"). Cost: a dense attention pass per chunk on top of the sparse one.
    exact_selection: bool = False
    # The FA2 executor reads K/V as contiguous tensors, so every sparse chunk copies its sequence's K and V out of
    # the paged cache, in every layer. false (the default): per token, through (block, row) index pairs into a
    # temporary, then transposed head-major: two passes over K and two over V, the first a slow 2-byte gather
    # (2026-12-07 H100 profile of a 128K first turn: ~340 ms of copy kernels of 5.07 s TTFT). true: the
    # sequence's blocks copied whole, in 8-byte words, straight into the kernel's token-major layout, then the
    # rows past the sequence zeroed: one pass, half the bytes. The same K/V values, so the same output
    # (fa2_sparse.py); the kernel reads them token-major instead of head-major. Off until the H100 rows
    # (fa2_gather_pages_ms, fa2_serving_pages_ms) and end-to-end TTFT show it never loses (BENCHMARKS.md,
    # "Sparse prefill"); the cost model prices it by the table's fa2_sparse gather_pages term where it has one,
    # else as the per-token gather (an upper bound).
    fa2_whole_page_gather: bool = False
    # The torch vertical-slash estimate (what the compiled index build runs) scores the chunk's last 64 rows of each
    # query head against its KV head's keys. false (the default): the keys are gathered per query head, a
    # [8, keys, d] copy for every 8 query heads although a GQA group's heads share one KV head (2026-12-07 H100
    # profile of a 128K first turn: ~224 ms of 5.07 s TTFT). true: each step covers whole groups and multiplies the
    # group's rows at once with its KV head's keys, a view (one GEMM with group x 64 rows, no copy). The same
    # votes up to GEMM rounding, so a near-tie may select another key: off until the H100 rows
    # (fa2_index_gqa_ms, gqa_index_same) and end-to-end TTFT and the accuracy gate say (DEVELOPERS.md). The
    # fused_estimate Triton pass reads the paged cache in place (no copy either) and ignores this key.
    gqa_shaped_estimate: bool = False

    def compiles_index(self, platform: str = "cpu", per_head_config: bool = False) -> bool:
        """compiled_index resolved: "auto" compiles on CUDA for a uniform pattern config only (see the key)."""
        if self.compiled_index == "auto":
            return platform == "cuda" and not per_head_config
        return bool(self.compiled_index)

    def index_options(self, platform: str = "cpu", per_head_config: bool = False) -> IndexOptions:
        """The keys that shape each sparse chunk's index and kernel (each IndexOptions field is the key of its
        name; compiled_index resolved for ``platform`` and the pattern config: compiles_index), as the one value
        the runner hands down. A ValueError names a bad field."""
        values = {f.name: getattr(self, f.name) for f in fields(IndexOptions)}
        values["compiled_index"] = self.compiles_index(platform, per_head_config)
        return IndexOptions(**values)

    def validate(self, path: str) -> None:
        if self.executor not in EXECUTORS:
            raise KvplugConfigError(f"{path}.executor must be one of {', '.join(EXECUTORS)}, got {self.executor!r}")
        if self.min_prompt_tokens is not None and self.min_prompt_tokens < 1:
            raise KvplugConfigError(f"{path}.min_prompt_tokens must be >= 1 (or null for the default), "
                                    f"got {self.min_prompt_tokens}")
        try:
            self.index_options()
        except ValueError as exc:  # names the field: dense_tail_rows, vertical_segment_rows
            raise KvplugConfigError(f"{path}.{exc}") from None
        if not self.cost_margin > 0:
            raise KvplugConfigError(f"{path}.cost_margin must be > 0, got {self.cost_margin}")
        if not self.budget_scale_limit >= 1:
            raise KvplugConfigError(f"{path}.budget_scale_limit must be >= 1 (1 = no scaling), got {self.budget_scale_limit}")
        if self.cost_table not in ("auto", "none"):
            from attention_backends.sparse_prefill.cost_model import CostTableError, load_table  # msgspec only

            try:
                load_table(self.cost_table)
            except CostTableError as exc:
                raise KvplugConfigError(f"{path}.cost_table: {exc}") from None
        if (self.pattern_config, self.default_pattern, self.default_budgets) == ("auto", "vertical_slash", {}):
            return  # defaults are valid; skip importing the pattern registry (it pulls in torch)
        from attention_backends.sparse_prefill import head_config  # optional: torch, only for non-defaults
        from attention_backends.sparse_prefill.patterns.base import PatternBudgetError

        try:
            head_config.check_head(head_config.HeadPattern(pattern=self.default_pattern, budgets=self.default_budgets))
        except PatternBudgetError as exc:
            key = "default_pattern" if "unknown sparse prefill pattern" in str(exc) else "default_budgets"
            raise KvplugConfigError(f"{path}.{key}: {exc}") from None
        if self.pattern_config != "auto":
            try:
                head_config.load(self.pattern_config)
            except PatternBudgetError as exc:
                raise KvplugConfigError(f"{path}.pattern_config: {exc}") from None
