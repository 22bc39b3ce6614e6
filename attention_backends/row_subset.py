"""Run the dense backend on a subset of a batch's rows (with metadata built for just those requests).

Sparse prefill and retrieval decode both hand the rows they do not handle back to the parent backend.
"""
from __future__ import annotations

from typing import Any, Callable

import torch


def forward_rows(dense_forward: Callable[..., Any], layer: Any, query: torch.Tensor, key: torch.Tensor | None,
                 value: torch.Tensor | None, kv_cache: torch.Tensor, metadata: Any, rows: torch.Tensor,
                 output: torch.Tensor) -> None:
    """output[rows] = dense attention of query[rows] under ``metadata`` (built for exactly those rows)."""
    rows_out = output.new_empty((rows.numel(), *output.shape[1:]))
    dense_forward(layer, query[rows], None if key is None else key[rows], None if value is None else value[rows],
                  kv_cache, metadata, rows_out)
    output[rows] = rows_out
