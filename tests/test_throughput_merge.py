"""Batches that merge: the client plans slabs from what the served repository declares (k from the
preprocess step, the detector's max batch), so two concurrent requests fit one detector batch, and
under concurrent load the real server's detector runs batches larger than one request."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from test_client_unit import FakeTransport
from tritonclient.utils import InferenceServerException

from ctlesion_client import ClientOptions, LesionClient
from ctlesion_client.errors import ModelMismatchError
from ctlesion_client.slabs import RequestShape, merging_slab_size, plan_slabs


def test_merging_slab_size_fits_two_requests_in_one_batch() -> None:
    for batch, halo in [(64, 1), (32, 1), (64, 2), (16, 1), (7, 1)]:
        owned = merging_slab_size(batch, halo)
        assert 2 * (owned + 2 * halo) <= batch or owned + 2 * halo <= batch
        assert (owned + 1 + 2 * halo) * 2 > batch  # the largest that still merges two
    assert merging_slab_size(64, 1) == 30 and merging_slab_size(32, 1) == 14
    assert merging_slab_size(3, 1) == 1  # one request per batch when two cannot fit
    sent = max(p.size for p in plan_slabs(300, merging_slab_size(64, 1), 1))
    assert sent == 32  # 30 owned + 2 halo: two of them are one full batch of 64


def _config(params: dict[str, str] | None = None, max_batch: int = 0, steps: list[str] | None = None) -> dict[str, Any]:
    config: dict[str, Any] = {"max_batch_size": max_batch, "parameters": {k: {"string_value": v} for k, v in (params or {}).items()}}
    if steps:
        config["ensemble_scheduling"] = {"step": [{"model_name": s} for s in steps]}
    return {"config": config}  # tritonclient's get_model_config(as_json=True) wraps it so


class ConfigTransport(FakeTransport):
    """The fake ensemble, plus model configs declaring k and the detector batch."""

    def __init__(self, k: int, max_batch: int) -> None:
        super().__init__()
        self.configs = {
            "lesion_detection": _config(steps=["preprocess", "detector", "postprocess"]),
            "preprocess": _config({"context_slices": str(k)}),
            "detector": _config(max_batch=max_batch),
            "postprocess": _config(),
        }

    def get_model_config(self, model_name: str, model_version: str = "", headers: Any = None, as_json: bool = False,
                         client_timeout: float | None = None) -> Any:
        if model_name not in self.configs:
            raise InferenceServerException(f"model {model_name} not found", status="StatusCode.NOT_FOUND")
        return self.configs[model_name]


def test_client_takes_k_and_slab_size_from_the_served_configs(tmp_path: Path) -> None:
    client = LesionClient("fake:8001", ClientOptions(), transport=ConfigTransport(k=5, max_batch=40))
    client.check_model()
    planned = client.planning_options()
    assert planned.k == 5 and planned.halo == 2  # not the client's default 3
    assert planned.slab_size == merging_slab_size(40, 2) == 16
    explicit = LesionClient("fake:8001", ClientOptions(slab_size=8), transport=ConfigTransport(5, 40))
    explicit.check_model()
    assert explicit.planning_options().slab_size == 8
    wrong = LesionClient("fake:8001", ClientOptions(k=3), transport=ConfigTransport(5, 40))
    wrong.check_model()
    with pytest.raises(ModelMismatchError, match="k = 5"):
        wrong.planning_options()
    # A server that declares nothing (configs refused): the documented fallbacks.
    legacy = LesionClient("fake:8001", ClientOptions(), transport=ConfigTransport(5, 40))
    legacy._transport.configs = {}  # type: ignore[attr-defined]
    legacy.check_model()
    assert (legacy.planning_options().k, legacy.planning_options().slab_size) == (3, 16)


def test_request_shape_from_a_built_repository(cpu_repository: Path) -> None:
    shape = RequestShape.from_repository(cpu_repository)
    assert shape.k == 3 and shape.max_batch_size == 32  # tests/conftest.py builds it with max batch 32
    assert shape.slab_size() == 14


@pytest.mark.slow
@pytest.mark.triton
def test_concurrent_slabs_merge_in_the_detector(triton: Any, tmp_path: Path) -> None:
    """Four slabs sent at once as the client plans them: the detector runs fewer executions than
    requests, so its average batch is larger than one request's slices (Triton's statistics)."""
    import tritonclient.grpc as grpcclient
    from dicom_factory import chest_phantom, phantom_series

    from ctlesion_client import DetectOptions
    from ctlesion_client.core import build_inputs, infer_kwargs

    series = tmp_path / "series"
    series.mkdir()
    for i, item in enumerate(phantom_series(chest_phantom(z=60, size=512, noise=20))):
        (series / f"{i:03d}.dcm").write_bytes(item)
    with LesionClient(triton.grpc_url, ClientOptions(client_timeout_s=300)) as client:
        prepared = client.prepare(series)
        planned = client.planning_options()
    assert planned.k == 3 and planned.slab_size == 14  # from the served configs (max batch 32)
    slabs = [prepared.slab_bytes(p) for p in prepared.plans[:4]]
    assert [len(s) for s in slabs] == [15, 16, 16, 16]  # the first slab has no halo before it
    stats = grpcclient.InferenceServerClient(triton.grpc_url)

    def counts() -> tuple[int, int]:
        s = stats.get_inference_statistics("detector").model_stats[0]
        return int(s.inference_count), int(s.execution_count)

    inf0, exe0 = counts()
    errors: list[BaseException] = []

    def send(slab: list[bytes]) -> None:
        try:
            c = grpcclient.InferenceServerClient(triton.grpc_url)
            c.infer(**infer_kwargs(planned, build_inputs(slab, DetectOptions())))
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(s,)) for s in slabs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    inf1, exe1 = counts()
    assert inf1 - inf0 == sum(len(s) for s in slabs)
    assert exe1 - exe0 < len(slabs)  # merged: fewer executions than requests
    assert (inf1 - inf0) / (exe1 - exe0) > max(len(s) for s in slabs)  # average batch > one request's slices
