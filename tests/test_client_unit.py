"""Client logic without a server: slab planning, halo dropping, retries, errors, results, reports.

The transport is a stand-in for tritonclient's ``InferenceServerClient`` that answers like the
ensemble does: it decodes and orders the slab with preprocess_backend (the server's own code) and
returns one detection per slice whose score depends only on the slice, never on the slab, so a
series must give the same answer however it is cut. Everything else (DICOM, gRPC exceptions,
tensor (de)serialisation, report files) is real.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from dicom_factory import DX_STORAGE, chest_phantom, make_slice, phantom_series
from PIL import Image
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException, deserialize_bytes_tensor

from ctlesion_client import (
    AsyncLesionClient,
    ClientOptions,
    DeadlineExceededError,
    DetectOptions,
    InvalidInputError,
    LesionClient,
    ModelMismatchError,
    RetryPolicy,
    SeriesResult,
    SeriesSelectionError,
    ServerUnavailableError,
    plan_slabs,
)
from ctlesion_client.core import CONTRACT_INPUTS, CONTRACT_OUTPUTS, check_metadata
from ctlesion_client.merge import merge_slabs, to_series_detections
from ctlesion_client.report import format_findings_table, write_report
from ctlesion_client.retry import call_with_retry
from preprocess_backend.pipeline import decode_items, detections_to_arrays
from preprocess_backend.series import assemble_series
from preprocess_backend.types import Detection, Options

PHI = {"PatientName": "DOE^JANE^Q", "PatientID": "PID-97531", "PatientBirthDate": "19610203"}
FAST_RETRY = RetryPolicy(max_attempts=4, initial_backoff_s=0.001, max_backoff_s=0.002)


# ----------------------------------------------------------------------------- fakes


def contract_metadata(drop: str | None = None, retype: str | None = None) -> service_pb2.ModelMetadataResponse:
    meta = service_pb2.ModelMetadataResponse(name="lesion_detection", platform="ensemble")
    for kind, spec in (("inputs", CONTRACT_INPUTS), ("outputs", CONTRACT_OUTPUTS)):
        for name, (dtype, shape) in spec.items():
            if name == drop:
                continue
            getattr(meta, kind).add(name=name, datatype="INT64" if name == retype else dtype, shape=list(shape))
    return meta


class FakeResult:
    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        self.arrays = arrays

    def as_numpy(self, name: str) -> np.ndarray | None:
        return self.arrays.get(name)


class FakeTransport:
    """Answers like the ensemble: orders the slab by position, one box per slice at the centre."""

    def __init__(self, failures: list[tuple[str, str]] | None = None, metadata: Any = None) -> None:
        self.failures = list(failures or [])  # (status, message) raised by the next infer calls
        self.metadata = metadata if metadata is not None else contract_metadata()
        self.slabs: list[list[str]] = []  # SOPInstanceUIDs of each successful request, in slab order
        self.calls = 0
        self.kwargs: list[dict[str, Any]] = []
        self.closed = False

    def is_server_ready(self, headers: Any = None, client_timeout: float | None = None) -> bool:
        return True

    def is_model_ready(self, model_name: str, model_version: str = "", headers: Any = None, client_timeout: float | None = None) -> bool:
        return model_name != "lesion_fpr"  # this fake serves the detection ensemble only (no FPR pass)

    def get_model_metadata(self, model_name: str, model_version: str = "", headers: Any = None, as_json: bool = False,
                           client_timeout: float | None = None) -> Any:
        return self.metadata

    def infer(self, model_name: str, inputs: list[Any], **kwargs: Any) -> FakeResult:
        self.calls += 1
        self.kwargs.append(kwargs)
        if self.failures:
            status, message = self.failures.pop(0)
            raise InferenceServerException(message, status=f"StatusCode.{status}")
        items = [bytes(b) for b in deserialize_bytes_tensor(inputs[0]._raw_content)]
        series = assemble_series(decode_items(items, Options()))
        dets = []
        for i, sl in enumerate(series.slices):
            h, w = sl.hu.shape
            score = 0.35 + 0.6 * ((sl.instance_number or 0) % 7) / 7  # a property of the slice only
            box = (w * 0.4, h * 0.4, w * 0.6, h * 0.6)
            sp = sl.pixel_spacing or (1.0, 1.0)
            dets.append(Detection(i, sl.sop_instance_uid, box, (box[0] * sp[1], box[1] * sp[0], box[2] * sp[1], box[3] * sp[0]),
                                  score, 0, mean_hu=40.0))
        self.slabs.append([s.sop_instance_uid for s in series.slices])
        return FakeResult(detections_to_arrays(dets))

    def close(self) -> None:
        self.closed = True


class AsyncFakeTransport:
    """The same answers through coroutines, like tritonclient.grpc.aio."""

    def __init__(self, sync: FakeTransport) -> None:
        self.sync = sync

    async def is_server_ready(self, **kw: Any) -> bool:
        return True

    async def is_model_ready(self, model_name: str, **kw: Any) -> bool:
        return model_name != "lesion_fpr"

    async def get_model_metadata(self, model_name: str, **kw: Any) -> Any:
        return self.sync.metadata

    async def infer(self, model_name: str, inputs: list[Any], **kwargs: Any) -> FakeResult:
        await asyncio.sleep(0)
        return self.sync.infer(model_name, inputs, **kwargs)

    async def close(self) -> None:
        self.sync.closed = True


def write_series(folder: Path, items: list[bytes]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, data in enumerate(items):
        path = folder / f"img{i:04d}.dcm"
        path.write_bytes(data)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def series11() -> list[bytes]:
    """11 slices, shuffled, InstanceNumber reversed: order must come from positions."""
    return phantom_series(chest_phantom(z=11, size=64, seed=2), shuffle_seed=5, extra=PHI)


def client_with(transport: FakeTransport, **options: Any) -> LesionClient:
    opts = ClientOptions(retry=options.pop("retry", FAST_RETRY), **options)
    return LesionClient("fake:0", opts, transport=transport)


# ----------------------------------------------------------------------------- slab planning


def test_plan_slabs_single_slice() -> None:
    plans = plan_slabs(1, slab_size=16, halo=1)
    assert len(plans) == 1
    p = plans[0]
    assert (p.start, p.stop, p.send_start, p.send_stop) == (0, 1, 0, 1) and p.size == 1 and p.owns(0)


def test_plan_slabs_long_series_owns_each_slice_once() -> None:
    n, size, halo = 317, 16, 1
    plans = plan_slabs(n, slab_size=size, halo=halo)
    assert len(plans) == -(-n // size) == 20
    owned = [i for p in plans for i in p.owned]
    assert owned == list(range(n))  # every slice owned exactly once, in order
    for p in plans:
        assert p.send_start == max(0, p.start - halo) and p.send_stop == min(n, p.stop + halo)
        assert p.size <= size + 2 * halo  # must fit the detector's max batch
    assert plans[-1].stop == n and plans[-1].send_stop == n and plans[0].send_start == 0
    assert plan_slabs(0) == []
    with pytest.raises(ValueError):
        plan_slabs(5, slab_size=0)
    with pytest.raises(ValueError):
        plan_slabs(5, halo=-1)


def test_client_options_validate() -> None:
    assert ClientOptions(k=5).halo == 2 and ClientOptions().halo == 1
    for bad in ({"k": 2}, {"slab_size": 0}, {"concurrency": 0}, {"compression": "brotli"}, {"client_timeout_s": 0}):
        with pytest.raises(ValueError):
            ClientOptions(**bad)


# ----------------------------------------------------------------------------- halo dropping


def _det(i: int, uid: str, score: float = 0.5) -> Detection:
    return Detection(i, uid, (1, 1, 5, 5), (1, 1, 5, 5), score)


def test_halo_detections_are_dropped_and_mapped_to_series_order() -> None:
    uids = [f"1.2.{i}" for i in range(10)]
    index = {u: i for i, u in enumerate(uids)}
    plan = plan_slabs(10, slab_size=4, halo=1)[1]  # owns 4..7, sends 3..8
    slab = [_det(j, uids[plan.send_start + j]) for j in range(plan.size)]
    kept, warnings = to_series_detections(plan, slab, index)
    assert [d.slice_index for d in kept] == [4, 5, 6, 7] and not warnings
    # The SOPInstanceUID is the authority over the slab index, and a foreign UID is refused.
    kept, warnings = to_series_detections(plan, [_det(0, uids[5]), _det(1, uids[0])], index)
    assert [d.slice_index for d in kept] == [5] and len(warnings) == 1
    merged, _ = merge_slabs([(p, [_det(j, uids[p.send_start + j], 0.1 * j) for j in range(p.size)])
                             for p in plan_slabs(10, 4, 1)], index)
    assert [d.slice_index for d in merged] == list(range(10))


def test_detect_series_halo_slabs_equal_one_request(tmp_path: Path, series11: list[bytes]) -> None:
    write_series(tmp_path / "s", series11)
    small, big = FakeTransport(), FakeTransport()
    r_small = client_with(small, slab_size=4, concurrency=3).detect_series(tmp_path / "s")
    r_big = client_with(big, slab_size=64).detect_series(tmp_path / "s")
    assert small.calls == 3 and big.calls == 1
    # each request carried its owned slices plus one halo slice at each inner end, in series order
    # 11 slices, slab 4, halo 1: sends 0-4, 3-8, 7-10
    assert sorted(len(s) for s in small.slabs) == [4, 5, 6]
    assert r_small.num_slices == r_big.num_slices == 11 and r_small.num_slabs == 3
    assert [d.slice_index for d in r_small.detections] == list(range(11))  # one per slice: halo copies dropped
    key = [(d.slice_index, d.sop_instance_uid, round(d.score, 6), d.box_px) for d in r_small.detections]
    assert key == [(d.slice_index, d.sop_instance_uid, round(d.score, 6), d.box_px) for d in r_big.detections]
    # series order is position order (the files were shuffled and InstanceNumber runs backwards)
    z = [r_small.geometry.z[i] for i in range(11)]
    assert z == sorted(z)
    assert len(r_small.lesions) == 1 and r_small.lesions[0].slices == list(range(11))
    assert r_small.lesions[0].characteristic == "solid"


def test_detect_series_accepts_paths_bytes_and_datasets(tmp_path: Path, series11: list[bytes]) -> None:
    paths = write_series(tmp_path / "s", series11)
    datasets = [pydicom.dcmread(io.BytesIO(b)) for b in series11]
    results = [client_with(FakeTransport(), slab_size=5).detect_series(x) for x in (paths, series11, datasets)]
    uids = [r.sop_instance_uids for r in results]
    assert uids[0] == uids[1] == uids[2] and len(uids[0]) == 11
    assert results[1].sources[0].startswith("item ")


def test_long_series_of_300_plus_slices(tmp_path: Path) -> None:
    items = phantom_series(chest_phantom(z=305, size=32, seed=3, noise=1.0))
    transport = FakeTransport()
    result = client_with(transport, slab_size=16, concurrency=4).detect_series(items)
    assert result.num_slices == 305 and transport.calls == result.num_slabs == 20
    assert [d.slice_index for d in result.detections] == list(range(305))
    assert max(len(s) for s in transport.slabs) == 18


def test_series_selection(tmp_path: Path, series11: list[bytes]) -> None:
    other = phantom_series(chest_phantom(z=3, size=64, seed=4))
    with pytest.raises(SeriesSelectionError, match="2 series"):
        client_with(FakeTransport()).detect_series(series11 + other)
    uid = pydicom.dcmread(io.BytesIO(other[0])).SeriesInstanceUID
    result = client_with(FakeTransport()).detect_series(series11 + other, series_uid=uid)
    assert result.num_slices == 3 and result.series_instance_uid == uid
    assert any("other series ignored" in w for w in result.warnings)
    with pytest.raises(SeriesSelectionError, match="not in the input"):
        client_with(FakeTransport()).detect_series(other, series_uid="1.2.3")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "README.txt").write_text("not dicom")
    with pytest.raises(SeriesSelectionError):
        client_with(FakeTransport()).detect_series(empty)


# ----------------------------------------------------------------------------- retries and errors


def test_retry_policy_backoff_is_capped_full_jitter() -> None:
    policy = RetryPolicy(initial_backoff_s=0.5, max_backoff_s=2.0, multiplier=2.0)
    rng = random.Random(0)
    for retry, cap in ((1, 0.5), (2, 1.0), (3, 2.0), (6, 2.0)):
        values = [policy.backoff_s(retry, rng) for _ in range(200)]
        assert min(values) >= 0 and max(values) <= cap and max(values) > 0.6 * cap
    assert policy.is_retryable("UNAVAILABLE") and not policy.is_retryable("INVALID_ARGUMENT")
    assert not policy.is_retryable("DEADLINE_EXCEEDED") and RetryPolicy(retry_deadline_exceeded=True).is_retryable("DEADLINE_EXCEEDED")


def test_call_with_retry_unavailable_then_success() -> None:
    outcomes: list[Any] = [InferenceServerException("down", status="StatusCode.UNAVAILABLE")] * 2 + ["ok"]
    sleeps: list[float] = []

    def fn() -> str:
        out = outcomes.pop(0)
        if isinstance(out, Exception):
            raise out
        return out

    assert call_with_retry(fn, RetryPolicy(initial_backoff_s=1.0), sleep=sleeps.append, rng=random.Random(1)) == "ok"
    assert len(sleeps) == 2 and sleeps[0] <= 1.0 and sleeps[1] <= 2.0


def test_unavailable_is_retried_then_succeeds(tmp_path: Path, series11: list[bytes]) -> None:
    transport = FakeTransport(failures=[("UNAVAILABLE", "connection refused")] * 2)
    result = client_with(transport, slab_size=64).detect_series(series11)
    assert transport.calls == 3 and len(result.detections) == 11
    assert result.timings["retries"] == 2 and sum("UNAVAILABLE" in w for w in result.warnings) == 2


def test_unavailable_forever_gives_up(series11: list[bytes]) -> None:
    transport = FakeTransport(failures=[("UNAVAILABLE", "connection refused")] * 10)
    with pytest.raises(ServerUnavailableError) as info:
        client_with(transport, slab_size=64).detect_series(series11)
    assert transport.calls == FAST_RETRY.max_attempts and info.value.attempts == FAST_RETRY.max_attempts


def test_invalid_argument_is_not_retried_and_names_the_file(tmp_path: Path, series11: list[bytes]) -> None:
    paths = write_series(tmp_path / "s", series11)
    bad = paths[7]
    uid = pydicom.dcmread(bad, stop_before_pixels=True).SOPInstanceUID
    transport = FakeTransport(failures=[("INVALID_ARGUMENT", f"{uid}: truncated pixel data (got 100 of 8192 bytes)")])
    with pytest.raises(InvalidInputError) as info:
        client_with(transport, slab_size=64).detect_series(tmp_path / "s")
    err = info.value
    assert transport.calls == 1  # the same bytes would fail again: no retry
    assert err.source == str(bad) and err.slab == 0 and str(bad) in str(err) and "truncated" in str(err)
    # "item N" messages (unparseable bytes) are mapped to the N-th file of that slab
    transport = FakeTransport(failures=[("INVALID_ARGUMENT", "item 2 <31 bytes>: not a DICOM file")])
    with pytest.raises(InvalidInputError) as info:
        client_with(transport, slab_size=4).detect_series(series11)
    assert info.value.source is not None and info.value.source.startswith("item ")


def test_unreadable_file_is_refused_by_the_client(tmp_path: Path, series11: list[bytes]) -> None:
    paths = write_series(tmp_path / "s", series11)
    paths[3].write_bytes(paths[3].read_bytes()[:200])  # the header itself is cut
    transport = FakeTransport()
    with pytest.raises(InvalidInputError) as info:
        client_with(transport).detect_series(tmp_path / "s")
    assert info.value.source == str(paths[3]) and info.value.status == "CLIENT" and transport.calls == 0


def test_metadata_mismatch_is_refused_on_first_use(series11: list[bytes]) -> None:
    assert check_metadata(contract_metadata()) == []
    problems = check_metadata(contract_metadata(drop="mean_hu", retype="scores"))
    assert any("mean_hu" in p for p in problems) and any("scores" in p and "INT64" in p for p in problems)
    transport = FakeTransport(metadata=contract_metadata(drop="boxes_mm"))
    with pytest.raises(ModelMismatchError, match="boxes_mm"):
        client_with(transport).detect_series(series11)
    assert transport.calls == 0


def test_wait_ready_has_a_deadline() -> None:
    class Down(FakeTransport):
        def is_server_ready(self, headers: Any = None, client_timeout: float | None = None) -> bool:
            raise InferenceServerException("connect failed", status="StatusCode.UNAVAILABLE")

    client = client_with(Down())
    import time

    t0 = time.monotonic()
    with pytest.raises(DeadlineExceededError, match="UNAVAILABLE"):
        client.wait_ready(0.5)
    assert 0.4 < time.monotonic() - t0 < 3.0
    client_with(FakeTransport()).wait_ready(0.5)  # ready at once


def test_request_carries_options_deadline_and_compression(series11: list[bytes]) -> None:
    transport = FakeTransport()
    client = LesionClient("fake:0", ClientOptions(client_timeout_s=7.5, compression="gzip", slab_size=64),
                          DetectOptions(score_threshold=0.1, window="mediastinum"), transport=transport)
    result = client.detect_series(series11)
    kw = transport.kwargs[0]
    assert kw["client_timeout"] == 7.5 and kw["compression_algorithm"] == "gzip"
    assert result.options["score_threshold"] == 0.1 and result.options["window"] == "mediastinum"


def test_async_client_matches_sync(series11: list[bytes]) -> None:
    sync = client_with(FakeTransport(), slab_size=4).detect_series(series11)
    fake = FakeTransport(failures=[("UNAVAILABLE", "restarting")])

    async def run() -> SeriesResult:
        client = AsyncLesionClient("fake:0", ClientOptions(slab_size=4, concurrency=2, retry=FAST_RETRY),
                                   transport=AsyncFakeTransport(fake))
        async with client:
            await client.wait_ready(1.0)
            return await client.detect_series(series11)

    result = asyncio.run(run())
    assert fake.closed and fake.calls == 3 + 1
    assert [d.to_dict() for d in result.detections] == [d.to_dict() for d in sync.detections]
    assert [les.to_dict() for les in result.lesions] == [les.to_dict() for les in sync.lesions]


def test_progress_opens_at_zero_and_counts_every_slab(series11: list[bytes], capsys: pytest.CaptureFixture[str]) -> None:
    from ctlesion_client.detect_cli import tqdm_progress

    seen: list[tuple[int, int]] = []
    client_with(FakeTransport(), slab_size=4).detect_series(series11, progress=lambda d, t: seen.append((d, t)))

    async def run() -> list[tuple[int, int]]:
        got: list[tuple[int, int]] = []
        async with AsyncLesionClient("fake:0", ClientOptions(slab_size=4), transport=AsyncFakeTransport(FakeTransport())) as c:
            await c.detect_series(series11, progress=lambda d, t: got.append((d, t)))
        return got

    assert seen == asyncio.run(run()) == [(0, 3), (1, 3), (2, 3), (3, 3)]
    update, close = tqdm_progress(enabled=True)
    for done, total in seen:
        update(done, total)
    close()
    bar = capsys.readouterr().err
    assert "0/3" in bar and "3/3" in bar and "4/3" not in bar  # absolute counts, none twice


def test_detect_image_radiograph() -> None:
    rng = np.random.default_rng(0)
    item = make_slice(rng.normal(1500, 200, (60, 48)).clip(0, 4000), modality="DX", sop_class=DX_STORAGE,
                      position=None, orientation=None, spacing=(0.2, 0.2), intercept=0.0, window=(2000.0, 4000.0))
    transport = FakeTransport()
    result = client_with(transport).detect_image(item)
    assert result.num_slices == 1 and result.modality == "DX" and result.geometry is None
    assert len(result.detections) == 1 and result.lesions == []
    assert any("no patient geometry" in w for w in result.warnings)


# ----------------------------------------------------------------------------- results and reports


def test_series_result_json_round_trip(series11: list[bytes]) -> None:
    result = client_with(FakeTransport(), slab_size=4).detect_series(series11)
    result.detections[0].mean_hu = float("nan")  # NaN must survive as null, not break JSON
    text = result.to_json()
    json.loads(text)  # strict JSON (allow_nan=False)
    back = SeriesResult.from_json(text)
    assert back.to_dict() == result.to_dict()
    assert back.lesions[0].centre_mm == result.lesions[0].centre_mm
    assert np.allclose(back.geometry.positions, result.geometry.positions)
    assert np.isnan(back.detections[0].mean_hu)
    with pytest.raises(ValueError, match="schema"):
        SeriesResult.from_dict({**result.to_dict(), "schema": "other/9"})


def test_report_files_have_no_patient_identifiers(tmp_path: Path, series11: list[bytes], caplog: pytest.LogCaptureFixture) -> None:
    write_series(tmp_path / "s", series11)
    caplog.set_level(logging.DEBUG)
    result = client_with(FakeTransport(), slab_size=4).detect_series(tmp_path / "s")
    files = write_report(result, tmp_path / "report")
    report = json.loads(files.json_path.read_text())
    assert report["summary"]["findings"] == 1 and len(files.overlays) == 1
    finding = report["findings"][0]
    assert finding["location"]["side"] in ("left", "right") and finding["characteristic"] == "solid"
    assert finding["size"]["diameter_mm"] > 0 and 0 < finding["confidence"]["max"] <= 1
    key = max(result.detections, key=lambda d: d.score)
    assert finding["location"]["key_slice"] == key.slice_index + 1  # key slice = highest-score slice
    png = Image.open(files.overlays[0])
    assert png.format == "PNG" and png.width == 512 and png.height > 512  # enlarged 64 px slice + caption
    table = format_findings_table(result)
    assert "1 finding(s)" in table and "solid" in table
    written = b"".join(p.read_bytes() for p in (tmp_path / "report").iterdir())
    texts = (written.decode("latin-1"), table, caplog.text, result.to_json())
    for value in (*PHI.values(), "DOE", "JANE", "PID-97531", "1961"):
        # as a token, not inside a longer number: a timing such as 0.00196162 is not the birth year
        token = re.compile(rf"(?<![\d.]){re.escape(value)}(?!\d)")
        for text in texts:
            assert not token.search(text), (value, text[max(0, text.find(value) - 40) : text.find(value) + 40])


def test_report_without_findings(tmp_path: Path, series11: list[bytes]) -> None:
    class Empty(FakeTransport):
        def infer(self, model_name: str, inputs: list[Any], **kwargs: Any) -> FakeResult:
            self.calls += 1
            return FakeResult(detections_to_arrays([]))

    result = client_with(Empty()).detect_series(series11)
    files = write_report(result, tmp_path / "r")
    assert json.loads(files.json_path.read_text())["findings"] == [] and files.overlays == []
    assert "no findings" in format_findings_table(result)


def test_pacs_make_detector_builds_the_grpc_client() -> None:
    from ctlesion_client.pacs import make_detector

    detector = make_detector("127.0.0.1:1", 12.0)
    assert isinstance(detector, LesionClient) and detector.options.client_timeout_s == 12.0
    detector.close()


# ----------------------------------------------------------------------------- real gRPC, no server


def _closed_port() -> int:
    from ctlesion_client.server import free_port

    return free_port()  # bound and released: nothing listens there


def test_wait_ready_against_a_closed_port() -> None:
    with LesionClient(f"127.0.0.1:{_closed_port()}") as client, pytest.raises(DeadlineExceededError, match="not ready"):
        client.wait_ready(0.6)


def test_detect_cli_unreachable_server_is_one_line_and_nonzero(tmp_path: Path, series11: list[bytes],
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from ctlesion_client.detect_cli import main

    write_series(tmp_path / "s", series11)
    rc = main([str(tmp_path / "s"), "--url", f"127.0.0.1:{_closed_port()}", "--wait", "0.5", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 3 and len(err.splitlines()) == 1 and "not ready" in err


def test_detect_cli_refused_input_is_one_line_and_nonzero(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ctlesion_client.detect_cli import main

    rc = main([str(tmp_path / "missing"), "--url", "127.0.0.1:1", "--wait", "0.1", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "no such file" in err


def test_demo_truth_table_uses_the_luna16_criterion() -> None:
    from ctlesion_client.demo import truth_table
    from ctlesion_phantoms.truth import CaseTruth, NoduleTruth, ScanGeometry
    from preprocess_backend.types import Lesion

    geometry = ScanGeometry.from_dict({"slices": 10, "rows": 64, "columns": 64, "pixel_spacing": [1.0, 1.0],
                                       "slice_spacing": 1.0, "slice_thickness": 1.0, "origin": [0.0, 0.0, 0.0]})
    truth = CaseTruth("case", 1, geometry, [
        NoduleTruth(1, (10.0, 10.0, 5.0), (5, 10, 10), 8.0, "solid", "isolated", 40.0, side="left"),
        NoduleTruth(2, (-20.0, 5.0, 3.0), (3, 5, 0), 6.0, "ground_glass", "isolated", -650.0, side="right"),
    ])

    def lesion(centre: tuple[float, float, float], score: float) -> Lesion:
        return Lesion(0, 0, centre, 8.0, 3.0, [4, 5], ["a", "b"], score, score, 0.0, "solid", "left", "upper")

    # 3.9 mm from nodule 1 (radius 4): a hit; 4.1 mm: not (strictly within the radius)
    text, match = truth_table([lesion((13.9, 10.0, 5.0), 0.9), lesion((10.0, 14.1, 5.0), 0.5)], truth)
    assert match["lesion_nodule"] == [1, None] and match["true_positives"] == 1 and match["false_positives"] == 1
    assert "found 1/2 nodule(s)" in text and "MISSED" in text and "#1" in text
