#!/usr/bin/env bash
# Installs the headers the `cudnn` feature compiles against (cuDNN's attention through its
# frontend's graph API), from PyPI wheels, in the pattern of the CUDA toolchain's setup script.
# Idempotent; downloads ~380 MB once, keeps ~3 MB of headers.
#
#   bash scripts/setup-cudnn.sh                       # once per build machine
#   cargo build --release --features cuda,cudnn       # build.rs finds the headers here
#
# Only headers: esmbed loads libcudnn.so.9 at run time (dlopen), so the binary starts, and falls
# back to FlashAttention, on machines without cuDNN. The versions are the ones measured: cuDNN
# 9.19 is what PyTorch 2.11 for CUDA 13 ships (and what the GPU machines load), frontend 1.32
# supports backends from 9.0 on. Where the headers go: $ESMBED_CUDA_ROOT/cudnn (default
# ~/.cache/esmbed-cuda/cudnn); build.rs reads them from there, or from CUDNN_INCLUDE_DIR and
# CUDNN_FRONTEND_INCLUDE_DIR.
set -euo pipefail
ROOT=${ESMBED_CUDA_ROOT:-$HOME/.cache/esmbed-cuda}/cudnn
CUDNN=nvidia-cudnn-cu13==9.19.0.56
FRONTEND=nvidia-cudnn-frontend==1.32.0
if [[ -f $ROOT/include/cudnn.h && -f $ROOT/frontend/include/cudnn_frontend.h ]]; then
  echo "cuDNN headers already in $ROOT"; exit 0
fi
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
# The frontend's wheel is per Python version; its headers are the same in every one.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 -d "$tmp" "$CUDNN" "$FRONTEND"
mkdir -p "$ROOT/include" "$ROOT/frontend"
python3 - "$tmp" "$ROOT" <<'PY'
import sys, zipfile, pathlib
tmp, root = map(pathlib.Path, sys.argv[1:])
for wheel in tmp.glob("*.whl"):
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            if name.startswith("nvidia/cudnn/include/") and name.endswith(".h"):
                (root / "include" / pathlib.Path(name).name).write_bytes(z.read(name))
            elif name.startswith("include/") and not name.endswith("/"):
                out = root / "frontend" / name
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(z.read(name))
PY
echo "cuDNN headers in $ROOT/include, frontend headers in $ROOT/frontend/include"
