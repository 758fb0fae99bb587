#!/usr/bin/env bash
# The CUDA wheel, `esmbed-cuda` (import name `esmbed`, like the CPU wheel): the extension built
# with `--features cuda` in the GPU build's target directory (target/cuda), its CUDA libraries
# taken from NVIDIA's PyPI wheels at run time (see build.rs), so it needs a driver but no toolkit.
#   bash ../shared/gpu/setup-cuda.sh && source ../shared/gpu/env.sh   # here; or any CUDA 13 setup
#   bash python/build-cuda-wheel.sh            # → target/wheels-cuda/esmbed_cuda-*.whl
# A separate distribution, not an `esmbed[cuda]` extra: an extra can add dependencies but cannot
# replace the compiled extension, and the CUDA one is ~10x the CPU one's size.
set -euo pipefail
cd "$(dirname "$0")"
root=$(cd .. && pwd)
maturin=${MATURIN:-maturin}
cp pyproject.toml "$root/target/pyproject.cpu.toml"
trap 'mv "$root/target/pyproject.cpu.toml" pyproject.toml' EXIT
python3 - <<'PY'
import re
text = open("pyproject.toml").read()
text = text.replace('name = "esmbed"', 'name = "esmbed-cuda"', 1)
text = text.replace(
    'dependencies = ["pyarrow>=15", "numpy>=1.21"]',
    'dependencies = ["pyarrow>=15", "numpy>=1.21", "nvidia-cuda-runtime>=13,<14", '
    '"nvidia-cublas>=13,<14", "nvidia-cuda-nvrtc>=13,<14", "nvidia-curand>=10.4,<11"]',
    1,
)
open("pyproject.toml", "w").write(text)
PY
# --auditwheel skip: the CUDA libraries are dependencies, not copies inside the wheel.
"$maturin" build --release --strip --features cuda --auditwheel skip \
  --target-dir "$root/target/cuda" --out "$root/target/wheels-cuda"
