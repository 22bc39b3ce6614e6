# Source on the GPU machine (after the staged vLLM arrived): a staged vLLM on PYTHONPATH, and kvplug "installed"
# from this checkout by writing its dist-info (entry point vllm.general_plugins) — no pip, no network.
#   source benchmarks/gpu/env.sh                                             # vLLM 0.26 (shared/gpu/stage.sh)
#   source /tmp/kvstage-0.34.0/env.sh && source benchmarks/gpu/env.sh        # another release (stage-vllm.sh)
set -e
case ":${PYTHONPATH:-}:" in
  *:/tmp/kvstage*/site*) ;;  # a staged release's env.sh was sourced already: keep it
  *) if [ ! -f /tmp/kvstage/env.sh ]; then
       echo "benchmarks/gpu/env.sh: no staged vLLM (/tmp/kvstage/env.sh); source /tmp/kvstage-<version>/env.sh first" >&2
       set +e; return 1
     fi
     source /tmp/kvstage/env.sh ;;
esac
KVPLUG_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
KVPLUG_SITE=/tmp/kvplug-site/kvplug-0.1.0.dist-info
mkdir -p "$KVPLUG_SITE"
printf 'Metadata-Version: 2.1\nName: kvplug\nVersion: 0.1.0\n' > "$KVPLUG_SITE/METADATA"
printf '[vllm.general_plugins]\nkvplug = kvplug.plugin:register\n' > "$KVPLUG_SITE/entry_points.txt"
export PYTHONPATH="$KVPLUG_REPO:/tmp/kvplug-site:$PYTHONPATH"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
set +e
