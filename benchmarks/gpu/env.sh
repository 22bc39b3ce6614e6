# Source on the GPU machine (after the staged vLLM arrived): vLLM 0.26 on PYTHONPATH, and kvplug "installed"
# from this checkout by writing its dist-info (entry point vllm.general_plugins) — no pip, no network.
set -e
source /tmp/kvstage/env.sh
KVPLUG_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
KVPLUG_SITE=/tmp/kvplug-site/kvplug-0.1.0.dist-info
mkdir -p "$KVPLUG_SITE"
printf 'Metadata-Version: 2.1\nName: kvplug\nVersion: 0.1.0\n' > "$KVPLUG_SITE/METADATA"
printf '[vllm.general_plugins]\nkvplug = kvplug.plugin:register\n' > "$KVPLUG_SITE/entry_points.txt"
export PYTHONPATH="$KVPLUG_REPO:/tmp/kvplug-site:$PYTHONPATH"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
set +e
