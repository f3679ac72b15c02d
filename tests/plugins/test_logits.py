import functools

import pytest
import torch
import torch.nn.functional as F

from hkd import ModelView, SparseTargets, StageContext, StepState, TapRequest
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


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@functools.cache
def tiny_models():
    return models()


MODES = ["torch", "chunked", "triton", "fused:chunked", "fused:triton", "sparse"]


class Masked:
    """A batch with prompts (label -100) and right padding, and random teacher/student inputs for
    one stage mode: logits, final hidden states + LM heads (fused), or top-k targets (sparse, k = V)."""

    VOCAB, HIDDEN = 97, 8

    def __init__(self, mode: str):
        self.mode, self.fused, self.sparse = mode, mode.startswith("fused"), mode == "sparse"
        self.batch = batch(("12+34=", "7+8=", "9+1="), ("46", "15 ok", "10"))
        labels, attention = self.batch["labels"][:, 1:], self.batch["attention_mask"][:, 1:].bool()
        assert (labels < self.VOCAB).all()
        pad_column = torch.zeros(labels.shape[0], 1, dtype=torch.bool)  # the last position predicts nothing
        # positions i (predicting token i + 1) whose target is a completion token, a prompt token, or padding
        self.completion = torch.cat([labels != -100, pad_column], 1)
        self.prompt = torch.cat([attention & (labels == -100), pad_column], 1)
        self.padding = ~(self.completion | self.prompt)
        assert self.prompt.sum() >= 10 and self.padding.sum() >= 4 and self.completion.sum() >= 8
        gen = torch.Generator().manual_seed(0)
        width = self.HIDDEN if self.fused else self.VOCAB
        shape = (*self.batch["input_ids"].shape, width)
        self.teacher = torch.randn(shape, generator=gen) * 2
        self.student = (torch.randn(shape, generator=gen) * 2).requires_grad_()
        self.heads = [torch.nn.Linear(self.HIDDEN, self.VOCAB).to(DEVICE) for _ in range(2)]  # teacher's, student's
        backend = None if self.sparse else mode.split(":")[-1]
        serves = TapRequest(sparse_logits=True) if self.sparse else TapRequest(logits=True, final_hidden=True)
        teacher, student = tiny_models()  # the stage looks at them when built; the loss sees only the views
        context = StageContext("x", teacher, student, {}, "stages.x", teacher_serves=serves)
        self.stage = LogitsStage(LogitsStageConfig(alpha=0.3, fused=self.fused, backend=backend), context)
        self.tokens = int(self.batch["loss_mask"].sum())

    def loss(self, teacher: torch.Tensor, student: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
        """The stage's loss on the test device (the Triton kernels run compiled there when it is CUDA)."""
        teacher, student = teacher.to(DEVICE), student.to(DEVICE)
        if self.fused:
            t_view = ModelView(final_hidden=teacher, lm_head=self.heads[0])
            s_view = ModelView(final_hidden=student, lm_head=self.heads[1])
        elif self.sparse:
            values, ids = teacher.topk(self.VOCAB, dim=-1)
            t_view, s_view = ModelView(sparse=SparseTargets(ids=ids, values=values)), ModelView(logits=student)
        else:
            t_view, s_view = ModelView(logits=teacher), ModelView(logits=student)
        state = StepState(step=0, temperature=temperature, tokens=self.tokens)
        batch_on_device = {k: v.to(DEVICE) for k, v in self.batch.items()}
        return self.stage.loss(batch_on_device, t_view, s_view, state)["logits"]

    def logits64(self, x: torch.Tensor, role: int) -> torch.Tensor:
        if not self.fused:
            return x.detach().double()
        head = self.heads[role]
        return x.detach().double() @ head.weight.detach().double().cpu().T + head.bias.detach().double().cpu()

    def reference(self, positions: torch.Tensor, targets: torch.Tensor, temperature: float = 2.0) -> float:
        """(1 - alpha) T^2 KL(teacher_T || student_T) + alpha CE, in fp64, summed over ``positions`` only."""
        t, s = self.logits64(self.teacher, 0)[positions], self.logits64(self.student, 1)[positions]
        log_pt, log_ps = (t / temperature).log_softmax(-1), (s / temperature).log_softmax(-1)
        soft = (log_pt.exp() * (log_pt - log_ps)).sum(-1) * temperature**2
        hard = F.cross_entropy(s, targets[positions], reduction="none")
        return float((0.7 * soft + 0.3 * hard).sum())


def perturbed(x: torch.Tensor, where: torch.Tensor, seed: int) -> torch.Tensor:
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)) * 5
    return (x + noise * where[..., None]).detach()


# catches: prompt tokens (label -100 inside the attention mask) or padding counted as targets,
# labels not shifted by one against the logits, teacher or student values at ignored positions
# leaking into the loss or the gradient; in every mode (logits, fused LM head, top-k targets)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning", "ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("mode", MODES)
def test_only_completion_positions_count(mode):
    m = Masked(mode)
    next_tokens = torch.cat([m.batch["input_ids"][:, 1:], m.batch["input_ids"][:, :1]], 1)
    loss = m.loss(m.teacher, m.student)
    assert loss.item() == pytest.approx(m.reference(m.completion, next_tokens) / m.tokens, rel=1e-5)
    # the same sum with the prompt mask ignored (every real next token a target) is far off
    assert abs(loss.item() - m.reference(m.completion | m.prompt, next_tokens) / m.tokens) > 0.2 * loss.item()

    loss.backward()
    grad = m.student.grad.abs().sum(-1)
    assert (grad[m.prompt | m.padding] == 0).all() and (grad[m.completion] > 0).all()

    ignored = m.prompt | m.padding
    with torch.no_grad():
        assert m.loss(perturbed(m.teacher, ignored, 1), m.student).item() == pytest.approx(loss.item(), rel=1e-6)
        assert m.loss(m.teacher, perturbed(m.student, ignored, 2)).item() == pytest.approx(loss.item(), rel=1e-6)
        first_completion = torch.zeros_like(m.completion)  # one position: the first completion token of row 0
        first_completion[0, int(m.completion[0].nonzero()[0])] = True
        assert abs(m.loss(perturbed(m.teacher, first_completion, 3), m.student).item() - loss.item()) > 1e-3 * loss.item()


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


def test_sparse_tail_with_a_live_teacher_is_refused_by_name():
    # catches: an option that silently does nothing (the user believes the tail bucket is in use)
    from hkd.config import ConfigError
    from hkd.plugins.logits import LogitsStage, LogitsStageConfig
    from tests.plugins.helpers import context, models

    teacher, student = models()
    with pytest.raises(ConfigError, match=r"stages.logits.sparse_tail: 'bucket' applies to top-k targets"):
        LogitsStage(LogitsStageConfig(sparse_tail="bucket"), context(teacher, student, "logits"))
    assert LogitsStage(LogitsStageConfig(), context(teacher, student, "logits")).sparse_tail == "renormalize"
