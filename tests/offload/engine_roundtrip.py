"""Offload round trips on one real vLLM engine (run in a fresh process; writes JSON for the test to check).

    python -m tests.offload.engine_roundtrip OUT.json PHASE     # PHASE = evict | restart

``llm.reset_prefix_cache()`` empties vLLM's own prefix cache (kvplug's tiers keep their entries), so the
next request for a prompt must get its prefix blocks from kvplug's connector: first from the CPU tier, then
-- after two other prompts pushed it out of the small CPU tier -- from disk, and in PHASE restart from the
disk a previous process wrote. Policies other than ``keep`` are chosen per request
(``kv_transfer_params.kvplug_policy``), as a server client would. Token ids are compared by the caller.
"""
from __future__ import annotations

import json
import sys

MAX_LEN = 2048
MAX_TOKENS = 8


def prompt(tag: str, n_items: int = 60) -> str:
    return (f"Inventory {tag}: " + " ".join(f"item {tag}{i} weighs {(i * 37) % 91} kg." for i in range(n_items))
            + f" The heaviest item of inventory {tag} is")


def connector_counters(_worker=None) -> dict:
    """Runs in the worker (collective_rpc): the connector's plain counters and the backend's mask counters."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    from kvplug.dropped_tokens import registry

    side = get_kv_transfer_group().worker_side
    disk = side.tiers.get("disk")
    return {"loaded": dict(side.stats.loaded_blocks), "saved": side.stats.saved_blocks,
            "cpu_entries": len(side.tiers["cpu"]._entries), "masked": registry().stats(),
            "disk_corrupt": disk.disk.corrupt_count if disk is not None else 0,
            "layer_saves": side.stats.layerwise_saves, "layer_load_waits": side.stats.layerwise_load_waits}


def main(out: str, phase: str) -> None:
    import os

    # collective_rpc ships connector_counters (a function) to the worker; vLLM pickles only when allowed.
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    from kvplug import models, vllm_compat

    llm = LLM(model=str(models.prepare()), max_model_len=MAX_LEN, seed=0, enable_prefix_caching=True,
              kv_cache_memory_bytes=256 << 20, max_num_seqs=2, enforce_eager=True,  # no torch.compile: minutes on CPU
              kv_transfer_config=KVTransferConfig(**vllm_compat.kv_transfer_config()))

    def gen(p: str, policy: str | None = None) -> list[int]:
        extra = {"kv_transfer_params": {"kvplug_policy": policy}} if policy else None
        sp = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, extra_args=extra)
        return list(llm.generate([p], sp, use_tqdm=False)[0].outputs[0].token_ids)

    def counters() -> dict:
        return llm.collective_rpc(connector_counters)[0]

    res: dict = {"steps": []}

    def step(name: str, p: str, policy: str | None = None, reset_before: bool = False) -> None:
        if reset_before:
            assert llm.reset_prefix_cache(), "vLLM refused to reset its prefix cache"
        before = counters()
        ids = gen(p, policy)
        after = counters()
        res["steps"].append({
            "name": name, "policy": policy or "keep", "ids": ids,
            "loaded_cpu": after["loaded"]["cpu"] - before["loaded"]["cpu"],
            "loaded_disk": after["loaded"]["disk"] - before["loaded"]["disk"],
            "saved": after["saved"] - before["saved"],
            "layer_saves": after["layer_saves"] - before["layer_saves"],
            "layer_load_waits": after["layer_load_waits"] - before["layer_load_waits"],
            "masked_batches": after["masked"]["batches"] - before["masked"]["batches"]})

    A = prompt("A")
    if phase == "evict":
        step("first", A)  # computed, then saved to the CPU tier
        step("gpu_hit", A)  # vLLM's own prefix cache: never evicted
        step("cpu_reload", A, reset_before=True)
        step("filler_b", prompt("B"))  # B and C fill the CPU tier: A's entries are demoted to disk
        step("filler_c", prompt("C"))
        step("disk_reload", A, reset_before=True)
        for tag, policy in (("D", "drop:streaming"), ("E", "quant:int8")):
            step(f"{policy}_first", prompt(tag), policy)
            step(f"{policy}_reload", prompt(tag), policy, reset_before=True)
        # Policy isolation: a lossy reload sits in vLLM's GPU prefix cache; a `keep` request on the same prefix
        # must get exact KV (the keep entries the first two steps stored), never the lossy blocks.
        F = prompt("F")
        step("mix_keep_first", F)
        step("mix_keep_ref", F)  # vLLM's own prefix cache: the reference
        for policy in ("drop:streaming", "quant:int8"):
            step(f"mix_{policy}_first", F, policy, reset_before=True)
            step(f"mix_{policy}_reload", F, policy, reset_before=True)
            step(f"mix_keep_after_{policy}", F)
    else:
        step("restart_reload", A)
    res["counters"] = counters()
    with open(out, "w") as fh:
        json.dump(res, fh)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
