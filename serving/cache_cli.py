"""`kvplug cache`: a running server's /kvplug/cache API from the command line (serving/cache_api.py)."""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import httpx

DEFAULT_ENDPOINT = "http://127.0.0.1:8000"


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _ago(t: float) -> str:
    s = max(0.0, time.time() - t)
    return f"{s:.0f}s" if s < 120 else f"{s / 60:.0f}m" if s < 7200 else f"{s / 3600:.0f}h"


def print_listing(data: dict, out=None) -> None:
    out = out or sys.stdout
    print("tier   entries  tokens    bytes      pinned     capacity", file=out)
    for tier, t in data["totals"].items():
        print(f"{tier:6s} {t['entries']:>7d}  {t['tokens']:>8d}  {_size(t['bytes']):>9s}  {_size(t['pinned_bytes']):>9s}  "
              f"{_size(t['capacity_bytes']):>9s}", file=out)
    print(f"\n{data['total_prefixes']} prefixes (showing {len(data['prefixes'])} from {data['offset']}, most recently "
          "used first)", file=out)
    print(f"{'prefix':18s} {'tokens':>7s} {'resident':>9s} {'tiers':18s} {'bytes':>9s} {'policy':12s} {'hits':>5s} "
          f"{'last use':>8s}  pin", file=out)
    for p in data["prefixes"]:
        tiers = ",".join(f"{k}:{v['tokens']}" for k, v in p["tiers"].items())
        pin = ("-" if not p["pinned"] else "pinned" if p["pin_ttl_s"] is None else f"pinned {p['pin_ttl_s']:.0f}s")
        print(f"{p['prefix'][:16]:18s} {p['tokens']:>7d} {p['resident_tokens']:>9d} {tiers:18s} {_size(p['bytes']):>9s} "
              f"{p['policy']:12s} {p['hits']:>5d} {_ago(p['last_use']):>8s}  {pin} {p['priority']}", file=out)
        if "prompt_head" in p:
            print(f"{'':18s} {p['prompt_head']!r}", file=out)
    if data.get("next_offset") is not None:
        print(f"... more: --offset {data['next_offset']}", file=out)


def main(argv: list[str]) -> int:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--endpoint", default=DEFAULT_ENDPOINT, help=f"server URL (default {DEFAULT_ENDPOINT})")
    common.add_argument("--api-key", default=os.environ.get("VLLM_API_KEY"),
                        help="the server's API key (default: $VLLM_API_KEY)")
    p = argparse.ArgumentParser(prog="kvplug cache", description="Inspect and control a running kvplug server's "
                                                                  "offload tiers (GET/POST/DELETE /kvplug/cache).")
    sub = p.add_subparsers(dest="cmd", required=True)
    add = functools.partial(sub.add_parser, parents=[common])
    ls = add("ls", help="prefixes per tier, with totals")
    ls.add_argument("--tier", choices=("cpu", "disk"))
    ls.add_argument("--pinned", action="store_true", help="only pinned prefixes")
    ls.add_argument("--limit", type=int, default=50)
    ls.add_argument("--offset", type=int, default=0)
    ls.add_argument("--json", action="store_true", help="the raw JSON answer")
    ls.add_argument("--replica", help="behind a --replicas router: only this replica (default: all)")
    ev = add("events", help="the block events feed (what the router reads)")
    ev.add_argument("--since", type=int)
    pin = add("pin", help="keep a prefix in the tiers")
    pin.add_argument("prefix")
    pin.add_argument("--ttl", type=float, help="seconds (default: until unpinned)")
    pin.add_argument("--priority", choices=("low", "normal", "high"))
    unpin = add("unpin", help="release a pin (the prefix stays until evicted)")
    unpin.add_argument("prefix")
    rm = add("rm", help="delete a prefix from every tier")
    rm.add_argument("prefix")
    ns = p.parse_args(argv)
    base = ns.endpoint.rstrip("/")
    headers = {"authorization": f"Bearer {ns.api_key}"} if ns.api_key else {}
    try:
        with httpx.Client(timeout=60, headers=headers) as client:
            if ns.cmd == "ls":
                params = {"limit": ns.limit, "offset": ns.offset, **({"tier": ns.tier} if ns.tier else {}),
                          **({"pinned": "true"} if ns.pinned else {}), **({"replica": ns.replica} if ns.replica else {})}
                r = client.get(f"{base}/kvplug/cache", params=params)
            elif ns.cmd == "events":
                r = client.get(f"{base}/kvplug/cache/events", params={} if ns.since is None else {"since": ns.since})
            elif ns.cmd in ("pin", "unpin"):
                body = {"prefix": ns.prefix, **({"pinned": False} if ns.cmd == "unpin" else {})}
                if ns.cmd == "pin":
                    body.update({k: v for k, v in (("ttl_s", ns.ttl), ("priority", ns.priority)) if v is not None})
                r = client.post(f"{base}/kvplug/cache/pin", json=body)
            else:
                r = client.delete(f"{base}/kvplug/cache/{ns.prefix}")
    except httpx.HTTPError as exc:
        print(f"kvplug cache: cannot reach {base} ({exc})", file=sys.stderr)
        return 1
    try:
        data = r.json()
    except ValueError:
        data = None
    if r.status_code != 200:
        msg = data.get("error", {}).get("message") if isinstance(data, dict) and isinstance(data.get("error"), dict) \
            else r.text[:300]
        print(f"kvplug cache: HTTP {r.status_code}: {msg}", file=sys.stderr)
        return 1
    if ns.cmd == "ls" and not ns.json:
        if "replicas" in data:  # a `kvplug serve --replicas N` router: one listing per replica
            for name, answer in data["replicas"].items():
                print(f"== replica {name}")
                if "totals" in answer:
                    print_listing(answer)
                else:
                    print(f"   {answer.get('error', answer)}")
        else:
            print_listing(data)
    else:
        print(json.dumps(data, indent=1))
    return 0
