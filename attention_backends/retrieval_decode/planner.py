"""Per-batch retrieval-decode plan, built once in the metadata builder and reused by every layer.

From host-side metadata only (query_start_loc_cpu, host seq lens): which requests decode by retrieval (one
query token, context >= min_context_tokens, more blocks than their budget), their budgets in blocks, and
the fixed number of selection slots ``k`` of this step. Every layer's forward then only scores, selects
and attends (``selection`` + a kernel) with these fixed shapes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from attention_backends.retrieval_decode import break_even


@dataclass(frozen=True)
class RetrievalParams:
    """The config section resolved for one KV-cache group (block size known)."""

    block_size: int
    budget_tokens: int
    budget_fraction: float
    sink_blocks: int
    recent_tokens: int
    min_context_tokens: int
    gqa_reduce: str = "max"
    dense_layers: int = 0
    # Who decodes the dense layers of a batch of retrieval decodes only: "backend" (the dense backend's own
    # kernel, exact and fastest) or "retrieval" (our kernels reading every block: a numerics control).
    dense_kernel: str = "backend"
    # "quest": the production selection (Triton on CUDA). Others: analysis selectors (retrieval_decode/analysis.py),
    # set only by benchmarks through backend_hooks.set_override.
    selector: str = "quest"
    # Two-level selection (config.py): blocks per group (1 = off) and candidates as a multiple of the budget.
    group_blocks: int = 1
    group_refine: float = 2.0
    # The exact-budget threshold in the select kernels: "bisect" (up to 32 halvings) or "radix" (4 histogram passes).
    select: str = "bisect"
    # Benchmarks only: also select with single-level Quest and the oracle (CPU path) and count the overlap (STATS).
    measure_agreement: bool = False
    # CUDA pure-decode graphs: sequences that decode densely take the dense backend's kernel (config.py).
    graph_dense_path: bool = False
    # Decode steps a selection serves (config.py; reuse.py): 1 = select every step.
    reselect_interval: int = 1

    @classmethod
    def from_config(cls, cfg: Any, block_size: int, device_name: str | None = None) -> "RetrievalParams":
        """``device_name``: the accelerator's name, for ``break_even="measured"`` (None: the min_context only)."""
        min_context = cfg.min_context_tokens
        if getattr(cfg, "break_even", "off") == "measured":
            min_context = break_even.min_context(device_name, cfg.group_blocks, min_context, cfg.select)
        return cls(block_size=block_size, budget_tokens=cfg.budget_tokens, budget_fraction=cfg.budget_fraction,
                   sink_blocks=cfg.sink_blocks, recent_tokens=cfg.recent_tokens,
                   min_context_tokens=min_context, gqa_reduce=cfg.gqa_reduce,
                   dense_layers=cfg.dense_layers, group_blocks=cfg.group_blocks, group_refine=cfg.group_refine,
                   select=cfg.select, graph_dense_path=cfg.graph_dense_path,
                   reselect_interval=getattr(cfg, "reselect_interval", 1))

    @classmethod
    def for_device(cls, cfg: Any, block_size: int, cuda: bool) -> "RetrievalParams":
        """``from_config`` with the break-even table's key resolved: the accelerator's name where
        ``break_even="measured"`` applies (CUDA), else None."""
        measured = cuda and cfg.break_even == "measured" and torch.cuda.is_available()
        return cls.from_config(cfg, block_size, torch.cuda.get_device_name() if measured else None)

    def candidate_groups(self, budget_blocks):
        """Two-level: groups the coarse pass keeps for a budget (int or tensor of blocks): an upper bound of the
        forced groups + enough unforced groups to hold group_refine x the budget, so the budget is always filled
        (the kernel computes the same in-kernel)."""
        g = self.group_blocks
        forced = -(-self.sink_blocks // g) + -(-self.recent_blocks // g) + 1
        need = budget_blocks * self.group_refine / g
        return forced + (torch.ceil(need).long() if isinstance(need, torch.Tensor) else math.ceil(need))

    @property
    def reuse_extra_blocks(self) -> int:
        """Blocks a reused selection reads beyond its stored slots: those started in the interval's later steps."""
        return -(-(self.reselect_interval - 1) // self.block_size)

    @property
    def recent_blocks(self) -> int:
        # Blocks that hold the last recent_tokens positions whatever the alignment: the current (partial)
        # block plus enough full blocks before it.
        return 1 + math.ceil(max(self.recent_tokens - 1, 0) / self.block_size)

    def budget_blocks(self, seq_lens: torch.Tensor) -> torch.Tensor:
        """[N] host int64: blocks each sequence may read (never fewer than sink + recent)."""
        bs = self.block_size
        if self.budget_fraction > 0:
            tokens = torch.ceil(seq_lens.double() * self.budget_fraction).long()
        else:
            tokens = torch.full_like(seq_lens, self.budget_tokens, dtype=torch.long)
        return torch.clamp((tokens + bs - 1) // bs, min=self.sink_blocks + self.recent_blocks)

    def max_budget_blocks(self, max_seq_len: int) -> int:
        """Slots for any batch up to max_seq_len (a fixed ``k`` for CUDA-graph capture)."""
        return int(self.budget_blocks(torch.tensor([max_seq_len]))[0])


@dataclass
class RetrievalPlan:
    req_ids: torch.Tensor  # [N] host int64: requests of the batch that decode by retrieval
    rows: torch.Tensor  # [N] device int64: their query token rows
    block_table: torch.Tensor  # [N, B] device: their block tables
    seq_lens: torch.Tensor  # [N] device
    num_blocks: torch.Tensor  # [N] device int64
    budget_blocks: torch.Tensor  # [N] device int64 (<= num_blocks)
    k: int  # selection slots this step (= max budget)
    params: RetrievalParams
    rest_req_ids: torch.Tensor  # host int64: every other request (dense / prefill path)
    rest_rows: torch.Tensor  # host int64: their token rows
    blocks_read: int  # sum over retrieval sequences of blocks read per kv-head (host, for metrics)
    blocks_total: int  # what dense decoding would have read
    budget_blocks_cpu: torch.Tensor = field(default=None)  # type: ignore[assignment]
    seq_lens_cpu: torch.Tensor = field(default=None)  # type: ignore[assignment]
    extra: dict = field(default_factory=dict)  # backend-specific per-batch data (e.g. CPU kernel metadata)
    rest_metadata: Any = None  # the dense backend's metadata of the other requests (None: there are none)
    rest_rows_dev: torch.Tensor | None = None  # rest_rows on the device
    reuse: Any = None  # reuse.ReuseRows: the rows' stored selections (reselect_interval > 1), else None

    @property
    def num_seqs(self) -> int:
        return int(self.req_ids.shape[0])


def plan(params: RetrievalParams, query_start_loc_cpu: torch.Tensor, seq_lens_cpu: torch.Tensor, num_reqs: int,
         block_table: torch.Tensor, num_tokens: int) -> RetrievalPlan | None:
    """The plan of one batch, or None when no request decodes by retrieval (all dense)."""
    qsl = query_start_loc_cpu[:num_reqs + 1].long()
    qlens = qsl[1:] - qsl[:-1]
    seq = seq_lens_cpu[:num_reqs].long()
    bs = params.block_size
    nblocks = (seq + bs - 1) // bs
    budget = params.budget_blocks(seq)
    eligible = (qlens == 1) & (seq >= params.min_context_tokens) & (budget < nblocks)
    if not bool(eligible.any()):
        return None
    req_ids = torch.nonzero(eligible).flatten()
    rest_req_ids = torch.nonzero(~eligible).flatten()
    token_rows = torch.arange(num_tokens)
    rest_mask = torch.ones(num_tokens, dtype=torch.bool)
    rest_mask[qsl[req_ids]] = False
    rest_rows = token_rows[rest_mask[:num_tokens]]
    rest_rows = rest_rows[rest_rows < int(qsl[-1])]  # padded tokens belong to nobody
    dev = block_table.device
    b = budget[req_ids]
    return RetrievalPlan(
        req_ids=req_ids, rows=qsl[req_ids].to(dev), block_table=block_table[req_ids.to(dev)],
        seq_lens=seq[req_ids].to(dev), num_blocks=nblocks[req_ids].to(dev), budget_blocks=b.to(dev),
        k=int(b.max()), params=params, rest_req_ids=rest_req_ids, rest_rows=rest_rows,
        blocks_read=int(b.sum()), blocks_total=int(nblocks[req_ids].sum()),
        budget_blocks_cpu=b, seq_lens_cpu=seq[req_ids])


def selected_tokens(plan_: RetrievalPlan, blocks: torch.Tensor | None = None) -> torch.Tensor:
    """[N] host: tokens each retrieval sequence attends: its budget of blocks, or ``blocks`` [N] of them (a
    reused selection: reuse.selected_counts); the last one is partial."""
    bs = plan_.params.block_size
    last = plan_.seq_lens_cpu - (plan_.seq_lens_cpu - 1) // bs * bs
    return ((plan_.budget_blocks_cpu if blocks is None else blocks) - 1) * bs + last


@dataclass
class DecodeGraphPlan:
    """CUDA, pure-decode batches: everything stays on the device, so the step can be captured and replayed in a
    full CUDA graph. ``seq_lens``/``block_table`` are the builder's persistent buffers (vLLM refills them in place
    before each replay); budgets are computed from them inside the graph; ``k`` is fixed for the engine's lifetime.

    Without the dense path every request takes the retrieval kernels: sequences below min_context_tokens (or
    within their budget) read all their blocks, which is exactly dense attention. With it (``dense_metadata`` set,
    params.graph_dense_path) both paths run on every row, each restricted by data: the dense backend's kernel gets
    ``dense_metadata`` (lengths 0 for the retrieval sequences: it reads nothing for them), the retrieval kernels
    get ``retrieval_seq_lens`` (0 for the dense sequences: every program of theirs returns at once, and their
    output rows are left as the dense kernel wrote them). Both length buffers are persistent too."""

    seq_lens: torch.Tensor  # [N] device (N = padded batch under graphs; padding rows have seq_len 0)
    block_table: torch.Tensor  # [N, B] device
    k: int
    params: RetrievalParams
    rest_metadata: Any = None  # a pure-decode batch has no other rows
    dense_metadata: Any = None  # the dense backend's metadata over dense_seq_lens (None: no dense path)
    retrieval_seq_lens: torch.Tensor | None = None  # [N] device: seq_lens of the retrieval rows, 0 elsewhere
    reuse: Any = None  # reuse.ReuseRows over rows 0..N-1 (reselect_interval > 1), else None


def graph_k(params: RetrievalParams, max_model_len: int) -> int:
    """Fixed selection slots: the largest budget any sequence can have, or min_context_tokens' blocks (those
    sequences read every block through the same slots), unless the dense path takes them (graph_dense_path)."""
    sparse = max(params.max_budget_blocks(max_model_len), params.sink_blocks + params.recent_blocks)
    if params.graph_dense_path:
        return sparse
    return max(sparse, -(-params.min_context_tokens // params.block_size))


def device_budgets(params: RetrievalParams, seq_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(num_blocks, budget_blocks) [N] int64 on the device, without a host sync."""
    bs = params.block_size
    seq = seq_lens.long()
    nb = (seq + bs - 1) // bs
    if params.budget_fraction > 0:
        tokens = torch.ceil(seq.double() * params.budget_fraction).long()
    else:
        tokens = torch.full_like(seq, params.budget_tokens)
    budget = torch.clamp((tokens + bs - 1) // bs, min=params.sink_blocks + params.recent_blocks)
    budget = torch.where(seq < params.min_context_tokens, nb, torch.minimum(budget, nb))
    return nb, budget


def retrieval_rows(params: RetrievalParams, seq_lens: torch.Tensor) -> torch.Tensor:
    """[N] bool on the device: the sequences that decode by retrieval (the kernels' rule, ``device_budgets``:
    budget < blocks, and at least min_context_tokens); every other one, padding rows included, decodes densely.
    A fixed token budget makes it one comparison (budget B blocks < ceil(len / bs) <=> len > B * bs)."""
    if params.budget_fraction > 0:
        nb, budget = device_budgets(params, seq_lens)
        return budget < nb
    budget = max(-(-params.budget_tokens // params.block_size), params.sink_blocks + params.recent_blocks)
    return seq_lens >= max(params.min_context_tokens, budget * params.block_size + 1)


def split_lengths(params: RetrievalParams, seq_lens: torch.Tensor, dense_out: torch.Tensor,
                  retrieval_out: torch.Tensor) -> None:
    """Write each sequence's length into exactly one of two per-step buffers (the other gets 0: both kernels read
    a 0 as "nothing to attend"): the dense path's and the retrieval path's. Device ops only, no host sync."""
    torch.mul(seq_lens, retrieval_rows(params, seq_lens), out=retrieval_out)
    torch.sub(seq_lens, retrieval_out, out=dense_out)
