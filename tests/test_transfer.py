"""`federation.transfer_dtype: float16`: half the bytes on the wire, float32 everywhere else.

Flower-free checks of the cast and of the server's two hooks (float16 out, float32 back in before
validation and aggregation), then one short federation through the real runner, its ServerApp and
ClientApp federating in this process, every message carried as Flower carries it (tests/conftest.py).
"""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedssl.config import ConfigError, FederationConfig, load_scenario
from fedssl.federated import cast_floating, shared_state
from fedssl.objectives import build_objective
from fedssl.report import read_metrics
from server.app import make_strategy
from server.metrics import RoundTracker
from tests.conftest import TINY, NodeGrid, load_scenario_text, simulate_in_process


def test_cast_round_trip_keeps_non_float_entries_and_float16_precision():
    generator = torch.Generator().manual_seed(0)
    state = {"weight": torch.randn(64, 32, generator=generator), "steps": torch.tensor([3, 4])}
    wire = cast_floating(state, "float16")
    assert wire["weight"].dtype == torch.float16 and wire["steps"].dtype == torch.int64
    back = cast_floating(wire, "float32")
    assert back["weight"].dtype == torch.float32 and torch.equal(back["steps"], state["steps"])
    # float16 keeps 11 significant bits: relative error at most 2**-11
    assert torch.allclose(back["weight"], state["weight"], rtol=2.0 ** -11, atol=0.0)
    assert not torch.equal(back["weight"], state["weight"])  # it did round
    assert torch.equal(cast_floating(back, "float16")["weight"], wire["weight"])  # a second trip changes nothing


def round_one(tmp_path, transfer_dtype: str, reply_dtype: torch.dtype):
    """Configure round 1 of a two-site FedAvg and aggregate two replies sent in `reply_dtype`."""
    state = shared_state(build_objective(load_scenario_text(tmp_path)), "encoder")
    tracker = RoundTracker(tmp_path, 1, state)
    strategy = make_strategy(FederationConfig(min_sites=2, transfer_dtype=transfer_dtype), 2, tracker)
    tracker.start_round(1)
    sent = list(strategy.configure_train(1, ArrayRecord(state), ConfigRecord(), NodeGrid()))
    updates = [{k: v + 0.01 * (i + 1) for k, v in state.items()} for i in range(2)]
    replies = [Message(RecordDict({"arrays": ArrayRecord({k: v.to(reply_dtype) for k, v in update.items()}),
                                   "metrics": MetricRecord({"num-examples": 8, "loss": 1.0})}), reply_to=m)
               for update, m in zip(updates, sent)]
    arrays, _ = strategy.aggregate_train(1, replies)
    return state, sent, arrays, tracker


def test_server_sends_float16_and_aggregates_in_float32(tmp_path, flower_messages):
    state, sent, arrays, tracker = round_one(tmp_path, "float16", torch.float16)
    record = tracker.finish_round(1, arrays, None, 0.0, expected=2)
    assert len(sent) == 2
    for msg in sent:
        assert {a.dtype for a in msg.content["arrays"].values()} == {"float16"}
    assert record["sites"] == 2  # both float16 updates passed validation once cast back
    aggregated = arrays.to_torch_state_dict()
    for key, value in state.items():
        assert aggregated[key].dtype == torch.float32
        expected = value + 0.015  # the mean of +0.01 and +0.02, up to float16 rounding of each update
        assert torch.allclose(aggregated[key], expected, rtol=2.0 ** -10, atol=1e-4)


def test_float16_updates_are_rejected_when_the_transfer_is_float32(tmp_path, flower_messages, caplog):
    _, sent, arrays, _ = round_one(tmp_path, "float32", torch.float16)
    assert {a.dtype for a in sent[0].content["arrays"].values()} == {"float32"}
    assert arrays is None  # nothing aggregated
    assert caplog.text.count("dtype float16, expected float32") == 2


def test_unknown_transfer_dtype_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="federation.transfer_dtype: unknown value 'bfloat16'"):
        make_strategy(FederationConfig(transfer_dtype="bfloat16"), 2, RoundTracker(tmp_path, 1, {}))


def test_float16_federation(tmp_path):
    values = yaml.safe_load(TINY)
    values["federation"]["transfer_dtype"] = "float16"
    result, grid = simulate_in_process(yaml.safe_dump(values), tmp_path)
    rounds = read_metrics(result.run_dir / "metrics.jsonl")
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["sites"] == 2 and not r.get("rejected") and math.isfinite(r["loss"]) for r in rounds)
    for message in grid.sent + grid.replies:  # both ways, every floating array travelled as float16
        assert {array.dtype for array in message.content["arrays"].values()} == {"float16"}
    assert rounds[1]["probe_macro_auroc"] == pytest.approx(result.summary["encoders"]["federated"]["macro_auroc"])
    scenario = load_scenario(result.run_dir / "scenario.yaml")
    initial = build_objective(scenario).encoder.state_dict()
    final = torch.load(result.run_dir / "encoder.pt", weights_only=True)
    assert all(final[k].dtype == torch.float32 for k in initial)  # the global model stays float32
    assert any(not torch.equal(final[k], initial[k]) for k in initial)
