#!/usr/bin/env bash
# The GPU acceptance run of gessl_ext, in ONE call of at most 9 minutes on a machine with one NVIDIA GPU
# and no network (torch, triton, nvcc, pytest and pytest-benchmark already installed):
#
#   bash bench/gpu_check.sh OUT_DIR
#
# OUT_DIR receives exactly two files (a machine that hands back only a few files gets everything):
#   summary.txt        one line per stage: rc and seconds used of its limit, or "skipped" and why; the total
#   gpu_check.tar.gz   every stage's log, the pytest-benchmark JSON and their markdown digests, the junit
#                      XML of the CUDA tests, the profile table, and summary.txt
#
# Stages, in order (cap in seconds). Each runs under min(cap, time left - 30 s kept for the archive) and is
# skipped when that is under 10 s; a failing stage does not stop the next one, and the whole run, archive
# included, stays under GPU_CHECK_BUDGET_S (default 540). The caps add up to more than the budget: the
# stages at the end get what the earlier ones leave (measured on an H200: see bench/RESULTS.md).
#   env                  20  GPU, driver, nvcc, Python, torch, Triton, pip, setuptools, commit, date
#   selfcheck            20  the Python helpers of the later stages compile (also without a GPU)
#   build               240  csrc/ compiled offline: GESSL_EXT_BUILD_CUDA=1 pip install --no-build-isolation
#                            --no-deps -e . (editable, so gessl_ext/_C*.so lands in this tree, which is what
#                            the tests and benchmarks below import: pytest puts the repository first on sys.path)
#   kernels_info         30  every op on its fast backend (softmax_kl: triton; fd_perturb: cuda)
#   tests_cuda          120  pytest tests -m cuda (sized to finish in about 60 s on an H200; see tests/ops)
#   sanitizer_memcheck   60  compute-sanitizer memcheck of the C++ ops (caching allocator off)
#   sanitizer_racecheck  40  compute-sanitizer racecheck of the C++ ops (shared-memory reductions)
#   bench_ops            90  bench/bench_ops.py -m target (fused head vs eager; bandwidth of the C++ ops)
#   bench_step_targets  200  bench/bench_step_gpu.py -m "target and not compile" (stopped with SIGINT 15 s
#                            before its limit, so the JSON of the finished benchmarks is still written)
#   profile_step         60  bench/profile_step_gpu.py: top CUDA kernels of one default step, bf16 and tf32
#   memory_meter         45  only if bench/memory_meter.py exists: its peak of one default step on CUDA
#                            next to torch.cuda.max_memory_allocated
#
# Without a CUDA device (a dry run of this script, e.g. in CI) env and selfcheck run and every GPU stage is
# reported as skipped; GPU_CHECK_FORCE_BUILD=1 runs the build stage anyway (a compile check: set CUDA_HOME
# and TORCH_CUDA_ARCH_LIST, about 3 minutes on 2 cores). PYTHON selects the interpreter (default: python).
set -u
OUT=${1:?usage: bash bench/gpu_check.sh OUT_DIR}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO" || exit 1
PY=${PYTHON:-python}
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-540}
RESERVE=30  # kept back for the benchmark digests and the archive
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
SUMMARY="$WORK/summary.txt"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PATH="$CUDA_HOME/bin:$PATH" PYTHONUNBUFFERED=1 PYTHONPATH="$REPO:$REPO/bench${PYTHONPATH:+:$PYTHONPATH}"
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1  # no network: never let pip wait on an index
HAVE_CUDA=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)
echo "gpu_check $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo '?') budget ${BUDGET} s," \
  "CUDA device: $([ "$HAVE_CUDA" = 1 ] && echo yes || echo no)" > "$SUMMARY"

note() { echo "$1" | tee -a "$SUMMARY"; }

# stage NAME CAP COMMAND... : runs COMMAND (stdout + stderr to WORK/NAME.log) under its time limit.
stage() {
  local name=$1 cap=$2 left limit t0 rc
  shift 2
  left=$(( BUDGET - RESERVE - ($(date +%s) - START) - 5 ))  # 5: timeout's --kill-after grace
  limit=$(( cap < left ? cap : left ))
  if (( limit < 10 )); then
    note "$name: skipped (time budget spent)"
    return
  fi
  t0=$(date +%s)
  timeout --kill-after=5 "$limit" "$@" > "$WORK/$name.log" 2>&1
  rc=$?
  note "$name: rc=$rc$( ((rc == 124 || rc == 137)) && echo ' (timed out)') ($(( $(date +%s) - t0 )) s of ${limit} s)"
}

# gpu_stage NAME CAP COMMAND... : a stage that needs the CUDA device.
gpu_stage() {
  if [ "$HAVE_CUDA" != 1 ]; then
    note "$1: skipped (no CUDA device)"
    return
  fi
  stage "$@"
}

# Python helpers of the stages below, written to WORK (they travel in the archive).
cat > "$WORK/kernels_info_check.py" <<'EOF'
"""Exit 1 unless every op of gessl_ext runs its fast backend on CUDA tensors."""
import sys

from gessl_ext import ops

info = ops.kernels_info()
print(info)
print(ops.kernels_summary())
slow = sorted(op for op, backend in info.items() if backend == "torch")
if slow:
    sys.exit(f"on the PyTorch fallback: {', '.join(slow)}")
EOF
cat > "$WORK/sanitize_ops.py" <<'EOF'
"""A small workload over every C++/CUDA kernel of gessl_ext, for compute-sanitizer: all dtypes, one and
several rows, aligned (16-byte packed path) and unaligned (scalar path) buffers, ragged and empty rows."""
import sys

import torch

from gessl_ext.ops import _backends

extension = _backends.EXTENSION
if extension is None:
    sys.exit(f"no extension to check: {_backends.EXTENSION_ERROR}")
generator = torch.Generator("cuda").manual_seed(0)
for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
    for rows, p, offset in ((1, 1, 0), (3, 1025, 1), (2, 4099, 0), (1, 1 << 16, 0), (2, 0, 0)):
        def draw():
            flat = torch.randn(rows * p + offset, generator=generator, device="cuda").to(dtype)
            return flat[offset:].view(rows, p)
        extension.fd_perturb(draw(), draw(), 0.01)
torch.cuda.synchronize()
print("sanitizer workload done")
EOF
cat > "$WORK/bench_digest.py" <<'EOF'
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
cat > "$WORK/memory_meter_check.py" <<'EOF'
"""bench/memory_meter.py's peak of one default step (ResNet-18 32 px, M = 8, N = 32, fd, tf32) on CUDA, next
to the caching allocator's peak over the same step (which also counts kernel scratch and rounding)."""
import torch

from memory_meter import MemoryMeter
from workloads import Workload, build

workload = Workload("resnet18", 3, 32, num_tasks=8, task_size=32)
model, run = build(workload, "gessl", "fd", "cuda")
views = workload.views("cuda")
torch.backends.cudnn.benchmark = True
run(views)  # warm-up: cudnn autotuning, lazy imports
model.zero_grad(set_to_none=True)
torch.cuda.synchronize()
torch.cuda.reset_peak_memory_stats()
before = torch.cuda.memory_allocated()
with MemoryMeter() as meter:
    run(views)
torch.cuda.synchronize()
allocator = torch.cuda.max_memory_allocated() - before
print(f"{workload.name} fd tf32: meter peak {meter.peak_bytes / 2**20:.1f} MiB, "
      f"torch.cuda.max_memory_allocated peak {allocator / 2**20:.1f} MiB, ratio {meter.peak_bytes / allocator:.3f}")
EOF

stage env 20 bash -c "
  if command -v nvidia-smi > /dev/null; then nvidia-smi; else echo 'nvidia-smi: not found'; fi
  if command -v nvcc > /dev/null; then nvcc --version; else echo 'nvcc: not found'; fi
  '$PY' -c 'import sys, torch; print(\"python\", sys.version.split()[0], \"torch\", torch.__version__, \"cuda\", torch.version.cuda,
    torch.cuda.get_device_name() if torch.cuda.is_available() else \"no CUDA device\")'
  '$PY' -c 'import triton; print(\"triton\", triton.__version__)' || true
  '$PY' -m pip --version; '$PY' -c 'import setuptools; print(\"setuptools\", setuptools.__version__)'
  git log -1 --format='commit %H %cd' 2>/dev/null || true
  date -u"

stage selfcheck 20 "$PY" -c 'import sys; [compile(open(f).read(), f, "exec") for f in sys.argv[1:]]; print("compiled", *sys.argv[1:])' \
  "$WORK"/*.py bench/bench_ops.py bench/bench_step_gpu.py bench/profile_step_gpu.py

if [ "$HAVE_CUDA" = 1 ]; then
  ARCH=${TORCH_CUDA_ARCH_LIST:-$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}
  stage build 240 env GESSL_EXT_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="${MAX_JOBS:-8}" \
    "$PY" -m pip install --no-build-isolation --no-deps -v -e .
elif [ "${GPU_CHECK_FORCE_BUILD:-0}" = 1 ]; then
  stage build 240 env GESSL_EXT_BUILD_CUDA=1 "$PY" -m pip install --no-build-isolation --no-deps -v -e .
else
  note "build: skipped (no CUDA device; GPU_CHECK_FORCE_BUILD=1 compiles anyway)"
fi

gpu_stage kernels_info 30 "$PY" "$WORK/kernels_info_check.py"

gpu_stage tests_cuda 120 env GESSL_EXT_EXPECT_KERNELS=1 "$PY" -m pytest tests -m cuda -q -rs -p no:cacheprovider \
  --durations=10 --junitxml="$WORK/tests_cuda.xml"

SANITIZER=$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")
# Without the caching allocator every tensor is its own allocation, so out-of-bounds accesses show.
gpu_stage sanitizer_memcheck 60 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
  "$SANITIZER" --tool memcheck --error-exitcode 1 "$PY" "$WORK/sanitize_ops.py"
gpu_stage sanitizer_racecheck 40 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
  "$SANITIZER" --tool racecheck --error-exitcode 1 "$PY" "$WORK/sanitize_ops.py"

gpu_stage bench_ops 90 "$PY" -m pytest bench/bench_ops.py -m target -q -p no:cacheprovider \
  --benchmark-json="$WORK/bench_ops.json" --benchmark-max-time=0.5 --benchmark-min-rounds=5 \
  --benchmark-columns=min,median,max,rounds

# The inner timeout interrupts pytest 15 s before the stage's own limit (limit = the cap when time allows).
left=$(( BUDGET - RESERVE - ($(date +%s) - START) - 5 ))
cap=$(( left < 200 ? left : 200 ))
gpu_stage bench_step_targets 200 timeout --signal=INT $(( cap > 30 ? cap - 15 : 15 )) \
  "$PY" -m pytest bench/bench_step_gpu.py -m "target and not compile" -v -p no:cacheprovider \
  --benchmark-json="$WORK/bench_step_targets.json" --benchmark-columns=min,median,max,rounds

gpu_stage profile_step 60 bash -c "set -o pipefail; '$PY' bench/profile_step_gpu.py --precision bf16 tf32 --top 25 \
  | tee '$WORK/profile_step_gpu.md'"

if [ -f bench/memory_meter.py ]; then
  gpu_stage memory_meter 45 "$PY" "$WORK/memory_meter_check.py"
else
  note "memory_meter: skipped (bench/memory_meter.py not in this tree)"
fi

for json in "$WORK"/bench_*.json; do
  [ -f "$json" ] && timeout 10 "$PY" "$WORK/bench_digest.py" "$json" > "${json%.json}.md" 2>&1
done
note "total $(( $(date +%s) - START )) s of ${BUDGET} s"
tar -czf "$OUT/gpu_check.tar.gz" -C "$WORK" . && cp "$SUMMARY" "$OUT/summary.txt"
rm -rf "$WORK"
