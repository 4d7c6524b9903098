"""``ctlesion node``: run the DICOM node until SIGTERM / Ctrl-C.

    ctlesion node --example-config > node.toml     # a documented starting point
    ctlesion node --config node.toml --check       # parse and print the effective configuration
    ctlesion node --config node.toml               # listen, process, send results back
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

EXAMPLE_CONFIG = """\
# ctlesion node configuration (docs/node.md lists every key and its default)
[listener]
ae_title = "CTLESION"
host = "0.0.0.0"
port = 11112
allowed_calling_aets = ["ORTHANC"]   # empty list: any calling AE
http_port = 8080                     # /metrics /healthz /readyz (-1: off)
# [listener.tls]                     # DICOM TLS; with ca = mutual TLS
# cert = "/etc/ctlesion/tls/tls.crt"
# key = "/etc/ctlesion/tls/tls.key"
# ca = "/etc/ctlesion/tls/ca.crt"

[spool]
dir = "work/node-spool"
max_bytes = "20GiB"
max_instances = 100000
min_free_bytes = "2GiB"

[series]
quiet_s = 10          # a series is complete after this many seconds without a new instance

[selection]
modalities = ["CT"]
min_slices = 20
max_slices = 2048
thickness_mm = [0.5, 5.0]   # the model contract refuses > 5 mm and pixels outside 0.4-1.2 mm
axial_tolerance_deg = 30

[triton]
url = "localhost:8001"
timeout_s = 120
slab_concurrency = 2
wait_ready_s = 600

[queue]
workers = 2           # series in flight
max_queued = 64
retry_s = 10
max_attempts = 20

[destination]
url = "sender"        # or "dicom://ORTHANC@pacs:4242" or "http://pacs:8042/dicom-web"
key_images = true

[peers]               # AE title -> host:port, for destination "sender"
ORTHANC = "127.0.0.1:4242"

[audit]
key_env = "CTLESION_AUDIT_KEY"   # HMAC key for patient pseudonyms (never in this file)
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ctlesion node", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, help="TOML configuration file")
    p.add_argument("--example-config", action="store_true", help="print an example configuration and exit")
    p.add_argument("--check", action="store_true", help="load the configuration, print it as JSON, exit")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.example_config:
        sys.stdout.write(EXAMPLE_CONFIG)
        return 0
    if args.config is None:
        print("ctlesion node: --config FILE is required (try --example-config)", file=sys.stderr)
        return 2
    from ctlesion_node.config import load_config

    try:
        config = load_config(args.config)
    except (OSError, ValueError) as exc:
        print(f"ctlesion node: {args.config}: {exc}", file=sys.stderr)
        return 2
    if args.check:
        print(json.dumps(asdict(config), indent=2, default=str))
        return 0
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    from ctlesion_node.service import Node

    try:
        node = Node(config)
        node.start()
    except (OSError, ValueError, PermissionError) as exc:
        print(f"ctlesion node: cannot start: {exc}", file=sys.stderr)
        return 1
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    try:
        while not done.wait(1.0):
            pass
    finally:
        node.stop()  # work in progress stays on disk and resumes on the next start
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
