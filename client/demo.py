"""``ctlesion demo``: the main job of the README's command 1, end to end on this machine.

1. generate the held-out demo phantom (seed ``splits.DEMO_SEED``) as a DICOM series + truth,
   unless it is already there;
2. start the real tritonserver on the CPU model repository (built from the committed checkpoint
   if missing) on free loopback ports;
3. send the series through the gRPC client (slabs with halo, concurrent, retries, deadlines);
4. print the findings next to the phantom's truth (LUNA16 hit criterion) and write the report;
5. stop the server, also on Ctrl-C, SIGTERM or failure.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from ctlesion_client.detect_cli import add_client_arguments, exit_code, options_from_args, tqdm_progress
from ctlesion_client.errors import LesionClientError

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
WORK = REPO_ROOT / "work"
DEFAULT_REPOSITORY = WORK / "model_repository" / "cpu"
DEFAULT_CASE_DIR = WORK / "demo" / "case"
DEFAULT_REPORT = WORK / "demo" / "report"
DEFAULT_LOG = WORK / "demo" / "tritonserver.log"


def demo_config() -> Any:
    """The demo case's generator settings: the same as the serving tests' ``phantom_case`` fixture
    (a 512 x 512 chest of at most 120 slices with 3-4 nodules of 6-20 mm), so both send one case."""
    from ctlesion_phantoms.config import PhantomConfig

    return PhantomConfig(slices_max=120, nodules_min=3, nodules_max=4, p_no_nodules=0.0, diameter_mm=(6.0, 20.0))


def ensure_case(case_dir: Path) -> Path:
    """The demo case folder (``<case_dir>/<case_id>`` with ``series/`` and ``truth.json``); generated once."""
    existing = sorted(case_dir.glob("*/truth.json"))
    if existing and any(existing[0].parent.joinpath("series").glob("*.dcm")):
        print(f"phantom case: {existing[0].parent} (already generated)")
        return existing[0].parent
    from ctlesion_phantoms import splits
    from ctlesion_phantoms.generate import generate_case

    t0 = time.perf_counter()
    print(f"generating the held-out demo phantom (seed {splits.DEMO_SEED}) into {case_dir} ...", flush=True)
    truth = generate_case(seed=splits.DEMO_SEED, out_dir=case_dir, config=demo_config())
    print(f"  {truth.geometry.slices} slices, {len(truth.nodules)} nodules, {time.perf_counter() - t0:.1f} s")
    return case_dir / truth.case_id


def ensure_repository(repository: Path) -> Path:
    """The CPU model repository. The default one is (re)built from the committed checkpoint whenever
    the checkpoint, the model code or the settings changed (``build-repo --if-stale``: a no-op when
    current); a repository the user names is served as it is."""
    if repository.resolve() != DEFAULT_REPOSITORY.resolve() and (repository / "lesion_detection" / "config.pbtxt").exists():
        return repository
    from ctlesion_export import build_repo

    print(f"checking the CPU model repository {repository} against the committed checkpoint ...", flush=True)
    rc = build_repo.main(["--target", "cpu", "--out", str(repository), "--if-stale"])
    if rc != 0:
        raise RuntimeError(f"ctlesion build-repo failed with exit code {rc}")
    return repository


def truth_table(lesions: Sequence[Any], truth: Any) -> tuple[str, dict[str, Any]]:
    """Each truth nodule next to the finding that hits it (LUNA16: lesion centre strictly within the
    nodule's radius of its centre), and which findings hit nothing (false positives)."""
    from preprocess_backend.matching import match_lesions

    match = match_lesions(lesions, truth)
    finding_of: dict[int, list[int]] = {}
    for i, nodule_id in enumerate(match.lesion_nodule, start=1):
        if nodule_id is not None:
            finding_of.setdefault(nodule_id, []).append(i)
    rows = [("nodule", "type", "diameter mm", "side", "centre mm (LPS)", "found by finding")]
    for n in truth.nodules:
        hits = finding_of.get(n.nodule_id)
        rows.append((
            str(n.nodule_id), n.type.replace("_", "-"), f"{n.diameter_mm:.1f}", n.side or "-",
            ", ".join(f"{c:.0f}" for c in n.centre_mm),
            ", ".join(f"#{h}" for h in hits) if hits else "MISSED",
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"truth ({truth.case_id}): {len(truth.nodules)} nodule(s)"]
    for k, row in enumerate(rows):
        lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if k == 0:
            lines.append("  " + "  ".join("-" * w for w in widths))
    fps = [f"#{i}" for i, hits in enumerate(match.lesion_hits, start=1) if not hits]
    shown = ", ".join(fps[:8]) + (", ..." if len(fps) > 8 else "")
    lines.append(
        f"found {match.true_positives}/{len(truth.nodules)} nodule(s) (LUNA16 criterion: lesion centre within "
        f"the nodule's radius); {len(fps)} false positive(s){' (' + shown + ')' if fps else ''}"
    )
    return "\n".join(lines), match.to_dict()


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM takes the same path as Ctrl-C: the server is stopped


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ctlesion demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-repository", type=Path, default=DEFAULT_REPOSITORY)
    p.add_argument("--case-dir", type=Path, default=DEFAULT_CASE_DIR)
    p.add_argument("--out", type=Path, default=DEFAULT_REPORT, help="report folder")
    p.add_argument("--server-log", type=Path, default=DEFAULT_LOG)
    p.add_argument("--start-timeout", type=float, default=300.0, help="seconds for tritonserver to load the models")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")
    add_client_arguments(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return _run(args)
    except KeyboardInterrupt:
        print("ctlesion demo: interrupted (tritonserver stopped if it was running)", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace) -> int:
    from ctlesion_client.client import LesionClient
    from ctlesion_client.report import format_findings_table, write_report
    from ctlesion_client.server import TritonServer, TritonStartError
    from ctlesion_phantoms.truth import CaseTruth

    client_options, detect_options = options_from_args(args)
    case = ensure_case(args.case_dir)
    truth = CaseTruth.load(case / "truth.json")
    try:
        repository = ensure_repository(args.model_repository)
    except (RuntimeError, ValueError, FileNotFoundError) as exc:
        print(f"ctlesion demo: error: {exc}", file=sys.stderr)
        return 1

    server = TritonServer(repository, log_path=args.server_log)
    print(f"starting tritonserver on {repository} (log {args.server_log}) ...", flush=True)
    t0 = time.perf_counter()
    try:
        server.start(args.start_timeout)
    except TritonStartError as exc:
        print(f"ctlesion demo: error: {exc}", file=sys.stderr)
        return 1
    progress, close_progress = tqdm_progress(enabled=not args.no_progress)
    try:
        print(f"tritonserver ready in {time.perf_counter() - t0:.1f} s: grpc {server.grpc_url}", flush=True)
        with LesionClient(server.grpc_url, client_options, detect_options) as client:
            client.wait_ready(30.0)
            result = client.detect_series(case / "series", progress=progress)
    except LesionClientError as exc:
        print(f"ctlesion demo: error: {exc}", file=sys.stderr)
        print(f"server log: {args.server_log}", file=sys.stderr)
        return exit_code(exc)
    finally:
        close_progress()
        server.stop()  # also on Ctrl-C / SIGTERM (KeyboardInterrupt passes through here)

    print()
    print(format_findings_table(result))
    for warning in result.warnings:
        print(f"  warning: {warning}")
    print()
    table, match = truth_table(result.lesions, truth)
    print(table)
    files = write_report(result, args.out)
    (args.out / "truth_match.json").write_text(json.dumps({"case_id": truth.case_id, **match}, indent=2) + "\n")
    t = result.timings
    print()
    print(f"{result.num_slices} slices in {result.num_slabs} slabs: {t.get('total_s', 0.0):.1f} s "
          f"(inference {t.get('infer_s', 0.0):.1f} s, mean slab latency {t.get('slab_latency_mean_s', 0.0):.2f} s)")
    print(f"report: {files.json_path} and {len(files.overlays)} overlay PNG(s) in {args.out}")
    print(f"server log: {args.server_log}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
