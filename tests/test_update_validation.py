"""Update validation and robust aggregation at the strategy level (`FedSSLStrategy` over each base
strategy), without Flower processes.

Sites' replies are built as Flower builds them (`Message(..., reply_to=instruction)`) around
synthetic encoder updates: the scenario's encoder plus a shared direction and per-site noise.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg, Krum, MultiKrum, Strategy

from fedssl.config import ConfigError, FederationConfig
from fedssl.federated import shared_state
from fedssl.objectives import build_objective
from fedssl.protocol import MANIFEST_KEY, PACKED_KEY
from fedssl.runfolder import RunFolder
from server.robust import robust_options
from server.strategy import STRATEGIES, FedSSLStrategy, NoSiteReplied, check_federation
from tests.conftest import NodeGrid, site_reply, small_scenario

NODES = [11, 12, 13, 14]


pytestmark = pytest.mark.usefixtures("flower_messages")  # every test here makes Messages


class _Spy(FedAvg):
    """FedAvg that remembers which nodes' replies it was asked to aggregate."""

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        self.nodes = sorted(m.metadata.src_node_id for m in replies)
        return super().aggregate_train(server_round, replies)


@pytest.fixture(scope="module")
def encoder():
    return shared_state(build_objective(small_scenario()), "encoder")


def honest(encoder: dict, site: int) -> dict[str, torch.Tensor]:
    """One site's trained encoder: the shared step (same at every site) plus 10% site noise."""
    shared, own = torch.Generator().manual_seed(0), torch.Generator().manual_seed(site + 1)
    return {k: v + 1e-2 * (torch.randn(v.shape, generator=shared) + 0.1 * torch.randn(v.shape, generator=own))
            for k, v in encoder.items()}


def scaled(encoder: dict, update: dict, factor: float) -> dict:
    return {k: encoder[k] + factor * (update[k] - encoder[k]) for k in encoder}


def run_round(strategy: Strategy, encoder: dict, updates: list, metrics: list[dict] | None = None):
    """One round: `updates[i]` (state dict or full RecordDict) is the reply of node NODES[i], a state
    dict sent as a site sends it to fedssl's strategy (packed) or to Flower's own (an Array per tensor)."""
    sent = {m.metadata.dst_node_id: m
            for m in strategy.configure_train(1, ArrayRecord(encoder), ConfigRecord(), NodeGrid(NODES))}
    replies = []
    for i, update in enumerate(updates):
        metric = metrics[i] if metrics else {"num-examples": 8, "loss": 1.0}
        if isinstance(update, RecordDict):
            content = update
        elif isinstance(strategy, FedSSLStrategy):
            content = site_reply(update, metric)
        else:
            content = RecordDict({"arrays": ArrayRecord(update), "metrics": MetricRecord(metric)})
        replies.append(Message(content, reply_to=sent[NODES[i]]))
    arrays, _ = strategy.aggregate_train(1, replies)
    return None if arrays is None else arrays.to_torch_state_dict()


def validated(base: Strategy, encoder: dict, run_dir, **kwargs) -> FedSSLStrategy:
    """`base` aggregating in fedssl's round: validation first (no round is finished here, so nothing
    is written to `run_dir`)."""
    return FedSSLStrategy(base, name="test", reference=encoder, run=RunFolder(run_dir), rounds=1, **kwargs)


def rejected(strategy: FedSSLStrategy) -> list[dict]:
    """The updates validation left out of round 1, as its record has them."""
    return strategy.current_record(1).rejected


def distance(a: dict, b: dict) -> float:
    return float(torch.sqrt(sum(((a[k].double() - b[k].double()) ** 2).sum() for k in a)))


def fedavg(n: int = 4, **kwargs) -> FedAvg:
    return FedAvg(fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=n, **kwargs)


def _nan(encoder, update):
    key = next(iter(update))
    update[key] = update[key].clone()
    update[key].view(-1)[3] = float("nan")
    return update


def _replace(key_index, value_fn):
    def corrupt(encoder, update):
        key = list(update)[key_index]
        return {**update, key: value_fn(update[key])}
    return corrupt


def _records(metrics=None, extra=None, dtype="float32", manifest=None):
    """The reply packed in `dtype`, with other `metrics`, `extra` records, or another `manifest`
    (a function of the one the site made; None: no manifest)."""
    def corrupt(encoder, update):
        content = site_reply(update, metrics or {"num-examples": 8, "loss": 1.0}, dtype)
        for name, record in (extra or {}).items():
            content[name] = record
        if manifest:
            content["config"] = ConfigRecord(manifest(content["config"][MANIFEST_KEY]))
        return content
    return corrupt


def _wider(manifest: str) -> dict:
    """A manifest whose first tensor has one more column than was packed."""
    entries = json.loads(manifest)
    entries[0][1][-1] += 1
    return {MANIFEST_KEY: json.dumps(entries)}


BAD_UPDATES = {
    "nan": (_nan, "non-finite values"),
    "inf": (_replace(0, lambda v: torch.full_like(v, float("inf"))), "non-finite values"),
    "wrong shape": (_replace(1, lambda v: v[..., :-1].contiguous()), "shape"),
    "wrong dtype": (_records(dtype="float64"), "dtype float64, expected float32"),
    "missing key": (lambda e, u: {k: v for k, v in list(u.items())[1:]}, "encoder keys differ"),
    "extra key": (lambda e, u: {**u, "decoder.weight": torch.zeros(64, 12)}, "encoder keys differ"),
    "scaled x100": (lambda e, u: scaled(e, u, 100.0), "exceeds 5 x the round's median"),
    "no weight": (_records(metrics={"loss": 1.0}), "'num-examples' missing"),
    "nan loss": (_records(metrics={"num-examples": 8, "loss": float("nan")}), "'loss' is not a finite scalar"),
    "list metric": (_records(metrics={"num-examples": 8, "loss": [1.0, 2.0]}), "'loss' is not a finite scalar"),
    "other metric names": (_records(metrics={"num-examples": 8, "loss": 1.0, "x": 2.0}), "metric names"),
    "config record": (_records(extra={"paths": ConfigRecord({"record": "/data/site/r1.hea"})}), "ConfigRecord"),
    "two array records": (_records(extra={"more": ArrayRecord({"x": torch.zeros(3)})}), "2 ArrayRecord"),
    "no manifest": (_records(manifest=lambda m: {}), f"holding only {MANIFEST_KEY!r}"),
    "more than the manifest": (_records(manifest=lambda m: {MANIFEST_KEY: m, "record": "/data/site/r1.hea"}),
                               f"holding only {MANIFEST_KEY!r}"),
    "manifest not JSON": (_records(manifest=lambda m: {MANIFEST_KEY: m[:-1]}), "the manifest is not JSON"),
    "manifest does not fit": (_records(manifest=_wider), "the manifest describes"),
}


@pytest.mark.parametrize("case", sorted(BAD_UPDATES))
def test_bad_update_rejected_good_ones_kept(case, encoder, tmp_path):
    corrupt, reason = BAD_UPDATES[case]
    spy = _Spy(fraction_evaluate=0.0, min_train_nodes=4, min_available_nodes=4)
    updates = [honest(encoder, i) for i in range(4)]
    updates[2] = corrupt(encoder, updates[2])
    strategy = validated(spy, encoder, tmp_path)
    aggregate = run_round(strategy, encoder, updates)
    assert [(r["node_id"], r["round"]) for r in rejected(strategy)] == [(NODES[2], 1)]
    assert reason in rejected(strategy)[0]["reason"]
    assert spy.nodes == [NODES[0], NODES[1], NODES[3]]
    assert strategy.current_record(1).sites == 3
    clean = run_round(fedavg(3), encoder, [updates[0], updates[1], updates[3]])
    assert distance(aggregate, clean) < 1e-6


def test_honest_sites_all_kept(encoder, tmp_path):
    spy = _Spy(fraction_evaluate=0.0, min_train_nodes=4, min_available_nodes=4)
    strategy = validated(spy, encoder, tmp_path)
    run_round(strategy, encoder, [honest(encoder, i) for i in range(4)])
    assert rejected(strategy) == [] and spy.nodes == NODES


def test_norm_bound_configurable_and_off(encoder, tmp_path):
    updates = [honest(encoder, i) for i in range(4)]
    updates[1] = scaled(encoder, updates[1], 3.0)
    for ratio, expected in ((2.0, [NODES[1]]), (5.0, []), (0.0, [])):
        strategy = validated(fedavg(), encoder, tmp_path, max_update_ratio=ratio)
        run_round(strategy, encoder, updates)
        assert [r["node_id"] for r in rejected(strategy)] == expected
    with pytest.raises(ConfigError, match="max_update_ratio"):
        check_federation(FederationConfig(max_update_ratio=0.5), 4)


def test_rejection_names_the_site_and_is_json(encoder, tmp_path, caplog):
    strategy = validated(fedavg(2), encoder, tmp_path, sites=("north", "south"))
    updates = [_nan(encoder, honest(encoder, 0)), honest(encoder, 1)]
    metrics = [{"num-examples": 8, "loss": 1.0, "site-index": i} for i in range(2)]
    run_round(strategy, encoder, updates, metrics)
    (rejection,) = rejected(strategy)
    assert rejection == {"round": 1, "node_id": NODES[0], "site": "north", "reason": rejection["reason"]}
    assert "non-finite values" in rejection["reason"]
    assert json.loads(strategy.current_record(1).to_json())["rejected"] == [rejection]
    assert strategy.current_record(1).site_windows == {"south": 8}
    assert "rejected the update of site north (node 11)" in caplog.text


def test_error_replies_pass_through_and_all_rejected_is_no_update(encoder, tmp_path, caplog):
    strategy = validated(fedavg(2), encoder, tmp_path)
    sent = list(strategy.configure_train(1, ArrayRecord(encoder), ConfigRecord(), NodeGrid(NODES)))
    nan = _nan(encoder, honest(encoder, 0))
    replies = [Message(Error(code=1000, reason="site south: boom"), reply_to=sent[0]),
               Message(site_reply(nan, {"num-examples": 8}), reply_to=sent[1])]
    with pytest.raises(NoSiteReplied, match=r"round 1: no site returned an update \(1 error reply\)"):
        strategy.aggregate_train(1, replies)  # the run stops: the next round would fail alike
    assert f"rejected the update of node {sent[1].metadata.dst_node_id}: " in caplog.text


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_fedssl_round_is_transparent_for_honest_sites(name, encoder, tmp_path):
    updates = [honest(encoder, i) for i in range(2)]
    plain = run_round(STRATEGIES[name](min_train_nodes=2, min_available_nodes=2), encoder, updates)
    strategy = validated(STRATEGIES[name](min_train_nodes=2, min_available_nodes=2), encoder, tmp_path)
    wrapped = run_round(strategy, encoder, updates)
    assert rejected(strategy) == [] and distance(wrapped, plain) == 0.0


# -- the attack: four sites, one sends NaNs, another a x100 update --------------------------------

ROBUST = {
    "fedavg": lambda: fedavg(),
    "fedmedian": lambda: FedMedian(fraction_evaluate=0.0, min_train_nodes=4, min_available_nodes=4),
    "fedtrimmedavg": lambda: FedTrimmedAvg(fraction_evaluate=0.0, min_train_nodes=4, min_available_nodes=4, beta=0.25),
    "krum": lambda: Krum(fraction_evaluate=0.0, min_train_nodes=4, min_available_nodes=4, num_malicious_nodes=1),
    "multikrum": lambda: MultiKrum(fraction_evaluate=0.0, min_train_nodes=4, min_available_nodes=4,
                                   num_malicious_nodes=1, num_nodes_to_select=2),
}


@pytest.mark.parametrize("name", sorted(ROBUST))
def test_attack_validated_aggregate_stays_near_the_honest_one(name, encoder, tmp_path):
    good = [honest(encoder, i) for i in range(4)]
    attack = [good[0], _nan(encoder, dict(good[1])), scaled(encoder, good[2], 100.0), good[3]]
    clean = run_round(fedavg(2), encoder, [good[0], good[3]])  # the aggregate without the attackers
    step = distance(clean, encoder)
    strategy = validated(ROBUST[name](), encoder, tmp_path)
    aggregate = run_round(strategy, encoder, attack)
    assert sorted(r["node_id"] for r in rejected(strategy)) == [NODES[1], NODES[2]]
    assert distance(aggregate, clean) < 0.1 * step


def test_attack_breaks_plain_fedavg(encoder):
    good = [honest(encoder, i) for i in range(4)]
    attack = [good[0], _nan(encoder, dict(good[1])), scaled(encoder, good[2], 100.0), good[3]]
    aggregate = run_round(fedavg(), encoder, attack)
    assert not all(torch.isfinite(v).all() for v in aggregate.values())
    without_nan = run_round(fedavg(3), encoder, [good[0], attack[2], good[3]])
    assert distance(without_nan, encoder) > 20 * distance(good[0], encoder)


@pytest.mark.parametrize("name", ["fedmedian", "krum", "multikrum"])
def test_robust_strategy_alone_resists_a_scaled_update(name, encoder):
    good = [honest(encoder, i) for i in range(4)]
    attack = [good[0], good[1], scaled(encoder, good[2], 100.0), good[3]]
    clean = run_round(fedavg(3), encoder, [good[0], good[1], good[3]])
    aggregate = run_round(ROBUST[name](), encoder, attack)
    assert distance(aggregate, clean) < 0.1 * distance(clean, encoder)


# -- the federation section's robust-aggregation keys -------------------------------------------

def fed(strategy, **kwargs):
    """A federation section with the proposed keys (see the report; FederationConfig once merged)."""
    return SimpleNamespace(**{"strategy": strategy, "trim_beta": 0.2, "malicious_sites": 0, "krum_select": 0,
                              "max_update_ratio": 5.0, **kwargs})


def test_robust_options():
    assert robust_options(fed("fedavg"), 2) == {} == robust_options(fed("fedmedian"), 2)
    assert robust_options(fed("fedtrimmedavg", trim_beta=0.25), 4) == {"beta": 0.25}
    assert robust_options(fed("krum"), 2) == {"num_malicious_nodes": 0}
    assert robust_options(fed("krum", malicious_sites=1), 5) == {"num_malicious_nodes": 1}
    assert robust_options(fed("multikrum", malicious_sites=1), 5) == {"num_malicious_nodes": 1,
                                                                        "num_nodes_to_select": 4}
    assert robust_options(fed("multikrum", malicious_sites=1, krum_select=2), 5)["num_nodes_to_select"] == 2
    for section, num_sites, key in ((fed("krum", malicious_sites=1), 4, "malicious_sites"),
                                    (fed("multikrum", krum_select=5), 4, "krum_select"),
                                    (fed("fedtrimmedavg", trim_beta=0.5), 4, "trim_beta"),
                                    (fed("fedavg", max_update_ratio=0.5), 4, "max_update_ratio")):
        with pytest.raises(ConfigError, match=f"federation.{key}"):
            robust_options(section, num_sites)
    Krum(**robust_options(fed("krum", malicious_sites=1), 5))
    MultiKrum(**robust_options(fed("multikrum", malicious_sites=1), 5))
    FedTrimmedAvg(**robust_options(fed("fedtrimmedavg"), 5))


def test_array_record_dtype_is_checked_on_the_decoded_array(encoder, tmp_path):
    """A reply whose Array metadata claims float32 but whose bytes are float64 is still caught."""
    content = site_reply(honest(encoder, 0), {"num-examples": 8, "loss": 1.0})
    lying = Array(content["arrays"][PACKED_KEY].numpy().astype("float64"))
    lying.dtype = "float32"
    content["arrays"] = ArrayRecord({PACKED_KEY: lying})
    strategy = validated(fedavg(2), encoder, tmp_path)
    run_round(strategy, encoder, [content, honest(encoder, 1)])
    assert len(rejected(strategy)) == 1 and "dtype float64" in rejected(strategy)[0]["reason"]
