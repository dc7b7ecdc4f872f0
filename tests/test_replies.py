"""Nothing leaves a site but the model: every reply of the ClientApp in a short federated run
holds the shared encoder's weights (packed, with the manifest of their names and shapes) and
scalar metrics, and nothing else.

The run is the real ServerApp and ClientApp federating in this process (tests/conftest.py): the
replies are checked as the server received them, after Flower's serialisation.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from client.app import app as client_app
from client.audit import read_audit
from fedssl.config import load_scenario
from fedssl.federated import shared_state
from fedssl.objectives import build_objective
from fedssl.packing import read_manifest, unpack
from fedssl.plan import Plan
from fedssl.protocol import MANIFEST_KEY, PACKED_KEY, PLAN_KEY
from fedssl.runfolder import RunFolder
from server.strategy import on_the_wire
from tests.conftest import TINY, NodeGrid, serve

FEDPROX_FEDEMA = TINY.replace("federation: {rounds: 2, min_sites: 2}",
                              "federation: {rounds: 2, min_sites: 2, strategy: fedprox, local_update: fedema}")
NODES = {21: 0, 22: 1}  # node id -> partition id (the site's index in the scenario)


@pytest.fixture(scope="module", params=["fedavg", "fedprox-fedema"])
def run(request, tmp_path_factory):
    """Two rounds of TINY's two sites (one at 500 Hz without V4-V6), with FedAvg (the suite's
    finished federation) or FedProx and FedEMA: the scenario, the initial objective and every reply."""
    if request.param == "fedavg":
        result, grid = request.getfixturevalue("finished_federation")
        run_dir = result.run_dir
    else:
        run_dir = tmp_path_factory.mktemp("replies") / "run"
        run_dir.mkdir()
        (run_dir / "scenario.yaml").write_text(FEDPROX_FEDEMA)
        grid = serve(run_dir / "scenario.yaml", run_dir)
    assert [r.rejected for r in RunFolder(run_dir).rounds()] == [[], []]
    scenario = load_scenario(run_dir / "scenario.yaml")
    return scenario, build_objective(scenario), grid.replies


def weights(reply) -> dict:
    """The shared weights a reply carries, unpacked as the server unpacks them."""
    return unpack(reply.content["arrays"][PACKED_KEY].numpy(), reply.content["config"][MANIFEST_KEY])


def test_every_reply_is_the_packed_encoder_its_manifest_and_scalar_metrics(run):
    _, objective, replies = run
    initial = {f"encoder.{k}": v for k, v in objective.encoder.state_dict().items()}  # no heads
    assert len(replies) == 4 and not any(r.has_error() for r in replies)
    for reply in replies:
        content = reply.content
        assert set(content) == {"arrays", "config", "metrics"}
        arrays, config, metrics = content["arrays"], content["config"], content["metrics"]
        assert isinstance(arrays, ArrayRecord) and isinstance(metrics, MetricRecord)
        # one transfer object for the weights: the packed Array, cut into the encoder by the manifest
        assert list(arrays) == [PACKED_KEY] and list(config) == [MANIFEST_KEY]
        assert [name for name, _, _ in read_manifest(config[MANIFEST_KEY])] == list(initial)
        for key, value in weights(reply).items():
            assert value.shape == initial[key].shape and value.dtype == torch.float32
        assert all(type(v) in (int, float) and math.isfinite(v) for v in metrics.values()), dict(metrics)
        assert metrics["num-examples"] > 0


def test_no_ecg_shaped_array_and_no_string_but_the_manifest(run):
    scenario, _, replies = run
    samples = round(scenario.data.window_seconds * scenario.data.sample_rate)
    for reply in replies:
        for value in weights(reply).values():
            shape = tuple(value.shape)
            assert not (len(shape) >= 2 and shape[-2:] in ((12, samples), (samples, 12))), shape
        assert not any(isinstance(v, (str, bytes)) or isinstance(v, list)
                       for v in reply.content["metrics"].values())


def test_sites_trained_the_encoder(run):
    _, objective, replies = run
    initial = shared_state(objective, "encoder")
    for reply in replies:
        received = weights(reply)
        assert any(not torch.equal(received[k], initial[k]) for k in initial)


def test_an_error_reply_names_the_kind_of_failure_but_no_path(tmp_path, flower_messages):
    hidden = tmp_path / "ward-7" / "patient-0042"
    (tmp_path / "scenario.yaml").write_text(f"sites: [{{name: north, folder: {hidden}}}, {{name: south, folder: {hidden}}}]\n")
    scenario = load_scenario(tmp_path / "scenario.yaml")
    initial = shared_state(build_objective(scenario), scenario.federation.share)
    strategy = FedAvg(fraction_evaluate=0.0)
    config = ConfigRecord({"num-rounds": 1, PLAN_KEY: Plan.of(scenario).text})
    (msg, *_) = on_the_wire(strategy.configure_train(1, ArrayRecord(initial), config, NodeGrid(NODES)), "float32")
    reply = client_app(msg, Context(run_id=1, node_id=21, state=RecordDict(),
                                    node_config={"partition-id": 0, "num-partitions": 2},
                                    run_config={"run-dir": str(tmp_path / "run")}))
    assert reply.has_error()
    assert reply.error.reason == "site north: SiteDataError (details in the site's log)"
    # the site's own audit log says the same, and no more
    (entry,) = read_audit(tmp_path / "run" / "sites" / "north")
    assert (entry["outcome"], entry["reason"], entry["sent"]) == ("failed", "SiteDataError (details in the site's log)", None)
    assert "patient-0042" not in json.dumps(entry)
