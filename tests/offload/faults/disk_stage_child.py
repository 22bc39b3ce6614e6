"""Child process for the fault tests: writes one complete entry, then stops inside the write of a second at
STAGE and waits to be SIGKILLed (or to read a line on stdin, then finishes).

    python -m tests.offload.faults.disk_stage_child ROOT STAGE [--exclusive]

Stages: mid-write (header and part of the payload written), before-fsync (all bytes written),
before-rename (fsynced), after-rename (renamed, directory not fsynced yet). Prints GOOD-WRITTEN, then
STAGE <name> once stopped there.
"""
from __future__ import annotations

import os
import sys

import torch

from offload.tiers import disk as stores

STAGES = ("mid-write", "before-fsync", "before-rename", "after-rename")


def entry_payload(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"t{i}": torch.randn(20_000, generator=g) for i in range(6)}


def stop(stage: str) -> None:
    print(f"STAGE {stage}", flush=True)
    sys.stdin.readline()  # the parent kills us here, or lets us go on


def install(stage: str) -> None:
    if stage == "mid-write":
        real_write_all, written = stores._write_all, []

        def write_all(fd, chunk):
            n = real_write_all(fd, chunk)
            written.append(n)
            if len(written) == 3:
                stop(stage)
            return n

        stores._write_all = write_all
    elif stage == "before-fsync":
        real_fsync = os.fsync

        def fsync(fd):
            stop(stage)
            os.fsync = real_fsync
            real_fsync(fd)

        os.fsync = fsync
    else:
        real_replace = os.replace

        def replace(src, dst):
            if stage == "before-rename":
                stop(stage)
            real_replace(src, dst)
            if stage == "after-rename":
                stop(stage)

        os.replace = replace


def main(root: str, stage: str, exclusive: bool) -> None:
    disk = stores.DiskStore(root, exclusive=exclusive)
    disk.write("good", entry_payload(0))
    print("GOOD-WRITTEN", flush=True)
    install(stage)
    disk.write("victim", entry_payload(1))
    print("VICTIM-WRITTEN", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], "--exclusive" in sys.argv[3:])
