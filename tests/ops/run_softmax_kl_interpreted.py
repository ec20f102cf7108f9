"""Runs kernels/softmax_kl.py through Triton's interpreter on CPU tensors, for test_softmax_kl_triton.py.

Usage: TRITON_INTERPRET=1 python run_softmax_kl_interpreted.py CASES.pt RESULTS.pt
A separate process, because Triton fixes interpreted-vs-compiled when a kernel is decorated, and the
rest of a test session (e.g. on a GPU machine) must keep the compiled kernels.
Each case either calls the launchers directly ("launcher") or the CUDA registrations of the custom ops
("registration": task-dim flattening included); results hold the forward and backward outputs.
"""
import importlib
import os
import sys

import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    sys.exit("run with TRITON_INTERPRET=1")

from gessl_ext.ops._backends import triton_kernel  # noqa: E402

softmax_kl_module = importlib.import_module("gessl_ext.ops.softmax_kl")


def run_case(kernel, case):
    z1, z2, t1, t2, grad, temperature = (case[k] for k in ("z1", "z2", "t1", "t2", "grad", "temperature"))
    if case["mode"] == "launcher":
        loss, lse, target_lse = kernel.softmax_kl_forward(z1, z2, t1, t2, temperature, softmax_kl_module.NORM_EPS)
        dz1, dz2 = kernel.softmax_kl_backward(grad, z1, z2, t1, t2, temperature, softmax_kl_module.NORM_EPS, lse,
                                              target_lse)
    else:
        loss, lse, target_lse = softmax_kl_module._forward_cuda(z1, z2, t1, t2, temperature)
        dz1, dz2 = softmax_kl_module._backward_cuda(grad, z1, z2, t1, t2, temperature, lse, target_lse)
    return dict(loss=loss, lse=lse, target_lse=target_lse, dz1=dz1, dz2=dz2)


def main(cases_path, results_path):
    kernel, reason = triton_kernel("softmax_kl")
    if kernel is None:
        sys.exit(f"cannot load the Triton kernel: {reason}")
    cases = torch.load(cases_path)
    torch.save([run_case(kernel, case) for case in cases], results_path)


if __name__ == "__main__":
    main(*sys.argv[1:3])
