"""Every registered policy: round trip, error bounds, compression, and the token-drop contract."""
from __future__ import annotations

import math

import pytest
import torch

from cache_policies import registry
from cache_policies.config import CachePolicyConfig, Int4Params, PolicyRule, SnapKVParams, StreamingParams
from cache_policies.selection import choose_policy
from kvplug.config import KvplugConfigError
from kvplug.kv_payload import BlockContext, compression_ratio

N_BLOCKS, LAYERS, HEADS, TOKENS, DIM = 6, 2, 3, 32, 64
# Worst relative error (max |err| / max |x| per tensor) each policy may make on Gaussian KV with outliers.
ERROR_BOUND = {"keep": 0.0, "quant:int8": 1 / 127, "quant:fp8": 1 / 16, "quant:int4": 1 / 15}
# Minimum compression of bf16 KV (head_dim 64, including scales and masks).
MIN_RATIO = {"keep": 1.0, "quant:int8": 1.8, "quant:fp8": 1.8, "quant:int4": 2.2,
             "drop:streaming": 1.5, "drop:snapkv": 1.5}


def kv(seed: int = 0, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(N_BLOCKS, LAYERS, HEADS, TOKENS, DIM, generator=g)
    k[..., 7] *= 12  # an outlier channel, as real keys have
    v = torch.randn(N_BLOCKS, LAYERS, HEADS, TOKENS, DIM, generator=g)
    return k.to(dtype), v.to(dtype)


def make(name: str):
    # Small windows so drops actually drop in a 6x32-token prefix; int4 residual of one block.
    return registry.create(name, CachePolicyConfig(streaming=StreamingParams(window_tokens=40, sink_tokens=4),
                                                   int4=Int4Params(residual_tokens=32),
                                                   snapkv=SnapKVParams(keep_ratio=0.25)))


def context(k):
    obs = k[-1, :, :, -16:, :].float()  # window keys as query proxies, like the connector
    return BlockContext(tuple(i * TOKENS for i in range(N_BLOCKS)), N_BLOCKS * TOKENS, obs_queries=obs)


@pytest.mark.parametrize("name", registry.POLICY_NAMES)
def test_round_trip_shapes_and_compression(name):
    k, v = kv()
    policy = make(name)
    assert policy.name == name
    payloads = policy.encode(k, v, context(k))
    assert len(payloads) == N_BLOCKS
    k2, v2, mask = policy.decode(payloads, k)
    assert k2.shape == k.shape and k2.dtype == k.dtype and v2.shape == v.shape
    assert compression_ratio(k, v, payloads) >= MIN_RATIO[name]
    if policy.drops_tokens:
        assert mask is not None and mask.shape == k.shape[:-1]
        assert 0 < mask.float().mean() < 1
        # Kept tokens come back exactly; dropped ones hold zeros (and are masked, never attended).
        assert torch.equal(k2[mask], k[mask]) and torch.equal(v2[mask], v[mask])
        assert not k2[~mask].any() and not v2[~mask].any()
    else:
        assert mask is None


@pytest.mark.parametrize("name", [n for n in registry.POLICY_NAMES if n in ERROR_BOUND])
def test_error_bound(name):
    k, v = kv(1)
    policy = make(name)
    k2, v2, _ = policy.decode(policy.encode(k, v, context(k)), k)
    for x, y in ((k, k2), (v, v2)):
        err = (x.float() - y.float()).abs()
        # Bound relative to the scale each policy quantizes against (token absmax for int8/fp8, group range
        # for int4), checked on the worst element of the whole tensor; bf16 rounding of the output adds 2^-8.
        ref = x.float().abs().amax(dim=-1, keepdim=True) if name != "quant:int4" else x.float().abs().amax()
        if name == "quant:int8" and x is k:  # keys: one scale per channel over the block's tokens
            ref = x.float().abs().amax(dim=-2, keepdim=True)
        bound = ERROR_BOUND[name] * (2 if name == "quant:int4" else 1) + 2 ** -8
        assert (err <= bound * ref + 1e-6).all(), (name, float((err / ref).max()))
    if name == "keep":
        assert torch.equal(k, k2) and torch.equal(v, v2)


def test_int4_keeps_recent_tokens_exact_and_quantizes_the_rest():
    k, v = kv(2)
    policy = make("quant:int4")
    k2, v2, _ = policy.decode(policy.encode(k, v, context(k)), k)
    assert torch.equal(k2[-1], k[-1]) and torch.equal(v2[-1], v[-1])  # last 32 tokens = last block
    assert not torch.equal(k2[0], k[0])
    # With no residual window every block is 4-bit: >= 3x smaller than bf16 even with fp16 scales.
    payloads = registry.create("quant:int4", residual_tokens=0).encode(k, v, context(k))
    assert compression_ratio(k, v, payloads) >= 3.0


def test_int4_keys_per_channel_beat_per_token_on_outlier_channels():
    """KIVI's point: with an outlier channel, per-channel key groups give a smaller error than per-token."""
    from cache_policies import quant_int4 as q4

    k, _ = kv(3, torch.float32)
    per_channel = q4.dequantize_keys_per_channel(q4.quantize_keys_per_channel(k, 32))
    per_token = q4.dequantize_values_per_token(q4.quantize_values_per_token(k, 32))
    normal = [c for c in range(DIM) if c != 7]
    err_c = (per_channel - k)[..., normal].abs().mean()
    err_t = (per_token - k)[..., normal].abs().mean()
    assert err_c < err_t


def test_streaming_keeps_sink_and_window_only():
    k, v = kv()
    policy = make("drop:streaming")
    _, _, mask = policy.decode(policy.encode(k, v, context(k)), k)
    pos_keep = mask[:, 0, 0, :].reshape(-1)
    expect = torch.zeros(N_BLOCKS * TOKENS, dtype=torch.bool)
    expect[:4] = True
    expect[N_BLOCKS * TOKENS - 40:] = True
    assert torch.equal(pos_keep, expect)
    assert torch.equal(mask, mask[:, :1, :1].expand_as(mask))  # same positions in every layer and head


def test_snapkv_keeps_what_the_window_attends_to_per_head():
    k, v = kv(4, torch.float32)
    obs = torch.zeros(LAYERS, HEADS, 4, DIM)
    # Head 0 of layer 0 looks exactly at token 70's key; that token must be kept, in that head.
    k[2, 0, 0, 70 - 64] = 0
    k[2, 0, 0, 70 - 64, 3] = 8.0
    obs[0, 0, :, 3] = 4.0
    ctx = BlockContext(tuple(i * TOKENS for i in range(N_BLOCKS)), N_BLOCKS * TOKENS, obs_queries=obs)
    policy = registry.create("drop:snapkv", keep_ratio=0.25, window_tokens=8, pool_kernel=1)
    mask = policy.keep_mask(k, ctx)
    assert mask[2, 0, 0, 70 - 64]
    per_head = mask[:-1].sum(-1)  # blocks outside the window: exactly the budget per head
    assert (per_head == math.ceil(0.25 * TOKENS)).all()
    assert mask[-1, ..., -8:].all()  # the observation window itself is kept
    assert not torch.equal(mask[:, 0, 0], mask[:, 0, 1])  # heads choose independently


def test_snapkv_gqa_queries_group_onto_kv_heads():
    k, _ = kv(5, torch.float32)
    policy = registry.create("drop:snapkv")
    s = policy.scores(k, torch.randn(LAYERS, HEADS * 3, 8, DIM))
    assert s.shape == k.shape[:-1]
    with pytest.raises(ValueError, match="query heads"):
        policy.scores(k, torch.randn(LAYERS, HEADS * 3 + 1, 8, DIM))


def test_unknown_policy_names_the_name():
    with pytest.raises(registry.UnknownPolicyError, match="'quant:int3'"):
        registry.create("quant:int3")
    with pytest.raises(KvplugConfigError, match=r"cache_policy\.rules\[0\]\.policy"):
        CachePolicyConfig(rules=[PolicyRule(policy="nope")])
    with pytest.raises(KvplugConfigError, match=r"cache_policy\.snapkv\.keep_ratio"):
        SnapKVParams(keep_ratio=0)


def test_selection_request_then_rules_then_default():
    cfg = CachePolicyConfig(default="keep", rules=[PolicyRule(policy="quant:int4", min_prefix_tokens=1000),
                                                   PolicyRule(policy="quant:int8", tenant="acme")])
    assert choose_policy(cfg, 10, None) == "keep"
    assert choose_policy(cfg, 5000, None) == "quant:int4"
    assert choose_policy(cfg, 10, {"kvplug_tenant": "acme"}) == "quant:int8"
    assert choose_policy(cfg, 5000, {"kvplug_policy": "drop:streaming"}) == "drop:streaming"
    with pytest.raises(registry.UnknownPolicyError, match="kvplug_policy"):
        choose_policy(cfg, 10, {"kvplug_policy": "zip"})
