"""The measured break-even context of retrieval decoding, per device (``retrieval_decode.break_even="measured"``).

Below the context where one sparse layer's decode step (summary update + score + select + attend) costs as much as
dense attention, retrieval decoding only slows the token down: such sequences decode densely. The crossover comes
from ``benchmarks/kernels/retrieval_decode_bench.py --write-break-even`` (batch 1, vLLM's table width, a sweep
of contexts), stored in ``break_even.json`` beside this file as {device name: {variant key: {"context_tokens": N,
...}}}, the variant key naming what the production step runs ("group_blocks=4", "group_blocks=1,select=radix").
A device or variant not in the table keeps the configured ``min_context_tokens`` (logged once).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

TABLE_PATH = Path(__file__).with_name("break_even.json")
log = logging.getLogger("vllm.kvplug.retrieval_decode")
_warned: set = set()


def variant_key(group_blocks: int, select: str = "bisect") -> str:
    return f"group_blocks={group_blocks}" + ("" if select == "bisect" else f",select={select}")


def load(path: Path = TABLE_PATH) -> dict:
    if not path.exists():
        return {}
    table = json.loads(path.read_text())
    return table.get("devices", {})


def min_context(device_name: str | None, group_blocks: int, configured: int, select: str = "bisect",
                path: Path = TABLE_PATH) -> int:
    """max(configured, the measured crossover of this device and variant); ``configured`` when unmeasured."""
    key = variant_key(group_blocks, select)
    entry = load(path).get(device_name or "", {}).get(key)
    if entry is None:
        if (device_name, key) not in _warned:
            _warned.add((device_name, key))
            log.info("retrieval decode: no measured break-even context for %r (%s) in %s; min_context_tokens=%d "
                     "applies", device_name, key, path.name, configured)
        return configured
    return max(configured, int(entry["context_tokens"]))


def crossover(points: list[tuple[int, float, float]]) -> int | None:
    """Context where sparse becomes cheaper than dense, from (context, sparse ms, dense ms) sorted by context:
    linear interpolation of (dense - sparse) between the last losing and the first winning point that stays
    winning; the smallest context if sparse already wins there, None if it never wins."""
    pts = sorted(points)
    win = [d > s for _, s, d in pts]
    if not any(win) or not win[-1]:
        return None
    i = len(pts) - 1
    while i > 0 and win[i - 1]:
        i -= 1
    if i == 0:
        return int(pts[0][0])
    (c0, s0, d0), (c1, s1, d1) = pts[i - 1], pts[i]
    m0, m1 = d0 - s0, d1 - s1  # m0 <= 0 < m1
    return int(round(c0 + (c1 - c0) * (-m0) / (m1 - m0)))


def write(device_name: str, group_blocks: int, context_tokens: int | None, source: dict, select: str = "bisect",
          path: Path = TABLE_PATH) -> None:
    """Record (or, with None, drop: sparse never won) one device/variant's crossover."""
    data = json.loads(path.read_text()) if path.exists() else {}
    devices = data.setdefault("devices", {})
    dev = devices.setdefault(device_name, {})
    if context_tokens is None:
        # Sparse never beat dense in the sweep: decode densely up to the longest context measured.
        context_tokens = int(max(p[0] for p in source["points"])) + 1
    dev[variant_key(group_blocks, select)] = {"context_tokens": int(context_tokens), **source}
    data["about"] = ("Break-even contexts of retrieval decoding (attention_backends/retrieval_decode/break_even.py); "
                     "written by benchmarks/kernels/retrieval_decode_bench.py --write-break-even")
    path.write_text(json.dumps(data, indent=1) + "\n")
