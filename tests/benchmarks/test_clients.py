"""benchmarks/clients.py's verdicts: a phase passes only with zero errors and kvplug's metrics moving as its
kv_transfer_params say (the engine runs are the script itself, `python -m benchmarks.clients`)."""
from __future__ import annotations

import pytest

from benchmarks import clients

POLICY_PHASE = next(p for p in clients.PHASES if p.kv_params == clients.POLICY_PARAMS)
OPT_OUT_PHASE = next(p for p in clients.PHASES if p.kv_params == clients.OPT_OUT_PARAMS)
CLEAN = {"requests": 5, "errors": 0, "error_samples": []}


def test_every_client_has_a_policy_and_an_opt_out_phase():
    for client in {p.client for p in clients.PHASES}:
        params = [p.kv_params for p in clients.PHASES if p.client == client]
        assert clients.POLICY_PARAMS in params and clients.OPT_OUT_PARAMS in params, client


def test_a_policy_phase_passes_only_when_its_policy_alone_stored():
    assert clients.problems(POLICY_PHASE, CLEAN, {"keep": 10.0}, {"keep": 10.0, clients.POLICY: 5.0}) == []
    # the parameter did not reach the connector: the server's default policy stored the blocks
    assert clients.problems(POLICY_PHASE, CLEAN, {}, {"keep": 5.0})
    assert clients.problems(POLICY_PHASE, CLEAN, {}, {})  # nothing stored: the metric did not move
    assert clients.problems(POLICY_PHASE, CLEAN, {}, {"keep": 1.0, clients.POLICY: 5.0})


def test_an_opt_out_phase_fails_if_anything_was_stored():
    assert clients.problems(OPT_OUT_PHASE, CLEAN, {clients.POLICY: 3.0}, {clients.POLICY: 3.0}) == []
    assert clients.problems(OPT_OUT_PHASE, CLEAN, {}, {"keep": 1.0})


@pytest.mark.parametrize("outcome", [{"requests": 5, "errors": 1, "error_samples": ["HTTP 400"]},
                                     {"requests": 0, "errors": 0, "error_samples": []}])
def test_errors_or_no_requests_fail_a_phase(outcome):
    assert clients.problems(OPT_OUT_PHASE, outcome, {}, {})


def test_guidellm_totals_count_errors_and_leave_out_requests_cut_at_the_deadline():
    report = {"benchmarks": [{"metrics": {"request_totals": {"successful": 8, "errored": 2, "incomplete": 4,
                                                             "total": 14}}}]}
    assert clients._guidellm_totals(report) == {"requests": 10, "errors": 2, "cancelled_at_deadline": 4,
                                                "error_samples": []}
