"""The DICOM node with every real part: Orthanc pushes a study (REST ``/modalities/{id}/store``),
the node spools, selects, runs the series through the real tritonserver with the client library,
and the TID 1500 SR plus the key-image Secondary Captures land back in Orthanc.

Also: the resent series (same report, or a successor naming its predecessor), the overload refusal
(0xA700, nothing lost, the refused series resent later is processed), ``kill -9`` of a node
subprocess paused at each stage (receiving, queued, in inference, sending results) with exactly one
delivery after restart, and the audit log / node log checked for the test data's PHI.
Test data: a 30-slice 256 x 256 phantom chest CT with a patient name, ID and birth date put in.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from orthanc_server import OrthancServer, free_port, missing_reason, orthanc_server
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from ctlesion_client.pacs_dicomweb import DicomWebPacs
from ctlesion_client.pacs_types import PacsCredentials
from ctlesion_client.sr_report import parse_sr
from ctlesion_node.audit import read_audit
from ctlesion_node.config import load_config
from ctlesion_node.service import Node

pytestmark = [pytest.mark.pacs, pytest.mark.triton, pytest.mark.slow]

PHI_NAME, PHI_ID, PHI_BIRTH = "Nodetest^Alice^Quinn", "NODE-PHI-4711", "19610417"
NODE_AET, SCU_AET = "CTLNODE", "CTLTESTSCU"
AUDIT_KEY = "pipeline-test-key"
REPO = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def orthanc() -> Iterator[OrthancServer]:
    reason = missing_reason()
    if reason:
        pytest.fail(reason)  # a missing real part fails, it does not skip
    with orthanc_server(aet="CTLNODEPACS") as server:
        yield server


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> list[pydicom.Dataset]:
    from ctlesion_phantoms.config import PhantomConfig
    from ctlesion_phantoms.generate import generate_case

    out = tmp_path_factory.mktemp("node-phantom")
    # 320 x 320 at 1.0-1.15 mm pixels (the contract's limit is 1.2): the whole chest, 40 % of the pixels
    config = PhantomConfig(matrix=320, slices_max=30, pixel_spacing_mm=(1.0, 1.15), slice_spacing_mm=(2.0, 2.5),
                           nodules_min=2, nodules_max=3, p_no_nodules=0.0, diameter_mm=(8.0, 20.0))
    truth = generate_case(30_001, out, config)
    files = sorted((out / truth.case_id / "series").glob("*.dcm"))
    assert len(files) == 30
    return [pydicom.dcmread(f) for f in files]


def fresh_series(phantom: list[pydicom.Dataset], study_uid: str | None = None, n: int | None = None) -> list[bytes]:
    """The phantom as a new series (new series / SOP UIDs) of a new or given study, PHI put in."""
    study_uid, series_uid = study_uid or generate_uid(), generate_uid()
    out = []
    for ds in phantom[:n]:
        ds = ds.copy()
        sop = generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = PHI_NAME, PHI_ID, PHI_BIRTH
        buf = BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        out.append(buf.getvalue())
    return out


def uid_of(item: bytes, keyword: str = "SeriesInstanceUID") -> str:
    return str(pydicom.dcmread(BytesIO(item), stop_before_pixels=True).get(keyword))


def write_config(path: Path, orthanc: OrthancServer, port: int, http_port: int, *, destination: str = "sender",
                 max_instances: int = 100_000, quiet_s: float = 1.0) -> Path:
    path.write_text(f"""
[listener]
ae_title = "{NODE_AET}"
host = "127.0.0.1"
port = {port}
allowed_calling_aets = ["{orthanc.aet}", "{SCU_AET}"]
http_host = "127.0.0.1"
http_port = {http_port}

[spool]
dir = "{path.parent / 'spool'}"
max_instances = {max_instances}
min_free_bytes = 0

[series]
quiet_s = {quiet_s}

[selection]
min_slices = 20

[queue]
workers = 2
retry_s = 1

[destination]
url = "{destination}"

[peers]
{orthanc.aet} = "127.0.0.1:{orthanc.dicom_port}"
{SCU_AET} = "{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}"
""")
    return path


def triton_section(path: Path, triton: object) -> None:
    with path.open("a") as fh:
        fh.write(f'\n[triton]\nurl = "{triton.grpc_url}"\ntimeout_s = 120\nwait_ready_s = 120\n')  # type: ignore[attr-defined]


def send(port: int, items: list[bytes], results: list | None = None) -> list[int | None]:
    """C-STORE from a test SCU; returns the status of each instance (None: no answer)."""
    statuses: list[int | None] = [] if results is None else results
    ae = AE(ae_title=SCU_AET)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AET)
    assert assoc.is_established
    try:
        for item in items:
            status = assoc.send_c_store(pydicom.dcmread(BytesIO(item)))
            statuses.append(getattr(status, "Status", None))
            if statuses[-1] is None:
                break
    finally:
        if assoc.is_established:
            assoc.release()
    return statuses


def events(audit: Path, event: str, series_uid: str | None = None) -> list[dict]:
    return [r for r in read_audit(audit) if r["event"] == event and series_uid in (None, r.get("series_uid"))]


def wait_for(predicate, timeout_s: float = 300.0, what: str = "") -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.25)


def wait_delivered(audit: Path, series_uid: str, count: int = 1, timeout_s: float = 300.0) -> None:
    """Until the audit shows ``count`` deliveries of the series; a failure of the series fails at once."""
    def done() -> bool:
        failed = events(audit, "series_failed", series_uid)
        assert not failed, f"series failed in the node: {failed[-1]['reason']}"
        return len(events(audit, "series_delivered", series_uid)) >= count

    wait_for(done, timeout_s, f"delivery {count} of series {series_uid}")


def reports_in(orthanc: OrthancServer, study_uid: str) -> tuple[DicomWebPacs, list[str], list[str]]:
    """(pacs, SR SOP UIDs, key-image SOP UIDs) of the study in Orthanc."""
    pacs = DicomWebPacs(orthanc.dicomweb_url, PacsCredentials(orthanc.username, orthanc.password))
    srs = [u for s in pacs.find_series(study_uid, modality="SR") for u in pacs.find_instances(study_uid, s.series_uid)]
    scs = [u for s in pacs.find_series(study_uid) if s.description == "ctlesion AI key images"
           for u in pacs.find_instances(study_uid, s.series_uid)]
    return pacs, srs, scs


def assert_no_phi(*texts: str) -> None:
    for text in texts:
        for phi in (PHI_NAME, PHI_ID, PHI_BIRTH, "Nodetest", "Alice"):
            assert phi not in text, f"PHI {phi!r} found"


# ----------------------------------------------------------------------------- in-process node
@pytest.fixture
def node(tmp_path: Path, orthanc: OrthancServer, triton: object, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    monkeypatch.setenv("CTLESION_AUDIT_KEY", AUDIT_KEY)
    started: list[Node] = []

    def make(**kwargs: object) -> Node:
        cfg = write_config(tmp_path / "node.toml", orthanc, 0, 0, **kwargs)  # type: ignore[arg-type]
        triton_section(cfg, triton)
        n = Node(load_config(cfg))
        n.start()
        started.append(n)
        return n

    yield make
    for n in started:
        n.stop()


def test_orthanc_pushes_a_study_and_gets_sr_and_key_images_back(
        node, orthanc: OrthancServer, phantom: list[pydicom.Dataset], caplog: pytest.LogCaptureFixture) -> None:  # noqa: ANN001
    caplog.set_level("INFO")
    n = node()
    orthanc.rest("/modalities/ctlnode", data=json.dumps(
        {"AET": NODE_AET, "Host": "127.0.0.1", "Port": n.dicom_port}).encode(), method="PUT")
    study_uid = generate_uid()
    ct = fresh_series(phantom, study_uid)
    scout = fresh_series(phantom, study_uid, n=2)
    dose = fresh_series(phantom, study_uid, n=1)
    for items, mutate in ((scout, "scout"), (dose, "dose")):
        for i, item in enumerate(items):
            ds = pydicom.dcmread(BytesIO(item))
            if mutate == "scout":
                ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
            else:
                ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
                ds.ImageType = ["DERIVED", "SECONDARY", "SCREEN SAVE"]
            buf = BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            items[i] = buf.getvalue()
    answer = {}
    for item in ct + scout + dose:
        answer = orthanc.upload(item)
    orthanc_study = answer["ParentStudy"]  # type: ignore[index]

    n_sent = len(ct) + len(scout) + len(dose)

    def push() -> None:
        job = orthanc.rest("/modalities/ctlnode/store", data=json.dumps(
            {"Resources": [orthanc_study], "Synchronous": True}).encode(), method="POST")
        # The second push also carries the node's own results (now in the study): they are dropped.
        assert isinstance(job, dict) and int(job.get("FailedInstancesCount", -1)) == 0
        assert int(job.get("InstancesCount", 0)) >= n_sent

    push()
    series_uid, audit = uid_of(ct[0]), n.config.audit_path
    wait_delivered(audit, series_uid)
    dropped = {r["series_uid"]: r["reason"] for r in events(audit, "series_dropped")}
    assert "localizer" in dropped[uid_of(scout[0])]
    assert "secondary capture" in dropped[uid_of(dose[0])]

    (inferred,) = events(audit, "series_inferred", series_uid)
    assert inferred["slices"] == 30 and inferred["findings"], "the phantom has 2-3 nodules of 8-20 mm"
    pacs, srs, scs = reports_in(orthanc, study_uid)
    assert srs == [inferred["sr_uid"]]
    assert len(scs) == inferred["key_images"] == len(inferred["findings"])
    sr_series = pacs.find_series(study_uid, modality="SR")[0].series_uid
    findings = parse_sr(pydicom.dcmread(BytesIO(pacs.retrieve_instance(study_uid, sr_series, srs[0]))))
    assert sorted(round(f.diameter_mm, 1) for f in findings) == sorted(f["diameter_mm"] for f in inferred["findings"])
    key_series = next(s for s in pacs.find_series(study_uid) if s.description == "ctlesion AI key images")
    key = pydicom.dcmread(BytesIO(pacs.retrieve_instance(study_uid, key_series.series_uid, scs[0])))
    assert key.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and key.BitsAllocated == 8
    pixels = key.pixel_array
    assert pixels.ndim == 3 and pixels.shape[2] == 3
    assert np.any((pixels[..., 0] > 200) & (pixels[..., 1] < 120)) or np.any(pixels[..., 1] > 150), "box drawn"
    assert str(key.SourceImageSequence[0].ReferencedSOPInstanceUID) in {uid_of(i, "SOPInstanceUID") for i in ct}

    # Pushed again (the PACS retries, or a user re-sends): processed again, the same report.
    push()
    wait_delivered(audit, series_uid, 2)
    _, srs_again, scs_again = reports_in(orthanc, study_uid)
    assert srs_again == srs and sorted(scs_again) == sorted(scs)

    # A changed series (one slice fewer) under the same UID: a successor that names its predecessor.
    assert send(n.dicom_port, ct[:-1]) == [0] * 29  # the instances already there keep their SOP UIDs
    wait_delivered(audit, series_uid, 3)
    pacs, srs3, _ = reports_in(orthanc, study_uid)
    new = [u for u in srs3 if u not in srs]
    assert len(new) == 1 and len(pacs.find_series(study_uid, modality="SR")) == 1  # same SR series
    successor = pydicom.dcmread(BytesIO(pacs.retrieve_instance(study_uid, sr_series, new[0])))
    pred = successor.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert pred.ReferencedSOPInstanceUID == srs[0]

    # No PHI in the audit log, the node's log or its state files; the patient is there as a pseudonym.
    state_text = "".join(p.read_text() for p in n.store.root.glob("*/state.json"))
    assert_no_phi(audit.read_text(), caplog.text, state_text)
    assert {r["patient"] for r in events(audit, "series_receiving", series_uid)} == {n.audit.pseudonym(PHI_ID)}

    text = urllib.request.urlopen(f"http://127.0.0.1:{n.http_port}/metrics", timeout=10).read().decode()
    assert "ctlesion_node_processed_total 3" in text and "ctlesion_node_selected_total 3" in text
    # scout + dose screen on each push, and on the second the node's own SR and key images came back too
    assert "ctlesion_node_dropped_total 6" in text
    assert 'ctlesion_node_step_seconds_count{step="inference"} 3' in text
    wait_for(lambda: n.spool.usage.instances == 0, 30.0, "the spool empty again")  # everything delivered


def test_overload_refuses_with_a700_and_loses_nothing(node, orthanc: OrthancServer, phantom: list[pydicom.Dataset],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    # Results by STOW-RS this time (the DICOMweb back end of the client library, with credentials).
    monkeypatch.setenv("CTLESION_PACS_USER", orthanc.username)
    monkeypatch.setenv("CTLESION_PACS_PASSWORD", orthanc.password)
    n = node(destination=orthanc.dicomweb_url, max_instances=30)
    study_uid = generate_uid()
    first, second = fresh_series(phantom, study_uid), fresh_series(phantom, study_uid)
    assert send(n.dicom_port, first) == [0x0000] * 30
    refused = send(n.dicom_port, second)  # the spool holds 30 instances: every one is refused
    assert refused == [0xA700] * 30
    audit = n.config.audit_path
    wait_delivered(audit, uid_of(first[0]))
    # the node frees the spool just after it audits the delivery: wait for that, do not race it
    wait_for(lambda: n.spool.usage.instances == 0, 30.0, "the spool freed after the delivery")
    assert send(n.dicom_port, second) == [0x0000] * 30  # the sender retries later: accepted now
    wait_delivered(audit, uid_of(second[0]))
    _, srs, _ = reports_in(orthanc, study_uid)
    assert len(srs) == 2  # one report per series, both delivered
    assert {r["destination"] for r in events(audit, "series_delivered")} == {orthanc.dicomweb_url}
    assert len(events(audit, "store_refused")) == 30


# ----------------------------------------------------------------------------- kill -9 at each stage
def _start(config: Path, log: Path, pause: str | None) -> subprocess.Popen:
    env = {**os.environ, "CTLESION_AUDIT_KEY": AUDIT_KEY, "PYTHONPATH": str(REPO / "tests")}
    env.pop("CTLESION_NODE_PAUSE_AT", None)
    if pause:
        env["CTLESION_NODE_PAUSE_AT"] = pause
    with log.open("ab") as fh:
        return subprocess.Popen([sys.executable, "-m", "ctlesion_node", "--config", str(config)],
                                stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO)


def _wait_ready(http_port: int, proc: subprocess.Popen, log: Path) -> None:
    def ready() -> bool:
        assert proc.poll() is None, f"node exited {proc.returncode}:\n{log.read_text()[-3000:]}"
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{http_port}/readyz", timeout=2).status == 200
        except OSError:
            return False

    wait_for(ready, 60, "the node to be ready")


def _kill9(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize("stage", ["received:10", "queued", "inference", "sending"])
def test_kill_9_at_each_stage_then_exactly_one_delivery(stage: str, tmp_path: Path, orthanc: OrthancServer,
                                                        triton: object, phantom: list[pydicom.Dataset]) -> None:
    port, http_port = free_port(), free_port()
    config = write_config(tmp_path / "node.toml", orthanc, port, http_port,
                          destination=f"dicom://{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}")
    triton_section(config, triton)
    spool, log, audit = tmp_path / "spool", tmp_path / "node.log", tmp_path / "spool" / "audit.jsonl"
    name = stage.split(":")[0]
    study_uid = generate_uid()
    items = fresh_series(phantom, study_uid)
    series_uid = uid_of(items[0])

    proc = _start(config, log, stage)
    try:
        _wait_ready(http_port, proc, log)
        statuses: list[int | None] = []
        sender = threading.Thread(target=lambda: _send_quietly(port, items, statuses), daemon=True)
        sender.start()
        wait_for(lambda: (spool / f"paused-{name}").exists(), 240, f"the node to pause at {stage}")
        _kill9(proc)
        sender.join(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    acked = [uid_of(i, "SOPInstanceUID") for i, s in zip(items, statuses, strict=False) if s == 0]
    if name == "received":
        assert 9 <= len(acked) < 30  # the association died with the node
    else:
        assert len(acked) == 30
    # Every acknowledged instance survived the kill in the spool.
    on_disk = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
               for p in spool.glob("batches/*/instances/*.dcm")}
    assert set(acked) <= on_disk
    (spool / f"paused-{name}").unlink()

    proc = _start(config, log, None)
    try:
        _wait_ready(http_port, proc, log)
        if name == "received":
            assert send(port, items) == [0] * 30  # the sender retries the association that failed
        wait_delivered(audit, series_uid)
        time.sleep(2.0)  # a second delivery, if there were one, would come now
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert len(events(audit, "series_delivered", series_uid)) == 1
    assert len(events(audit, "series_inferred", series_uid)) == 1
    (inferred,) = events(audit, "series_inferred", series_uid)
    _, srs, scs = reports_in(orthanc, study_uid)
    assert srs == [inferred["sr_uid"]] and len(scs) == inferred["key_images"]
    assert_no_phi(audit.read_text(), log.read_text())
    assert not list(spool.glob("batches/*/instances/*.dcm"))  # delivered: spool released


def _send_quietly(port: int, items: list[bytes], statuses: list[int | None]) -> None:
    with contextlib.suppress(AssertionError, OSError, RuntimeError):  # the node was killed under the association
        send(port, items, statuses)
