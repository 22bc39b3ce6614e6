"""On-disk format of one offloaded entry: a digest-protected header + payload, written atomically.

    MAGIC (8 bytes) | digest (32 bytes) | header length (u32 little endian) | header JSON | payload

The header lists each tensor (name, dtype, shape, offset, nbytes), the payload length and the entry key.
The digest is BLAKE2b-256 over everything after it (header length, header and payload), so a damaged
tensor offset or shape is caught as surely as a damaged payload byte. A reader trusts nothing it has not
checked: wrong magic (another format version included), a short file or a digest mismatch make the entry
unreadable (EntryCorrupt), never half-served; the header is parsed only once the digest matched.
"""
from __future__ import annotations

import hashlib
import json
import struct

import torch

from kvplug.kv_payload import Payload

MAGIC = b"KVPLUG2\0"  # 2: BLAKE2b over header + payload (1 had a CRC32 over the payload only)
DIGEST_BYTES = 32
_LEN = struct.Struct("<I")
PREFIX_BYTES = len(MAGIC) + DIGEST_BYTES + _LEN.size


class EntryCorrupt(ValueError):
    pass


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _digest() -> "hashlib.blake2b":
    return hashlib.blake2b(digest_size=DIGEST_BYTES)


def encode_entry(key: str, payload: Payload) -> list[bytes | memoryview]:
    """Chunks to write in order (no payload copy beyond making tensors contiguous on CPU)."""
    chunks: list[memoryview] = []
    tensors = []
    offset = 0
    for name, t in payload.items():
        raw = t.detach().to("cpu").contiguous().view(torch.uint8).reshape(-1).numpy()
        tensors.append([name, _dtype_name(t.dtype), list(t.shape), offset, raw.nbytes])
        offset += raw.nbytes
        chunks.append(memoryview(raw))
    header = json.dumps({"key": key, "payload_len": offset, "tensors": tensors}, separators=(",", ":")).encode()
    covered = _LEN.pack(len(header)) + header
    h = _digest()
    h.update(covered)
    for mv in chunks:
        h.update(mv)
    return [MAGIC + h.digest() + covered, *chunks]


def decode_entry(blob: bytes, expect_key: str | None = None) -> Payload:
    if len(blob) < PREFIX_BYTES or blob[:len(MAGIC)] != MAGIC:
        raise EntryCorrupt("bad magic (not an entry of this format version)")
    covered = memoryview(blob)[len(MAGIC) + DIGEST_BYTES:]
    h = _digest()
    h.update(covered)
    if h.digest() != blob[len(MAGIC):len(MAGIC) + DIGEST_BYTES]:
        raise EntryCorrupt("digest mismatch (damaged or truncated)")
    (hlen,) = _LEN.unpack_from(blob, PREFIX_BYTES - _LEN.size)
    start = PREFIX_BYTES + hlen
    # The digest matched, so these hold unless the writer itself was wrong: checked anyway, never trusted.
    try:
        header = json.loads(bytes(blob[PREFIX_BYTES:start]))
    except ValueError:
        raise EntryCorrupt("unparsable header") from None
    if expect_key is not None and header.get("key") != expect_key:
        raise EntryCorrupt(f"entry holds key {header.get('key')!r}, expected {expect_key!r}")
    payload_len = header["payload_len"]
    if len(blob) != start + payload_len:
        raise EntryCorrupt(f"payload length {len(blob) - start} != header's {payload_len}")
    body = memoryview(blob)[start:]
    flat = torch.frombuffer(bytearray(body), dtype=torch.uint8) if payload_len else torch.empty(0, dtype=torch.uint8)
    out: Payload = {}
    for name, dtype, shape, off, nbytes in header["tensors"]:
        if off < 0 or off + nbytes > payload_len:
            raise EntryCorrupt(f"tensor {name!r} at [{off}, {off + nbytes}) outside the {payload_len}-byte payload")
        out[name] = flat[off:off + nbytes].view(getattr(torch, dtype)).reshape(shape)
    return out
