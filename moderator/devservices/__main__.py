"""``python -m moderator.devservices``: run Kafka + Redis in the foreground.

    python -m moderator.devservices up [--no-kafka] [--no-redis] [--env-file PATH]
    python -m moderator.devservices fetch-kafka

``up`` prints ``KAFKA_BOOTSTRAP_SERVERS=...`` and ``REDIS_URL=...`` on stdout
(nothing else goes there, so ``eval``/``source`` work) and serves until Ctrl-C
or SIGTERM. ``--env-file`` also writes those lines to a file, written only once
every service is up, so a Makefile can wait for it. ``fetch-kafka`` resolves the
broker jars into the cache ahead of time (CI image builds, offline work).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path

from moderator.devservices.errors import DevServiceError
from moderator.devservices.kafka import kafka_libs_dir
from moderator.devservices.services import KAFKA_ENV, REDIS_ENV, services


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m moderator.devservices",
                                     description="Run Kafka and Redis for development.")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start services and serve until interrupted")
    up.add_argument("--no-kafka", dest="kafka", action="store_false", help="do not start Kafka")
    up.add_argument("--no-redis", dest="redis", action="store_false", help="do not start Redis")
    up.add_argument("--env-file", type=Path, help="also write the KEY=VALUE lines here once ready")
    sub.add_parser("fetch-kafka", help="download the Kafka broker jars into the cache and exit")
    return parser


def _up(args: argparse.Namespace) -> int:
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    started = time.monotonic()
    with services(kafka=args.kafka, redis=args.redis) as running:
        lines = []
        if running.kafka_bootstrap:
            lines.append(f"{KAFKA_ENV}={running.kafka_bootstrap}")
        if running.redis_url:
            lines.append(f"{REDIS_ENV}={running.redis_url}")
        print("\n".join(lines), flush=True)
        if args.env_file:
            # Write-then-rename: a reader polling for the file never sees half of it.
            partial = args.env_file.with_name(args.env_file.name + ".partial")
            partial.write_text("\n".join(lines) + "\n")
            os.replace(partial, args.env_file)
        sources = ", ".join(f"{name}: {source}" for name, source in
                            (("kafka", running.kafka_source), ("redis", running.redis_source)) if source)
        print(f"devservices ready in {time.monotonic() - started:.1f}s ({sources}); Ctrl-C to stop",
              file=sys.stderr, flush=True)
        try:
            while not stop.wait(0.5):
                pass
        finally:
            if args.env_file:
                args.env_file.unlink(missing_ok=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "fetch-kafka":
            print(kafka_libs_dir())
            return 0
        return _up(args)
    except DevServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
