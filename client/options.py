"""Client options: what is sent with each request, and how the client talks to the server."""

from __future__ import annotations

from dataclasses import dataclass, field

from ctlesion_client.retry import RetryPolicy

DEFAULT_MODEL = "lesion_detection"
COMPRESSIONS = ("none", "gzip", "deflate")


@dataclass(frozen=True)
class DetectOptions:
    """What a finding must be; ``None`` takes the served model's own defaults.

    ``score_threshold`` is the operating threshold on a lesion's final confidence: by default the
    one the served false-positive-reduction model was tuned to on validation data (<= 2 false
    positives per scan), or the article's 0.3 on the detector score where no FPR model is served.
    ``candidate_threshold`` is the per-slice detector threshold sent to the server (default: the
    FPR model's, else the score threshold). ``min_size_mm`` / ``max_size_mm`` apply to 3D lesions
    (defaults 3 / 30 mm; larger lesions are reported as masses). ``fpr=False`` skips the second pass.
    """

    window: str | None = None  # preset name, "file" or "centre,width"
    score_threshold: float | None = None
    nms_iou: float | None = None
    min_size_mm: float | None = None
    max_size_mm: float | None = None
    candidate_threshold: float | None = None
    fpr: bool = True

    def as_inputs(self) -> dict[str, str | float]:
        """Ensemble input name -> value for the per-slice options that are set (sizes are 3D rules,
        applied by the client to linked lesions; the score threshold sent is the candidate one)."""
        values = {
            "window": self.window,
            "score_threshold": self.candidate_threshold if self.candidate_threshold is not None else self.score_threshold,
            "nms_iou": self.nms_iou,
        }
        return {k: v for k, v in values.items() if v is not None}


@dataclass(frozen=True)
class TlsOptions:
    """gRPC over TLS; ``client_cert`` + ``client_key`` for mutual TLS. Paths to PEM files."""

    root_cert: str | None = None
    client_cert: str | None = None
    client_key: str | None = None

    def __post_init__(self) -> None:
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("mutual TLS needs both client_cert and client_key")


@dataclass(frozen=True)
class ClientOptions:
    """Transport and scheduling: deadlines, concurrency, slabs, retries, TLS, compression."""

    model_name: str = DEFAULT_MODEL
    client_timeout_s: float = 120.0  # per call; a slab of 18 slices takes seconds on 2 CPU cores
    concurrency: int = 4  # slabs in flight per series (about 2 x instances keeps the batcher fed)
    # owned slices per request; None: two requests (+ 2 x halo each) fill one served detector batch
    slab_size: int | None = None
    k: int | None = None  # the model's 2.5D context (halo = k // 2 slices at each slab end); None: the served one
    # the served 2.5D plane offset in mm (set from the served model by the client; a thin-slice series
    # then sends more halo slices, ``preprocess_backend.slabs.context_halo``)
    context_mm: float | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    tls: TlsOptions | None = None
    compression: str = "none"  # gRPC message compression: none | gzip | deflate
    check_metadata: bool = True  # compare the ensemble's metadata with the contract on first use

    def __post_init__(self) -> None:
        if self.slab_size is not None and self.slab_size < 1:
            raise ValueError(f"slab_size must be >= 1, got {self.slab_size}")
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.k is not None and (self.k < 1 or self.k % 2 == 0):
            raise ValueError(f"k must be odd and >= 1, got {self.k}")
        if self.compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {COMPRESSIONS}, got {self.compression!r}")
        if self.client_timeout_s <= 0:
            raise ValueError("client_timeout_s must be > 0")

    @property
    def halo(self) -> int:
        return (self.k or 3) // 2  # the client resolves k from the served model first (planning_options)

    def series_halo(self, spacing_mm: float | None) -> int:
        """Context slices at each slab end for a series of this slice spacing."""
        from preprocess_backend.slabs import context_halo

        return context_halo(self.k or 3, self.context_mm, spacing_mm)

    @property
    def compression_algorithm(self) -> str | None:
        return None if self.compression == "none" else self.compression
