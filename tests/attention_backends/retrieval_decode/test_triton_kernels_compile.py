"""The retrieval-decode Triton kernels compile for an H100 (sm_90), ahead of time, on a machine without a GPU.

TRITON_INTERPRET=1 (test_triton_kernels.py) runs the kernels' Python and skips the compiler's frontend rules, so a
kernel can pass there and still not compile on the GPU (the radix select once failed on the H100 with "shift is
already defined. constexpr cannot be reassigned."). Triton's frontend, TTIR/TTGIR/LLVM passes and the bundled ptxas
all run on the CPU, so each kernel variant the launchers use is compiled here for GPUTarget("cuda", 90, 32). It
runs in a fresh process: the interpreter mode of a triton already imported in this one cannot be switched off.
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="triton is not installed in this environment")

# The child: compiles every variant, prints one JSON line {"skip": reason} or {"failed": {variant: error chain}}.
_COMPILE_ALL = r'''
import json, traceback
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

if "nvidia" not in triton.backends.backends or not triton.knobs.nvidia.ptxas.path:
    print(json.dumps({"skip": "this triton has no NVIDIA backend / ptxas"}))
    raise SystemExit(0)

from attention_backends.retrieval_decode import triton_kernels as tk

POINTERS = {"Q": "*bf16", "KMIN": "*bf16", "KMAX": "*bf16", "GMIN": "*bf16", "GMAX": "*bf16", "K": "*bf16",
            "V": "*bf16", "KEY": "*bf16", "OUT": "*bf16", "TABLE": "*i32", "SEQ_LENS": "*i32", "TOP_IDX": "*i32",
            "CAND": "*i32", "SLOTS": "*i64", "RESELECT": "*i32", "VALUE": "*bf16", "KEY_CACHE": "*bf16",
            "VALUE_CACHE": "*bf16",
            "SEL_SEQ_LENS": "*i32"}  # anything else upper-case: float32 scores / partial results
SCALARS = {"num_tokens": "i32", "scale": "fp32"}  # and i64 strides
BASE = dict(NUM_KV_HEADS=8, GROUP=4, GROUP_PAD=16, HEAD_DIM=128, BLOCK_SIZE=16, NUM_SEL=512, BUDGET_TOKENS=2048,
            FRACTION=0.0, MIN_CONTEXT=4096, DOT_FP32=False, REDUCE_MAX=False, SINK_BLOCKS=1, RECENT_BLOCKS=4,
            HAS_REUSE=False, NUM_SLOTS=512)
REUSE = dict(HAS_REUSE=True)  # selection reuse (reselect_interval > 1): per-row flags, stored selections
SELECT = dict(WIDTH_PAD=8192, MIN_BLOCKS=5)
REFINE = dict(GROUP_BLOCKS=8, REFINE=2.0, FORCED_GROUPS=3, GROUPS_PAD=1024, CAND_PAD=128, FINE_TILE=64)
VARIANTS = {
    "select bisect early-exit": (tk._select_kernel, dict(SELECT, EARLY_EXIT=True, RADIX=False), 8),
    "select bisect": (tk._select_kernel, dict(SELECT, EARLY_EXIT=False, RADIX=False), 8),
    "select radix": (tk._select_kernel, dict(SELECT, EARLY_EXIT=False, RADIX=True), 8),
    "refine bisect early-exit": (tk._refine_select_kernel, dict(REFINE, EARLY_EXIT=True, RADIX=False), 4),
    "refine radix": (tk._refine_select_kernel, dict(REFINE, EARLY_EXIT=True, RADIX=True), 4),
    "score": (tk._masked_score_kernel, dict(TILE=64), 4),
    "group score fused update": (tk._group_score_kernel, dict(TILE=64, GROUP_BLOCKS=8, FUSE_UPDATE=True), 4),
    "decode": (tk._topk_decode_kernel, dict(BLOCKS_PER_SPLIT=64, TILE_BLOCKS=4, NUM_SPLITS=8, MIN_BLOCKS=5), 4),
    "merge": (tk._merge_kernel, dict(NUM_SPLITS=8, SPLITS_PAD=8, KEEP_EMPTY=False), 4),
    "merge keeping empty rows (graph dense path)": (tk._merge_kernel, dict(NUM_SPLITS=8, SPLITS_PAD=8,
                                                                          KEEP_EMPTY=True), 4),
    "summary update": (tk._summary_update_kernel, dict(HAS_GROUPS=True), 4),
    "fused kv write": (tk._kv_write_kernel, dict(HAS_GROUPS=False, FOLD=True), 4),
    "fused kv write, group summaries": (tk._kv_write_kernel, dict(HAS_GROUPS=True, FOLD=True), 4),
    "kv write alone (the bench's stand-in)": (tk._kv_write_kernel, dict(HAS_GROUPS=False, FOLD=False), 4),
    "reuse: select bisect early-exit": (tk._select_kernel, dict(SELECT, EARLY_EXIT=True, RADIX=False, **REUSE), 8),
    "reuse: select radix": (tk._select_kernel, dict(SELECT, EARLY_EXIT=False, RADIX=True, **REUSE), 8),
    "reuse: refine bisect early-exit": (tk._refine_select_kernel, dict(REFINE, EARLY_EXIT=True, RADIX=False,
                                                                       **REUSE), 4),
    "reuse: score": (tk._masked_score_kernel, dict(TILE=64, **REUSE), 4),
    "reuse: group score fused update": (tk._group_score_kernel, dict(TILE=64, GROUP_BLOCKS=8, FUSE_UPDATE=True,
                                                                     **REUSE), 4),
    "reuse: decode": (tk._topk_decode_kernel, dict(BLOCKS_PER_SPLIT=64, TILE_BLOCKS=4, NUM_SPLITS=8, MIN_BLOCKS=5,
                                                   NUM_SLOTS=513, **REUSE), 4),
}


def error_chain(exc):
    parts = []
    while exc is not None:
        parts.append(f"{type(exc).__name__}: {exc}")
        exc = exc.__cause__
    return "\n--- caused by ---\n".join(parts)


failed = {}
for name, (kernel, extra, num_warps) in VARIANTS.items():
    wanted = {**BASE, **extra}
    constexprs = {a: wanted[a] for a in kernel.arg_names if kernel.params[kernel.arg_names.index(a)].is_constexpr}
    signature = {a: "constexpr" if a in constexprs else POINTERS.get(a, "*fp32") if a[0].isupper()
                 else SCALARS.get(a, "i64") for a in kernel.arg_names}
    try:
        triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                       target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps))
    except Exception as exc:
        failed[name] = error_chain(exc)
print(json.dumps({"failed": failed}))
'''


def test_kernels_compile_for_h100(tmp_path):
    from tests.conftest import REPO

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # really compile (a cached kernel would pass without the compiler)
    proc = subprocess.run([sys.executable, "-c", _COMPILE_ALL], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if "skip" in result:
        pytest.skip(result["skip"])
    assert not result["failed"], "\n\n".join(f"{name}:\n{err}" for name, err in result["failed"].items())
