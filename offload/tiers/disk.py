"""The disk tier: one checksummed file per entry in a local directory per TP rank, written in the background."""
from __future__ import annotations

import fcntl
import itertools
import logging
import os
import queue
import secrets
import shutil
import threading
import time
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from kvplug.kv_payload import Payload, payload_nbytes
from offload.entry_format import PREFIX_BYTES, EntryCorrupt, decode_entry, encode_entry
from offload.tiers.base import SavedItem, Tier, TierEvents

if TYPE_CHECKING:
    from offload.config import OffloadConfig

logger = logging.getLogger("vllm.kvplug.offload")
ENTRY_SUFFIX = ".kv"
TMP_PREFIX = ".tmp-"  # .tmp-KEY.PID.TOKEN.SEQ: the writing process and store instance
LOCK_NAME = ".lock"
# A temp file untouched this long has no live writer (writes touch it chunk by chunk), even if its pid was
# reused (a restarted container often gets the same pids).
STALE_TEMP_SECONDS = 3600.0
# Bytes of queued disk writes the writer holds (host memory) before it drops new ones as misses.
DEFAULT_MAX_PENDING_BYTES = 2 << 30
WRITE_ERROR, QUEUE_FULL = "error", "queue_full"  # why a disk write was not done (on_failed, metric label)


class DiskDirectoryInUse(RuntimeError):
    pass


def _write_all(fd: int, chunk: bytes | memoryview) -> int:
    """Write the whole chunk (os.write may write less than asked); its byte count."""
    view = memoryview(chunk).cast("B")
    total = len(view)
    while view:
        view = view[os.write(fd, view):]
    return total


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB ({n} bytes)"


def check_free_space(root: str | os.PathLike[str], budget_bytes: int, stored_bytes: int = 0) -> bool:
    """Warn (and return False) when the filesystem under ``root`` cannot hold ``budget_bytes`` of entries:
    its free space plus the ``stored_bytes`` of entries already there (they count against the budget). The
    tier still runs: writes that meet a full disk fail and become counted misses."""
    free = shutil.disk_usage(root).free
    if budget_bytes <= free + stored_bytes:
        return True
    logger.warning("kvplug disk tier at %s: the configured disk size is %s but the filesystem has only %s "
                   "free (+ %s already stored in the tier); writes will fail for lack of space before the tier "
                   "is full: lower disk_size or free space", root, _gib(budget_bytes), _gib(free), _gib(stored_bytes))
    return False


class DiskStore:
    """One file per entry in ``root`` (mode 0700, files 0600: entries are a user's prompts). Writes go to a
    temp file, are fsynced, renamed into place and the directory is fsynced, so a crash (kill -9, power
    loss) leaves either no entry or the complete one under the real name; a failed write removes its temp
    file. Every read verifies the whole file (digest over header + payload); a bad entry is deleted,
    counted and reported as a miss.

    Restart: ``scan`` lists entry files with their sizes (a stat each, no open), so a large directory does
    not hold up engine start, and treats them as present; verification happens on read, where an entry
    damaged while the engine was down (or of an older format) is a counted miss like any other.

    One writer per directory: ``exclusive=True`` (the worker side) holds an flock on ``root/.lock`` for the
    store's lifetime and raises DiskDirectoryInUse while another process holds it, so a second engine on the
    same disk_path fails at start instead of sharing files. The scheduler side (engine core) shares rank 0's
    directory with worker 0 of the same engine and only scans: it takes no lock. Temp file names carry the
    writer's pid and a per-store random token, and ``scan`` removes only orphans (their pid is gone, or they
    are older than STALE_TEMP_SECONDS), never a live writer's."""

    def __init__(self, root: str | os.PathLike[str], on_corrupt: Callable[[str, str], None] | None = None,
                 fsync: bool = True, exclusive: bool = False) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.root.stat().st_mode & 0o077:
            self.root.chmod(0o700)  # made before entries were private (an older version: 0755)
        self.on_corrupt = on_corrupt
        self.fsync = fsync
        self.corrupt_count = 0
        self._lock = threading.Lock()
        self._owner = f"{os.getpid()}.{secrets.token_hex(8)}"
        self._seq = itertools.count()
        self._release_dir_lock = self._lock_dir() if exclusive else None

    def _lock_dir(self) -> weakref.finalize:
        fd = os.open(self.root / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DiskDirectoryInUse(f"kvplug disk tier: {self.root} is in use by another process (pid {holder}); "
                                     "give each engine its own offload disk_path") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)  # for the error message of the next one to try
        return weakref.finalize(self, os.close, fd)

    def close(self) -> None:
        """Release the directory lock (exclusive stores; it is also released when the process exits)."""
        if self._release_dir_lock is not None:
            self._release_dir_lock()

    def path(self, key: str) -> Path:
        return self.root / f"{key}{ENTRY_SUFFIX}"

    def write(self, key: str, payload: Payload) -> int:
        final = self.path(key)
        tmp = self.root / f"{TMP_PREFIX}{key}.{self._owner}.{next(self._seq)}"
        # Created 0600 here: os.replace keeps the temp file's mode.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        renamed = False
        n = 0
        try:
            try:
                for chunk in encode_entry(key, payload):
                    n += _write_all(fd, chunk)
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
            renamed = True
        finally:
            if not renamed:
                tmp.unlink(missing_ok=True)
        if self.fsync:
            try:
                _fsync_dir(self.root)  # the rename itself survives power loss
            except OSError:
                final.unlink(missing_ok=True)  # reported failed: the planner forgets it, so must the disk
                raise
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

    def _orphan_temp(self, name: str, mtime: float, now: float) -> bool:
        """True for a temp file no live writer will finish (this store's own are in flight: a failed write
        removes its temp file itself)."""
        owner = name[len(TMP_PREFIX):].split(".")  # KEY, PID, TOKEN, SEQ
        if ".".join(owner[1:3]) == self._owner:
            return False
        if now - mtime > STALE_TEMP_SECONDS:
            return True
        try:
            return not _pid_alive(int(owner[1]))
        except (IndexError, ValueError):
            return False  # not our naming: left alone until stale

    def scan(self) -> dict[str, int]:
        """Entries present after a (re)start: key -> file size, from a stat each (contents are verified on
        read). Removes orphaned temp files of interrupted writes and files too short to be an entry."""
        found: dict[str, int] = {}
        now = time.time()
        with os.scandir(self.root) as entries:
            for e in entries:
                name = e.name
                try:
                    if name.startswith(TMP_PREFIX):
                        if self._orphan_temp(name, e.stat().st_mtime, now):
                            os.unlink(e.path)
                        continue
                    if not name.endswith(ENTRY_SUFFIX):
                        continue
                    size = e.stat().st_size
                except FileNotFoundError:  # renamed or removed by its writer meanwhile
                    continue
                key = name[:-len(ENTRY_SUFFIX)]
                if size < PREFIX_BYTES:
                    self._corrupt(key, f"at scan: {size}-byte file")
                    continue
                found[key] = size
        return found


class AsyncDiskWriter:
    """Disk-tier writes and deletes on a background thread, in submission order, so the digest, the file
    write and the fsync stay off the forward pass. A write waits for ``ready`` (the event of the
    device->host copies that filled its host memory) first. Until written, an entry is served from
    ``pending`` (a load never waits for the disk).

    A write is dropped, never retried and never blocking: when it fails (disk full, I/O error) or when
    ``max_pending_bytes`` of writes are already queued (the disk cannot keep up; ``write`` returns at once).
    Each drop is counted (``failed_writes`` / ``dropped_writes``) and reported through ``on_failed(key,
    reason)``: the scheduler side believes the entry is on disk and must forget it. The entry is then a
    future miss (recomputed), never a failed request."""

    def __init__(self, disk: DiskStore, on_written: Callable[[str, int, str], None] | None = None,
                 on_failed: Callable[[str, str], None] | None = None,
                 max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES) -> None:
        self.disk = disk
        self.on_written = on_written
        self.on_failed = on_failed
        self.max_pending_bytes = max_pending_bytes
        self.failed_writes = 0
        self.dropped_writes = 0
        self.pending_bytes = 0
        self._pending: dict[str, Payload] = {}
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="kvplug-disk-writer", daemon=True)
        self._thread.start()

    def write(self, key: str, payload: Payload, ready: Any = None, label: str = "") -> None:
        nbytes = payload_nbytes(payload)
        with self._lock:
            full = self.pending_bytes + nbytes > self.max_pending_bytes
            if full:
                self.dropped_writes += 1
            else:
                self.pending_bytes += nbytes
                self._pending[key] = payload
        if full:
            if self.dropped_writes == 1 or self.dropped_writes % 1000 == 0:
                logger.warning("kvplug disk tier: the write queue holds %s (max_pending_bytes %d): dropped entry "
                               "%s, %d dropped so far; they will be recomputed", _gib(self.pending_bytes),
                               self.max_pending_bytes, key, self.dropped_writes)
            self._report_failed(key, QUEUE_FULL)
            return
        self._queue.put(("write", key, payload, ready, label, nbytes))

    def delete(self, key: str) -> None:
        with self._lock:
            self._pending.pop(key, None)
        self._queue.put(("delete", key, None, None, "", 0))

    def pending(self, key: str) -> Payload | None:
        with self._lock:
            return self._pending.get(key)

    def flush(self) -> None:
        """Block until every submitted write and delete is on disk."""
        self._queue.join()

    def _report_failed(self, key: str, reason: str) -> None:
        if self.on_failed is None:
            return
        try:
            self.on_failed(key, reason)
        except Exception:
            logger.exception("kvplug disk tier: on_failed(%s, %s) raised", key, reason)

    def _run(self) -> None:
        while True:
            kind, key, payload, ready, label, nbytes = self._queue.get()
            try:
                if kind == "delete":
                    self.disk.delete(key)
                    continue
                try:
                    if ready is not None:
                        ready.synchronize()
                    n = self.disk.write(key, payload)
                except Exception as exc:  # disk full, I/O error, permissions...: a future miss
                    self.failed_writes += 1
                    logger.warning("kvplug disk tier: writing entry %s failed (%s); it will be recomputed", key, exc)
                    self._report_failed(key, WRITE_ERROR)
                    continue
                if self.on_written is not None:
                    self.on_written(key, n, label)
            except Exception:  # a delete's I/O error or a callback's bug must not end the writer thread
                logger.exception("kvplug disk tier: %s of entry %s failed", kind, key)
            finally:
                if kind == "write":
                    with self._lock:
                        self.pending_bytes -= nbytes
                        if self._pending.get(key) is payload:
                            del self._pending[key]
                self._queue.task_done()


def rank_dir(root: str, rank: int) -> str:
    return f"{root.rstrip('/')}/rank{rank}"


class DiskTier(Tier):
    """The worker side's disk tier: reads from ``disk``, writes and deletes through ``writer`` (in order, on
    its thread); an entry queued for writing is served from the writer's pending set."""

    name = "disk"
    entry_overhead = 1024  # bytes per entry file beyond its payload (header JSON)

    def __init__(self, disk: DiskStore, writer: AsyncDiskWriter) -> None:
        self.disk = disk
        self.writer = writer

    @classmethod
    def budget_bytes(cls, cfg: "OffloadConfig") -> int:
        return cfg.disk_bytes

    @classmethod
    def existing_entries(cls, cfg: "OffloadConfig", tp_size: int,
                         on_corrupt: Callable[[str, str], None]) -> dict[str, int]:
        disk = DiskStore(rank_dir(cfg.disk_path, 0), on_corrupt=on_corrupt)
        entries = disk.scan()
        # TP ranks' directories share the filesystem and hold the same blocks (each its head shard).
        check_free_space(disk.root, cfg.disk_bytes * tp_size, sum(entries.values()) * tp_size)
        if entries:
            logger.info("kvplug offload: %d entries from a previous run on disk at %s", len(entries), cfg.disk_path)
        return entries

    @classmethod
    def open(cls, cfg: "OffloadConfig", rank: int, events: TierEvents) -> "DiskTier":
        # The only writer of its rank directory: exclusive (a second engine on the same disk_path fails here).
        disk = DiskStore(rank_dir(cfg.disk_path, rank), on_corrupt=events.on_corrupt, exclusive=True)
        return cls(disk, AsyncDiskWriter(disk, lambda key, n, label: events.on_stored(cls.name, n, label),
                                         events.on_failed))

    def store(self, key: str, item: SavedItem, ready: Any, label: str) -> None:
        # The writer waits for ``ready``: the entry may be filled by copies still in flight.
        self.writer.write(key, item[0].entry(item[1]) if isinstance(item, tuple) else item, ready, label)

    def get(self, key: str) -> Payload | None:
        p = self.writer.pending(key)  # demoted or stored this run, not on disk yet
        return p if p is not None else self.disk.read(key)

    def release(self, key: str) -> None:
        self.writer.delete(key)

    def close(self) -> None:
        self.writer.flush()
