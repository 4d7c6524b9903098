"""Training data: phantom CT series, or any ``damoyolo.data`` source (LUNA16, LIDC-IDRI, DICOM + CSV; real DICOM) -> windowed slices through the serving code -> crops.

The images the detector learns from are made by the same preprocess_backend functions the
Triton preprocess model runs (decode, HU, lung window, uint8 rounding, 2.5D stacking with
edge-replicated ends), so training and serving cannot drift apart. A series is kept in memory as
windowed uint8 slices [Z, H, W] (one channel); the 2.5D stack is gathered per sample with the
same ``context_planes`` the server uses. With ``pixel_mm`` the slices are resampled to that pixel
size (whole field of view, padded to a multiple of 32) and the truth boxes follow; with
``context_mm`` the 2.5D channels are planes at those mm offsets, as the server makes them.

Truth boxes come from ``damoyolo.eval.truth_geometry.truth_slice_boxes`` (the sphere's cross-section on each
slice; thin end caps get no box), the same function evaluation scores against.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ctlesion_phantoms import CaseTruth, PhantomConfig, generate_case
from ctlesion_phantoms.truth import NoduleTruth
from ctlesion_phantoms.volume import default_case_id
from damoyolo.data.types import Case, Nodule
from damoyolo.eval.truth_geometry import SeriesTruth, truth_slice_boxes, truth_slice_nodules
from preprocess_backend.letterbox import LetterboxTransform
from preprocess_backend.masks import LUNG
from preprocess_backend.pipeline import blend_plane, context_planes, decode_items, preprocess_decoded
from preprocess_backend.types import Options


@dataclass
class CaseData:
    case_id: str
    windowed: np.ndarray  # uint8 [Z, H, W], lung window, position order
    boxes: dict[int, np.ndarray]  # slice -> [M, 4] xyxy px
    lung_slices: np.ndarray  # slice indices that contain lung (where negatives are drawn)
    truth: CaseTruth | SeriesTruth
    box_nodules: dict[int, list[int]] = field(default_factory=dict)  # slice -> index in truth.nodules per box
    z_mm: np.ndarray | None = None  # slice positions along the normal (for planes at mm offsets)
    context_mm: float | None = None
    # original slice -> ``windowed`` grid (physical scale: the whole field of view, padded); None: native
    transform: LetterboxTransform | None = None
    _planes: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)

    def stack(self, k: int, s: int) -> np.ndarray:
        """uint8 [k, H, W]: slice ``s`` with its 2.5D context, exactly as preprocess makes it."""
        if k not in self._planes:
            self._planes[k] = context_planes(len(self.windowed), self.z_mm, k, self.context_mm)
        src, w = self._planes[k]
        out = np.empty((k, *self.windowed.shape[1:]), np.uint8)
        for c in range(k):
            blend_plane(self.windowed, int(src[s, c, 0]), int(src[s, c, 1]), float(w[s, c]), out[c])
        return out

    def served(self, image: np.ndarray, boxes: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
        """[k, H, W] image and its boxes as the server gives them to a ``size`` model input: centred
        as ``LetterboxTransform.physical`` centres at that size (cropped or padded); native as is."""
        t = self.transform
        if t is None or t.size == size:
            return image, boxes
        dx = t.pad_x - (size - t.new_w) // 2  # where the served window starts on this grid
        dy = t.pad_y - (size - t.new_h) // 2
        out = np.zeros((image.shape[0], size, size), image.dtype)
        sx0, sy0 = max(0, dx), max(0, dy)
        sx1, sy1 = min(image.shape[2], dx + size), min(image.shape[1], dy + size)
        out[:, sy0 - dy : sy1 - dy, sx0 - dx : sx1 - dx] = image[:, sy0:sy1, sx0:sx1]
        shifted = np.array(boxes, np.float32, copy=True).reshape(-1, 4)
        shifted[:, 0::2] -= dx
        shifted[:, 1::2] -= dy
        return out, shifted


MIN_TRAIN_SIZE = 256  # resampled slices are padded to at least this (the largest training crop)


def scale_options(rows: int, cols: int, pixel_spacing: Sequence[float] | None, window: str,
                  pixel_mm: float | None) -> tuple[Options, LetterboxTransform]:
    """k = 1 options keeping the whole slice: native pixels, or resampled to ``pixel_mm`` and padded
    to a multiple of 32 and at least ``MIN_TRAIN_SIZE`` (no crop; training crops fit), with the
    transform the truth boxes go through."""
    if pixel_mm is None or pixel_spacing is None:
        return Options(window=window, k=1, image_dtype="uint8", model_size=rows), LetterboxTransform.fit(rows, cols, rows)
    row_mm, col_mm = (float(np.float32(v)) for v in pixel_spacing)
    probe = LetterboxTransform.physical(rows, cols, 32, row_mm, col_mm, pixel_mm)
    size = max(MIN_TRAIN_SIZE, 32 * -(-max(probe.new_h, probe.new_w) // 32))
    options = Options(window=window, k=1, image_dtype="uint8", model_size=size, pixel_mm=pixel_mm)
    return options, LetterboxTransform.physical(rows, cols, size, row_mm, col_mm, pixel_mm)


def load_case(case_dir: Path, window: str = "lung", pixel_mm: float | None = None, context_mm: float | None = None) -> CaseData:
    """Decode a phantom case's DICOM series through the serving pipeline (k = 1: one channel)."""
    truth = CaseTruth.load(case_dir / "truth.json")
    files = sorted((case_dir / "series").glob("*.dcm"))
    items = [f.read_bytes() for f in files]
    g = truth.geometry
    options, t = scale_options(g.rows, g.columns, g.pixel_spacing, window, pixel_mm)
    slab = preprocess_decoded(decode_items(items, options), options)
    z_pos = slab.meta.position[:, 2]
    expected = truth.geometry.slice_positions()[:, 2]
    if len(z_pos) != len(expected) or not np.allclose(np.sort(z_pos), expected, atol=1e-2):
        raise ValueError(f"{case_dir}: series positions do not match the truth geometry")
    windowed = np.ascontiguousarray(slab.images[:, 0])
    # lung present: the anatomy mask (lowres) has lung pixels on the slice
    lung = np.flatnonzero((slab.meta.anatomy & LUNG).reshape(len(windowed), -1).any(1))
    boxes = {k: t.to_model(v).astype(np.float32) for k, v in truth_slice_boxes(truth).items()}
    physical = t if pixel_mm is not None and g.pixel_spacing is not None else None
    return CaseData(truth.case_id, windowed, boxes, lung, truth, truth_slice_nodules(truth), _z_mm(slab), context_mm, physical)


def _z_mm(slab) -> np.ndarray | None:  # noqa: ANN001 (a pipeline.Slab)
    from preprocess_backend.dicom_io import slice_normal

    pos, iop = slab.meta.position.astype(np.float64), slab.meta.orientation.astype(np.float64)
    if not (np.all(np.isfinite(pos)) and np.all(np.isfinite(iop))):
        return None
    return pos @ slice_normal(tuple(iop[0]))


def load_source_case(
    case: Case, cache_dir: Path, window: str = "lung", pixel_mm: float | None = None, context_mm: float | None = None
) -> CaseData:
    """A ``damoyolo.data`` case (LUNA16, LIDC, DICOM + CSV) through the serving pipeline, like ``load_case``.

    The windowed slices are kept in ``cache_dir`` as an .npy and memory-mapped: a LUNA16 scan is
    about 80 MB of uint8, too many to hold in memory at once.
    """
    from damoyolo.eval.runner import order_series, series_files

    series_dir = case.series_dir()
    options = Options(window=window, k=1, image_dtype="uint8")
    files, geometry = order_series(series_files(series_dir), options)
    options, t = scale_options(geometry.rows, geometry.columns, geometry.pixel_spacing, window, pixel_mm)  # as load_case
    key = hashlib.sha256("\n".join([window, str(pixel_mm), *geometry.sop_instance_uids]).encode()).hexdigest()[:12]
    cache = Path(cache_dir) / f"{case.case_id[-40:]}-{key}.npz"  # keyed by the slices: a changed series is re-read
    if cache.exists():
        saved = np.load(cache)
        windowed_path, lung = cache.with_suffix(".npy"), saved["lung"]
    else:
        slab = preprocess_decoded(decode_items([f.read_bytes() for f in files], options), options)
        if [slab.meta.uid(i) for i in range(len(slab.meta))] != geometry.sop_instance_uids:
            raise ValueError(f"{series_dir}: the decoded order differs from the header order")
        lung = np.flatnonzero((slab.meta.anatomy & LUNG).reshape(len(slab.images), -1).any(1))
        cache.parent.mkdir(parents=True, exist_ok=True)
        windowed_path = cache.with_suffix(".npy")
        np.save(windowed_path, np.ascontiguousarray(slab.images[:, 0]))
        np.savez(cache, lung=lung)  # written last: its presence means the .npy is whole
    windowed = np.load(windowed_path, mmap_mode="r")
    truth = SeriesTruth(case.case_id, list(case.nodules), geometry, list(case.irrelevant))
    boxes = {k: t.to_model(v).astype(np.float32) for k, v in truth_slice_boxes(truth).items()}
    z_mm = geometry.z if len(geometry.z) > 1 else None
    physical = t if pixel_mm is not None and geometry.pixel_spacing is not None else None
    return CaseData(case.case_id, windowed, boxes, lung, truth, truth_slice_nodules(truth), z_mm, context_mm, physical)


def ensure_cases(root: Path, seeds: Sequence[int], config: PhantomConfig | None = None) -> list[Path]:
    """Case folders for ``seeds`` under ``root``, generating the missing ones (seedable, idempotent)."""
    root.mkdir(parents=True, exist_ok=True)
    dirs = []
    missing = [s for s in seeds if not (root / default_case_id(s) / "truth.json").exists()]
    for seed in tqdm(missing, desc=f"generate phantoms -> {root}", unit="case", disable=not missing):
        generate_case(seed, root, config)
    for seed in seeds:
        dirs.append(root / default_case_id(seed))
    return dirs


def load_cases(
    dirs: Sequence[Path], window: str = "lung", workers: int = 0, pixel_mm: float | None = None, context_mm: float | None = None
) -> list[CaseData]:
    """Decode the cases in order; ``workers`` > 1 decodes that many at once in processes (GPU nodes)."""
    if workers <= 1 or len(dirs) <= 1:
        return [load_case(d, window, pixel_mm, context_mm) for d in tqdm(dirs, desc="decode series", unit="case")]
    from concurrent.futures import ProcessPoolExecutor

    n = len(dirs)
    with ProcessPoolExecutor(min(workers, n)) as pool:
        jobs = pool.map(load_case, dirs, [window] * n, [pixel_mm] * n, [context_mm] * n)
        return list(tqdm(jobs, total=len(dirs), desc=f"decode series ({workers} processes)", unit="case"))


@dataclass
class CropSampler:
    """Random crops of full-resolution 2.5D slices: positives around a nodule, negatives in the lungs.

    Crops keep CPU training affordable (a 256 crop costs a quarter of a 512 slice) while every
    pixel keeps its native resolution, so nodules look exactly as the server sees them.
    """

    cases: list[CaseData]
    crop: int = 256
    k: int = 3
    p_positive: float = 0.6
    min_visible: float = 0.6  # a box cut by the crop keeps its label if this much of it is inside
    # Hard examples: a box of a hard nodule (``is_hard``) is drawn this many times as often as
    # another; 1 = every positive slice equally likely (the stage-1 recipe).
    hard_weight: float = 1.0
    # Per-nodule balance: a box's weight times (boxes of its nodule) ** -this. Drawn by slice, a 20 mm
    # nodule on 0.75 mm slices has ~27 boxes and a 4 mm one ~5, so small nodules are seen 5x less
    # often per nodule; 1 draws every nodule equally often, 0 every box (the earlier recipes).
    nodule_balance: float = 0.0
    _positives: list[tuple[int, int]] = field(init=False, default_factory=list)
    _negatives: list[tuple[int, int]] = field(init=False, default_factory=list)
    _boxes: list[tuple[int, int, int]] = field(init=False, default_factory=list)  # (case, slice, box)
    _hard_p: np.ndarray | None = field(init=False, default=None)
    num_hard_boxes: int = field(init=False, default=0)  # boxes (slice x nodule) of hard nodules

    def __post_init__(self) -> None:
        weights = []
        for ci, case in enumerate(self.cases):
            self._positives += [(ci, k) for k in case.boxes]
            lung = case.lung_slices if len(case.lung_slices) else np.arange(len(case.windowed))
            self._negatives += [(ci, int(k)) for k in lung]
            per_nodule = Counter(n for nodules in case.box_nodules.values() for n in nodules)
            for k, nodules in case.box_nodules.items():
                for j, n in enumerate(nodules):
                    self._boxes.append((ci, k, j))
                    hard = is_hard(case.truth.nodules[n])
                    self.num_hard_boxes += hard
                    weights.append((self.hard_weight if hard else 1.0) * per_nodule[n] ** -self.nodule_balance)
        if not self._negatives:
            raise ValueError("no slices to sample from")
        if (self.hard_weight != 1.0 or self.nodule_balance != 0.0) and weights:
            w = np.asarray(weights, np.float64)
            self._hard_p = w / w.sum()

    @property
    def num_positive_slices(self) -> int:
        return len(self._positives)

    def stack(self, case: CaseData, k_slice: int) -> np.ndarray:
        """uint8 [k, H, W]: the slice and its 2.5D context, edge-replicated like the server does."""
        return case.stack(self.k, k_slice)

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """One crop: uint8 [k, crop, crop] and boxes [M, 4] in crop pixels."""
        positive = self._positives and rng.random() < self.p_positive
        box_index = None
        if not positive:
            ci, ks = self._negatives[rng.integers(len(self._negatives))]
        elif self._hard_p is None:  # every positive slice equally likely (one draw, as stage 1 did)
            ci, ks = self._positives[rng.integers(len(self._positives))]
        else:  # weighted by box: hard nodules more often
            ci, ks, box_index = self._boxes[rng.choice(len(self._boxes), p=self._hard_p)]
        case = self.cases[ci]
        h, w = case.windowed.shape[1:]
        boxes = case.boxes.get(ks, np.zeros((0, 4), np.float32))
        c = self.crop
        if positive and len(boxes):
            b = boxes[rng.integers(len(boxes)) if box_index is None else box_index]
            # the crop contains the chosen box (when it fits), at a random place in the crop
            lo_x, hi_x = b[2] - c, b[0]
            lo_y, hi_y = b[3] - c, b[1]
            if hi_x < lo_x:
                lo_x = hi_x = (b[0] + b[2]) / 2 - c / 2
            if hi_y < lo_y:
                lo_y = hi_y = (b[1] + b[3]) / 2 - c / 2
            x0 = int(np.clip(rng.uniform(lo_x, hi_x), 0, w - c))
            y0 = int(np.clip(rng.uniform(lo_y, hi_y), 0, h - c))
        else:
            x0 = int(rng.integers(0, w - c + 1))
            y0 = int(rng.integers(0, h - c + 1))
        image = self.stack(case, ks)[:, y0 : y0 + c, x0 : x0 + c]
        return image, crop_boxes(boxes, x0, y0, c, self.min_visible)


HARD_MAX_DIAMETER_MM = 8.0


def is_hard(nodule: NoduleTruth | Nodule) -> bool:
    """What the held-out misses are made of: nodules touching the pleura or a vessel, and small ones."""
    attached = getattr(nodule, "attachment", "unknown") not in ("isolated", "unknown")  # unknown: real data
    return attached or nodule.diameter_mm < HARD_MAX_DIAMETER_MM


def crop_boxes(boxes: np.ndarray, x0: int, y0: int, size: int, min_visible: float) -> np.ndarray:
    """Boxes shifted into a crop and clipped; those with less than ``min_visible`` of their area inside dropped."""
    if len(boxes) == 0:
        return np.zeros((0, 4), np.float32)
    shifted = boxes - np.array([x0, y0, x0, y0], dtype=np.float32)
    clipped = shifted.clip(0, size)
    area = (shifted[:, 2] - shifted[:, 0]) * (shifted[:, 3] - shifted[:, 1])
    inside = (clipped[:, 2] - clipped[:, 0]).clip(0) * (clipped[:, 3] - clipped[:, 1]).clip(0)
    keep = inside >= min_visible * np.maximum(area, 1e-6)
    return clipped[keep].astype(np.float32)
