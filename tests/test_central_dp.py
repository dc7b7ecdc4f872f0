"""Site-level (central) DP end to end: Flower's fixed-clipping wrapper with its accountant over a
fixed denominator (server/central_dp.py).

One federation through the real runner, its ServerApp and ClientApp federating in this process
(tests/conftest.py; two synthetic sites, three rounds, `federation.central_dp: server`): the
site-level epsilon of every round is in `metrics.jsonl` and the summary and equals the Gaussian
mechanism's closed-form RDP, composed; `south` also trains with sample-level DP-SGD on a budget
that only round 1 fits, so it declines rounds 2 and 3, and the run goes on: `north`'s update is
still released (noised over the fixed denominator of two sites) and the site-level epsilon keeps
growing. The same federation with the clipping at the sites (`central_dp: client`): each site's
audit log holds the hash of the clipped update the server received. Plus fast checks of the
aggregation arithmetic.
"""

from __future__ import annotations

import itertools
import json
import random

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import get_privacy_spent

from client.audit import read_audit
from fedssl.config import ConfigError, FederationConfig
from fedssl.protocol import PRIVACY_BUDGET_CODE, PRIVACY_BUDGET_REASON
from fedssl.runfolder import RunFolder
from server.central_dp import CENTRAL_DP, CentralDP, SiteLevelAccountant
from server.checkpoint import ServerCheckpoint
from server.strategy import check_federation, make_strategy
from tests.conftest import NodeGrid, simulate_in_process, site_reply

CENTRAL_DP_FEDERATION = """
name: central-dp
seed: 3
data: {window_seconds: 2.0}
model: {size: tiny}
objective: {name: generative}
train: {batch_size: 4, local_steps: 3, threads: 1}
federation: {rounds: 3, min_sites: 2, strategy: fedavg, central_dp: server, central_noise_multiplier: 1.5,
             central_clipping_norm: 0.5, central_delta: 1.0e-4}
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
    # sample-level DP-SGD: 3 steps at q = 4/6, sigma 2 fit epsilon 4 once, not twice
    privacy: {enabled: true, target_epsilon: 4.0, noise_multiplier: 2.0}
"""


def gaussian_epsilon(noise_multiplier: float, releases: int, delta: float) -> float:
    """Closed form: the Gaussian mechanism of sensitivity 1 and noise sigma has Renyi DP
    alpha / (2 sigma^2) at every order alpha; releases add up."""
    orders = np.array(RDPAccountant.DEFAULT_ALPHAS)
    epsilon, _ = get_privacy_spent(orders=orders, rdp=releases * orders / (2 * noise_multiplier**2), delta=delta)
    return float(epsilon)


@pytest.fixture(scope="module")
def central_federation(tmp_path_factory):
    result, _ = simulate_in_process(CENTRAL_DP_FEDERATION, tmp_path_factory.mktemp("central-dp"))
    return result, RunFolder(result.run_dir).rounds()


@pytest.fixture(scope="module")
def clipped_at_sites(tmp_path_factory):
    text = CENTRAL_DP_FEDERATION.replace("central_dp: server", "central_dp: client")
    result, _ = simulate_in_process(text, tmp_path_factory.mktemp("central-dp-client"))
    return result, RunFolder(result.run_dir).rounds()


def test_sites_that_clip_audit_the_update_the_server_received(clipped_at_sites):
    result, rounds = clipped_at_sites
    assert [r.central_epsilon for r in rounds] == pytest.approx([gaussian_epsilon(1.5, r, 1e-4) for r in (1, 2, 3)])
    for site in ("north", "south"):
        sent = [e["sent"]["sha256"] for e in read_audit(result.run_dir / "sites" / site) if e["outcome"] == "trained"]
        assert sent == [r.received[site] for r in rounds if site in r.received] and sent, site


def test_site_level_epsilon_is_reported_every_round(central_federation):
    result, rounds = central_federation
    assert [r.round for r in rounds] == [1, 2, 3]
    expected = [gaussian_epsilon(1.5, r, 1e-4) for r in (1, 2, 3)]
    assert [r.central_epsilon for r in rounds] == pytest.approx(expected, rel=1e-6)
    assert expected[0] < expected[1] < expected[2]
    assert all(r.central_delta == 1e-4 for r in rounds)
    assert result.summary["central_epsilon_by_round"] == [r.central_epsilon for r in rounds]


def test_a_site_declining_under_central_dp_counts_as_a_zero_update(central_federation):
    result, rounds = central_federation
    assert rounds[0].sites == 2 and rounds[0].declined == []
    assert 0 < rounds[0].epsilon["south"] < 4.0  # its sample-level epsilon, next to the site-level one
    for r in rounds[1:]:  # south declines; the round still releases north's update, noised for two sites
        assert r.sites == 1 and r.errors == [] and r.rejected == []
        assert [(d["site"], d["code"], d["reason"]) for d in r.declined] == [
            ("south", PRIVACY_BUDGET_CODE, PRIVACY_BUDGET_REASON)]
        assert set(r.site_windows) == {"north"}
    checkpoints = [torch.load(result.run_dir / "checkpoints" / f"encoder_round_{r}.pt") for r in (1, 2, 3)]
    for before, after in itertools.pairwise(checkpoints):
        assert any(not torch.equal(before[k], after[k]) for k in before)
    assert result.summary["declined_by_round"] == [[], ["south"], ["south"]]
    assert (result.run_dir / "encoder.pt").is_file()


# -- the aggregation without a federation ---------------------------------------------------------------


def run_round(tmp_path, fed: FederationConfig, updates: dict[int, torch.Tensor | None], size: int):
    """One round of `make_strategy(fed)` from a zero global model; `updates[node]` None: the node
    declines. Returns the new global `w` and the strategy."""
    reference = {"encoder.w": torch.zeros(size)}
    strategy = make_strategy(fed, ("north", "south"), reference, RunFolder(tmp_path))
    sent = {m.metadata.dst_node_id: m for m in strategy.configure_train(1, ArrayRecord(reference), ConfigRecord(),
                                                                         NodeGrid((11, 22)))}
    replies = []
    for index, (node, update) in enumerate(updates.items()):
        if update is None:
            replies.append(Message(Error(code=PRIVACY_BUDGET_CODE, reason=PRIVACY_BUDGET_REASON), reply_to=sent[node]))
            continue
        metrics = {"num-examples": 10 * (index + 1), "loss": float(index + 1), "site-index": index,
                   "dp-sgd": 0, "epsilon": 0.0, "delta": 0.0}
        replies.append(Message(site_reply({"encoder.w": update}, metrics), reply_to=sent[node]))
    arrays, _ = strategy.aggregate_train(1, replies)
    return arrays.to_torch_state_dict()["encoder.w"], strategy


def test_the_mean_is_unweighted_clipped_and_a_declined_site_is_zero(tmp_path, flower_messages):
    fed = FederationConfig(strategy="fedavg", central_dp="server", central_noise_multiplier=1e-4, central_clipping_norm=2.0,
                           central_delta=1e-5)
    north = torch.tensor([3.0, 4.0, 0.0, 0.0])  # norm 5: clipped to 2
    south = torch.tensor([0.0, 0.0, 1.0, 0.0])  # norm 1, ten times north's windows... weighed the same
    w, _ = run_round(tmp_path / "both", fed, {11: north, 22: south}, 4)
    torch.testing.assert_close(w, (north * 2 / 5 + south) / 2, atol=1e-3, rtol=0)
    w, strategy = run_round(tmp_path / "declined", fed, {11: north, 22: None}, 4)
    torch.testing.assert_close(w, north * 2 / 5 / 2, atol=1e-3, rtol=0)  # south counts as zero: / 2, not / 1
    strategy.finish_round(1, ArrayRecord({"encoder.w": w}))
    (record,) = RunFolder(tmp_path / "declined").rounds()
    assert record.sites == 1 and record.losses == {"loss": pytest.approx(1.0)}  # the real replies only
    assert [d["node_id"] for d in record.declined] == [22]  # (its name is known once it has replied)
    assert record.central_epsilon == pytest.approx(gaussian_epsilon(1e-4, 1, 1e-5), rel=1e-6)
    assert record.central_delta == 1e-5
    assert isinstance(strategy.central_dp, CentralDP)


def test_the_server_enforces_the_bound_on_updates_the_sites_clipped(tmp_path, flower_messages):
    """With `central_dp: client` a float16 reply can round a clipped update a little above C; the
    server clips what it received again, so the noise's calibration holds whatever arrived."""
    fed = FederationConfig(strategy="fedavg", central_dp="client", central_noise_multiplier=1e-4, central_clipping_norm=2.0)
    above = torch.tensor([3.0, 4.0, 0.0, 0.0])  # norm 5: as a site's reply above C would be
    within = torch.tensor([0.0, 0.0, 1.0, 0.0])  # norm 1: left as it is
    w, _ = run_round(tmp_path, fed, {11: above, 22: within}, 4)
    torch.testing.assert_close(w, (above * 2 / 5 + within) / 2, atol=1e-3, rtol=0)


def test_the_noise_is_calibrated_to_the_fixed_denominator(tmp_path, flower_messages):
    fed = FederationConfig(strategy="fedavg", central_dp="client", central_noise_multiplier=0.5, central_clipping_norm=2.0)
    zero = torch.zeros(20_000)
    w, _ = run_round(tmp_path, fed, {11: zero, 22: None}, len(zero))
    assert w.std().item() == pytest.approx(0.5 * 2.0 / 2, rel=0.03)  # sigma C / n with n = 2 sampled sites


def test_central_dp_configuration_is_checked():
    for bad, match in [({"central_dp": "both"}, "central_dp"), ({"central_dp": "server", "strategy": "fedmedian"},
                       "does not average"), ({"central_dp": "server", "strategy": "fedadam"}, "fedavg or fedprox"),
                       ({"central_dp": "server"}, "federation.strategy: fedavg"),  # the default's momentum
                       ({"central_dp": "client", "strategy": "fedavg", "central_delta": 0.0}, "central_delta")]:
        with pytest.raises(ConfigError, match=match):
            check_federation(FederationConfig(**bad), 2)
    check_federation(FederationConfig(central_dp="server", strategy="fedprox"), 2)


def test_central_dp_is_configured_and_resumes_its_epsilon(tmp_path):
    reference = {"encoder.w": torch.zeros(3)}
    sites, run = ("north", "south"), RunFolder(tmp_path)
    for mode in CENTRAL_DP:
        strategy = make_strategy(FederationConfig(strategy="fedavg", central_dp=mode, central_clipping_norm=2.0), sites, reference, run)
        central = strategy.central_dp
        assert central.wrapper.clipping_norm == 2.0 and central.clip_at_server == (mode == "server")
        assert central.wrapper.strategy is strategy.base and strategy.base.weighted_by_key == "central-dp-weight"
        assert central.wrapper.privacy_spent().num_releases == 0
    assert make_strategy(FederationConfig(), sites, reference, run).central_dp is None
    # a run resumed after round 2 has released two aggregates already
    checkpoint = ServerCheckpoint(2, "fedavg", {"encoder.w": np.zeros(3, np.float32)}, random_state=random.getstate())
    resumed = make_strategy(FederationConfig(strategy="fedavg", central_dp="server", central_noise_multiplier=2.0, rounds=3), sites,
                            reference, run, checkpoint=checkpoint)
    spent = resumed.central_dp.wrapper.privacy_spent()
    assert spent.num_releases == 2 and spent.epsilon == pytest.approx(gaussian_epsilon(2.0, 2, 1e-5), rel=1e-6)


def test_the_accountant_matches_the_closed_form():
    from flwr.supercore.privacy_accounting import (
        GaussianPrivacyEvent,
        NeighboringRelation,
        PrivacyConfig,
        SamplingMethod,
    )

    accountant = SiteLevelAccountant(PrivacyConfig(target_delta=1e-5, population_size=3,
                                                   neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                                                   sampling_method=SamplingMethod.NO_AMPLIFICATION, max_epsilon=10.0))
    event = GaussianPrivacyEvent(noise_multiplier=2.0, sample_size=3, population_size=3)
    accountant.compose(event, count=4)
    spent = accountant.get_privacy_spent()
    assert spent.num_releases == 4 and spent.delta == 1e-5
    assert spent.epsilon == pytest.approx(gaussian_epsilon(2.0, 4, 1e-5), rel=1e-6)
    assert not accountant.would_exceed(event)
    assert accountant.would_exceed(event, count=100)  # the wrapper's check before a release past max_epsilon
    restored = SiteLevelAccountant(accountant.config)
    restored.load_state_dict(json.loads(json.dumps(accountant.state_dict())))
    assert restored.get_privacy_spent().epsilon == spent.epsilon
