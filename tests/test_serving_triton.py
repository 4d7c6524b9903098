"""The real tritonserver serving the ensemble, over gRPC on loopback (raw tritonclient calls).

The client library's own end-to-end tests live in test_client_e2e.py; these pin the server's
contract: input / output tensors, optional options, INVALID_ARGUMENT for bad input with a message
that names the item and the reason, and a server that stays ready afterwards.
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pydicom
import pytest
import tritonclient.grpc as grpcclient
from dicom_factory import chest_phantom, make_slice, phantom_series
from tritonclient.utils import InferenceServerException

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


def test_metadata_matches_contract(triton: object) -> None:
    client = grpcclient.InferenceServerClient(triton.grpc_url)  # type: ignore[attr-defined]
    meta = client.get_model_metadata(ENSEMBLE)
    assert [i.name for i in meta.inputs][:1] == ["dicom"]
    assert {o.name for o in meta.outputs} == {"boxes_px", "boxes_mm", "scores", "classes", "slice_index", "sop_instance_uid", "mean_hu"}
    config = client.get_model_config("detector").config
    assert config.dynamic_batching is not None and config.max_batch_size >= 16


def test_outputs_are_consistent(triton: object, small_series: list[bytes]) -> None:
    out = _infer(triton.grpc_url, small_series, score_threshold=0.05)  # type: ignore[attr-defined]
    n = out["scores"].shape[0]
    assert out["boxes_px"].shape == (n, 4) and out["boxes_mm"].shape == (n, 4)
    assert out["slice_index"].shape == (n,) and out["sop_instance_uid"].shape == (n,)
    uids = {pydicom.dcmread(io.BytesIO(b)).SOPInstanceUID for b in small_series}
    for uid in out["sop_instance_uid"]:
        assert uid.decode() in uids
    if n:
        assert np.all(out["scores"] >= 0.05) and np.all((out["slice_index"] >= 0) & (out["slice_index"] < 5))
        assert np.all(out["boxes_px"][:, 2] >= out["boxes_px"][:, 0])


def test_score_threshold_option_is_applied(triton: object, small_series: list[bytes]) -> None:
    loose = _infer(triton.grpc_url, small_series, score_threshold=0.01, min_size_mm=0.0, max_size_mm=1000.0)  # type: ignore[attr-defined]
    strict = _infer(triton.grpc_url, small_series, score_threshold=0.999, min_size_mm=0.0, max_size_mm=1000.0)  # type: ignore[attr-defined]
    assert strict["scores"].shape[0] <= loose["scores"].shape[0]
    assert np.all(strict["scores"] >= 0.999)


def test_radiograph_single_image(triton: object) -> None:
    rng = np.random.default_rng(0)
    image = rng.normal(1500, 200, (600, 480)).clip(0, 4000)
    item = make_slice(
        image, modality="DX", sop_class="1.2.840.10008.5.1.4.1.1.1.1", position=None, orientation=None,
        spacing=(0.2, 0.2), intercept=0.0, window=(2000.0, 4000.0), photometric="MONOCHROME1",
    )
    out = _infer(triton.grpc_url, [item])  # type: ignore[attr-defined]
    assert out["boxes_px"].shape[1] == 4
    if out["scores"].size:  # boxes come back in the radiograph's own pixel frame
        assert np.all(out["boxes_px"][:, 2] <= 480 + 1e-3) and np.all(out["boxes_px"][:, 3] <= 600 + 1e-3)


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


def test_concurrent_requests_get_their_own_answers(triton: object) -> None:
    url = triton.grpc_url  # type: ignore[attr-defined]
    series = [phantom_series(chest_phantom(z=3, size=512, seed=s)) for s in range(4)]
    expected = [{pydicom.dcmread(io.BytesIO(b)).SOPInstanceUID for b in items} for items in series]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda items: _infer(url, items, score_threshold=0.05), series))
    for out, uids in zip(results, expected, strict=True):
        assert {u.decode() for u in out["sop_instance_uid"]} <= uids


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
