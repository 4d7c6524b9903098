"""The logic both clients share, free of any transport: inputs -> ordered series -> slab requests,
responses -> detections -> ``SeriesResult``; the metadata contract; error enrichment.

``LesionClient`` (threads) and ``AsyncLesionClient`` (asyncio) only decide *how* the requests built
here travel; everything they must agree on lives in this module.
"""

from __future__ import annotations

import io
import math
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pydicom
import tritonclient.grpc as grpcclient

from ctlesion_client.errors import DeadlineExceededError, InvalidInputError, SeriesSelectionError
from ctlesion_client.merge import merge_slabs
from ctlesion_client.options import ClientOptions, DetectOptions
from ctlesion_client.result import SeriesResult
from ctlesion_client.slabs import SlabPlan, plan_slabs, request_slab_size
from preprocess_backend.dicom_io import DecodedSlice, DicomHeader, decode_slice, read_header
from preprocess_backend.errors import DicomInputError
from preprocess_backend.lesions import link_lesions, midline_x_from_mask
from preprocess_backend.masks import body_mask, outside_field
from preprocess_backend.pipeline import detections_from_arrays
from preprocess_backend.series import SeriesGeometry, assemble_series, series_key, slice_from_header
from preprocess_backend.types import Detection, Options

InputItem = str | Path | bytes | bytearray | memoryview | pydicom.Dataset
SeriesInput = InputItem | Iterable[InputItem]

# The ensemble contract (docs/contracts.md): name -> (datatype, shape).
CONTRACT_INPUTS: dict[str, tuple[str, tuple[int, ...]]] = {
    "dicom": ("BYTES", (-1,)),
    "window": ("BYTES", (1,)),
    "score_threshold": ("FP32", (1,)),
    "nms_iou": ("FP32", (1,)),
    "min_size_mm": ("FP32", (1,)),
    "max_size_mm": ("FP32", (1,)),
}
CONTRACT_OUTPUTS: dict[str, tuple[str, tuple[int, ...]]] = {
    "boxes_px": ("FP32", (-1, 4)),
    "boxes_mm": ("FP32", (-1, 4)),
    "scores": ("FP32", (-1,)),
    "classes": ("INT32", (-1,)),
    "slice_index": ("INT32", (-1,)),
    "sop_instance_uid": ("BYTES", (-1,)),
    "mean_hu": ("FP32", (-1,)),
}
_DICM_OFFSET = 128


class Transport(Protocol):
    """The subset of ``tritonclient.grpc.InferenceServerClient`` the sync client uses (tests fake it)."""

    def is_server_ready(self, headers: Any = None, client_timeout: float | None = None) -> bool: ...
    def is_model_ready(self, model_name: str, model_version: str = "", headers: Any = None,
                       client_timeout: float | None = None) -> bool: ...
    def get_model_metadata(self, model_name: str, model_version: str = "", headers: Any = None,
                           as_json: bool = False, client_timeout: float | None = None) -> Any: ...
    def infer(self, model_name: str, inputs: Any, **kwargs: Any) -> Any: ...
    def close(self) -> None: ...


# ----------------------------------------------------------------------------- inputs


@dataclass
class SeriesItem:
    """One DICOM file of the input: its header now, its bytes only when its slab is sent."""

    source: str  # file path as given, or "item N" for bytes / datasets
    header: DicomHeader
    path: Path | None = None
    data: bytes | None = None

    def read(self) -> bytes:
        if self.data is not None:
            return self.data
        assert self.path is not None
        try:
            return self.path.read_bytes()
        except OSError as exc:
            raise InvalidInputError(f"cannot read: {exc.strerror or exc}", "CLIENT", source=self.source) from exc


def _is_part10(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            f.seek(_DICM_OFFSET)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _dataset_bytes(ds: pydicom.Dataset, label: str) -> bytes:
    buf = io.BytesIO()
    try:
        ds.save_as(buf, enforce_file_format=True)
    except Exception as exc:  # pydicom raises several types for datasets it cannot write
        raise InvalidInputError(f"cannot write the dataset as DICOM Part-10: {exc}", "CLIENT", source=label) from exc
    return buf.getvalue()


def _header(data: bytes | Path, label: str) -> DicomHeader:
    try:
        header = read_header(data, source=label)
    except DicomInputError as exc:
        raise InvalidInputError(exc.reason, "CLIENT", source=label) from exc
    # pydicom reads a cut file up to where it ends without complaint: insist on what grouping needs.
    # An empty SOPInstanceUID was already taken from the file meta and an empty SeriesInstanceUID is
    # replaced by a derived series key (series_key), both with a warning; without either it is refused.
    if not header.sop_instance_uid:
        raise InvalidInputError("no SOPInstanceUID in the header or the file meta (truncated file?)", "CLIENT", source=label)
    if not header.series_instance_uid and not (header.frame_of_reference_uid or header.study_instance_uid):
        raise InvalidInputError(
            "no SeriesInstanceUID, FrameOfReferenceUID or StudyInstanceUID to group by (truncated file?)", "CLIENT", source=label
        )
    if header.rows <= 0 or header.columns <= 0:
        raise InvalidInputError("no Rows / Columns in the header (not an image, or truncated)", "CLIENT", source=label)
    return header


def collect_items(inputs: SeriesInput) -> tuple[list[SeriesItem], list[str]]:
    """Headers (pydicom ``stop_before_pixels``) of every input file; pixel data stays on disk.

    A directory is searched recursively; files in it without the DICM preamble (README, DICOMDIR
    helpers, thumbnails) are skipped with a warning. Files named explicitly, bytes and datasets
    must all be DICOM: a bad one is an ``InvalidInputError`` naming it.
    """
    if isinstance(inputs, str | Path | bytes | bytearray | memoryview | pydicom.Dataset):
        inputs = [inputs]
    items: list[SeriesItem] = []
    warnings: list[str] = []
    for n, entry in enumerate(inputs):
        if isinstance(entry, str | Path):
            path = Path(entry)
            if path.is_dir():
                skipped = 0
                for file in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
                    if file.name.upper() == "DICOMDIR" or not _is_part10(file):
                        skipped += 1
                        continue
                    items.append(SeriesItem(str(file), _header(file, str(file)), path=file))
                if skipped:
                    warnings.append(f"{path}: {skipped} non-DICOM file(s) skipped")
            elif path.is_file():
                items.append(SeriesItem(str(path), _header(path, str(path)), path=path))
            else:
                raise InvalidInputError("no such file or directory", "CLIENT", source=str(path))
        elif isinstance(entry, pydicom.Dataset):
            label = f"item {n}"
            data = _dataset_bytes(entry, label)
            items.append(SeriesItem(label, _header(data, label), data=data))
        elif isinstance(entry, bytes | bytearray | memoryview):
            label = f"item {n}"
            data = bytes(entry)
            items.append(SeriesItem(label, _header(data, label), data=data))
        else:
            raise TypeError(f"unsupported input {type(entry).__name__}: give paths, bytes or pydicom datasets")
    if not items:
        raise SeriesSelectionError("no DICOM files in the input")
    return items, warnings


def select_series(items: Sequence[SeriesItem], series_uid: str | None = None) -> tuple[list[SeriesItem], list[str]]:
    """The items of one series: ``series_uid`` if given, else the only series present."""
    groups: dict[str, list[SeriesItem]] = {}
    for item in items:  # an empty SeriesInstanceUID groups by a derived key (series_key)
        groups.setdefault(series_key(item.header), []).append(item)

    def listing() -> str:
        return ", ".join(f"{uid or '<none>'} ({g[0].header.modality or '?'}, {len(g)} files)" for uid, g in groups.items())

    if series_uid is not None:
        if series_uid not in groups:
            raise SeriesSelectionError(f"series {series_uid} is not in the input; found: {listing()}")
        others = len(items) - len(groups[series_uid])
        warnings = [f"{others} file(s) of {len(groups) - 1} other series ignored"] if others else []
        return groups[series_uid], warnings
    if len(groups) > 1:
        raise SeriesSelectionError(f"the input holds {len(groups)} series, pass series_uid to pick one: {listing()}")
    return list(items), []


def _header_slice(index: int, h: DicomHeader) -> DecodedSlice:
    # the server's ordering on headers only: one implementation in preprocess_backend.series
    return slice_from_header(h, item=index)


# ----------------------------------------------------------------------------- the prepared series


@dataclass
class PreparedSeries:
    """One series in position order with its slab plan: everything needed to send and to finish."""

    items: list[SeriesItem]  # series order
    plans: list[SlabPlan]
    geometry: SeriesGeometry | None
    series_instance_uid: str
    study_instance_uid: str
    modality: str
    warnings: list[str] = field(default_factory=list)
    merge: bool = True  # False for detect_image: one request whose indices need no mapping
    read_s: float = 0.0

    @property
    def index_of_uid(self) -> dict[str, int]:
        return {item.header.sop_instance_uid: i for i, item in enumerate(self.items)}

    def slab_items(self, plan: SlabPlan) -> list[SeriesItem]:
        return self.items[plan.send_start : plan.send_stop]

    def slab_bytes(self, plan: SlabPlan) -> list[bytes]:
        return [item.read() for item in self.slab_items(plan)]


def prepare_series(
    inputs: SeriesInput,
    options: ClientOptions,
    series_uid: str | None = None,
) -> PreparedSeries:
    """Read headers, pick the series, order it as preprocess_backend does, cut slabs (halo = k // 2,
    or what reaches the served mm offsets at this series' spacing; requests keep their planned size)."""
    t0 = time.perf_counter()
    items, warnings = collect_items(inputs)
    items, more = select_series(items, series_uid)
    warnings += more
    multi = [it for it in items if it.header.frames > 1]
    if multi:
        raise InvalidInputError(
            f"multi-frame image ({multi[0].header.frames} frames): the slab planner splits single-frame "
            "series only; send it alone with detect_image",
            "CLIENT",
            source=multi[0].source,
        )
    try:
        series = assemble_series([_header_slice(i, it.header) for i, it in enumerate(items)])
    except DicomInputError as exc:
        raise InvalidInputError(exc.reason, "CLIENT", source=exc.source) from exc
    ordered = [items[s.extra["item"]] for s in series.slices]
    report = series.report
    if report.repeated_instances:
        warnings.append(f"{len(report.repeated_instances)} repeated SOPInstanceUID(s) sent once")
    if report.duplicates:
        warnings.append(f"{len(report.duplicates)} slice(s) share a position with another slice")
    for after, spacing in report.gaps:
        warnings.append(f"gap of {spacing:.2f} mm after slice {after + 1} (median {report.median_spacing_mm:.2f} mm)")
    warnings += report.inconsistent
    warnings += report.warnings  # leniency (UIDs filled in): said in the result
    geometry = series.geometry if series.has_geometry else None
    first = ordered[0].header
    return PreparedSeries(
        items=ordered,
        plans=_plans(len(ordered), options, geometry.slice_spacing if geometry is not None and len(ordered) > 1 else None),
        geometry=geometry,
        series_instance_uid=series.series_instance_uid,
        study_instance_uid=first.study_instance_uid,
        modality=first.modality,
        warnings=warnings,
        read_s=time.perf_counter() - t0,
    )


def _plans(n: int, options: ClientOptions, spacing_mm: float | None) -> list[SlabPlan]:
    halo = options.series_halo(spacing_mm)
    slab = options.slab_size if halo == options.halo else request_slab_size(options.slab_size, options.halo, halo)
    return plan_slabs(n, slab, halo)


def prepare_image(image: str | Path | bytes | bytearray | pydicom.Dataset) -> PreparedSeries:
    """One radiograph / one slice / one multi-frame file as a single request (no halo, no merge)."""
    t0 = time.perf_counter()
    items, warnings = collect_items(image)
    if len(items) != 1:
        raise SeriesSelectionError(f"detect_image takes one image, got {len(items)} files (use detect_series)")
    h = items[0].header
    has_geometry = h.frames == 1 and None not in (h.position, h.orientation, h.pixel_spacing)
    geometry = None
    if has_geometry:
        geometry = SeriesGeometry(
            positions=np.asarray([h.position], dtype=np.float64),
            orientation=np.asarray(h.orientation, dtype=np.float64),
            pixel_spacing=h.pixel_spacing,  # type: ignore[arg-type]
            rows=h.rows,
            columns=h.columns,
            slice_thickness=h.slice_thickness,
            sop_instance_uids=[h.sop_instance_uid],
        )
    return PreparedSeries(
        items=items,
        plans=plan_slabs(1, 1, 0),
        geometry=geometry,
        series_instance_uid=h.series_instance_uid,
        study_instance_uid=h.study_instance_uid,
        modality=h.modality,
        warnings=warnings,
        merge=False,
        read_s=time.perf_counter() - t0,
    )


# ----------------------------------------------------------------------------- requests / responses


def build_inputs(items: Sequence[bytes], detect: DetectOptions) -> list[grpcclient.InferInput]:
    """The ensemble's inputs for one slab (tritonclient.grpc.aio uses the same InferInput class)."""
    dicom = grpcclient.InferInput("dicom", [len(items)], "BYTES")
    dicom.set_data_from_numpy(np.array(list(items), dtype=object))
    inputs = [dicom]
    for name, value in detect.as_inputs().items():
        if name == "window":
            tensor = grpcclient.InferInput(name, [1], "BYTES")
            tensor.set_data_from_numpy(np.array([str(value).encode()], dtype=object))
        else:
            tensor = grpcclient.InferInput(name, [1], "FP32")
            tensor.set_data_from_numpy(np.array([float(value)], dtype=np.float32))
        inputs.append(tensor)
    return inputs


def requested_outputs() -> list[grpcclient.InferRequestedOutput]:
    return [grpcclient.InferRequestedOutput(name) for name in CONTRACT_OUTPUTS]


def infer_kwargs(options: ClientOptions, inputs: list[grpcclient.InferInput]) -> dict[str, Any]:
    """Keyword arguments of ``infer`` for both clients: model, deadline, compression."""
    return {
        "model_name": options.model_name,
        "inputs": inputs,
        "outputs": requested_outputs(),
        "client_timeout": options.client_timeout_s,
        "compression_algorithm": options.compression_algorithm,
    }


def transport_kwargs(url: str, options: ClientOptions) -> dict[str, Any]:
    """Constructor arguments of tritonclient's gRPC clients (TLS when ``options.tls`` is set)."""
    kwargs: dict[str, Any] = {"url": url}
    if options.tls is not None:
        kwargs.update(
            ssl=True,
            root_certificates=options.tls.root_cert,
            private_key=options.tls.client_key,
            certificate_chain=options.tls.client_cert,
        )
    return kwargs


def parse_response(result: Any) -> list[Detection]:
    """Ensemble outputs -> detections (slab indices, as the server numbered them)."""
    arrays: dict[str, np.ndarray] = {}
    for name in CONTRACT_OUTPUTS:
        value = result.as_numpy(name)
        if value is None:
            raise ValueError(f"response has no output {name!r}")
        arrays[name] = value
    return detections_from_arrays(arrays)


_ITEM_RE = re.compile(r"\bitem (\d+)\b")


def enrich_invalid_input(exc: InvalidInputError, prepared: PreparedSeries, plan: SlabPlan) -> InvalidInputError:
    """Name the slab, its slices and the client-side file of a refusal the server only knows by
    SOPInstanceUID or item number."""
    message = exc.server_message
    slab_items = prepared.slab_items(plan)
    source = exc.source
    if source is None:
        for item in slab_items:
            uid = item.header.sop_instance_uid
            if uid and uid in message:
                source = item.source
                break
    if source is None:
        match = _ITEM_RE.search(message)
        if match and int(match.group(1)) < len(slab_items):
            source = slab_items[int(match.group(1))].source
    slab = plan.index if prepared.merge else None
    slices = (plan.send_start, plan.send_stop) if prepared.merge else None
    return InvalidInputError(message, exc.status, slab=slab, source=source, slices=slices)


# ----------------------------------------------------------------------------- metadata


def _field(obj: Any, name: str) -> Any:
    return obj[name] if isinstance(obj, Mapping) else getattr(obj, name)


def check_metadata(metadata: Any) -> list[str]:
    """Differences between the served model's metadata and the contract (empty list: it matches).

    Accepts tritonclient's protobuf ``ModelMetadataResponse`` or its JSON form.
    """
    problems: list[str] = []
    for kind, expected in (("input", CONTRACT_INPUTS), ("output", CONTRACT_OUTPUTS)):
        served = {str(_field(t, "name")): t for t in _field(metadata, kind + "s")}
        for name, (dtype, shape) in expected.items():
            tensor = served.get(name)
            if tensor is None:
                problems.append(f"{kind} {name!r} missing")
                continue
            got_dtype = str(_field(tensor, "datatype"))
            got_shape = tuple(int(d) for d in _field(tensor, "shape"))
            if got_dtype != dtype:
                problems.append(f"{kind} {name!r} is {got_dtype}, expected {dtype}")
            if got_shape != shape:
                problems.append(f"{kind} {name!r} has shape {list(got_shape)}, expected {list(shape)}")
    return problems


# ----------------------------------------------------------------------------- readiness


class ReadyPoll:
    """Deadline bookkeeping of ``wait_ready``: per-probe timeouts and growing pauses until the deadline."""

    def __init__(self, url: str, timeout_s: float, first_delay_s: float = 0.1, max_delay_s: float = 1.0) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.deadline = time.monotonic() + timeout_s
        self.delay = first_delay_s
        self.max_delay = max_delay_s
        self.last_status = "no answer"

    def probe_timeout(self) -> float:
        return max(0.05, min(2.0, self.deadline - time.monotonic()))

    def next_delay(self, status: str) -> float:
        """Seconds to wait before the next probe; ``DeadlineExceededError`` when the time is up."""
        self.last_status = status
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceededError(
                f"server {self.url} not ready after {self.timeout_s:g} s (last: {self.last_status})"
            )
        delay = min(self.delay, left)
        self.delay = min(self.delay * 2, self.max_delay)
        return delay


# ----------------------------------------------------------------------------- the result


def options_used(options: ClientOptions, detect: DetectOptions) -> dict[str, Any]:
    defaults = Options()
    return {
        **{k: v for k, v in asdict(detect).items()},
        "server_defaults": {"window": defaults.window, "score_threshold": defaults.score_threshold,
                            "nms_iou": defaults.nms_iou, "min_size_mm": defaults.min_size_mm,
                            "max_size_mm": defaults.max_size_mm},
        "slab_size": options.slab_size,
        "halo": options.halo,
        "k": options.k,
        "context_mm": options.context_mm,
        "concurrency": options.concurrency,
        "compression": options.compression,
        "tls": options.tls is not None,
        "link_iou": defaults.link_iou,
        "link_max_gap": defaults.link_max_gap,
    }


def patient_midline_x(prepared: PreparedSeries) -> float | None:
    """LPS x (mm) of the patient's midline for the side guess: the body-mask centroid of the
    series' middle slice, decoded here (one more read of that file, ~30 ms for 512 x 512).

    The ensemble's outputs carry no body position, and the header geometry only knows the field
    of view, whose middle is off the patient's midline when the patient lies off-centre. None when
    there is no geometry or the slice cannot be read (linking then splits at the field's middle).
    """
    if prepared.geometry is None or not prepared.items or not prepared.merge:
        return None
    k = len(prepared.items) // 2
    item = prepared.items[k]
    try:
        hu = decode_slice(item.read(), source=item.source).hu
        body = body_mask(hu, outside=outside_field(hu))  # the server's rule: a cut field closes the body
        return midline_x_from_mask(body, prepared.geometry, slices=[k])
    except (DicomInputError, InvalidInputError):
        return None


def finish(
    prepared: PreparedSeries,
    slab_results: Sequence[tuple[SlabPlan, Sequence[Detection]]],
    options: ClientOptions,
    detect: DetectOptions,
    timings: dict[str, float],
    extra_warnings: Sequence[str] = (),
) -> SeriesResult:
    """Drop halo detections, map them to series order, link 3D lesions with the series geometry."""
    t0 = time.perf_counter()
    warnings = list(prepared.warnings) + list(extra_warnings)
    if prepared.merge:
        detections, more = merge_slabs(sorted(slab_results, key=lambda r: r[0].index), prepared.index_of_uid)
        warnings += more
    else:
        detections = sorted((d for _, dets in slab_results for d in dets), key=lambda d: (d.slice_index, -d.score))
    lesions = []
    if prepared.geometry is not None and detections:
        defaults = Options()
        try:
            lesions = link_lesions(detections, prepared.geometry, link_iou=defaults.link_iou, max_gap=defaults.link_max_gap,
                                   midline_x_mm=patient_midline_x(prepared))
        except DicomInputError as exc:
            warnings.append(f"3D linking skipped: {exc}")
    elif detections:
        warnings.append("no patient geometry (radiograph?): per-image detections only, no 3D lesions")
    timings = dict(timings)
    timings["link_s"] = time.perf_counter() - t0
    timings["read_s"] = prepared.read_s
    return SeriesResult(
        series_instance_uid=prepared.series_instance_uid,
        study_instance_uid=prepared.study_instance_uid,
        modality=prepared.modality,
        num_slices=len(prepared.items),
        sop_instance_uids=[it.header.sop_instance_uid for it in prepared.items],
        sources=[it.source for it in prepared.items],
        detections=detections,
        lesions=lesions,
        geometry=prepared.geometry,
        warnings=warnings,
        timings={k: float(v) for k, v in timings.items() if isinstance(v, int | float) and not math.isnan(v)},
        options=options_used(options, detect),
        model_name=options.model_name,
        num_slabs=len(prepared.plans),
    )
