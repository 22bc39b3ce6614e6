"""Top-level aten ops of one sparse index build (head_config.build_index), eager vs torch.compile'd
(sparse_prefill.compiled_index), counted with the torch profiler on the CPU. A count, not a time: each top-level
op is at least one kernel launch on the GPU, where the eager build is launch-bound (issue 16). On the CPU the
compiled build's fused kernels are C++ and not aten ops; on CUDA they are Triton launches on top of this count.

    python -m benchmarks.kernels.sparse_prefill_index_ops --out benchmarks/results/sparse_prefill_index_ops_cpu.json
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import platform
import sys
import time


def count_ops(fn) -> tuple[int, list]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    ops = [e.name for e in prof.events() if e.name.startswith("aten::") and (
        e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]
    return len(ops), collections.Counter(ops).most_common(8)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="8192x32768,4096x20000", help="chunk rows x keys, comma-separated")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--budgets", default='{"vertical": 1000, "slash": 1024}')
    p.add_argument("--out", default="benchmarks/results/sparse_prefill_index_ops_cpu.json")
    args = p.parse_args(argv)
    import torch

    from attention_backends.sparse_prefill import head_config
    from attention_backends.sparse_prefill.head_config import LayerPlan, build_index
    from attention_backends.sparse_prefill.index import ChunkGeometry
    from attention_backends.sparse_prefill.index_options import IndexOptions

    Hq, Hkv, d = args.heads, args.kv_heads, args.head_dim
    plan = LayerPlan.uniform("vertical_slash", Hq, **json.loads(args.budgets))
    rows = []
    for shape in args.shapes.split(","):
        n, L = (int(x) for x in shape.split("x"))
        q = torch.randn(n, Hq, d, dtype=torch.bfloat16)
        k = torch.randn(L, Hkv, d, dtype=torch.bfloat16)
        geom = ChunkGeometry(n, L)
        for group_shared in (False, True):
            built = {}
            for compiled in (False, True):
                def build():  # as the fa2_sparse executor builds it
                    options = IndexOptions(group_shared_selection=group_shared, compiled_index=compiled)
                    return build_index(q, k, geom, plan, d ** -0.5, options, trim_columns=False, window_ranges=True)

                start = time.perf_counter()
                built[compiled] = build()  # the compile (once per process; a new length reuses it)
                first = time.perf_counter() - start
                total, common = count_ops(build)
                rows.append({"n": n, "L": L, "group_shared": group_shared, "compiled": compiled,
                             "top_level_aten_ops": total, "first_call_s": round(first, 2), "most_common": common})
                print(rows[-1], flush=True)
            rows[-1]["same_index_as_eager"] = all(torch.equal(getattr(built[True], f), getattr(built[False], f))
                                                  for f in ("block_mask", "cols", "col_count", "ranges",
                                                            "range_count", "range_first"))
    out = {"command": "python -m benchmarks.kernels.sparse_prefill_index_ops " + " ".join(argv or sys.argv[1:]),
           "device": f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)", "torch": torch.__version__,
           "date": datetime.date.today().isoformat(), "shape": {"heads": Hq, "kv_heads": Hkv, "head_dim": d},
           "budgets": json.loads(args.budgets), "compiled_fallback": head_config.compiled_fallback, "rows": rows}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
