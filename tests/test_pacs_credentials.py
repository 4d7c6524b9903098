"""PACS credentials: environment or a private file, never argv, URL or logs (no Orthanc needed)."""

from __future__ import annotations

import os

import pytest

from ctlesion_client import pacs as pacs_cli
from ctlesion_client.pacs_types import PacsCredentials, load_credentials, parse_pacs_url


def test_credentials_file_must_be_private(tmp_path):
    path = tmp_path / "pacs.cred"
    path.write_text('{"username": "u", "password": "s3cret"}')
    os.chmod(path, 0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        load_credentials(path)
    os.chmod(path, 0o600)
    creds = load_credentials(path)
    assert creds == PacsCredentials("u", "s3cret")
    assert "s3cret" not in repr(creds) and "s3cret" not in str(creds)
    assert load_credentials(None, env={"CTLESION_PACS_USER": "a", "CTLESION_PACS_PASSWORD": "b"}) == \
        PacsCredentials("a", "b")


def test_cli_refuses_credentials_on_the_command_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        pacs_cli.main(["1.2.3", "--pacs", "http://127.0.0.1:1/dicom-web", "--triton", "x:1", "--password", "p"])
    code = pacs_cli.main(["1.2.3", "--pacs", "http://user:pw@127.0.0.1:1/dicom-web", "--triton", "x:1"])
    err = capsys.readouterr().err
    assert code == 1 and "not in the URL" in err and "pw@" not in err
    path = tmp_path / "c"
    path.write_text("u:leaky")
    os.chmod(path, 0o640)
    assert pacs_cli.main(["1.2.3", "--pacs", "http://127.0.0.1:1/dicom-web", "--triton", "x:1",
                          "--credentials-file", str(path)]) == 1
    assert "leaky" not in capsys.readouterr().err


def test_pacs_url_picks_the_protocol():
    assert parse_pacs_url("http://h:8042/dicom-web/") == ("dicomweb", "http://h:8042/dicom-web")
    kind, ep = parse_pacs_url("dicom://ORTHANC@h:4242?calling=ME")
    assert kind == "dimse" and (ep.host, ep.port, ep.called_aet, ep.calling_aet) == ("h", 4242, "ORTHANC", "ME")
    with pytest.raises(ValueError):
        parse_pacs_url("ftp://h/x")
