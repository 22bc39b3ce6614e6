"""Prefix-cache policies: how a shared context's KV blocks are kept off the GPU (keep / quantize / drop).

One policy per file, all listed in ``cache_policies.registry``.
"""
