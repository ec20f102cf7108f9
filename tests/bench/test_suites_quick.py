"""The benchmark suites in quick mode, so CI keeps their code alive (no timing is asserted)."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SUITES = ["bench/bench_step.py", "bench/bench_ops.py", "bench/bench_step_gpu.py"]


def test_benchmark_suites_run_in_quick_mode():
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", *SUITES, "--quick", "--benchmark-disable"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    summary = done.stdout.strip().splitlines()[-1]
    passed = int(summary.split(" passed")[0].split()[-1])
    assert passed >= 16, summary  # 5 CPU step cases, the GPU suite's CPU-runnable checks, the ops suite
