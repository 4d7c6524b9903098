#!/usr/bin/env bash
# The gpu-torch target on a lent GPU machine, in ONE device call of about 5-7 minutes.
#
# Here first (network): bash bench/gpu_node_bundle.sh   -> .gpubundle/bundle.tar.xz (git-ignored)
# Then one call of the device tool, e.g.
#   run(command="bash bench/gpu_node_check.sh", carry=[".gpubundle"], timeout_s=560)
# and give the machine back. What comes back under $OUT (at most 8 files):
#   gpu_node.json     detector alone slices/s per batch bucket (fp16 CUDA graphs), ensemble slices/s
#                     through the client library and its ratio to the detector's best, the detector's
#                     average batch under load, executions per CUDA-graph bucket, the 300-slice series
#                     latency, the locust run's summary, every step's seconds and errors
#   tritonserver.log  the server's log;  check.log  this script's output;  ldd.txt  when the stub cannot load
#
# The machine: Python 3.12 with torch CUDA, numpy 2, grpcio, protobuf, scipy, psutil; no network, no
# pydicom / tritonclient / locust / tritonserver: those come in the bundle (numpy 1.26.4 too: the
# Python backend returns empty tensors under numpy 2). Our packages are linked by their import names.
set -uo pipefail
OUT=${OUT:-$PWD/work/gpu-node}
mkdir -p "$OUT"
exec > >(tee "$OUT/check.log") 2>&1
export PYTHONUNBUFFERED=1
start=$(date +%s)
SITE=${CTLESION_GPU_SITE:-/tmp/ctlesion-site}
BUNDLE=${CTLESION_GPU_BUNDLE:-.gpubundle/bundle.tar.xz}
PY=${PYTHON:-python3}

[ -f "$BUNDLE" ] || { echo "no $BUNDLE: run bash bench/gpu_node_bundle.sh here first and carry .gpubundle"; exit 2; }
mkdir -p "$SITE"
tar -xJf "$BUNDLE" -C "$SITE" || exit 2
# our packages by their import names (pyproject's package-dir), without pip or network
"$PY" - "$SITE" <<'EOF' || exit 2
import pathlib, sys, tomllib
site = pathlib.Path(sys.argv[1])
tool = tomllib.loads(pathlib.Path("pyproject.toml").read_text())["tool"]["setuptools"]
dirs = tool.get("package-dir", {})
for name in tool["packages"]:
    link, target = site / name, pathlib.Path(dirs.get(name, name)).resolve()
    if target.is_dir() and not link.exists():
        link.symlink_to(target)
EOF
# The bundle first (its numpy 1.26 shadows the image's numpy 2), then this interpreter's own
# site-packages by name: the Python-backend stub embeds libpython, and should it not see the venv, torch
# must still be found.
OWN_SITE=$("$PY" -c 'import site; print(":".join(site.getsitepackages()))')
export PYTHONPATH="$SITE:$OWN_SITE${PYTHONPATH:+:$PYTHONPATH}"
# The Python-backend stubs did not see PYTHONPATH here (2026-12-04: "No module named pydicom" while
# numpy loaded from elsewhere), so a .pth file in every site folder an embedded 3.12 may use (this venv's
# and the system's) puts the bundle and this venv first, the stubs included; each interpreter that reads
# it notes its path in stub_paths.txt. Removed on exit.
SITE_DIRS=$( { "$PY" -c 'import site; print("\n".join(site.getsitepackages()))';
              /usr/bin/python3.12 -c 'import site; print("\n".join(site.getsitepackages()))' 2>/dev/null; } | sort -u)
PTHS=()
for d in $SITE_DIRS; do
  mkdir -p "$d" 2>/dev/null || continue
  pth="$d/zz_ctlesion_gpu_site.pth"
  echo "import sys; sys.path[:0] = [p for p in '$SITE:$OWN_SITE'.split(':') if p not in sys.path]; open('$OUT/stub_paths.txt', 'a').write(f'{sys.executable} {sys.prefix} {sys.path[:4]}\\n')" > "$pth" 2>/dev/null && PTHS+=("$pth")
done
echo "path files: ${PTHS[*]}"
trap 'rm -f "${PTHS[@]}"' EXIT
# What the Python-backend models import, under the bundle's numpy 1.26 (scipy and onnxruntime are the image's).
# locust alone: gevent must patch ssl before anything imports it (as in the locust process itself)
"$PY" -c 'import locust; print("locust", locust.__version__)' || exit 2
"$PY" -c 'import numpy, torch, pydicom, tritonclient.grpc, scipy, scipy.ndimage, scipy.sparse, onnxruntime; print("numpy", numpy.__version__, "torch", torch.__version__, "cuda", torch.cuda.is_available(), "scipy", scipy.__version__, "onnxruntime", onnxruntime.__version__)' || exit 2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
df -h /dev/shm || true   # each Python-backend stub takes a 64 MiB shared-memory pool (16 stubs on 16 cores)

# The 3.12 stub links libpython3.12.so.1.0: find the one of this interpreter.
LIBDIR=$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR") or "")')
for d in "$LIBDIR" "$(dirname "$(readlink -f "$(command -v "$PY")")")/../lib" /usr/lib/x86_64-linux-gnu /usr/local/lib; do
  if [ -e "$d/libpython3.12.so.1.0" ]; then export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"; break; fi
done
if [ -z "${LD_LIBRARY_PATH:-}" ] || [ ! -e "${LD_LIBRARY_PATH%%:*}/libpython3.12.so.1.0" ]; then
  found=$(find /usr /opt /root -name 'libpython3.12.so.1.0' 2>/dev/null | head -1)
  [ -n "$found" ] && export LD_LIBRARY_PATH="$(dirname "$found")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
echo "python $("$PY" -c 'import sys; print(sys.executable, sys.prefix, sys.base_prefix)'); LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
STUB="$SITE/pytriton/tritonserver/python_backend_stubs/3.12/triton_python_backend_stub"
if ldd "$STUB" | grep -q "not found"; then
  ldd "$STUB" > "$OUT/ldd.txt"; echo "the Python backend stub cannot load here: see ldd.txt"; exit 3
fi
echo "setup took $(( $(date +%s) - start )) s"

# One try with a GPU instance of the detector; should the server refuse it (no GPU support in this
# tritonserver's Python backend), once more with a CPU instance whose torch still runs on CUDA.
timeout 330 "$PY" -m ctlesion_bench.gpu_node_check --out "$OUT" --start-timeout 150 "$@"
rc=$?
if [ $rc -ne 0 ] && "$PY" -c 'import json, sys; sys.exit("server_start" not in json.load(open(sys.argv[1]))["errors"])' \
     "$OUT/gpu_node.json" 2>/dev/null; then
  echo "server did not start with a GPU instance; retrying with --torch-instance-kind cpu"
  mv "$OUT/gpu_node.json" "$OUT/gpu_node_gpu_instance.json"
  timeout 200 "$PY" -m ctlesion_bench.gpu_node_check --out "$OUT" --torch-instance-kind cpu --start-timeout 120 \
    --throughput-seconds 25 --locust-run-time 25s "$@"
  rc=$?
fi
echo "gpu_node_check: rc $rc after $(( $(date +%s) - start )) s"
# The CUDA tests (fp16 graphs per bucket against eager, fp16 against the fp32 CPU detections).
[ "${CTLESION_GPU_PYTEST:-1}" = 0 ] && exit $rc
timeout 120 "$PY" -m pytest -m gpu tests/test_gpu_target_cuda.py tests/test_gpu_cuda.py -q -p no:cacheprovider \
  > "$OUT/pytest_gpu.log" 2>&1
echo "pytest -m gpu: rc $? ($(tail -1 "$OUT/pytest_gpu.log"))"
exit $rc
