#!/usr/bin/env bash
# One SmolLM2 CPU run of `kvplug bench` against `kvplug serve` and against vanilla vLLM, one server
# at a time (start, wait for /health, bench, stop), then the side-by-side table.
#   benchmarks/scbench/cpu_smollm2.sh [OUT_DIR] [extra `kvplug bench run` flags...]
# Default OUT_DIR: benchmarks/results/scbench-smollm2-cpu.  Needs the repo venv (.venv).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-benchmarks/results/scbench-smollm2-cpu}
shift || true
PY=${PY:-.venv/bin/python}
PORT=${PORT:-8765}
BENCH_ARGS=(--task kv --mode multi-turn --context-tokens 2000 --sessions 4 --turns 3
            --concurrency 2 --max-tokens 48 --seed 0 "$@")
MODEL=$($PY -c "from kvplug import models; print(models.prepare(models.DEFAULT_MODEL))")
mkdir -p "$OUT"

SERVER_PID=""
stop_server() {
  if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM -- "-$SERVER_PID" 2>/dev/null || kill -TERM "$SERVER_PID"
    for _ in $(seq 60); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 1; done
    kill -KILL -- "-$SERVER_PID" 2>/dev/null || true
  fi
  SERVER_PID=""
}
trap stop_server EXIT

# run NAME LOG -- server command...: start it in its own process group, bench it, stop it.
run() {
  local name=$1 log=$2; shift 3
  echo "== $name: $*" >&2
  setsid "$@" >"$log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 600); do
    if curl -sf "http://127.0.0.1:$PORT/health" >/dev/null; then break; fi
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then echo "$name server died; log: $log" >&2; tail -20 "$log" >&2; exit 1; fi
    sleep 2
  done
  $PY -m benchmarks.cli run --endpoint "http://127.0.0.1:$PORT" --tokenizer "$MODEL" \
      --label "$name" --out "$OUT/$name" "${BENCH_ARGS[@]}"
  stop_server
}

run kvplug "/tmp/kvplug-bench-kvplug-serve.log" -- \
  $PY -m kvplug.cli serve --host 127.0.0.1 --port "$PORT"
run vanilla-vllm "/tmp/kvplug-bench-vanilla-vllm.log" -- \
  env VLLM_PLUGINS=none $PY -m vllm.entrypoints.openai.api_server --model "$MODEL" \
  --kv-cache-memory-bytes 2147483648 --host 127.0.0.1 --port "$PORT"
$PY -m benchmarks.cli compare "$OUT/kvplug" "$OUT/vanilla-vllm" --out "$OUT/compare.md"
