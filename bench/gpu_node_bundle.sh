#!/usr/bin/env bash
# Prepare, HERE (network, this repo's .venv), what bench/gpu_node_check.sh needs on the GPU machine,
# which has Python 3.12 + torch CUDA + numpy 2 + grpcio/protobuf/scipy but no network, no pydicom, no
# tritonclient, no locust and no tritonserver (docs/deployment.md § gpu-torch, ../shared/FACTS.md).
#
#   bash bench/gpu_node_bundle.sh            # -> .gpubundle/bundle.tar.xz (git-ignored via .git/info/exclude)
#
# The bundle holds, unpacked as one site folder (PYTHONPATH there):
#   numpy 1.26.4 cp312   the Python backend returns empty tensors under numpy 2 (FACTS.md), and scipy
#                        1.17.1 for it (the image's scipy needs numpy 2), cut to ndimage / sparse
#   pydicom 3.0.2 (its test files dropped), tritonclient 2.73.0 + python-rapidjson
#   locust 2.47.0 and the dependencies the GPU image lacks (gevent, greenlet, zope.*, flask, ...)
#   pytriton/tritonserver from nvidia-pytriton 0.7.0: bin/, backends/python, the 3.12 stub, and
#     nvidia_pytriton.libs/ without the 3.13 libpython; pytriton/__init__.py replaced by an empty one
#     (only its path is used, by ctlesion_client.server.pytriton_home)
# A device call carries the tree (about 19 MB, the checkpoint included) plus this bundle: 64 MiB at most.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEST=.gpubundle
grep -qx '/.gpubundle/' .git/info/exclude 2>/dev/null || echo '/.gpubundle/' >> .git/info/exclude
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/wheels" "$tmp/site" "$DEST"

# Versions: pyproject.toml's pins where it has them; the rest are locust's needs that the GPU image lacks.
WHEELS=(numpy==1.26.4 scipy==1.17.1 pydicom==3.0.2 threadpoolctl==3.6.0 tritonclient==2.73.0 python-rapidjson==1.25 locust==2.47.0
        configargparse==1.9.0 flask==3.1.3 flask-cors==6.0.5 flask-login==0.6.3 blinker==1.9.0
        itsdangerous==2.2.0 gevent==26.9.0 greenlet==3.3.2 geventhttpclient==2.6.1 brotli==1.2.1
        zope.event==6.2 zope.interface==8.7 pyzmq==27.3.0 python-engineio==4.15.1
        python-socketio==5.18.1 bidict==0.24.1 simple-websocket==1.1.0 wsproto==1.3.2)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_26_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 -d "$tmp/wheels" "${WHEELS[@]}"
for w in "$tmp"/wheels/*.whl; do "$PY" -m zipfile -e "$w" "$tmp/site"; done
rm -rf "$tmp/site/pydicom/data/test_files" "$tmp"/site/*.dist-info/RECORD
# The image's scipy wants numpy >= 2, so scipy travels too, cut to what our models import (ndimage,
# sparse and what they load: special, linalg, _lib): a call carries 64 MiB at most.
for sub in stats optimize io spatial signal integrate interpolate misc odr cluster fftpack fft datasets differentiate constants; do
  rm -rf "$tmp/site/scipy/$sub"
done
find "$tmp/site/numpy" "$tmp/site/scipy" -name tests -type d -prune -exec rm -rf {} +
find "$tmp/site" -name '*.pyi' -delete

# tritonserver from the installed pytriton wheel (the same 0.7.0 pin), trimmed to what serving needs.
SP=$("$PY" -c 'import pytriton, pathlib; print(pathlib.Path(pytriton.__file__).resolve().parent.parent)')
mkdir -p "$tmp/site/pytriton/tritonserver/python_backend_stubs" "$tmp/site/pytriton/tritonserver/backends"
cp -a "$SP/pytriton/tritonserver/bin" "$tmp/site/pytriton/tritonserver/"
cp -a "$SP/pytriton/tritonserver/backends/python" "$tmp/site/pytriton/tritonserver/backends/"
rm -f "$tmp/site/pytriton/tritonserver/backends/python/triton_python_backend_stub"  # copied per Python at start
cp -a "$SP/pytriton/tritonserver/python_backend_stubs/3.12" "$tmp/site/pytriton/tritonserver/python_backend_stubs/"
cp -a "$SP/nvidia_pytriton.libs" "$tmp/site/"
rm -f "$tmp"/site/nvidia_pytriton.libs/libpython3-*.13.so*
# ICU's 29 MB data library is loaded (libtritonserver -> libxml2 -> libicuu) but never read when the
# model repository is a local folder: a data symbol of the same name stands in for it (7 MB of the
# 64 MiB a call may carry). Checked here with `ctlesion demo` on the bundle's tritonserver.
icudata=$(basename "$tmp"/site/nvidia_pytriton.libs/libicudata-*.so.*)
ver=$(echo "$icudata" | sed -E 's/.*\.so\.([0-9]+).*/\1/')
echo "const char icudt${ver}_dat[64] __attribute__((aligned(16))) = {0};" \
  | gcc -shared -fPIC -Wl,-soname,"$icudata" -o "$tmp/site/nvidia_pytriton.libs/$icudata" -x c -
echo '"""tritonserver of nvidia-pytriton 0.7.0 only (bench/gpu_node_bundle.sh): the Python API is not carried."""' \
  > "$tmp/site/pytriton/__init__.py"
chmod +x "$tmp/site/pytriton/tritonserver/bin/tritonserver"

find "$tmp/site" -name '__pycache__' -prune -exec rm -rf {} +
tar -C "$tmp/site" -cf - . | xz -T0 -9 > "$DEST/bundle.tar.xz"
ls -l "$DEST/bundle.tar.xz"
tree_mb=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
echo "tracked tree $((tree_mb / 1048576)) MiB + bundle $(( $(stat -c %s "$DEST/bundle.tar.xz") / 1048576 )) MiB (limit 64 MiB a call)"
