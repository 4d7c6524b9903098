"""Typed errors of the client: callers catch these, never raw gRPC / tritonclient exceptions."""

from __future__ import annotations


class LesionClientError(RuntimeError):
    """Base of every error the client raises."""


class InvalidInputError(LesionClientError):
    """The server refused the request (INVALID_ARGUMENT): bad DICOM, mixed series, limits, options.

    Not retried: the same bytes would fail the same way. ``server_message`` is the server's text
    (it names the item or SOPInstanceUID and the reason, never patient identifiers).
    """

    def __init__(
        self,
        server_message: str,
        status: str = "INVALID_ARGUMENT",
        slab: int | None = None,
        source: str | None = None,
        slices: tuple[int, int] | None = None,
    ) -> None:
        self.server_message = server_message
        self.status = status
        self.slab = slab
        self.source = source  # the client-side name of the refused item (file path or "item N")
        self.slices = slices  # series indices [start, stop) sent in the refused slab
        parts = []
        if slab is not None:
            parts.append(f"slab {slab}" + (f", slices {slices[0] + 1}-{slices[1]}" if slices else ""))
        if source is not None:
            parts.append(f"file {source}")
        where = f" ({'; '.join(parts)})" if parts else ""
        who = "the client" if status == "CLIENT" else "the server"
        super().__init__(f"{who} refused the input{where}: {server_message}")


class ServerUnavailableError(LesionClientError):
    """The server could not be reached / stayed unavailable after all retries."""

    def __init__(self, message: str, status: str = "UNAVAILABLE", attempts: int = 1) -> None:
        self.status = status
        self.attempts = attempts
        super().__init__(f"{message} [{status}, {attempts} attempt(s)]")


class DeadlineExceededError(LesionClientError):
    """A call ran past its deadline (``client_timeout_s``) or ``wait_ready`` ran out of time."""


class ModelMismatchError(LesionClientError):
    """The served model's metadata differs from the contract this client speaks (docs/contracts.md)."""

    def __init__(self, model: str, problems: list[str]) -> None:
        self.model = model
        self.problems = problems
        super().__init__(f"model {model!r} does not match the client's contract: " + "; ".join(problems))


class ServerError(LesionClientError):
    """Any other non-retryable server status (INTERNAL, NOT_FOUND, ...), with the server's message."""

    def __init__(self, server_message: str, status: str) -> None:
        self.server_message = server_message
        self.status = status
        super().__init__(f"[{status}] {server_message}")


class SeriesSelectionError(LesionClientError):
    """The input holds no usable series, or several where one was expected."""
