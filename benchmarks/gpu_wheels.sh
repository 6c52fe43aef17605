#!/usr/bin/env bash
# The wheels benchmarks/gpu.py needs on a machine that has Python 3.12 and PyTorch but none of
# MONAI, nibabel or pydantic, and no network: cp312, manylinux x86-64, no dependencies pulled,
# each at the version requirements.lock pins, into the git-ignored .whl/ (under 8 MB).
#
#   bash benchmarks/gpu_wheels.sh
#   # there:  python3 -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl
#   #         PYTHONPATH=/tmp/site:. python3 benchmarks/gpu.py --data-root DIR
set -euo pipefail
cd "$(dirname "$0")/.."
packages=(monai nibabel pydantic pydantic_core annotated-types typing-inspection typing_extensions)
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
  platforms+=(--platform "$tag")
done
mkdir -p .whl
for name in "${packages[@]}"; do
  pin=$(grep -i -m1 "^${name}==" requirements.lock) || { echo "requirements.lock pins no ${name}." >&2; exit 2; }
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl "$pin"
done
ls -1 .whl
