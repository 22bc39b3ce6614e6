"""benchmarks/offload_accuracy.py without an engine: a fake LLM stands in for vLLM's."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from benchmarks import offload_accuracy as oa
from cache_policies.registry import REQUEST_POLICY_KEY


class EngineDeadError(Exception):  # what vLLM raises in the front end when the EngineCore died
    pass


class DyingLLM:
    """Answers every chat until a request asks for ``dies_on``; from then on the engine is dead."""

    def __init__(self, dies_on: str, **_kw) -> None:
        self.dies_on = dies_on
        self.dead = False

    def reset_prefix_cache(self) -> bool:
        return True

    def collective_rpc(self, fn):
        if self.dead:
            raise EngineDeadError("EngineCore encountered an issue. See stack trace (above) for the root cause.")
        return [{"loaded": {"cpu": 0, "disk": 0}, "saved": 0, "masked": {"batches": 0}}]

    def chat(self, messages, sp, use_tqdm=False):
        policy = sp.extra_args["kv_transfer_params"].get(REQUEST_POLICY_KEY)
        if self.dead or policy == self.dies_on:
            self.dead = True
            raise EngineDeadError("EngineCore encountered an issue. See stack trace (above) for the root cause.")
        return [SimpleNamespace(outputs=[SimpleNamespace(text="42")]) for _ in messages]


def test_a_dead_engine_is_one_error_line_naming_the_policy_and_turn(monkeypatch, tmp_path, capsys):
    import vllm

    monkeypatch.setattr(vllm, "LLM", lambda **kw: DyingLLM("quant:int8", **kw))
    case = SimpleNamespace(id="c0", task="passkey", context="ctx",
                           multi_turns=[SimpleNamespace(input="q?", answer="42", scorer="substring")])
    monkeypatch.setattr(oa, "_cases", lambda args, path: [case])
    monkeypatch.setattr(oa, "_env", lambda args: None)
    out = tmp_path / "r.json"
    rc = oa.main(["--model", str(tmp_path), "--turns", "1", "--policies", "keep,quant:int8,quant:int4",
                  "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists()
    lines = [ln for ln in err.splitlines() if ln.startswith("offload_accuracy: error:")]
    assert len(lines) == 1, err
    assert "policy 'quant:int8' failed at turn 1/1: EngineDeadError" in lines[0]
    assert "Traceback" not in err


def test_other_errors_are_not_swallowed(monkeypatch, tmp_path):
    monkeypatch.setattr(oa, "run", lambda args: (_ for _ in ()).throw(ValueError("bug in the script")))
    with pytest.raises(ValueError):
        oa.main(["--out", str(tmp_path / "r.json")])
