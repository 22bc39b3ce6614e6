"""What the offload connector is handed by the composition layer (kvplug/plugin.py): its config section, the
metrics config and the cache policies. vLLM instantiates the connector by class path, so the connector reads
these from here (``current()``) instead of importing the features that provide them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Protocol

import torch

from kvplug.kv_payload import BlockContext, Payload

if TYPE_CHECKING:
    from offload.config import OffloadConfig


class KvPolicy(Protocol):
    """What offload uses of a cache policy (cache_policies.base.CachePolicy implements it)."""

    name: str
    layerwise: bool
    drops_tokens: bool
    lossless: bool

    def encode(self, k: torch.Tensor, v: torch.Tensor, ctx: BlockContext) -> list[Payload]: ...

    def encode_groups(self, k: torch.Tensor, v: torch.Tensor,
                      ctx: BlockContext) -> list[tuple[list[int], Payload]]: ...

    def decode(self, payloads: list[Payload], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Any]: ...

    def decode_stacked(self, batch: Payload, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Any]: ...

    def size_class(self, block_start: int, block_tokens: int, prefix_len: int) -> object: ...

    def observation_window_tokens(self, prompt_len: int) -> int: ...


class PolicyProvider(Protocol):
    # kv_transfer_params keys: the request's policy name, and False to keep the request out of the tiers.
    policy_key: str  # "kvplug_policy"
    offload_key: str  # "kvplug_offload"

    def create(self, name: str) -> KvPolicy: ...

    def choose(self, prefix_tokens: int, kv_transfer_params: Mapping[str, Any] | None) -> str:
        """The policy name of a request (never raises: an unknown requested name gets the default)."""
        ...

    def names(self) -> tuple[str, ...]: ...


@dataclass(frozen=True)
class OffloadWiring:
    offload: "OffloadConfig"
    metrics: Any  # kvplug's MetricsConfig
    policies: PolicyProvider


class OffloadNotConfigured(RuntimeError):
    pass


_current: OffloadWiring | None = None


def configure(offload: "OffloadConfig", metrics: Any, policies: PolicyProvider) -> None:
    global _current
    _current = OffloadWiring(offload, metrics, policies)


def current() -> OffloadWiring:
    if _current is None:
        raise OffloadNotConfigured("kvplug's offload connector was not configured in this process: kvplug's vLLM "
                                   "plugin (kvplug.plugin.register) calls offload.wiring.configure() first; is the "
                                   "kvplug package installed in this environment?")
    return _current
