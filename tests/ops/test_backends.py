"""kernels_info / kernels_summary report what this process really uses; the extension, when built,
registers the schemas the op layer calls."""
import importlib.util
import os

import pytest
import torch

from gessl_ext import ops
from gessl_ext.ops import _backends

OPS = ("softmax_kl", "fd_perturb")


def expected_backends():
    if not torch.cuda.is_available():
        return dict.fromkeys(OPS, "torch")
    triton_module, _ = _backends.triton_kernel("softmax_kl")
    extension = "cuda" if _backends.EXTENSION is not None else "torch"
    return {"softmax_kl": "triton" if triton_module is not None else "torch", "fd_perturb": extension}


def test_kernels_info_reports_the_backends_in_use():
    assert ops.kernels_info() == expected_backends()


def test_kernels_summary_is_one_line_naming_every_op_and_its_backend():
    summary = ops.kernels_summary()
    assert "\n" not in summary
    for op, backend in expected_backends().items():
        assert f"{op}={backend}" in summary
    if not torch.cuda.is_available():
        assert "no CUDA device" in summary


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernel_module_loads_from_the_repository_or_the_install():
    module, reason = _backends.triton_kernel("softmax_kl")
    assert module is not None, reason
    assert callable(module.softmax_kl_forward) and callable(module.softmax_kl_backward)
    assert _backends.triton_kernel("no_such_kernel")[0] is None


def test_extension_schemas_match_the_op_layer():
    if _backends.EXTENSION is None:
        pytest.skip(_backends.EXTENSION_ERROR)
    assert str(torch.ops.gessl_ext_C.fd_perturb.default._schema).endswith(
        "fd_perturb(Tensor theta, Tensor u, float radius, bool poison=False) -> (Tensor, Tensor)")
    assert not hasattr(torch.ops.gessl_ext_C, "fd_update")


@pytest.mark.cuda
def test_gpu_check_builds_use_the_fast_backends():
    """bench/gpu_check.sh sets GESSL_EXT_EXPECT_KERNELS=1 after building: there every op must be fast."""
    if os.environ.get("GESSL_EXT_EXPECT_KERNELS") != "1":
        pytest.skip("GESSL_EXT_EXPECT_KERNELS is not set")
    assert ops.kernels_info() == {"softmax_kl": "triton", "fd_perturb": "cuda"}, \
        ops.kernels_summary()
