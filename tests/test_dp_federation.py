"""DP-SGD in the federation: each site's epsilon per round, its ledger on disk, declined rounds.

One federation through the real runner, its ServerApp and ClientApp federating in this process
(tests/conftest.py; two synthetic sites, three rounds, masked reconstruction): `north` takes the
scenario's privacy section (noise calibrated so that the three rounds spend its target epsilon),
`south` overrides it with a fixed noise and a small budget that round 1 fits and round 2 would
pass, so it declines rounds 2 and 3 while the run goes on with `north`. Plus fast checks of the
server's bookkeeping that need no federation.
"""

from __future__ import annotations

import json

import pytest
import torch
from flwr.app import ArrayRecord, Error, Message, MetricRecord, RecordDict

from client.site_round import privacy_metrics
from fedssl.config import FederationConfig, load_scenario
from fedssl.federated import clip_update, divergence
from fedssl.privacy import LEDGER_FILE, PrivacyLedger, compute_epsilon
from fedssl.protocol import PRIVACY_BUDGET_CODE, PRIVACY_BUDGET_REASON
from fedssl.runfolder import RunFolder
from server.strategy import make_strategy
from server.validation import validate_replies
from tests.conftest import play_round, simulate_in_process, site_reply

DP_FEDERATION = """
name: dp-federation
seed: 5
data: {window_seconds: 2.0}
model: {size: tiny}
objective: {name: generative}
train: {batch_size: 4, local_steps: 3, threads: 1}
federation: {rounds: 3, min_sites: 2}
privacy: {enabled: true, target_epsilon: 8.0}
evaluation:
  synthetic: {records: 24, sample_rate: 250, duration_seconds: 4.0}
  every_round: false
  bootstrap: 100  # replicates of the probe's interval: enough for one, and cheap
  local_baselines: false
sites:
  - name: north
    synthetic: {records: 6, sample_rate: 250, duration_seconds: 4.0}
  - name: south
    synthetic: {records: 6, sample_rate: 250, duration_seconds: 4.0}
    # 3 steps at q = 4/6, sigma 2: epsilon ~3.05 after round 1, ~4.33 after round 2 > 4.0
    privacy: {enabled: true, target_epsilon: 4.0, noise_multiplier: 2.0}
"""


@pytest.fixture(scope="module")
def dp_federation(tmp_path_factory):
    result, _ = simulate_in_process(DP_FEDERATION, tmp_path_factory.mktemp("dp-federation"))
    return result, RunFolder(result.run_dir).rounds()


def test_south_budget_fits_one_round_only():
    # the scenario's numbers: round 1 fits south's budget, round 2 would not
    q = 4 / 6
    assert compute_epsilon([(2.0, q, 3)], 1e-5) < 4.0 < compute_epsilon([(2.0, q, 6)], 1e-5)


def test_epsilon_grows_every_round_and_persists_in_the_ledger(dp_federation):
    result, rounds = dp_federation
    assert [r.round for r in rounds] == [1, 2, 3]
    north = [r.epsilon["north"] for r in rounds]
    assert 0 < north[0] < north[1] < north[2] <= 8.0 + 1e-6, north
    ledger = PrivacyLedger.load(result.run_dir / "sites" / "north")  # reload from disk
    assert [e["round"] for e in ledger.entries] == [1, 2, 3]
    assert ledger.epsilon() == pytest.approx(north[-1], rel=1e-9)
    assert rounds[-1].delta["north"] == pytest.approx(ledger.delta)
    assert result.summary["epsilon_by_site"]["north"] == north
    assert set(rounds[0].losses) == {"loss", "generative"}  # loss terms only: the epsilons are kept apart
    assert "epsilon" not in result.summary


def test_a_site_past_its_budget_declines_and_the_run_goes_on(dp_federation):
    result, rounds = dp_federation
    assert rounds[0].sites == 2 and rounds[0].declined == []
    south_epsilon = rounds[0].epsilon["south"]
    assert 0 < south_epsilon < 4.0
    for r in rounds[1:]:
        assert r.sites == 1 and "south" not in r.epsilon
        assert [(d["site"], d["code"], d["reason"]) for d in r.declined] == [
            ("south", PRIVACY_BUDGET_CODE, PRIVACY_BUDGET_REASON)]
        assert r.errors == []
    ledger = PrivacyLedger.load(result.run_dir / "sites" / "south")
    assert [e["round"] for e in ledger.entries] == [1]  # declined rounds spend nothing
    assert ledger.epsilon() == pytest.approx(south_epsilon, rel=1e-9)
    assert json.loads((result.run_dir / "sites" / "south" / LEDGER_FILE).read_text())["target_epsilon"] == 4.0
    assert result.summary["epsilon_by_site"]["south"] == [south_epsilon, None, None]
    assert result.summary["declined_by_round"] == [[], ["south"], ["south"]]
    assert (result.run_dir / "encoder.pt").is_file()


def test_sites_clip_their_update_over_all_its_tensors():
    """Central DP clipped at the site (`clip_update`): the update's norm over all its tensors, so
    each tensor is scaled alike; an update within the norm is sent as it is."""
    sent = {"encoder.w": torch.full((4,), 1.0), "encoder.b": torch.full((1,), -1.0)}
    trained = {"encoder.w": torch.full((4,), 3.0), "encoder.b": torch.full((1,), 2.0)}  # update norm 5
    for max_norm, scale in ((10.0, 1.0), (2.0, 2.0 / 5.0)):
        clipped = clip_update(trained, sent, max_norm)
        for key, value in clipped.items():
            torch.testing.assert_close(value, sent[key] + scale * (trained[key] - sent[key]), rtol=1e-6, atol=0)
    assert divergence(clip_update(trained, sent, 2.0), sent) == pytest.approx(2.0, rel=1e-6)


def test_scenario_keeps_the_site_privacy_override(dp_federation):
    result, _ = dp_federation
    scenario = load_scenario(result.run_dir / "scenario.yaml")
    north, south = scenario.sites
    assert north.privacy is None and scenario.privacy_of(north).target_epsilon == 8.0
    assert scenario.privacy_of(south).noise_multiplier == 2.0


# -- the server's bookkeeping without a federation -------------------------------------------------

def reply(node: int, metrics: dict | None, arrays: dict | None = None) -> Message:
    if metrics is None:
        content = Error(code=PRIVACY_BUDGET_CODE, reason=PRIVACY_BUDGET_REASON)
    else:
        content = RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord(metrics)})
    instruction = Message(RecordDict(), dst_node_id=node, message_type="train")
    return Message(content, reply_to=instruction)  # as node `node` replies


def test_mixed_dp_and_plain_sites_pass_validation_and_are_recorded_per_site(tmp_path, flower_messages):
    reference = {"encoder.w": torch.zeros(3)}
    arrays = {"encoder.w": torch.ones(3)}
    ledger = PrivacyLedger(tmp_path / LEDGER_FILE, delta=1e-5, unit="record", accountant="rdp", target_epsilon=8.0)
    ledger.record(3, 0.5, 1.5, round=1)
    dp = {"num-examples": 10, "loss": 1.0, "site-index": 0, **privacy_metrics(ledger)}
    plain = {"num-examples": 30, "loss": 2.0, "site-index": 1, **privacy_metrics(None)}
    replies = [reply(11, dp, arrays), reply(22, plain, arrays)]
    kept, rejected = validate_replies(1, replies, {"encoder.w": torch.zeros(3).numpy()},
                                      {"encoder.w": ((3,), torch.zeros(3).numpy().dtype)}, 5.0, "num-examples")
    assert rejected == [] and len(kept) == 2  # same metric names: no site is rejected

    run = RunFolder(tmp_path / "run")
    strategy = make_strategy(FederationConfig(rounds=2, min_sites=2), ("north", "south"), reference, run)
    play_round(strategy, reference, [site_reply(arrays, dp), site_reply(arrays, plain)], 1, nodes=(11, 22))
    declined = Error(code=PRIVACY_BUDGET_CODE, reason=PRIVACY_BUDGET_REASON)
    play_round(strategy, reference, [declined, site_reply(arrays, plain)], 2, nodes=(11, 22))
    first, second = run.rounds()
    assert first.epsilon == {"north": pytest.approx(ledger.epsilon())}  # plain sites are left out
    assert first.losses == {"loss": pytest.approx(1.75)}  # per-site metrics are not averaged
    assert second.epsilon == {} and second.sites == 1
    assert second.declined == [{"node_id": 11, "site": "north", "code": PRIVACY_BUDGET_CODE,
                                "reason": PRIVACY_BUDGET_REASON}]
