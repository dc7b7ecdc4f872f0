"""`federation.transfer_dtype: float16`: half the bytes on the wire, float32 everywhere else.

Flower-free checks of the cast and of the server's two hooks (float16 out, float32 back in before
validation and aggregation). A whole float16 federation is the `fedadam-fedema-float16` variant of
tests/test_federated_variants.py.
"""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message

from fedssl.config import ConfigError, FederationConfig
from fedssl.federated import cast_floating, shared_state
from fedssl.objectives import build_objective
from fedssl.runfolder import RunFolder
from server.strategy import NoSiteReplied, make_strategy
from tests.conftest import NodeGrid, load_scenario_text, site_reply


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


def round_one(tmp_path, transfer_dtype: str, reply_dtype: str):
    """Configure round 1 of a two-site FedAvg and two replies packed in `reply_dtype`."""
    state = shared_state(build_objective(load_scenario_text(tmp_path)), "encoder")
    strategy = make_strategy(FederationConfig(min_sites=2, transfer_dtype=transfer_dtype), ("north", "south"), state,
                             RunFolder(tmp_path))
    sent = list(strategy.configure_train(1, ArrayRecord(state), ConfigRecord(), NodeGrid()))
    updates = [{k: v + 0.01 * (i + 1) for k, v in state.items()} for i in range(2)]
    replies = [Message(site_reply(update, {"num-examples": 8, "loss": 1.0}, reply_dtype), reply_to=m)
               for update, m in zip(updates, sent)]
    return state, sent, strategy, replies


def test_server_sends_float16_and_aggregates_in_float32(tmp_path, flower_messages):
    state, sent, strategy, replies = round_one(tmp_path, "float16", "float16")
    arrays, _ = strategy.aggregate_train(1, replies)
    assert len(sent) == 2
    for msg in sent:
        assert {a.dtype for a in msg.content["arrays"].values()} == {"float16"}
    assert strategy.current_record(1).sites == 2  # both float16 updates passed validation once cast back
    aggregated = arrays.to_torch_state_dict()
    for key, value in state.items():
        assert aggregated[key].dtype == torch.float32
        expected = value + 0.015  # the mean of +0.01 and +0.02, up to float16 rounding of each update
        assert torch.allclose(aggregated[key], expected, rtol=2.0 ** -10, atol=1e-4)


def test_float16_updates_are_rejected_when_the_transfer_is_float32(tmp_path, flower_messages, caplog):
    _, sent, strategy, replies = round_one(tmp_path, "float32", "float16")
    assert {a.dtype for a in sent[0].content["arrays"].values()} == {"float32"}
    with pytest.raises(NoSiteReplied):  # nothing to aggregate
        strategy.aggregate_train(1, replies)
    assert caplog.text.count("dtype float16, expected float32") == 2


def test_unknown_transfer_dtype_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="federation.transfer_dtype: unknown value 'bfloat16'"):
        make_strategy(FederationConfig(transfer_dtype="bfloat16"), ("a", "b"), {}, RunFolder(tmp_path))
