#!/usr/bin/env bash
# Lock the images' Python dependencies with hashes (docker/requirements-{gpu,cpu}.lock) from the .in files beside
# this script and the project's pyproject.toml files. Run after changing a dependency; the Dockerfiles install
# the locks with `pip install --require-hashes`. Needs uv (`pip install uv`) and access to PyPI.
#   docker/lock.sh
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$(dirname "$here")"
UV="${UV:-uv}"
common=(--python-version 3.11 --python-platform x86_64-manylinux_2_28 --generate-hashes --no-header
        --no-emit-package ice-client --no-emit-package ice-serving)
"$UV" pip compile docker/requirements-gpu.in "${common[@]}" --no-emit-package onnxruntime \
    -o docker/requirements-gpu.lock
# torch and torchvision come from the CPU index (not reachable through PyPI's hashes); so do not the CUDA
# libraries that only PyPI's torch build pulls in.
cpu_only=(--no-emit-package torch --no-emit-package torchvision --no-emit-package triton)
while read -r pkg; do cpu_only+=(--no-emit-package "$pkg"); done < <(
    "$UV" pip compile docker/requirements-cpu.in "${common[@]}" --no-annotate 2>/dev/null \
        | sed -n 's/^\(nvidia-[a-z0-9-]*\)==.*/\1/p')
"$UV" pip compile docker/requirements-cpu.in "${common[@]}" "${cpu_only[@]}" -o docker/requirements-cpu.lock
