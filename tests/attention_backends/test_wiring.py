"""attention_backends.wiring: the composition layer hands the backend its sections; the hooks read them."""
from __future__ import annotations

import pytest

from attention_backends import dropped_attention, wiring
from attention_backends.retrieval_decode import backend_hooks as rd_hooks
from attention_backends.sparse_prefill import backend_hooks as sp_hooks
from kvplug import metrics, plugin, settings


@pytest.fixture
def restore_wiring():
    saved = wiring._current, metrics._configured
    yield
    wiring._current, metrics._configured = saved


def test_current_before_configure_is_a_clear_error(restore_wiring):
    wiring._current = None
    with pytest.raises(RuntimeError, match=r"not configured.*attention_backends\.wiring\.configure"):
        wiring.current()


def test_plugin_hands_the_backend_its_sections(restore_wiring):
    cfg = settings.resolve(sets=["sparse_prefill.min_prompt_tokens=4096", "retrieval_decode.enabled=true",
                                 "offload.enabled=true", "metrics.prefix=wired"], environ={})
    plugin.configure_features(cfg)
    w = wiring.current()
    assert (w.sparse_prefill, w.retrieval_decode, w.metrics) == (cfg.sparse_prefill, cfg.retrieval_decode,
                                                                 cfg.metrics)
    assert w.drop_masks_enabled and dropped_attention.enabled()
    assert rd_hooks.enabled() and sp_hooks.builder_hook() is None  # sparse prefill stays off
    plugin.configure_features(settings.resolve(sets=["sparse_prefill.enabled=true"], environ={}))
    assert not dropped_attention.enabled() and not rd_hooks.enabled()
    hook = sp_hooks.builder_hook()
    assert hook.min_prompt_tokens is None and hook.cfg == wiring.current().sparse_prefill
