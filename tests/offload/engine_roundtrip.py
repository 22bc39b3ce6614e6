"""Offload round trip on a real vLLM engine (run in a fresh process per engine; prints JSON).

    python -m tests.offload.engine_roundtrip OUT.json PHASE     # PHASE = evict | restart

The GPU (here: CPU-engine) KV cache holds ~one prompt, so serving another prompt evicts the first from
vLLM's prefix cache; kvplug's connector must then supply it from the CPU tier, later from disk, and after a
restart from the disk a previous process wrote. Token ids are compared by the caller.
"""
from __future__ import annotations

import json
import sys

MAX_LEN = 1024


def prompt(tag: str, n_items: int = 110) -> str:
    return (f"Inventory {tag}: " + " ".join(f"item {tag}{i} weighs {(i * 37) % 91} kg." for i in range(n_items))
            + f" The heaviest item of inventory {tag} is")


def connector_counters(worker) -> dict:
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    side = get_kv_transfer_group().worker_side
    return {"loaded": dict(side.loaded_blocks), "saved": side.saved_blocks, "cpu_entries": len(side.cpu._entries),
            "disk_corrupt": side.disk.corrupt_count if side.disk else 0}


def main(out: str, phase: str) -> None:
    import os

    # collective_rpc ships connector_counters (a function) to the worker; vLLM pickles only when allowed.
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    from kvplug import models, vllm_compat

    llm = LLM(model=str(models.prepare()), max_model_len=MAX_LEN, seed=0, enable_prefix_caching=True,
              # ~1.5 prompts: serving one other prompt evicts the first from vLLM's own cache.
              kv_cache_memory_bytes=int(1.5 * MAX_LEN) * 30 * 2 * 3 * 64 * 2,
              max_num_batched_tokens=MAX_LEN, max_num_seqs=1,
              kv_transfer_config=KVTransferConfig(**vllm_compat.kv_transfer_config()))
    sp = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)

    def gen(p: str) -> list[int]:
        return list(llm.generate([p], sp, use_tqdm=False)[0].outputs[0].token_ids)

    def counters() -> dict:
        return llm.collective_rpc(connector_counters)[0]

    res: dict = {"steps": []}
    P = prompt("A")
    if phase == "evict":
        for name, p in [("first", P), ("gpu_hit", P), ("filler1", prompt("B")), ("cpu_reload", P),
                        ("filler2", prompt("C")), ("filler3", prompt("D")), ("filler4", prompt("E")),
                        ("disk_reload", P)]:
            before = counters()
            ids = gen(p)
            after = counters()
            res["steps"].append({"name": name, "ids": ids, "loaded_cpu": after["loaded"]["cpu"] - before["loaded"]["cpu"],
                                 "loaded_disk": after["loaded"]["disk"] - before["loaded"]["disk"],
                                 "saved": after["saved"] - before["saved"]})
    else:
        ids = gen(P)
        c = counters()
        res["steps"].append({"name": "restart_reload", "ids": ids, "loaded_cpu": c["loaded"]["cpu"],
                             "loaded_disk": c["loaded"]["disk"], "saved": c["saved"]})
    res["counters"] = counters()
    json.dump(res, open(out, "w"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
