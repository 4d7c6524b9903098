"""``ctlesion detect SERIES_DIR --url HOST:PORT``: send one series to a running server, print the
findings table, write the report (JSON + PNG overlays).

Exit codes: 0 done, 2 input refused (by the client or the server) or bad options, 3 server
unreachable / not ready / too slow, 4 the served model does not match the client's contract,
5 any other server error. Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from ctlesion_client.errors import (
    DeadlineExceededError,
    InvalidInputError,
    LesionClientError,
    ModelMismatchError,
    SeriesSelectionError,
    ServerUnavailableError,
)
from ctlesion_client.options import COMPRESSIONS, ClientOptions, DetectOptions, TlsOptions

EXIT_INPUT, EXIT_UNAVAILABLE, EXIT_MODEL, EXIT_SERVER = 2, 3, 4, 5


def exit_code(exc: LesionClientError) -> int:
    if isinstance(exc, InvalidInputError | SeriesSelectionError):
        return EXIT_INPUT
    if isinstance(exc, ServerUnavailableError | DeadlineExceededError):
        return EXIT_UNAVAILABLE
    if isinstance(exc, ModelMismatchError):
        return EXIT_MODEL
    return EXIT_SERVER


def tqdm_progress(desc: str = "slabs", enabled: bool = True) -> tuple[Callable[[int, int], None], Callable[[], None]]:
    """A ``progress`` callback for detect_series that opens a tqdm bar once the slab count is known,
    and a function that closes it."""
    state: dict[str, object] = {}

    def update(done: int, total: int) -> None:
        if not enabled:
            return
        if "bar" not in state:
            from tqdm import tqdm

            state["bar"] = tqdm(total=total, desc=desc, unit="slab", file=sys.stderr)
        bar = state["bar"]
        bar.update(done - bar.n)  # type: ignore[attr-defined]  # absolute count: (0, total) opens the bar

    def close() -> None:
        bar = state.pop("bar", None)
        if bar is not None:
            bar.close()  # type: ignore[attr-defined]

    return update, close


def add_client_arguments(parser: argparse.ArgumentParser) -> None:
    """Transport and detection options (shared with ``ctlesion demo``)."""
    g = parser.add_argument_group("detection (defaults are the served models': the FPR model's operating point)")
    g.add_argument("--window", help="lung (default, or -600,1500): the window the model was trained on; the server refuses others")
    g.add_argument("--score-threshold", type=float,
                   help="threshold on a lesion's final confidence (default: the served FPR model's, else 0.3)")  # fmt: skip
    g.add_argument("--candidate-threshold", type=float, help="per-slice detector threshold sent to the server")
    g.add_argument("--nms-iou", type=float)
    g.add_argument("--min-size-mm", type=float, help="3D lesions smaller than this are dropped (default 3)")
    g.add_argument("--max-size-mm", type=float, help="3D lesions larger than this are masses (default 30)")
    g.add_argument("--no-fpr", action="store_true", help="skip the 3D false-positive reduction pass")
    t = parser.add_argument_group("transport")
    t.add_argument("--concurrency", type=int, default=ClientOptions.concurrency, help="slabs in flight")
    t.add_argument("--slab-size", type=int, default=ClientOptions.slab_size, help="owned slices per request")
    t.add_argument("--timeout", type=float, default=ClientOptions.client_timeout_s, help="deadline per request, s")
    t.add_argument("--wait", type=float, default=10.0, help="seconds to wait for the server to be ready")
    t.add_argument("--model", default=ClientOptions.model_name, help="ensemble name")
    t.add_argument("--tls-root-cert", type=Path, help="PEM root certificate(s): use TLS")
    t.add_argument("--tls-client-cert", type=Path, help="PEM client certificate (mutual TLS)")
    t.add_argument("--tls-client-key", type=Path, help="PEM client key (mutual TLS)")
    t.add_argument("--compression", choices=COMPRESSIONS, default="none", help="gRPC message compression")


def options_from_args(args: argparse.Namespace) -> tuple[ClientOptions, DetectOptions]:
    tls = None
    if args.tls_root_cert or args.tls_client_cert or args.tls_client_key:
        tls = TlsOptions(
            root_cert=str(args.tls_root_cert) if args.tls_root_cert else None,
            client_cert=str(args.tls_client_cert) if args.tls_client_cert else None,
            client_key=str(args.tls_client_key) if args.tls_client_key else None,
        )
    client = ClientOptions(
        model_name=args.model,
        client_timeout_s=args.timeout,
        concurrency=args.concurrency,
        slab_size=args.slab_size,
        tls=tls,
        compression=args.compression,
    )
    detect = DetectOptions(
        window=args.window,
        score_threshold=args.score_threshold,
        nms_iou=args.nms_iou,
        min_size_mm=args.min_size_mm,
        max_size_mm=args.max_size_mm,
        candidate_threshold=getattr(args, "candidate_threshold", None),
        fpr=not getattr(args, "no_fpr", False),
    )
    return client, detect


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ctlesion detect", description=__doc__.split("\n\n")[0])
    p.add_argument("series", metavar="SERIES_DIR", type=Path, help="folder (searched recursively) or one DICOM file")
    p.add_argument("--url", required=True, metavar="HOST:PORT", help="Triton gRPC endpoint")
    p.add_argument("--out", type=Path, help="report folder (default: ./ctlesion-report/<SeriesInstanceUID>)")
    p.add_argument("--series-uid", help="which series, when the folder holds several")
    p.add_argument("--json", action="store_true", help="also print the full result as JSON on stdout")
    p.add_argument("--no-overlays", action="store_true", help="report.json only")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")
    add_client_arguments(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        client_options, detect_options = options_from_args(args)
    except ValueError as exc:
        print(f"ctlesion detect: error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    if not args.series.exists():  # before waiting on the server: a typo should not look like an outage
        print(f"ctlesion detect: error: {args.series}: no such file or directory", file=sys.stderr)
        return EXIT_INPUT
    from ctlesion_client.client import LesionClient
    from ctlesion_client.report import format_findings_table, write_report

    progress, close_progress = tqdm_progress(enabled=not args.no_progress)
    try:
        with LesionClient(args.url, client_options, detect_options) as client:
            client.wait_ready(args.wait)
            result = client.detect_series(args.series, series_uid=args.series_uid, progress=progress)
    except LesionClientError as exc:
        close_progress()
        print(f"ctlesion detect: error: {exc}", file=sys.stderr)
        return exit_code(exc)
    except OSError as exc:  # e.g. a TLS certificate file that cannot be read
        close_progress()
        print(f"ctlesion detect: error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    close_progress()
    print(format_findings_table(result))
    for warning in result.warnings:
        print(f"  warning: {warning}")
    out = args.out or Path("ctlesion-report") / result.series_instance_uid
    files = write_report(result, out, overlays=not args.no_overlays)
    print(f"report: {files.json_path} ({len(files.overlays)} overlay(s)); "
          f"{result.timings.get('total_s', 0.0):.2f} s for {result.num_slices} slices")
    if args.json:
        print(result.to_json())
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
