"""DP-SGD wiring: per-sample gradients against brute force, unit sampling, refusal, the ledger."""

from __future__ import annotations

import copy
import dataclasses
import json
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from conftest import random_windows, small_scenario

from fedssl.config import ConfigError, ModelConfig, PrivacyConfig, Scenario, TrainConfig, from_dict
from fedssl.data.windows import RecordInfo, WindowSet
from fedssl.objectives import build_objective
from fedssl.privacy import (LEDGER_FILE, PrivacyBudgetExceeded, PrivacyError, PrivacyLedger, calibrate_noise,
                            check_dp_safe, default_delta, make_private, per_sample_terms, privacy_units)
from fedssl.train import train_local

DRAWS = ("rand", "randn", "rand_like", "randn_like")


class Randomness:
    """Records every random draw of a batched forward pass, then replays row i of each draw for a
    forward pass of sample i alone, so that brute force sees the masks/augmentations the batch saw.
    Every draw of the objectives is batch-leading (one row of randomness per record)."""

    def __init__(self) -> None:
        self.draws: list[torch.Tensor] = []
        self.originals = {name: getattr(torch, name) for name in DRAWS}

    @contextmanager
    def _patched(self, make):
        for name in DRAWS:
            setattr(torch, name, make(self.originals[name]))
        try:
            yield
        finally:
            for name, fn in self.originals.items():
                setattr(torch, name, fn)

    def record(self):
        def make(fn):
            def draw(*args, **kwargs):
                out = fn(*args, **kwargs)
                self.draws.append(out.clone())
                return out
            return draw
        return self._patched(make)

    def replay(self, i: int):
        pending = iter(self.draws)

        def make(fn):
            def draw(*args, **kwargs):
                out = fn(*args, **kwargs)  # for its shape and dtype
                recorded = next(pending)
                assert out.shape[0] == 1 and out.shape[1:] == recorded.shape[1:], (out.shape, recorded.shape)
                return recorded[i : i + 1].to(out.dtype)
            return draw
        return self._patched(make)


def dp_objectives():
    def on(encoder: str, name: str, **objective_kwargs):
        model = ModelConfig(encoder=encoder, causal=name == "cpc")
        return build_objective(dataclasses.replace(small_scenario(name, **objective_kwargs), model=model))

    yield "generative", on("st_mem", "generative", mask_ratio=0.5)
    yield "hybrid-without-contrastive", on("st_mem", "hybrid", contrastive_weight=0.0)
    yield "hybrid_byol", on("st_mem", "hybrid_byol", mask_ratio=0.5)  # per-sample CREMA
    # CPC: contrastive, yet per-sample (negatives from the same window); JEPA: EMA target under no_grad
    yield "cpc", on("conv_transformer", "cpc")
    yield "jepa", on("conv_transformer", "jepa", mask_ratio=0.5)
    yield "generative-conv_transformer", on("conv_transformer", "generative")
    try:
        yield "byol", on("st_mem", "byol")
        yield "byol-resnet1d", on("resnet1d", "byol")  # Conv1d + GroupNorm per-sample gradients
    except ConfigError:  # BYOL or the ResNet not there
        pass


def brute_force(objective, x, lead_mask, randomness: Randomness, batch_size: int):
    """Per-sample gradients by back-propagating each sample alone (same randomness)."""
    params = [p for p in objective.parameters() if p.requires_grad]
    out = []
    for i in range(batch_size):
        objective.zero_grad(set_to_none=True)
        with randomness.replay(i):
            loss = per_sample_terms(objective, x[i : i + 1], lead_mask[i : i + 1])["loss"].sum()
        loss.backward()
        out.append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params]))
    return torch.stack(out)


def flat(grads: list[torch.Tensor], b: int) -> torch.Tensor:
    return torch.cat([g.reshape(b, -1) for g in grads], dim=1)


@pytest.mark.parametrize("mode", ["bookkeeping", "hooks", "functorch", "ghost"])
def test_per_sample_gradients_match_brute_force(mode):
    data = random_windows(6, missing=(3,))
    x, lead_mask = torch.from_numpy(data.windows).double(), torch.from_numpy(data.lead_mask)
    b = len(x)
    for name, objective in dp_objectives():
        objective = objective.double().train()
        reference = copy.deepcopy(objective)
        cfg = PrivacyConfig(enabled=True, noise_multiplier=1.0, max_grad_norm=0.5, grad_sample_mode=mode)
        dp = make_private(objective, data, cfg, batch_size=4)
        if mode == "ghost" and "byol" in name:  # the encoder runs on two views: Opacus' ghost norms refuse
            with pytest.raises(PrivacyError, match="hooks"):
                dp.clipped_sum(x, lead_mask)
            dp.close()
            continue
        randomness = Randomness()
        torch.manual_seed(1)
        with randomness.record():
            if mode == "ghost":
                _, summed, norms = dp.clipped_sum(x, lead_mask)
            else:
                _, grads = dp.per_sample_gradients(x, lead_mask)
        dp.close()
        expected = brute_force(reference, x, lead_mask, randomness, b)
        expected_norms = expected.norm(dim=1)
        assert (expected_norms > cfg.max_grad_norm).all(), "clipping must be exercised"
        if mode != "ghost":
            got = flat(grads, b)
            error = (got - expected).norm(dim=1) / expected.norm(dim=1)
            assert error.max() < 1e-4, (name, mode, error)
            norms = got.norm(dim=1)
            # and the clipped sum the DP step uses
            randomness.draws.clear()
            torch.manual_seed(1)
            dp = make_private(objective, data, cfg, batch_size=4)
            _, summed, norms2 = dp.clipped_sum(x, lead_mask)
            dp.close()
            torch.testing.assert_close(norms2, expected_norms, rtol=1e-4, atol=0)
        torch.testing.assert_close(norms, expected_norms, rtol=1e-4, atol=0)
        clipped = expected * (cfg.max_grad_norm / (expected_norms + 1e-6)).clamp(max=1.0)[:, None]
        got_sum = torch.cat([s.flatten() for s in summed])
        assert (got_sum - clipped.sum(0)).norm() / clipped.sum(0).norm() < 1e-4, (name, mode)
        assert (clipped.norm(dim=1) <= cfg.max_grad_norm * (1 + 1e-6)).all()


def test_cpc_and_jepa_train_under_dp_sgd():
    data = random_windows(8)
    for name in ("cpc", "jepa"):
        model = ModelConfig(encoder="conv_transformer", causal=name == "cpc")
        objective = build_objective(dataclasses.replace(small_scenario(name), model=model))
        check_dp_safe(objective)
        before = copy.deepcopy(objective.encoder.state_dict())
        privacy = PrivacyConfig(enabled=True, target_epsilon=8.0)
        result = train_local(objective, data, TrainConfig(batch_size=4), steps=3, seed=0, privacy=privacy)
        assert np.isfinite(result.losses["loss"]) and result.steps == 3
        assert any(not torch.equal(before[k], v) for k, v in objective.encoder.state_dict().items())


def test_float32_per_sample_gradients_match_brute_force():
    data = random_windows(4)
    x, lead_mask = torch.from_numpy(data.windows), torch.from_numpy(data.lead_mask)
    objective = build_objective(small_scenario("generative", mask_ratio=0.5)).train()
    reference = copy.deepcopy(objective)
    dp = make_private(objective, data,
                      PrivacyConfig(enabled=True, noise_multiplier=1.0), batch_size=4)
    randomness = Randomness()
    with randomness.record():
        _, grads = dp.per_sample_gradients(x, lead_mask)
    dp.close()
    expected = brute_force(reference, x, lead_mask, randomness, len(x))
    error = (flat(grads, len(x)) - expected).norm(dim=1) / expected.norm(dim=1)
    assert error.max() < 1e-4, error


def test_noise_has_the_calibrated_scale():
    data = random_windows(8)
    objective = build_objective(small_scenario("generative"))
    cfg = PrivacyConfig(enabled=True, noise_multiplier=2.0, max_grad_norm=0.5)
    dp = make_private(objective, data, cfg, batch_size=4)
    dp.backward(torch.from_numpy(data.windows[:0]), torch.from_numpy(data.lead_mask[:0]))  # empty batch: noise only
    noise = torch.cat([p.grad.flatten() for p in dp.params]) * dp.expected_batch
    dp.close()
    assert dp.expected_batch == pytest.approx(4.0)
    assert noise.std().item() == pytest.approx(2.0 * 0.5, rel=0.02)
    assert abs(noise.mean().item()) < 0.01


def test_objectives_that_couple_the_batch_are_refused():
    for name, kwargs in [("contrastive", {}), ("hybrid", {"contrastive_weight": 0.5}), ("cmsc", {})]:
        objective = build_objective(small_scenario(name, **kwargs))
        with pytest.raises(PrivacyError, match="negatives") as err:
            check_dp_safe(objective)
        assert "masked reconstruction" in str(err.value) and "BYOL" in str(err.value)
        with pytest.raises(PrivacyError):
            make_private(objective, random_windows(4),
                         PrivacyConfig(enabled=True, noise_multiplier=1.0), batch_size=2)


def patient_windows() -> WindowSet:
    """12 windows: patient A has records 0 and 1 (3 windows each), patient B record 2 (4 windows),
    record 3 has no patient id (2 windows)."""
    base = random_windows(12)
    records = (RecordInfo("r0", "A", ()), RecordInfo("r1", "A", ()), RecordInfo("r2", "B", ()),
               RecordInfo("r3", None, ()))
    record = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 3, 3])
    return WindowSet(base.windows, base.lead_mask, record, records)


def test_privacy_units_group_windows_by_record_or_patient():
    data = patient_windows()
    by_record = privacy_units(data, "record")
    by_patient = privacy_units(data, "patient")
    assert len(np.unique(by_record)) == 4 and len(np.unique(by_patient)) == 3
    assert len(set(by_patient[:6])) == 1 and by_patient[0] != by_patient[6] != by_patient[10]
    for units in (by_record, by_patient):  # all windows of a record share a unit
        for r in range(4):
            assert len(set(units[data.record == r])) == 1


def test_poisson_sampling_uses_one_window_per_unit():
    data = patient_windows()
    objective = build_objective(small_scenario("generative"))
    cfg = PrivacyConfig(enabled=True, noise_multiplier=1.0, unit="patient")
    dp = make_private(objective, data, cfg, batch_size=2)
    dp.close()
    assert dp.units == 3 and dp.sample_rate == pytest.approx(2 / 3)
    units = privacy_units(data, "patient")
    sizes, seen = [], np.zeros(len(data))
    for index in dp.batches(3000, np.random.default_rng(0)):
        assert len(np.unique(units[index])) == len(index)  # never two windows of one unit
        sizes.append(len(index))
        seen[index] += 1
    assert np.mean(sizes) == pytest.approx(2.0, rel=0.05)  # Poisson: varying sizes, mean q * units
    assert min(sizes) < 2 < max(sizes)
    per_unit = [seen[units == u].sum() / 3000 for u in range(3)]
    assert per_unit == pytest.approx([2 / 3] * 3, rel=0.05)
    assert (seen > 0).all()  # every window gets its turn


def test_ledger_composes_rounds_survives_restart_and_matches_independent_rdp(tmp_path):
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    cfg = PrivacyConfig(enabled=True, target_epsilon=5.0, noise_multiplier=1.1)
    ledger = PrivacyLedger.load(tmp_path, cfg, units=400)
    assert ledger.delta == default_delta(400) == 1e-5 and default_delta(50_000) == pytest.approx(2e-6)
    assert ledger.epsilon() == 0.0
    rounds = [(20, 0.08, 1.1), (20, 0.08, 1.1), (35, 0.05, 1.3)]
    for r, (steps, q, sigma) in enumerate(rounds):
        ledger.record(steps, q, sigma, round=r)
    reloaded = PrivacyLedger.load(tmp_path, cfg, units=400)  # a new process
    assert [e["steps"] for e in reloaded.entries] == [20, 20, 35]
    assert json.loads((tmp_path / LEDGER_FILE).read_text())["epsilon"] == pytest.approx(reloaded.epsilon())
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    rdp = sum(compute_rdp(q=q, noise_multiplier=s, steps=n, orders=orders) for n, q, s in rounds)
    independent, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=1e-5)
    assert reloaded.epsilon() == pytest.approx(independent, rel=1e-6)
    assert 0 < reloaded.epsilon() < 5.0
    # would the next round exceed the budget?
    assert not reloaded.would_exceed(5, 0.05, 1.3)
    assert reloaded.would_exceed(5000, 0.05, 1.3)
    assert reloaded.would_exceed(5, 0.05, 1.3, budget=reloaded.epsilon())
    with pytest.raises(PrivacyError, match="unit"):
        PrivacyLedger.load(tmp_path, PrivacyConfig(unit="patient"), units=400)


def test_prv_accountant_agrees_roughly_with_rdp(tmp_path):
    history = [(1.1, 0.05, 100)]
    from fedssl.privacy import compute_epsilon

    rdp, prv = compute_epsilon(history, 1e-5, "rdp"), compute_epsilon(history, 1e-5, "prv")
    assert 0 < prv <= rdp * 1.05  # PRV is the tighter accountant


def test_calibrated_noise_spends_the_target():
    sigma = calibrate_noise(4.0, 1e-5, 0.05, 300)
    from fedssl.privacy import compute_epsilon

    assert compute_epsilon([(sigma, 0.05, 300)], 1e-5) <= 4.0
    assert compute_epsilon([(sigma * 0.97, 0.05, 300)], 1e-5) > 4.0


def test_private_training_runs_records_and_declines_rounds(tmp_path):
    data = random_windows(24)
    cfg = TrainConfig(batch_size=6, local_steps=3)
    privacy = PrivacyConfig(enabled=True, target_epsilon=3.0, max_grad_norm=1.0)
    ledger = PrivacyLedger.load(tmp_path, privacy, units=24)
    objective = build_objective(small_scenario("generative"))
    before = copy.deepcopy(objective.state_dict())
    result = train_local(objective, data, cfg, steps=3, seed=0, privacy=privacy, planned_steps=6,
                         ledger=ledger, round=1)
    assert result.steps == 3 and np.isfinite(result.losses["loss"])
    assert any(not torch.equal(before[k], v) for k, v in objective.state_dict().items())
    assert not any(hasattr(m, "activations") and m.activations for m in objective.modules())
    assert PrivacyLedger.load(tmp_path).epsilon() == pytest.approx(ledger.epsilon())
    assert 0 < ledger.epsilon() < 3.0
    # the same seed gives the same result
    sigma = ledger.entries[0]["noise_multiplier"]
    fixed = PrivacyConfig(enabled=True, noise_multiplier=sigma)
    first, second = (build_objective(small_scenario("generative")) for _ in range(2))
    for copy_ in (first, second):
        train_local(copy_, data, cfg, steps=2, seed=0, privacy=fixed)
    for k, v in first.state_dict().items():
        torch.testing.assert_close(v, second.state_dict()[k])
    # a second round of the plan fits (calibrated for 6 planned steps), a third is declined
    train_local(objective, data, cfg, steps=3, seed=1, privacy=privacy, planned_steps=6, ledger=ledger, round=2)
    assert ledger.epsilon() <= 3.0
    with pytest.raises(PrivacyBudgetExceeded):
        train_local(objective, data, cfg, steps=3, seed=2, privacy=privacy, planned_steps=6, ledger=ledger, round=3)
    assert len(PrivacyLedger.load(tmp_path).entries) == 2


def short_round(privacy: PrivacyConfig | None, seed: int, **kwargs) -> tuple[dict[str, float], torch.nn.Module]:
    """Four steps of the generative objective (built from torch seed 0) with a FedProx pull."""
    torch.manual_seed(0)
    objective = build_objective(small_scenario("generative"))
    reference = {k: v.detach() + 0.01 for k, v in objective.state_dict().items() if k.startswith("encoder.")}
    result = train_local(objective, random_windows(24), TrainConfig(batch_size=6, grad_clip=0.5), steps=4,
                         seed=seed, privacy=privacy, proximal=(0.3, reference), **kwargs)
    return result.losses, objective


@pytest.mark.parametrize("privacy", [None, PrivacyConfig(enabled=True, noise_multiplier=1.1, max_grad_norm=1.0)],
                         ids=["plain", "dp"])
def test_the_same_seed_gives_the_same_round_for_plain_and_dp_steps(privacy):
    (losses, first), (again, second) = short_round(privacy, seed=7), short_round(privacy, seed=7)
    assert losses == again and {"loss", "proximal"} <= losses.keys()
    for k, v in first.state_dict().items():
        assert torch.equal(v, second.state_dict()[k]), k
    assert short_round(privacy, seed=8)[0] != losses  # the seed draws the batches (and the noise)


def test_the_dp_step_records_its_steps_and_leaves_no_hooks(tmp_path, monkeypatch):
    privacy = PrivacyConfig(enabled=True, noise_multiplier=1.1, max_grad_norm=1.0)
    ledger = PrivacyLedger.load(tmp_path, privacy, units=24)
    _, objective = short_round(privacy, seed=7, ledger=ledger, round=5)
    assert [(e["round"], e["steps"], e["sample_rate"], e["noise_multiplier"]) for e in ledger.entries] == [
        (5, 4, 0.25, 1.1)]
    assert not any(m._forward_hooks for m in objective.modules())
    # a round that fails half-way records nothing and still removes the per-sample hooks
    from fedssl.privacy import PrivateTraining

    backward, calls = PrivateTraining.backward, []

    def failing_backward(self, x, lead_mask):
        calls.append(len(x))
        if len(calls) == 2:
            raise FloatingPointError("the second step fails")
        return backward(self, x, lead_mask)

    monkeypatch.setattr(PrivateTraining, "backward", failing_backward)
    torch.manual_seed(0)
    objective = build_objective(small_scenario("generative"))
    with pytest.raises(FloatingPointError):
        train_local(objective, random_windows(24), TrainConfig(batch_size=6), steps=4, seed=7, privacy=privacy,
                    ledger=ledger, round=6)
    assert len(ledger.entries) == 1 and len(PrivacyLedger.load(tmp_path).entries) == 1
    assert not any(m._forward_hooks for m in objective.modules())


def test_privacy_config_is_checked():
    scenario = from_dict(Scenario, {"privacy": {"enabled": True, "unit": "patient", "target_epsilon": 2}})
    assert scenario.privacy.unit == "patient" and scenario.privacy.target_epsilon == 2.0
    assert Scenario().privacy.enabled is False
    for bad in [{"unit": "window"}, {"accountant": "gdp"}, {"delta": 2.0}, {"max_grad_norm": 0},
                {"grad_sample_mode": "ew"}]:
        with pytest.raises(ConfigError, match="privacy"):
            from_dict(Scenario, {"privacy": bad})


@pytest.mark.parametrize("mode", ["bookkeeping", "hooks"])
def test_a_detached_branch_run_with_gradients_is_caught(mode):
    """A forward pass whose output never reaches the loss leaves Opacus activations behind that
    would be paired with the wrong backward pass: refuse instead of computing wrong gradients."""
    from fedssl.objectives.generative import MaskedModeling

    class DetachedTarget(MaskedModeling):
        def per_sample_terms(self, x, lead_mask):
            self.encoder(x, lead_mask).detach()  # should have been under torch.no_grad()
            loss, _ = self.reconstruction(self.encoder, x, lead_mask)
            return {"loss": loss}

    base = build_objective(small_scenario("generative"))
    objective = DetachedTarget(base.encoder, base.reconstruction)
    data = random_windows(4)
    dp = make_private(objective, data,
                      PrivacyConfig(enabled=True, noise_multiplier=1.0, grad_sample_mode=mode), batch_size=4)
    with pytest.raises(PrivacyError, match="no_grad"):
        dp.backward(torch.from_numpy(data.windows), torch.from_numpy(data.lead_mask))
    dp.close()


def test_bookkeeping_refuses_a_layer_without_a_per_sample_formula():
    objective = build_objective(small_scenario("generative"))
    objective.reconstruction.scale = torch.nn.Parameter(torch.ones(1))  # a parameter outside Linear/LayerNorm/...
    with pytest.raises(PrivacyError, match=r"reconstruction \(MaskedReconstruction\); use hooks or functorch"):
        make_private(objective, random_windows(4),
                     PrivacyConfig(enabled=True, noise_multiplier=1.0), batch_size=2)
