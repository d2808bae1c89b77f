#!/usr/bin/env bash
# The GPU figures of issues 10 (selector) and 11 (extraction), in ONE device run on an H200 (the device tool: 15
# minutes per session, start-up included; the steps' limits add up to 12.3 minutes, they take less). None of it runs
# in CI (the tests run loops_equal's CPU part only). Step order is priority order: whatever a cut-off leaves is the least needed.
#
# Once, on the developer machine, in the repository root (the device has no webdataset/braceexpand/faiss):
#   echo /.whl/ >> .git/info/exclude
#   .venv/bin/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl webdataset==1.0.2 braceexpand==0.1.7 faiss-cpu==1.15.1
# Then: device run, carry [".whl"], timeout_s 590, command "bash bench_suite/bench/gpu_check.sh".
# Every step has its own time limit, so one slow step cannot eat the others; the logs come back in $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:.
else
    export PYTHONPATH=.
fi
export PYTHONUNBUFFERED=1
PY=python3
step() {  # step NAME SECONDS COMMAND...: run with a limit, log to $OUT/NAME.txt
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
    echo "   exit $? after ${SECONDS}s in all"
    tail -n 25 "$OUT/$name.txt"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

# issue 10: the GPU loops select what the eager float32 loop selects (graph and static, bf16, tf32 and fp32 screens,
# with and without the Triton top-2 kernel, forced capacity overflows, a subset); exit 1 on any difference
step loops_equal 120 $PY -m bench_suite.bench.loops_equal --device cuda
# issue 10: 50k pool at B = 1000 / 2500 / 5000, the naive loop for all T = 300 iterations in the same run.
# auto: the fixed-shape loop replayed as a CUDA graph, bf16 screen through the Triton top-2 kernel (static_loop,
# fused_top2); graph-nokernel: the same with the bf16 product written out and torch's top-k; graph-fp32: the graph
# with the float32 product; full: the float32 product in the eager loop (the GPU path before the graph)
step sel50k 120 $PY -m bench_suite.bench.selector --device cuda --budgets 1000,2500,5000 --naive-iters 300 \
    --paths auto,graph-nokernel,graph-fp32,full --json "$OUT/sel50k.json"
# issue 10: the full ImageNet pool (1,281,167 x 384), B = 12,812: 20 iterations extrapolated to T = 300
step selimnet 100 $PY -m bench_suite.bench.selector --device cuda --n 1281167 --classes 1000 --budgets 12812 \
    --iters 20 --no-naive --no-emd --paths auto,graph-nokernel,graph-fp32,full --json "$OUT/selimnet.json"
step selimnet_m 50 $PY -m bench_suite.bench.selector --device cuda --n 1281167 --classes 1000 --budgets 12812 \
    --subset 100000 --iters 20 --no-naive --no-emd --paths auto,full --json "$OUT/selimnet_m.json"
# issue 10: the select CLI end to end (start-up included), ActiveFT vs K-Means at 2 / 5 / 10% of 50k
step table3 70 $PY -m bench_suite.bench.selector --device cuda --table3 --json "$OUT/table3.json"
# issue 10: 2 ranks sharing the one GPU over gloo select the ids of 1 rank (50k pool, B = 1000)
$PY -c "from bench_suite.bench.pools import clustered_sphere; from bench_suite.store import FeatureStore; \
FeatureStore.from_array(clustered_sphere(50000, 384, 100, seed=1)[0]).save('/tmp/pool50k')"
step dist1 40 $PY -m bench_suite.cli.select --features /tmp/pool50k --budget 1000 --method activeft \
    --set device=cuda progress=false --out "$OUT/dist1.json"
step dist2 60 env BENCH_SUITE_DIST_BACKEND=gloo $PY -m torch.distributed.run --standalone --nproc_per_node 2 -m bench_suite.cli.select \
    --features /tmp/pool50k --budget 1000 --method activeft --set device=cuda progress=false --out "$OUT/dist2.json"
$PY -c "import json; a, b = (json.load(open('$OUT/dist%d.json' % k)) for k in (1, 2)); \
print('2 ranks on one GPU (gloo) == 1 rank:', a['ids'] == b['ids'], 'world', b['info']['world'])"
# issue 11: extraction vs the bare forward, DINO ViT-S/16 at 224 px (random weights in the DINO file format:
# the speed does not depend on the values)
export BENCH_SUITE_CACHE=/tmp/bs_cache
mkdir -p "$BENCH_SUITE_CACHE"
$PY -c "import timm, torch; torch.save(timm.create_model('vit_small_patch16_224', num_classes=0).state_dict(), \
'$BENCH_SUITE_CACHE/dino_deitsmall16_pretrain.pth')"
step extract_fp32 60 $PY -m bench_suite.bench.extract --device cuda --encoder dino_vits16 --image-size 224 \
    --images 12000 --batch-size 256 --workers 12
step extract_bf16 60 $PY -m bench_suite.bench.extract --device cuda --encoder dino_vits16 --image-size 224 \
    --images 12000 --batch-size 256 --workers 12 --precision bf16 --decode device
# issue 10: the Triton top-2 kernel's tile sizes against the written-out bf16 product, one pass at ImageNet size
# (fused_top2.TILES is fixed, not autotuned: set it to the fastest tile printed here)
step top2 60 $PY -m bench_suite.bench.top2 --device cuda
echo "done in ${SECONDS}s"
