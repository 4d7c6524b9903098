"""Types shared by the PACS back ends: credentials, series info, errors, endpoint parsing."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

ENV_USER = "CTLESION_PACS_USER"
ENV_PASSWORD = "CTLESION_PACS_PASSWORD"


class PacsError(RuntimeError):
    """A PACS refused or failed an operation."""


@dataclass(frozen=True)
class PacsCredentials:
    username: str
    password: str = field(repr=False)  # never printed, never logged

    def __str__(self) -> str:
        return f"PacsCredentials(username={self.username!r}, password=***)"


def load_credentials(path: Path | None = None, env: Mapping[str, str] | None = None) -> PacsCredentials | None:
    """Credentials from a file (mode 0600 or stricter) or else the environment; None when neither.

    File: JSON ``{"username": ..., "password": ...}`` or one line ``user:password``. Never from argv,
    so they stay out of shell history and ``ps``.
    """
    if path is not None:
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise PermissionError(
                f"{path}: credentials file must not be readable by group/others (chmod 600), mode is {oct(mode & 0o777)}"
            )
        text = path.read_text().strip()
        if text.startswith("{"):
            data = json.loads(text)
            return PacsCredentials(str(data["username"]), str(data["password"]))
        user, sep, password = text.partition(":")
        if not sep:
            raise ValueError(f"{path}: expected JSON or 'user:password'")
        return PacsCredentials(user, password)
    env = os.environ if env is None else env
    if env.get(ENV_USER):
        return PacsCredentials(env[ENV_USER], env.get(ENV_PASSWORD, ""))
    return None


@dataclass(frozen=True)
class SeriesInfo:
    study_uid: str
    series_uid: str
    modality: str
    description: str = ""
    n_instances: int | None = None


@dataclass(frozen=True)
class DimseEndpoint:
    """``dicom://CALLED_AET@host:port`` (optionally ``?calling=OURAET``)."""

    host: str
    port: int
    called_aet: str
    calling_aet: str = "CTLESION"


def parse_pacs_url(url: str) -> tuple[str, str | DimseEndpoint]:
    """``("dicomweb", base_url)`` for http(s) URLs, ``("dimse", DimseEndpoint)`` for dicom:// URLs."""
    parsed = urlparse(url)
    if parsed.scheme in ("http", "https"):
        if parsed.username or parsed.password:
            raise ValueError("put PACS credentials in the environment or --credentials-file, not in the URL")
        return "dicomweb", url.rstrip("/")
    if parsed.scheme == "dicom":
        if not parsed.hostname or not parsed.port or not parsed.username:
            raise ValueError(f"DIMSE URL must look like dicom://AET@host:port, got {url!r}")
        query = dict(p.split("=", 1) for p in parsed.query.split("&") if "=" in p)
        return "dimse", DimseEndpoint(parsed.hostname, parsed.port, unquote(parsed.username),
                                      query.get("calling", "CTLESION"))
    raise ValueError(f"unsupported PACS URL scheme {parsed.scheme!r} (use http(s):// or dicom://)")
