"""The Triton kernels compile for real GPUs (sm_80, sm_90) with the launchers' tile configurations, and
fit sm_80's shared memory, checked on a machine without a GPU through Triton's ahead-of-time compiler.
(The interpreter tests run the kernel logic; they cannot catch code-generation or resource errors.)"""
import importlib.util

import pytest

pytest.importorskip("triton")
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from gessl_ext.ops._backends import triton_kernel  # noqa: E402

SM80_MAX_SHARED_BYTES = 166912
CASES = [  # (Triton element type, padded feature width)
    ("fp32", 128), ("bf16", 128), ("fp16", 16), ("fp32", 512),
]


def _signature(kernel_fn, element, constexprs):
    def arg_type(name):
        if name in constexprs:
            return "constexpr"
        if name in ("x_ptr", "y_ptr", "ta_ptr", "tb_ptr"):
            return f"*{element}"
        if name.endswith("_ptr"):
            return "*fp32"
        return "fp32" if name == "inv_tau" else "i32"

    return {name: arg_type(name) for name in kernel_fn.arg_names}


@pytest.mark.skipif(importlib.util.find_spec("triton.backends.nvidia") is None, reason="no NVIDIA Triton backend")
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("element,block_d", CASES)
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
def test_kernel_compiles_and_fits_shared_memory(arch, element, block_d, backward):
    kernel, reason = triton_kernel("softmax_kl")
    assert kernel is not None, reason
    kernel_fn = kernel._softmax_kl_bwd_kernel if backward else kernel._softmax_kl_fwd_kernel
    block_m, block_n, num_warps, num_stages = kernel._tile_config(block_d, element != "fp32", backward)
    constexprs = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, PRECISION="tf32x3", UPCAST=False)
    if backward:
        constexprs["SPLIT_H"] = element != "fp32"
    source = ASTSource(fn=kernel_fn, signature=_signature(kernel_fn, element, constexprs),
                       constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    assert ".entry" in compiled.asm["ptx"]
    assert 0 < compiled.metadata.shared <= SM80_MAX_SHARED_BYTES
