"""Child process for the kill -9 test: writes one good entry, signals, then writes a big one forever slowly.

    python -m tests.offload.disk_writer_child ROOT
"""
from __future__ import annotations

import sys
import time

import torch

from offload import entry_format
from offload.tiers import disk as stores

def main(root: str) -> None:
    disk = stores.DiskStore(root)
    disk.write("good", {"k": torch.arange(1000, dtype=torch.float32)})
    print("GOOD-WRITTEN", flush=True)
    orig = entry_format.encode_entry

    def slow_chunks(key, payload):
        for chunk in orig(key, payload):
            yield chunk
            time.sleep(0.2)  # the parent kills us between chunks

    stores.encode_entry = slow_chunks
    big = {f"t{i}": torch.randn(50_000) for i in range(50)}
    print("BIG-STARTED", flush=True)
    disk.write("big", big)
    print("BIG-DONE", flush=True)

if __name__ == "__main__":
    main(sys.argv[1])
