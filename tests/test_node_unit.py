"""The DICOM node without a model server: configuration, durable spool, selection, the real DICOM
listener (pynetdicom associations over loopback, TLS), refusals when the spool is full, recovery of
state from disk, audit pseudonyms and the metrics / health endpoints. Fast (a few seconds)."""

from __future__ import annotations

import hashlib
import hmac
import shutil
import subprocess
import time
import urllib.request
from dataclasses import replace
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from orthanc_server import make_ct_series
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from ctlesion_node import state as S
from ctlesion_node.audit import read_audit
from ctlesion_node.config import (
    ListenerConfig,
    NodeConfig,
    SelectionConfig,
    SpoolConfig,
    TlsConfig,
    config_from_dict,
    load_config,
    parse_size,
)
from ctlesion_node.selection import select_series
from ctlesion_node.service import Node

KEY = "unit-test-audit-key"
SCU = "CTLUNITSCU"


def _config(tmp_path: Path, **spool: object) -> NodeConfig:
    return NodeConfig(
        listener=ListenerConfig(ae_title="CTLNODE", host="127.0.0.1", port=0, allowed_calling_aets=(SCU,),
                                http_host="127.0.0.1", http_port=0),
        spool=SpoolConfig(dir=tmp_path / "spool", **{"min_free_bytes": 0, **spool}),  # type: ignore[arg-type]
        series_quiet_s=0.5,
        selection=SelectionConfig(min_slices=4),
    )


@pytest.fixture
def node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    monkeypatch.setenv("CTLESION_AUDIT_KEY", KEY)
    nodes: list[Node] = []

    def make(**spool: object) -> Node:
        n = Node(_config(tmp_path / f"node{len(nodes)}", **spool))
        n.start()
        nodes.append(n)
        return n

    yield make
    for n in nodes:
        n.stop()


def _send(port: int, items: list[bytes], aet: str = SCU, called: str = "CTLNODE") -> list[int | None]:
    ae = AE(ae_title=aet)
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        return [None] * len(items)
    try:
        return [getattr(assoc.send_c_store(pydicom.dcmread(BytesIO(b))), "Status", None) for b in items]
    finally:
        assoc.release()


def _wait(predicate, timeout_s: float = 20.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


# ----------------------------------------------------------------------------- configuration
def test_example_config_loads_and_sizes_parse(tmp_path: Path) -> None:
    from ctlesion_node.cli import EXAMPLE_CONFIG

    path = tmp_path / "node.toml"
    path.write_text(EXAMPLE_CONFIG)
    config = load_config(path)
    assert config.listener.allowed_calling_aets == ("ORTHANC",)
    assert config.spool.max_bytes == 20 * 2**30 and config.series_quiet_s == 10
    assert config.peers == {"ORTHANC": "127.0.0.1:4242"}
    assert parse_size("1.5 MB") == 1_500_000 and parse_size(7) == 7
    with pytest.raises(ValueError, match="unknown key"):
        config_from_dict({"spool": {"max_byte": 1}})
    with pytest.raises(ValueError, match="unknown section"):
        config_from_dict({"spol": {}})


def test_audit_key_is_required(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CTLESION_AUDIT_KEY", raising=False)
    with pytest.raises(ValueError, match="audit key"):
        _config(tmp_path).audit_key()


# ----------------------------------------------------------------------------- selection
def _headers(items: list[bytes]) -> list[pydicom.Dataset]:
    out = [pydicom.dcmread(BytesIO(b)) for b in items]
    for ds in out:
        ds.PixelSpacing = [0.8, 0.8]  # make_ct_series writes 5 mm pixels, outside the model contract
    return out


def test_selection_keeps_axial_ct_and_drops_the_rest() -> None:
    cfg = SelectionConfig(min_slices=4, thickness_mm=(0.5, 5.0))
    good = _headers(make_ct_series(6, size=16))
    assert select_series(good, cfg).selected
    assert "fewer than 4" in select_series(good[:3], cfg).reason
    scout = _headers(make_ct_series(6, size=16))
    for ds in scout:
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    assert "localizer" in select_series(scout, cfg).reason
    dose = _headers(make_ct_series(6, size=16))
    for ds in dose:
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    assert "secondary capture" in select_series(dose, cfg).reason
    sagittal = _headers(make_ct_series(6, size=16))
    for ds in sagittal:
        ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    assert "not an axial slice" in select_series(sagittal, cfg).reason
    tilted = _headers(make_ct_series(6, size=16))
    for ds in tilted:  # a 10 degree gantry tilt is still axial
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0.98481, -0.17365]
    assert select_series(tilted, cfg).selected
    thick = _headers(make_ct_series(6, size=16))
    for ds in thick:
        ds.SliceThickness = 10
    assert "thickness 10 mm above" in select_series(thick, cfg).reason
    coarse = _headers(make_ct_series(6, size=16))
    for ds in coarse:
        ds.PixelSpacing = [2.0, 2.0]
    assert "outside the model contract: pixel spacing 2, 2 mm" in select_series(coarse, cfg).reason
    mr = _headers(make_ct_series(6, size=16))
    for ds in mr:
        ds.Modality = "MR"
    assert "modality MR" in select_series(mr, cfg).reason


# ----------------------------------------------------------------------------- the listener
def test_echo_store_spool_and_selection_drop(node, tmp_path: Path) -> None:  # noqa: ANN001
    n = node()
    ae = AE(ae_title=SCU)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", n.dicom_port, ae_title="CTLNODE")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()

    items = make_ct_series(3, size=16)  # fewer slices than min_slices: received, then dropped
    assert _send(n.dicom_port, items) == [0x0000] * 3
    assert _send(n.dicom_port, items[:1]) == [0x0000]  # the same instance again: stored once
    (batch,) = [d for d in n.store.root.iterdir()]
    assert len(n.store.instance_files(batch.name)) == 3
    assert n.spool.usage.instances == 3
    _wait(lambda: n.store.load(batch.name).state == S.DROPPED)
    st = n.store.load(batch.name)
    assert "fewer than 4" in (st.reason or "") and st.n_instances == 3
    assert n.store.instance_files(batch.name) == [] and n.spool.usage.instances == 0
    events = [r["event"] for r in read_audit(n.config.audit_path)]
    assert "series_receiving" in events and "series_dropped" in events
    # no temp files left behind by the atomic writes
    assert list((n.spool.root / "tmp").iterdir()) == []


def test_unknown_calling_aet_and_wrong_called_aet_are_rejected(node) -> None:  # noqa: ANN001
    n = node()
    items = make_ct_series(1, size=16)
    assert _send(n.dicom_port, items, aet="INTRUDER") == [None]
    assert _send(n.dicom_port, items, called="SOMEONEELSE") == [None]
    assert n.spool.usage.instances == 0
    assert any(r["event"] == "association_rejected" and r["calling_aet"] == "INTRUDER"
               for r in read_audit(n.config.audit_path))


def test_full_spool_answers_out_of_resources_and_loses_nothing(node) -> None:  # noqa: ANN001
    one = len(make_ct_series(1, size=16)[0])
    n = node(max_bytes=int(one * 4.5))
    items = make_ct_series(6, size=16)
    statuses = _send(n.dicom_port, items)
    assert statuses == [0x0000] * 4 + [0xA700] * 2
    (batch,) = [d.name for d in n.store.root.iterdir()]
    stored = {pydicom.dcmread(p).SOPInstanceUID for p in n.store.instance_files(batch)}
    acked = {pydicom.dcmread(BytesIO(b)).SOPInstanceUID for b, s in zip(items, statuses, strict=True) if s == 0}
    assert stored == acked  # every acknowledged instance is on disk, no refused one is
    assert n.metrics.value("refused_total", reason="spool_full") == 2
    by_count = node(max_instances=2)
    assert _send(by_count.dicom_port, make_ct_series(3, size=16)) == [0x0000, 0x0000, 0xA700]


def test_disk_free_threshold_refuses(node) -> None:  # noqa: ANN001
    free = shutil.disk_usage("/tmp").free
    n = node(min_free_bytes=free * 2)
    assert _send(n.dicom_port, make_ct_series(1, size=16)) == [0xA700]


def test_restart_resumes_receiving_and_queued_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CTLESION_AUDIT_KEY", KEY)
    cfg = _config(tmp_path)
    store = S.BatchStore(cfg.spool.dir)
    items = make_ct_series(5, size=16)
    st = S.BatchState(batch_id=store.next_generation("1.2.3"), series_uid="1.2.3", study_uid="1.2",
                      calling_aet=SCU, peer_host="127.0.0.1")
    store.create(st)
    for i, b in enumerate(items[:2]):
        (store.instances_dir(st.batch_id) / f"{i}.dcm").write_bytes(b)
    (store.root / "half-created").mkdir()  # a crash between mkdir and state.json: no acknowledged data
    assert store.next_generation("1.2.3").endswith("-0002")
    n = Node(replace(cfg, series_quiet_s=60))
    n._recover()
    assert "1.2.3" in n._open and n.spool.usage.instances == 2
    assert not (store.root / "half-created").exists()
    st.state = S.QUEUED
    store.save(st)
    n2 = Node(cfg)
    n2._recover()
    assert list(n2._backlog) == [st.batch_id] and not n2._open


def test_audit_pseudonym_is_keyed_hmac(node) -> None:  # noqa: ANN001
    n = node()
    items = make_ct_series(2, size=16)
    assert _send(n.dicom_port, items) == [0, 0]
    rec = next(r for r in read_audit(n.config.audit_path) if r["event"] == "series_receiving")
    want = "p-" + hmac.new(KEY.encode(), b"CTL-TEST-1", hashlib.sha256).hexdigest()[:24]
    assert rec["patient"] == want
    assert "CTL-TEST-1" not in n.config.audit_path.read_text() and "Test^Phantom" not in n.config.audit_path.read_text()


def test_metrics_and_health_endpoints(node) -> None:  # noqa: ANN001
    n = node()
    _send(n.dicom_port, make_ct_series(2, size=16))
    base = f"http://127.0.0.1:{n.http_port}"
    text = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
    assert "ctlesion_node_received_total 2" in text
    assert "# TYPE ctlesion_node_step_seconds histogram" in text
    assert 'ctlesion_node_step_seconds_bucket{step="store",le="+Inf"} 2' in text
    assert "ctlesion_node_queue_depth 0" in text and "ctlesion_node_spool_instances 2" in text
    for path in ("/healthz", "/readyz"):
        assert urllib.request.urlopen(base + path, timeout=10).status == 200


# ----------------------------------------------------------------------------- DICOM TLS
def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def test_dicom_tls_with_client_certificates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ssl

    if shutil.which("openssl") is None:
        pytest.fail("openssl CLI needed for the TLS test (apt-get install openssl)")
    monkeypatch.setenv("CTLESION_AUDIT_KEY", KEY)
    d = tmp_path / "pki"
    d.mkdir()
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=node test ca",
             "-keyout", "ca.key", "-out", "ca.crt", cwd=d)
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name, ext in (("server", ["-extfile", "san.ext"]), ("client", [])):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
                 "-out", f"{name}.csr", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-days", "2", *ext, "-out", f"{name}.crt", cwd=d)
    cfg = _config(tmp_path)
    tls = TlsConfig(cert=str(d / "server.crt"), key=str(d / "server.key"), ca=str(d / "ca.crt"))
    n = Node(replace(cfg, listener=replace(cfg.listener, tls=tls)))
    n.start()
    try:
        def echo(with_cert: bool) -> bool:
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(d / "ca.crt"))
            if with_cert:
                ctx.load_cert_chain(str(d / "client.crt"), str(d / "client.key"))
            ae = AE(ae_title=SCU)
            ae.add_requested_context(Verification)
            assoc = ae.associate("127.0.0.1", n.dicom_port, ae_title="CTLNODE", tls_args=(ctx, "localhost"))
            ok = assoc.is_established and assoc.send_c_echo().Status == 0
            if assoc.is_established:
                assoc.release()
            return bool(ok)

        assert echo(with_cert=True)
        assert not echo(with_cert=False)  # mutual TLS: no client certificate, no association
        plain = AE(ae_title=SCU)
        plain.add_requested_context(Verification)
        assert not plain.associate("127.0.0.1", n.dicom_port, ae_title="CTLNODE").is_established
    finally:
        n.stop()


def test_generation_ids_are_per_series(tmp_path: Path) -> None:
    store = S.BatchStore(tmp_path)
    a, b = generate_uid(), generate_uid()
    assert store.next_generation(a) != store.next_generation(b)
    assert store.next_generation(a).endswith("-0001")


def test_results_for_a_series_without_findings(tmp_path: Path) -> None:
    """No lesion still gives a valid SR (read back as no findings) and no key image; UIDs are derived."""
    from ctlesion_client.result import SeriesResult
    from ctlesion_client.sr_report import parse_sr, validate_sr
    from ctlesion_node.results import build_outputs

    files = []
    for i, b in enumerate(make_ct_series(4, size=16)):
        files.append(tmp_path / f"{i}.dcm")
        files[-1].write_bytes(b)
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    result = SeriesResult(series_instance_uid=str(first.SeriesInstanceUID), study_instance_uid=str(first.StudyInstanceUID),
                          modality="CT", num_slices=4, sop_instance_uids=[], sources=[])
    (sr,) = build_outputs(result, files)
    assert validate_sr(sr).ok and parse_sr(sr) == []
    (again,) = build_outputs(result, list(reversed(files)))
    assert (again.SOPInstanceUID, again.SeriesInstanceUID) == (sr.SOPInstanceUID, sr.SeriesInstanceUID)
    (fewer,) = build_outputs(result, files[:3], predecessor_sr=str(sr.SOPInstanceUID))
    assert fewer.SOPInstanceUID != sr.SOPInstanceUID and fewer.SeriesInstanceUID == sr.SeriesInstanceUID
    ref = fewer.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == sr.SOPInstanceUID


def test_half_written_temp_files_are_removed_on_start(tmp_path: Path) -> None:
    """A kill -9 during a write leaves a temp file (never renamed, never acknowledged): start-up removes it."""
    from ctlesion_node.spool import Spool

    (tmp_path / "spool" / "tmp").mkdir(parents=True)
    stale = tmp_path / "spool" / "tmp" / ".abc.dcm.1234.tmp"
    stale.write_bytes(b"half an instance")
    Spool(SpoolConfig(dir=tmp_path / "spool"))
    assert not stale.exists()


def test_audit_key_file_must_not_be_world_readable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ctlesion_node.config import AuditConfig

    monkeypatch.delenv("CTLESION_AUDIT_KEY", raising=False)
    key = tmp_path / "key"
    key.write_text("secret\n")
    cfg = replace(_config(tmp_path), audit=AuditConfig(key_file=key))
    key.chmod(0o644)
    with pytest.raises(PermissionError):
        cfg.audit_key()
    key.chmod(0o440)  # a Kubernetes Secret volume with fsGroup
    assert cfg.audit_key() == b"secret"
