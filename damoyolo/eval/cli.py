"""``ctlesion evaluate``: LUNA16 FROC / CPM and slice mAP of the detector on held-out cases."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ctlesion_phantoms.splits import DEMO_SEED, TEST_SEED, TRAIN_SEED, VALIDATION_SEED
from damoyolo.eval.evaluation import evaluate, format_report
from damoyolo.eval.runner import (
    EVAL_SCORE_THRESHOLD,
    add_scale_arguments,
    onnx_predictor,
    scale_overrides,
    torch_predictor,
)
from preprocess_backend.errors import DicomInputError

_SEED_NAMES = {"TEST_SEED": TEST_SEED, "VALIDATION_SEED": VALIDATION_SEED, "TRAIN_SEED": TRAIN_SEED, "DEMO_SEED": DEMO_SEED}


def _seed(text: str) -> int:
    return _SEED_NAMES[text.upper()] if text.upper() in _SEED_NAMES else int(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ctlesion evaluate", description="LUNA16 FROC / CPM and slice mAP of the detector on held-out phantoms, or with --data on LUNA16 / LIDC-IDRI / DICOM + CSV")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", type=Path, help="PyTorch checkpoint (models/ctlesion_damoyolo.pt)")
    src.add_argument("--onnx", type=Path, help="ONNX detector (fp32 or INT8 QDQ), run with onnxruntime")
    src.add_argument("--submission", type=Path,
                     help="with --data: score a CSV in LUNA16's submission format (e.g. all folds' candidates.csv together)")
    p.add_argument("--cases", type=int, default=20, help="number of held-out cases")
    p.add_argument("--seed", type=_seed, default=TEST_SEED, help="first case seed, or TEST_SEED / VALIDATION_SEED (default TEST_SEED)")
    p.add_argument("--cases-dir", type=Path, default=Path("work/phantoms/test"), help="where the held-out cases are / are generated (shared by fp32 and INT8 runs)")
    p.add_argument("--out", type=Path, default=Path("work/eval"))
    p.add_argument("--device", default="cpu", help="torch device for --checkpoint (cpu, cuda)")
    p.add_argument("--score-threshold", type=float, default=None,
                   help=f"per-slice candidate threshold (default: the FPR model's candidate threshold, without FPR {EVAL_SCORE_THRESHOLD})")  # fmt: skip
    p.add_argument("--fpr-onnx", type=Path, default=None, help="3D false-positive-reduction ONNX (default: the one served, exported from models/ctlesion_fpr.pt)")
    p.add_argument("--no-fpr", action="store_true", help="evaluate the detector alone (linked lesions, 3D size rule)")
    p.add_argument("--window", default=None, help="window preset (default: the checkpoint's, else lung)")
    add_scale_arguments(p)
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap samples for the CPM interval (0: none)")
    p.add_argument("--data", default=None, metavar="KIND:DIR",
                   help="score a real data set instead of phantoms: luna16:DIR, lidc:DIR or dicomcsv:DIR (official LUNA16 protocol)")
    p.add_argument("--fold", default=None, help="with --data: the held-out fold(s), e.g. 0 or 0-9 (LUNA16: the subset)")
    p.add_argument("--cache-dir", type=Path, default=Path("work/cache"), help="with --data: DICOM written from MetaImage volumes")
    p.add_argument("--min-readers", type=int, default=3, help="lidc: readers of 4 agreeing on a nodule")
    p.add_argument("--allow-trained-folds", action="store_true", help="with --data: score folds the checkpoint was trained on")
    p.add_argument("--no-progress", action="store_true")
    return p


def score_submission_main(args: argparse.Namespace) -> int:
    """``--submission CSV --data KIND:DIR [--fold K]``: the LUNA16 figure of candidates already made."""
    import json

    from damoyolo.data import open_source, parse_folds
    from damoyolo.eval.dataset_eval import score_submission
    from damoyolo.eval.evaluation import format_froc
    from damoyolo.eval.plots import plot_froc

    if not args.data:
        print("ctlesion evaluate: --submission needs --data KIND:DIR (the truth to score against)", file=sys.stderr)
        return 2
    try:
        source = open_source(args.data, args.cache_dir / "dicom", args.min_readers)
        r = score_submission(source, args.submission, parse_folds(args.fold), bootstrap=args.bootstrap)
    except (FileNotFoundError, ValueError) as exc:
        print(f"ctlesion evaluate: {exc}", file=sys.stderr)
        return 2
    folds = f"fold {args.fold}" if args.fold else "all folds"
    print("\n".join(format_froc(f"{args.submission.name} on {source.name} {folds} (the LUNA16 figure)", r)))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "metrics.json").write_text(json.dumps({"protocol": f"{source.name} {folds}", "submission": str(args.submission),
                                                       "froc_all": r.to_dict()}, indent=2) + "\n")
    plot_froc({f"{source.name} {folds}": r}, args.out / "froc.png", title=args.submission.name)
    print(f"\nwrote {args.out / 'metrics.json'}, {args.out / 'froc.png'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.submission:
        return score_submission_main(args)
    model_path = args.checkpoint or args.onnx
    predictor = onnx_predictor(args.onnx) if args.onnx else torch_predictor(args.checkpoint, args.device)
    info = predictor[1]
    if args.window:
        info.window = args.window
    from ctlesion_export.fpr_repo import DEFAULT_FPR_CHECKPOINT, default_fpr_onnx
    from ctlesion_fpr.predict import read_meta

    fpr_onnx = None if args.no_fpr else (args.fpr_onnx or (default_fpr_onnx() if DEFAULT_FPR_CHECKPOINT.exists() else None))
    threshold = args.score_threshold
    if threshold is None:
        threshold = read_meta(fpr_onnx).candidate_threshold if fpr_onnx is not None else EVAL_SCORE_THRESHOLD
    options = info.options(score_threshold=threshold, **scale_overrides(args, info))
    try:
        if args.data:
            from damoyolo.data import open_source, parse_folds
            from damoyolo.eval.dataset_eval import evaluate_source

            source = open_source(args.data, args.cache_dir / "dicom", args.min_readers)
            report = evaluate_source(
                predictor, source, parse_folds(args.fold), args.out, options, bootstrap=args.bootstrap,
                progress=not args.no_progress, allow_trained_folds=args.allow_trained_folds, fpr_onnx=fpr_onnx,
            )
        else:
            report = evaluate(
                model_path, args.cases_dir, args.out, args.cases, args.seed, options=options, bootstrap=args.bootstrap,
                progress=not args.no_progress, predictor=predictor, fpr_onnx=fpr_onnx,
            )
    except (FileNotFoundError, ValueError, DicomInputError) as exc:
        print(f"ctlesion evaluate: {exc}", file=sys.stderr)
        return 2
    print(format_report(report))
    extra = " and candidates.csv (LUNA16 submission format)" if args.data else ""
    print(f"\nwrote {args.out / 'metrics.json'}, {args.out / 'froc.png'}{extra}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
