"""Security: gRPC over TLS, no patient identifiers in any log or error, no code path that unpickles.

TLS uses a throw-away CA and server certificate made with the ``openssl`` CLI in a tmpdir (no
committed keys). The PHI test sends a series whose headers carry distinctive identifiers, plus bad
requests built from the same slices, and searches the server log, the client's log records and
every error message for them.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from dicom_factory import Nodule, chest_phantom, phantom_series
from tritonclient.utils import InferenceServerException

REPO_ROOT = Path(__file__).resolve().parent.parent
ENSEMBLE = "lesion_detection"


# ----------------------------------------------------------------------------- no eval / unpickle

SCANNED = (
    "damoyolo",
    "preprocess_backend",
    "client",
    "export",
    "bench",
    "phantoms",
    "model_repository",
    "scripts",
    "loadtest",
)
FORBIDDEN = {
    "pickle.load(s)": re.compile(r"\b(c?pickle|dill|joblib)\.loads?\("),
    "marshal.loads": re.compile(r"\bmarshal\.loads?\("),
    "eval(": re.compile(r"(?<![\w.])eval\("),
    "exec(": re.compile(r"(?<![\w.])exec\("),
    "allow_pickle=True": re.compile(r"allow_pickle\s*=\s*True"),
    "yaml.load without SafeLoader": re.compile(r"\byaml\.load\((?![^)]*SafeLoader)"),
    "pandas.read_pickle": re.compile(r"\bread_pickle\("),
}
TORCH_LOAD = re.compile(r"\btorch\.load\(")


def _python_files() -> list[Path]:
    files = [p for d in SCANNED if (REPO_ROOT / d).is_dir() for p in (REPO_ROOT / d).rglob("*.py")]
    return [p for p in files if "__pycache__" not in p.parts]


def _call_text(text: str, start: int) -> str:
    """The argument text of the call whose '(' is at ``start - 1`` (balanced parentheses)."""
    depth, i = 1, start
    while i < len(text) and depth:
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        i += 1
    return text[start:i]


def find_unsafe_calls(files: list[Path]) -> list[str]:
    found = []
    for path in files:
        text = path.read_text(errors="replace")
        code = re.sub(r"(?m)#.*$", "", text)  # comments may name what they avoid
        for label, pattern in FORBIDDEN.items():
            for m in pattern.finditer(code):
                found.append(
                    f"{path.relative_to(REPO_ROOT)}:{code.count(chr(10), 0, m.start()) + 1}: {label}"
                )
        for m in TORCH_LOAD.finditer(code):
            args = _call_text(code, m.end())
            if not re.search(r"weights_only\s*=\s*True", args):
                found.append(
                    f"{path.relative_to(REPO_ROOT)}:{code.count(chr(10), 0, m.start()) + 1}: torch.load without weights_only=True"
                )
    return found


def test_the_unsafe_call_scanner_finds_what_it_looks_for(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import pickle, torch, numpy as np\n"
        "x = pickle.loads(b'')\n"
        "y = eval('1')\n"
        "torch.load(path,\n map_location='cpu')\n"
        "np.load(f, allow_pickle=True)\n"
        "model.eval()  # fine: a method\n"
        "torch.load(p, weights_only=True)  # fine\n"
    )
    global REPO_ROOT
    saved, REPO_ROOT = REPO_ROOT, tmp_path  # relative paths in the report
    try:
        found = find_unsafe_calls([bad])
    finally:
        REPO_ROOT = saved
    assert [f.split(": ", 1)[1] for f in found] == [
        "pickle.load(s)",
        "eval(",
        "allow_pickle=True",
        "torch.load without weights_only=True",
    ]


def test_no_code_path_evaluates_or_unpickles_input() -> None:
    files = _python_files()
    assert len(files) > 20, "scanner found too few files: wrong root?"
    assert find_unsafe_calls(files) == []


# ----------------------------------------------------------------------------- TLS


@dataclass
class Pki:
    ca_cert: Path
    server_cert: Path
    server_key: Path
    other_ca_cert: Path
    client_cert: Path
    client_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not installed")
    d = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "other_ca"):
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN=ctlesion test {ca}",
                 "-keyout", f"{ca}.key", "-out", f"{ca}.crt", cwd=d)  # fmt: skip
    _openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        cwd=d,
    )
    # gRPC checks the name it dialled against subjectAltName: cover both localhost and 127.0.0.1.
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-days", "2", "-extfile", "san.ext", "-out", "server.crt", cwd=d)  # fmt: skip
    # A client certificate for mutual TLS, signed by the same CA.
    _openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=ctlesion client",
        "-keyout",
        "client.key",
        "-out",
        "client.csr",
        cwd=d,
    )
    _openssl("x509", "-req", "-in", "client.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-days", "2", "-out", "client.crt", cwd=d)  # fmt: skip
    return Pki(
        d / "ca.crt",
        d / "server.crt",
        d / "server.key",
        d / "other_ca.crt",
        d / "client.crt",
        d / "client.key",
    )


@pytest.fixture(scope="module")
def tls_triton(cpu_repository: Path, pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    from ctlesion_client.server import TritonServer

    server = TritonServer(
        cpu_repository,
        log_path=tmp_path_factory.mktemp("tls") / "tritonserver.log",
        grpc_server_cert=pki.server_cert,
        grpc_server_key=pki.server_key,
    )
    server.start(timeout_s=240)
    try:
        yield server
    finally:
        server.stop()


def _live(url: str, **kwargs: object) -> bool:
    client = grpcclient.InferenceServerClient(url, **kwargs)  # type: ignore[arg-type]
    try:
        return bool(client.is_server_live(client_timeout=10))
    finally:
        client.close()


@pytest.mark.triton
@pytest.mark.slow
def test_grpc_over_tls(tls_triton: object, pki: Pki) -> None:
    url = tls_triton.grpc_url  # type: ignore[attr-defined]
    assert _live(url, ssl=True, root_certificates=str(pki.ca_cert))
    # A plain-text client cannot talk to the TLS port; nor can one that trusts another CA.
    with pytest.raises(InferenceServerException):
        _live(url)
    with pytest.raises(InferenceServerException):
        _live(url, ssl=True, root_certificates=str(pki.other_ca_cert))


@pytest.mark.triton
@pytest.mark.slow
def test_client_library_over_tls(tls_triton: object, pki: Pki) -> None:
    from ctlesion_client.client import LesionClient
    from ctlesion_client.options import ClientOptions, TlsOptions

    items = phantom_series(chest_phantom(z=3, size=64, seed=2))
    options = ClientOptions(tls=TlsOptions(root_cert=str(pki.ca_cert)))
    with LesionClient(tls_triton.grpc_url, options) as client:  # type: ignore[attr-defined]
        result = client.detect_series(items)
    assert result.num_slices == 3


@pytest.mark.triton
@pytest.mark.slow
def test_mutual_tls_requires_a_client_certificate(cpu_repository: Path, pki: Pki, tmp_path: Path) -> None:
    from ctlesion_client.server import TritonServer

    server = TritonServer(
        cpu_repository,
        log_path=tmp_path / "mtls.log",
        grpc_server_cert=pki.server_cert,
        grpc_server_key=pki.server_key,
        grpc_root_cert=pki.ca_cert,
        grpc_ssl_mutual=True,
    )
    with server:
        url = server.grpc_url
        assert _live(
            url,
            ssl=True,
            root_certificates=str(pki.ca_cert),
            private_key=str(pki.client_key),
            certificate_chain=str(pki.client_cert),
        )
        with pytest.raises(InferenceServerException):
            _live(url, ssl=True, root_certificates=str(pki.ca_cert))  # no client certificate


def test_tls_misconfiguration_is_refused_before_start(tmp_path: Path) -> None:
    from ctlesion_client.server import TritonServer, TritonStartError

    (tmp_path / "repo").mkdir()
    server = TritonServer(
        tmp_path / "repo", grpc_server_cert=tmp_path / "missing.crt", grpc_server_key=tmp_path / "k"
    )
    with pytest.raises(TritonStartError, match="grpc_server_cert"):
        server.start(timeout_s=5)
    assert server.process is None


# ----------------------------------------------------------------------------- PHI

PHI = {
    "PatientName": "Quuxley^Zebadiah",
    "PatientID": "PHI-7731-ZQX",
    "PatientBirthDate": "19020304",
    "AccessionNumber": "ACCQ99281",
}
PHI_STRINGS = [*PHI.values(), "Quuxley", "Zebadiah", "1902-03-04"]


def _phi_series(z: int = 6, size: int = 96) -> list[bytes]:
    phantom = chest_phantom(z=z, size=size, seed=4, nodules=[Nodule((z / 2, size * 0.4, size * 0.3), 4)])
    return phantom_series(phantom, extra=dict(PHI))


@pytest.mark.triton
@pytest.mark.slow
def test_no_patient_identifiers_in_logs_or_errors(triton: object, caplog: pytest.LogCaptureFixture) -> None:
    from ctlesion_client.client import LesionClient
    from ctlesion_client.errors import LesionClientError

    caplog.set_level(logging.DEBUG)  # every logger, every level: the strictest place to look
    items = _phi_series()
    assert all(PHI["PatientName"].encode() in item for item in items)  # the identifiers are really sent
    url = triton.grpc_url  # type: ignore[attr-defined]
    messages: list[str] = []

    with LesionClient(url) as client:
        result = client.detect_series(items)
        assert result.num_slices == len(items)
        messages += [str(result.to_dict()) if hasattr(result, "to_dict") else repr(result)]
        # Bad requests built from the PHI slices: the refusals must name UIDs, never the patient.
        broken = [items[0][:-500], *items[1:]]
        for bad in (broken, [items[0].replace(b"PixelData", b"PixelDatb")]):
            try:
                client.detect_series(bad)
            except (LesionClientError, ValueError) as exc:
                messages.append(str(exc))
    raw_client = grpcclient.InferenceServerClient(url)
    for bad in ([items[0][:-100]], [items[0][: len(items[0]) // 2]], [b"x" + items[1]]):
        tensor = grpcclient.InferInput("dicom", [len(bad)], "BYTES")
        tensor.set_data_from_numpy(np.array(bad, dtype=object))
        with pytest.raises(InferenceServerException) as info:
            raw_client.infer(ENSEMBLE, [tensor], client_timeout=60)
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
        messages.append(info.value.message() or "")
    raw_client.close()

    server_log = Path(triton.log_path).read_text(errors="replace")  # type: ignore[attr-defined]
    assert len(messages) >= 4 and all(messages)
    for where, text in (
        ("server log", server_log),
        ("client log", caplog.text),
        ("errors", "\n".join(messages)),
    ):
        leaked = [s for s in PHI_STRINGS if s.lower() in text.lower()]
        assert not leaked, f"{where} carries patient identifiers {leaked}"
