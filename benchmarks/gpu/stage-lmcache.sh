#!/usr/bin/env bash
# Stages LMCache (the peer of issue 19 part 3) for the air-gapped GPU host, next to the vLLM 0.26 bundle of
# ../shared/gpu/stage.sh: one part of < 58 MB (.gpu-stage-lmcache/p0) holding lmcache wheels and the
# dependencies the host lacks.
#
#   usage: benchmarks/gpu/stage-lmcache.sh [OUT_DIR]          (OUT_DIR defaults to .gpu-stage-lmcache)
#   then (device tool): run carry [".gpu-stage-lmcache/p0"], command `bash .gpu-stage-lmcache/p0/receive.sh`
#
# receive.sh installs each lmcache version into /tmp/kvstage/lmcache-VERSION and the shared dependencies into
# /tmp/kvstage/lmcache-deps (pip --no-deps --target, no network), and writes /tmp/kvstage/lmcache-VERSION.env.sh
# (source it after /tmp/kvstage/env.sh to put that version first on PYTHONPATH). benchmarks/gpu_offload.py's
# mode `lmcache-VERSION` finds the same folders itself.
#
# Versions (env LMCACHE_VERSIONS): 0.5.6 is the registry's newest; its compiled ops (lmcache/cuda_ops*.so)
# need c10::NotImplementedError(c10::SourceLocation, std::string), which libc10 of torch 2.11 and 2.12 lacks
# and 2.13 has (checked with nm against the torch 2.11-2.14 cu130 wheels), so on the host's torch 2.11 the
# import fails and LMCache runs its torch fallback ops. 0.5.3 is the newest whose ops (lmcache/c_ops*.so)
# resolve every torch symbol against torch 2.11 (0.5.4 and 0.5.5 are built like 0.5.6).
# Dependencies: the names in lmcache's METADATA that neither the host (../shared/gpu/host-dists-py312.json)
# nor the vLLM 0.26 bundle has and that lmcache's vLLM connector path imports (aiofile is imported at module
# level by the storage-backend package; caio is aiofile's; nvtx, redis and cufile-python are imported where
# present). The multi-process mode's server and LMCacheMPConnector need none beyond these (2026-12-08: imported
# and started on a CPU box with the host's packages and this part). Not shipped: version pins the host breaks
# (numpy<=2.2.6, protobuf<7, prometheus_client<=0.24.1, opentelemetry-api<=1.40, setuptools<81: the connector
# path runs with the host's; shipping them would shadow what torch and vLLM use), the remote-storage clients
# (awscrt, google-cloud-bigtable, grpcio-observability) and opentelemetry-exporter-prometheus (only the MP
# server's metrics import it: benchmarks/peers/lmcache.py starts it with --disable-metrics).
# Wheels are taken from LMCACHE_WHEELS (a folder, default /tmp/lmc) when there, else downloaded.
set -euo pipefail
OUT="${1:-.gpu-stage-lmcache}"
VERSIONS="${LMCACHE_VERSIONS:-0.5.6 0.5.3}"
DEPS="aiofile caio nvtx redis cufile-python"
LOCAL="${LMCACHE_WHEELS:-/tmp/lmc}"
CACHE="${KVSTAGE_CACHE:-$HOME/.cache/kvstage}/lmcache"
PART_BYTES=58000000
PLAT=(--only-binary=:all: --python-version 3.12 --implementation cp
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux_2_34_x86_64 --platform manylinux_2_31_x86_64)
pipq() { python3 -m pip "$@" 2>&1 | grep -v -E "is ignored: it is neither|^\s*$" || true; }
mkdir -p "$CACHE/lmcache" "$CACHE/deps"
for v in $VERSIONS; do
  if ! ls "$CACHE"/lmcache/lmcache-"$v"-*.whl >/dev/null 2>&1; then
    if ls "$LOCAL"/lmcache-"$v"-*.whl >/dev/null 2>&1; then cp "$LOCAL"/lmcache-"$v"-*.whl "$CACHE/lmcache/"
    else pipq download -q --no-deps "${PLAT[@]}" -d "$CACHE/lmcache" "lmcache==$v"; fi
  fi
  ls "$CACHE"/lmcache/lmcache-"$v"-*.whl >/dev/null || { echo "stage-lmcache: no wheel for lmcache $v"; exit 1; }
done
pipq download -q --no-deps "${PLAT[@]}" -d "$CACHE/deps" $DEPS
rm -rf "$OUT" && mkdir -p "$OUT/p0/lmcache" "$OUT/p0/deps"
for v in $VERSIONS; do cp "$CACHE"/lmcache/lmcache-"$v"-*.whl "$OUT/p0/lmcache/"; done
for d in $DEPS; do cp "$CACHE"/deps/"$(echo "$d" | tr - _)"-*.whl "$OUT/p0/deps/"; done
cat > "$OUT/p0/receive.sh" <<'RCV'
#!/usr/bin/env bash
# Installs the lmcache wheels of this part into /tmp/kvstage/lmcache-VERSION and their dependencies into
# /tmp/kvstage/lmcache-deps (no network, no dependency resolution), then prints how to use them.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
S=/tmp/kvstage; mkdir -p "$S"
PIP_ROOT_USER_ACTION=ignore python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$S/lmcache-deps" "$HERE"/deps/*.whl
rm -rf "$S/lmcache-deps/tests"  # cufile-python ships a top-level `tests` package: it would shadow others
for w in "$HERE"/lmcache/lmcache-*.whl; do
  v="$(basename "$w" | cut -d- -f2)"
  rm -rf "$S/lmcache-$v"
  PIP_ROOT_USER_ACTION=ignore python3 -m pip install -q --no-index --no-deps --no-compile --target "$S/lmcache-$v" "$w"
  printf 'export PYTHONPATH=%s:%s${PYTHONPATH:+:$PYTHONPATH}\nexport LMCACHE_TRACK_USAGE=false DO_NOT_TRACK=1\n' \
    "$S/lmcache-$v" "$S/lmcache-deps" > "$S/lmcache-$v.env.sh"
  echo "kvstage: lmcache $v in $S/lmcache-$v (source /tmp/kvstage/env.sh; source $S/lmcache-$v.env.sh)"
done
RCV
chmod +x "$OUT/p0/receive.sh"
size=$(du -sb "$OUT/p0" | cut -f1)
[ "$size" -lt "$PART_BYTES" ] || { echo "stage-lmcache: $OUT/p0 is $size bytes (> $PART_BYTES): split it"; exit 1; }
du -sh "$OUT/p0"; ls "$OUT/p0"/*/
echo "stage-lmcache: send $OUT/p0 (carry [\"$OUT/p0\"]), command: bash $OUT/p0/receive.sh"
