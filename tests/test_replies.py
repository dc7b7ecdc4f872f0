"""Nothing leaves a site but the model: every reply of the ClientApp in a short federated run
holds the shared encoder's weights and scalar metrics, and nothing else.

The run is driven in-process: the server's strategy (`FedSSLStrategy` over FedAvg or FedProx) sends
the round's instructions, the ClientApp answers them as its SuperNode would, the strategy validates
and aggregates.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, FedProx

from client.app import app as client_app
from fedssl.config import load_scenario
from fedssl.federated import shared_state
from fedssl.objectives import build_objective
from fedssl.runfolder import RunFolder
from server.strategy import FedSSLStrategy
from tests.conftest import NodeGrid

SCENARIO = """
name: replies
seed: 5
data: {window_seconds: 2.0}
train: {batch_size: 8, local_steps: 2, threads: 1}
federation: {rounds: 2, min_sites: 2, local_update: LOCAL_UPDATE}
sites:
  - name: north
    synthetic: {records: 6, sample_rate: 250, duration_seconds: 4.0}
  - name: south
    synthetic: {records: 6, sample_rate: 500, duration_seconds: 4.0, missing_leads: [V4, V5, V6]}
"""
NODES = {21: 0, 22: 1}  # node id -> partition id (the site's index in the scenario)


@pytest.fixture(scope="module", params=[("replace", FedAvg), ("fedema", FedProx)], ids=["fedavg", "fedprox-fedema"])
def run(request, tmp_path_factory, module_flower_messages):
    """Two rounds of two sites; returns the scenario, the initial objective and every reply sent."""
    local_update, strategy_class = request.param
    folder = tmp_path_factory.mktemp("replies")
    (folder / "scenario.yaml").write_text(SCENARIO.replace("LOCAL_UPDATE", local_update))
    scenario = load_scenario(folder / "scenario.yaml")
    objective = build_objective(scenario)
    initial = shared_state(objective, scenario.federation.share)
    run_config = {"scenario": str(folder / "scenario.yaml"), "run-dir": str(folder / "run")}
    strategy = FedSSLStrategy(strategy_class(fraction_evaluate=0.0), name=strategy_class.__name__, reference=initial,
                              run=RunFolder(folder / "run"), rounds=2, sites=[s.name for s in scenario.sites])
    arrays, replies = ArrayRecord(initial), []
    for server_round in (1, 2):
        sent = strategy.configure_train(server_round, arrays, ConfigRecord({"num-rounds": 2}), NodeGrid(NODES))
        answers = [client_app(msg, Context(run_id=1, node_id=msg.metadata.dst_node_id, state=RecordDict(),
                                           node_config={"partition-id": NODES[msg.metadata.dst_node_id],
                                                        "num-partitions": len(NODES)},
                                           run_config=run_config))
                   for msg in sent]
        replies += answers
        arrays, _ = strategy.aggregate_train(server_round, answers)
        assert strategy.current_record(server_round).rejected == []
        assert sorted(strategy.current_record(server_round).site_windows) == ["north", "south"]
    return scenario, objective, replies


def test_every_reply_is_the_encoder_and_scalar_metrics(run):
    _, objective, replies = run
    initial = {f"encoder.{k}": v for k, v in objective.encoder.state_dict().items()}  # no heads
    assert len(replies) == 4 and not any(r.has_error() for r in replies)
    for reply in replies:
        content = reply.content
        assert set(content) == {"arrays", "metrics"} and not content.config_records
        arrays, metrics = content["arrays"], content["metrics"]
        assert isinstance(arrays, ArrayRecord) and isinstance(metrics, MetricRecord)
        assert list(arrays) == list(initial)
        for key, array in arrays.items():
            assert isinstance(array, Array)
            value = array.numpy()
            assert value.shape == tuple(initial[key].shape) and str(value.dtype) == "float32"
        assert all(type(v) in (int, float) and math.isfinite(v) for v in metrics.values()), dict(metrics)
        assert metrics["num-examples"] > 0


def test_no_ecg_shaped_array_and_no_string(run):
    scenario, _, replies = run
    samples = round(scenario.data.window_seconds * scenario.data.sample_rate)
    for reply in replies:
        for array in reply.content["arrays"].values():
            shape = tuple(array.shape)
            assert not (len(shape) >= 2 and shape[-2:] in ((12, samples), (samples, 12))), shape
            assert np.issubdtype(array.numpy().dtype, np.floating)
        assert not any(isinstance(v, (str, bytes)) or isinstance(v, list)
                       for v in reply.content["metrics"].values())


def test_sites_trained_the_encoder(run):
    _, objective, replies = run
    initial = shared_state(objective, "encoder")
    for reply in replies:
        received = reply.content["arrays"].to_torch_state_dict()
        assert any(not np.array_equal(received[k].numpy(), initial[k].numpy()) for k in initial)


def test_an_error_reply_names_the_kind_of_failure_but_no_path(tmp_path, flower_messages):
    hidden = tmp_path / "ward-7" / "patient-0042"
    (tmp_path / "scenario.yaml").write_text(f"sites: [{{name: north, folder: {hidden}}}, {{name: south, folder: {hidden}}}]\n")
    scenario = load_scenario(tmp_path / "scenario.yaml")
    initial = shared_state(build_objective(scenario), scenario.federation.share)
    strategy = FedAvg(fraction_evaluate=0.0)
    (msg, *_) = strategy.configure_train(1, ArrayRecord(initial), ConfigRecord({"num-rounds": 1}), NodeGrid(NODES))
    reply = client_app(msg, Context(run_id=1, node_id=21, state=RecordDict(),
                                    node_config={"partition-id": 0, "num-partitions": 2},
                                    run_config={"scenario": str(tmp_path / "scenario.yaml"), "run-dir": str(tmp_path / "run")}))
    assert reply.has_error()
    assert "SiteDataError" in reply.error.reason and "patient-0042" not in reply.error.reason
