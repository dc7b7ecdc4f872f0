import dataclasses

import pytest
import torch

from fedssl.config import ConfigError, TrainConfig
from fedssl.objectives import CREMA, MaskedModeling, SimCLR, build_objective
from fedssl.objectives.generative import random_masking
from fedssl.train import train_local
from tests.conftest import random_windows, small_scenario

OBJECTIVES = ["generative", "contrastive", "hybrid"]


def batch(n=8, seed=0):
    data = random_windows(n, seed=seed, missing=(6, 7))
    return torch.from_numpy(data.windows), torch.from_numpy(data.lead_mask)


@pytest.mark.parametrize("name", OBJECTIVES)
def test_loss_is_finite_and_gradients_reach_the_encoder(name):
    objective = build_objective(small_scenario(name))
    terms = objective(*batch())
    assert torch.isfinite(terms["loss"])
    terms["loss"].backward()
    grads = [p.grad for p in objective.encoder.parameters()]
    assert all(g is not None for g in grads)
    assert sum(g.abs().sum().item() for g in grads) > 0


@pytest.mark.parametrize("name", OBJECTIVES)
def test_loss_falls_when_overfitting_a_tiny_set(name):
    scenario = small_scenario(name)
    data = random_windows(8, seed=1)
    cfg = TrainConfig(batch_size=8, learning_rate=1e-3)
    before = train_local(build_objective(scenario), data, cfg, steps=3, seed=0).losses["loss"]
    objective = build_objective(scenario)
    train_local(objective, data, cfg, steps=60, seed=0)
    after = train_local(objective, data, dataclasses.replace(cfg, learning_rate=0.0), steps=3, seed=0).losses["loss"]
    assert after < 0.8 * before


@pytest.mark.parametrize("name", OBJECTIVES)
def test_same_seed_gives_the_same_numbers(name):
    data = random_windows(16)
    runs = []
    for _ in range(2):
        objective = build_objective(small_scenario(name))
        result = train_local(objective, data, TrainConfig(batch_size=8), steps=3, seed=7)
        runs.append((result.losses, [p.detach().clone() for p in objective.encoder.parameters()]))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


def test_a_zero_weight_gives_the_pure_objective():
    assert isinstance(build_objective(small_scenario("hybrid")), CREMA)
    assert isinstance(build_objective(small_scenario("hybrid", contrastive_weight=0.0)), MaskedModeling)
    assert isinstance(build_objective(small_scenario("hybrid", generative_weight=0.0)), SimCLR)


def test_unknown_objective_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown objective"):
        build_objective(small_scenario("magic"))


def test_masking_hides_the_requested_ratio_of_recorded_tokens_only():
    valid = torch.ones(64, 240, dtype=torch.bool)
    valid[:32, 120:] = False  # half the records miss half their leads
    keep, visible, hidden = random_masking(valid, 0.75)
    assert torch.allclose(hidden.sum(1).float() / valid.sum(1).float(), torch.tensor(0.75), atol=0.01)
    assert not (hidden & ~valid).any()
    shown = torch.zeros_like(valid).scatter(1, keep, visible)
    assert not (shown & hidden).any() and not (shown & ~valid).any()
    assert torch.equal(shown | hidden, valid)


def test_hidden_patches_do_not_leak_into_the_decoder():
    objective = build_objective(small_scenario("generative"))
    x, mask = batch(4)
    torch.manual_seed(3)
    loss_a, _ = objective.reconstruction(objective.encoder, x, mask)
    valid = objective.encoder.token_valid(mask)
    torch.manual_seed(3)
    _, _, hidden = random_masking(valid, objective.reconstruction.mask_ratio)
    patches = objective.encoder.patchify(x.clone())
    patches[hidden] = patches[hidden] * 5 + 1  # change only what is hidden
    torch.manual_seed(3)
    _, emb_b = objective.reconstruction(objective.encoder, patches.reshape(x.shape), mask)
    torch.manual_seed(3)
    _, emb_a = objective.reconstruction(objective.encoder, x, mask)
    assert torch.allclose(emb_a, emb_b, atol=1e-6)


def test_local_state_excludes_the_encoder_and_round_trips():
    objective = build_objective(small_scenario("hybrid"))
    state = objective.local_state_dict()
    assert state and not any(k.startswith("encoder.") for k in state)
    other = build_objective(dataclasses.replace(small_scenario("hybrid"), seed=5))
    other.load_local_state_dict(state)
    assert all(torch.equal(v, other.local_state_dict()[k]) for k, v in state.items())
    with pytest.raises(ValueError, match="does not fit"):
        build_objective(small_scenario("generative")).load_local_state_dict(state)
