"""A real Orthanc PACS on loopback for the PACS tests (Debian packages ``orthanc`` + ``orthanc-dicomweb``).

Each server gets free ports, its own JSON config, storage folder, AE title and HTTP credentials,
and is stopped and removed on exit even when the test fails. Use ``orthanc_server()`` as a
context manager, or the ``orthanc`` fixture in ``tests/test_pacs_*.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from base64 import b64encode
from collections.abc import Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
APT_HINT = "apt-get install -y orthanc orthanc-dicomweb dcmtk dicom3tools"


def orthanc_binary() -> str | None:
    """Path of the Orthanc executable (Debian installs it in /usr/sbin, often not on PATH)."""
    return shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin:/usr/bin:/usr/local/sbin")


def missing_reason() -> str | None:
    """Why Orthanc cannot run here (for ``missing_real_part``), or None when it can."""
    if orthanc_binary() is None:
        return f"Orthanc binary not found (install with: {APT_HINT})"
    if not DICOMWEB_PLUGIN.exists():
        return f"Orthanc DICOMweb plugin {DICOMWEB_PLUGIN} missing (install with: {APT_HINT})"
    return None


class OrthancStartError(RuntimeError):
    """Orthanc exited or never answered; the message carries the tail of its log."""


def free_port() -> int:
    # Bind to port 0 and let the kernel choose; a tiny race remains, acceptable for tests.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Modality:
    """A remote DICOM node Orthanc may talk to (needed for C-MOVE destinations)."""

    aet: str
    host: str
    port: int


@dataclass
class OrthancServer:
    http_port: int
    dicom_port: int
    aet: str
    username: str
    password: str
    workdir: Path
    process: subprocess.Popen | None = None
    modalities: dict[str, Modality] = field(default_factory=dict)
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.workdir / "orthanc.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    def _auth_header(self) -> dict[str, str]:
        token = b64encode(f"{self.username}:{self.password}".encode()).decode()
        return {"Authorization": f"Basic {token}"}

    def rest(self, path: str, data: bytes | None = None, method: str | None = None) -> object:
        """Call Orthanc's own REST API (JSON answer), e.g. ``rest("/studies")``."""
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=self._auth_header())
        if data is not None:
            req.add_header("Content-Type", "application/dicom")
        with urllib.request.urlopen(req, timeout=30) as resp:
            body = resp.read()
        return json.loads(body) if body else None

    def upload(self, part10: bytes) -> dict:
        """POST /instances: store one Part-10 file the way a modality would."""
        return self.rest("/instances", data=part10)  # type: ignore[return-value]

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


def write_config(server: OrthancServer, modalities: dict[str, Modality]) -> Path:
    storage = server.workdir / "storage"
    storage.mkdir(parents=True, exist_ok=True)
    config = {
        "Name": f"ctlesion-test-{server.aet}",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "HttpPort": server.http_port,
        "DicomPort": server.dicom_port,
        "DicomAet": server.aet,
        "RemoteAccessAllowed": False,  # loopback only
        "AuthenticationEnabled": True,  # so the client's credential path is exercised for real
        "RegisteredUsers": {server.username: server.password},
        "DicomCheckCalledAet": True,
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowFind": True,
        "DicomAlwaysAllowGet": True,
        "DicomAlwaysAllowMove": True,
        "DicomModalities": {
            name: {"AET": m.aet, "Host": m.host, "Port": m.port} for name, m in modalities.items()
        },
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False, "StudiesMetadata": "Full"},
        "StableAge": 1,
        "HttpTimeout": 60,
        "ConcurrentJobs": 1,
    }
    path = server.workdir / "orthanc.json"
    path.write_text(json.dumps(config, indent=2))
    return path


def _wait_ready(server: OrthancServer, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert server.process is not None
        if server.process.poll() is not None:
            raise OrthancStartError(
                f"Orthanc exited with {server.process.returncode}:\n{server.log_tail()}"
            )
        with contextlib.suppress(OSError, urllib.error.URLError):
            info = server.rest("/system")
            # The DICOMweb plugin registers its routes before /system answers, but check it is loaded.
            plugins = server.rest("/plugins")
            if isinstance(info, dict) and isinstance(plugins, list) and "dicom-web" in plugins:
                return
        time.sleep(0.2)
    raise OrthancStartError(f"Orthanc not ready after {timeout_s} s:\n{server.log_tail()}")


def stop(server: OrthancServer) -> None:
    proc = server.process
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


@contextlib.contextmanager
def orthanc_server(
    modalities: dict[str, Modality] | None = None,
    aet: str = "CTLTESTPACS",
    keep_on_failure: bool = False,
    timeout_s: float = 60.0,
) -> Iterator[OrthancServer]:
    """Start Orthanc, yield it ready, always stop it and delete its storage afterwards."""
    binary = orthanc_binary()
    reason = missing_reason()
    if binary is None or reason is not None:
        raise OrthancStartError(reason or "Orthanc missing")
    workdir = Path(tempfile.mkdtemp(prefix="ctlesion-orthanc-"))
    server = OrthancServer(
        http_port=free_port(),
        dicom_port=free_port(),
        aet=aet,
        username="ctlesion",
        password=secrets.token_urlsafe(16),
        workdir=workdir,
        modalities=dict(modalities or {}),
    )
    failed = False
    try:
        config = write_config(server, server.modalities)
        with open(server.log_path, "wb") as log:
            # Own session: a stray signal to the pytest process group does not hit Orthanc half-way.
            server.process = subprocess.Popen(
                [binary, str(config)], stdout=log, stderr=subprocess.STDOUT, cwd=workdir,
                start_new_session=True, env={**os.environ, "LC_ALL": "C"},
            )
        _wait_ready(server, timeout_s)
        yield server
    except BaseException:
        failed = True
        raise
    finally:
        stop(server)
        if not (failed and keep_on_failure):
            shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def orthanc_with_move_destination(aet: str = "CTLMOVEDEST") -> Iterator[OrthancServer]:
    """Orthanc that knows one C-MOVE destination (``server.modalities["ctlesion"]``, a free port)."""
    with orthanc_server(modalities={"ctlesion": Modality(aet, "127.0.0.1", free_port())}) as server:
        yield server


def orthanc_fixture():  # pragma: no cover - used as ``orthanc = orthanc_fixture()`` in test modules
    """A module-scoped pytest fixture yielding a running OrthancServer; without Orthanc it skips with
    the reason, or fails under ``make test`` / CI (tests/real_parts.py)."""
    import pytest
    from real_parts import missing_real_part

    @pytest.fixture(scope="module")
    def orthanc() -> Iterator[OrthancServer]:
        reason = missing_reason()
        if reason:
            missing_real_part(reason)
        with orthanc_with_move_destination() as server:
            yield server

    return orthanc


# --- test inputs -------------------------------------------------------------------------------
def make_ct_series(n_slices: int = 6, size: int = 64, seed: int = 0,
                   study_uid: str | None = None) -> list[bytes]:
    """A small, real CT series (Part-10 bytes): TEST INPUT, synthetic patient, random-ish pixels.

    Uses ``ctlesion_phantoms`` when it grows a generator later; for now pydicom directly, which is
    all the PACS round trip needs (valid CT Image Storage objects with geometry).
    """
    import numpy as np
    from pydicom import Dataset
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    rng = np.random.default_rng(seed)
    study_uid = study_uid or generate_uid()
    series_uid, frame_uid = generate_uid(), generate_uid()
    out: list[bytes] = []
    for i in range(n_slices):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        sop_uid = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop_uid
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Phantom", "CTL-TEST-1", "", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240101", "120000", "1", "ACC1"
        ds.ReferringPhysicianName = ""
        ds.Modality, ds.Manufacturer, ds.SeriesNumber, ds.InstanceNumber = "CT", "ctlesion-test", 1, i + 1
        ds.SeriesDescription = "TEST INPUT chest CT"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PositionReferenceIndicator, ds.KVP = "", 120
        ds.ImagePositionPatient = [-160.0, -160.0, -100.0 + 2.5 * i]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [5.0, 5.0], 2.5
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows = ds.Columns = size
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.WindowCenter, ds.WindowWidth = -600, 1500
        ds.PixelData = rng.integers(0, 1400, (size, size), dtype=np.int16).tobytes()
        buf = BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        out.append(buf.getvalue())
    return out
