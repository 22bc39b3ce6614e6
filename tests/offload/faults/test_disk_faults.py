"""Fault injection on the disk tier (CPU only, no engine): power loss, kill -9 at every write stage, disk
full / I/O errors, a full write queue, damaged headers and payloads, two processes on one directory.

The rule under test: an entry reads back exactly as it was stored, or it is a (counted) miss."""
from __future__ import annotations

import errno
import os
import random
import re
import signal
import stat
import subprocess
import sys
import threading
from collections import namedtuple
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch

from offload import entry_format
from offload.layout import KvLayout
from offload.scheduler_side import SchedulerSide
from offload.tiers import disk as stores
from offload.tiers.disk import AsyncDiskWriter, DiskDirectoryInUse, DiskStore
from tests.offload.faults.disk_stage_child import STAGES, entry_payload
from tests.offload.test_layerwise import POLICIES, make_worker, run_step, save_meta
from tests.offload.test_tiers import dead_pid, payload, same

REPO = Path(__file__).resolve().parents[3]


def temp_files(root: Path) -> list[str]:
    return [p.name for p in root.iterdir() if p.name.startswith(stores.TMP_PREFIX)]


def served_exactly_or_missed(disk: DiskStore, key: str, want: dict) -> bool:
    got = disk.read(key)
    return got is None or same(got, want)


# --- damaged bytes: power loss, fuzzing, older format -------------------------------------------------

def entry_bytes(key="a", p=None) -> bytes:
    return b"".join(bytes(c) for c in entry_format.encode_entry(key, p if p is not None else payload(n=8)))


def test_every_flipped_byte_of_header_or_payload_is_a_counted_miss(tmp_path):
    """A damaged tensor offset, shape or dtype in the header is caught like a damaged payload byte."""
    disk = DiskStore(tmp_path)
    blob = entry_bytes()
    for i in range(len(blob)):
        for mask in (0x01, 0xFF):
            damaged = bytearray(blob)
            damaged[i] ^= mask
            disk.path("a").write_bytes(bytes(damaged))
            assert disk.read("a") is None, f"byte {i} ^ {mask:#x} was served"
    assert disk.corrupt_count == 2 * len(blob)


def test_random_damage_never_serves_other_bytes_or_raises(tmp_path):
    disk = DiskStore(tmp_path)
    blob = entry_bytes()
    rng = random.Random(0)
    for _ in range(500):
        damaged = bytearray(blob)
        for _ in range(rng.randint(1, 8)):
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        if rng.random() < 0.3:
            damaged = damaged[:rng.randrange(len(damaged))] + bytes(rng.randrange(64))
        disk.path("a").write_bytes(bytes(damaged))
        assert served_exactly_or_missed(disk, "a", payload(n=8))


@pytest.mark.parametrize("cut", ["empty", "in-prefix", "in-header", "header-only", "in-payload", "last-byte"])
def test_power_loss_truncated_entry_file_is_a_counted_miss(tmp_path, cut):
    """Renamed but its data never reached the disk (no fsync before the rename, a lying disk): short file."""
    blob = entry_bytes()
    header_end = entry_format.PREFIX_BYTES + int.from_bytes(blob[entry_format.PREFIX_BYTES - 4:
                                                                 entry_format.PREFIX_BYTES], "little")
    keep = {"empty": 0, "in-prefix": entry_format.PREFIX_BYTES - 1, "in-header": header_end - 5,
            "header-only": header_end, "in-payload": header_end + 7, "last-byte": len(blob) - 1}[cut]
    DiskStore(tmp_path).write("a", payload(n=8))
    (tmp_path / "a.kv").write_bytes(blob[:keep])
    restarted = DiskStore(tmp_path)
    restarted.scan()
    assert restarted.read("a") is None and restarted.corrupt_count == 1
    assert not (tmp_path / "a.kv").exists()


def test_power_loss_zeroed_blocks_of_entry_file_are_a_counted_miss(tmp_path):
    """The file has its size but some of its blocks were never written (they read as zeros)."""
    blob = bytearray(entry_bytes(p=payload(n=4096)))
    blob[4096:8192] = bytes(4096)
    (tmp_path / "a.kv").write_bytes(bytes(blob))
    restarted = DiskStore(tmp_path)
    assert set(restarted.scan()) == {"a"}
    assert restarted.read("a") is None and restarted.corrupt_count == 1


def test_power_loss_before_rename_leaves_a_temp_file_that_is_removed_and_never_read(tmp_path):
    blob = entry_bytes()
    (tmp_path / f".tmp-a.{dead_pid()}.0123abcd.0").write_bytes(blob)  # complete, never renamed
    (tmp_path / f".tmp-b.{dead_pid()}.0123abcd.1").write_bytes(blob[:100])
    restarted = DiskStore(tmp_path)
    assert restarted.scan() == {} and temp_files(tmp_path) == []
    assert restarted.read("a") is None and restarted.corrupt_count == 0  # a plain miss


def test_entry_of_the_previous_format_version_is_a_counted_miss(tmp_path):
    old = bytearray(entry_bytes())
    old[:len(entry_format.MAGIC)] = b"KVPLUG1\0"
    (tmp_path / "a.kv").write_bytes(bytes(old))
    disk = DiskStore(tmp_path)
    assert disk.read("a") is None and disk.corrupt_count == 1


# --- kill -9 at every stage of a write ------------------------------------------------------------------

def start_child(root: Path, stage: str, exclusive: bool = False) -> subprocess.Popen:
    args = [sys.executable, "-m", "tests.offload.faults.disk_stage_child", str(root), stage]
    child = subprocess.Popen(args + (["--exclusive"] if exclusive else []), cwd=REPO, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "GOOD-WRITTEN"
    assert child.stdout.readline().strip() == f"STAGE {stage}"
    return child


def kill_9(child: subprocess.Popen) -> None:
    os.kill(child.pid, signal.SIGKILL)
    child.wait(30)
    assert child.returncode == -signal.SIGKILL


@pytest.mark.parametrize("stage", STAGES)
def test_kill_9_at_every_write_stage_then_restart(tmp_path, stage):
    kill_9(start_child(tmp_path, stage))
    restarted = DiskStore(tmp_path)
    found = restarted.scan()
    assert temp_files(tmp_path) == []  # the dead writer's temp file is gone
    assert same(restarted.read("good"), entry_payload(0))
    assert served_exactly_or_missed(restarted, "victim", entry_payload(1))
    # Renamed means complete: the page cache survives a kill -9 (only power loss loses unsynced data).
    assert ("victim" in found) == (stage == "after-rename")
    assert restarted.corrupt_count == 0


# --- disk full, I/O errors, a full queue ----------------------------------------------------------------

def fail_at(monkeypatch, where: str, err: int) -> None:
    """Make one step of DiskStore.write fail with ``err`` (after really writing part of the file)."""
    exc = OSError(err, os.strerror(err))
    if where == "write":
        real, calls = stores._write_all, []

        def write_all(fd, chunk):
            calls.append(real(fd, chunk))
            if len(calls) == 2:
                raise exc
            return calls[-1]

        monkeypatch.setattr(stores, "_write_all", write_all)
    elif where in ("fsync", "dir-fsync"):
        real_fsync = os.fsync

        def fsync(fd):
            if stat.S_ISDIR(os.fstat(fd).st_mode) == (where == "dir-fsync"):
                raise exc
            real_fsync(fd)

        monkeypatch.setattr(os, "fsync", fsync)
    else:
        monkeypatch.setattr(os, "replace", mock.Mock(side_effect=exc))


@pytest.mark.parametrize("where,err", [("write", errno.ENOSPC), ("write", errno.EIO), ("fsync", errno.EIO),
                                       ("rename", errno.EIO), ("dir-fsync", errno.EIO)])
def test_failed_write_removes_its_files_reports_the_key_and_the_writer_goes_on(tmp_path, monkeypatch, where, err):
    failed = []
    writer = AsyncDiskWriter(DiskStore(tmp_path), on_failed=lambda key, reason: failed.append((key, reason)))
    with monkeypatch.context() as m:
        fail_at(m, where, err)
        writer.write("a", payload())
        writer.flush()
    assert failed == [("a", stores.WRITE_ERROR)] and writer.failed_writes == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no temp file, no entry the planner forgot
    assert writer.pending("a") is None and writer.pending_bytes == 0
    writer.write("b", payload(1))  # the writer thread survived
    writer.flush()
    assert same(writer.disk.read("b"), payload(1)) and len(failed) == 1


def test_full_write_queue_drops_new_writes_as_reported_misses(tmp_path):
    gate = threading.Event()

    class SlowDisk(DiskStore):
        def write(self, key, p):
            gate.wait(30)
            return super().write(key, p)

    nbytes = sum(t.numel() * t.element_size() for t in payload().values())
    failed = []
    writer = AsyncDiskWriter(SlowDisk(tmp_path), on_failed=lambda key, reason: failed.append((key, reason)),
                             max_pending_bytes=nbytes + nbytes // 2)
    writer.write("a", payload(0))
    writer.write("b", payload(1))  # returns: dropped, never waits for the disk
    assert failed == [("b", stores.QUEUE_FULL)] and writer.dropped_writes == 1
    assert writer.pending("b") is None and same(writer.pending("a"), payload(0))
    gate.set()
    writer.flush()
    assert same(writer.disk.read("a"), payload(0)) and writer.disk.read("b") is None
    writer.write("c", payload(2))  # room again
    writer.flush()
    assert same(writer.disk.read("c"), payload(2)) and len(failed) == 1 and writer.pending_bytes == 0


@pytest.mark.parametrize("reason", [stores.WRITE_ERROR, stores.QUEUE_FULL])
def test_worker_reports_dropped_disk_writes_so_the_scheduler_forgets_them(tmp_path, monkeypatch, reason):
    side = make_worker(tmp_path)
    side.m = mock.MagicMock()
    if reason == stores.QUEUE_FULL:
        side.tiers["disk"].writer.max_pending_bytes = 0
    else:
        monkeypatch.setattr(stores, "_write_all", mock.Mock(side_effect=OSError(errno.ENOSPC, "full")))
    meta, keys = save_meta("keep", [1, 2], tier="disk")
    run_step(side, meta)
    side.close()
    side.m.disk_write_failures.labels.assert_called_with(reason=reason)
    assert side.m.disk_write_failures.labels.return_value.inc.call_count == 2
    report = side.worker_meta()
    assert report.unreadable_keys == set(keys)
    sched = scheduler_side(side.cfg, monkeypatch)
    for k in keys:
        sched.planner.plan_store(k, 100)
    sched.update_connector_output(SimpleNamespace(kv_connector_worker_meta=report, finished_sending=None))
    assert all(sched.planner.where(k) is None for k in keys)


def scheduler_side(cfg, monkeypatch):
    layout = KvLayout(model="m", dtype="float32", num_layers=4, kv_heads=2, head_dim=32,
                      block_size=16, kv_cache_dtype="auto", tp_rank=0, tp_size=1)
    return SchedulerSide(layout, cfg, POLICIES)


# --- files, directory, free space -----------------------------------------------------------------------

def test_directory_is_0700_and_files_0600_whatever_the_umask(tmp_path):
    old_umask = os.umask(0)
    try:
        (tmp_path / "old").mkdir(mode=0o755)  # a directory an older version made
        for root in (tmp_path / "new" / "rank0", tmp_path / "old"):
            disk = DiskStore(root, exclusive=True)
            disk.write("a", payload())
            assert stat.S_IMODE(root.stat().st_mode) == 0o700
            assert stat.S_IMODE(disk.path("a").stat().st_mode) == 0o600
            assert stat.S_IMODE((root / stores.LOCK_NAME).stat().st_mode) == 0o600
    finally:
        os.umask(old_umask)


def test_write_fsyncs_the_directory_after_the_rename(tmp_path, monkeypatch):
    synced = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", lambda a, b: (synced.append("rename"), real_replace(a, b)))
    DiskStore(tmp_path).write("a", payload())
    assert synced == ["file", "rename", "dir"]


def test_disk_size_beyond_free_space_warns_naming_both(tmp_path, monkeypatch, caplog):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(stores.shutil, "disk_usage", lambda path: usage(2**40, 0, 10 * 2**30))
    with caplog.at_level("WARNING", logger="vllm.kvplug.offload"):
        assert stores.check_free_space(tmp_path, 8 * 2**30, 0)
        assert stores.check_free_space(tmp_path, 12 * 2**30, 3 * 2**30)  # stored entries count as room
        assert not caplog.records
        assert not stores.check_free_space(tmp_path, 100 * 2**30, 2**30)
    assert "100.00 GiB" in caplog.text and "10.00 GiB" in caplog.text and str(tmp_path) in caplog.text


# --- two processes on one directory ---------------------------------------------------------------------

def test_second_writer_on_a_directory_fails_naming_it_and_the_scan_keeps_its_live_temp_file(tmp_path):
    child = start_child(tmp_path, "mid-write", exclusive=True)
    try:
        live_temp = temp_files(tmp_path)
        assert len(live_temp) == 1 and str(child.pid) in live_temp[0]
        with pytest.raises(DiskDirectoryInUse, match=f"{re.escape(str(tmp_path))}.*pid {child.pid}.*disk_path"):
            DiskStore(tmp_path, exclusive=True)
        scanner = DiskStore(tmp_path)  # the scheduler side: no lock
        assert set(scanner.scan()) == {"good"}
        assert temp_files(tmp_path) == live_temp  # the live writer's file is kept
        child.stdin.write("\n")  # let it finish the write it was in
        child.stdin.flush()
        assert child.stdout.readline().strip() == "VICTIM-WRITTEN"
        assert child.wait(30) == 0
    finally:
        if child.poll() is None:
            kill_9(child)
    assert same(scanner.read("victim"), entry_payload(1))
    DiskStore(tmp_path, exclusive=True)  # the lock died with its holder


def test_directory_lock_is_per_store_and_released_by_close(tmp_path):
    first = DiskStore(tmp_path, exclusive=True)
    DiskStore(tmp_path).scan()  # a non-exclusive store (the scheduler side) coexists
    with pytest.raises(DiskDirectoryInUse, match=re.escape(str(tmp_path))):
        DiskStore(tmp_path, exclusive=True)
    first.close()
    DiskStore(tmp_path, exclusive=True)


def test_scan_removes_a_temp_file_of_a_live_pid_only_once_it_is_stale(tmp_path):
    """A live pid may be a reused one (a restarted container): a temp file nobody touched for long is dead."""
    fresh = tmp_path / f".tmp-a.{os.getpid()}.othertoken.0"
    stale = tmp_path / f".tmp-b.{os.getpid()}.othertoken.1"
    fresh.write_bytes(b"x")
    stale.write_bytes(b"x")
    old = stale.stat().st_mtime - stores.STALE_TEMP_SECONDS - 60
    os.utime(stale, (old, old))
    DiskStore(tmp_path).scan()
    assert temp_files(tmp_path) == [fresh.name]


def test_one_engine_shares_rank0_between_scheduler_and_worker_a_second_engine_fails(tmp_path, monkeypatch):
    worker = make_worker(tmp_path)
    meta, keys = save_meta("keep", [1, 2], tier="disk")
    run_step(worker, meta)
    worker.close()
    sched = scheduler_side(worker.cfg, monkeypatch)  # the same engine's scheduler side: scans, no lock
    assert all(sched.planner.where(k) == "disk" for k in keys)
    with pytest.raises(DiskDirectoryInUse, match="disk_path"):
        make_worker(tmp_path)  # another engine's worker 0 on the same directory
