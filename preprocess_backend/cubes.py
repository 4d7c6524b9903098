"""3D candidate cubes for false-positive reduction: HU around a lesion centre on a fixed mm grid.

A 2D detector cannot tell a vessel cross-section from a nodule on one slice; in 3D a vessel is a
tube that moves in-plane from slice to slice while a nodule is a blob that ends. The false-positive
reduction model (``ctlesion_fpr``) reads a cube of fixed physical size around each linked lesion, so
the same cube comes out of a 0.625 mm and a 5 mm series, at any pixel size.

Conventions: the cube's axes follow the image axes (slice normal, column direction, row direction);
voxel (d, h, w) of a cube centred on c (LPS mm) samples the point
``c + (d - (D-1)/2) * sz * normal + (h - (H-1)/2) * sy * col_dir + (w - (W-1)/2) * sx * row_dir``.
Pixel centres are on integer (column, row) coordinates, as ``SeriesGeometry.pixel_to_patient``.
Outside the slices given, the nearest slice / pixel is repeated (series ends, image borders).
Values are HU mapped linearly to uint8 (``hu_to_code``): small to send, exact enough for a CNN.

The server (``fpr_preprocess``), training and evaluation all cut cubes with ``extract_cubes``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from preprocess_backend.dicom_io import DecodedSlice
from preprocess_backend.errors import DicomInputError
from preprocess_backend.series import SeriesGeometry


@dataclass(frozen=True)
class CubeSpec:
    """Shape and physical size of a candidate cube; the FPR model declares the one it was trained on."""

    shape: tuple[int, int, int] = (16, 32, 32)  # (z, y, x) voxels
    spacing_mm: tuple[float, float, float] = (1.5, 1.0, 1.0)  # (z, y, x)
    hu_min: float = -1000.0  # uint8 code 0
    hu_max: float = 400.0  # uint8 code 255

    @property
    def half_extent_mm(self) -> np.ndarray:
        """Half size along (z, y, x) in mm, to the outermost voxel centre."""
        return (np.asarray(self.shape, dtype=np.float64) - 1) / 2 * np.asarray(self.spacing_mm)

    def to_dict(self) -> dict[str, object]:
        return {"shape": list(self.shape), "spacing_mm": list(self.spacing_mm), "hu_min": self.hu_min, "hu_max": self.hu_max}

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> CubeSpec:
        return cls(
            shape=tuple(int(v) for v in d["shape"]),  # type: ignore[arg-type, union-attr]
            spacing_mm=tuple(float(v) for v in d["spacing_mm"]),  # type: ignore[arg-type, union-attr]
            hu_min=float(d.get("hu_min", -1000.0)),  # type: ignore[arg-type]
            hu_max=float(d.get("hu_max", 400.0)),  # type: ignore[arg-type]
        )


DEFAULT_CUBE = CubeSpec()


def hu_to_code(hu: np.ndarray, spec: CubeSpec = DEFAULT_CUBE) -> np.ndarray:
    """HU -> uint8 codes 0..255 over [hu_min, hu_max] (clipped, rounded)."""
    scale = 255.0 / (spec.hu_max - spec.hu_min)
    out = (np.asarray(hu, dtype=np.float32) - np.float32(spec.hu_min)) * np.float32(scale) + np.float32(0.5)
    np.clip(out, 0, 255, out=out)
    return out.astype(np.uint8)


@dataclass(frozen=True)
class SliceCodes:
    """One decoded slice as cube codes, converted only where a crop is read.

    A cube reads ~45 x 45 pixels of a 512 x 512 slice: converting the whole slice to float HU and
    then to codes cost ~1.4 of the ~2.5 ms per slice a cube request took. ``codes[rows, cols]``
    equals ``hu_to_code(hu)[rows, cols]`` exactly (the same element-wise arithmetic).
    """

    slice: DecodedSlice
    spec: CubeSpec = DEFAULT_CUBE

    @property
    def shape(self) -> tuple[int, int]:
        return (self.slice.rows, self.slice.columns)

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        rows, cols = key
        return hu_to_code(self.slice.modality_values_in(rows, cols), self.spec)


def slice_range_for(
    geometry: SeriesGeometry, centres_mm: np.ndarray, spec: CubeSpec = DEFAULT_CUBE, margin: int = 1, half_mm: float | None = None
) -> tuple[int, int]:
    """[start, stop) of the series slices that every cube centred on ``centres_mm`` [N, 3] reads
    (``half_mm``: a longer reach along z than the cube's, e.g. the airway probe's).

    The client sends exactly these slices with a cube request; nothing outside is needed.
    """
    centres = np.asarray(centres_mm, dtype=np.float64).reshape(-1, 3)
    if centres.size == 0:
        return 0, 0
    z = geometry.z
    order = np.argsort(z, kind="stable")
    w = centres @ geometry.normal
    half = spec.half_extent_mm[0] if half_mm is None else max(float(half_mm), spec.half_extent_mm[0])
    lo = np.interp(w - half, z[order], order.astype(np.float64))
    hi = np.interp(w + half, z[order], order.astype(np.float64))
    start = max(0, int(np.floor(min(lo.min(), hi.min()))) - margin)
    stop = min(len(z), int(np.ceil(max(lo.max(), hi.max()))) + 1 + margin)
    return start, stop


def _sample_points(
    geometry: SeriesGeometry, centre: np.ndarray, spec: CubeSpec, rotation_rad: float, scale: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fractional (slice index, row, column) of every cube voxel, each [D, H, W]."""
    d, h, w = spec.shape
    sz, sy, sx = (s * scale for s in spec.spacing_mm)
    iop = geometry.orientation
    x_dir, y_dir, normal = iop[:3], iop[3:], geometry.normal
    if rotation_rad:  # in-plane rotation of the sampling axes (training augmentation)
        c, s = np.cos(rotation_rad), np.sin(rotation_rad)
        x_dir, y_dir = c * x_dir + s * y_dir, -s * x_dir + c * y_dir
    gz = (np.arange(d) - (d - 1) / 2) * sz
    gy = (np.arange(h) - (h - 1) / 2) * sy
    gx = (np.arange(w) - (w - 1) / 2) * sx
    # points [D, H, W, 3] in LPS mm
    pts = centre + gz[:, None, None, None] * normal + gy[None, :, None, None] * y_dir + gx[None, None, :, None] * x_dir
    z = geometry.z
    order = np.argsort(z, kind="stable")
    along = pts @ normal
    idx = np.interp(along, z[order], order.astype(np.float64))
    # per-sample in-plane origin, interpolated between slices (exact for parallel slices, tolerant of tilt)
    origin = np.stack([np.interp(idx, np.arange(len(z)), geometry.positions[:, a]) for a in range(3)], axis=-1)
    rel = pts - origin
    row_sp, col_sp = geometry.pixel_spacing
    col = rel @ iop[:3] / col_sp
    row = rel @ iop[3:] / row_sp
    return idx, row, col


def extract_cubes(
    codes: np.ndarray | Sequence[np.ndarray] | Sequence[SliceCodes],
    geometry: SeriesGeometry,
    centres_mm: np.ndarray,
    spec: CubeSpec = DEFAULT_CUBE,
    first_slice: int = 0,
    rotation_rad: Sequence[float] | None = None,
    scale: Sequence[float] | None = None,
) -> np.ndarray:
    """uint8 [N, D, H, W] cubes around ``centres_mm`` [N, 3] (LPS) by trilinear interpolation.

    ``codes`` holds slices ``first_slice ..`` of the series in series order as uint8 codes
    (``hu_to_code``), an array [Z, rows, columns], a list of [rows, columns] or of ``SliceCodes``
    (what ``decode_codes`` gives); ``geometry`` is the
    whole series' (or exactly these slices' when ``first_slice`` is 0). ``rotation_rad`` / ``scale``
    per cube are for training augmentation; serving uses neither.
    """
    centres = np.asarray(centres_mm, dtype=np.float64).reshape(-1, 3)
    n = centres.shape[0]
    out = np.zeros((n, *spec.shape), dtype=np.uint8)
    if n == 0:
        return out
    if not np.all(np.isfinite(centres)):
        raise DicomInputError("fpr", "lesion centre is not finite")
    num = len(codes)
    if num == 0:
        raise DicomInputError("fpr", "no slices to cut cubes from")
    rows, cols = codes[0].shape
    for i in range(n):
        rot = 0.0 if rotation_rad is None else float(rotation_rad[i])
        sc = 1.0 if scale is None else float(scale[i])
        idx, row, col = _sample_points(geometry, centres[i], spec, rot, sc)
        idx = np.clip(idx - first_slice, 0, num - 1)
        # only the box of slices / pixels this cube touches is stacked and interpolated
        z0, z1 = int(np.floor(idx.min())), int(np.ceil(idx.max())) + 1
        r0, r1 = int(np.clip(np.floor(row.min()), 0, rows - 1)), int(np.clip(np.ceil(row.max()) + 1, 1, rows))
        c0, c1 = int(np.clip(np.floor(col.min()), 0, cols - 1)), int(np.clip(np.ceil(col.max()) + 1, 1, cols))
        r1, c1 = max(r1, r0 + 1), max(c1, c0 + 1)
        block = np.stack([codes[z][r0:r1, c0:c1] for z in range(z0, min(z1, num))]).astype(np.float32)
        coords = np.stack([idx - z0, row - r0, col - c0])
        vals = ndimage.map_coordinates(block, coords, order=1, mode="nearest")
        out[i] = np.clip(vals + 0.5, 0, 255).astype(np.uint8)
    return out


def decode_codes(dicom_items: Sequence[bytes], spec: CubeSpec = DEFAULT_CUBE, options: object = None) -> tuple[list[SliceCodes], SeriesGeometry]:
    """DICOM slices of one CT series (any order) -> uint8 codes per slice in series order (converted
    where a cube reads them) + geometry."""
    from preprocess_backend.pipeline import decode_items
    from preprocess_backend.series import assemble_series
    from preprocess_backend.types import Options

    opts = options if isinstance(options, Options) else Options()
    series = assemble_series(decode_items(dicom_items, opts, with_hu=False))
    if not series.has_geometry:
        raise DicomInputError(series.slices[0].source, "no patient geometry: cannot place a cube in mm")
    not_ct = [s for s in series.slices if not s.is_ct]
    if not_ct:
        raise DicomInputError(not_ct[0].sop_instance_uid or not_ct[0].source, f"modality {not_ct[0].modality!r}: cubes are cut from CT only")
    shapes = {s.hu.shape for s in series.slices}
    if len(shapes) != 1:
        raise DicomInputError(series.slices[0].source, f"slices of different sizes {sorted(shapes)} in one request")
    return [SliceCodes(s, spec) for s in series.slices], series.geometry


def cubes_from_dicom(dicom_items: Sequence[bytes], centres_mm: np.ndarray, spec: CubeSpec = DEFAULT_CUBE, options: object = None) -> np.ndarray:
    """The server side of a cube request: DICOM slices of one series (any order) + lesion centres ->
    uint8 cubes [N, D, H, W]. The client sends the slices ``slice_range_for`` names, so each cube
    here equals the one cut from the whole series (tests/test_fpr.py)."""
    centres = check_centres(centres_mm)
    codes, geometry = decode_codes(dicom_items, spec, options)
    return extract_cubes(codes, geometry, centres, spec)


def check_centres(centres_mm: np.ndarray) -> np.ndarray:
    """float64 [N, 3] lesion centres of a request, or the reason it is refused."""
    centres = np.asarray(centres_mm, dtype=np.float64)
    if centres.ndim != 2 or centres.shape[1] != 3:
        raise DicomInputError("centres_mm", f"expected [N, 3] lesion centres in mm, got shape {list(centres.shape)}")
    if not np.all(np.isfinite(centres)):
        raise DicomInputError("centres_mm", "lesion centres must be finite")
    return centres
