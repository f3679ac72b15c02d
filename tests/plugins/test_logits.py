import pytest
import torch
import torch.nn.functional as F

from hkd.config import ConfigError
from hkd.plugins.logits import LogitsStage, LogitsStageConfig

from .helpers import batch, context, models, run_stage


def reference(teacher, student, b, temperature, alpha, divergence="forward_kl", beta=0.5):
    """Per-token soft/hard loss written out in fp64, normalised by the real target tokens."""
    with torch.no_grad():
        t = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].double()
        s = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].double()
    labels = b["labels"][:, 1:]
    mask = labels != -100
    log_pt, log_ps = (t / temperature).log_softmax(-1), (s / temperature).log_softmax(-1)
    pt, ps = log_pt.exp(), log_ps.exp()
    if divergence == "forward_kl":
        soft = (pt * (log_pt - log_ps)).sum(-1)
    elif divergence == "reverse_kl":
        soft = (ps * (log_ps - log_pt)).sum(-1)
    else:
        log_m = (beta * pt + (1 - beta) * ps).log()
        soft = beta * (pt * (log_pt - log_m)).sum(-1) + (1 - beta) * (ps * (log_ps - log_m)).sum(-1)
    soft = soft * temperature**2
    hard = F.cross_entropy(s.transpose(1, 2), labels.clamp_min(0), reduction="none")
    per_token = (1 - alpha) * soft + alpha * hard
    return (per_token * mask).sum() / mask.sum()


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("temperature,alpha", [(1.0, 0.0), (2.0, 0.3)])
def test_matches_an_fp64_reference(divergence, temperature, alpha):
    teacher, student = models()
    stage = LogitsStage(LogitsStageConfig(divergence=divergence, alpha=alpha), context(teacher, student))
    b = batch()
    loss = run_stage(stage, teacher, student, b, temperature=temperature)["logits"]
    expected = reference(teacher, student, b, temperature, alpha, divergence)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)


def test_prompt_and_padding_tokens_are_excluded():
    teacher, student = models()
    stage = LogitsStage(LogitsStageConfig(), context(teacher, student))
    b = batch()
    base = run_stage(stage, teacher, student, b)["logits"].item()
    # changing tokens whose *targets* are masked (the prompt) cannot change the loss
    changed = {k: v.clone() for k, v in b.items()}
    pad = b["attention_mask"] == 0
    changed["input_ids"][pad] = 7
    assert run_stage(stage, teacher, student, changed)["logits"].item() == pytest.approx(base, rel=1e-5)


def test_fused_equals_unfused():
    pytest.importorskip("hkd.kernels.registry")
    teacher, student = models()
    b = batch()
    plain = LogitsStage(LogitsStageConfig(alpha=0.2), context(teacher, student))
    fused = LogitsStage(LogitsStageConfig(alpha=0.2, fused=True), context(teacher, student))
    assert fused.teacher_request().logits is False and fused.teacher_request().final_hidden
    a = run_stage(plain, teacher, student, b, temperature=2.0)["logits"]
    c = run_stage(fused, teacher, student, b, temperature=2.0)["logits"]
    assert c.item() == pytest.approx(a.item(), rel=1e-4)


def test_option_ranges_are_checked():
    teacher, student = models()
    with pytest.raises(ConfigError, match=r"stages\.x\.alpha: must be in \[0, 1\], got 1.5"):
        LogitsStage(LogitsStageConfig(alpha=1.5), context(teacher, student))
