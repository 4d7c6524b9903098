"""Calibration / evaluation slices drawn from DICOM series through ``preprocess_backend``.

The INT8 ranges must be measured on exactly what the served detector sees, so slices go through the
serving code path: ``preprocess_slab`` on a small slab of consecutive slices (the wanted slice plus
k//2 neighbours each side, as the client cuts slabs with a halo), and the wanted slice's 2.5D image is
kept. Decoding a few neighbours per slice keeps memory bounded for 300-slice series, and the edge
slices get the same edge-replicated context as in a whole-series slab.

Layout accepted: any folder tree; every folder holding ``*.dcm`` files is one series (the phantom
generator writes DIR/<case>/series/*.dcm).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from preprocess_backend.dicom_io import read_header
from preprocess_backend.pipeline import preprocess_slab
from preprocess_backend.types import Options


@dataclass(frozen=True)
class SliceRef:
    """One slice to draw: the series' files in position order and the slice's index among them."""

    files: tuple[Path, ...]
    index: int

    @property
    def name(self) -> str:
        return f"{self.files[self.index].parent}/{self.files[self.index].name}"


def find_series_dirs(root: Path | Sequence[Path]) -> list[Path]:
    """Folders holding .dcm files under ``root`` (or under each of several roots), sorted."""
    roots = [Path(root)] if isinstance(root, str | Path) else [Path(r) for r in root]
    found: set[Path] = set()
    for r in roots:
        if not r.exists():
            raise FileNotFoundError(f"calibration folder {r} not found")
        found.update(p.parent for p in r.rglob("*.dcm"))
    return sorted(found)


def order_series(series_dir: Path) -> tuple[Path, ...]:
    """Files of one series sorted along the slice normal (headers only, no pixel decoding)."""
    files = sorted(Path(series_dir).glob("*.dcm"))
    if not files:
        raise ValueError(f"{series_dir}: no .dcm files")
    headers = [read_header(f) for f in files]

    def key(i: int) -> tuple[float, int, str]:
        h = headers[i]
        pos = float(np.dot(h.position, h.normal)) if h.position is not None and h.normal is not None else 0.0
        return (pos, h.instance_number or 0, files[i].name)

    return tuple(files[i] for i in sorted(range(len(files)), key=key))


def pick_slices(series_dirs: Sequence[Path], slices_per_series: int) -> list[SliceRef]:
    """Evenly spaced slices of each series (apex to base), ``slices_per_series`` at most each."""
    refs: list[SliceRef] = []
    for d in series_dirs:
        files = order_series(d)
        count = min(slices_per_series, len(files))
        # Evenly spaced, not random: covers the whole chest and is reproducible.
        for i in np.unique(np.linspace(0, len(files) - 1, count).round().astype(int)):
            refs.append(SliceRef(files, int(i)))
    return refs


def slice_image(ref: SliceRef, options: Options) -> np.ndarray:
    """The 2.5D model image [k, S, S] of one slice, computed by ``preprocess_slab`` on a haloed slab."""
    # planes at mm offsets may reach past the neighbours: 4x covers slices down to context_mm / 4 apart
    half = options.k // 2 if options.context_mm is None else 4 * (options.k // 2)
    lo, hi = max(0, ref.index - half), min(len(ref.files), ref.index + half + 1)
    slab = preprocess_slab([f.read_bytes() for f in ref.files[lo:hi]], options)
    return slab.images[ref.index - lo]


def load_images(
    series_dirs: Sequence[Path], options: Options, slices_per_series: int = 8, progress: bool = False
) -> np.ndarray:
    """float32 [N, k, S, S] (0..255) of evenly spaced slices of every series."""
    return np.concatenate(list(iter_batches(pick_slices(series_dirs, slices_per_series), options, 16, progress)))


def iter_batches(
    refs: Sequence[SliceRef], options: Options, batch_size: int, progress: bool = False, desc: str = "slices"
) -> Iterator[np.ndarray]:
    """Batches float32 [B, k, S, S] of the slices ``refs``, with a tqdm bar when ``progress``."""
    from tqdm import tqdm

    # uint8 is what serving may send and holds the same integer values as float32 (see preprocess_decoded).
    opts = replace(options, image_dtype="uint8")
    batch: list[np.ndarray] = []
    with tqdm(total=len(refs), unit="slice", desc=desc, disable=not progress) as bar:
        for ref in refs:
            batch.append(slice_image(ref, opts))
            bar.update(1)
            if len(batch) == batch_size:
                yield np.stack(batch).astype(np.float32)
                batch = []
    if batch:
        yield np.stack(batch).astype(np.float32)


class DicomCalibrationReader(CalibrationDataReader):
    """onnxruntime calibration reader: feeds ``{input_name: float32 [B, k, S, S]}`` from DICOM series.

    Images are kept as uint8 after the first pass, so ``rewind()`` (several calibration passes or the
    sensitivity sweep) does not decode again.
    """

    def __init__(
        self,
        series_dirs: Sequence[Path],
        options: Options | None = None,
        slices_per_series: int = 8,
        batch_size: int = 4,
        input_name: str = "images",
        progress: bool = True,
    ) -> None:
        self.options = options or Options()
        self.refs = pick_slices([Path(d) for d in series_dirs], slices_per_series)
        if not self.refs:
            raise ValueError("no calibration slices: no DICOM series given")
        self.batch_size = batch_size
        self.input_name = input_name
        self.progress = progress
        self._cache: list[np.ndarray] = []
        self._complete = False
        self._iter: Iterator[np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.refs)

    def _batches(self) -> Iterator[np.ndarray]:
        if self._complete:
            yield from (b.astype(np.float32) for b in self._cache)
            return
        self._cache = []
        for batch in iter_batches(self.refs, self.options, self.batch_size, self.progress, desc="calibration"):
            self._cache.append(batch.astype(np.uint8))
            yield batch
        self._complete = True

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._iter is None:
            self._iter = self._batches()
        batch = next(self._iter, None)
        return None if batch is None else {self.input_name: batch}

    def rewind(self) -> None:
        self._iter = None

    def images(self) -> np.ndarray:
        """All calibration images float32 [N, k, S, S] (decodes them if not done yet)."""
        self.rewind()
        out = np.concatenate([b[self.input_name] for b in iter(self.get_next, None)])
        self.rewind()
        return out
