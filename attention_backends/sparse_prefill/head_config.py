"""Per-head pattern config: JSON (msgspec schema) mapping layer -> head -> pattern + budgets.

    {"model": "...", "num_layers": 30, "num_heads": 9,
     "default": {"pattern": "vertical_slash", "budgets": {"vertical": 1000, "slash": 1024}},
     "layers": {"0": {"0": {"pattern": "a_shape", "budgets": {"sink": 64, "window": 512}, "recall": 0.97}}}}

Heads not listed use ``default``. Pattern ``dense`` keeps a head dense. ``identity`` (model_identity.py) says
which model the config was searched on; ``calibration.tokens`` the length it was searched at.

Budget scaling with length: a config's budgets were validated (recall) on chunks of every length up to the
searched one, so they apply unchanged there. Beyond it a head's attention spreads over more keys, so the
budgets a pattern declares length-proportional (``SparsePattern.length_scaled``: vertical columns, slash
diagonals, top-k blocks; not A-shape's sink/window) grow with the context, keeping their fraction of it:
budget x L / searched_tokens, at most ``limit`` times the searched budget (config key
``sparse_prefill.budget_scale_limit``; 1 disables it), in quarter-octave steps so a process builds a bounded
set of layer plans. Configs without a searched length (the uniform default) are never scaled.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import msgspec
import torch

from attention_backends.sparse_prefill.index import RANGE_PAD, ChunkGeometry, SparseIndex, compact_columns
from attention_backends.sparse_prefill.index import window_ranges as widen_to_windows
from attention_backends.sparse_prefill.index_options import IndexOptions
from attention_backends.sparse_prefill.paged_keys import PagedKeys, key_heads, num_kv_heads
from attention_backends.sparse_prefill.patterns import registry
from attention_backends.sparse_prefill.model_identity import ModelIdentity
from attention_backends.sparse_prefill.patterns.base import PatternBudgetError


class HeadPattern(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pattern: str
    budgets: dict[str, int] = {}
    recall: float | None = None  # measured by `kvplug patterns search`, informative
    density: float | None = None


class PatternConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    default: HeadPattern = msgspec.field(default_factory=lambda: HeadPattern(pattern="vertical_slash"))
    layers: dict[int, dict[int, HeadPattern]] = {}
    model: str = ""
    num_layers: int | None = None
    num_heads: int | None = None
    calibration: dict[str, object] = {}
    identity: ModelIdentity | None = None  # the model it was searched on (looked up by pattern_config=auto)

    @property
    def searched_tokens(self) -> int | None:
        """The prompt length the search ran at (None: not searched, e.g. the uniform default)."""
        tokens = self.calibration.get("tokens")
        return tokens if isinstance(tokens, int) and tokens > 0 else None

    def validate(self, where: str = "") -> "PatternConfig":
        check_head(self.default, f"{where}default: ")
        for layer, heads in self.layers.items():
            if layer < 0 or (self.num_layers is not None and layer >= self.num_layers):
                raise PatternBudgetError(f"{where}layers.{layer}: layer index out of range (num_layers={self.num_layers})")
            for head, hp in heads.items():
                if head < 0 or (self.num_heads is not None and head >= self.num_heads):
                    raise PatternBudgetError(f"{where}layers.{layer}.{head}: head index out of range (num_heads={self.num_heads})")
                check_head(hp, f"{where}layers.{layer}.{head}: ")
        return self

    def head(self, layer: int, head: int) -> HeadPattern:
        return self.layers.get(layer, {}).get(head, self.default)

    def to_json(self) -> bytes:
        return msgspec.json.format(msgspec.json.encode(self), indent=1)


def check_head(hp: HeadPattern, where: str = "") -> None:
    if hp.pattern == registry.DENSE:
        if hp.budgets:
            raise PatternBudgetError(f"{where}pattern 'dense' takes no budgets")
        return
    registry.get(hp.pattern, where).check_budgets(hp.budgets, where)


def read_struct(path: str | Path, struct: type, error: type[Exception], what: str):
    """A JSON file decoded as ``struct``; ``error`` naming the file (and the field msgspec names) otherwise."""
    try:
        raw = Path(path).read_bytes()
    except OSError:
        raise error(f"{what} not found: {path}") from None
    try:
        return msgspec.json.decode(raw, type=struct)
    except msgspec.ValidationError as exc:
        raise error(f"{what} {path}: {exc}") from None
    except msgspec.DecodeError as exc:
        raise error(f"{what} {path} is not valid JSON: {exc}") from None


def load(path: str | Path) -> PatternConfig:
    return read_struct(path, PatternConfig, PatternBudgetError, "sparse prefill pattern config").validate(f"{path}: ")


def budget_scale(searched_tokens: int | None, seq_len: int, limit: float) -> float:
    """The factor a config's length-proportional budgets get for a chunk whose sequence holds ``seq_len``
    tokens (see the module doc): 1 up to the searched length, then L / searched, capped at ``limit``,
    rounded to quarter octaves."""
    if not searched_tokens or limit <= 1 or seq_len <= searched_tokens:
        return 1.0
    factor = min(seq_len / searched_tokens, limit)
    return min(2 ** (round(math.log2(factor) * 4) / 4), limit)


def scaled_budgets(pattern: str, budgets: dict[str, int], factor: float) -> dict[str, int]:
    """``budgets`` (complete, checked) of ``pattern`` with its length-proportional ones times ``factor``."""
    if factor == 1.0 or pattern == registry.DENSE:
        return budgets
    cls = registry.get(pattern)
    return {k: max(cls.budgets[k][1], round(v * factor)) if k in cls.length_scaled else v for k, v in budgets.items()}


@dataclass
class HeadGroup:
    pattern: str
    heads: torch.Tensor  # [h] query-head ids
    budgets: dict[str, torch.Tensor]  # name -> [h]
    budget_max: dict[str, int]  # name -> max over the heads, on the host


@dataclass
class LayerPlan:
    """How one layer's query heads are sparsified: heads grouped by pattern (budgets may differ per head)."""

    num_heads: int
    groups: list[HeadGroup]
    # per query head (pattern, budgets): which heads of a KV group select alike (group_uniform)
    head_specs: tuple[tuple[str, tuple[tuple[str, int], ...]], ...] = ()

    def group_uniform(self, group: int) -> bool:
        """Every KV group (``group`` consecutive query heads) uses one pattern and one set of budgets: a
        group-shared index is then the same for all its heads (the shared group kernel's condition). Host only."""
        specs = self.head_specs
        return bool(specs) and all(len(set(specs[g:g + group])) == 1 for g in range(0, len(specs), group))

    @classmethod
    def from_config(cls, cfg: PatternConfig, layer: int, num_heads: int, device=None,
                    budget_factor: float = 1.0) -> "LayerPlan":
        """``budget_factor``: what budget_scale() gives for the chunk's length (1 = budgets as in ``cfg``)."""
        by_pattern: dict[str, list[tuple[int, dict[str, int]]]] = {}
        specs = []
        for h in range(num_heads):
            hp = cfg.head(layer, h)
            budgets = {} if hp.pattern == registry.DENSE else registry.get(hp.pattern).check_budgets(hp.budgets)
            budgets = scaled_budgets(hp.pattern, budgets, budget_factor)
            by_pattern.setdefault(hp.pattern, []).append((h, budgets))
            specs.append((hp.pattern, tuple(sorted(budgets.items()))))
        groups = []
        # by pattern name, not first head: layers that differ only in which heads use which pattern then share
        # one compiled index build (compiled_index: the group order is part of the traced graph)
        for pattern, members in sorted(by_pattern.items()):
            heads = torch.tensor([h for h, _ in members], dtype=torch.int64, device=device)
            names = members[0][1].keys()
            budgets = {n: torch.tensor([b[n] for _, b in members], dtype=torch.int64, device=device) for n in names}
            budget_max = {n: max(b[n] for _, b in members) for n in names}
            groups.append(HeadGroup(pattern, heads, budgets, budget_max))
        return cls(num_heads, groups, tuple(specs))

    @classmethod
    def uniform(cls, pattern: str, num_heads: int, device=None, **budgets: int) -> "LayerPlan":
        cfg = PatternConfig(default=HeadPattern(pattern=pattern, budgets=budgets)).validate()
        return cls.from_config(cfg, 0, num_heads, device)


def build_index(q: torch.Tensor, k: torch.Tensor | PagedKeys, geom: ChunkGeometry, plan: LayerPlan, scale: float,
                options: IndexOptions = IndexOptions(), *, trim_columns: bool = True,
                window_ranges: bool = False) -> SparseIndex:
    """q [n, Hq, d] the chunk's queries, k [L, Hkv, d] the sequence's keys (or PagedKeys: left in the paged
    cache, what options.fused_estimate asks the caller for) -> one SparseIndex for all heads. ``options``
    (sparse_prefill keys, index_options.py): ``group_shared_selection``: heads of a KV group that share a pattern
    select the same keys from their summed votes (SparsePattern.select; what the shared group kernel needs).
    ``dense_tail_rows``: the chunk's last rows (whole query blocks) attend every causal key
    (SparseIndex.with_dense_tail). ``vertical_segment_rows``: vertical-slash picks columns per segment of that many
    rows (SparsePattern.select). ``compiled_index``: the same index through torch.compile (compiled_builder).
    ``exact_selection``: patterns rank by the exact attention mass of every row (SparsePattern.select; a
    diagnostic: built eager, compiled_index or not). ``gqa_shaped_estimate``: vertical-slash's torch estimate scores
    whole GQA groups against their KV head's keys in place, no per-head key copy (SparsePattern.select; the compiled
    graph is keyed on it like every field it reads). Per call site: ``trim_columns`` drops all-padding column
    slots (a host sync: CPU only; GPU kernels skip them by count). ``window_ranges``: key ranges widened to whole
    BLOCK-key windows (index.window_ranges; what vLLM's FA2 sparse kernel computes exactly:
    sparse_prefill.executor = fa2_sparse)."""
    build = _build_untrimmed
    if options.compiled_index and not options.exact_selection:
        build = compiled_builder()
        q, k = _fresh_inputs(q, k)
    index = build(q, k, geom, plan, scale, options, window_ranges)
    if trim_columns and index.cols.shape[-1]:
        index.cols = index.cols[..., :max(int(index.col_count.max()), 1)]
    return index


def _fresh_inputs(q: torch.Tensor, k: torch.Tensor | PagedKeys) -> tuple[torch.Tensor, torch.Tensor | PagedKeys]:
    """The compiled build's q and k as fresh contiguous tensors (k head-major, viewed [L, Hkv, d] as the callers
    pass it). Why: dynamo guards on its inputs' layout, not only their sizes: whether q is a view and of what
    (serving slices it out of vLLM's query, itself split out of the fused QKV), its storage offset (0 for a
    batch's first request), the layout the keys were gathered in (the paged cache's). A copy each (bandwidth
    only: ~0.2 ms per layer at 8K rows over 128K keys on the H100, 3% of the compiled build) makes every caller
    look alike, so the start-up warm-up's graphs serve every request (runner.warm_up_geometries)."""
    q = q.clone(memory_format=torch.contiguous_format)
    if isinstance(k, torch.Tensor):
        k = k.transpose(0, 1).clone(memory_format=torch.contiguous_format).transpose(0, 1)
    return q, k


_compiled_build = None  # one torch.compile'd _build_untrimmed per process (compiled_builder)
# Each distinct layer plan structure (pattern groups, budgets) and set of values of the IndexOptions fields the build
# reads is its own graph; dynamo's default limit (8 per function) would send a per-head config's later layers back to
# eager without a word.
RECOMPILE_LIMIT = 64
# Why the compiled build fell back to eager in this process (None: it did not); logged once, read by the bench.
compiled_fallback: str | None = None


def compiled_builder():
    """_build_untrimmed through torch.compile, created once per process. Why: the eager build issues ~250 small
    aten ops per layer call (~150 kernel launches on the GPU: launch-bound, a 2.5-6 ms floor per chunk and
    layer); inductor fuses their elementwise chains into a few kernels (Triton on CUDA, C++ on the CPU).
    dynamic=True: chunk and sequence lengths are symbolic, so a new length does not recompile (a few guards
    still do, e.g. two sizes that happen to be equal; RECOMPILE_LIMIT bounds them). The index is the eager one
    element for element (tests/attention_backends/sparse_prefill/test_head_config.py). It runs inside the
    attention impl, which vLLM calls as a custom op outside its own compiled graph. Should inductor fail to
    compile it, the build runs eager from then on (compiled_fallback says why): the index is the same."""
    global _compiled_build
    if _compiled_build is None:
        # cpp.simdlen=1: inductor's CPU vectorizer (torch 2.13) emits C++ that does not compile for some of the
        # build's masks (a VecMask<long> / VecMask<float> mix); CPU only, the CUDA (Triton) code is unaffected
        compiled = torch.compile(_build_untrimmed, dynamic=True, options={"cpp.simdlen": 1})

        def build(*args):
            global compiled_fallback
            if compiled_fallback is None:
                try:
                    with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
                        return compiled(*args)
                except (torch._dynamo.exc.BackendCompilerFailed, torch._inductor.exc.InductorError) as exc:
                    compiled_fallback = f"{type(exc).__name__}: {exc}"[:500]
                    logging.getLogger(__name__).warning(
                        "kvplug sparse prefill: compiled_index could not compile the index build; it runs eager "
                        "(the same index) from now on: %s", compiled_fallback)
            return _build_untrimmed(*args)

        _compiled_build = build
    return _compiled_build


def _build_untrimmed(q: torch.Tensor, k: torch.Tensor | PagedKeys, geom: ChunkGeometry, plan: LayerPlan,
                     scale: float, options: IndexOptions, window_ranges: bool) -> SparseIndex:
    """build_index without the column trim (a host sync, outside the compiled region)."""
    group_shared = options.group_shared_selection
    k_heads = key_heads(k)  # [Hkv, L, d] view: patterns pick each query head's KV head themselves
    Hq, Hkv = q.shape[1], num_kv_heads(k_heads)
    dev = q.device
    group = Hq // Hkv
    kv_of = torch.arange(Hq, device=dev) // group
    block_mask = torch.zeros(Hq, geom.nqb, geom.nkb, dtype=torch.bool, device=dev)
    verticals, ranged = [], []
    for g in plan.groups:
        if g.pattern == registry.DENSE:
            block_mask[g.heads] = geom.causal_blocks(dev)[None]
            continue
        # all heads: a view (an index copy of the whole chunk's queries costs ~1 GB of traffic at 128K)
        qh = q.transpose(0, 1) if g.heads.numel() == Hq else q[:, g.heads].transpose(0, 1)
        mask, cols, ranges = registry.get(g.pattern).select(qh, k_heads, kv_of[g.heads], geom, g.budgets,
                                                            g.budget_max, scale, group_shared=group_shared,
                                                            segment_rows=options.vertical_segment_rows,
                                                            exact=options.exact_selection,
                                                            gqa_kv_heads=_host_kv_heads(plan, g, group, options))
        block_mask[g.heads] = mask
        if cols is not None:
            verticals.append((g.heads, cols))
        if ranges is not None:
            ranged.append((g.heads, *ranges))
    index = SparseIndex(block_mask, block_mask.new_zeros((Hq, geom.nqb, 0), dtype=torch.int64),
                        torch.zeros(Hq, geom.nqb, dtype=torch.int64, device=dev))
    if ranged:
        width = max(r.shape[1] for _, r, _ in ranged)
        index.ranges = torch.full((Hq, width, 2), RANGE_PAD, dtype=torch.int64, device=dev)
        for heads, r, count in ranged:
            index.ranges[heads, :r.shape[1]] = r
            index.range_count[heads] = count
        if window_ranges:
            index.ranges, index.range_count = widen_to_windows(index.ranges, index.range_count)
        a, _ = geom.q_block_bounds(dev)
        index.range_first = torch.searchsorted(index.ranges[..., 1].contiguous(),
                                               (-a)[None, :].expand(Hq, -1).contiguous(), right=True)
    width = max([0] + [c.shape[-1] for _, c in verticals])
    # per query block where some pattern picked columns per segment (vertical_segment_rows), else per head
    per_block = any(c.dim() == 3 for _, c in verticals)
    all_cols = torch.full((Hq, geom.nqb, width) if per_block else (Hq, width), -1, dtype=torch.int64, device=dev)
    for heads, cols in verticals:
        if per_block and cols.dim() == 2:
            cols = cols[:, None, :].expand(-1, geom.nqb, -1)
        all_cols[heads, ..., :cols.shape[-1]] = cols
    if group_shared and group > 1 and plan.group_uniform(group):
        # every head of a group holds the same columns, blocks and ranges: compact once per group (the
        # [heads, query blocks, columns] sort is the index build's largest cost at long context)
        one = SparseIndex(block_mask[::group], block_mask.new_zeros((Hkv, geom.nqb, 0), dtype=torch.int64),
                          index.col_count[::group], index.ranges[::group], index.range_count[::group],
                          index.range_first[::group])
        cols, count = compact_columns(all_cols[::group], one.block_mask, geom, one if ranged else None)
        cols, count = cols.repeat_interleave(group, 0), count.repeat_interleave(group, 0)
    else:
        cols, count = compact_columns(all_cols, block_mask, geom, index if ranged else None)
    index.cols, index.col_count = cols, count
    return index.with_dense_tail(geom, options.dense_tail_rows)


def _host_kv_heads(plan: LayerPlan, g: HeadGroup, group: int, options: IndexOptions) -> tuple[int, ...] | None:
    """The KV head of each of ``g``'s heads, on the host (from the plan's per-head specs: no device sync, and a
    constant of the compiled graph), when options.gqa_shaped_estimate asks for it; else None."""
    if not options.gqa_shaped_estimate:
        return None
    heads = [h for h, (pattern, _) in enumerate(plan.head_specs) if pattern == g.pattern]
    if len(heads) != g.heads.shape[0]:  # a plan built without head_specs: the per-head gather
        return None
    return tuple(h // group for h in heads)
