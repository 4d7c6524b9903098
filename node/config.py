"""The node's configuration: one TOML file (documented in docs/node.md), loaded into dataclasses.

Sizes accept integers (bytes) or strings with a unit (``"20GiB"``, ``"500MB"``). Secrets never live
in the file: the audit key comes from the environment variable named by ``audit.key_env`` (or a
mode-0600 file), PACS credentials from CTLESION_PACS_USER / CTLESION_PACS_PASSWORD.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import tomllib

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(value: int | str) -> int:
    """``1048576``, ``"1MiB"``, ``"2.5 GB"`` -> bytes."""
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(value))
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"not a size: {value!r} (use bytes or e.g. '20GiB')")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


@dataclass(frozen=True)
class TlsConfig:
    """DICOM TLS on the listener; ``ca`` set = client certificates required (mutual TLS)."""

    cert: str
    key: str
    ca: str | None = None


@dataclass(frozen=True)
class ListenerConfig:
    ae_title: str = "CTLESION"
    host: str = "0.0.0.0"
    port: int = 11112
    allowed_calling_aets: tuple[str, ...] = ()  # empty: any calling AE (say so in the log)
    http_host: str = "0.0.0.0"
    http_port: int = 8080  # /metrics, /healthz, /readyz; 0 = off
    tls: TlsConfig | None = None
    max_associations: int = 10


@dataclass(frozen=True)
class SpoolConfig:
    dir: Path = Path("/var/spool/ctlesion")
    max_bytes: int = 50 * 2**30
    max_instances: int = 200_000
    min_free_bytes: int = 2 * 2**30  # refuse (0xA700) before the disk itself fills


@dataclass(frozen=True)
class SelectionConfig:
    modalities: tuple[str, ...] = ("CT",)
    min_slices: int = 20
    max_slices: int = 2048
    thickness_mm: tuple[float, float] = (0.5, 5.0)
    axial_tolerance_deg: float = 30.0  # the model contract's tilt limit (preprocess_backend.contract)


@dataclass(frozen=True)
class TritonConfig:
    url: str = "localhost:8001"
    timeout_s: float = 120.0  # per request deadline (the client library's)
    slab_concurrency: int = 2  # slabs in flight per series
    wait_ready_s: float = 600.0


@dataclass(frozen=True)
class QueueConfig:
    workers: int = 2  # series in flight
    max_queued: int = 64  # bounded hand-off to the workers; the rest waits on disk
    retry_s: float = 10.0  # back-off before a series whose server / PACS call failed is tried again
    max_attempts: int = 20  # then the series is marked failed (and counted)


@dataclass(frozen=True)
class DestinationConfig:
    """Where results go: ``dicom://AET@host:port`` (C-STORE), ``http(s)://.../dicom-web`` (STOW-RS),
    or ``sender`` (C-STORE back to the calling AE, address from ``peers``)."""

    url: str = "sender"
    calling_aet: str | None = None  # default: the listener's AE title
    key_images: bool = True
    timeout_s: float = 60.0


@dataclass(frozen=True)
class AuditConfig:
    path: Path | None = None  # default: <spool>/audit.jsonl
    key_env: str = "CTLESION_AUDIT_KEY"
    key_file: Path | None = None


@dataclass(frozen=True)
class NodeConfig:
    listener: ListenerConfig = field(default_factory=ListenerConfig)
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    series_quiet_s: float = 10.0
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    triton: TritonConfig = field(default_factory=TritonConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    destination: DestinationConfig = field(default_factory=DestinationConfig)
    peers: dict[str, str] = field(default_factory=dict)  # calling AE -> "host:port" or "CALLEDAET@host:port"
    audit: AuditConfig = field(default_factory=AuditConfig)

    @property
    def audit_path(self) -> Path:
        return self.audit.path or self.spool.dir / "audit.jsonl"

    def audit_key(self) -> bytes:
        """The HMAC key for pseudonyms: env var first, then the key file (mode 0600)."""
        value = os.environ.get(self.audit.key_env)
        if value:
            return value.encode()
        if self.audit.key_file is not None:
            mode = self.audit.key_file.stat().st_mode
            # 0600 / 0400, or 0440 (a Kubernetes Secret volume with fsGroup adds group read)
            if mode & (stat.S_IRWXO | stat.S_IWGRP | stat.S_IXGRP):
                raise PermissionError(f"{self.audit.key_file}: audit key file must not be readable by others (chmod 600)")
            return self.audit.key_file.read_bytes().strip()
        raise ValueError(f"no audit key: set {self.audit.key_env} or audit.key_file (pseudonyms need a secret)")


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    known = {f.name: f for f in fields(cls)}
    unknown = set(data) - set(known)
    if unknown:
        raise ValueError(f"[{where}]: unknown key(s) {sorted(unknown)}")
    out: dict[str, Any] = {}
    for name, value in data.items():
        if name in ("max_bytes", "min_free_bytes"):
            value = parse_size(value)
        elif name in ("dir", "path", "key_file"):
            value = Path(value)
        elif name in ("allowed_calling_aets", "modalities"):
            value = tuple(str(v) for v in value)
        elif name == "thickness_mm":
            value = (float(value[0]), float(value[1]))
        elif name == "tls":
            value = _build(TlsConfig, value, f"{where}.tls")
        out[name] = value
    return cls(**out)


def config_from_dict(data: dict[str, Any]) -> NodeConfig:
    sections = {"listener": ListenerConfig, "spool": SpoolConfig, "selection": SelectionConfig,
                "triton": TritonConfig, "queue": QueueConfig, "destination": DestinationConfig,
                "audit": AuditConfig}
    unknown = set(data) - set(sections) - {"series", "peers"}
    if unknown:
        raise ValueError(f"unknown section(s) {sorted(unknown)}")
    kwargs: dict[str, Any] = {name: _build(cls, data[name], name) for name, cls in sections.items() if name in data}
    series = dict(data.get("series", {}))
    if set(series) - {"quiet_s"}:
        raise ValueError(f"[series]: unknown key(s) {sorted(set(series) - {'quiet_s'})}")
    if "quiet_s" in series:
        kwargs["series_quiet_s"] = float(series["quiet_s"])
    kwargs["peers"] = {str(k): str(v) for k, v in data.get("peers", {}).items()}
    return NodeConfig(**kwargs)


def load_config(path: str | Path) -> NodeConfig:
    with open(path, "rb") as fh:
        return config_from_dict(tomllib.load(fh))
