"""Where entry bytes live (worker side): pinned CPU memory and a local-disk directory.

The scheduler side decides what goes where (offload/tiers.py); these only execute. Both are keyed by the
entry key (offload/keys.py), which already includes the model, the KV layout and the policy.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from cache_policies.base import Payload, payload_nbytes
from offload.entry_format import PREFIX_BYTES, EntryCorrupt, decode_entry, encode_entry, read_header
from offload.host_memory import HostMemory

if TYPE_CHECKING:
    from offload.layerwise import Segment

logger = logging.getLogger("vllm.kvplug.offload")
ENTRY_SUFFIX = ".kv"
TMP_PREFIX = ".tmp-"


class CpuStore:
    """Entries in host memory (the connector's ``HostMemory``: the pinned pool on CUDA, plain tensors on CPU).

    A released entry's memory is never recycled here: other readers may still hold it (the disk writer of a
    demoted entry, a load whose host->device copy is in flight). Its buffer goes back to the pool only when
    its last view has died and the copy streams have passed that moment (``PinnedPool``), so an entry is
    never overwritten while somebody reads it, and freed memory does not count against the tier twice.
    """

    def __init__(self, host: HostMemory | None = None) -> None:
        self.host = host if host is not None else HostMemory()
        self._entries: dict[str, Payload] = {}
        self._slots: dict[str, tuple["Segment", int]] = {}  # entries that are views of a saved segment
        self.used_bytes = 0

    def put(self, key: str, payload: Payload) -> None:
        if key in self._entries:
            return
        buf = {k: self.host.empty(tuple(t.shape), t.dtype) for k, t in payload.items()}
        for k, t in payload.items():
            buf[k].copy_(t)
        self._entries[key] = buf
        self.used_bytes += payload_nbytes(buf)

    def adopt(self, key: str, segment: "Segment", slot: int) -> None:
        """Store slot ``slot`` of ``segment`` (host memory the layer-wise save already filled) without a copy."""
        if key in self._entries:
            return
        payload = segment.entry(slot)
        self._entries[key] = payload
        self._slots[key] = (segment, slot)
        self.used_bytes += payload_nbytes(payload)

    def get(self, key: str) -> Payload | None:
        return self._entries.get(key)

    def locate(self, key: str) -> tuple["Segment", int] | None:
        """(segment, slot) of an adopted entry: consecutive slots load with one copy per layer."""
        return self._slots.get(key)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def release(self, key: str) -> None:
        """Forget ``key``; its memory is freed once no reader holds it any more (see the class docstring)."""
        self._slots.pop(key, None)
        buf = self._entries.pop(key, None)
        if buf is not None:
            self.used_bytes -= payload_nbytes(buf)


class DiskStore:
    """One file per entry in ``root``. Writes go to a temp file, are fsynced, then renamed into place, so a
    crash (kill -9) leaves either the old state or the complete new entry, never a half entry under the
    real name. Every read verifies length and CRC; a bad entry is deleted, counted and reported as a miss."""

    def __init__(self, root: str | os.PathLike[str], on_corrupt: Callable[[str, str], None] | None = None,
                 fsync: bool = True) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.on_corrupt = on_corrupt
        self.fsync = fsync
        self.corrupt_count = 0
        self._lock = threading.Lock()

    def path(self, key: str) -> Path:
        return self.root / f"{key}{ENTRY_SUFFIX}"

    def write(self, key: str, payload: Payload) -> int:
        final = self.path(key)
        tmp = self.root / f"{TMP_PREFIX}{key}.{os.getpid()}.{threading.get_ident()}"
        n = 0
        with open(tmp, "wb") as fh:
            for chunk in encode_entry(key, payload):
                fh.write(chunk)
                n += len(chunk) if isinstance(chunk, bytes) else chunk.nbytes
            fh.flush()
            if self.fsync:
                os.fsync(fh.fileno())
        os.replace(tmp, final)
        return n

    def _corrupt(self, key: str, why: str) -> None:
        with self._lock:
            self.corrupt_count += 1
        logger.warning("kvplug disk tier: entry %s is corrupt (%s); treated as a miss and deleted", key, why)
        try:
            self.path(key).unlink()
        except FileNotFoundError:
            pass
        if self.on_corrupt is not None:
            self.on_corrupt(key, why)

    def read(self, key: str) -> Payload | None:
        try:
            blob = self.path(key).read_bytes()
        except FileNotFoundError:
            return None
        try:
            return decode_entry(blob, expect_key=key)
        except (EntryCorrupt, KeyError, ValueError, TypeError, AttributeError, RuntimeError) as exc:
            self._corrupt(key, str(exc) or type(exc).__name__)
            return None

    def delete(self, key: str) -> None:
        try:
            self.path(key).unlink()
        except FileNotFoundError:
            pass

    def scan(self) -> dict[str, int]:
        """Entries present after a (re)start: key -> file size. Removes temp files of interrupted writes and
        entries whose header or length is wrong (those count as corrupt); the CRC is checked on read."""
        found: dict[str, int] = {}
        for p in self.root.iterdir():
            name = p.name
            if name.startswith(TMP_PREFIX):
                p.unlink(missing_ok=True)
                continue
            if not name.endswith(ENTRY_SUFFIX):
                continue
            key = name[:-len(ENTRY_SUFFIX)]
            try:
                size = p.stat().st_size
                with open(p, "rb") as fh:
                    head = fh.read(PREFIX_BYTES + 4096)
                header, start = read_header(head)
                if header.get("key") != key or size != start + int(header["payload_len"]):
                    raise EntryCorrupt("length or key mismatch")
            except (OSError, EntryCorrupt, KeyError, ValueError) as exc:
                self._corrupt(key, f"at scan: {exc}")
                continue
            found[key] = size
        return found


class AsyncDiskWriter:
    """Disk-tier writes and deletes on a background thread, in submission order, so the checksum, the
    file write and the fsync stay off the forward pass. A write waits for ``ready`` (the event of the
    device->host copies that filled its host memory) first. Until written, an entry is served from
    ``pending`` (a load never waits for the disk). A failed write is logged and counted; the entry is then
    a future miss (recomputed), never a failed request."""

    def __init__(self, disk: DiskStore, on_written: Callable[[str, int, str], None] | None = None) -> None:
        self.disk = disk
        self.on_written = on_written
        self.failed_writes = 0
        self._pending: dict[str, Payload] = {}
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="kvplug-disk-writer", daemon=True)
        self._thread.start()

    def write(self, key: str, payload: Payload, ready: Any = None, label: str = "") -> None:
        with self._lock:
            self._pending[key] = payload
        self._queue.put(("write", key, payload, ready, label))

    def delete(self, key: str) -> None:
        with self._lock:
            self._pending.pop(key, None)
        self._queue.put(("delete", key, None, None, ""))

    def pending(self, key: str) -> Payload | None:
        with self._lock:
            return self._pending.get(key)

    def flush(self) -> None:
        """Block until every submitted write and delete is on disk."""
        self._queue.join()

    def _run(self) -> None:
        while True:
            kind, key, payload, ready, label = self._queue.get()
            try:
                if kind == "delete":
                    self.disk.delete(key)
                    continue
                if ready is not None:
                    ready.synchronize()
                n = self.disk.write(key, payload)
                if self.on_written is not None:
                    self.on_written(key, n, label)
            except Exception as exc:  # disk full, permissions, ...: a future miss, never a failed request
                self.failed_writes += 1
                logger.warning("kvplug disk tier: writing entry %s failed (%s); it will be recomputed", key, exc)
            finally:
                if kind == "write":
                    with self._lock:
                        if self._pending.get(key) is payload:
                            del self._pending[key]
                self._queue.task_done()
