"""The Triton source of the fused head KL, run on the CPU by Triton's interpreter (TRITON_INTERPRET=1).

All cases run in one subprocess (run_softmax_kl_interpreted.py); each test then compares one case's
outputs with the float64 PyTorch reference: loss, the per-row log-sum-exps of the current and the
target head, and both gradients. The launchers fill their outputs with NaN first, so an unwritten element fails.
Sizes are small because the interpreter is slow; they still cover ragged tiles (N, d not multiples of
the block sizes), d = 1, wide rows (d = 257 -> 512-wide tiles), zero rows, and bf16/fp16.
"""
import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ops_testing import RTOL, assert_close_rel, gradient_scale, randn

softmax_kl_module = importlib.import_module("gessl_ext.ops.softmax_kl")
TAU = 0.5
REPO_ROOT = Path(softmax_kl_module.__file__).resolve().parents[2]
RUNNER = Path(__file__).with_name("run_softmax_kl_interpreted.py")

# (batch shape, N, d, dtype, rows, entry point); d = 1 twice: there the exact gradient is 0 (see
# ops_testing.gradient_scale) and small |z| make the rounding of the normalisation's backward largest.
CASES = [
    ((2,), 2, 1, torch.float32, "random", "launcher"),
    ((1,), 300, 1, torch.float32, "random", "launcher"),
    ((1,), 3, 5, torch.float32, "random", "launcher"),
    ((2,), 17, 5, torch.float32, "random", "launcher"),
    ((1,), 64, 128, torch.float32, "random", "launcher"),
    ((1,), 300, 5, torch.float32, "random", "launcher"),
    ((1,), 17, 257, torch.float32, "random", "launcher"),
    ((2,), 17, 5, torch.bfloat16, "random", "launcher"),
    ((1,), 33, 16, torch.bfloat16, "random", "launcher"),
    ((1,), 17, 5, torch.float16, "random", "launcher"),
    ((1,), 5, 3, torch.float32, "zero-row", "launcher"),
    ((2, 2), 9, 4, torch.float32, "random", "registration"),
]
CASE_IDS = [f"{'x'.join(map(str, b))}-N{n}-d{d}-{str(t).split('.')[-1]}-{v}-{m}" for b, n, d, t, v, m in CASES]


def make_case(generator, batch, n, d, dtype, rows, mode):
    z1, z2, t1, t2 = (randn((*batch, n, d), generator, dtype) for _ in range(4))
    if rows == "zero-row":
        z1[..., 1, :] = 0.0
    case = dict(z1=z1, z2=z2, t1=t1, t2=t2, grad=randn(batch, generator), temperature=TAU, mode=mode)
    if mode == "launcher":
        case["grad"] = case["grad"].reshape(-1)
    return case


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """(cases, results) of one interpreter run over CASES."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    generator = torch.Generator().manual_seed(7)
    cases = [make_case(generator, *spec) for spec in CASES]
    folder = tmp_path_factory.mktemp("softmax_kl_interpreted")
    cases_path, results_path = folder / "cases.pt", folder / "results.pt"
    torch.save(cases, cases_path)
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, str(RUNNER), str(cases_path), str(results_path)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"interpreter run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return cases, torch.load(results_path)


@pytest.mark.parametrize("index", range(len(CASES)), ids=CASE_IDS)
def test_interpreted_kernel_matches_reference(interpreted, index):
    cases, results = interpreted
    case, result = cases[index], results[index]
    dtype = case["z1"].dtype
    wide = [case[k].double().requires_grad_() for k in ("z1", "z2")]
    want_loss, want_lse, want_target_lse = softmax_kl_module._reference_forward(
        *wide, case["t1"].double(), case["t2"].double(), TAU)
    batch = case["z1"].shape[:-2]
    grad = case["grad"].double().reshape(batch)
    want_dz = torch.autograd.grad((want_loss * grad).sum(), wide)

    stat_shape = (-1, 2, case["z1"].shape[-2]) if case["mode"] == "launcher" else want_lse.shape
    assert_close_rel(result["loss"].reshape(batch), want_loss, RTOL[dtype], what="loss")
    # Row statistics come from exact products of the inputs with fp32 accumulation, at any input dtype.
    assert_close_rel(result["lse"], want_lse.detach().reshape(stat_shape), RTOL[torch.float32], what="lse")
    assert_close_rel(result["target_lse"], want_target_lse.reshape(stat_shape), RTOL[torch.float32],
                     what="target_lse")
    scale = gradient_scale(case["z1"], case["z2"], case["t1"], case["t2"], TAU, grad)
    for name, want in zip(("dz1", "dz2"), want_dz):
        assert result[name].dtype == dtype
        assert_close_rel(result[name].reshape(want.shape), want, RTOL[dtype], floor=scale, what=name)
