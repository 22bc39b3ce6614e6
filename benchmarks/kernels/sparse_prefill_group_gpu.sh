#!/usr/bin/env bash
# One device call (plain torch + Triton, no vLLM; ~3-4 min on an H100): the sparse-prefill kernel GPU tests
# (compiled), a small-shape check against the torch reference, then at long context, per length:
#   * per-head kernel and group kernel on the per-head index (the 2026-12-06 baseline),
#   * group-shared selection (one set of keys per KV group, summed votes, same budgets) and the shared group
#     kernel on it (K/V read once per group, masks only on diagonal/edge tiles), best of SHARED_CONFIGS,
#   * the index build as serving does it (copy K out of the paged cache + torch estimate) vs the fused
#     paged-cache estimate, against SDPA dense (torch's flash backend; FA3 needs vLLM).
# Run from the repo root on the GPU machine with the wheels in .whl (msgspec, pytest) carried:
#   bash benchmarks/kernels/sparse_prefill_group_gpu.sh
# Writes benchmarks/results/sparse_prefill_group_shared_h100.json (+ check JSON and logs; copies under $OUT).
# Env: LENGTHS, GROUP_CONFIGS, OLD_CONFIGS, SOLO_CONFIGS, SHARED_CONFIGS, UNION=1, SKIP_TESTS=1, PYTEST_K,
#      RESULT (the JSON path), BENCH_ARGS.
set -o pipefail
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
export PYTHONPATH="$PWD:$PYTHONPATH" PYTHONUNBUFFERED=1
GC="${GROUP_CONFIGS:-32x64x4x2}"
SC="${SHARED_CONFIGS:-32x8x2,32x4x2,16x4x2,32x4x3}"
LENGTHS="${LENGTHS:-32768,65536,131072}"
RESULT="${RESULT:-benchmarks/results/sparse_prefill_group_shared_h100.json}"
EXTRA=(--group-shared --shared-configs "$SC" --fused-estimate)
[ -n "$UNION" ] && EXTRA+=(--union)
[ -n "$SOLO_CONFIGS" ] && EXTRA+=(--solo-configs "$SOLO_CONFIGS")
date -u; nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0))"
if [ -z "$SKIP_TESTS" ]; then
  TRITON_INTERPRET=0 timeout 240 python3 -m pytest -q -x --noconftest -p no:cacheprovider \
    -k "${PYTEST_K:-shared or paged or chunk_path or compact}" \
    tests/attention_backends/sparse_prefill/test_triton_kernels.py 2>&1 | tee "$OUT/pytest.log" | tail -4
fi
mkdir -p "$(dirname "$RESULT")"
CHECK="${RESULT%.json}_check4k.json"
python3 -m benchmarks.kernels.sparse_prefill_bench --lengths 4096 --check --skip-flex --iters 3 --warmup 1 \
  --budgets '{"vertical": 100, "slash": 128}' --group-configs "$GC" "${EXTRA[@]}" \
  --out "$CHECK" > "$OUT/check.log" 2>&1 || tail -20 "$OUT/check.log"
python3 -m benchmarks.kernels.sparse_prefill_bench --lengths "$LENGTHS" --skip-flex --group-configs "$GC" \
  --kernel-configs "${OLD_CONFIGS:-4x2}" "${EXTRA[@]}" ${BENCH_ARGS} --out "$RESULT" 2>&1 | tee "$OUT/bench.log" | grep -v '^{'
cp "$RESULT" "$CHECK" "$OUT/" 2>/dev/null
python3 - "$RESULT" "$CHECK" <<'PY'
import json, sys
nan = float("nan")
c = json.load(open(sys.argv[2]))
r = c["results"][0]
print("device:", c["device"], "torch", c["torch"])
print("check L=4096 (vertical 100, slash 128): density per head %.3f, group-shared %.3f; max|err| vs torch reference: "
      "per-head %.2e group %.2e shared %.2e (index group-shared: %s); fused estimate max|err| vertical %.1e slash %.1e" % (
    r["density"], r.get("shared_density", nan), r.get("max_abs_err_vs_reference_old", nan),
    r.get("max_abs_err_vs_reference_group", nan), r.get("max_abs_err_vs_reference_shared", nan),
    r.get("shared_index_is_group_shared"), r.get("fused_vertical_max_abs_err", nan), r.get("fused_slash_max_abs_err", nan)))
x = json.load(open(sys.argv[1]))
print("kernels (ms; ms per 1e9 computed pairs in brackets):")
print("L       dens  shared_dens union_dens | per-head      group(per-head idx) | shared kernel (cfg)        per-head on shared | SDPA dense")
for r in x["results"]:
    g = lambda k: r.get(k, nan)
    print("%-7d %.3f %.3f       %.3f      | %6.1f [%.2f] %6.1f [%.2f]        | %6.1f [%.2f] (%-8s)  %6.1f [%.2f]      | %6.1f [%.2f]" % (
        r["L"], r["density"], g("shared_density"), g("union_density"), g("kvplug_attn_old_ms"), g("old_ms_per_gpair"),
        g("kvplug_attn_ms"), g("attn_ms_per_gpair"), g("shared_attn_ms"), g("shared_ms_per_gpair"),
        r.get("shared_attn_config", "-"), g("per_head_on_shared_ms"), g("per_head_on_shared_ms_per_gpair"),
        g("sdpa_dense_ms"), g("sdpa_ms_per_gpair")))
    print("        shared configs:", {k: round(v, 2) for k, v in r.get("shared_attn_configs_ms", {}).items()},
          r.get("shared_config_errors", ""))
print("index build (ms): L | copy K | estimate torch (incl. copy) / fused | index serving (copy+torch) / fused / fused+shared | fused vs SDPA")
for r in x["results"]:
    g = lambda k: r.get(k, nan)
    print("%-7d | %5.2f | %6.2f / %6.2f | %6.2f / %6.2f / %6.2f | %.3f  (fused est. max|err| v %.1e s %.1e)" % (
        r["L"], g("copy_keys_ms"), g("estimate_torch_ms"), g("estimate_fused_ms"), g("index_serving_ms"),
        g("index_fused_ms"), g("index_fused_shared_ms"), g("index_fused_vs_sdpa"), g("fused_vertical_max_abs_err"),
        g("fused_slash_max_abs_err")))
PY
