"""On-disk format of one offloaded entry: a checksummed header + payload, written atomically.

    MAGIC (8 bytes) | header length (u32 little endian) | header JSON | payload

The header lists each tensor (name, dtype, shape, offset, nbytes), the payload length and its CRC32, and
the entry key. A reader trusts nothing it has not checked: wrong magic, wrong length (truncated file) or a
CRC mismatch make the entry unreadable (EntryCorrupt), never half-served.
"""
from __future__ import annotations

import json
import struct
import zlib

import torch

from cache_policies.base import Payload

MAGIC = b"KVPLUG1\0"
_LEN = struct.Struct("<I")
PREFIX_BYTES = len(MAGIC) + _LEN.size


class EntryCorrupt(ValueError):
    pass


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def encode_entry(key: str, payload: Payload) -> list[bytes | memoryview]:
    """Chunks to write in order (no payload copy beyond making tensors contiguous on CPU)."""
    chunks: list[memoryview] = []
    tensors = []
    offset = 0
    crc = 0
    for name, t in payload.items():
        raw = t.detach().to("cpu").contiguous().view(torch.uint8).reshape(-1).numpy()
        mv = memoryview(raw)
        crc = zlib.crc32(mv, crc)
        tensors.append([name, _dtype_name(t.dtype), list(t.shape), offset, raw.nbytes])
        offset += raw.nbytes
        chunks.append(mv)
    header = json.dumps({"key": key, "payload_len": offset, "crc32": crc, "tensors": tensors},
                        separators=(",", ":")).encode()
    return [MAGIC + _LEN.pack(len(header)) + header, *chunks]


def read_header(head: bytes) -> tuple[dict, int]:
    """(header, payload offset) from the first bytes of a file; EntryCorrupt when it is not ours/complete."""
    if len(head) < PREFIX_BYTES or head[:len(MAGIC)] != MAGIC:
        raise EntryCorrupt("bad magic")
    (hlen,) = _LEN.unpack_from(head, len(MAGIC))
    end = PREFIX_BYTES + hlen
    if len(head) < end:
        raise EntryCorrupt("truncated header")
    try:
        header = json.loads(head[PREFIX_BYTES:end])
    except ValueError:
        raise EntryCorrupt("unparsable header") from None
    return header, end


def decode_entry(blob: bytes, expect_key: str | None = None) -> Payload:
    header, start = read_header(blob)
    if expect_key is not None and header.get("key") != expect_key:
        raise EntryCorrupt(f"entry holds key {header.get('key')!r}, expected {expect_key!r}")
    payload_len = header["payload_len"]
    if len(blob) != start + payload_len:
        raise EntryCorrupt(f"length {len(blob) - start} != {payload_len} (truncated or padded)")
    body = memoryview(blob)[start:]
    if zlib.crc32(body) != header["crc32"]:
        raise EntryCorrupt("checksum mismatch")
    flat = torch.frombuffer(bytearray(body), dtype=torch.uint8) if payload_len else torch.empty(0, dtype=torch.uint8)
    out: Payload = {}
    for name, dtype, shape, off, nbytes in header["tensors"]:
        out[name] = flat[off:off + nbytes].view(getattr(torch, dtype)).reshape(shape)
    return out
