
import torch

from fedssl.baselines import compare, local_only_state
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


def test_compare_probes_every_encoder(tmp_path):
    scenario = tiny_scenario()
    federated = local_only_state(scenario, 1, tmp_path)[0]  # any trained encoder will do
    results = compare(scenario, tmp_path, federated)
    assert set(results) == {"random_init", "federated", "local_only/a", "local_only/b"}
    assert all(0.0 <= r["macro_auroc"] <= 1.0 and r["per_class"] for r in results.values())
    assert results["federated"] == results["local_only/b"]  # same weights, same probe
