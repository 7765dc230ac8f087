#!/usr/bin/env bash
# The GPU check on the lent GPU machine as it is: no network, Python 3.12 with torch and most of what the services
# need, not diffusers or open_clip (bench/device_wheels.txt lists what it lacks). Installs the carried wheels of
# those (`make device-wheels` fetches them into .whl/ beforehand) into a target folder, then runs
# bench/gpu_check_device.py, which writes every figure to $OUT as soon as it is measured.
#
#   bash bench/gpu_check_device.sh                          # CUDA: about 7 minutes on one H100
#   bash bench/gpu_check_device.sh --device cpu --quick     # the dry run, on any machine
#
# WHEELS (default .whl), SITE (the target folder, default a fresh one under /tmp), OUT (default
# build/gpu-check-device) and PYTHON (default python3) may be set in the environment.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-.whl}
SITE=${SITE:-$(mktemp -d /tmp/ice-device-site.XXXXXX)}
OUT=${OUT:-build/gpu-check-device}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
"$PYTHON" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
    --find-links "$WHEELS" --target "$SITE" -r bench/device_wheels.txt
export PYTHONPATH="$SITE:$PWD:$PWD/protos${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
exec "$PYTHON" bench/gpu_check_device.py --out "$OUT" "$@"
