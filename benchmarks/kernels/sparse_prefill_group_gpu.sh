#!/usr/bin/env bash
# One device call: the group sparse-prefill kernel's GPU tests, a small-shape check against the torch reference,
# then old kernel vs group kernel (config sweep) vs SDPA dense at long context. Run from the repo root on the GPU
# machine with the wheels in .whl (msgspec, pytest) carried; results under $OUT.
#   GROUP_CONFIGS=... LENGTHS=... bash benchmarks/kernels/sparse_prefill_group_gpu.sh
set -o pipefail
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
export PYTHONPATH="$PWD:$PYTHONPATH" PYTHONUNBUFFERED=1
GC="${GROUP_CONFIGS:-32x64x8x2,32x64x8x3,32x64x4x2,16x64x4x2,16x64x4x3,32x128x8x2,16x128x4x2}"
LENGTHS="${LENGTHS:-32768,65536,131072}"
date -u; nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0))"
if [ -z "$SKIP_TESTS" ]; then
  TRITON_INTERPRET=0 timeout 240 python3 -m pytest -q -x --noconftest -p no:cacheprovider \
    tests/attention_backends/sparse_prefill/test_triton_kernels.py 2>&1 | tee "$OUT/pytest.log" | tail -4
fi
python3 -m benchmarks.kernels.sparse_prefill_bench --lengths 4096 --check --union --skip-flex --iters 3 --warmup 1 \
  --budgets '{"vertical": 100, "slash": 128}' \
  --out "$OUT/check.json" > "$OUT/check.log" 2>&1 || tail -20 "$OUT/check.log"
python3 -m benchmarks.kernels.sparse_prefill_bench --lengths "$LENGTHS" --skip-flex --union --group-configs "$GC" \
  --kernel-configs "${OLD_CONFIGS:-4x2}" --solo-configs "${SOLO_CONFIGS:-64x64x4x2}" ${BENCH_ARGS} --out "$OUT/x.json" 2>&1 | tee "$OUT/bench.log" | grep -v '^{' 
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
c = json.load(open(f"{out}/check.json"))
r = c["results"][0]
print("device:", c["device"])
print("check L=4096 (vertical 100, slash 128; density %.3f, union %.3f) max|err| vs torch reference: old %.2e group %.2e union(vs union ref) %.2e; rel old %.2e group %.2e" % (
    r["density"], r["union_density"], r["max_abs_err_vs_reference_old"], r["max_abs_err_vs_reference_group"], r["max_abs_err_vs_reference_union"],
    r["rel_err_vs_reference_old"], r["rel_err_vs_reference_group"]))
x = json.load(open(f"{out}/x.json"))
print("L      dens  udens  old_ms  new_ms(cfg)            union_ms  sdpa_ms  gidx_ms  old/new  ms/Gpair old new sdpa | old_on_union_ms")
for r in x["results"]:
    print("%-6d %.3f %.3f %7.2f %7.2f (%-12s) %7.2f %8.2f %7.2f %6.2fx   %.3f %.3f %.3f" % (
        r["L"], r["density"], r["union_density"], r.get("kvplug_attn_old_ms", float("nan")), r["kvplug_attn_ms"],
        r["kvplug_attn_config"], r.get("kvplug_attn_union_ms", float("nan")), r.get("sdpa_dense_ms", float("nan")),
        r["group_index_ms"], r.get("kvplug_attn_old_ms", float("nan")) / r["kvplug_attn_ms"],
        r.get("old_ms_per_gpair", float("nan")), r["attn_ms_per_gpair"], r.get("sdpa_ms_per_gpair", float("nan"))),
        "| %.2f" % r.get("kvplug_attn_old_on_union_ms", float("nan")))
    print("   old configs:", {k: round(v, 2) for k, v in r.get("kvplug_attn_old_configs_ms", {}).items()},
          "solo:", {k: round(v, 2) for k, v in r.get("kvplug_attn_solo_configs_ms", {}).items()})
    print("   configs:", {k: round(v, 2) for k, v in r["kvplug_attn_configs_ms"].items()}, r.get("group_config_errors", ""))
PY
