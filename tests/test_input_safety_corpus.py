"""Issue 17 through the real tritonserver: refuse what the model cannot read, accept what the standard allows.

One concurrent run sends every item of pydicom's bundled test files, the odd-but-legal and lenient
variants of a good series, the real CT in ../shared/realdata and a 12-bit JPEG Extended CT, with a
good slab between them, and checks each answer:

- pydicom's files: the expected answer follows from facts of the file read with plain pydicom
  (Part-10 or not, image SOP class, PixelData, Modality) and the model contract (CT only);
- every variant of the good series carries its pixels and order, so its answer must *equal* the
  good series' answer (leniency may not change a finding);
- the good slab sent between them must keep its own answer every time.

The hostile corpus itself (87 cases: tests/bad_dicom_corpus.py) runs the same way in
test_reliability_bad_input.py.
"""

from __future__ import annotations

import io
import os
import subprocess
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from bad_dicom_corpus import accepted_variants, good_series
from dicom_factory import make_slice
from pydicom.data import get_testdata_file
from pydicom.uid import UID
from test_reliability_bad_input import infer, same_answer
from tritonclient.utils import InferenceServerException

from preprocess_backend.contract import ModelContract
from preprocess_backend.dicom_io import decode_frames, read_header

PYDICOM_FILES = sorted(Path(os.path.dirname(get_testdata_file("CT_small.dcm"))).rglob("*.dcm"))
REALDATA = Path(__file__).resolve().parents[2] / "shared" / "realdata"
if not REALDATA.exists():  # the main checkout lives at /work/main, the data beside it
    REALDATA = Path("/work/shared/realdata")
TOTALSEG = REALDATA / "totalseg-abdomen-nonchest" / "example_ct_dicom"
LIDC = REALDATA / "lidc0002-slab"
CIP = REALDATA / "cip-ct64-chest"


def _dicom_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.read_bytes()[128:132] == b"DICM")


@dataclass
class Expected:
    """What one request must get: a refusal (``reason`` in the message, naming ``source``) or an answer."""

    refused: bool
    reason: str = ""
    source: str = ""
    check: Callable[[dict[str, np.ndarray]], None] | None = None  # for answers


def pydicom_expectation(path: Path) -> Expected:
    """From the file's own facts (plain pydicom) and the contract, in the order the server checks them."""
    raw = path.read_bytes()
    if raw[128:132] != b"DICM":
        return Expected(True, "not a DICOM Part-10 file", "item 0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(io.BytesIO(raw), force=True)
    meta = getattr(ds, "file_meta", pydicom.Dataset())
    uid = str(ds.get("SOPInstanceUID") or meta.get("MediaStorageSOPInstanceUID") or "")
    source = uid or "item 0"
    sop = str(ds.get("SOPClassUID") or meta.get("MediaStorageSOPClassUID") or "")
    if sop and UID(sop).name != sop and "Image" not in UID(sop).name:
        return Expected(True, "non-image SOP class", source)
    if "PixelData" not in ds:
        return Expected(True, "no PixelData", source)
    modality = str(ds.get("Modality") or "").upper()
    if modality != "CT":
        return Expected(True, f"modality '{modality or '<none>'}' refused", source)
    rows, cols = int(ds.Rows), int(ds.Columns)

    def check(out: dict[str, np.ndarray]) -> None:  # boxes on this file's image, named by its UID
        assert all(u.decode() == uid for u in out["sop_instance_uid"]), path.name
        assert np.all(out["boxes_px"][:, 2] <= cols + 1e-3) and np.all(out["boxes_px"][:, 3] <= rows + 1e-3)

    return Expected(False, check=check)


def test_pydicom_bundle_expectations_cover_every_kind() -> None:
    """No server: the bundle is what the issue names, and the rule spreads it over every refusal kind."""
    assert len(PYDICOM_FILES) >= 78
    expected = {p.name: pydicom_expectation(p) for p in PYDICOM_FILES}
    answered = sorted(name for name, e in expected.items() if not e.refused)
    assert answered == ["693_J2KI.dcm", "CT_small.dcm", "J2K_pixelrep_mismatch.dcm"], answered
    for name in ("ExplVR_BigEnd.dcm", "examples_rgb_color.dcm", "examples_overlay.dcm", "SC_rgb_small_odd.dcm",
                 "MR_small.dcm", "JPEG-lossy.dcm"):  # the "nonsense answered as findings"
        assert expected[name].refused and "refused" in expected[name].reason, name


def _jpeg_extended_ct() -> bytes:
    """pydicom's 12-bit JPEG Extended file (an NM image) relabelled as an axial CT slice, pixels untouched."""
    ds = pydicom.dcmread(get_testdata_file("JPEG-lossy.dcm"))
    ct = "1.2.840.10008.5.1.4.1.1.2"
    ds.Modality, ds.SOPClassUID, ds.file_meta.MediaStorageSOPClassUID = "CT", ct, ct
    ds.PixelSpacing = [0.7, 0.7]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [0, 0, 0]
    ds.SliceThickness = 1.0
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_jpeg_extended_12bit_decodes_as_dcmtk_does(tmp_path: Path) -> None:
    """pydicom's plugins refuse JPEG-lossy.dcm; the decode equals dcmtk's own dcmdjpeg output and says so."""
    src = Path(get_testdata_file("JPEG-lossy.dcm"))
    with pytest.raises(Exception):  # noqa: B017 -- every plugin fails, with its own exception type
        _ = pydicom.dcmread(src).pixel_array
    decoded = decode_frames(src)[0]
    subprocess.run(["dcmdjpeg", str(src), str(tmp_path / "out.dcm")], check=True, capture_output=True, timeout=30)
    reference = pydicom.dcmread(tmp_path / "out.dcm").pixel_array.astype(np.float32)
    np.testing.assert_array_equal(decoded.hu, reference)
    assert any("dcmdjpeg" in w for w in decoded.warnings)
    assert decoded.hu.std() > 0  # a real image, not a blank


def test_totalseg_slices_decode_with_leniency_warnings() -> None:
    """Real files with empty SOP / Series UIDs: accepted, the UID from the file meta, a warning each."""
    files = _dicom_files(TOTALSEG)
    assert len(files) == 20
    s = decode_frames(files[0], contract=ModelContract())[0]
    meta_uid = pydicom.dcmread(files[0], stop_before_pixels=True).file_meta.MediaStorageSOPInstanceUID
    assert s.sop_instance_uid == meta_uid and s.series_instance_uid == ""
    assert any("MediaStorageSOPInstanceUID" in w for w in s.warnings)
    assert -1100 < float(s.hu.min()) < -900  # HU: air around the patient


def _rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def test_header_reads_stop_before_pixel_data() -> None:
    """The client reads headers only: bytes actually read (the kernel's count) are a small part of the files."""
    files = _dicom_files(LIDC)
    total = sum(f.stat().st_size for f in files)
    before = _rchar()
    headers = [read_header(f) for f in files]
    read = _rchar() - before
    assert len(headers) == len(files) >= 10 and all(h.rows == 512 for h in headers)
    assert read < total / 10, (read, total)


# ----------------------------------------------------------------------------- through the server


@dataclass
class Job:
    name: str
    items: list[bytes]
    expected: Expected
    window: str | None = None


def _refusal_check(exc: InferenceServerException, job: Job) -> None:
    message = exc.message() or ""
    assert exc.status() == "StatusCode.INVALID_ARGUMENT", (job.name, exc.status(), message)
    assert job.expected.reason in message and job.expected.source in message, (job.name, message)


def _run(url: str, job: Job) -> tuple[float, dict[str, np.ndarray] | InferenceServerException]:
    started = time.perf_counter()
    try:
        out: dict[str, np.ndarray] | InferenceServerException = infer(url, job.items, window=job.window)
    except InferenceServerException as exc:
        out = exc
    return time.perf_counter() - started, out


def _jobs(good: list[bytes], good_answer: dict[str, np.ndarray]) -> list[Job]:
    jobs = [Job(f"pydicom/{p.name}", [p.read_bytes()], pydicom_expectation(p)) for p in PYDICOM_FILES]

    def equal_to_good(out: dict[str, np.ndarray]) -> None:
        same_answer(out, good_answer)

    for case in accepted_variants(good):
        jobs.append(Job(f"variant/{case.name}", case.items, Expected(False, check=equal_to_good), case.window))

    def well_formed(n: int) -> Callable[[dict[str, np.ndarray]], None]:
        def check(out: dict[str, np.ndarray]) -> None:
            assert out["boxes_px"].shape[1] == 4 and np.all((out["slice_index"] >= 0) & (out["slice_index"] < n))

        return check

    jobs.append(Job("jpeg_extended_12bit_ct", [_jpeg_extended_ct()], Expected(False, check=well_formed(1))))
    lidc = [f.read_bytes() for f in _dicom_files(LIDC)]
    jobs.append(Job("real/lidc0002-slab", lidc, Expected(False, check=well_formed(len(lidc)))))
    totalseg = [f.read_bytes() for f in _dicom_files(TOTALSEG)]
    jobs.append(Job("real/totalseg-abdomen", totalseg, Expected(False, check=well_formed(len(totalseg)))))
    cip = _dicom_files(CIP)
    jobs.append(Job("real/cip-ct64-4mm-pixels", [cip[0].read_bytes()],
                    Expected(True, "outside the model's 0.4-1.2 mm", str(pydicom.dcmread(cip[0]).SOPInstanceUID))))
    xr = make_slice(np.zeros((64, 64)), modality="DX", sop_class="1.2.840.10008.5.1.4.1.1.1.1", position=None,
                    orientation=None, spacing=(0.2, 0.2), intercept=0.0)
    jobs.append(Job("radiograph", [xr], Expected(True, "modality 'DX' refused", "")))
    return jobs


@pytest.mark.triton
def test_every_item_gets_its_expected_answer_beside_a_good_slab(triton: object) -> None:
    url = triton.grpc_url  # type: ignore[attr-defined]
    good = good_series()
    good_answer = infer(url, good)
    assert good_answer["scores"].size > 0, "an empty answer would make the comparisons vacuous"
    jobs = _jobs(good, good_answer)
    good_job = Job("good", good, Expected(False, check=lambda out: same_answer(out, good_answer)))
    schedule = [j for i, job in enumerate(jobs) for j in ((job, good_job) if i % 10 == 0 else (job,))]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda j: (j, *_run(url, j)), schedule))
    slowest = max(results, key=lambda r: r[1])
    print(f"\n{len(results)} requests, slowest {slowest[0].name}: {slowest[1]:.2f} s (4 in flight)")
    for job, _, out in results:
        if job.expected.refused:
            assert isinstance(out, InferenceServerException), (job.name, "answered; expected a refusal")
            _refusal_check(out, job)
        else:
            assert not isinstance(out, InferenceServerException), (job.name, out.message())
            assert job.expected.check is not None
            job.expected.check(out)
    assert sum(job is good_job for job, _, _ in results) >= 8
    assert triton.is_ready() and triton.process.poll() is None  # type: ignore[attr-defined]


@pytest.mark.triton
def test_client_accepts_real_abdominal_ct_end_to_end(triton: object) -> None:
    """The real TotalSegmentator slices (JPEG 2000, empty UID tags) through the client and the server:
    accepted, warnings say what leniency was used, and no lung finding on a scan without lungs."""
    from ctlesion_client import LesionClient

    with LesionClient(triton.grpc_url) as client:  # type: ignore[attr-defined]
        result = client.detect_series(TOTALSEG)
    assert result.num_slices == 20 and result.modality == "CT"
    meta_uids = {str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.MediaStorageSOPInstanceUID)
                 for f in _dicom_files(TOTALSEG)}
    assert set(result.sop_instance_uids) == meta_uids
    text = " ".join(result.warnings)
    assert "MediaStorageSOPInstanceUID" in text and "SeriesInstanceUID empty" in text, result.warnings
    print(f"\ntotalseg: {len(result.detections)} candidate detections, {len(result.lesions)} findings")
    # findings are the lesions at the operating point; a first-pass candidate (the top slice, where
    # the lung bases can begin) may be proposed, and the 3D false-positive reduction must reject it
    assert result.options["fpr"] is not None and result.lesions == []
