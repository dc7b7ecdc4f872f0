"""Resume after the ServerApp is killed (server/checkpoint.py), in-process and exact.

The real ServerApp drives the real ClientApp over an in-process grid (tests/conftest.py, no Flower
processes). A FedAdam run that crashes when round 3 is sent, resumed, ends with the very
weights and server moments of an uninterrupted run of the same seed; this fails if the moments
(checked: without them the final weights differ by up to ~8e-3), the round numbers (the sites
seed their training by them) or the node-sampling state were not restored. The real kill (the
SuperLink and the ServerApp SIGKILLed, then a resumed `flwr run`) is in tests/test_faults.py.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from fedssl.config import FederationConfig
from fedssl.runfolder import RunFolder
from server.checkpoint import CheckpointMismatch, ServerCheckpoint, optimizer_state, restore_optimizer_state
from server.strategy import make_strategy
from simulations.run import FederationError, run_scenario
from simulations.run import main as simulate
from tests.conftest import ServerKilled, serve

SCENARIO = """
name: resume
seed: 7
data: {window_seconds: 2.0}
model: {size: tiny}
train: {batch_size: 8, local_steps: 2, threads: 1}
federation: {rounds: 3, min_sites: 2, strategy: fedadam, server_learning_rate: 0.05}
evaluation:
  synthetic: {records: 24, sample_rate: 250, duration_seconds: 4.0}
  every_round: false
  bootstrap: 100  # replicates of the probe's interval: enough for one, and cheap
  local_baselines: false
sites:
  - name: north
    synthetic: {records: 6, sample_rate: 250, duration_seconds: 4.0}
  - name: south
    synthetic: {records: 6, sample_rate: 500, duration_seconds: 4.0, mains_hz: 60.0}
"""


@pytest.fixture(scope="module")
def in_process(tmp_path_factory):
    folder = tmp_path_factory.mktemp("resume")
    scenario = folder / "scenario.yaml"
    scenario.write_text(SCENARIO)
    serve(scenario, folder / "whole")
    with pytest.raises(ServerKilled):
        serve(scenario, folder / "killed", kill_server_at=3)
    after_crash = ServerCheckpoint.load(folder / "killed")
    lines_before = RunFolder(folder / "killed").rounds()
    grid = serve(scenario, folder / "killed", resume=True)
    trained = [grid.server_round(m) for m in grid.sent if m.metadata.message_type == "train"]
    return folder / "whole", folder / "killed", after_crash, lines_before, trained


def test_resumed_run_ends_at_the_configured_rounds(in_process):
    _, resumed, after_crash, lines_before, sent = in_process
    assert sent == [3, 3]  # both sites were asked for round 3 only, numbered as the run's round 3
    assert after_crash.round == 2 and [r.round for r in lines_before] == [1, 2]
    rounds = RunFolder(resumed).rounds()
    assert [r.round for r in rounds] == [1, 2, 3]
    assert rounds[:2] == lines_before  # rounds 1-2 did not run again
    assert ServerCheckpoint.load(resumed).round == 3
    assert RunFolder(resumed).encoder_checkpoint(3).is_file()


def test_resumed_run_equals_the_uninterrupted_one(in_process):
    whole, resumed, after_crash, *_ = in_process
    assert set(after_crash.strategy_state) == {"m_t", "v_t"}  # FedAdam's moments, by name
    final_whole, final_resumed = ServerCheckpoint.load(whole), ServerCheckpoint.load(resumed)
    for key, value in final_whole.arrays.items():
        np.testing.assert_allclose(final_resumed.arrays[key], value, rtol=0, atol=1e-6, err_msg=key)
    for name in ("m_t", "v_t"):
        for key, value in final_whole.strategy_state[name].items():
            np.testing.assert_allclose(final_resumed.strategy_state[name][key], value, rtol=0, atol=1e-8)
    losses = [r.losses["loss"] for r in RunFolder(whole).rounds()]
    assert [r.losses["loss"] for r in RunFolder(resumed).rounds()] == pytest.approx(losses, abs=1e-6)


def test_checkpoint_of_another_scenario_is_refused(in_process):
    whole, *_ = in_process
    checkpoint = ServerCheckpoint.load(whole)
    reference = {k: torch.from_numpy(v) for k, v in checkpoint.arrays.items()}
    with pytest.raises(CheckpointMismatch, match="strategy fedadam"):
        checkpoint.check("fedavg", 3, reference)
    with pytest.raises(CheckpointMismatch, match="past the scenario's 2 rounds"):
        checkpoint.check("fedadam", 2, reference)
    first = next(iter(reference))
    with pytest.raises(CheckpointMismatch, match="model"):
        checkpoint.check("fedadam", 3, {**reference, first: torch.zeros(1)})


def test_resume_needs_the_run_folder():
    with pytest.raises(FederationError, match="--out RUN_DIR"):
        run_scenario("unused.yaml", None, resume=True)


def test_fedavgm_momentum_survives_a_checkpoint(tmp_path):
    """FedAvgM keeps its momentum as a list of arrays (FedAdam: dicts); both round-trip exactly."""
    reference = {"w": torch.zeros(3, 2), "b": torch.zeros(2)}
    fed, sites, run = FederationConfig(strategy="fedavgm", min_sites=1), ("a",), RunFolder(tmp_path)
    strategy = make_strategy(fed, sites, reference, run)
    momentum = [np.arange(6, dtype=np.float64).reshape(3, 2), np.full(2, 0.5, np.float32)]
    strategy.base.momentum_vector = momentum
    arrays = {k: v.numpy() for k, v in reference.items()}
    ServerCheckpoint(1, "fedavgm", arrays, optimizer_state(strategy.base), random.getstate()).save(tmp_path)
    fresh = make_strategy(fed, sites, reference, run, checkpoint=ServerCheckpoint.load(tmp_path))
    assert fresh.done == 1
    restored = fresh.base.momentum_vector
    assert [a.dtype for a in restored] == [np.float64, np.float32]
    assert all(np.array_equal(a, b) for a, b in zip(restored, momentum, strict=True))


def test_server_state_is_kept_by_name_of_the_base_strategy(tmp_path):
    """FedAdam's moments are read from and put back on the base strategy by their names; a base
    strategy that keeps no such state refuses them."""
    reference, sites, run = {"w": torch.zeros(3)}, ("a",), RunFolder(tmp_path)
    plain = make_strategy(FederationConfig(strategy="fedadam", min_sites=1), sites, reference, run)
    moments = {"w": np.array([0.5, -1.0, 2.0])}
    plain.base.m_t, plain.base.v_t = moments, {"w": np.ones(3)}
    assert set(optimizer_state(plain.base)) == {"m_t", "v_t"}
    fresh = make_strategy(FederationConfig(strategy="fedadam", min_sites=1), sites, reference, run)
    restore_optimizer_state(fresh.base, optimizer_state(plain.base))
    np.testing.assert_array_equal(fresh.base.m_t["w"], moments["w"])
    fedavg = make_strategy(FederationConfig(strategy="fedavg", min_sites=1), sites, reference, run)
    with pytest.raises(CheckpointMismatch, match="'m_t', which the scenario's FedAvg does not keep"):
        restore_optimizer_state(fedavg.base, optimizer_state(plain.base))


def test_checkpoint_of_an_older_fedssl_is_refused_in_one_line(tmp_path, capsys):
    """Older fedssl keyed the server moments by wrapper depth ("1.m_t") and wrote no format number:
    restoring them by guess could put them on the wrong strategy, so `--resume` refuses before Flower."""
    (tmp_path / "scenario.yaml").write_text(SCENARIO)
    run_dir = tmp_path / "old"
    (run_dir / "checkpoints").mkdir(parents=True)
    torch.save({"round": 1, "strategy": "fedadam", "arrays": {"w": torch.zeros(3)},
                "strategy_state": {"1.m_t": {"w": torch.zeros(3)}, "1.v_t": {"w": torch.zeros(3)}},
                "random_state": random.getstate(), "epsilon": {}}, RunFolder(run_dir).server_checkpoint)
    with pytest.raises(CheckpointMismatch, match="written by an older fedssl .* start the run afresh"):
        ServerCheckpoint.load(run_dir)
    assert simulate([str(tmp_path / "scenario.yaml"), "--out", str(run_dir), "--resume"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and "older fedssl" in error and error.count("\n") == 1, error
