"""Triton Python model `fpr_preprocess`: DICOM slices of one series + lesion centres (mm) -> cubes
and airway probes.

A thin adapter over ``preprocess_backend.airways.cubes_and_probes`` (the cubes training and
evaluation cut, and the probe columns the client's airway veto reads). Bad input becomes
INVALID_ARGUMENT naming the item; the model keeps serving.
"""

from __future__ import annotations

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from preprocess_backend.airways import cubes_and_probes
from preprocess_backend.cubes import CubeSpec
from preprocess_backend.errors import DicomInputError
from preprocess_backend.native_threads import limit_native_threads
from preprocess_backend.types import Limits, Options


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        limit_native_threads(1)  # Triton scales this step by instances; idle BLAS threads spin
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.spec = CubeSpec.from_dict(json.loads(params["cube"]))
        limits = Limits.from_dict({k[len("limit_"):]: int(v) for k, v in params.items() if k.startswith("limit_")})
        self.options = Options(limits=limits)

    def execute(self, requests: list) -> list:
        return [self._one(request) for request in requests]

    def _one(self, request: object) -> object:
        try:
            items = pb_utils.get_input_tensor_by_name(request, "dicom")
            centres = pb_utils.get_input_tensor_by_name(request, "centres_mm")
            if items is None or centres is None:
                raise DicomInputError("request", "needs 'dicom' and 'centres_mm' inputs")
            cubes, probes = cubes_and_probes([bytes(x) for x in items.as_numpy().reshape(-1)], centres.as_numpy(), self.spec, self.options)
            return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("cubes", np.ascontiguousarray(cubes)),
                                                              pb_utils.Tensor("airway_hu", np.ascontiguousarray(probes))])  # fmt: skip
        except DicomInputError as exc:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG))
