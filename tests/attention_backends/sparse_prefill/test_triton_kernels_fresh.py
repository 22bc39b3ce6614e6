"""Runs test_triton_kernels.py in a fresh interpreter when this session imported triton before
TRITON_INTERPRET=1 could take effect (the interpreter cannot be switched on afterwards)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

KERNEL_TESTS = Path(__file__).with_name("test_triton_kernels.py")
_ran_in_process = getattr(sys.modules.get("tests.attention_backends.sparse_prefill.test_triton_kernels"),
                          "IN_PROCESS", False)


@pytest.mark.skipif(torch.cuda.is_available() or _ran_in_process, reason="the kernel tests ran in this process")
def test_kernels_in_fresh_interpreter():
    pytest.importorskip("triton", reason="triton is not installed")
    from tests.conftest import REPO

    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(KERNEL_TESTS)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = proc.stdout.strip().splitlines()[-1]
    assert "failed" not in summary and " passed" in summary, summary
