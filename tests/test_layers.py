"""The layer rules of the architecture contract, checked on the source tree (imports read with ast).

1 core: kvplug/config.py, metrics.py, models.py, dropped_tokens.py, kv_payload.py, vllm_compat.py, kvplug/compat/
2 features: attention_backends/, cache_policies/, offload/: core and their own package only, never each other
3 composition: kvplug/settings.py, kvplug/plugin.py
4 top: serving/, kvplug/cli.py, benchmarks/ (a benchmark script never imports another script)
Imports under ``if TYPE_CHECKING:`` do not count. Imports of our own packages inside library functions are allowed
only for the modules in OPTIONAL (they pull in an optional dependency or keep a light entry point light).
"""
from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGES = ("kvplug", "attention_backends", "cache_policies", "offload", "serving", "benchmarks")
FEATURES = ("attention_backends", "cache_policies", "offload")
CORE = ("kvplug", "kvplug.config", "kvplug.metrics", "kvplug.models", "kvplug.dropped_tokens", "kvplug.kv_payload",
        "kvplug.vllm_compat")
COMPOSITION = ("kvplug.settings", "kvplug.plugin")
LAYER_NAMES = {1: "core", 2: "feature", 3: "composition", 4: "top"}
BENCHMARK_NON_SCRIPTS = ("benchmarks", "benchmarks.harness", "benchmarks.cli")

# Our modules that may be imported inside a function, and why (an optional dependency behind them, or a
# command's entry point kept light so `kvplug config` / `kvplug --help` do not load torch or vLLM).
OPTIONAL = {
    "attention_backends.sparse_prefill.triton_kernels": "triton",
    "attention_backends.sparse_prefill.estimate_kernels": "triton",
    "attention_backends.retrieval_decode.triton_kernels": "triton",
    "cache_policies.triton_quant": "triton",
    "serving.server": "kvplug serve (vLLM launcher), loaded by kvplug/cli.py only for that command",
    "serving.cache_cli": "kvplug cache (an HTTP client), loaded by kvplug/cli.py only for that command",
    "benchmarks.cli": "kvplug bench (matplotlib, httpx load generators), loaded by kvplug/cli.py only for it",
    "attention_backends.sparse_prefill.search": "kvplug patterns search (transformers)",
    "attention_backends.sparse_prefill.head_config": "torch: the sparse_prefill section checks non-default "
                                                     "patterns without loading torch for the defaults",
    "attention_backends.sparse_prefill.patterns.base": "same as head_config",
    "attention_backends.sparse_prefill.cost_model": "same as head_config (checked only for a non-default cost_table)",
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))
            if "results" not in p.relative_to(REPO).parts}


MODULES = _sources()


def layer_of(module: str) -> int | None:
    if module in CORE or module.startswith("kvplug.compat"):
        return 1
    if module.split(".")[0] in FEATURES:
        return 2
    if module in COMPOSITION:
        return 3
    if module.split(".")[0] in ("serving", "benchmarks") or module == "kvplug.cli":
        return 4
    return None


def is_script(module: str) -> bool:
    parts = module.split(".")
    return len(parts) == 2 and parts[0] == "benchmarks" and module not in BENCHMARK_NON_SCRIPTS \
        and not (REPO / "benchmarks" / parts[1]).is_dir()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """Our modules an import statement names (``from a import b`` is module a.b when that file exists)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[:len(package) - node.level + 1]
        base = ".".join([*package, base] if base else package)
    return [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]


def imports(module: str) -> list[tuple[str, int, bool]]:
    """(imported module of ours, line, inside a function) for every import outside TYPE_CHECKING blocks."""
    path = MODULES[module]
    out: list[tuple[str, int, bool]] = []

    def walk(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for sub in child.orelse:
                    walk(sub, in_function)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for target in _targets(child, module, path.name == "__init__.py"):
                    if target.split(".")[0] in PACKAGES:
                        out.append((target, child.lineno, in_function))
            walk(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    walk(ast.parse(path.read_text(), str(path)), False)
    return sorted(set(out), key=lambda item: item[1])


def _where(module: str, line: int) -> str:
    return f"{MODULES[module].relative_to(REPO)}:{line}"


def layer_violations() -> list[str]:
    problems = []
    for module in MODULES:
        layer = layer_of(module)
        if layer is None:
            problems.append(f"{_where(module, 1)}: {module} has no layer (add it to tests/test_layers.py)")
            continue
        for target, line, _ in imports(module):
            target_layer = layer_of(target)
            if target_layer is None:
                continue  # reported where it is defined
            if target_layer > layer:
                problems.append(f"{_where(module, line)}: {LAYER_NAMES[layer]} {module} imports "
                                f"{LAYER_NAMES[target_layer]} {target} (upward)")
            elif layer == target_layer == 2 and module.split(".")[0] != target.split(".")[0]:
                problems.append(f"{_where(module, line)}: feature {module} imports another feature's {target}")
            elif is_script(module) and is_script(target) and target != module:
                problems.append(f"{_where(module, line)}: benchmark script {module} imports script {target} "
                                "(shared code belongs in benchmarks/harness.py)")
    return problems


# Benchmarks are exempt from the module-level rule: their scripts start engines in worker processes whose
# environment (KVPLUG_* config, VLLM_* switches) must be set before kvplug's modules are imported there, and
# `kvplug bench`'s subcommands load only the one they run.
FUNCTION_IMPORT_EXEMPT = ("benchmarks",)


def function_import_violations() -> list[str]:
    return [f"{_where(module, line)}: {module} imports {target} inside a function (not an optional dependency: "
            "import it at module level, or add it to OPTIONAL with the reason)"
            for module in MODULES if not module.startswith(FUNCTION_IMPORT_EXEMPT)
            for target, line, in_function in imports(module)
            if in_function and target not in OPTIONAL and not target.startswith(tuple(f"{o}." for o in OPTIONAL))]


def test_the_walk_sees_the_tree():
    assert {"kvplug.config", "kvplug.settings", "kvplug.plugin", "attention_backends.wiring", "serving.server",
            "kvplug.compat.v0_32"} <= set(MODULES)
    assert ("kvplug.config", 1) in {(t, layer_of(t)) for t, _, _ in imports("kvplug.settings")}
    assert is_script("benchmarks.soak") and not is_script("benchmarks.harness") and not is_script("benchmarks.cli")


def test_imports_point_down_and_features_stay_apart():
    problems = layer_violations()
    assert not problems, "layer violations:\n" + "\n".join(problems)


def test_our_modules_are_imported_at_module_level():
    problems = function_import_violations()
    assert not problems, "function-level imports:\n" + "\n".join(problems)
