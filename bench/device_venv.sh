#!/usr/bin/env bash
# A virtualenv shaped like the lent GPU machine, for the dry run of its GPU check: Python 3.12 with torch 2.11
# and the packages that machine's image has that the check can reach (torchvision and timm for open_clip), and
# nothing the check must carry itself (bench/device_wheels.txt). Usage: bench/device_venv.sh DIR
set -euo pipefail
DIR=${1:?usage: bench/device_venv.sh DIR}
PY312=${PY312:-$(command -v python3.12 || true)}
[ -n "$PY312" ] || { echo "device_venv: no python3.12 found (set PY312)" >&2; exit 2; }
[ -x "$DIR/bin/python" ] || "$PY312" -m venv "$DIR"
"$DIR/bin/python" -m pip install -q --disable-pip-version-check torch==2.11.0 torchvision==0.26.0 \
    transformers peft onnx onnxruntime grpcio protobuf prometheus-client scipy scikit-image safetensors timm \
    'huggingface-hub<2'
