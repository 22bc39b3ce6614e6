"""What the connector's scheduler side hands its workers each step, and what the workers report back."""
from __future__ import annotations

from dataclasses import dataclass, field

from kvplug import vllm_compat
from offload.tiers.planner import TierOp

_Base, _Metadata, _Role, _WorkerMetadata = vllm_compat.kv_connector_api()


@dataclass
class LoadSpec:
    policy: str
    keys: list[str]
    block_ids: list[int]


@dataclass
class SaveSpec:
    policy: str
    keys: list[str]
    block_ids: list[int]
    block_starts: list[int]
    prefix_len: int
    # Observation window (SnapKV): (block id, offset) of the last prompt tokens, in order.
    window_slots: list[tuple[int, int]] = field(default_factory=list)
    req_id: str = ""
    # The scheduler delays freeing the request's blocks until a worker reports this save done (get_finished).
    deferred: bool = False


@dataclass
class KvplugConnectorMetadata(_Metadata):  # type: ignore[misc, valid-type]
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)
    tier_ops: list[TierOp] = field(default_factory=list)
    fresh_block_ids: list[int] = field(default_factory=list)  # reallocated: forget their dropped-token masks
    # Every block this step may write that vLLM's prefix cache did not supply (computed or loaded into): a
    # superset of fresh_block_ids + load targets. A block whose save is still copying must not be among them.
    allocated_block_ids: list[int] = field(default_factory=list)


@dataclass
class KvplugWorkerMetadata(_WorkerMetadata):  # type: ignore[misc, valid-type]
    unreadable_keys: set[str] = field(default_factory=set)

    def aggregate(self, other: "KvplugWorkerMetadata") -> "KvplugWorkerMetadata":
        return KvplugWorkerMetadata(self.unreadable_keys | other.unreadable_keys)
