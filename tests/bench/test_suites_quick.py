"""The benchmark suites in quick mode, so CI keeps their code alive (no timing is asserted).

One subprocess (the CPU suite calls retain_freed_memory(), a process-wide malloc setting), one intra-op
thread (--quick times nothing; two spinning threads on a busy 2-core machine made this run 10-20x slower).
The GPU suite is skipped without CUDA: only the CPU step suite and the ops suite's CPU variants run here.
"""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SUITES = ["bench/bench_step.py", "bench/bench_ops.py", "bench/bench_step_gpu.py"]
CPU_SUITES = SUITES[:2]
# the only reasons a case of the CPU step suite or the ops suite may be skipped
EXPECTED_SKIPS = ("needs a CUDA device", "copy has a single implementation", "--quick: N <= 256")


def test_benchmark_suites_run_in_quick_mode():
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", *SUITES, "--quick", "--benchmark-disable"],
                          cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    lines = done.stdout.splitlines()
    passed = [line.split()[1].split("::")[0] for line in lines if line.startswith("PASSED ")]
    skipped = [line.split(" ", 2)[2] for line in lines if line.startswith("SKIPPED ")]  # "path:line: reason"
    # every case that can run here ran and passed: each CPU suite ran, the rest skipped for want of CUDA
    assert all(passed.count(suite) >= 1 for suite in CPU_SUITES), lines[-40:]
    assert all(entry.split(": ", 1)[1] in EXPECTED_SKIPS for entry in skipped
               if entry.split(":")[0] in CPU_SUITES), skipped
