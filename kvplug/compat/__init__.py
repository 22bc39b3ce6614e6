"""vLLM version shims: common.py (what every supported release shares) and one module per release line
(v0_26.py, v0_32.py, v0_34.py) with the same names for what differs. ``selected()`` picks the installed release's module
once; kvplug/vllm_compat.py binds it and is what the rest of kvplug imports."""
from __future__ import annotations

import functools
from types import ModuleType

from kvplug.compat import common, v0_26, v0_32, v0_34

# (first release, module), newest first: the first whose release <= the installed vLLM is selected.
VERSION_MODULES: tuple[tuple[tuple[int, int], ModuleType], ...] = (((0, 34), v0_34), ((0, 32), v0_32), ((0, 26), v0_26))


def module_for(version: str) -> ModuleType:
    installed = common._version_tuple(version)
    for first, module in VERSION_MODULES:
        if installed >= first:
            return module
    raise common.UnsupportedVllmError(f"kvplug supports vLLM 0.26 and later; this is vLLM {version}")


@functools.cache
def selected() -> ModuleType:
    """The version module of the installed vLLM (imports vllm on first use, not at import time)."""
    return module_for(common.vllm_version())
