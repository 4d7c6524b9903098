"""Write cases to disk: DIR/<case_id>/series/*.dcm, DIR/<case_id>/truth.json, DIR/manifest.json."""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ctlesion_phantoms.config import PhantomConfig
from ctlesion_phantoms.dicom_writer import write_series
from ctlesion_phantoms.truth import CaseTruth
from ctlesion_phantoms.volume import GENERATOR_VERSION, default_case_id, generate_volume
from ctlesion_phantoms.wide_volume import WIDE_GENERATOR_VERSION


def generate_case(seed: int, out_dir: Path, config: PhantomConfig | None = None, case_id: str | None = None) -> CaseTruth:
    """Generate one case into ``out_dir/<case_id>/`` (series/ + truth.json) and return its truth."""
    config = config or PhantomConfig()
    case_id = case_id or default_case_id(seed)
    phantom = generate_volume(seed, config, case_id)
    case_dir = Path(out_dir) / case_id
    # about a third of scanners write signed int16 pixels: readers must handle both
    signed = bool(np.random.default_rng([seed, 104729]).random() < 0.3)
    padding_hu = phantom.truth.scanner.get("padding_hu") if phantom.outside is not None else None
    write_series(phantom.hu, phantom.truth, case_dir / "series", signed=signed, outside=phantom.outside, padding_hu=padding_hu)
    phantom.truth.save(case_dir / "truth.json")
    return phantom.truth


def case_seeds(seed: int, cases: int) -> list[int]:
    """Case i of a run with --seed S has seed S + i: held-out sets just use a disjoint range."""
    return [seed + i for i in range(cases)]


def _one(args: tuple[int, str, dict[str, Any]]) -> dict[str, Any]:
    seed, out, cfg = args
    truth = generate_case(seed, Path(out), PhantomConfig.from_dict(cfg))
    return {
        "case_id": truth.case_id,
        "seed": seed,
        "series_dir": f"{truth.case_id}/series",
        "truth": f"{truth.case_id}/truth.json",
        "slices": truth.geometry.slices,
        "nodules": len(truth.nodules),
    }


def generate_dataset(
    out_dir: Path,
    cases: int,
    seed: int,
    config: PhantomConfig | None = None,
    workers: int = 1,
    on_case: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Generate ``cases`` cases with seeds seed..seed+cases-1 and write DIR/manifest.json."""
    config = config or PhantomConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(s, str(out), config.to_dict()) for s in case_seeds(seed, cases)]
    entries: list[dict[str, Any]] = []
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for entry in pool.map(_one, jobs):
                entries.append(entry)
                if on_case:
                    on_case(entry)
    else:
        for job in jobs:
            entry = _one(job)
            entries.append(entry)
            if on_case:
                on_case(entry)
    manifest = {
        "generator_version": WIDE_GENERATOR_VERSION if config.profile == "wide" else GENERATOR_VERSION,
        "seed": seed,
        "config": config.to_dict(),
        "cases": entries,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
