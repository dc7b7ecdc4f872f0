
import dataclasses

import numpy as np
import pytest
import torch

from fedssl.baselines import compare, local_only_state, random_init_states
from fedssl.objectives import build_objective
from tests.conftest import two_site_scenario


def tiny_scenario():
    return two_site_scenario("hybrid", records=12)


def test_local_only_training_has_the_federation_budget_and_is_seeded(tmp_path):
    scenario = tiny_scenario()
    state, result = local_only_state(scenario, 0, tmp_path)
    assert result.steps == scenario.federation.rounds * scenario.train.local_steps
    again, _ = local_only_state(scenario, 0, tmp_path)
    assert all(torch.equal(state[k], again[k]) for k in state)
    other, _ = local_only_state(scenario, 1, tmp_path)
    assert any(not torch.equal(state[k], other[k]) for k in state)


def test_compare_probes_every_encoder_with_intervals_and_several_random_inits(tmp_path):
    scenario = dataclasses.replace(tiny_scenario(), evaluation=dataclasses.replace(
        tiny_scenario().evaluation, seeds=2, random_inits=3, bootstrap=200))
    federated = local_only_state(scenario, 1, tmp_path)[0]  # any trained encoder will do
    results = compare(scenario, tmp_path, federated)
    assert set(results) == {"random_init", "federated", "local_only/a", "local_only/b"}
    for name, r in results.items():
        assert 0.0 <= r["ci95"][0] <= r["macro_auroc"] <= r["ci95"][1] <= 1.0 and r["per_class"]
        assert r["macro_auroc"] == pytest.approx(np.mean(r["runs"]))
    assert len(results["random_init"]["runs"]) == 3 * 2 and len(results["federated"]["runs"]) == 2
    assert len(set(results["random_init"]["runs"])) > 2  # the inits differ
    # same weights, same probe: the same numbers, and a paired difference of exactly zero
    assert results["federated"]["runs"] == results["local_only/b"]["runs"]
    assert results["local_only/b"]["federated_minus"] == {"mean": 0.0, "ci95": [0.0, 0.0]}
    assert "federated_minus" not in results["federated"]


def test_random_inits_start_from_the_federations_initial_encoder_and_differ():
    scenario = tiny_scenario()
    states = random_init_states(dataclasses.replace(scenario, evaluation=dataclasses.replace(
        scenario.evaluation, random_inits=3)))
    first = build_objective(scenario).encoder.state_dict()
    assert len(states) == 3 and all(torch.equal(states[0][k], first[k]) for k in first)
    assert all(any(not torch.equal(a[k], b[k]) for k in a) for a, b in ((states[0], states[1]), (states[1], states[2])))
