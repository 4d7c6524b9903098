"""Airway lumens: candidates centred in an air column longer than themselves are not nodules.

The trachea and the main bronchi run along z. On an axial slice they are 15-25 mm rings of air, the
size of a nodule, and the FPR cube (22.5 mm deep) cannot see a tube's length: on real CT the
classifier took a trachea for a nodule at p 0.97. A nodule's centre is tissue; a cavitary nodule's
cavity is closed by its wall above and below, so the air at its centre spans less than its own
diameter. A candidate whose centre lies in air over at least its diameter + ``MARGIN_MM`` along
the slice normal is an open tube: an airway.

The probe is a 4 x 4 mm column through the candidate centre along the slice normal, cut with the
FPR cubes' sampler (``extract_cubes`` with ``PROBE``) and reduced to one mean HU per plane. Planes
beyond the slices at hand are NaN (unknown, not air). The decision reads only planes within
``window_mm(diameter)`` of the centre. A cube request carries the cube's slices; where the air run
reaches the end of what was sent before it is long enough (``undecided``), the client asks again
for that lesion with the whole window (``request_half_mm``). Whatever stays unknown at the series'
own ends is not air, so a cavity cut by the end of a scan never reads as a tube, and the client
and the whole-series evaluation decide alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from preprocess_backend.cubes import CubeSpec, SliceCodes, extract_cubes
from preprocess_backend.series import SeriesGeometry

PROBE = CubeSpec(shape=(49, 4, 4), spacing_mm=(1.5, 1.0, 1.0))  # +-36 mm along the normal, 4 mm square
AIR_HU = -900.0  # probe plane mean below this: air (-1000) with partial volume; parenchyma is ~ -850
MARGIN_MM = 5.0  # the air must outrun the candidate's own diameter by this much


def window_mm(diameter_mm: float) -> float:
    """Half length of the probe the decision reads: a run of diameter + margin through the centre
    lies within it. NaN when the probe is too short to decide (or the size is unknown)."""
    need = float(diameter_mm) + MARGIN_MM
    return need if np.isfinite(need) and need <= PROBE.half_extent_mm[0] else float("nan")


def request_half_mm(diameter_mm: float, cube: CubeSpec) -> float:
    """Half extent along z of the slices a cube request must carry: the cube's, or the probe window."""
    w = window_mm(diameter_mm)
    return float(cube.half_extent_mm[0]) if not np.isfinite(w) else max(float(cube.half_extent_mm[0]), w)


def probe_profiles(
    codes: Sequence[np.ndarray] | Sequence[SliceCodes] | np.ndarray, geometry: SeriesGeometry, centres_mm: np.ndarray
) -> np.ndarray:
    """float32 [N, planes]: mean HU of the probe column per plane, NaN beyond the slices given.

    ``codes`` / ``geometry`` as ``extract_cubes`` takes them with ``first_slice`` 0 (the slices at
    hand, in series order); codes are on the FPR cube scale of ``codes``' spec (SliceCodes) or the
    default one.
    """
    centres = np.asarray(centres_mm, dtype=np.float64).reshape(-1, 3)
    planes = PROBE.shape[0]
    if centres.shape[0] == 0:
        return np.zeros((0, planes), np.float32)
    spec = codes[0].spec if isinstance(codes[0], SliceCodes) else CubeSpec()
    probe = CubeSpec(PROBE.shape, PROBE.spacing_mm, spec.hu_min, spec.hu_max)
    column = extract_cubes(codes, geometry, centres, probe).mean(axis=(2, 3), dtype=np.float64)
    hu = spec.hu_min + column * (spec.hu_max - spec.hu_min) / 255.0
    offsets = (np.arange(planes) - (planes - 1) / 2) * PROBE.spacing_mm[0]
    along = (centres @ geometry.normal)[:, None] + offsets[None, :]
    z = geometry.z
    tol = 1e-3
    hu[(along < z.min() - tol) | (along > z.max() + tol)] = np.nan  # beyond the slices: unknown, not air
    return hu.astype(np.float32)


def _runs(profiles: np.ndarray, diameters_mm: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(run mm [N], open [N]): the air run through the centre plane within ``window_mm`` (NaN where
    the probe cannot decide), and whether it stops at an unknown (NaN) plane rather than at tissue."""
    prof = np.asarray(profiles, dtype=np.float32)
    diam = np.asarray(diameters_mm, dtype=np.float64).reshape(-1)
    n, planes = prof.shape if prof.ndim == 2 else (0, PROBE.shape[0])
    run, open_end = np.full(n, np.nan), np.zeros(n, dtype=bool)
    step = PROBE.spacing_mm[0]
    centre = (planes - 1) // 2
    for i in range(n):
        w = window_mm(diam[i])
        if not np.isfinite(w):
            continue
        reach = int(np.floor(w / step + 1e-9))
        seg = prof[i, centre - reach : centre + reach + 1]
        air = seg < AIR_HU  # NaN compares False
        if not air[reach]:
            run[i] = 0.0
            continue
        up = np.flatnonzero(~air[reach:])  # first non-air plane above / below the centre
        down = np.flatnonzero(~air[: reach + 1][::-1])
        planes_up = int(up[0]) if up.size else air.size - reach
        planes_down = int(down[0]) if down.size else reach + 1
        run[i] = (planes_up + planes_down - 1) * step
        stops = [seg[reach + planes_up] if up.size else np.float32(0), seg[reach - planes_down] if down.size else np.float32(0)]
        open_end[i] = bool(np.isnan(stops).any())
    return run, open_end


def air_run_mm(profiles: np.ndarray, diameters_mm: Sequence[float] | np.ndarray) -> np.ndarray:
    """float [N]: length of the air run through the centre plane, read within ``window_mm``; NaN where
    the probe cannot decide."""
    return _runs(profiles, diameters_mm)[0]


def undecided(profiles: np.ndarray, diameters_mm: Sequence[float] | np.ndarray) -> np.ndarray:
    """bool [N]: the centre is in air, the run is still too short, and it ends where the slices at
    hand end: more slices (up to ``request_half_mm``) could make it an airway."""
    diam = np.asarray(diameters_mm, dtype=np.float64).reshape(-1)
    run, open_end = _runs(profiles, diam)
    return np.isfinite(run) & (run > 0) & (run < diam + MARGIN_MM) & open_end


def airway_lumen(profiles: np.ndarray, diameters_mm: Sequence[float] | np.ndarray) -> np.ndarray:
    """bool [N]: the candidate's centre is in air over at least its diameter + ``MARGIN_MM``."""
    diam = np.asarray(diameters_mm, dtype=np.float64).reshape(-1)
    run = air_run_mm(profiles, diam)
    return np.isfinite(run) & (run >= diam + MARGIN_MM)


def veto_airways(probabilities: np.ndarray, profiles: np.ndarray | None, diameters_mm: Sequence[float] | np.ndarray) -> np.ndarray:
    """FPR probabilities with airway lumens set to 0 (not a nodule, whatever the classifier says);
    unchanged without profiles (a model repository or mined set from before the probe)."""
    probs = np.asarray(probabilities, dtype=np.float32).reshape(-1).copy()
    if profiles is None or probs.size == 0:
        return probs
    probs[airway_lumen(profiles, diameters_mm)] = 0.0
    return probs


def cubes_and_probes(
    dicom_items: Sequence[bytes], centres_mm: np.ndarray, spec: CubeSpec, options: object = None
) -> tuple[np.ndarray, np.ndarray]:
    """The server side of a cube request: (uint8 cubes [N, D, H, W], probe profiles [N, planes])
    from one decode of the slices sent (``cubes_from_dicom`` + ``probe_profiles``)."""
    from preprocess_backend.cubes import check_centres, decode_codes

    centres = check_centres(centres_mm)
    codes, geometry = decode_codes(dicom_items, spec, options)
    return extract_cubes(codes, geometry, centres, spec), probe_profiles(codes, geometry, centres)
