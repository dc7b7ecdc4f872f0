"""Federated variants: what travels (`share`), FedProx, FedEMA and the server optimisers.

Flower-free checks of the math in `fedssl.federated` and of the strategy options first, then five
short federations through the real runner, the real ServerApp and ClientApp federating in this
process (tests/conftest.py: Flower's engine would add ~40 s of start-up to each), that together
cover FedProx, FedAdam, FedAvgM, FedYogi, FedMedian, `share: all`, `local_update: fedema`,
`transfer_dtype: float16`, federated evaluation, and switching the objective (CMSC, BYOL, SimCLR)
and the encoder (ResNet1D) in YAML.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from torch import nn

from client.state import FEDEMA_FILE, HEADS_FILE
from fedssl.config import ConfigError, FederationConfig, ModelConfig, ObjectiveConfig, TrainConfig, load_scenario
from fedssl.federated import (divergence, encoder_state, fedema_blend, fedema_scale, fedema_start,
                              proximal_term, shared_state)
from fedssl.objectives import build_objective
from fedssl.objectives.base import Objective
from fedssl.protocol import PROBE_AUROC_KEY, SITE_INDEX_KEY, WEIGHT_KEY
from fedssl.train import train_local
from fedssl.runfolder import RunFolder
from server.strategy import make_strategy, site_probes, strategy_options
from tests.conftest import TINY, NodeGrid, load_scenario_text, random_windows, simulate_in_process


# -- what travels ---------------------------------------------------------------------------------

def test_share_encoder_sends_the_encoder_and_keeps_the_heads(tmp_path):
    objective = build_objective(load_scenario_text(tmp_path))
    shared = shared_state(objective, "encoder")
    assert set(shared) == {f"encoder.{k}" for k in objective.encoder.state_dict()}
    assert set(shared).isdisjoint(objective.local_state_dict())
    assert set(shared) | set(objective.local_state_dict()) == set(objective.state_dict())
    assert encoder_state(shared).keys() == objective.encoder.state_dict().keys()


def test_share_all_sends_the_whole_objective(tmp_path):
    objective = build_objective(load_scenario_text(tmp_path))
    shared = shared_state(objective, "all")
    assert shared.keys() == objective.state_dict().keys() and objective.local_state_dict()
    assert encoder_state(shared).keys() == objective.encoder.state_dict().keys()


# -- FedProx --------------------------------------------------------------------------------------

def test_proximal_gradient_is_mu_times_the_drift():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
    reference = {k: v.detach() + torch.randn_like(v) for k, v in module.named_parameters() if k.startswith("0.")}
    mu = 0.3
    (mu * proximal_term(module, reference)).backward()
    for name, p in module.named_parameters():
        expected = mu * (p.detach() - reference[name]) if name in reference else torch.zeros_like(p)
        assert torch.allclose(p.grad if p.grad is not None else torch.zeros_like(p), expected)


class _Idle(Objective):
    """An objective whose own loss has no gradient: only the proximal term moves the weights."""

    def forward(self, x, lead_mask, groups=None):
        return {"loss": 0.0 * sum(p.sum() for p in self.parameters())}


def test_train_local_pulls_towards_the_global_weights():
    objective = _Idle(nn.Linear(4, 4))
    reference = {k: torch.zeros_like(v) for k, v in objective.state_dict().items()}
    data = random_windows(n=4, samples=8)
    cfg = TrainConfig(batch_size=2, learning_rate=0.05, weight_decay=0.0, grad_clip=0.0)
    before = divergence(objective.state_dict(), reference)
    result = train_local(objective, data, cfg, steps=10, seed=0, proximal=(1.0, reference))
    assert divergence(objective.state_dict(), reference) < 0.8 * before
    assert result.losses["proximal"] > 0


# -- FedEMA ---------------------------------------------------------------------------------------

def test_fedema_blends_by_divergence():
    previous = {"w": torch.zeros(4), "n": torch.tensor(1)}
    received = {"w": torch.ones(4), "n": torch.tensor(2)}  # ||received - previous|| = 2
    blended, mu = fedema_blend(previous, received, scale=0.25)
    assert mu == pytest.approx(0.5) and torch.allclose(blended["w"], torch.full((4,), 0.5))
    assert blended["n"] == 2  # non-float entries come from the server
    blended, mu = fedema_blend(previous, received, scale=1.0)
    assert mu == 1.0 and torch.equal(blended["w"], previous["w"])  # mu is capped at 1
    assert fedema_scale(previous, received, tau=0.7) == pytest.approx(0.35)
    assert fedema_scale(previous, previous, tau=0.7) is None


def test_fedema_start_auto_scales_lambda_on_first_blend():
    received = {"w": torch.ones(4)}
    assert fedema_start(None, received, None, 0.7) == (received, None, 0.0)  # first round: global
    start, scale, mu = fedema_start({"w": torch.zeros(4)}, received, None, 0.7)
    assert mu == pytest.approx(0.7) and scale == pytest.approx(0.35)
    assert torch.allclose(start["w"], torch.full((4,), 0.3))
    _, _, mu = fedema_start({"w": torch.zeros(4)}, {"w": torch.full((4,), 0.5)}, scale, 0.7)
    assert mu == pytest.approx(0.35)  # later rounds: the same lambda, mu follows the divergence


# -- strategies -----------------------------------------------------------------------------------

def test_strategy_options_reach_flower(tmp_path, flower_messages):
    sites, run = ("a", "b"), RunFolder(tmp_path)
    fedprox = make_strategy(FederationConfig(strategy="fedprox", proximal_mu=0.2), sites, {}, run)
    sent = list(fedprox.configure_train(1, ArrayRecord(), ConfigRecord(), NodeGrid()))
    assert sent[0].content["config"]["proximal-mu"] == 0.2
    fedadam = make_strategy(FederationConfig(strategy="fedadam"), sites, {}, run).base
    assert (fedadam.eta, fedadam.beta_1, fedadam.tau) == (0.01, 0.9, 1e-3)
    fedavgm = make_strategy(FederationConfig(strategy="fedavgm", server_learning_rate=0.5), sites, {}, run).base
    assert (fedavgm.server_learning_rate, fedavgm.server_momentum) == (0.5, 0.9)
    assert strategy_options(FederationConfig(strategy="fedavg")) == {}
    # the default, FedAvgM, with Flower's server learning rate and momentum
    assert strategy_options(FederationConfig()) == {"server_learning_rate": 1.0, "server_momentum": 0.9}


@pytest.mark.parametrize("change, message", [
    ({"share": "heads"}, "federation.share"),
    ({"local_update": "ema"}, "federation.local_update"),
    ({"server_learning_rate": 0.0}, "server_learning_rate: must be > 0"),
    ({"server_momentum": 1.0}, "server_momentum"),
])
def test_bad_federation_options_are_clear_errors(change, message, tmp_path):
    with pytest.raises(ConfigError, match=message):  # ranges are refused when the section is built
        make_strategy(dataclasses.replace(FederationConfig(), **change), ("a", "b"), {}, RunFolder(tmp_path))


def _evaluate_reply(site_index: int, windows: int, auroc: float) -> Message:
    content = RecordDict({"metrics": MetricRecord({"num-examples": windows, "probe-macro-auroc": auroc,
                                                   "site-index": site_index})})
    return Message(content, reply_to=Message(RecordDict(), dst_node_id=11 + site_index, message_type="evaluate"))


def test_federated_evaluation_weights_sites_by_probe_windows(flower_messages):
    replies = [_evaluate_reply(0, 30, 0.9), _evaluate_reply(1, 10, 0.5), _evaluate_reply(2, 0, 0.0)]
    by_site, mean = site_probes(replies, ("a", "b", "c"))
    assert mean == pytest.approx((30 * 0.9 + 10 * 0.5) / 40)  # site c could not probe: left out
    assert by_site == {"a": 0.9, "b": 0.5}
    assert site_probes(replies[2:], ("a", "b", "c")) == ({}, None)  # no mean, rather than zero


# -- through the real runner, federating in this process ------------------------------------------

# each variant switches what its name says in TINY (the default objective and encoder, FedAvg, share: encoder)
VARIANTS = {
    "fedprox-share-all": {"federation": "{strategy: fedprox, proximal_mu: 0.1, share: all, rounds: 2, min_sites: 2}",
                          "evaluation": "federated: true"},
    "fedadam-fedema-float16": {"federation": "{strategy: fedadam, local_update: fedema, transfer_dtype: float16, "
                                             "rounds: 2, min_sites: 2}"},
    "cmsc-resnet1d-fedavgm": {"objective": "{name: cmsc}", "model": "{encoder: resnet1d, size: tiny}",
                              "federation": "{strategy: fedavgm, rounds: 2, min_sites: 2}"},
    "byol-fedyogi-share-all": {"objective": "{name: byol}",
                               "federation": "{strategy: fedyogi, share: all, rounds: 2, min_sites: 2}"},
    "simclr-fedmedian": {"objective": "{name: simclr}", "federation": "{strategy: fedmedian, rounds: 2, min_sites: 2}"},
}


def variant_text(changes: dict[str, str]) -> str:
    """TINY with its `model` and `federation` lines replaced, an `objective` line and evaluation keys added."""
    text = TINY.replace("model: {size: tiny}", f"model: {changes.get('model', '{size: tiny}')}")
    text = text.replace("federation: {rounds: 2, min_sites: 2}", f"federation: {changes['federation']}")
    if "objective" in changes:
        text = text.replace("model:", f"objective: {changes['objective']}\nmodel:", 1)
    if "evaluation" in changes:
        text = text.replace("  every_round: false", f"  every_round: false\n  {changes['evaluation']}")
    return text


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request, tmp_path_factory):
    result, grid = simulate_in_process(variant_text(VARIANTS[request.param]), tmp_path_factory.mktemp(request.param))
    rounds = RunFolder(result.run_dir).rounds()
    return request.param, result, rounds, load_scenario(result.run_dir / "scenario.yaml"), grid


def test_variant_scenario_has_the_switches(variant):
    name, _, _, scenario, _ = variant
    objective, encoder = ObjectiveConfig().name, ModelConfig().encoder  # TINY's defaults
    expected = {"fedprox-share-all": (objective, encoder, "fedprox", "all"),
                "fedadam-fedema-float16": (objective, encoder, "fedadam", "encoder"),
                "cmsc-resnet1d-fedavgm": ("cmsc", "resnet1d", "fedavgm", "encoder"),
                "byol-fedyogi-share-all": ("byol", encoder, "fedyogi", "all"),
                "simclr-fedmedian": ("simclr", encoder, "fedmedian", "encoder")}[name]
    fed = scenario.federation
    assert (scenario.objective.name, scenario.model.encoder, fed.strategy, fed.share) == expected
    assert scenario.evaluation.federated == (name == "fedprox-share-all")


def test_variant_trains_the_global_encoder(variant):
    _, result, rounds, scenario, _ = variant
    assert [r.round for r in rounds] == [1, 2]
    assert all(math.isfinite(r.losses["loss"]) and r.sites == 2 for r in rounds)
    # the server probed the encoder it saved, as the runner's comparison probes it (same splits)
    federated = result.summary["encoders"]["federated"]
    assert rounds[1].probe_macro_auroc == pytest.approx(federated["macro_auroc"], abs=1e-9)
    assert rounds[1].probe_macro_auroc_ci95 == pytest.approx(federated["ci95"], abs=1e-9)
    initial = build_objective(scenario).encoder.state_dict()
    final = torch.load(result.run_dir / "encoder.pt", weights_only=True)
    assert final.keys() == initial.keys() and all(final[k].dtype == initial[k].dtype for k in initial)
    assert any(not torch.equal(final[k], initial[k]) for k in initial)


def test_variant_specifics(variant):
    name, result, rounds, scenario, grid = variant
    run_dir = result.run_dir
    initial = build_objective(scenario)
    for site in ("north", "south"):
        assert (run_dir / "sites" / site / HEADS_FILE).is_file()  # persisted in both share modes
    if name == "byol-fedyogi-share-all":  # the BYOL target network travelled and was averaged too
        assert any(k.startswith("target") for k in torch.load(run_dir / "global.pt", weights_only=True))
    if name == "fedprox-share-all":
        assert all(r.losses["proximal"] > 0 for r in rounds)  # the sites drifted and were pulled back
        global_state = torch.load(run_dir / "global.pt", weights_only=True)
        assert global_state.keys() == initial.state_dict().keys()  # the heads travelled ...
        heads = initial.local_state_dict()
        assert any(not torch.equal(global_state[k], heads[k]) for k in heads)  # ... and were averaged
        assert not any((run_dir / "sites" / site / FEDEMA_FILE).exists() for site in ("north", "south"))
        for r in rounds:  # federated evaluation: each site's own probe, and their mean weighted by test windows
            probes = [reply.content["metrics"] for reply in grid.replies
                      if reply.metadata.message_type == "evaluate" and grid.server_round(reply) == r.round]
            assert len(probes) == 2 and all(p[WEIGHT_KEY] > 0 for p in probes)  # both sites could probe
            sites = [scenario.sites[int(p[SITE_INDEX_KEY])].name for p in probes]
            assert r.site_probe_macro_auroc == pytest.approx(dict(zip(sites, (p[PROBE_AUROC_KEY] for p in probes))))
            mean = sum(p[WEIGHT_KEY] * p[PROBE_AUROC_KEY] for p in probes) / sum(p[WEIGHT_KEY] for p in probes)
            assert r.federated_macro_auroc == pytest.approx(mean)
    elif name == "fedadam-fedema-float16":
        assert rounds[0].site_probe_macro_auroc == {} and rounds[0].federated_macro_auroc is None  # off by default
        for message in grid.sent + grid.replies:  # both ways, the weights travelled in float16
            assert {array.dtype for array in message.content["arrays"].values()} == {"float16"}
        assert not (run_dir / "global.pt").exists()
        assert [r.training["fedema-mu"] for r in rounds] == [0.0, pytest.approx(scenario.federation.fedema_tau)]
        previous = torch.load(run_dir / "sites" / "north" / FEDEMA_FILE, weights_only=True)
        assert previous["state"].keys() == shared_state(initial, "encoder").keys()
        assert previous["scale"] > 0
