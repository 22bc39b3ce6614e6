"""Runs test_triton_quant.py in a fresh interpreter when this session imported triton before
TRITON_INTERPRET=1 could take effect (the interpreter cannot be switched on afterwards)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

KERNEL_TESTS = Path(__file__).with_name("test_triton_quant.py")
_ran_in_process = getattr(sys.modules.get("tests.cache_policies.test_triton_quant"), "IN_PROCESS", False)


@pytest.mark.skipif(torch.cuda.is_available() or _ran_in_process, reason="the kernel tests ran in this process")
def test_quant_kernels_in_fresh_interpreter():
    pytest.importorskip("triton", reason="triton is not installed")
    from tests.conftest import run_tests_in_fresh_interpreter

    run_tests_in_fresh_interpreter(KERNEL_TESTS, dict(os.environ, TRITON_INTERPRET="1"), timeout=600)
