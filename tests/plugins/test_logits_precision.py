"""The logits stage under ``train.precision: bf16-mixed`` (the default on CUDA), run on the CPU: CPU
autocast gives the GPU's dtypes (bf16 activations and teacher, fp32 master weights), and the Triton
kernels run under the interpreter. Every kernel backend, logits and fused LM head, for a few loop
steps against the fp32 run."""

from __future__ import annotations

import copy

import pytest
import torch

from hkd.config import Config, from_dict
from hkd.kernels import fused_linear_kl
from hkd.train.loop import build_run, train_step

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:overflow encountered:RuntimeWarning",
                                        "ignore:All-NaN slice encountered:RuntimeWarning")
STEPS = 3


def losses(raw_config: dict, path, *, fused: bool, backend: str, precision: str) -> tuple[list[float], object]:
    raw = copy.deepcopy(raw_config)
    raw["schedule"] = {"phases": [{"name": "p", "steps": STEPS, "stages": {"logits": 1.0}}]}
    raw["stages"] = {"logits": {"alpha": 0.2, "fused": fused, "backend": backend}}
    raw["train"].update(precision=precision)
    raw["data"].update(batch_size=2, max_length=24)  # 46 rows a step: the interpreter runs a program per row
    raw["optim"]["grad_accum"] = 1
    run = build_run(from_dict(Config, raw), path)
    return [train_step(run, step)["loss"] for step in range(STEPS)], run


# catches: a kernel backend that fails under bf16 autocast (the fused Triton head raised at the first
# step: "expected m1 and m2 to have the same dtype"), one whose losses drift from fp32 (bf16 logits
# in the fused head), and a run that is not mixed at all (identical losses, or bf16 master weights)
@pytest.mark.parametrize("fused, backend", [(False, "torch"), (False, "chunked"), (False, "triton"),
                                            (True, "torch"), (True, "chunked"), (True, "triton"),
                                            (True, "triton:gemm")])
def test_bf16_mixed_losses_track_fp32(raw_config, tmp_path, monkeypatch, fused, backend):
    if backend == "triton:gemm":  # the fused head's CUDA path: library GEMMs + the softmax-KL kernels
        monkeypatch.setattr(fused_linear_kl, "GEMM_PATH", True)
        monkeypatch.setattr(fused_linear_kl, "CHUNK_ROWS", 16)  # several chunks of a step's rows
    name = backend.split(":")[0]
    reference, _ = losses(raw_config, tmp_path / "fp32", fused=fused, backend=name, precision="fp32")
    mixed, run = losses(raw_config, tmp_path / "mixed", fused=fused, backend=name, precision="bf16-mixed")
    # stated tolerance: every step's loss within 0.1% of the fp32 run's (the goal is 3%; measured on these
    # tiny presets: at most 6.6e-5 in every mode)
    assert mixed == pytest.approx(reference, rel=1e-3) and mixed != reference
    assert all(p.dtype == torch.float32 for p in run.student.parameters())
