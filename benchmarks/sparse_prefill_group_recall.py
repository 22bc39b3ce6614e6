"""Group-shared selection vs per-head selection: attention recall per head on a real model's Q/K (CPU is fine).

    python -m benchmarks.sparse_prefill_group_recall --tokens 4096 \\
        --out benchmarks/results/sparse_prefill_group_recall_smollm2_cpu.json

Captures the model's post-RoPE Q/K of a locally generated KV-retrieval prompt (search.capture_qk, transformers),
replays chunked prefill (search.evaluate_config) with each pattern config twice: every query head selecting its
own columns/diagonals/blocks (the default), and one selection per KV group from the group's summed votes
(``sparse_prefill.group_shared_selection``). Per config and mode: mean attention recall over (layer, head)
with n and a 95% interval (normal approximation over heads), the minimum, the share of heads >= 0.95, the
density computed per head, and the density of each group's union of keys (what a group kernel must compute:
for group-shared selection it equals the per-head density, for per-head selection it is larger).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
import time
from pathlib import Path


def summary(recall, density, union) -> dict:
    r = recall.flatten().double()
    n = r.numel()
    half = 1.96 * float(r.std()) / math.sqrt(n) if n > 1 else float("nan")
    return {"heads": n, "recall_mean": round(float(r.mean()), 4), "recall_ci95": [round(float(r.mean()) - half, 4),
            round(float(r.mean()) + half, 4)], "recall_min": round(float(r.min()), 4),
            "heads_recall_ge_095": round(float((r >= 0.95).double().mean()), 4),
            "density_mean": round(float(density.mean()), 4), "group_union_density_mean": round(float(union.mean()), 4),
            "recall_per_layer_head": [[round(float(x), 4) for x in row] for row in recall]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.sparse_prefill_group_recall", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder or kvplug model name (default: the default model)")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--chunk", type=int, default=1024, help="replay chunked prefill with this chunk size")
    ap.add_argument("--rows-per-chunk", type=int, default=256)
    ap.add_argument("--seed", type=int, default=123, help="prompt seed (the pattern search uses 0)")
    ap.add_argument("--configs", default='auto;{"vertical": 100, "slash": 256};{"vertical": 300, "slash": 512}',
                    help="';'-separated: 'auto' (the shipped per-head config for the model) or JSON budgets of a "
                         "uniform vertical_slash config")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="benchmarks/results/sparse_prefill_group_recall.json")
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoTokenizer

    from attention_backends.sparse_prefill import calibration, planner, search
    from attention_backends.sparse_prefill.head_config import HeadPattern, PatternConfig
    from attention_backends.sparse_prefill.index_options import IndexOptions
    from kvplug import models

    path = Path(args.model) if args.model and Path(args.model).is_dir() else models.prepare(args.model or models.DEFAULT_MODEL)
    tok = AutoTokenizer.from_pretrained(path)
    prompt, _ = calibration.kv_retrieval(lambda s: len(tok(s).input_ids), args.tokens, seed=args.seed)
    torch.manual_seed(0)
    t0 = time.monotonic()
    qs, ks, scale, T = search.capture_qk(str(path), prompt, args.device, max_tokens=args.tokens)
    report = {"model": path.name, "tokens": T, "q_heads": qs[0].shape[1], "kv_heads": ks[0].shape[1],
              "layers": len(qs), "chunk": args.chunk, "rows_per_chunk": args.rows_per_chunk, "seed": args.seed,
              "device": f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
              if args.device == "cpu" else torch.cuda.get_device_name(0),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": "python -m benchmarks.sparse_prefill_group_recall " + " ".join(argv if argv is not None else sys.argv[1:]),
              "configs": []}
    for setting in args.configs.split(";"):
        if setting.strip() == "auto":
            cfg = planner.pattern_config_for("auto", str(path), "vertical_slash", "{}")
            name = f"auto ({cfg.model or 'default'})"
        else:
            cfg = PatternConfig(default=HeadPattern(pattern="vertical_slash", budgets=json.loads(setting))).validate()
            name = f"vertical_slash {setting.strip()}"
        row = {"config": name}
        for mode, shared in (("per_head", False), ("group_shared", True)):
            recall, density, union = search.evaluate_config(
                qs, ks, scale, cfg, args.chunk, args.rows_per_chunk,
                index_options=IndexOptions(group_shared_selection=shared), union_density=True)
            row[mode] = summary(recall, density, union)
            s = row[mode]
            print(f"{name:45s} {mode:13s} recall {s['recall_mean']:.4f} (95% CI {s['recall_ci95'][0]:.4f}-"
                  f"{s['recall_ci95'][1]:.4f}, n={s['heads']}, min {s['recall_min']:.4f}, >=0.95: "
                  f"{s['heads_recall_ge_095']:.2f}) density {s['density_mean']:.4f} group union "
                  f"{s['group_union_density_mean']:.4f}", flush=True)
        report["configs"].append(row)
    report["seconds"] = round(time.monotonic() - t0, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
