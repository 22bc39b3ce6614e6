#!/usr/bin/env bash
# One device call (plain torch 2.11 + Triton 3.6, no vLLM; ~1.5-2 min on an H100): the sparse prefill kernel
# table's xformers columns (issue 16). Per length: xformers' memory-efficient attention, dense causal, each
# forward op (torch's FA2 and CUTLASS kernels, which xformers 0.0.35 calls), beside SDPA dense; per budget row:
# our index + kernel and xformers with its closest bias, a causal local window computing the same number of
# pairs (benchmarks/kernels/xformers_baseline.py). The 4K row also checks xformers' local output against a
# torch reference.
# Needs the wheels in .whl (msgspec for the bench's imports; xformers 0.0.35, 3.2 MB; the CUDA 12 runtime its
# _C.so links, 0.9 MB), made here with
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --platform manylinux_2_28_x86_64 -d .whl xformers==0.0.35 msgspec==0.22.0
#   python -m pip download --no-deps -d .whl nvidia-cuda-runtime-cu12==12.8.90
# Run from the repo root on the GPU machine with .whl carried:
#   bash benchmarks/kernels/sparse_prefill_xformers_gpu.sh
# Writes benchmarks/results/sparse_prefill_xformers_h100.json (a copy and the log under $OUT).
# Env: LENGTHS, BUDGETS (';'-separated JSON budgets), RESULT, BENCH_ARGS, SITE.
set -o pipefail
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
SITE="${SITE:-/tmp/site}"  # where the wheels are installed (not the host's site-packages)
ls .whl/xformers-*.whl > /dev/null 2>&1 || { echo "no xformers wheel in .whl (see the header of $0)"; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
  || exit 1
export PYTHONPATH="$SITE:$PWD:$PYTHONPATH" PYTHONUNBUFFERED=1
# xformers 0.0.35's _C.so links libcudart.so.12 (torch cu130 brings .so.13). Without it xformers has no build
# metadata, so `_built_with_cuda` is False and every CUDA fmha op refuses ("xFormers wasn't build with CUDA
# support"; H100 run 2026-12-07). nvidia-cuda-runtime-cu12 in .whl provides it; the driver runs CUDA 12 code.
CUDART12="$SITE/nvidia/cuda_runtime/lib"
[ -e "$CUDART12/libcudart.so.12" ] && export LD_LIBRARY_PATH="$CUDART12${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
LENGTHS="${LENGTHS:-4096,32768,65536,131072}"
DEFAULT_BUDGETS='{"vertical":500,"slash":256};{"vertical":1000,"slash":1024}'
BUDGETS="${BUDGETS:-$DEFAULT_BUDGETS}"
RESULT="${RESULT:-benchmarks/results/sparse_prefill_xformers_h100.json}"
date -u; nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0))"
python3 -m xformers.info 2>&1 | grep -E "xFormers|memory_efficient_attention\.(fa2F|cutlassF)|pytorch.version|is_triton" \
  | tee "$OUT/xformers_info.txt"
mkdir -p "$(dirname "$RESULT")"
python3 -m benchmarks.kernels.sparse_prefill_bench --lengths "$LENGTHS" --budget-sweep "$BUDGETS" --skip-flex \
  --kernel-configs "" --iters 3 --warmup 1 ${BENCH_ARGS} --out "$RESULT" 2>&1 | tee "$OUT/bench.log" | grep -v '^{'
rc=${PIPESTATUS[0]}
cp "$RESULT" "$OUT/" 2>/dev/null
[ "$rc" = 0 ] || { echo "the bench failed (exit $rc): see $OUT/bench.log"; exit "$rc"; }
python3 - "$RESULT" <<'PY'
import json, sys
nan = float("nan")
x = json.load(open(sys.argv[1]))
print("device:", x["device"], "torch", x["torch"], "xformers:", x.get("xformers"))
print("L       density | ours idx+attn=total ms [attn ms/1e9 pairs] | SDPA dense | xformers dense (op) | "
      "xformers local window w, same pairs (op) [ms/1e9 pairs] | rel err vs dense: ours / xformers local")
for r in x["results"]:
    g = lambda k: r.get(k, nan)
    print("%-7d %.3f   | %6.1f + %6.1f = %6.1f [%.2f] | %6.1f | %6.1f (%s) | w=%s %6.1f (%s) [%.2f] | %.4f / %.4f" % (
        r["L"], r["density"], g("kvplug_index_ms"), g("kvplug_attn_ms"), g("kvplug_total_ms"),
        g("attn_ms_per_gpair"), g("sdpa_dense_ms"), g("xformers_dense_ms"), r.get("xformers_dense_op", "-"),
        r.get("xformers_local_window", "-"), g("xformers_local_ms"), r.get("xformers_local_op", "-"),
        g("xformers_local_ms_per_gpair"), g("rel_err_vs_dense"), g("rel_err_vs_dense_xformers_local")))
    for key in ("xformers_dense_ops_ms", "xformers_local_ops_ms", "xformers_dense_errors", "xformers_local_errors",
                "xformers_missing", "rel_err_xformers_dense_vs_sdpa", "max_abs_err_xformers_local_vs_reference"):
        if key in r:
            print("       ", key, r[key] if not isinstance(r[key], dict) else
                  {k: (round(v, 2) if isinstance(v, float) else v) for k, v in r[key].items()})
PY
