"""The ``sparse_prefill`` config section (kvplug/settings.py composes it into kvplug's config)."""
from __future__ import annotations

from kvplug.config import KvplugConfigError, Section


class SparsePrefillConfig(Section):
    """Dynamic sparse prefill (MInference patterns): attention_backends/sparse_prefill/."""

    enabled: bool = False
    # A prefill chunk goes sparse once its sequence (cached context + chunk) holds this many tokens;
    # shorter prompts, and every decode token, stay dense. 32K: measured on an H100 (BENCHMARKS.md), the
    # per-layer index build costs 2.6-6 ms at 4K-32K while dense attention costs 0.3 ms at 4K and 12.7 ms
    # at 32K, so below ~32K the sparse path cannot win whatever the density.
    min_prompt_tokens: int = 32768
    # Per-head pattern JSON (`kvplug patterns search` writes one); "auto" = the config shipped for the
    # served model if there is one, else default_pattern on every head.
    pattern_config: str = "auto"
    default_pattern: str = "vertical_slash"
    # Budgets of default_pattern (omitted ones take the pattern's defaults).
    default_budgets: dict[str, int] = {}

    def validate(self, path: str) -> None:
        if self.min_prompt_tokens < 1:
            raise KvplugConfigError(f"{path}.min_prompt_tokens must be >= 1, got {self.min_prompt_tokens}")
        if self == SparsePrefillConfig(min_prompt_tokens=self.min_prompt_tokens, enabled=self.enabled):
            return  # defaults are valid; skip importing the pattern registry (it pulls in torch)
        from attention_backends.sparse_prefill import head_config  # optional: torch, only for non-defaults
        from attention_backends.sparse_prefill.patterns.base import PatternBudgetError

        try:
            head_config.check_head(head_config.HeadPattern(pattern=self.default_pattern, budgets=self.default_budgets))
        except PatternBudgetError as exc:
            key = "default_pattern" if "unknown sparse prefill pattern" in str(exc) else "default_budgets"
            raise KvplugConfigError(f"{path}.{key}: {exc}") from None
        if self.pattern_config != "auto":
            try:
                head_config.load(self.pattern_config)
            except PatternBudgetError as exc:
                raise KvplugConfigError(f"{path}.pattern_config: {exc}") from None
