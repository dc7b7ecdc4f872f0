"""The Flower glue: end to end through Flower's simulation engine (via the runner), plus fast
checks of the strategies and of node-to-site mapping that need no simulation engine.

One federation (two synthetic sites, two rounds; ~50 s on two cores, most of it Flower and Ray
starting up) is shared by the end-to-end tests. It is the suite's one whole run on Flower's
simulation engine (tests/test_bad_paths.py starts another to stop it with SIGTERM): the other
federations run the same ServerApp and ClientApp in-process (tests/conftest.py), and
tests/test_deployment.py and tests/test_faults.py run Flower's deployment processes.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from client.site_round import node_of, round_seed
from client.state import HEADS_FILE
from fedssl.config import ConfigError, FederationConfig, load_scenario
from fedssl.federated import shared_state
from fedssl.objectives import build_objective
from fedssl.runfolder import RunFolder
from fedssl.sitefile import SiteFile, save_site_file
from ops.processes import pid_alive
from server.strategy import STRATEGIES, make_strategy
from simulations.run import run_scenario
from tests.conftest import TINY, load_scenario_text, play_round, training_reply


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    folder = tmp_path_factory.mktemp("federation")
    (folder / "tiny.yaml").write_text(TINY)
    lines: list[str] = []
    result = run_scenario(folder / "tiny.yaml", folder / "run", timeout=600, echo=lines.append)
    return result, lines


def test_rounds_logged_with_finite_loss(federation):
    result, lines = federation
    rounds = RunFolder(result.run_dir).rounds()
    assert [r.round for r in rounds] == [1, 2]
    assert all(math.isfinite(r.losses["loss"]) and r.sites == 2 for r in rounds)
    # each site's training-loop seconds, apart (not averaged into the loss terms) and within the round's
    assert all(set(r.compute_seconds) == {"north", "south"} and "compute-seconds" not in r.losses
               and 0 < max(r.compute_seconds.values()) < r.seconds for r in rounds)
    assert all(set(r.training) == {"examples-seen"} for r in rounds)  # windows drawn: not a loss term
    assert rounds[0].probe_macro_auroc is None  # every_round: false probes the last round only
    # the ServerApp (in a Flower process) probed the encoder it saved as the runner's comparison probes it
    assert rounds[1].probe_macro_auroc == pytest.approx(result.summary["encoders"]["federated"]["macro_auroc"])
    assert all(r.embedding_rank > 1 for r in rounds)  # the collapse monitor, every round
    assert any(line.startswith("round 2/2") for line in lines)  # progress reached the user


def test_checkpoints_hold_a_trained_global_encoder(federation):
    result, _ = federation
    for name in ("checkpoints/encoder_round_1.pt", "checkpoints/encoder_round_2.pt", "encoder.pt"):
        assert (result.run_dir / name).is_file()
    scenario = load_scenario(result.run_dir / "scenario.yaml")
    initial = build_objective(scenario).encoder.state_dict()
    final = torch.load(result.run_dir / "encoder.pt", weights_only=True)
    assert final.keys() == initial.keys()
    assert all(final[k].dtype == initial[k].dtype for k in initial)
    assert any(not torch.equal(final[k], initial[k]) for k in initial)


def test_site_heads_stay_at_the_sites(federation):
    result, _ = federation
    scenario = load_scenario(result.run_dir / "scenario.yaml")
    initial = build_objective(scenario).local_state_dict()
    for site in ("north", "south"):
        heads = torch.load(result.run_dir / "sites" / site / HEADS_FILE, weights_only=True)
        assert heads.keys() == initial.keys()
        assert not any(key.startswith("encoder.") for key in heads)
        assert any(not torch.equal(heads[k], initial[k]) for k in initial)


def test_summary_and_own_flower_home(federation):
    result, _ = federation
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["sites"] == ["north", "south"]
    assert {"random_init", "federated"} <= set(summary["encoders"])
    assert (result.run_dir / "flower" / "config.toml").is_file()  # FLWR_HOME of the run


def test_no_flower_process_left(federation):
    result, _ = federation
    assert len(result.flower_pids) >= 3  # superlink, superexec, flwr-simulation (+ CLI, Ray)
    assert [pid for pid in result.flower_pids if pid_alive(pid)] == []


# -- fast checks of the Flower glue, without the simulation engine ------------------------------


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_strategies_average_encoders(name, tmp_path, flower_messages):
    objective = build_objective(load_scenario_text(tmp_path))
    state = shared_state(objective, "encoder")
    run = RunFolder(tmp_path)
    strategy = make_strategy(FederationConfig(strategy=name, min_sites=2), ("north", "south"), state, run)
    play_round(strategy, state, [training_reply({k: v + i for k, v in state.items()}, num_examples=8, loss=1.0 + i)
                                 for i in range(2)])
    (record,) = run.rounds()
    # every validated update goes into the base's aggregation (Krum then keeps the most central one)
    assert record.sites == 2 and record.examples == 16 and record.losses == {"loss": 1.5}
    assert torch.load(run.encoder, weights_only=True).keys() == objective.encoder.state_dict().keys()
    assert torch.load(run.encoder_checkpoint(1), weights_only=True).keys() == objective.encoder.state_dict().keys()


def test_unknown_strategy_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="unknown strategy 'fedsgd'"):
        make_strategy(FederationConfig(strategy="fedsgd"), ("a", "b"), {}, RunFolder(tmp_path))


def test_site_of_a_node(tmp_path):
    scenario = load_scenario_text(tmp_path)
    simulated = node_of(scenario, {"partition-id": 1, "num-partitions": 2}, {"run-dir": str(tmp_path / "run")})
    assert simulated.site.name == "south" and simulated.policy is None
    assert simulated.state == tmp_path / "run" / "sites" / "south" and simulated.work == tmp_path / "run" / "data"
    site_file = save_site_file(SiteFile(site="north", records="records", work="work", state="state"), tmp_path / "s.yaml")
    deployed = node_of(scenario, {"site-file": str(site_file)}, {})
    assert deployed.site.name == "north" and deployed.site.folder == str(tmp_path / "records")
    assert deployed.site.synthetic is None and deployed.state == tmp_path / "state" and deployed.policy is not None
    with pytest.raises(ConfigError, match="num-supernodes"):
        node_of(scenario, {"partition-id": 0, "num-partitions": 3}, {"run-dir": str(tmp_path / "run")})
    with pytest.raises(ConfigError, match="neither 'site-file' nor 'partition-id'"):
        node_of(scenario, {"site": "north"}, {})  # the old key is not read
    assert round_seed(3, 1, "north") == round_seed(3, 1, "north") != round_seed(3, 2, "north")


