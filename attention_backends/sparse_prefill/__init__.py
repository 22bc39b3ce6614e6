"""Dynamic sparse prefill (MInference patterns) for kvplug's attention backend.

plan (once per batch, host metadata only) -> per layer: build the sparse index from this chunk's queries
and the sequence's keys -> sparse attention over the paged KV cache. Torch reference on CPU, Triton on GPU.
"""
