"""The `kvplug` command: serve, models, config, bench."""
from __future__ import annotations

import argparse
import sys

from kvplug import models, settings
from offload.spec import parse_offload_flag

USAGE = """usage: kvplug <command> [args]

commands:
  serve [MODEL] [--config F] [--set K=V] [--host H] [--port P] [vLLM flags...]
                          start vLLM's OpenAI server with kvplug on (default model: smollm2-135m-instruct)
  models prepare [NAME]   fetch, verify and convert an embedded model; prints its folder
  models list             the models kvplug can prepare
  config show [--config F] [--set K=V] [--offload TIERS]
                          print the effective config (defaults < file < KVPLUG_* env < --set)
  cache ls|events|pin|unpin|rm [--endpoint URL]
                          what a running server's offload tiers hold; pin or delete a prefix (kvplug cache --help)
  bench ...               shared-context benchmarks and load tests (kvplug bench --help)
  patterns search [MODEL] --out F.json
                          find per-head sparse prefill patterns on a local calibration prompt
"""


def _models(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="kvplug models")
    sub = p.add_subparsers(dest="cmd", required=True)
    prep = sub.add_parser("prepare", help="fetch, verify and convert a model")
    prep.add_argument("name", nargs="?", default=models.DEFAULT_MODEL)
    sub.add_parser("list", help="list the models kvplug can prepare")
    ns = p.parse_args(argv)
    if ns.cmd == "list":
        for spec in models.MODELS.values():
            state = "prepared" if models.is_prepared(models.model_dir(spec.name)) else "not prepared"
            print(f"{spec.name:32s} max_model_len={spec.max_model_len:<6d} {spec.license:12s} {state}")
        return 0
    try:
        print(models.prepare(ns.name))
    except models.ModelError as exc:
        print(f"kvplug models: {exc}", file=sys.stderr)
        return 2
    return 0


def _config(argv: list[str]) -> int:
    import yaml

    p = argparse.ArgumentParser(prog="kvplug config")
    sub = p.add_subparsers(dest="cmd", required=True)
    show = sub.add_parser("show", help="print the effective config")
    show.add_argument("--config")
    show.add_argument("--set", dest="sets", action="append", default=[])
    show.add_argument("--offload", metavar="TIERS", help="as `kvplug serve --offload`, e.g. cpu:8GiB")
    ns = p.parse_args(argv)
    try:
        # the same order as `kvplug serve`: --offload's keys first, so an explicit --set wins
        sets = [*(parse_offload_flag(ns.offload) if ns.offload else []), *ns.sets]
        cfg = settings.resolve(ns.config, sets)
    except settings.KvplugConfigError as exc:
        print(f"kvplug config: {exc}", file=sys.stderr)
        return 2
    import msgspec

    print(yaml.safe_dump(msgspec.to_builtins(cfg), sort_keys=False), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "serve":
        from serving.server import main as serve_main

        return serve_main(rest)
    if cmd == "models":
        return _models(rest)
    if cmd == "config":
        return _config(rest)
    if cmd == "patterns":
        from attention_backends.sparse_prefill.search import main as patterns_main

        return patterns_main(rest)
    if cmd == "cache":
        from serving.cache_cli import main as cache_main

        return cache_main(rest)
    if cmd == "bench":
        from benchmarks.cli import main as bench_main

        return bench_main(rest)
    print(f"kvplug: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr, end="")
    return 2


if __name__ == "__main__":
    sys.exit(main())
