"""IndexOptions: the sparse_prefill keys that say how each sparse chunk's index is built and attended, as one value.

Made once from the config (SparsePrefillConfig.index_options) and handed down as it is: runner -> build_index
(head_config) / sparse_prefill_paged (triton_kernels). Frozen, so hashable: the compiled index build (torch.compile)
takes it as a constant argument, guarding on the fields it reads, and the start-up warm-up keys on it. No torch
here: config.py validates through it.
"""
from __future__ import annotations

from dataclasses import dataclass

QUERY_BLOCK = 64  # index.BLOCK (index.py imports torch): vertical_segment_rows counts whole query blocks


@dataclass(frozen=True, kw_only=True)
class IndexOptions:
    """Field names and meanings are the sparse_prefill config keys' (config.py), defaults too; a bad value is a
    ValueError naming its field."""

    # one selection per KV group (SparsePattern.select) and, on CUDA, the shared group kernel where it applies
    group_shared_selection: bool = False
    # CUDA: vertical-slash estimates from the paged cache in place; the caller passes PagedKeys to build_index
    fused_estimate: bool = False
    # each chunk's last rows (whole query blocks) attend every causal key (SparseIndex.with_dense_tail)
    dense_tail_rows: int = 0
    # build the index through torch.compile (head_config.compiled_builder)
    compiled_index: bool = False
    # vertical-slash picks columns per segment of this many rows (0: the whole chunk)
    vertical_segment_rows: int = 0
    # a diagnostic: patterns rank by exact attention mass (built eager, compiled_index or not)
    exact_selection: bool = False
    # the FA2 executor gathers each chunk's K/V out of the paged cache by whole pages, one copy (fa2_sparse.gather_kv)
    fa2_whole_page_gather: bool = False
    # the torch vertical-slash estimate reads each KV head's keys in place per GQA group (no per-head copy of them)
    gqa_shaped_estimate: bool = False

    def __post_init__(self) -> None:
        # the config's checks (config.validate reports them under the section's path)
        if self.dense_tail_rows < 0:
            raise ValueError(f"dense_tail_rows must be >= 0 (0 = off), got {self.dense_tail_rows}")
        if self.vertical_segment_rows < 0 or self.vertical_segment_rows % QUERY_BLOCK:
            raise ValueError(f"vertical_segment_rows must be 0 (off) or a positive multiple of {QUERY_BLOCK} "
                             f"(whole query blocks), got {self.vertical_segment_rows}")
