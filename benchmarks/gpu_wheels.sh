#!/usr/bin/env bash
# Download, here, the wheels that benchmarks/gpu_check.sh installs on the GPU machine.
#
# The GPU machine (nvidia-h200, Python 3.12, no network) has torch, cupy, numpy, scipy,
# scikit-learn, numba, psutil, pyyaml, msgpack, jinja2, click, cloudpickle, fsspec, toolz,
# but not dask, distributed, zarr or pynndescent, nor their own needs listed below.
# The wheels go to .whl/ at the repository root (ignored by git through .git/info/exclude),
# which the device call carries:  run(carry=[".whl"], command="bash benchmarks/gpu_check.sh")
#
# Usage:  bash benchmarks/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
# one version of each (the ones this repository is tested with); pure-Python ones and
# abi3/cp312 builds for manylinux x86-64
PKGS=(
  dask==2026.8.0 distributed==2026.8.0 partd==1.4.2 locket==1.0.0 tblib==3.2.2
  tornado==6.6.1 zict==3.0.0
  zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0
  pynndescent==0.7.0
)
PLAT=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64 manylinux_2_24_x86_64 manylinux_2_31_x86_64 \
         manylinux_2_34_x86_64 manylinux_2_35_x86_64; do
  PLAT+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${PLAT[@]}" -d .whl "${PKGS[@]}"
ls -la .whl
du -ch .whl/*.whl | tail -1
