"""Triton Python model `preprocess`: one slab of DICOM Part-10 items -> model tensors.

A thin adapter: all the work (decode once, HU, window, order by position, 2.5D stack, letterbox,
low-resolution HU and masks) is ``preprocess_backend.pipeline.preprocess_slab``, the same code
that training, calibration, the client and the tests use. Bad input becomes INVALID_ARGUMENT with
preprocess_backend's message (it names the file or SOPInstanceUID); the model keeps serving.
"""

from __future__ import annotations

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from preprocess_backend.contract import ModelContract
from preprocess_backend.errors import DicomInputError
from preprocess_backend.native_threads import limit_native_threads
from preprocess_backend.pipeline import SLAB_META_TENSORS, preprocess_slab
from preprocess_backend.types import Limits, Options, mm_or_none


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        limit_native_threads(1)  # Triton scales this step by instances; idle BLAS threads spin
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        limits = Limits.from_dict({k[len("limit_"):]: int(v) for k, v in params.items() if k.startswith("limit_")})
        # The model's input contract (contract_* parameters; defaults when a repository predates them):
        # what it was trained to read. Items outside it are refused, never answered.
        self.contract = ModelContract.from_params({"contract_window": params.get("window", "lung"), **params})
        self.defaults = Options(
            window=self.contract.window,
            model_size=int(params.get("model_size", "512")),
            k=int(params.get("context_slices", "3")),
            # physical scale: one pixel size and 2.5D plane offset in mm ("none": letterbox / neighbours)
            pixel_mm=mm_or_none(params.get("pixel_mm", "none")),
            context_mm=mm_or_none(params.get("context_mm", "none")),
            image_dtype="uint8",
            limits=limits,
        )
        self.meta_names = [name for name, _, _ in SLAB_META_TENSORS]

    def execute(self, requests: list) -> list:
        return [self._one(request) for request in requests]

    def _one(self, request: object) -> object:
        try:
            items = pb_utils.get_input_tensor_by_name(request, "dicom")
            if items is None:
                raise DicomInputError("request", "no 'dicom' input")
            options = self.defaults
            window = pb_utils.get_input_tensor_by_name(request, "window")
            if window is not None:
                value = window.as_numpy().reshape(-1)[0]
                self.contract.check_window(_text(value))  # another window feeds the model unseen input
            slab = preprocess_slab([bytes(x) for x in items.as_numpy().reshape(-1)], options, contract=self.contract)
            arrays = slab.to_arrays()
            tensors = [pb_utils.Tensor("images", np.ascontiguousarray(slab.images))]
            tensors += [pb_utils.Tensor(name, np.ascontiguousarray(arrays[name])) for name in self.meta_names]
            return pb_utils.InferenceResponse(output_tensors=tensors)
        except DicomInputError as exc:
            return pb_utils.InferenceResponse(
                error=pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)
            )


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
