"""kvplug's per-request cache-control parameters in ``kv_transfer_params`` (next to the cache policy's
``kvplug_policy`` / ``kvplug_offload``), and their check (serving/policy_middleware.py answers HTTP 400)."""
from __future__ import annotations

from typing import Any, Mapping

from offload.tiers.eviction import PRIORITY_CLASSES

REPORT_KEY = "kvplug_report"  # true: the response body carries the cache report (kv_transfer_params.kvplug_cache)
PIN_KEY = "kvplug_pin"  # true: keep this request's prefix in the tiers (until ttl_s, else until unpinned)
TTL_KEY = "kvplug_ttl_s"  # seconds a pin holds
PRIORITY_KEY = "kvplug_priority"  # eviction class of the entries this request stores: low | normal | high
# Set by the API server's middleware (never by clients): names the request's report on the control channel.
REPORT_ID_KEY = "kvplug_report_id"
REPORT_FIELD = "kvplug_cache"  # where the report goes in the response's kv_transfer_params
CLIENT_KEYS = (REPORT_KEY, PIN_KEY, TTL_KEY, PRIORITY_KEY)
MAX_TTL_S = 10 * 365 * 86400


def check(params: Mapping[str, Any], field: str = "kv_transfer_params") -> tuple[str, str] | None:
    """(message, param) for the first bad cache-control value in ``params``, else None."""
    for key in (REPORT_KEY, PIN_KEY):
        if key in params and not isinstance(params[key], bool):
            return f"{field}.{key} must be true or false (a JSON boolean)", f"{field}.{key}"
    if TTL_KEY in params:
        ttl = params[TTL_KEY]
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 0 < ttl <= MAX_TTL_S:
            return (f"{field}.{TTL_KEY} must be a number of seconds > 0 and <= {MAX_TTL_S}", f"{field}.{TTL_KEY}")
        if params.get(PIN_KEY) is not True:
            return f"{field}.{TTL_KEY} needs {field}.{PIN_KEY}: true", f"{field}.{TTL_KEY}"
    if PRIORITY_KEY in params and params[PRIORITY_KEY] not in PRIORITY_CLASSES:
        return (f"{field}.{PRIORITY_KEY} must be one of {', '.join(PRIORITY_CLASSES)}", f"{field}.{PRIORITY_KEY}")
    if REPORT_ID_KEY in params:
        return f"{field}.{REPORT_ID_KEY} is set by the server, not by clients", f"{field}.{REPORT_ID_KEY}"
    return None
