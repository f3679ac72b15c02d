"""The logits stage's skew divergences (DistiLLM's skew KL / skew reverse KL), end to end on tiny models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hkd.config import ConfigError
from hkd.plugins.logits import LogitsStage, LogitsStageConfig

from .helpers import batch, context, models, run_stage


def reference(teacher, student, b, temperature, alpha, divergence, skew):
    """Per-token loss in fp64 from probabilities, normalised by the real target tokens."""
    with torch.no_grad():
        t = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].double()
        s = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].double()
    labels = b["labels"][:, 1:]
    mask = labels != -100
    q, p = torch.softmax(t / temperature, -1), torch.softmax(s / temperature, -1)
    first, m = (q, skew * q + (1 - skew) * p) if divergence == "skew_forward_kl" else (p, skew * p + (1 - skew) * q)
    soft = (first * (first.log() - m.log())).sum(-1) * temperature**2
    hard = F.cross_entropy(s.transpose(1, 2), labels.clamp_min(0), reduction="none")
    return (((1 - alpha) * soft + alpha * hard) * mask).sum() / mask.sum()


# catches: the stage not passing its skew option to the kernel (the default 0.1 would be used), the
# divergence name not reaching the kernel, or the fused path dropping skew
@pytest.mark.parametrize("divergence", ["skew_forward_kl", "skew_reverse_kl"])
@pytest.mark.parametrize("fused", [False, True])
def test_matches_an_fp64_reference(divergence, fused):
    teacher, student = models()
    config = LogitsStageConfig(divergence=divergence, skew=0.3, alpha=0.2, fused=fused, backend="chunked")
    stage = LogitsStage(config, context(teacher, student))
    b = batch()
    loss = run_stage(stage, teacher, student, b, temperature=2.0)["logits"]
    assert loss.item() == pytest.approx(reference(teacher, student, b, 2.0, 0.2, divergence, 0.3).item(), rel=1e-4)


@pytest.mark.parametrize("bad", [1.0, -0.5, float("nan")])
def test_skew_outside_its_range_is_a_config_error_naming_the_option(bad):
    teacher, student = models()
    with pytest.raises(ConfigError, match=r"stages\.x\.skew: must be in \[0, 1\), got"):
        LogitsStage(LogitsStageConfig(divergence="skew_reverse_kl", skew=bad), context(teacher, student))
