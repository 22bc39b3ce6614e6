"""Sparse prefill patterns, one per file; ``registry.PATTERNS`` lists them."""
