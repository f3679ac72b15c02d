"""The Triton kernels compile for an H100 (sm_90) without a GPU, with 64-bit index arithmetic.

The interpreter runs kernels as numpy code, so it accepts things the compiler rejects (a plain
Python float read as a global inside a kernel, for one) and it never shows the integer width of
the offsets. Here each kernel goes through Triton's real pipeline for a CUDA target (TTIR ... cubin;
ptxas ships with triton), and the TTIR must hold no 32-bit multiplication: every ``row * stride``
or ``col * H`` is int64, so N*V, N*H or V*H past 2**31 elements cannot wrap around. That is the
int64 shape test that allocates nothing: the offsets are checked symbolically.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia.compiler")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from hkd.kernels import fused_linear_kl, softmax_kl, sparse_kl  # noqa: E402

H100 = GPUTarget("cuda", 90, 32)
FLOATS = {"inv_t", "beta", "log_beta", "log_1mbeta", "soft_w", "grad_w", "alpha"}
INTS = {"ids_ptr": "*i64", "labels_ptr": "*i64"}


def signature(fn, pointers: dict[str, str], constants: dict[str, object]) -> dict[str, str]:
    sig = {}
    for name in fn.arg_names:
        if name in constants:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = pointers.get(name, INTS.get(name, "*fp32"))
        else:
            sig[name] = "fp32" if name in FLOATS else "i32"  # strides, sizes: 32-bit as launched for small shapes
    return sig


CASES = {
    "softmax_kl forward": (softmax_kl._forward_kernel, {"s_ptr": "*bf16", "t_ptr": "*bf16", "labels_ptr": "*i64"},
                           {"KIND": 0, "HAS_LABELS": True, "HAS_CE": True, "BLOCK_V": 4096}),
    "softmax_kl backward": (softmax_kl._backward_kernel, {"s_ptr": "*bf16", "t_ptr": "*bf16", "g_ptr": "*bf16",
                                                          "labels_ptr": "*i64"},
                            {"KIND": 2, "HAS_LABELS": True, "HAS_CE": True, "BLOCK_V": 4096}),
    # the skew kinds' branches (second sweep, ratio terms); their fused-kernel branches compile too
    # (checked by hand: 14 s each, too slow for the suite)
    "softmax_kl forward (skew KL)": (softmax_kl._forward_kernel, {"s_ptr": "*bf16", "t_ptr": "*bf16",
                                                                  "labels_ptr": "*i64"},
                                     {"KIND": 3, "HAS_LABELS": True, "HAS_CE": True, "BLOCK_V": 4096}),
    "softmax_kl backward (skew reverse KL)": (softmax_kl._backward_kernel, {"s_ptr": "*bf16", "t_ptr": "*bf16",
                                                                            "g_ptr": "*bf16", "labels_ptr": "*i64"},
                                              {"KIND": 4, "HAS_LABELS": True, "HAS_CE": True, "BLOCK_V": 4096}),
    "fused_linear_kl bf16 tiles": (fused_linear_kl.fused_linear_kl_kernel,
                                   {p: "*bf16" for p in ("hs_ptr", "ws_ptr", "ht_ptr", "wt_ptr", "bs_ptr", "bt_ptr")}
                                   | {"labels_ptr": "*i64"},
                                   {"KIND": 1, "HAS_LABELS": True, "HAS_CE": True, "HAS_WEIGHT": True, "HAS_BS": True,
                                    "HAS_BT": True, "NEED_GRAD": True, "UPCAST": False, "PRECISION": "tf32",
                                    "BLOCK_M": 32, "BLOCK_V": 128, "BLOCK_K": 64}),
    "sparse forward (bucket tail)": (sparse_kl._sparse_forward_kernel, {"s_ptr": "*bf16"},
                                     {"TAIL": True, "HAS_LABELS": True, "HAS_CE": True, "BLOCK_V": 1024, "BLOCK_K": 64}),
    "sparse fix-up": (sparse_kl._sparse_fix_kernel, {"s_ptr": "*bf16", "g_ptr": "*bf16"},
                      {"HAS_LABELS": True, "HAS_CE": True, "BLOCK_K": 64}),
}


def compile_case(case: str) -> dict[str, object]:
    """Compile one case (needs ``TRITON_INTERPRET`` unset: interpreted kernels cannot be compiled)."""
    fn, pointers, constants = CASES[case]
    compiled = triton.compile(ASTSource(fn, signature(fn, pointers, constants), constants), target=H100,
                              options={"num_warps": 8})
    ttir = compiled.asm["ttir"]
    return {"cubin": bool(compiled.asm.get("cubin")),
            "i32_mul": [line.strip() for line in ttir.splitlines()
                        if re.search(r"arith\.muli .*: (tensor<[0-9x]*xi32>|i32)\b", line)],
            "i64_mul": bool(re.search(r"arith\.muli .*: i64", ttir))}


# catches: kernels that only run under the interpreter (non-constexpr globals, invalid dot shapes or
# dtypes for sm_90) and int32 offset arithmetic (row * stride overflowing at 2**31 elements)
def test_compiles_for_h100_with_int64_offsets():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import json; from tests.kernels.test_compile import CASES, compile_case; "
            "print(json.dumps({c: compile_case(c) for c in CASES}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).parents[2], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for case, got in results.items():
        assert got == {"cubin": True, "i32_mul": [], "i64_mul": True}, case
