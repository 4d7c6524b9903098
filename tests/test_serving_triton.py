"""The real tritonserver serving the ensemble, over gRPC on loopback (raw tritonclient calls).

The client library's own end-to-end tests live in test_client_triton.py; these pin the server's
contract: input / output tensors, optional options, INVALID_ARGUMENT for bad input with a message
that names the item and the reason, and a server that stays ready afterwards. Outputs are checked
on slabs of a held-out phantom series with known nodules (the ``phantom_case`` fixture), so an
ensemble that returns nothing fails.
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
import tritonclient.grpc as grpcclient
from dicom_factory import chest_phantom, make_slice, phantom_series
from tritonclient.utils import InferenceServerException

from ctlesion_phantoms.truth import CaseTruth, NoduleTruth
from preprocess_backend.dicom_io import read_header
from preprocess_backend.series import SeriesGeometry, assemble_headers

pytestmark = [pytest.mark.triton, pytest.mark.slow]

ENSEMBLE = "lesion_detection"


def _infer(url: str, items: list[bytes], **options: object) -> dict[str, np.ndarray]:
    client = grpcclient.InferenceServerClient(url)
    dicom = grpcclient.InferInput("dicom", [len(items)], "BYTES")
    dicom.set_data_from_numpy(np.array(items, dtype=object))
    inputs = [dicom]
    for name, value in options.items():
        if name == "window":
            tensor = grpcclient.InferInput(name, [1], "BYTES")
            tensor.set_data_from_numpy(np.array([str(value).encode()], dtype=object))
        else:
            tensor = grpcclient.InferInput(name, [1], "FP32")
            tensor.set_data_from_numpy(np.array([value], dtype=np.float32))
        inputs.append(tensor)
    result = client.infer(ENSEMBLE, inputs, client_timeout=120)
    names = ("boxes_px", "boxes_mm", "scores", "classes", "slice_index", "sop_instance_uid", "mean_hu")
    return {name: result.as_numpy(name) for name in names}


@pytest.fixture(scope="module")
def small_series() -> list[bytes]:
    return phantom_series(chest_phantom(z=5, size=512, seed=1), shuffle_seed=3)


@dataclass
class NoduleSlab:
    """Slices around one truth nodule of the phantom series, in position order."""

    nodule: NoduleTruth
    items: list[bytes]  # Part-10 bytes, position order
    uids: list[str]  # SOPInstanceUID of each item
    geometry: SeriesGeometry  # of these slices only (slice_index of a response indexes it)


def _nodule_slabs(case_dir: Path, half: int = 4) -> list[NoduleSlab]:
    """One slab of 2 * half + 1 slices centred on each truth nodule, largest nodule first."""
    files = sorted(case_dir.rglob("*.dcm"))
    series = assemble_headers([read_header(f) for f in files])
    geometry = series.geometry
    truth = CaseTruth.load(case_dir / "truth.json")
    slabs = []
    for nodule in sorted(truth.nodules, key=lambda n: -n.diameter_mm):
        centre = int(np.argmin(np.abs(geometry.z - np.asarray(nodule.centre_mm) @ geometry.normal)))
        lo = max(0, min(centre - half, len(series) - 2 * half - 1))
        chosen = series.slices[lo : lo + 2 * half + 1]
        slabs.append(NoduleSlab(
            nodule=nodule,
            items=[files[s.extra["item"]].read_bytes() for s in chosen],
            uids=[s.sop_instance_uid for s in chosen],
            geometry=SeriesGeometry(positions=geometry.positions[lo : lo + len(chosen)], orientation=geometry.orientation,
                                    pixel_spacing=geometry.pixel_spacing, rows=geometry.rows, columns=geometry.columns),
        ))
    return slabs


@pytest.fixture(scope="module")
def nodule_slabs(phantom_case: Path) -> list[NoduleSlab]:
    return _nodule_slabs(phantom_case)


def _shuffled(items: list[bytes], seed: int = 7) -> list[bytes]:
    order = np.random.default_rng(seed).permutation(len(items))
    return [items[i] for i in order]


def _centres_mm(out: dict[str, np.ndarray], geometry: SeriesGeometry) -> np.ndarray:
    b = out["boxes_px"].astype(np.float64)
    return geometry.pixel_to_patient(out["slice_index"], (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2)


def _rows(out: dict[str, np.ndarray]) -> list[tuple]:
    """Detections as comparable rows (uid, rounded box, rounded score), sorted."""
    return sorted(
        (u.decode(), *np.round(b, 2).tolist(), round(float(s), 4))
        for u, b, s in zip(out["sop_instance_uid"], out["boxes_px"], out["scores"], strict=True)
    )


def test_metadata_matches_contract(triton: object) -> None:
    client = grpcclient.InferenceServerClient(triton.grpc_url)  # type: ignore[attr-defined]
    meta = client.get_model_metadata(ENSEMBLE)
    assert [i.name for i in meta.inputs][:1] == ["dicom"]
    assert {o.name for o in meta.outputs} == {"boxes_px", "boxes_mm", "scores", "classes", "slice_index", "sop_instance_uid", "mean_hu"}
    config = client.get_model_config("detector").config
    assert config.dynamic_batching is not None and config.max_batch_size >= 16


def test_outputs_are_consistent(triton: object, nodule_slabs: list[NoduleSlab]) -> None:
    """The largest truth nodule's slab, sent in shuffled order with the server's defaults: the
    detector finds it, and every row of every output agrees with the slab it came from."""
    slab = nodule_slabs[0]
    out = _infer(triton.grpc_url, _shuffled(slab.items))  # type: ignore[attr-defined]
    n = out["scores"].shape[0]
    assert n >= 1, f"no detection on the slab of a {slab.nodule.diameter_mm:.1f} mm nodule"
    assert out["boxes_px"].shape == (n, 4) and out["boxes_mm"].shape == (n, 4) and out["mean_hu"].shape == (n,)
    assert out["slice_index"].shape == (n,) and out["sop_instance_uid"].shape == (n,) and out["classes"].shape == (n,)
    assert np.all(out["scores"] >= 0.3) and np.all(out["scores"] <= 1.0)  # the article's default threshold
    # slice_index is the index after ordering by position: it names the same slice as the UID
    assert np.all((out["slice_index"] >= 0) & (out["slice_index"] < len(slab.items)))
    assert [u.decode() for u in out["sop_instance_uid"]] == [slab.uids[i] for i in out["slice_index"]]
    b = out["boxes_px"]
    assert np.all(b[:, 0] >= 0) and np.all(b[:, 1] >= 0) and np.all(b[:, 0] < b[:, 2]) and np.all(b[:, 1] < b[:, 3])
    assert np.all(b[:, 2] <= slab.geometry.columns) and np.all(b[:, 3] <= slab.geometry.rows)
    row_sp, col_sp = slab.geometry.pixel_spacing
    np.testing.assert_allclose(out["boxes_mm"], b * np.array([col_sp, row_sp, col_sp, row_sp]), rtol=1e-5, atol=1e-3)
    # LUNA16's criterion on one slice: some detection's centre within the nodule's radius of its centre
    distance = np.linalg.norm(_centres_mm(out, slab.geometry) - np.asarray(slab.nodule.centre_mm), axis=1)
    assert distance.min() < slab.nodule.diameter_mm / 2, (distance.min(), slab.nodule)


def test_score_threshold_option_is_applied(triton: object, nodule_slabs: list[NoduleSlab]) -> None:
    """Thresholding comes before greedy NMS, whose verdict on a box depends only on higher-scored
    boxes: the detections at threshold t are exactly those at a lower threshold that score above t."""
    url = triton.grpc_url  # type: ignore[attr-defined]
    wide = {"min_size_mm": 0.0, "max_size_mm": 1000.0}
    loose = _infer(url, nodule_slabs[0].items, score_threshold=0.02, **wide)
    scores = np.sort(loose["scores"])
    assert scores.size >= 4 and scores[0] >= 0.02, scores
    t = float((scores[scores.size // 2 - 1] + scores[scores.size // 2]) / 2)  # between two scores
    strict = _infer(url, nodule_slabs[0].items, score_threshold=t, **wide)
    above = {k: v[loose["scores"] > t] for k, v in loose.items()}
    assert 0 < len(strict["scores"]) < len(loose["scores"])
    assert _rows(strict) == _rows(above)
    nothing = _infer(url, nodule_slabs[0].items, score_threshold=1.0, **wide)
    assert nothing["scores"].shape == (0,) and nothing["boxes_px"].shape == (0, 4)


def test_radiograph_is_refused_with_the_reason(triton: object) -> None:
    """The detector reads CT only (preprocess_backend.contract): a radiograph is INVALID_ARGUMENT
    naming the item and the modality, never boxes made up on an image the model has never seen."""
    rng = np.random.default_rng(0)
    image = rng.normal(1500, 200, (600, 480)).clip(0, 4000)
    item = make_slice(
        image, modality="DX", sop_class="1.2.840.10008.5.1.4.1.1.1.1", position=None, orientation=None,
        spacing=(0.2, 0.2), intercept=0.0, window=(2000.0, 4000.0), photometric="MONOCHROME1",
    )
    with pytest.raises(InferenceServerException) as info:
        _infer(triton.grpc_url, [item], score_threshold=1e-4)  # type: ignore[attr-defined]
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    message = info.value.message()
    assert "'DX'" in message and pydicom.dcmread(io.BytesIO(item)).SOPInstanceUID in message, message


def _bad_inputs(good: bytes) -> dict[str, tuple[list[bytes], str]]:
    ds = pydicom.dcmread(io.BytesIO(good))
    no_pixels = ds.copy()
    del no_pixels.PixelData
    huge = ds.copy()
    huge.Rows, huge.Columns = 60000, 60000
    other_series = pydicom.dcmread(io.BytesIO(good))
    other_series.SeriesInstanceUID = "1.2.3.4.5.6.7"
    other_series.SOPInstanceUID = "1.2.3.4.5.6.8"

    def dump(d: pydicom.Dataset) -> bytes:
        buf = io.BytesIO()
        d.save_as(buf, enforce_file_format=True)
        return buf.getvalue()

    return {
        "not dicom": ([b"this is not a DICOM file at all" * 10], "not a DICOM"),
        "truncated": ([good[: len(good) // 2]], ds.SOPInstanceUID),
        "no pixel data": ([dump(no_pixels)], ds.SOPInstanceUID),
        "absurd dimensions": ([dump(huge)], ds.SOPInstanceUID),
        "mixed series": ([good, dump(other_series)], "series"),
        "empty item": ([b""], "item 0"),
    }


def test_bad_input_is_invalid_argument_and_server_stays_up(triton: object, small_series: list[bytes]) -> None:
    url = triton.grpc_url  # type: ignore[attr-defined]
    for name, (items, expected) in _bad_inputs(small_series[0]).items():
        with pytest.raises(InferenceServerException) as info:
            _infer(url, items)
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT", (name, info.value.message())
        assert expected.lower() in info.value.message().lower(), (name, info.value.message())
    client = grpcclient.InferenceServerClient(url)
    assert client.is_server_ready() and client.is_model_ready(ENSEMBLE)
    _infer(url, small_series)  # and it still answers good requests


def test_detector_runs_a_merged_batch_in_pieces_with_the_same_outputs(triton: object, detector_onnx) -> None:  # noqa: ANN001
    """The CPU detector cuts batches into runs of max_run_batch (8) slices: 20 slices go as 8 + 8 + 4,
    and the outputs must be those of onnxruntime running all 20 at once, in order."""
    import onnxruntime as ort

    client = grpcclient.InferenceServerClient(triton.grpc_url)  # type: ignore[attr-defined]
    config = client.get_model_config("detector").config
    assert config.parameters["max_run_batch"].string_value == "8"
    dims = [int(d) for d in config.input[0].dims]
    images = np.random.default_rng(5).integers(0, 256, (20, *dims), dtype=np.uint8)
    tensor = grpcclient.InferInput(config.input[0].name, list(images.shape), "UINT8")
    tensor.set_data_from_numpy(images)
    result = client.infer("detector", [tensor], client_timeout=120)
    session = ort.InferenceSession(str(detector_onnx), providers=["CPUExecutionProvider"])
    expected = session.run(None, {session.get_inputs()[0].name: images.astype(np.float32)})
    for output, want in zip(config.output, expected, strict=True):
        got = result.as_numpy(output.name)
        assert got.shape == want.shape, output.name
        np.testing.assert_allclose(got, want, atol=1e-3, rtol=1e-4, err_msg=output.name)


def test_concurrent_requests_get_their_own_answers(triton: object, nodule_slabs: list[NoduleSlab]) -> None:
    """Slabs around different nodules sent at once (dynamic batching merges them) get the answers
    each gets alone, and none is empty."""
    url = triton.grpc_url  # type: ignore[attr-defined]
    slabs = [s.items for s in nodule_slabs[:4]]
    alone = [_infer(url, items, score_threshold=0.05) for items in slabs]
    with ThreadPoolExecutor(len(slabs)) as pool:
        together = list(pool.map(lambda items: _infer(url, items, score_threshold=0.05), slabs))
    for solo, merged, slab in zip(alone, together, nodule_slabs, strict=False):
        assert len(solo["scores"]) >= 1
        assert {u.decode() for u in merged["sop_instance_uid"]} <= set(slab.uids)
        assert _rows(merged) == _rows(solo)


def test_serve_command_stops_the_server_on_sigterm(cpu_repository) -> None:  # noqa: ANN001
    """`ctlesion serve` under docker stop / kill gets SIGTERM: it must take tritonserver down with it."""
    import contextlib
    import signal
    import subprocess
    import sys

    import psutil

    from ctlesion_client.server import free_port

    ports = [str(free_port()) for _ in range(3)]
    cmd = [sys.executable, "-m", "ctlesion_client.cli", "serve", "--model-repository", str(cpu_repository),
           "--http-port", ports[0], "--grpc-port", ports[1], "--metrics-port", ports[2]]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            if "tritonserver ready" in line:
                break
        else:
            pytest.fail(f"ctlesion serve exited early with {proc.wait()}")
        servers = []
        for child in psutil.Process(proc.pid).children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):  # a short-lived helper may exit meanwhile
                if "tritonserver" in child.name():
                    servers.append(child)
        assert servers, "no tritonserver child found"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        gone, alive = psutil.wait_procs(servers, timeout=30)
        assert not alive, f"tritonserver left running: {[p.pid for p in alive]}"
    finally:
        if proc.poll() is None:
            proc.kill()
