import dataclasses

import numpy as np
import pytest
import torch

from fedssl.config import ConfigError, ModelConfig, TrainConfig
from fedssl.data.windows import RecordInfo, WindowSet
from fedssl.objectives import BYOL, CMSC, CPC, CREMA, JEPA, MaskedModeling, SimCLR, build_objective
from fedssl.objectives.cmsc import positive_pairs
from fedssl.objectives.generative import random_masking
from fedssl.train import train_local
from tests.conftest import random_windows, small_scenario

# every objective with every encoder it works with
COMBINATIONS = [(name, "st_mem") for name in ("generative", "contrastive", "cmsc", "byol", "hybrid", "jepa")] + [
    (name, "resnet1d") for name in ("contrastive", "cmsc", "byol")
] + [(name, "conv_transformer") for name in ("generative", "contrastive", "hybrid", "hybrid_byol", "cpc", "jepa")]


def scenario(name, encoder="st_mem", **objective_kwargs):
    model = ModelConfig(encoder=encoder, causal=name == "cpc")
    return dataclasses.replace(small_scenario(name, **objective_kwargs), model=model)


def batch(n=8, seed=0):
    data = random_windows(n, seed=seed, missing=(6, 7))
    return torch.from_numpy(data.windows), torch.from_numpy(data.lead_mask)


@pytest.mark.parametrize("name,encoder", COMBINATIONS)
def test_loss_is_finite_and_gradients_reach_the_encoder(name, encoder):
    objective = build_objective(scenario(name, encoder))
    terms = objective(*batch())
    assert all(v.shape == () for v in terms.values())
    assert torch.isfinite(terms["loss"])
    terms["loss"].backward()
    grads = [p.grad for p in objective.encoder.parameters()]
    assert all(g is not None for g in grads)
    assert sum(g.abs().sum().item() for g in grads) > 0


HYBRID_ON_TIME_TOKENS = pytest.param("hybrid", "conv_transformer", marks=pytest.mark.xfail(
    strict=True, reason="open: on 2-s windows (10 time tokens, 3 shown per masked view) CREMA's NT-Xent term stays "
    "at log(2B - 1) for 60 steps on conv_transformer while pure SimCLR on it learns; see docs/learning_efficiency.md"))


@pytest.mark.parametrize("name,encoder", [c if c != ("hybrid", "conv_transformer") else HYBRID_ON_TIME_TOKENS
                                          for c in COMBINATIONS])
def test_loss_falls_when_overfitting_a_tiny_set(name, encoder):
    # SimCLR learns from views that keep enough of a record: its own pipeline's p = 0.5 (ObjectiveConfig)
    setup = scenario(name, encoder, **({"view_probability": 0.5} if name == "contrastive" else {}))
    data = random_windows(8, seed=1)
    cfg = TrainConfig(batch_size=8, learning_rate=1e-3, lr_schedule="constant")  # the objective, not the schedule
    objective = build_objective(setup)
    before = mean_loss(objective, data)
    train_local(objective, data, cfg, steps=60, seed=0)
    assert mean_loss(objective, data) < 0.8 * before


def mean_loss(objective, data, calls: int = 3) -> float:
    """The objective's loss on `data` without a weight update (the same masks and views each time)."""
    torch.manual_seed(0)
    x, mask = torch.from_numpy(data.windows), torch.from_numpy(data.lead_mask)
    with torch.no_grad():
        return sum(objective(x, mask)["loss"].item() for _ in range(calls)) / calls


@pytest.mark.parametrize("name,encoder", COMBINATIONS)
def test_same_seed_gives_the_same_numbers(name, encoder):
    data = random_windows(16)
    runs = []
    for _ in range(2):
        objective = build_objective(scenario(name, encoder))
        result = train_local(objective, data, TrainConfig(batch_size=8), steps=3, seed=7)
        runs.append((result.losses, [v.clone() for v in objective.state_dict().values()]))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


def test_names_aliases_and_the_zero_weight_rule():
    assert isinstance(build_objective(scenario("hybrid")), CREMA)
    assert isinstance(build_objective(scenario("hybrid", contrastive_weight=0.0)), MaskedModeling)
    assert isinstance(build_objective(scenario("hybrid", generative_weight=0.0)), SimCLR)
    assert isinstance(build_objective(scenario("simclr")), SimCLR)
    assert isinstance(build_objective(scenario("cmsc")), CMSC)
    assert isinstance(build_objective(scenario("byol")), BYOL)


def test_unknown_objective_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown objective"):
        build_objective(small_scenario("magic"))


@pytest.mark.parametrize("name", ["generative", "hybrid"])
def test_masked_reconstruction_needs_patch_tokens(name):
    with pytest.raises(ConfigError, match=r"resnet1d.*'contrastive', 'simclr', 'cmsc', 'byol'.*st_mem"):
        build_objective(scenario(name, "resnet1d"))


def test_cmsc_half_windows_must_fit_the_patches():
    bad = dataclasses.replace(small_scenario("cmsc"), model=ModelConfig(encoder="st_mem", patch_size=40))  # 200 = 5 x 40
    with pytest.raises(ConfigError, match="half windows of 100 samples"):
        build_objective(bad)


def test_byol_target_is_an_ema_of_the_online_network_and_stays_at_the_site():
    objective = build_objective(scenario("byol", target_momentum=0.9))
    assert not any(k.startswith("target") for k in objective.encoder.state_dict())
    assert any(k.startswith("target_encoder.") for k in objective.local_state_dict())
    assert not any(p.requires_grad for p in objective.target_encoder.parameters())
    target = [p.clone() for p in objective.target_encoder.parameters()]
    train_local(objective, random_windows(8), TrainConfig(batch_size=8), steps=1, seed=0)
    online = list(objective.encoder.parameters())
    for before, after, o in zip(target, objective.target_encoder.parameters(), online, strict=True):
        assert torch.allclose(after, 0.9 * before + 0.1 * o, atol=1e-6)
    assert any(not torch.equal(b, a) for b, a in zip(target, objective.target_encoder.parameters()))


def test_byol_loss_of_a_record_does_not_depend_on_its_batch():
    objective = build_objective(scenario("byol"))
    objective.augment = lambda x, mask: (x * 0.9, mask)  # the same views in any batch
    x, mask = batch(6)
    whole = objective.per_sample_terms(x, mask)["loss"]
    assert whole.shape == (6,)
    assert torch.allclose(objective.per_sample_terms(x[:3], mask[:3])["loss"], whole[:3], atol=1e-5)


def test_cmsc_positives_are_same_recording_or_same_patient():
    groups = torch.tensor([0, 0, 1, 2, 1])
    expected = torch.tensor([
        [1, 1, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 1, 0, 1],
        [0, 0, 0, 1, 0],
        [0, 0, 1, 0, 1],
    ], dtype=torch.bool)
    assert torch.equal(positive_pairs(groups), expected)


def test_training_gives_cmsc_the_patient_of_every_window():
    base = random_windows(6)
    records = tuple(RecordInfo(f"r{i}", patient, ()) for i, patient in enumerate(["p1", "p2", None, "p1"]))
    data = WindowSet(base.windows, base.lead_mask, np.array([0, 1, 2, 3, 3, 2]), records)
    objective = build_objective(scenario("cmsc"))
    seen = []
    forward = objective.forward
    objective.forward = lambda x, mask, groups: seen.append((x, groups)) or forward(x, mask, groups)
    train_local(objective, data, TrainConfig(batch_size=6), steps=1, seed=0)
    (x, groups), = seen
    patient = [records[r].patient_id or records[r].record_id for r in data.record]
    same = torch.tensor([[a == b for b in patient] for a in patient])
    assert torch.equal(positive_pairs(groups), same)  # windows 0, 3, 4 share patient p1; 2 and 5 record r2
    assert torch.equal(x, torch.from_numpy(data.windows))


def test_cmsc_pairs_the_two_halves_of_each_window():
    objective = build_objective(scenario("cmsc"))
    calls = []
    objective.encoder.register_forward_hook(lambda module, args, out: calls.append(args[0]))
    x, mask = batch(4)
    objective(x, mask)
    assert [c.shape[-1] for c in calls] == [100, 100]
    assert torch.equal(torch.cat(calls, dim=-1), x)


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
    objective = build_objective(scenario("generative", "st_mem"))
    x, mask = batch(4)
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


@pytest.mark.parametrize("name", ["hybrid", "byol"])
def test_local_state_excludes_the_encoder_and_round_trips(name):
    objective = build_objective(small_scenario(name))
    state = objective.local_state_dict()
    assert state and not any(k.startswith("encoder.") for k in state)
    other = build_objective(dataclasses.replace(small_scenario(name), seed=5))
    other.load_local_state_dict(state)
    assert all(torch.equal(v, other.local_state_dict()[k]) for k, v in state.items())
    with pytest.raises(ValueError, match="does not fit"):
        build_objective(small_scenario("generative")).load_local_state_dict(state)


def mean_pairwise_cosine(encoder, data):
    with torch.no_grad():
        encoder.eval()
        embeddings = encoder(torch.from_numpy(data.windows), torch.from_numpy(data.lead_mask))
        e = torch.nn.functional.normalize(embeddings, dim=1)
        encoder.train()
    n = len(e)
    return ((e @ e.T).sum() - n).item() / (n * n - n)


@pytest.mark.xfail(strict=True, reason="open: BYOL without batch statistics collapses here (cosine 0.998-1.0, "
                   "0.98 with identical views) whatever the views (crop+scale+noise, SimCLR-style p=0.5, no muscle "
                   "noise, no lead dropout), heads (input LayerNorm, weight-standardised + GroupNorm, plain ReLU, "
                   "4x wide), EMA 0.9-0.996, predictor lr x10, weight decay 0.1 or lr 1e-4; see docs/ssl_results.md")
def test_byol_embeddings_of_different_records_do_not_collapse_when_overfitting():
    objective = build_objective(scenario("byol", "resnet1d"))
    data = random_windows(8, seed=1)
    train_local(objective, data, TrainConfig(batch_size=8, learning_rate=1e-3), steps=60, seed=0)
    assert mean_pairwise_cosine(objective.encoder, data) < 0.95


def test_cpc_needs_a_causal_encoder_with_time_tokens():
    for encoder, causal in (("conv_transformer", False), ("st_mem", True)):
        bad = dataclasses.replace(small_scenario("cpc"), model=ModelConfig(encoder=encoder, causal=causal))
        with pytest.raises(ConfigError, match="causal context.*conv_transformer"):
            build_objective(bad)
    assert isinstance(build_objective(scenario("cpc", "conv_transformer")), CPC)


def test_cpc_negatives_come_from_the_same_window_only():
    objective = build_objective(scenario("cpc", "conv_transformer"))
    x, mask = batch(6)
    whole = objective.per_sample_terms(x, mask)["loss"]
    assert whole.shape == (6,)
    other = x.clone()
    other[3:] = torch.randn_like(other[3:])  # the other records of the batch change
    assert torch.allclose(objective.per_sample_terms(other, mask)["loss"][:3], whole[:3], atol=1e-5)
    # an untrained context scores its ten time steps alike: InfoNCE starts near log(10)
    assert abs(whole.mean().item() - np.log(10)) < 0.5


def test_jepa_target_is_an_ema_of_the_encoder_predicted_at_hidden_spans():
    objective = build_objective(scenario("jepa", "conv_transformer", target_momentum=0.9))
    assert isinstance(objective, JEPA)
    assert any(k.startswith("target_encoder.") for k in objective.local_state_dict())
    assert any(k.startswith("predictor.") for k in objective.local_state_dict())
    assert not any(p.requires_grad for p in objective.target_encoder.parameters())
    target = [p.clone() for p in objective.target_encoder.parameters()]
    train_local(objective, random_windows(8), TrainConfig(batch_size=8), steps=1, seed=0)
    for before, after, online in zip(target, objective.target_encoder.parameters(), objective.encoder.parameters(),
                                     strict=True):
        assert torch.allclose(after, 0.9 * before + 0.1 * online, atol=1e-6)
    x, mask = batch(4)
    loss = objective.per_sample_terms(x, mask)["loss"]
    assert loss.shape == (4,) and torch.isfinite(loss).all()
    loss.sum().backward()  # the loss reaches the online encoder and predictor, never the target
    assert all(p.grad is None for p in objective.target_encoder.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in objective.predictor.parameters())
