"""xformers' memory-efficient attention as baseline columns of the sparse prefill kernel bench (issue 16).

xformers has no bias for our index (per-head vertical columns + diagonals); the closest it has is a causal
local window (`LowerTriangularFromBottomRightLocalAttentionMask`, the A-shape's band without its sink columns).
The bench times, per length, dense causal attention through xformers and, per budget row, that local window
sized to compute as many (query, key) pairs as our index does ("same pairs"): the cheapest structure those
pairs can have, so a lower bound for any xformers-based sparse prefill at that density, and its output beside
dense (what dropping the index's columns and far diagonals costs on the bench's synthetic Q/K).

Each xformers forward op is timed on its own (the dispatcher's choice is one of them): on CUDA, xformers
0.0.35 runs PyTorch's own kernels (`fa2F@<v>-pt`: torch's FlashAttention-2; `cutlassF-pt`: torch's CUTLASS
memory-efficient kernel) and its Triton split-K op (decode shapes only). Its `_C.so` (needs libcudart.so.12)
is not used by these ops: the load failing is recorded, not fatal.

The wheel: xformers 0.0.35 is pure Python + that optional `_C.so` (py39-none, 3.2 MB), `Requires-Dist:
torch>=2.10`, so it installs beside torch 2.11 with no network:

    python -m pip download --no-deps --only-binary=:all: --python-version 3.12 \\
        --platform manylinux_2_28_x86_64 xformers==0.0.35 -d .whl
    # on the GPU host (.whl carried):
    python3 -m pip install -q --no-index --no-deps --target /tmp/xformers-site .whl/xformers-0.0.35-*.whl
    PYTHONPATH=/tmp/xformers-site:$PWD python3 -m benchmarks.kernels.sparse_prefill_bench ...
"""
from __future__ import annotations

WHEEL = "xformers==0.0.35"  # the newest on the registry; 0.0.33-0.0.34 pin torch 2.9.1 / 2.10.0 exactly


def load():
    """(xformers.ops.fmha or None, info): info has the version and, where it is missing or partly broken, why."""
    try:
        import xformers
        from xformers.ops import fmha
    except Exception as exc:  # not installed, or an install that fails to import on this torch
        return None, {"missing": f"xformers is not importable: {type(exc).__name__}: {exc}"[:300]}
    info = {"version": getattr(xformers, "__version__", "?")}
    try:
        from xformers import _cpp_lib

        failed = _cpp_lib._cpp_library_load_exception
        if failed is not None:  # only its own CUDA ops (not the fmha ones timed here) need it
            cause = failed
            while cause.__cause__ or cause.__context__:  # the loader's own error (e.g. a missing libcudart)
                cause = cause.__cause__ or cause.__context__
            info["cpp_extension"] = f"not loaded: {type(cause).__name__}: {cause}"[:300]
        else:
            info["cpp_extension"] = "loaded"
    except Exception as exc:
        info["cpp_extension"] = f"unknown: {type(exc).__name__}: {exc}"[:200]
    return fmha, info


def forward_ops(fmha) -> dict:
    """The forward ops a prefill can use, by xformers' own name (e.g. fa2F@2.7.4-pt, cutlassF-pt)."""
    ops = {}
    for module in ("flash", "cutlass"):
        op = getattr(getattr(fmha, module, None), "FwOp", None)
        if op is not None:
            ops[op.NAME] = op
    return ops


def to_bmghk(q, k, v):
    """Our [n, Hq, d] queries and [L, Hkv, d] keys/values -> xformers' GQA layout [1, M, Hkv, group, d], K/V
    expanded along the group (stride 0, no copy). Query head h reads KV head h // group, as in our kernels."""
    n, Hq, d = q.shape
    L, Hkv, _ = k.shape
    g = Hq // Hkv
    q5 = q.reshape(1, n, Hkv, g, d)
    k5 = k.reshape(1, L, Hkv, 1, d).expand(1, L, Hkv, g, d)
    v5 = v.reshape(1, L, Hkv, 1, d).expand(1, L, Hkv, g, d)
    return q5, k5, v5


def from_bmghk(out5):
    """xformers' [1, n, Hkv, group, d] output -> our [n, Hq, d]."""
    _, n, Hkv, g, d = out5.shape
    return out5.reshape(n, Hkv * g, d)


def band_pairs(n: int, L: int, window: int) -> int:
    """(query, key) pairs a causal window of ``window`` keys computes for the last n query rows of L keys:
    row i (absolute position L - n + r) attends keys (i - window, i]. Per head."""
    total = 0
    first = L - n  # absolute position of the first row
    # rows at position p < window see p + 1 keys, the others see window keys
    short_end = min(window - 1, L - 1)  # last position that sees fewer than `window` keys
    if first <= short_end:
        a, b = first, short_end
        total += (a + 1 + b + 1) * (b - a + 1) // 2
        long_rows = n - (b - a + 1)
    else:
        long_rows = n
    return total + long_rows * window


def matched_window(n: int, L: int, pairs: float) -> int:
    """The smallest window whose band computes at least ``pairs`` pairs per head (1 <= window <= L)."""
    lo, hi = 1, L
    while lo < hi:
        mid = (lo + hi) // 2
        if band_pairs(n, L, mid) >= pairs:
            hi = mid
        else:
            lo = mid + 1
    return lo


def biases(fmha, window: int | None = None):
    """Dense causal, or the causal local window, both aligned to the last key (a later chunk's rows are the
    last rows of the sequence, as in our ChunkGeometry)."""
    ab = fmha.attn_bias
    if window is None:
        return ab.LowerTriangularFromBottomRightMask()
    return ab.LowerTriangularFromBottomRightLocalAttentionMask(window)


def why_refused(exc: Exception, limit: int = 400) -> str:
    """An op's failure, short: xformers' "not supported" message opens with the input shapes; keep its reasons
    (the part after "because:"), which is what says why."""
    msg = str(exc)
    head, sep, reasons = msg.partition("because:")
    text = f"{type(exc).__name__}: {' '.join(reasons.split()) if sep else msg}"
    return text[:limit]


def time_ops(fmha, q5, k5, v5, bias, scale, timing) -> dict:
    """Each forward op on these inputs: {"ms": {op: median ms}, "errors": {op: why}, "best": op or None}."""
    got, errors = {}, {}
    for name, op in forward_ops(fmha).items():
        try:
            got[name] = timing(lambda: fmha.memory_efficient_attention_forward(
                q5, k5, v5, attn_bias=bias, scale=scale, op=op))["median_ms"]
        except Exception as exc:  # not supported for this shape/bias/device (xformers says why), out of memory...
            errors[name] = why_refused(exc)
    return {"ms": got, "errors": errors, "best": min(got, key=got.get) if got else None}


def run_op(fmha, name, q5, k5, v5, bias, scale):
    """One op's output in our layout [n, Hq, d]."""
    return from_bmghk(fmha.memory_efficient_attention_forward(q5, k5, v5, attn_bias=bias, scale=scale,
                                                              op=forward_ops(fmha)[name]))


def band_reference(q, k, v, window: int, scale: float):
    """Torch reference of the causal local window (small L only: a dense [n, L] mask), [n, Hq, d] float."""
    import torch

    n, L = q.shape[0], k.shape[0]
    rows = torch.arange(L - n, L, device=q.device)[:, None]
    keys = torch.arange(L, device=q.device)[None, :]
    mask = (keys <= rows) & (keys > rows - window)
    qt, kt, vt = (x.float().transpose(0, 1)[None] for x in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1)


def rel_err(got, want) -> float:
    want = want.float()
    return float((got.float() - want).norm() / want.norm())


def dense_columns(fmha, q, k, v, n: int, L: int, scale: float, timing, dense=None) -> dict:
    """Per length: dense causal through xformers, each op, the best op's output against SDPA dense."""
    q5, k5, v5 = to_bmghk(q, k, v)
    t = time_ops(fmha, q5, k5, v5, biases(fmha), scale, timing)
    cols = {"xformers_dense_ops_ms": t["ms"]}
    if t["errors"]:
        cols["xformers_dense_errors"] = t["errors"]
    if t["best"]:
        cols["xformers_dense_op"], cols["xformers_dense_ms"] = t["best"], t["ms"][t["best"]]
        if dense is not None:
            cols["rel_err_xformers_dense_vs_sdpa"] = rel_err(run_op(fmha, t["best"], q5, k5, v5, biases(fmha), scale),
                                                             dense)
    return cols


REFERENCE_MAX_L = 8192  # above this the band reference's dense mask is too big to be worth it


def local_columns(fmha, q, k, v, n: int, L: int, density: float, scale: float, timing, dense=None) -> dict:
    """Per budget row: the causal local window computing the index's pairs ("same pairs"), each op; its output
    against dense (what dropping the index's columns/far diagonals costs) and, at small L, the band reference."""
    causal = band_pairs(n, L, L)  # all causal pairs of these rows, per head
    window = matched_window(n, L, density * causal)
    q5, k5, v5 = to_bmghk(q, k, v)
    bias = biases(fmha, window)
    t = time_ops(fmha, q5, k5, v5, bias, scale, timing)
    cols = {"xformers_local_window": window, "xformers_local_density": band_pairs(n, L, window) / causal,
            "xformers_local_ops_ms": t["ms"]}
    if t["errors"]:
        cols["xformers_local_errors"] = t["errors"]
    if t["best"]:
        cols["xformers_local_op"], cols["xformers_local_ms"] = t["best"], t["ms"][t["best"]]
        pairs = cols["xformers_local_density"] * causal * q.shape[1] / 1e9
        cols["xformers_local_ms_per_gpair"] = cols["xformers_local_ms"] / pairs
        out = run_op(fmha, t["best"], q5, k5, v5, bias, scale)
        if dense is not None:
            cols["rel_err_vs_dense_xformers_local"] = rel_err(out, dense)
        if L <= REFERENCE_MAX_L:
            cols["max_abs_err_xformers_local_vs_reference"] = float(
                (out.float() - band_reference(q, k, v, window, scale)).abs().max())
    return cols
