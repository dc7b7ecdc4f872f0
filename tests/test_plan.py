"""The plan travels with the round, the site decides what it accepts (fedssl/plan.py, client/site_round.py).

The ServerApp sends the plan in every train and evaluate message; the ClientApps, given no scenario,
train from it. A site's policy (its site file) refuses a plan before any data is read, and the
round goes on with the others; with manual approval a new plan waits at the site until approved.
Every message a site answers is a line of its audit log, whose hash of what it sent matches the
server's record of what it received. Federations run in this process (tests/conftest.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Error, RecordDict

from client.approval import approve, is_approved, pending_plans, request_approval
from client.audit import AUDIT_FILE, read_audit, record
from client.site_round import respond
from fedssl.config import ConfigError, ObjectiveConfig, PrivacyConfig, load_scenario
from fedssl.data.synthetic import write_synthetic_site
from fedssl.federated import shared_state
from fedssl.objectives import build_objective
from fedssl.plan import Plan, policy_problems
from fedssl.protocol import (PLAN_DECLINED_CODE, PLAN_KEY, SERVER_ROUND_KEY, payload_sha256, reason_site,
                             site_reason)
from fedssl.runfolder import RoundRecord, RunFolder
from fedssl.sitefile import SiteFile, SitePolicy, load_site_file, save_site_file
from tests.conftest import FIRST_NODE_ID, RECORDS, TINY, ServerKilled, load_scenario_text, serve

FEDERATED_EVALUATION = TINY.replace("  every_round: false", "  every_round: false\n  federated: true")
RECORDS_NORTH = 6  # TINY's north: six synthetic records
REFUSED = ("objective cpc is not accepted (policy.objectives: hybrid, generative); "
           "trains without DP-SGD but policy.require_dp is set")


def site_file(home, site: str, **policy) -> str:
    """`home/site.yaml` of `site`: records, window cache and state under `home`, `policy` as given."""
    return save_site_file(SiteFile(site=site, records=str(home / "records"), work=str(home / "work"),
                                   state=str(home / "state"), policy=SitePolicy(**policy)), home / "site.yaml")


# -- the plan -------------------------------------------------------------------------------------

def test_the_plan_is_what_a_site_needs_and_its_fingerprint_follows_its_content(tmp_path):
    scenario = load_scenario_text(tmp_path)
    plan = Plan.of(scenario)
    # the site's scenario from the plan alone: everything it trains and probes with
    rebuilt = plan.scenario()
    for section in ("name", "seed", "data", "model", "objective", "train", "federation", "privacy", "sites"):
        assert getattr(rebuilt, section) == getattr(scenario, section), section
    assert plan.values["evaluation"] == {"test_fraction": 0.5, "probe_l2": 1e-3}  # not the held-out data
    # canonical: the same content however it was spaced or ordered, so the same fingerprint
    reordered = json.dumps(dict(reversed(list(plan.values.items()))), indent=1)
    assert Plan.from_json(reordered) == plan and Plan.of(scenario).fingerprint == plan.fingerprint
    assert len(plan.fingerprint) == 64 and plan.short == plan.fingerprint[:12]
    changed = dataclasses.replace(scenario, objective=ObjectiveConfig(name="hybrid"))
    assert Plan.of(changed).fingerprint != plan.fingerprint


@pytest.mark.parametrize("text, message", [
    ("{not json", "the message's plan is not JSON"),
    ("[1, 2]", "the message's plan is not a JSON object"),
    ('{"train": {"batch_size": -1}}', "the message's plan: train.batch_size: must be a finite number > 0"),
    ('{"objective": {"nmae": "cpc"}}', "the message's plan: objective: unknown key(s) ['nmae']"),
])
def test_a_bad_plan_is_one_clear_config_error(text, message):
    with pytest.raises(ConfigError) as caught:
        Plan.from_json(text).scenario()
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def test_policy_names_each_setting_it_refuses(tmp_path):
    scenario = load_scenario_text(tmp_path)  # cpc, no DP
    assert policy_problems(SitePolicy(), scenario, "north") == []
    assert policy_problems(SitePolicy(objectives=("hybrid", "generative"), require_dp=True), scenario,
                           "north") == REFUSED.split("; ")
    refusing = SitePolicy(encoders=("st_mem",), share=("encoder",), max_epsilon=4.0, max_local_steps=2)
    everything = dataclasses.replace(scenario, federation=dataclasses.replace(scenario.federation, share="all"))
    assert policy_problems(refusing, everything, "south") == [
        "encoder conv_transformer is not accepted (policy.encoders: st_mem)",
        "shares all but policy.share allows encoder",
        "trains without DP-SGD but policy.max_epsilon is 4",
        "local_steps 3 exceeds policy.max_local_steps 2",
    ]
    loose_dp = dataclasses.replace(scenario, privacy=PrivacyConfig(enabled=True, target_epsilon=8.0))
    assert policy_problems(refusing, loose_dp, "north")[1] == "target epsilon 8 exceeds policy.max_epsilon 4"
    assert policy_problems(SitePolicy(require_dp=True, max_epsilon=8.0), loose_dp, "north") == []


# -- the protocol's pieces --------------------------------------------------------------------------

def test_payload_hash_covers_names_bytes_and_order():
    arrays = [("a", b"\x01\x02"), ("b", b"\x03")]
    assert payload_sha256(arrays) == payload_sha256(iter(arrays))
    assert len({payload_sha256(arrays), payload_sha256(arrays[::-1]), payload_sha256([("a", b"\x01\x02"), ("c", b"\x03")]),
                payload_sha256([("a", b"\x01"), ("b", b"\x02\x03")]), payload_sha256([("ab", b""), ("", b"")])}) == 5
    assert payload_sha256([("a", b"bc")]) != payload_sha256([("ab", b"c")])  # no collision by concatenation


def test_an_error_reason_names_its_site_only_if_the_site_is_known():
    assert reason_site(site_reason("south", "objective cpc is not accepted: x"), ("north", "south")) == (
        "south", "objective cpc is not accepted: x")
    assert reason_site(site_reason("east", "r"), ("north", "south")) == (None, "site east: r")
    assert reason_site("node unavailable", ("north",)) == (None, "node unavailable")


# -- approval and audit, as `fedssl node` uses them -------------------------------------------------

def test_a_pending_plan_is_approved_by_a_prefix_of_its_fingerprint(tmp_path):
    first, second = "ab" + "0" * 62, "ac" + "1" * 62
    assert pending_plans(tmp_path) == {} and not is_approved(tmp_path, first)
    request_approval(tmp_path, first, {"name": "one"})
    request_approval(tmp_path, second, {"name": "two"})
    assert pending_plans(tmp_path) == {first: {"name": "one"}, second: {"name": "two"}}
    with pytest.raises(ValueError, match="plan a is ambiguous: it starts 2 pending plans"):
        approve(tmp_path, "a")
    assert approve(tmp_path, "AB0") == first  # as a person types it
    assert is_approved(tmp_path, first) and not is_approved(tmp_path, second)
    assert pending_plans(tmp_path) == {second: {"name": "two"}}
    assert approve(tmp_path, first[:8]) == first  # again: nothing changes
    for wrong, message in (("ff", "no pending plan ff in .* \\(pending: ac1111111111\\)"),
                           ("../x", "expected a plan fingerprint or its first hex digits")):
        with pytest.raises(ValueError, match=message) as caught:
            approve(tmp_path, wrong)
        assert "\n" not in str(caught.value)
    with pytest.raises(ValueError, match="not a plan fingerprint"):
        request_approval(tmp_path, "../../etc/passwd", {})


def test_the_audit_log_is_one_stamped_line_per_entry(tmp_path):
    assert read_audit(tmp_path) == []
    record(tmp_path, {"round": 1, "outcome": "trained"})
    record(tmp_path, {"round": 2, "outcome": "declined"})
    with (tmp_path / AUDIT_FILE).open("a") as f:
        f.write('{"round": 3, "outc')  # a line still being written
    entries = read_audit(tmp_path)
    assert [(e["round"], e["outcome"]) for e in entries] == [(1, "trained"), (2, "declined")]
    assert all(e["time"].endswith("Z") and e["time"][:2] == "20" for e in entries)


# -- the site's answer to a message -----------------------------------------------------------------

def message(scenario, server_round: int = 1) -> RecordDict:
    initial = shared_state(build_objective(scenario), scenario.federation.share)
    return RecordDict({"arrays": ArrayRecord(initial),
                       "config": ConfigRecord({SERVER_ROUND_KEY: server_round, PLAN_KEY: Plan.of(scenario).text})})


def test_a_bad_site_file_is_one_clear_line_in_the_site_log(tmp_path, caplog):
    scenario = load_scenario_text(tmp_path)
    bad = tmp_path / "site.yaml"
    bad.write_text("site: north\nrecords: r\nwork: w\nstate: s\npolicy: {share: [heads]}\n")
    with pytest.raises(ConfigError) as caught:
        load_site_file(bad)
    line = f"{bad}: policy.share: expected a non-empty list of ['encoder', 'all'], got ['heads']"
    assert str(caught.value) == line
    with caplog.at_level(logging.ERROR):
        reply = respond("train", message(scenario), {}, {"site-file": str(bad)}, run_id=7)
    assert isinstance(reply, Error) and reply.reason == "site ?: ConfigError (details in the site's log)"
    assert f"fedssl | site ?: ConfigError: {line}\n" in caplog.text
    assert not (tmp_path / "s").exists()  # no state folder: nothing written, nothing audited


def test_a_site_not_in_the_plan_is_a_clear_error(tmp_path, caplog):
    scenario = load_scenario_text(tmp_path)
    with caplog.at_level(logging.ERROR):
        reply = respond("train", message(scenario), {}, {"site-file": site_file(tmp_path, "east")}, run_id=7)
    assert reply.reason == "site ?: ConfigError (details in the site's log)"
    assert "site 'east' is not in the plan; its sites are ['north', 'south']" in caplog.text


# -- federations in this process ----------------------------------------------------------------------

def test_sites_without_the_scenario_train_from_the_plan_it_is_the_same_every_round(finished_federation):
    result, grid = finished_federation
    assert all("scenario" not in context.run_config for context in grid.contexts.values())
    scenario = load_scenario(result.run_dir / "scenario.yaml")
    plan = Plan.of(scenario)
    assert [int(m.content["config"][SERVER_ROUND_KEY]) for m in grid.sent] == [1, 1, 2, 2]
    assert {m.content["config"][PLAN_KEY] for m in grid.sent} == {plan.text}  # one plan, every round
    rounds = RunFolder(result.run_dir).rounds()
    assert [(r.sites, r.plan) for r in rounds] == [(2, plan.fingerprint)] * 2
    # the server's hash of what each site sent, as received
    replies = {(grid.server_round(m), int(m.content["metrics"]["site-index"])): m for m in grid.replies}
    for r in rounds:
        assert r.received == {site: payload_sha256((k, a.data) for k, a in replies[r.round, i].content["arrays"].items())
                              for i, site in enumerate(("north", "south"))}
    for site in ("north", "south"):  # each site's audit log: the same hashes
        trained = read_audit(result.run_dir / "sites" / site)
        assert [(e["round"], e["message"], e["outcome"], e["plan"]) for e in trained] == [
            (1, "train", "trained", plan.fingerprint), (2, "train", "trained", plan.fingerprint)]
        assert [e["sent"]["sha256"] for e in trained] == [r.received[site] for r in rounds]


@pytest.fixture(scope="module")
def refused(tmp_path_factory):
    """FEDERATED_EVALUATION's two rounds: north simulated, south from a site file whose policy refuses
    the plan (and whose records do not exist: a site that declines never reads them)."""
    folder = tmp_path_factory.mktemp("refused")
    (folder / "scenario.yaml").write_text(FEDERATED_EVALUATION)
    south = site_file(folder / "south", "south", objectives=("hybrid", "generative"), require_dp=True)
    with pytest.MonkeyPatch.context() as patch:
        logs = []
        patch.setattr("server.strategy.log", lambda level, text, *args: logs.append(text % args))
        grid = serve(folder / "scenario.yaml", folder / "run", site_files={1: south})
    return folder, grid, logs


def test_a_site_whose_policy_refuses_the_plan_declines_and_the_round_goes_on(refused):
    folder, _, logs = refused
    rounds = RunFolder(folder / "run").rounds()
    assert [r.round for r in rounds] == [1, 2]
    for r in rounds:
        assert r.declined == [{"node_id": FIRST_NODE_ID + 1, "site": "south", "code": PLAN_DECLINED_CODE,
                               "reason": REFUSED}]
        assert list(r.site_windows) == ["north"] and r.sites == 1 and list(r.received) == ["north"]
        assert r.errors == []
    assert f"fedssl | site south declines round 1: {REFUSED}" in logs
    assert f"fedssl | site south declines the evaluation of round 2: {REFUSED}" in logs
    assert not (folder / "south" / "work").exists()  # declined before any data was read
    report = (folder / "run" / "report.md").read_text()
    assert f"| 1 | south | declined | {REFUSED} |" in report and "| 2 | trained | declined |" in report


def test_every_answer_is_audited_train_and_evaluate(refused):
    folder, grid, _ = refused
    plan = Plan.of(load_scenario(folder / "run" / "scenario.yaml")).fingerprint
    declined = read_audit(folder / "south" / "state")
    assert [(e["run"], e["round"], e["message"], e["outcome"], e["plan"]) for e in declined] == [
        (1, 1, "train", "declined", plan), (1, 1, "evaluate", "declined", plan),
        (1, 2, "train", "declined", plan), (1, 2, "evaluate", "declined", plan)]
    assert all(e["reason"] == REFUSED and e["records"] is None and e["sent"] is None for e in declined)
    north = read_audit(folder / "run" / "sites" / "north")
    assert [(e["round"], e["message"], e["outcome"]) for e in north] == [
        (1, "train", "trained"), (1, "evaluate", "evaluated"), (2, "train", "trained"), (2, "evaluate", "evaluated")]
    rounds = RunFolder(folder / "run").rounds()
    trained, evaluated = north[0::2], north[1::2]
    assert [e["sent"]["sha256"] for e in trained] == [r.received["north"] for r in rounds]
    assert all(e["steps"] == 3 and e["examples"] == 24 and e["epsilon"] is None and e["records"] == RECORDS_NORTH
               and e["windows"] > 0 for e in trained)
    encoder = [name for name, _, _ in trained[0]["sent"]["arrays"]]
    assert encoder and all(name.startswith("encoder.") for name in encoder)
    first = next(m for m in grid.replies if not m.has_error() and "arrays" in m.content)  # north's, round 1
    assert trained[0]["sent"]["bytes"] == sum(len(a.data) for a in first.content["arrays"].values())
    assert all(e["sent"] is None and e["steps"] == 0 and e["reason"] is None for e in evaluated)
    assert "/" not in json.dumps([e | {"time": ""} for e in north + declined])  # never a path



def test_a_plan_awaiting_approval_is_declined_then_trains_once_approved(tmp_path):
    (tmp_path / "scenario.yaml").write_text(TINY)
    home = tmp_path / "south"
    write_synthetic_site(home / "records", dataclasses.replace(RECORDS, records=4), seed=5)
    south = site_file(home, "south", manual_approval=True)
    with pytest.raises(ServerKilled):  # the coordinator stops after round 1 ...
        serve(tmp_path / "scenario.yaml", tmp_path / "run", kill_server_at=2, site_files={1: south})
    plan = Plan.of(load_scenario(tmp_path / "run" / "scenario.yaml"))
    (first,) = RunFolder(tmp_path / "run").rounds()
    waiting = f"plan {plan.short} awaits approval at the site (fedssl node approve)"
    assert [(d["site"], d["code"], d["reason"]) for d in first.declined] == [("south", PLAN_DECLINED_CODE, waiting)]
    assert pending_plans(home / "state") == {plan.fingerprint: plan.values}
    assert approve(home / "state", plan.short[:6]) == plan.fingerprint  # ... a person approves at the site ...
    serve(tmp_path / "scenario.yaml", tmp_path / "run", resume=True, site_files={1: south})  # ... and it goes on
    second = RunFolder(tmp_path / "run").rounds()[1]
    assert set(second.site_windows) == {"north", "south"} and second.declined == []
    audit = read_audit(home / "state")
    assert [(e["round"], e["outcome"], e["reason"]) for e in audit] == [(1, "declined", waiting), (2, "trained", None)]
    assert audit[1]["sent"]["sha256"] == second.received["south"] and audit[1]["records"] == 4
    assert RoundRecord.from_json(json.dumps({"round": 1})).received == {}  # older lines still load
