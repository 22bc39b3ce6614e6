"""Offline per-head pattern search: `kvplug patterns search MODEL --out cfg.json`.

Runs the real model (transformers, CPU or GPU) on a locally generated calibration prompt (KV retrieval by
default; MInference's maintainers found one such sample enough), captures every layer's post-RoPE
queries and keys through a registered attention function, replays chunked prefill (each chunk builds
its index from its own queries, as the backend does) and picks for every head the cheapest candidate
(lowest measured density) whose attention recall reaches the target; heads no candidate satisfies stay
dense.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from attention_backends.sparse_prefill import calibration, model_identity
from attention_backends.sparse_prefill.head_config import HeadPattern, LayerPlan, PatternConfig, build_index
from attention_backends.sparse_prefill.index import BLOCK, ChunkGeometry
from attention_backends.sparse_prefill.index_options import IndexOptions
from attention_backends.sparse_prefill.patterns import registry
from attention_backends.sparse_prefill.reference import _gqa_keys
from kvplug import models

CAPTURE = "kvplug_capture"


def candidates() -> list[tuple[str, dict[str, int]]]:
    return [(p.name, dict(b)) for p in registry.PATTERNS.values() for b in p.search_candidates]


def capture_qk(model_path: str, prompt: str, device: str, max_tokens: int | None = None):
    """(q per layer [T, Hq, d], k per layer [T, Hkv, d], scale, token count) from one forward pass."""
    from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def capture(module, query, key, value, attention_mask, scaling=None, **kwargs):
        # query [b, Hq, T, d], key [b, Hkv, T, d], after RoPE: exactly what vLLM caches and attends.
        captured[module.layer_idx] = (query[0].transpose(0, 1).to(torch.float16).cpu(),
                                      key[0].transpose(0, 1).to(torch.float16).cpu())
        module.kvplug_scale = scaling
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)

    AttentionInterface.register(CAPTURE, capture)
    tok = AutoTokenizer.from_pretrained(model_path)
    ids = tok(prompt, return_tensors="pt").input_ids
    if max_tokens:
        ids = ids[:, -max_tokens:]
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, attn_implementation=CAPTURE).to(device)
    model.eval()
    with torch.no_grad():
        model.model(ids.to(device))  # the decoder stack only: no logits over the vocabulary
    layers = sorted(captured)
    scale = getattr(model.model.layers[0].self_attn, "kvplug_scale", None) or model.config.head_dim ** -0.5
    return [captured[i][0] for i in layers], [captured[i][1] for i in layers], float(scale), ids.shape[1]


def sample_rows(n: int, per_chunk: int, gen: torch.Generator) -> list[slice]:
    """Query-block-aligned row sample of a chunk: random blocks plus the last one (dense recall is O(rows * L))."""
    nqb = -(-n // BLOCK)
    if nqb * BLOCK <= per_chunk:
        return [slice(0, n)]
    picks = torch.randperm(nqb - 1, generator=gen)[:max(per_chunk // BLOCK - 1, 0)].tolist() + [nqb - 1]
    return [slice(b * BLOCK, min(n, b * BLOCK + BLOCK)) for b in sorted(picks)]


def prefill_chunks(q: torch.Tensor, k: torch.Tensor, chunk: int, rows_per_chunk: int, gen: torch.Generator):
    """The chunks of a chunked prefill over captured Q/K: (geometry, chunk queries, keys so far, sampled rows)."""
    T = q.shape[0]
    for start in range(0, T, chunk):
        end = min(T, start + chunk)
        rows = torch.cat([torch.arange(s.start, s.stop) for s in sample_rows(end - start, rows_per_chunk, gen)])
        yield ChunkGeometry(end - start, end), q[start:end].float(), k[:end].float(), rows.to(q.device)


def evaluate_layer(q: torch.Tensor, k: torch.Tensor, scale: float, chunk: int, rows_per_chunk: int,
                   cands: list[tuple[str, dict[str, int]]], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Recall and density [candidates, Hq] of one layer, averaged over the chunks of a chunked prefill."""
    Hq = q.shape[1]
    recall = torch.zeros(len(cands), Hq, dtype=torch.float64)
    computed = torch.zeros(len(cands), Hq, dtype=torch.float64)
    causal = 0
    weight = 0
    gen = torch.Generator().manual_seed(seed)
    for geom, qc, kc, rows in prefill_chunks(q, k, chunk, rows_per_chunk, gen):
        probs = dense_probs(qc, kc, geom, rows, scale)  # once per chunk, shared by every candidate
        causal += geom.causal_pairs()
        weight += len(rows)
        for ci, (name, budgets) in enumerate(cands):
            index = build_index(qc, kc, geom, LayerPlan.uniform(name, Hq, **budgets, device=q.device), scale,
                                trim_columns=q.device.type == "cpu")
            computed[ci] += index.computed_pairs(geom).double().cpu()
            recall[ci] += captured_mass(probs, index, rows, geom).sum(-1).double().cpu()
    return (recall / weight).float(), (computed / causal).float()


def dense_probs(q: torch.Tensor, k: torch.Tensor, geom: ChunkGeometry, rows: torch.Tensor, scale: float) -> torch.Tensor:
    """[Hq, R, L] causal softmax of the chunk's query rows ``rows`` over all L keys."""
    pos = geom.q_pos0 + rows
    causal = torch.arange(geom.L, device=q.device)[None, :] <= pos[:, None]
    s = torch.einsum("qhd,hkd->hqk", q[rows], _gqa_keys(k, q.shape[1])) * scale
    return torch.softmax(s.masked_fill(~causal[None], float("-inf")), dim=-1)


def captured_mass(probs: torch.Tensor, index, rows: torch.Tensor, geom: ChunkGeometry) -> torch.Tensor:
    """[Hq, R]: the part of each row's dense attention that the index computes (blocks, ranges, columns)."""
    return (probs * index.element_mask(geom, rows)).sum(-1)


def choose(recall: torch.Tensor, density: torch.Tensor, cands, target: float) -> list[HeadPattern]:
    """Per head: the lowest-density candidate with recall >= target, else dense."""
    out = []
    for h in range(recall.shape[1]):
        ok = [(float(density[c, h]), c) for c in range(len(cands)) if recall[c, h] >= target]
        if not ok:
            out.append(HeadPattern(pattern=registry.DENSE, recall=1.0, density=1.0))
            continue
        _, c = min(ok)
        out.append(HeadPattern(pattern=cands[c][0], budgets=cands[c][1], recall=round(float(recall[c, h]), 4),
                               density=round(float(density[c, h]), 4)))
    return out


def search(model_path: str, tokens: int, target: float, task: str, seed: int, chunk: int, rows_per_chunk: int,
           device: str, progress: bool = True, model_name: str = "") -> PatternConfig:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    prompt, _ = calibration.GENERATORS[task](lambda s: len(tok(s).input_ids), tokens, seed)
    t0 = time.monotonic()
    qs, ks, scale, T = capture_qk(model_path, prompt, device, max_tokens=tokens)
    # Score on the capture device: at 32K the per-candidate replay is hours on a CPU, minutes on a GPU.
    qs, ks = [q.to(device) for q in qs], [k.to(device) for k in ks]
    cands = candidates()
    layers: dict[int, dict[int, HeadPattern]] = {}
    from tqdm import tqdm

    bar = tqdm(total=len(qs), desc=f"pattern search ({T} tokens, {len(cands)} candidates)", unit="layer",
               disable=not progress, file=sys.stderr)
    recalls = []
    for li, (q, k) in enumerate(zip(qs, ks)):
        recall, density = evaluate_layer(q, k, scale, chunk, rows_per_chunk, cands, seed + li)
        layers[li] = dict(enumerate(choose(recall, density, cands, target)))
        recalls.extend(hp.recall for hp in layers[li].values())
        bar.set_postfix(recall=f"{sum(recalls) / len(recalls):.3f}")
        bar.update()
    bar.close()
    return PatternConfig(
        model=model_name or Path(model_path).name, num_layers=len(qs), num_heads=qs[0].shape[1],
        default=HeadPattern(pattern="vertical_slash", budgets={"vertical": 1000, "slash": 1024}),
        layers=layers, identity=model_identity.model_identity(model_path),
        calibration={"task": task, "tokens": T, "seed": seed, "target_recall": target, "chunk": chunk,
                     "rows_per_chunk": rows_per_chunk, "device": device,
                     "seconds": round(time.monotonic() - t0, 1)}).validate()


def summarize(cfg: PatternConfig) -> str:
    heads = [hp for layer in cfg.layers.values() for hp in layer.values()]
    counts: dict[str, int] = {}
    for hp in heads:
        counts[hp.pattern] = counts.get(hp.pattern, 0) + 1
    mean_recall = sum(hp.recall or 0 for hp in heads) / max(len(heads), 1)
    mean_density = sum(hp.density or 0 for hp in heads) / max(len(heads), 1)
    return (f"{len(heads)} heads: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
            + f"; mean recall {mean_recall:.4f}, mean density {mean_density:.4f} at the calibration length")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="kvplug patterns", description="sparse prefill pattern configs")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("search", help="find per-head patterns for a model on a local calibration prompt")
    s.add_argument("model", nargs="?", default=None, help="kvplug model name or HF folder (default: the default model)")
    s.add_argument("--out", required=True, help="JSON file to write")
    s.add_argument("--tokens", type=int, default=8192, help="calibration prompt length in tokens")
    s.add_argument("--target-recall", type=float, default=0.95)
    s.add_argument("--task", choices=sorted(calibration.GENERATORS), default="kv")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--chunk", type=int, default=4096, help="replay chunked prefill with this chunk size")
    s.add_argument("--rows-per-chunk", type=int, default=512, help="query rows sampled per chunk for recall")
    s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ns = p.parse_args(argv)
    try:
        path = Path(ns.model) if ns.model and Path(ns.model).is_dir() else models.prepare(ns.model or models.DEFAULT_MODEL)
    except models.ModelError as exc:
        print(f"kvplug patterns: {exc}", file=sys.stderr)
        return 2
    if not 0 < ns.target_recall <= 1:
        print(f"kvplug patterns: --target-recall must be in (0, 1], got {ns.target_recall}", file=sys.stderr)
        return 2
    if ns.tokens < 2 * BLOCK or ns.chunk < BLOCK:
        print(f"kvplug patterns: --tokens must be >= {2 * BLOCK} and --chunk >= {BLOCK}", file=sys.stderr)
        return 2
    cfg = search(str(path), ns.tokens, ns.target_recall, ns.task, ns.seed, ns.chunk, ns.rows_per_chunk, ns.device,
                 model_name=path.name)
    out = Path(ns.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_bytes(cfg.to_json())
    tmp.replace(out)  # atomic: a killed search never leaves a half-written config
    print(f"wrote {out}: {summarize(cfg)}")
    print(f"model identity: {cfg.identity.describe() if cfg.identity else 'unknown (no config.json)'}; to ship it, "
          "copy it to attention_backends/sparse_prefill/configs/ and run "
          "`python -m attention_backends.sparse_prefill.model_identity` (rewrites configs/index.json)")
    return 0


def evaluate_config(qs: list[torch.Tensor], ks: list[torch.Tensor], scale: float, cfg: PatternConfig, chunk: int,
                    rows_per_chunk: int, seed: int = 0, index_options: IndexOptions = IndexOptions(),
                    union_density: bool = False) -> tuple[torch.Tensor, ...]:
    """Recall and density [layers, heads] of a per-head config on captured Q/K, replaying chunked prefill.
    ``index_options``: how each chunk's index is built (build_index; e.g. group_shared_selection,
    vertical_segment_rows). ``union_density``: also the density of each group's union of keys per head (what a
    group kernel computes for the index; from element masks: small chunks only)."""
    unions = []
    recalls, densities = [], []
    for li, (q, k) in enumerate(zip(qs, ks)):
        plan = LayerPlan.from_config(cfg, li, q.shape[1], q.device)
        mass = torch.zeros(q.shape[1], dtype=torch.float64)
        computed = torch.zeros(q.shape[1], dtype=torch.float64)
        union = torch.zeros(q.shape[1], dtype=torch.float64)
        rows_total, causal = 0, 0
        gen = torch.Generator().manual_seed(seed + li)
        for geom, qc, kc, rows in prefill_chunks(q, k, chunk, rows_per_chunk, gen):
            index = build_index(qc, kc, geom, plan, scale, index_options, trim_columns=q.device.type == "cpu")
            mass += captured_mass(dense_probs(qc, kc, geom, rows, scale), index, rows, geom).sum(-1).double().cpu()
            computed += index.computed_pairs(geom).double().cpu()
            if union_density:
                group = q.shape[1] // k.shape[1]
                mask = index.dense_mask(geom)
                union += mask.view(k.shape[1], group, *mask.shape[1:]).any(1).sum(dim=(1, 2)).repeat_interleave(
                    group).double().cpu()
            rows_total += len(rows)
            causal += geom.causal_pairs()
        recalls.append((mass / rows_total).float())
        densities.append((computed / causal).float())
        unions.append((union / causal).float())
    if union_density:
        return torch.stack(recalls), torch.stack(densities), torch.stack(unions)
    return torch.stack(recalls), torch.stack(densities)
