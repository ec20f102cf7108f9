#!/usr/bin/env bash
# GPU acceptance run for gessl_ext's kernels, in one go on a machine with a GPU (no network needed:
# torch, triton, nvcc, ninja, pytest and pytest-benchmark already installed).
#
#   bash bench/gpu_check.sh OUT_DIR
#
# Stages (each logged to OUT_DIR/<stage>.log; each result line also in OUT_DIR/summary.txt; a failing
# stage does not stop the next one; the whole run stays under GPU_CHECK_BUDGET_S, default 530 s):
#   env          GPU, driver, toolkit, torch/triton versions, date
#   build        GESSL_EXT_BUILD_CUDA=1 pip install --no-build-isolation --no-deps -e .
#   kernels_info which backend each op uses (all must be fast: GESSL_EXT_EXPECT_KERNELS=1 for the tests)
#   tests_cuda   pytest tests -m cuda
#   sanitizer_*  compute-sanitizer memcheck (C++ and Triton kernels) and racecheck (C++ kernels)
#   bench_*      every bench/bench_*.py with --benchmark-json=OUT_DIR/bench_*.json (+ a markdown digest)
#   tests_full   pytest tests, with whatever time is left
set -u
OUT=${1:?usage: bash bench/gpu_check.sh OUT_DIR}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python}
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-530}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PATH="$CUDA_HOME/bin:$PATH" MAX_JOBS=${MAX_JOBS:-8} PYTHONUNBUFFERED=1 GESSL_EXT_EXPECT_KERNELS=1
: > "$OUT/summary.txt"

# stage NAME CAP_SECONDS COMMAND... : run with a time limit of min(cap, budget left), log, record rc.
stage() {
  local name=$1 cap=$2 left limit t0 rc
  shift 2
  left=$(( BUDGET - ($(date +%s) - START) ))
  limit=$(( cap < left ? cap : left ))
  if (( limit < 5 )); then
    echo "$name: skipped (time budget spent)" | tee -a "$OUT/summary.txt"
    return
  fi
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  echo "$name: rc=$rc ($(( $(date +%s) - t0 )) s of ${limit} s)" | tee -a "$OUT/summary.txt"
}

stage env 30 bash -c "nvidia-smi; nvcc --version; $PY -c 'import torch, triton; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__, torch.cuda.get_device_name())'; date -u"

stage build 240 env GESSL_EXT_BUILD_CUDA=1 "$PY" -m pip install --no-build-isolation --no-deps -v -e .

stage kernels_info 60 "$PY" -c "from gessl_ext import ops; print(ops.kernels_info()); print(ops.kernels_summary())"

stage tests_cuda 150 "$PY" -m pytest tests -m cuda -q -rs -p no:cacheprovider --junitxml="$OUT/tests_cuda.xml"

cat > "$OUT/sanitize_ops.py" <<'EOF'
"""Small workload over every CUDA kernel of gessl_ext, for compute-sanitizer (--no-triton: C++ only)."""
import sys

import torch

from gessl_ext import ops
from gessl_ext.ops import _backends

extension = _backends.EXTENSION
assert extension is not None, _backends.EXTENSION_ERROR
generator = torch.Generator("cuda").manual_seed(0)
for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
    for rows, p, offset in ((1, 1, 0), (3, 1025, 1), (2, 4099, 0), (1, 1 << 16, 0), (2, 0, 0)):
        def draw():
            flat = torch.randn(rows * p + offset, generator=generator, device="cuda").to(dtype)
            return flat[offset:].view(rows, p)
        theta, u, g_plus, g_minus = draw(), draw(), draw(), draw()
        theta_plus, theta_minus, eps = extension.fd_perturb(theta, u, 0.01)
        extension.fd_update(u, g_plus, g_minus, eps, 0.1)
        extension.task_sgd(theta, g_plus, 0.05, True)
        extension.task_sgd(theta, g_plus, 0.05, False)
if "--no-triton" not in sys.argv:
    for dtype in (torch.float32, torch.bfloat16):
        z1, z2, t1, t2 = (torch.randn(2, 37, 19, device="cuda").to(dtype) for _ in range(4))
        z1.requires_grad_()
        z2.requires_grad_()
        ops.softmax_kl_from_embeddings(z1, z2, t1, t2, 0.1).sum().backward()
        ops.softmax_kl(z1, z2, ops.pair_log_probs(t1, t2, 0.1), 0.1).sum().backward()
torch.cuda.synchronize()
print("sanitizer workload done")
EOF
SANITIZER=$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")
# Without the caching allocator every tensor is its own allocation, so out-of-bounds accesses show.
export PYTORCH_NO_CUDA_MEMORY_CACHING=1
stage sanitizer_memcheck 120 "$SANITIZER" --tool memcheck --error-exitcode 1 "$PY" "$OUT/sanitize_ops.py"
stage sanitizer_racecheck 60 "$SANITIZER" --tool racecheck --error-exitcode 1 "$PY" "$OUT/sanitize_ops.py" --no-triton
unset PYTORCH_NO_CUDA_MEMORY_CACHING

for bench in bench/bench_*.py; do
  name=$(basename "$bench" .py)
  stage "$name" 180 "$PY" -m pytest "$bench" -q -p no:cacheprovider --benchmark-json="$OUT/$name.json" \
    --benchmark-max-time=0.5 --benchmark-min-rounds=5 --benchmark-columns=min,median,max,rounds
  [ -f "$OUT/$name.json" ] && "$PY" - "$OUT/$name.json" > "$OUT/$name.md" <<'EOF'
"""Markdown digest of a pytest-benchmark JSON: one row per benchmark with its median and extra_info."""
import json
import sys

data = json.load(open(sys.argv[1]))
info = data["machine_info"]
print(f"{data['datetime']} on {info.get('node')} ({info.get('cpu', {}).get('brand_raw', '?')})\n")
print("| group | benchmark | median ms | extra |\n|---|---|---|---|")
for bench in data["benchmarks"]:
    extra = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in bench["extra_info"].items())
    print(f"| {bench['group']} | {bench['name']} | {bench['stats']['median'] * 1e3:.4g} | {extra} |")
EOF
done

stage tests_full 600 "$PY" -m pytest tests -q -rs -p no:cacheprovider --junitxml="$OUT/tests_full.xml"

echo "total $(( $(date +%s) - START )) s" | tee -a "$OUT/summary.txt"

# --- GeSSL step suites (issue 5; bench/bench_step_gpu.py, owned by the bench helper) -------------------------
# Targets first (ResNet-18, N = 32, fd in tf32/bf16 against the baseline and the ideal, itd's memory, the bf16
# hypergradient error), then torch.compile, then the rest of the sweep with whatever time is left. The inner
# `timeout --signal=INT` stops pytest gracefully before the stage's own limit, so the JSON of the benchmarks
# that finished is still written; bench/make_results.py turns the JSON into RESULTS.md's GPU table.
step_suite() {  # step_suite NAME CAP_SECONDS PYTEST_MARK_EXPRESSION
  local name=$1 cap=$2 mark=$3 left
  left=$(( BUDGET - ($(date +%s) - START) ))
  (( left < cap )) && cap=$left
  if (( cap < 60 )); then
    echo "$name: skipped (time budget spent)" | tee -a "$OUT/summary.txt"
    return
  fi
  stage "$name" "$cap" timeout --signal=INT $(( cap - 20 )) "$PY" -m pytest bench/bench_step_gpu.py -m "$mark" -v \
    -p no:cacheprovider --benchmark-json="$OUT/$name.json" --benchmark-columns=min,median,max,rounds
}
step_suite bench_step_gpu_targets 300 "target and not compile"
step_suite bench_step_gpu_compile 180 "compile"
step_suite bench_step_gpu_sweep 600 "not target and not compile"
ls "$OUT"/bench_step_gpu_*.json > /dev/null 2>&1 && \
  "$PY" bench/make_results.py "$OUT"/bench_step_gpu_*.json > "$OUT/bench_step_gpu_tables.md" 2>&1
echo "total with the step suites $(( $(date +%s) - START )) s" | tee -a "$OUT/summary.txt"
