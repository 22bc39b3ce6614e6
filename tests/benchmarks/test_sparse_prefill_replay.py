"""benchmarks/sparse_prefill_replay.py: question and mode specs (the engine part is a diagnostic run by hand)."""
from __future__ import annotations

import pytest

from benchmarks import sparse_prefill_replay as replay


def test_questions_and_modes():
    assert replay.parse_questions("passkey-0-4@16000, passkey-0-1@24000:2,") == [
        ("passkey-0-4", 16000, 0), ("passkey-0-1", 24000, 2)]
    assert replay.mode_override("dense") == {"dense": True} and replay.mode_override("sparse") == {}
    assert replay.mode_override("tail256") == {"dense_tail_rows": 256}
    assert replay.mode_override("seg1024") == {"vertical_segment_rows": 1024}


@pytest.mark.parametrize("call, needle", [
    (lambda: replay.parse_questions("passkey-0-4"), "not CASE@CONTEXT"),
    (lambda: replay.parse_questions("@16000"), "has no case"),
    (lambda: replay.mode_override("tailx"), "unknown mode 'tailx'"),
])
def test_bad_specs_name_what_is_wrong(call, needle):
    with pytest.raises(SystemExit, match=needle):
        call()
