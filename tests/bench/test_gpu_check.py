"""bench/gpu_check.sh end to end without a GPU: the dry run that CI can afford (about 10 s).

Every GPU stage must be reported as skipped, the CPU stages must pass, and OUT_DIR must hold exactly
summary.txt and one archive with the logs (the GPU machine hands back only a few files).
"""
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_check.sh"
CPU_STAGES = ("env", "selfcheck")
GPU_STAGES = ("build", "kernels_info", "tests_cuda", "sanitizer_memcheck", "sanitizer_racecheck", "bench_ops",
              "bench_step_targets", "profile_step", "memory_meter")

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU this would be the real 9-minute run")


def dry_run(out, **env):
    environment = dict(os.environ, PYTHON=sys.executable, **env)
    environment.pop("GPU_CHECK_FORCE_BUILD", None)
    done = subprocess.run(["bash", str(SCRIPT), str(out)], env=environment, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.tar.gz", "summary.txt"]
    lines = (out / "summary.txt").read_text().splitlines()
    stages = {line.split(":")[0]: line.split(":", 1)[1].strip() for line in lines[1:-1]}
    with tarfile.open(out / "gpu_check.tar.gz") as archive:
        archived = {Path(name).name for name in archive.getnames()}
    return lines, stages, archived


def test_dry_run_skips_every_gpu_stage_and_writes_one_archive(tmp_path):
    lines, stages, archived = dry_run(tmp_path / "out")
    assert "CUDA device: no" in lines[0]
    assert list(stages) == [*CPU_STAGES, *GPU_STAGES]
    for name in CPU_STAGES:
        assert stages[name].startswith("rc=0 "), (name, stages[name])
    for name in GPU_STAGES:
        assert stages[name].startswith("skipped ("), (name, stages[name])
    assert lines[-1].startswith("total ") and lines[-1].endswith("of 540 s")
    assert {"summary.txt", "env.log", "selfcheck.log", "sanitize_ops.py"} <= archived


def test_a_spent_budget_skips_stages_but_still_writes_the_archive(tmp_path):
    lines, stages, archived = dry_run(tmp_path / "out", GPU_CHECK_BUDGET_S="25")
    assert stages["env"] == stages["selfcheck"] == "skipped (time budget spent)"
    assert "summary.txt" in archived and "env.log" not in archived
