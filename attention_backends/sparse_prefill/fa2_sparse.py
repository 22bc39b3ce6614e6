"""vLLM's FlashAttention-2 sparse kernel (``sparse_attn_varlen_func``) as an executor of our index.

Its format, read from vllm-project/flash-attention (csrc/flash_attn/src/flash_fwd_sparse_kernel.h, the same
since vLLM 0.26's pin): per (sequence, query head, 64-row query block counted from the chunk's first row)
``block_offset`` lists key positions o, each read as the 64 keys [o, o + 64), and ``column_index`` lists
single keys, read 64 per step. The kernel walks the offsets from the last one back and masks (causally,
bottom-right aligned: row i of an n-row chunk sees keys <= L - n + i, and key < L) only the LAST TWO offsets
and the last two column steps; every other window and column is computed whole. Nothing de-duplicates:
a key listed twice counts twice in the softmax.

So our index converts exactly when (fa2_index):
  * every window is 64 keys of the index: blocks (aligned, the last one may run past L: it sorts last),
    and key ranges exactly 64 wide, which build_index(window_ranges=True) makes (index.window_ranges);
  * at most two windows per query block hold keys some of its rows must not see, and they sort last
    (ascending offsets: windows reaching past the block's first row start above every other one);
  * a range cut by key 0 (only the first range of a query block can be) goes to the columns as the keys
    [0, t), which sort before every column (columns never fall inside a range), so the columns stay ascending
    and the ones that need the causal mask (above the block's first row: fewer than 64) fall in the last two
    steps;
  * a head holds blocks or ranges, not both, in any one query block (every pattern in patterns/ does; both would
    overlap); a dense-tail block (index.with_dense_tail) holds every causal block and no ranges or columns: at
    most two of its windows reach past its first row, and they sort last.

It reads K/V as contiguous varlen tensors, not the paged cache: gather_kv copies the sequence's keys and
values out of the cache, with zero rows past L for the windows that reach beyond it, the index build reusing the
keys. Two ways, the same rows (sparse_prefill.fa2_whole_page_gather):
  * per token (the default): token t read through (block, row) index pairs into a [L, Hkv, d] temporary, then
    transposed into head-major memory: two passes over the sequence's K and two over its V per layer and
    chunk, the first one 2-byte elements through advanced indexing (at::native index_elementwise_kernel);
  * whole pages: the sequence's blocks copied whole, [block_size, Hkv, d] each, token by token as
    FlashAttention's cache orders them (vLLM 0.26 packs K and V per token and head: 256-byte runs of K, then of
    V, at head_dim 128), in 8-byte words, into token-major memory, the kernel's native varlen layout; then the
    rows past L (the last block's tail: another sequence's or stale rows) zeroed. One pass.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from attention_backends.sparse_prefill.index import BLOCK, ChunkGeometry, SparseIndex

PAD_KEYS = 2 * BLOCK  # zero K/V rows after the sequence: windows of the last query block may reach past L
MASKED_STEPS = 2  # the kernel masks its last two window steps and last two column steps (Is_even_MN false)
RANGE_ONLY_PATTERNS = ("vertical_slash",)  # patterns whose heads hold no blocks (the conversion skips blocks)


def plan_has_blocks(plan, dense_tail_rows: int = 0) -> bool:
    """Whether a LayerPlan's heads may hold whole blocks (any pattern but the range-only ones, dense included;
    every head in its dense-tail blocks: sparse_prefill.dense_tail_rows)."""
    return dense_tail_rows > 0 or any(g.pattern not in RANGE_ONLY_PATTERNS for g in plan.groups)


def fa2_index(index: SparseIndex, geom: ChunkGeometry, with_blocks: bool = True
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Our index (ranges BLOCK-wide: build_index(window_ranges=True)) -> the kernel's (block_count [1, H, nqb],
    block_offset [1, H, nqb, S], column_count [1, H, nqb], column_index [1, H, nqb, V]) int32. Device ops only,
    no host sync. ``with_blocks`` False skips the block part (plan_has_blocks: no head holds blocks)."""
    H, nqb, nkb = index.block_mask.shape
    dev = index.block_mask.device
    a, _ = geom.q_block_bounds(dev)
    R = index.ranges.shape[1]
    straddle_end = torch.zeros(H, nqb, dtype=torch.int64, device=dev)  # t: keys [0, t) of a range cut by key 0
    windows = []  # (offsets [H, nqb, W] valid first, counts [H, nqb], heads it serves [H] bool or None)
    if R:
        starts, ends = index.ranges[..., 0], index.ranges[..., 1]
        first = index.range_first  # the first range with a key >= 0; only it can start below key 0
        f = first.clamp(max=R - 1)
        cut = (first < index.range_count[:, None]) & (a[None, :] + torch.gather(starts, 1, f) < 0)
        straddle_end = torch.where(cut, a[None, :] + torch.gather(ends, 1, f), straddle_end)
        j = (first + cut.long())[..., None] + torch.arange(R, device=dev)  # [H, nqb, R], ascending
        live = j < index.range_count[:, None, None]
        off = a[None, :, None] + torch.gather(starts, 1, j.clamp(max=R - 1).flatten(1)).view_as(j)
        # per (head, query block): ranges where it visits some (a dense-tail block takes its blocks instead)
        windows.append((torch.where(live, off, torch.zeros_like(off)), live.sum(-1), index.ranges_on()))
    if with_blocks:
        mask = index.block_mask
        slot = torch.where(mask, torch.cumsum(mask, -1) - 1, torch.full_like(mask, nkb, dtype=torch.int64))
        starts_kb = (torch.arange(nkb, device=dev) * BLOCK).expand(H, nqb, nkb)
        off = torch.zeros(H, nqb, nkb + 1, dtype=torch.int64, device=dev).scatter_(2, slot, starts_kb)[..., :nkb]
        windows.append((off, mask.sum(-1), None))
    if not windows:
        offsets, counts = torch.zeros(H, nqb, 1, dtype=torch.int64, device=dev), torch.zeros_like(straddle_end)
    elif len(windows) == 1:
        offsets, counts = windows[0][:2]
    else:  # ranges where a head has them, else its blocks (a head never holds both)
        (r_off, r_cnt, ranged), (b_off, b_cnt, _) = windows
        width = max(r_off.shape[-1], b_off.shape[-1])
        pad = lambda x: torch.nn.functional.pad(x, (0, width - x.shape[-1]))  # noqa: E731
        offsets = torch.where(ranged[..., None], pad(r_off), pad(b_off))
        counts = torch.where(ranged, r_cnt, b_cnt)
    C = index.cols.shape[-1]
    width = max(1, C + (BLOCK if R else 0))
    k = torch.arange(width, device=dev).expand(H, nqb, width)
    t = straddle_end[..., None]
    if C:
        cols = torch.gather(index.cols, 2, (k - t).clamp(0, C - 1)).clamp(min=0)
        column_index = torch.where(k < t, k, cols)
    else:
        column_index = k
    column_count = straddle_end + index.col_count
    return tuple(x.to(torch.int32)[None].contiguous() for x in (counts, offsets, column_count, column_index))


def fa2_sparse_reference(q, k, v, block_count, block_offset, column_count, column_index, cu_seqlens_q, cu_seqlens_k,
                         max_seqlen_q, max_seqlen_k, softmax_scale=None, causal=False, out=None, **_unused):
    """Torch model of sparse_attn_varlen_func's semantics (module docstring), same signature: masks only the last
    MASKED_STEPS windows and column steps, counts a repeated key twice, reads unmasked windows whole (one that
    runs past ``k`` is an IndexError here, garbage there). The oracle the conversion tests compare with; a
    stand-in kernel for the serving path's tests on the CPU. Slow: loops over heads and query blocks."""
    Hq, Hkv = q.shape[1], k.shape[1]
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    out = torch.empty_like(q) if out is None else out
    cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    steps = torch.arange(BLOCK)
    for b in range(len(cu_q) - 1):
        q0, Lq, k0, Lk = cu_q[b], cu_q[b + 1] - cu_q[b], cu_k[b], cu_k[b + 1] - cu_k[b]
        for h in range(Hq):
            kh = h // (Hq // Hkv)
            for m in range(-(-Lq // BLOCK)):
                rows = torch.arange(m * BLOCK, min(Lq, (m + 1) * BLOCK))
                nb, nc = int(block_count[b, h, m]), int(column_count[b, h, m])
                win = (block_offset[b, h, m, :nb].long()[:, None] + steps).flatten()
                win_masked = (torch.arange(nb) >= nb - MASKED_STEPS)[:, None].expand(nb, BLOCK).flatten()
                col = column_index[b, h, m, :nc].long()
                col_masked = torch.arange(nc) // BLOCK >= -(-nc // BLOCK) - MASKED_STEPS
                keys, masked = torch.cat([win, col]), torch.cat([win_masked, col_masked])
                if bool(((k0 + keys >= k.shape[0]) & ~masked).any()):
                    raise IndexError("an unmasked window or column reads past the keys")
                limit = (rows + 1 + Lk - Lq).clamp(max=Lk) if causal else torch.full_like(rows, Lk)
                seen = ~masked[None, :] | (keys[None, :] < limit[:, None])
                read = torch.where(k0 + keys < k.shape[0], k0 + keys, torch.zeros_like(keys))
                s = (q[q0 + rows, h].float() @ k[read, kh].float().T) * scale
                p = torch.softmax(s.masked_fill(~seen, float("-inf")), -1).nan_to_num(0.0)
                out[q0 + rows, h] = (p @ v[read, kh].float()).to(out.dtype)
    return out


@dataclass
class SequenceKV:
    """Per batch and chunk (the runner builds it on a batch's first layer, every layer reuses it): where the
    sequence's tokens live in the paged cache, and the kernel's varlen bounds. Device tensors, no host sync."""

    page: torch.Tensor  # [L] physical block of token t
    slot: torch.Tensor  # [L] its row in that block
    cu_seqlens_q: torch.Tensor  # [0, n] int32
    cu_seqlens_k: torch.Tensor  # [0, L] int32
    pages: torch.Tensor  # [ceil(L / block_size)] int64: the sequence's blocks in order (whole-page gather)

    @classmethod
    def build(cls, blocks: torch.Tensor, block_size: int, geom: ChunkGeometry) -> "SequenceKV":
        dev = blocks.device
        pos = torch.arange(geom.L, device=dev)
        bounds = [torch.zeros(2, dtype=torch.int32, device=dev) for _ in range(2)]
        for bound, n in zip(bounds, (geom.n, geom.L)):
            bound[1] = n  # a fill on the device: no host-to-device copy
        pages = blocks.long()[:-(-geom.L // block_size)]
        return cls(pages[pos // block_size], pos % block_size, *bounds, pages)


def gather_kv(cache: torch.Tensor, seq: SequenceKV, whole_pages: bool = False) -> torch.Tensor:
    """Paged [num_blocks, kv_heads, block_size, d] -> the sequence's [rows, kv_heads, d], rows >= L + PAD_KEYS,
    rows past L zero: what the kernel reads as varlen K or V; [:L] is what build_index takes. Per token (module
    doc): a view of head-major memory [kv_heads, L + PAD_KEYS, d]; ``whole_pages``: token-major memory, one copy."""
    if whole_pages:
        return _gather_whole_pages(cache, seq)
    L = seq.page.shape[0]
    Hkv, d = cache.shape[1], cache.shape[3]
    buf = torch.empty(Hkv, L + PAD_KEYS, d, dtype=cache.dtype, device=cache.device)
    buf[:, L:].zero_()
    buf[:, :L] = cache[seq.page, :, seq.slot].transpose(0, 1)
    return buf.transpose(0, 1)


def _gather_whole_pages(cache: torch.Tensor, seq: SequenceKV) -> torch.Tensor:
    """gather_kv by whole blocks: one index_select of the sequence's blocks into token-major [rows, Hkv, d]
    (viewed as 8-byte words where the layout allows: a quarter of the elements of a bf16 copy), then the rows
    past L zeroed (the last block's tail holds rows of no concern to this sequence, possibly non-finite: a masked
    window multiplies them by a zero probability)."""
    L, nb = seq.page.shape[0], seq.pages.shape[0]
    _, Hkv, bs, d = cache.shape
    rows = max(L + PAD_KEYS, nb * bs)
    buf = torch.empty(rows, Hkv, d, dtype=cache.dtype, device=cache.device)
    by_token = cache.transpose(1, 2)  # [num_blocks, bs, Hkv, d]: FlashAttention's memory order, a view
    dst = buf[:nb * bs].view(nb, bs, Hkv, d)
    src = by_token
    if _wide_words_ok(by_token):
        src, dst = by_token.view(torch.int64), dst.view(torch.int64)
    torch.index_select(src, 0, seq.pages, out=dst)
    buf[L:].zero_()
    return buf


def _wide_words_ok(x: torch.Tensor) -> bool:
    """x's innermost dim can be read as 8-byte words (contiguous, whole words, word-aligned storage offset)."""
    ratio = 8 // x.element_size() if x.element_size() in (1, 2, 4) else 0
    return (ratio > 1 and x.stride(-1) == 1 and x.shape[-1] % ratio == 0 and x.storage_offset() % ratio == 0
            and all(s % ratio == 0 for s in x.stride()[:-1]))


def attend(kernel, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: SparseIndex, geom: ChunkGeometry,
           scale: float, out: torch.Tensor, seq: SequenceKV, with_blocks: bool = True) -> torch.Tensor:
    """One chunk through ``kernel`` (sparse_attn_varlen_func or fa2_sparse_reference): q [n, Hq, d], k/v from
    gather_kv, ``index`` with BLOCK-wide ranges; writes ``out`` [n, Hq, d]."""
    block_count, block_offset, column_count, column_index = fa2_index(index, geom, with_blocks)
    kernel(q, k, v, block_count, block_offset, column_count, column_index, seq.cu_seqlens_q, seq.cu_seqlens_k,
           geom.n, geom.L, softmax_scale=scale, causal=True, out=out)
    return out
