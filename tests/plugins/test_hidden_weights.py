"""The hidden stage's ``layer_weights``: a weighted mean over mapped pairs (issue 17, item 2)."""

import math

import pytest
import torch

from hkd.config import ConfigError, from_dict
from hkd.plugins.hidden import HiddenStage, HiddenStageConfig

from .helpers import batch, context, models, run_stage


@pytest.fixture(scope="module")
def pair():
    return models({"hidden_size": 64}, {"hidden_size": 32})  # 4-layer teacher, 2-layer student: projectors


def stage_for(pair, seed=0, **options):
    torch.manual_seed(seed)  # the same projector initialisation for every stage built with this seed
    return HiddenStage(HiddenStageConfig(include_embeddings=True, log_layers=True, **options), context(*pair))


def test_weighted_mean_matches_the_per_pair_losses(pair):
    """Catches: weights ignored, or the weighted sum divided by the pair count instead of the weights' sum."""
    b = batch()
    plain = run_stage(stage_for(pair), *pair, b)
    per_pair = [plain[f"metric/layer/hidden/{s}_{t}"].item() for s, t in stage_for(pair).layer_map]
    assert len(per_pair) == 3 and plain["hidden"].item() == pytest.approx(sum(per_pair) / 3, rel=1e-5)
    weights = [0.5, 0.0, 3.0]
    weighted = run_stage(stage_for(pair, layer_weights=weights), *pair, b)["hidden"].item()
    reference = sum(w * x for w, x in zip(weights, per_pair)) / sum(weights)
    assert weighted == pytest.approx(reference, rel=1e-5)
    assert abs(weighted - plain["hidden"].item()) > 1e-3 * plain["hidden"].item()  # the weights changed something
    # equal weights of any size are the plain mean
    assert run_stage(stage_for(pair, layer_weights=[2.0, 2.0, 2.0]), *pair, b)["hidden"].item() == pytest.approx(
        plain["hidden"].item(), rel=1e-6)


def test_a_zero_weight_sends_no_gradient(pair):
    """Catches: a pair with weight 0 still training its projector (weights applied to the logged metric only)."""
    teacher, student = pair
    stage = stage_for(pair, layer_weights=[1.0, 0.0, 1.0])
    run_stage(stage, teacher, student, batch())["hidden"].backward()
    grads = {key: proj.weight.grad for key, proj in stage.projectors.items()}
    student.zero_grad()
    assert grads["1_2"] is None or torch.count_nonzero(grads["1_2"]) == 0
    assert grads["0_0"] is not None and grads["0_0"].abs().sum() > 0
    assert grads["2_4"] is not None and grads["2_4"].abs().sum() > 0


@pytest.mark.parametrize("weights, message", [
    ([1.0, 1.0], r"stages\.x\.layer_weights: 2 weight\(s\) for 3 mapped pair\(s\) \(0->0, 1->2, 2->4\)"),
    ([1.0, -1.0, 1.0], r"stages\.x\.layer_weights\[1\]: expected a finite number >= 0, got -1\.0"),
    ([1.0, math.nan, 1.0], r"stages\.x\.layer_weights\[1\]: expected a finite number >= 0, got nan"),
    ([0.0, 0.0, 0.0], r"stages\.x\.layer_weights: every weight is 0"),
])
def test_bad_weights_are_refused_by_name(pair, weights, message):
    """Catches: a weight list of the wrong length silently zipped short, negative or NaN weights accepted."""
    with pytest.raises(ConfigError, match=message):
        stage_for(pair, layer_weights=weights)


def test_config_refuses_a_non_numeric_weight():
    """Catches: a YAML typo (a string in the list) reaching the loss instead of a config error."""
    assert from_dict(HiddenStageConfig, {"layer_weights": [1, 0.5]}).layer_weights == [1, 0.5]
    with pytest.raises(ConfigError, match=r"layer_weights\[1\]"):
        from_dict(HiddenStageConfig, {"layer_weights": [1.0, "high"]}, "stages.hidden")
