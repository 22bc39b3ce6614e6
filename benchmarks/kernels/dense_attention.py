"""Dense attention reference: ``torch.nn.functional.scaled_dot_product_attention``.

Shapes: batch, heads (query), kv_heads (GQA), q_len, kv_len, head_dim, causal.
``q_len == kv_len`` is prefill; ``q_len == 1`` is decode.
"""

from __future__ import annotations

from . import register

SHAPES = [
    # prefill
    {"batch": 1, "heads": 9, "kv_heads": 3, "q_len": 512, "kv_len": 512, "head_dim": 64, "causal": True},
    {"batch": 1, "heads": 9, "kv_heads": 3, "q_len": 2048, "kv_len": 2048, "head_dim": 64, "causal": True},
    {"batch": 1, "heads": 32, "kv_heads": 8, "q_len": 4096, "kv_len": 4096, "head_dim": 128, "causal": True},
    # decode
    {"batch": 8, "heads": 32, "kv_heads": 8, "q_len": 1, "kv_len": 8192, "head_dim": 128, "causal": False},
    {"batch": 8, "heads": 32, "kv_heads": 8, "q_len": 1, "kv_len": 32768, "head_dim": 128, "causal": False},
]


def attention_flops(shape: dict) -> float:
    """QK^T and PV matmuls (2 flops per MAC), halved for a causal square mask."""
    b, h, q, k, d = shape["batch"], shape["heads"], shape["q_len"], shape["kv_len"], shape["head_dim"]
    f = 4.0 * b * h * q * k * d
    if shape.get("causal") and q == k:
        f /= 2
    return f


@register("dense-attention", SHAPES)
def make(shape: dict, device, dtype):
    import torch
    import torch.nn.functional as F

    b, h, q, k, d = shape["batch"], shape["heads"], shape["q_len"], shape["kv_len"], shape["head_dim"]
    hk = shape.get("kv_heads", h)
    if h % hk:
        raise ValueError(f"heads {h} not a multiple of kv_heads {hk}")
    g = torch.Generator(device="cpu").manual_seed(0)
    query = torch.randn(b, h, q, d, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)
    key = torch.randn(b, hk, k, d, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)
    value = torch.randn(b, hk, k, d, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)
    causal = bool(shape.get("causal")) and q > 1
    if causal and q != k:
        raise ValueError("causal attention needs q_len == kv_len here")
    gqa = hk != h

    def fn():
        return F.scaled_dot_product_attention(query, key, value, is_causal=causal, enable_gqa=gqa)

    fn.flops = attention_flops(shape)
    # bytes moved at least once: Q, K, V in, O out
    fn.bytes = float((query.numel() + key.numel() + value.numel() + query.numel()) * query.element_size())
    return fn
