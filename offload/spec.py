"""`--offload cpu:8GiB,disk:/path:100GiB` -> offload config overrides (``section.key=value`` strings)."""
from __future__ import annotations

from kvplug.config import KvplugConfigError, parse_size


def parse_offload_flag(text: str) -> list[str]:
    """Tiers separated by commas: ``cpu:SIZE`` and/or ``disk:PATH[:SIZE]``; 'none' turns offload off."""
    if text.strip().lower() in ("none", "off", ""):
        return ["offload.enabled=false"]
    sets = ["offload.enabled=true"]
    seen_cpu = False
    for part in (p.strip() for p in text.split(",")):
        kind, _, rest = part.partition(":")
        if kind == "cpu":
            parse_size(rest, f"--offload {part!r}")
            sets.append(f"offload.cpu_size={rest}")
            seen_cpu = True
        elif kind == "disk":
            path, _, size = rest.rpartition(":") if rest.count(":") >= 1 else (rest, "", "")
            if not path:
                path, size = rest, ""
            if not path:
                raise KvplugConfigError(f"--offload {part!r}: expected disk:PATH[:SIZE]")
            if size:
                parse_size(size, f"--offload {part!r}")
                sets.append(f"offload.disk_size={size}")
            sets.append(f"offload.disk_path={path}")
        else:
            raise KvplugConfigError(f"--offload: unknown tier {kind!r} in {part!r} (expected cpu:SIZE or disk:PATH:SIZE)")
    if not seen_cpu:
        sets.append("offload.cpu_size=0B")  # only a disk tier was asked for
    return sets
