"""Sparse teacher targets from the offline cache: the top-k tail bucket (exact at the cache temperature),
sampled targets (unbiased), the temperature rules, and hidden-only caches for encoders (issues 16, 17)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from hkd import HkdError, ModelView, SparseTargets, StepState, TapRequest
from hkd.teachers.cache import TeacherCache, build_cache, example_generator, sampled_targets, topk_targets
from hkd.config import Config, from_dict
from hkd.data.encoding import collate, encode_dataset
from hkd.errors import ConfigError
from hkd.kernels import sparse_distill_loss
from hkd.train.loop import distill
from hkd.models.loading import build_preset, load_model, write_preset
from hkd.plugins.logits import LogitsStage, LogitsStageConfig
from hkd.plugin.stage import StageContext
from hkd.models.taps import forward_with_taps

V = 64


def stage(tail: str = "auto", serves_lse: bool = True, backend: str = "torch", alpha: float = 0.0) -> LogitsStage:
    model = build_preset("tiny-llama", {"num_hidden_layers": 1})
    serves = TapRequest(sparse_logits=True, sparse_logsumexp=serves_lse)
    context = StageContext("logits", model, model, {"sparse_distill_loss": backend}, "stages.logits",
                           teacher_serves=serves, teacher_live=False)
    return LogitsStage(LogitsStageConfig(alpha=alpha, sparse_tail=tail), context)  # type: ignore[arg-type]


def as_view_targets(ids: torch.Tensor, values: torch.Tensor, lse: torch.Tensor | None = None, **kw) -> SparseTargets:
    """[N, k] targets as a [1, N + 1, k] view (the stage shifts the view one position left)."""
    pad = torch.nn.functional.pad
    return SparseTargets(pad(ids, (0, 0, 0, 1))[None], pad(values, (0, 0, 0, 1))[None],
                         None if lse is None else pad(lse, (0, 1))[None], **kw)


def bucket_kl64(teacher: torch.Tensor, student: torch.Tensor, ids: torch.Tensor, t: float) -> torch.Tensor:
    """fp64 T^2 KL over the k cached ids plus one tail bucket, both sides from full logits at temperature t."""
    log_q, log_p = (teacher.double() / t).log_softmax(-1), (student.double() / t).log_softmax(-1)
    q_k, p_k = log_q.gather(-1, ids).exp(), log_p.gather(-1, ids).exp()
    q_t, p_t = 1 - q_k.sum(-1), 1 - p_k.sum(-1)
    return t * t * ((q_k * (q_k.log() - p_k.log())).sum(-1) + q_t * (q_t.log() - p_t.log())).sum()


# --------------------------------------------------------------------------- tail bucket


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the Triton interpreter's -inf maths
@pytest.mark.parametrize("backend", ["torch", "chunked", "triton"])
@pytest.mark.parametrize("t", [1.0, 2.0, 0.5])
def test_the_tail_bucket_is_exact_at_the_cache_temperature(backend, t):
    """Catches: the tail mass taken from a T=1 normaliser and re-tempered as if spread evenly (the kernels'
    own T != 1 approximation), a normaliser stored at the wrong temperature, or the tail dropped."""
    gen = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(6, V, generator=gen) * 2, (torch.randn(6, V, generator=gen) * 2).requires_grad_()
    stored = topk_targets(teacher, 8, temperature=t)  # what a cache built at t holds
    ids = stored["topk_ids"].long()
    targets = as_view_targets(ids, stored["topk_values"], stored["logsumexp"], temperature=t)
    labels = torch.zeros(1, 6, dtype=torch.long)
    loss = stage("bucket", backend=backend).sparse_loss(student[None], targets, labels, temperature=t)
    expected = bucket_kl64(teacher, student.detach(), ids, t)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # the gradient too: autograd through the fp64 reference
    loss.backward()
    s64 = student.detach().double().requires_grad_()
    bucket_kl64(teacher, s64, ids, t).backward()
    torch.testing.assert_close(student.grad.double(), s64.grad, rtol=1e-4, atol=1e-6)
    if t != 1.0:  # the approximation this replaces differs by far more than the tolerance
        approx = sparse_distill_loss(student.detach(), ids, stored["topk_values"], tail="bucket", temperature=t,
                                     teacher_logsumexp=teacher.logsumexp(-1), reduction="sum")
        assert abs(approx.item() - expected.item()) > 1e-3 * expected.item()


def test_auto_tail_follows_what_the_source_serves_and_renormalize_drops_the_tail():
    """Catches: auto picking the bucket without a normaliser (or never), renormalize still using the tail."""
    assert stage("auto", serves_lse=True).teacher_request() == TapRequest(sparse_logits=True, sparse_logsumexp=True)
    assert stage("auto", serves_lse=False).teacher_request() == TapRequest(sparse_logits=True)
    gen = torch.Generator().manual_seed(1)
    teacher, student = torch.randn(3, V, generator=gen), torch.randn(3, V, generator=gen)
    stored = topk_targets(teacher, 4)
    targets = as_view_targets(stored["topk_ids"].long(), stored["topk_values"], stored["logsumexp"])
    labels = torch.zeros(1, 3, dtype=torch.long)
    renorm = stage("renormalize").sparse_loss(student[None], targets, labels, temperature=1.0)
    ids = stored["topk_ids"].long()
    q = stored["topk_values"].double().softmax(-1)
    log_p = student.double().log_softmax(-1).gather(-1, ids)
    assert renorm.item() == pytest.approx((q * (q.log() - log_p)).sum().item(), rel=1e-5)
    with pytest.raises(HkdError, match=r"stages\.logits\.sparse_tail: bucket needs the teacher's log-normaliser"):
        stage("bucket").sparse_loss(student[None], as_view_targets(ids, stored["topk_values"]), labels, 1.0)


# --------------------------------------------------------------------------- sampled targets


def test_sampled_targets_are_seeded_per_example_and_count_every_draw():
    """Catches: draws that depend on the batch (not the seed and example), lost or double-counted draws."""
    logits = torch.randn(5, V, generator=torch.Generator().manual_seed(2))
    a = sampled_targets(logits, 16, 1.0, example_generator(0, 3))
    b = sampled_targets(logits, 16, 1.0, example_generator(0, 3))
    c = sampled_targets(logits, 16, 1.0, example_generator(0, 4))
    assert torch.equal(a["sample_ids"], b["sample_ids"]) and torch.equal(a["sample_counts"], b["sample_counts"])
    assert not torch.equal(a["sample_ids"], c["sample_ids"])
    assert (a["sample_counts"].sum(-1) == 16).all() and a["sample_ids"].shape == (5, 16)
    for row in range(5):  # the ids of the counted slots are distinct
        used = a["sample_ids"][row][a["sample_counts"][row] > 0]
        assert len(set(used.tolist())) == len(used)
    # rows are drawn in blocks; a block size of one row draws the same tokens
    import hkd.teachers.cache as cache

    old, cache.SAMPLE_BLOCK = cache.SAMPLE_BLOCK, V
    try:
        d = sampled_targets(logits, 16, 1.0, example_generator(0, 3))
    finally:
        cache.SAMPLE_BLOCK = old
    assert torch.equal(d["sample_counts"], a["sample_counts"]) and torch.equal(d["sample_ids"], a["sample_ids"])


def test_sampled_targets_estimate_the_teachers_cross_entropy_without_bias_unlike_renormalised_top_k():
    """The stage's loss on sampled targets (count / K) minus their entropy is the cross-entropy term; over
    many draws its mean must match the full-distribution cross-entropy -sum p_t log p_s within 4 standard
    errors, and so must the mean gradient (p_s - p_hat). Catches: counts not divided by K, values not
    scaled for the kernel's temperature, targets drawn at the wrong temperature, and renormalised top-k
    (whose bias, checked here, is far outside the same bound)."""
    gen = torch.Generator().manual_seed(3)
    teacher = torch.randn(4, V, generator=gen) * 1.5
    student = torch.randn(4, V, generator=gen) * 1.5
    t, k, draws = 2.0, 8, 400
    log_p = (student.double() / t).log_softmax(-1)
    p_t = (teacher.double() / t).softmax(-1)
    full_ce = -(p_t * log_p).sum(-1)  # per row
    full_grad = log_p.exp() - p_t  # d KL / d (z_s / T) per row
    st = stage("auto", serves_lse=False)
    labels = torch.zeros(1, 4, dtype=torch.long)
    ces, grads = [], []
    for n in range(draws):
        drawn = sampled_targets(teacher, k, t, example_generator(7, n))
        values = (drawn["sample_counts"].double() / k).log().float()
        targets = as_view_targets(drawn["sample_ids"].long(), values, temperature=t, kind="sampled")
        s = student.clone().requires_grad_()
        loss = st.sparse_loss(s[None], targets, labels, temperature=t) / (t * t)
        loss.backward()
        p_hat = values.double().exp()
        entropy = -(p_hat * torch.where(p_hat > 0, p_hat.log(), 0.0)).sum()
        ces.append(loss.item() + entropy.item())  # sum over rows of -sum p_hat log p_s
        grads.append(s.grad.double() * t)  # d/d(z_s / T) of the loss / T^2
    ces_t, grads_t = torch.tensor(ces, dtype=torch.float64), torch.stack(grads)
    ce_bound = 4 * ces_t.std() / math.sqrt(draws)
    grad_bound = 4 * grads_t.std(0) / math.sqrt(draws) + 1e-6
    assert abs(ces_t.mean() - full_ce.sum()) < ce_bound
    assert ((grads_t.mean(0) - full_grad).abs() < grad_bound).all()
    # renormalised top-k of the same size is biased well beyond these bounds
    values, ids = teacher.topk(k, dim=-1)
    q = (values.double() / t).softmax(-1)
    topk_ce = -(q * log_p.gather(-1, ids)).sum()
    assert abs(topk_ce - full_ce.sum()) > 2 * ce_bound
    topk_grad = log_p.exp().scatter_add(-1, ids, -q)
    assert ((topk_grad - full_grad).abs() > grad_bound).any()


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("backend", ["torch", "chunked", "triton"])
def test_sampled_targets_with_empty_slots_give_the_kl_to_count_over_k_on_every_backend(backend):
    """Catches: empty slots (count 0, value -inf) turning into NaN or mass in a backend, or the values not
    scaled by T before the kernel tempers them (the target would be (count/K)^(1/T), renormalised)."""
    gen = torch.Generator().manual_seed(4)
    teacher, student = torch.randn(5, V, generator=gen), (torch.randn(5, V, generator=gen) * 2).requires_grad_()
    drawn = sampled_targets(teacher, 6, 2.0, example_generator(0, 0))
    counts = drawn["sample_counts"].double()
    assert (counts == 0).any()  # some positions drew a token twice: empty slots are exercised
    values = (counts / 6).log().float()
    targets = as_view_targets(drawn["sample_ids"].long(), values, temperature=2.0, kind="sampled")
    loss = stage("auto", serves_lse=False, backend=backend).sparse_loss(
        student[None], targets, torch.zeros(1, 5, dtype=torch.long), temperature=2.0)
    s64 = student.detach().double().requires_grad_()
    p_hat, log_p = counts / 6, (s64 / 2).log_softmax(-1).gather(-1, drawn["sample_ids"].long())
    expected = 4 * (p_hat * torch.where(p_hat > 0, p_hat.log() - log_p, 0.0)).sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(student.grad.double(), s64.grad, rtol=1e-4, atol=1e-6)


def test_sampled_targets_at_another_temperature_are_refused_in_the_loss():
    """Catches: sampled targets used at a temperature they were not drawn at (silently wrong)."""
    targets = as_view_targets(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3), temperature=1.0, kind="sampled")
    with pytest.raises(HkdError, match=r"sampled targets: the targets are exact at temperature 1 only.*runs at 2"):
        stage("auto", serves_lse=False).sparse_loss(torch.zeros(1, 2, V), targets, torch.zeros(1, 2, dtype=torch.long), 2.0)
    lse_targets = as_view_targets(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3), torch.zeros(2))
    with pytest.raises(HkdError, match=r"stages\.logits\.sparse_tail: bucket: the targets are exact at temperature 1"):
        stage("bucket").sparse_loss(torch.zeros(1, 2, V), lse_targets, torch.zeros(1, 2, dtype=torch.long), 0.5)


# --------------------------------------------------------------------------- the cache end to end


@pytest.fixture
def raw(raw_config, model_dirs):
    raw_config["teacher"] = {"path": str(model_dirs["teacher"])}
    raw_config["student"] = {"path": str(model_dirs["student"])}
    raw_config["data"] = {"kind": "synthetic", "num_examples": 6, "batch_size": 3, "max_length": 40}
    raw_config["schedule"] = {"phases": [{"name": "decision", "steps": 2, "stages": {"logits": 1.0}}],
                              "temperature": {"kind": "constant", "start": 2.0}}
    raw_config["stages"] = {"logits": {"alpha": 0.0}}
    return raw_config


def build(raw, path, **options):
    options = {"examples_per_shard": 4, "progress": False, "work_dir": path.parent / "work", "hidden": False} | options
    return build_cache(from_dict(Config, copy.deepcopy(raw)), path, **options)


def first_batch(raw, model_dirs):
    config = from_dict(Config, copy.deepcopy(raw))
    teacher, tok = load_model(config.teacher, "teacher")
    encoded = encode_dataset(tok, config.data, config.train.seed)
    batch = collate(encoded[:3], tok.pad_token_id or 0)
    batch["example_index"] = torch.arange(3)
    with torch.no_grad():
        logits = forward_with_taps(teacher, batch, TapRequest(logits=True)).logits
    return batch, logits


def test_a_topk_cache_serves_the_normaliser_at_its_temperature_and_the_stage_uses_it(raw, model_dirs, tmp_path):
    """Catches: the normaliser not stored, stored at T=1 for a T=2 cache, or misplaced in the view."""
    index = json.loads(build(raw, tmp_path / "cache", top_k=5).read_text())
    assert index["targets"] == "topk" and index["temperature"] == 2.0 and index["version"] == 2
    cache = TeacherCache(tmp_path / "cache")
    batch, logits = first_batch(raw, model_dirs)
    view = cache.view(batch, TapRequest(sparse_logits=True, sparse_logsumexp=True))
    mask = batch["loss_mask"]
    torch.testing.assert_close(view.sparse.logsumexp[mask], (logits[mask] / 2).logsumexp(-1))
    assert view.sparse.temperature == 2.0 and view.sparse.kind == "topk"
    student = torch.randn(*logits.shape[:2], logits.shape[-1], generator=torch.Generator().manual_seed(0))
    labels = batch["labels"][:, 1:]
    loss = stage("bucket").sparse_loss(student[:, :-1], view.sparse, labels, temperature=2.0)
    keep = mask[:, :-1]
    expected = bucket_kl64(logits[:, :-1][keep], student[:, :-1][keep], view.sparse.ids[:, :-1][keep], 2.0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # without sparse_logsumexp in the request the view carries none
    assert cache.view(batch, TapRequest(sparse_logits=True)).sparse.logsumexp is None


def test_a_sampled_cache_holds_the_seeded_draws_of_the_teacher(raw, model_dirs, tmp_path):
    """Catches: draws seeded by batch instead of example, counts not summing to K, a view that does not
    turn counts into log(count / K) at the stored ids."""
    build(raw, tmp_path / "cache", targets="sampled", samples=16, seed=5)
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    assert (index["targets"], index["samples"], index["seed"], index["temperature"]) == ("sampled", 16, 5, 2.0)
    batch, logits = first_batch(raw, model_dirs)
    view = TeacherCache(tmp_path / "cache").view(batch, TapRequest(sparse_logits=True))
    assert view.sparse.kind == "sampled" and view.sparse.temperature == 2.0
    for row in range(3):
        positions = batch["loss_mask"][row]
        drawn = sampled_targets(logits[row, positions], 16, 2.0, example_generator(5, row))
        assert torch.equal(view.sparse.ids[row, positions], drawn["sample_ids"].long())
        torch.testing.assert_close(view.sparse.values[row, positions].exp(), drawn["sample_counts"].float() / 16)
    # the same seed writes the same cache, whatever the batch size
    other = copy.deepcopy(raw)
    other["data"]["batch_size"] = 2
    build(other, tmp_path / "cache2", targets="sampled", samples=16, seed=5)
    a = load_file(str(tmp_path / "cache" / "shard-00000.safetensors"))
    b = load_file(str(tmp_path / "cache2" / "shard-00000.safetensors"))
    assert torch.equal(a["sample_ids"], b["sample_ids"]) and torch.equal(a["sample_counts"], b["sample_counts"])


def test_training_from_a_sampled_cache_runs_and_a_mismatched_temperature_is_refused(raw, tmp_path):
    """Catches: a sampled cache accepted by a run at another (or a varying) temperature."""
    build(raw, tmp_path / "cache", targets="sampled", samples=8)
    result = distill(from_dict(Config, dict(copy.deepcopy(raw), teacher_cache=str(tmp_path / "cache"))), tmp_path / "r1")
    assert result.last_metrics["loss/logits"] > 0
    changed = dict(copy.deepcopy(raw), teacher_cache=str(tmp_path / "cache"))
    changed["schedule"]["temperature"] = {"kind": "linear", "start": 2.0, "end": 1.0}
    with pytest.raises(HkdError, match=r"needs the teacher's logits.*built at temperature 2 and serves sampled targets"
                                       r".*not linear from 2 to 1"):
        distill(from_dict(Config, changed), tmp_path / "r2")
    with pytest.raises(ConfigError, match=r"--targets sampled: schedule.temperature varies \(linear from 2 to 1\)"):
        build(changed, tmp_path / "cache3", targets="sampled", samples=8)


def test_a_bucket_tail_at_another_temperature_is_refused_and_auto_falls_back(raw, tmp_path):
    """Catches: the bucket used at a temperature its normaliser was not computed at; auto refusing a run
    renormalised top-k can serve exactly."""
    build(raw, tmp_path / "cache", top_k=5, temperature=1.0)
    changed = dict(copy.deepcopy(raw), teacher_cache=str(tmp_path / "cache"))
    changed["stages"]["logits"]["sparse_tail"] = "bucket"
    with pytest.raises(HkdError, match=r"stage 'logits' needs the teacher's sparse_logsumexp.*built at temperature 1 "
                                       r"and serves the top-k tail mass"):
        distill(from_dict(Config, changed), tmp_path / "r1")
    changed["stages"]["logits"]["sparse_tail"] = "auto"  # renormalised within the top-k at T = 2
    assert distill(from_dict(Config, changed), tmp_path / "r2").last_metrics["loss/logits"] > 0


def test_a_version_1_cache_is_refused_with_a_rebuild_hint(raw, tmp_path):
    """Catches: an old cache (no normaliser, no targets kind) read as if it were current."""
    build(raw, tmp_path / "cache", top_k=5)
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    for key in ("targets", "samples", "seed", "temperature", "causal"):
        del index[key]
    index["version"] = 1
    (tmp_path / "cache" / "index.json").write_text(json.dumps(index))
    with pytest.raises(HkdError, match=r"format version 1, written by an older hkd \(top-k logits without the "
                                       r"teacher's log-normaliser\); this hkd reads version 2; rebuild it"):
        TeacherCache(tmp_path / "cache")


# --------------------------------------------------------------------------- hidden-only caches


@pytest.fixture(scope="module")
def bert_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bert")
    small = {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64}
    return {"teacher": write_preset("tiny-bert", root / "teacher", {"num_hidden_layers": 2}, seed=1),
            "student": write_preset("tiny-bert", root / "student", small, seed=2)}


def test_an_encoder_teacher_gets_a_hidden_only_cache_that_trains_like_the_live_teacher(raw_config, bert_dirs, tmp_path):
    """Catches: cache-teacher refusing encoders, hidden rows stored at causal positions (the encoder's loss
    mask is every real token), the skeleton built as a causal LM."""
    raw_config["teacher"] = {"path": str(bert_dirs["teacher"]), "encoder": True}
    raw_config["student"] = {"path": str(bert_dirs["student"]), "encoder": True}
    raw_config["data"] = {"kind": "synthetic", "num_examples": 6, "batch_size": 3, "max_length": 24}
    raw_config["schedule"] = {"phases": [{"name": "feature", "steps": 2, "stages": {"hidden": 1.0}}]}
    raw_config["stages"] = {"hidden": {"include_embeddings": True}}
    raw_config["optim"]["grad_accum"] = 1
    index = json.loads(build(raw_config, tmp_path / "cache", hidden=True).read_text())
    assert index["targets"] == "none" and index["causal"] is False and index["layers"] == [0, 1, 2]
    live = distill(from_dict(Config, copy.deepcopy(raw_config)), tmp_path / "live")
    cached = distill(from_dict(Config, dict(raw_config, teacher_cache=str(tmp_path / "cache"))), tmp_path / "cached")
    assert cached.last_metrics["loss/hidden"] == pytest.approx(live.last_metrics["loss/hidden"], rel=1e-4)
    with pytest.raises(HkdError, match=r"--targets topk: the teacher has no LM head.*use --targets none"):
        build(raw_config, tmp_path / "c2", targets="topk")


def test_a_hidden_only_cache_refuses_a_logits_stage_by_name(raw, tmp_path):
    """Catches: a logits stage trained from a cache with no targets (or a raw KeyError deep in the view)."""
    hidden_raw = copy.deepcopy(raw)
    hidden_raw["schedule"]["phases"] = [{"name": "feature", "steps": 1, "stages": {"hidden": 1.0}}]
    build(hidden_raw, tmp_path / "cache", targets="none", hidden=True)
    with pytest.raises(HkdError, match=r"stage 'logits' needs the teacher's logits \(not available\).*hidden states "
                                       r"only \(built with --targets none\)"):
        distill(from_dict(Config, dict(copy.deepcopy(raw), teacher_cache=str(tmp_path / "cache"))), tmp_path / "r")
    with pytest.raises(ConfigError, match=r"stage 'logits' needs the teacher's logits.*--targets none"):
        build(raw, tmp_path / "c2", targets="none", hidden=True)


def test_the_cli_passes_targets_samples_temperature_and_seed(raw, tmp_path, capsys):
    """Catches: cache-teacher options parsed but not passed to the build (a default cache written instead)."""
    import yaml

    from hkd.cli import main

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    args = ["cache-teacher", str(path), "--out", str(tmp_path / "c"), "--no-progress", "--no-hidden"]
    # draws at 1.5 could not serve this config's constant T = 2: refused when building, naming both
    assert main(args + ["--targets", "sampled", "--samples", "4", "--temperature", "1.5", "--seed", "3"]) == 2
    assert "built at temperature 1.5 and serves sampled targets" in capsys.readouterr().err
    assert main(args + ["--targets", "sampled", "--samples", "4", "--temperature", "2", "--seed", "3"]) == 0
    index = json.loads((tmp_path / "c" / "index.json").read_text())
    assert (index["targets"], index["samples"], index["temperature"], index["seed"]) == ("sampled", 4, 2.0, 3)
    assert main(args + ["--targets", "topk", "--top-k", "3"]) == 0
    index = json.loads((tmp_path / "c" / "index.json").read_text())
    assert (index["targets"], index["top_k"], index["temperature"]) == ("topk", 3, 2.0)  # the config's constant T
    capsys.readouterr()
    assert main(args + ["--targets", "topk", "--temperature", "0"]) == 2
    assert "--temperature: 0.0 is outside (0, 10000]" in capsys.readouterr().err
