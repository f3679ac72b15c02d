"""The Triton kernels compile for an H100 (sm_90) without a GPU, with 64-bit index arithmetic and
vectorised row loads.

The interpreter runs kernels as numpy code, so it accepts things the compiler rejects (a plain
Python float read as a global inside a kernel, for one) and it never shows the integer width of
the offsets. Here each kernel goes through Triton's real pipeline for a CUDA target (TTIR ... cubin;
ptxas ships with triton), and the TTIR must hold no 32-bit multiplication: every ``row * stride``
or ``col * H`` is int64, so N*V, N*H or V*H past 2**31 elements cannot wrap around. That is the
int64 shape test that allocates nothing: the offsets are checked symbolically.

Pointers are compiled as the launcher specialises 16-byte-aligned tensors, sizes and strides as
numbers with no known divisor (V = 50257): the PTX of a row kernel must then hold 16-byte vector
loads (``ld.global.v4``), which only the peeled body (``softmax_kl._row_split``) gives.
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
INTS = {"ids_ptr": "*i64", "sorted_ptr": "*i64", "labels_ptr": "*i64"}


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


ROW = {"VEC": 8, "PEEL": True}  # bf16 rows read as an aligned body and an edge
CASES = {
    "softmax_kl forward": (softmax_kl._forward_kernel, {"s_ptr": "*bf16", "t_ptr": "*bf16", "labels_ptr": "*i64"},
                           {"KIND": 0, "HAS_LABELS": True, "HAS_CE": True, "BLOCK_V": 4096, **ROW}),
    # the control: the same kernel without peeling reads its rows with 2-byte loads
    "softmax_kl forward (not peeled)": (softmax_kl._forward_kernel, {"s_ptr": "*bf16", "t_ptr": "*bf16",
                                                                     "labels_ptr": "*i64"},
                                        {"KIND": 0, "HAS_LABELS": True, "HAS_CE": True, "BLOCK_V": 4096,
                                         "VEC": 8, "PEEL": False}),
    "softmax_kl backward": (softmax_kl._backward_kernel, {"s_ptr": "*bf16", "t_ptr": "*bf16", "g_ptr": "*bf16",
                                                          "labels_ptr": "*i64"},
                            {"KIND": 2, "HAS_LABELS": True, "HAS_CE": True, "BLOCK_V": 2048, **ROW}),
    # the skew kinds' branches (second sweep, ratio terms); their fused-kernel branches compile too
    # (checked by hand: 14 s each, too slow for the suite)
    "softmax_kl forward (skew KL)": (softmax_kl._forward_kernel, {"s_ptr": "*bf16", "t_ptr": "*bf16",
                                                                  "labels_ptr": "*i64"},
                                     {"KIND": 3, "HAS_LABELS": True, "HAS_CE": True, "BLOCK_V": 4096, **ROW}),
    "softmax_kl backward (skew reverse KL)": (softmax_kl._backward_kernel, {"s_ptr": "*bf16", "t_ptr": "*bf16",
                                                                            "g_ptr": "*bf16", "labels_ptr": "*i64"},
                                              {"KIND": 4, "HAS_LABELS": True, "HAS_CE": True, "BLOCK_V": 2048, **ROW}),
    "fused_linear_kl bf16 tiles": (fused_linear_kl.fused_linear_kl_kernel,
                                   {p: "*bf16" for p in ("hs_ptr", "ws_ptr", "ht_ptr", "wt_ptr", "bs_ptr", "bt_ptr")}
                                   | {"labels_ptr": "*i64"},
                                   {"KIND": 1, "HAS_LABELS": True, "HAS_CE": True, "HAS_WEIGHT": True, "HAS_BS": True,
                                    "HAS_BT": True, "NEED_GRAD": True, "UPCAST": False, "PRECISION": "tf32",
                                    "BLOCK_M": 32, "BLOCK_V": 128, "BLOCK_K": 64}),
    "sparse forward (bucket tail)": (sparse_kl._sparse_forward_kernel, {"s_ptr": "*bf16"},
                                     {"TAIL": True, "HAS_LABELS": True, "HAS_CE": True, "BLOCK_V": 4096,
                                      "BLOCK_K": sparse_kl.BLOCK_K, **ROW}),
    "sparse backward": (sparse_kl._sparse_backward_kernel, {"s_ptr": "*bf16", "g_ptr": "*bf16"},
                        {"TAIL": True, "HAS_LABELS": True, "HAS_CE": True, "BLOCK_V": 2048, **ROW}),
    "sparse fix-up": (sparse_kl._sparse_fix_kernel, {"s_ptr": "*bf16", "g_ptr": "*bf16"},
                      {"HAS_LABELS": True, "HAS_CE": True, "BLOCK_K": sparse_kl.BLOCK_K}),
}
ROW_KERNELS = {"softmax_kl forward", "softmax_kl backward", "softmax_kl forward (skew KL)",
               "softmax_kl backward (skew reverse KL)", "sparse forward (bucket tail)", "sparse backward"}


def compile_case(case: str) -> dict[str, object]:
    """Compile one case (needs ``TRITON_INTERPRET`` unset: interpreted kernels cannot be compiled)."""
    fn, pointers, constants = CASES[case]
    sig = signature(fn, pointers, constants)
    aligned = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name, kind in sig.items() if kind[0] == "*"}
    compiled = triton.compile(ASTSource(fn, sig, constants, aligned), target=H100, options={"num_warps": 8})
    ttir = compiled.asm["ttir"]
    return {"cubin": bool(compiled.asm.get("cubin")),
            "i32_mul": [line.strip() for line in ttir.splitlines()
                        if re.search(r"arith\.muli .*: (tensor<[0-9x]*xi32>|i32)\b", line)],
            "i64_mul": bool(re.search(r"arith\.muli .*: i64", ttir)),
            "vector_loads": len(re.findall(r"ld\.global(?:\.nc)?\.v4\.", compiled.asm["ptx"]))}


# catches: kernels that only run under the interpreter (non-constexpr globals, invalid dot shapes or
# dtypes for sm_90), int32 offset arithmetic (row * stride overflowing at 2**31 elements), and row
# loads left scalar at a vocabulary or row stride that is not a multiple of 16 (V = 50257)
def test_compiles_for_h100_with_int64_offsets_and_vector_loads():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import json; from tests.kernels.test_compile import CASES, compile_case; "
            "print(json.dumps({c: compile_case(c) for c in CASES}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).parents[2], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for case, got in results.items():
        vectors = got.pop("vector_loads")
        assert got == {"cubin": True, "i32_mul": [], "i64_mul": True}, case
        assert (vectors > 0) == (case in ROW_KERNELS), (case, vectors)
