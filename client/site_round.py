"""One site's answer to one message: the round's local training or its federated probe.

Everything heavy a site does lives here (torch, its windows, the objective, DP-SGD); `client/app.py`
is the Flower glue that hands each message to `respond`; on a node with a warm worker
(client/worker.py) both run in that one process, so a message costs no imports there.

The site knows the run from the plan in the message alone (fedssl/plan.py), and itself from its
node config (`node_of`): a site file in deployment, a partition id in simulation. Before it reads
any data it reviews the plan against its site file's policy and, with `manual_approval`, declines a
plan not yet approved (client/approval.py). Whatever comes of a message, trained, evaluated,
declined or failed, is one line of the site's audit log (client/audit.py) before the reply leaves.
"""

from __future__ import annotations

import dataclasses
import traceback
import zlib
from dataclasses import dataclass
from logging import ERROR, INFO
from pathlib import Path

from flwr.app import ConfigRecord, Error, MetricRecord, RecordDict
from flwr.common import log
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from client import audit
from client.approval import is_approved, request_approval
from client.state import (load_fedema_state, load_local_state, load_privacy_ledger,
                          save_fedema_state, save_local_state)
from client.wire import received_state, reply_records
from fedssl.config import ConfigError, Scenario, SiteConfig
from fedssl.data.site import load_site
from fedssl.data.windows import WindowSet
from fedssl.evaluate import linear_probe
from fedssl.federated import cast_floating, clip_update, encoder_state, fedema_start, shared_state
from fedssl.objectives import build_objective
from fedssl.packing import read_manifest
from fedssl.plan import Plan, policy_problems
from fedssl.privacy import PrivacyBudgetExceeded, PrivacyLedger
from fedssl.protocol import (COMPUTE_SECONDS_KEY, DELTA_KEY, DP_SGD_KEY, EPSILON_KEY, EXAMPLES_SEEN_KEY,
                             FEDEMA_MU_KEY, MANIFEST_KEY, NEW_HEADS_KEY, PLAN_DECLINED_CODE, PLAN_KEY,
                             PRIVACY_BUDGET_CODE, PRIVACY_BUDGET_REASON, PROBE_AUROC_KEY, PROXIMAL_MU_KEY,
                             SERVER_ROUND_KEY, SITE_ERROR_CODE, SITE_INDEX_KEY, WEIGHT_KEY, payload_sha256,
                             site_reason)
from fedssl.runfolder import RunFolder
from fedssl.sitefile import SitePolicy, load_site_file
from fedssl.train import train_local


@dataclass(frozen=True)
class Node:
    """This node's site and its folders: the site's entry in the plan (with, from a site file, this
    machine's records and labels), its window cache (`work`), its state folder (heads, privacy
    ledger, audit log, plans) and its policy (None in simulation: no site file, nothing to review)."""

    site: SiteConfig
    work: Path
    state: Path
    policy: SitePolicy | None = None


@dataclass(frozen=True)
class Work:
    """A message the site answered: the reply's Flower records and, for the audit log, what it
    read (records, windows) and did (steps, examples drawn, epsilon spent so far with DP-SGD)."""

    reply: dict
    records: int
    windows: int
    steps: int = 0
    examples: int = 0
    epsilon: float | None = None


AUDITED = ("records", "windows", "steps", "examples", "epsilon")  # of Work, in the audit log
OUTCOMES = {"train": "trained", "evaluate": "evaluated"}


class PlanDeclined(Exception):
    """The site declines the plan (its policy refuses it, or it awaits approval); the one-line reason."""


def respond(kind: str, content: RecordDict, run_config: dict, node_config: dict, run_id: int) -> RecordDict | Error:
    """The reply's content to a `train` or `evaluate` message of run `run_id`, or an Error that
    names the site and says nothing about its data if the work fails or the site declines."""
    heard = {"run": run_id, "round": None, "message": kind, "plan": None}
    node, site_name = None, "?"
    try:
        config = content["config"]
        heard["round"] = int(config[SERVER_ROUND_KEY])
        plan = received_plan(config)
        heard["plan"] = plan.fingerprint
        scenario = plan.scenario()
        node = node_of(scenario, dict(node_config), dict(run_config))
        site_name = node.site.name
        review(plan, scenario, node)
        work = {"train": train_site, "evaluate": evaluate_site}[kind](scenario, node, content)
    except Exception as err:  # noqa: BLE001 - reported to the server instead of hanging the round
        outcome, code, reason = failure(err, site_name)
        if node is not None:  # a site that cannot tell which it is has no state folder to log in
            audit.record(node.state, audit_entry(heard, outcome, reason))
        return Error(code=code, reason=site_reason(site_name, reason))
    # outside the try: a reply whose audit line cannot be written does not leave the site
    audit.record(node.state, audit_entry(heard, OUTCOMES[kind], None, work))
    return RecordDict(work.reply)


def received_plan(config: ConfigRecord) -> Plan:
    """The plan the message carries (`PLAN_KEY`)."""
    if PLAN_KEY not in config:
        raise ConfigError(f"the message carries no plan (config key {PLAN_KEY!r}): the coordinator's "
                          "fedssl is older than this site's")
    return Plan.from_json(str(config[PLAN_KEY]))


def node_of(scenario: Scenario, node_config: dict, run_config: dict) -> Node:
    """This node's site and folders. Deployment: node config `site-file` (fedssl/sitefile.py) names
    the site, its records and labels on this machine (replacing the plan's data source for it), its
    window cache, state folder and policy. Simulation: node config `partition-id` is the site's
    index in the plan; its cache is `<run-dir>/data`, its state `<run-dir>/sites/<site>`."""
    if "site-file" in node_config:
        site_file = load_site_file(str(node_config["site-file"]))
        names = [s.name for s in scenario.sites]
        if site_file.site not in names:
            raise ConfigError(f"site file {node_config['site-file']}: site {site_file.site!r} is not in the "
                              f"plan; its sites are {names}")
        site = dataclasses.replace(scenario.site(site_file.site), folder=site_file.records, synthetic=None,
                                   labels_csv=site_file.labels_csv)
        return Node(site, Path(site_file.work), Path(site_file.state), site_file.policy)
    if "partition-id" not in node_config:
        raise ConfigError("node config has neither 'site-file' nor 'partition-id'; start the SuperNode "
                          "with --node-config \"site-file='/abs/path/site.yaml'\"")
    index, count = int(node_config["partition-id"]), int(node_config.get("num-partitions", -1))
    if count != len(scenario.sites):
        raise ConfigError(f"the simulation has {count} nodes but the plan has {len(scenario.sites)} "
                          "sites; set num-supernodes to the number of sites")
    site, run = scenario.sites[index], RunFolder(str(run_config["run-dir"]))
    return Node(site, run.data, run.site(site.name))


def review(plan: Plan, scenario: Scenario, node: Node) -> None:
    """Decline, before any data is read, a plan the site's policy refuses or, with
    `manual_approval`, one not yet approved (left pending for `fedssl node approve`)."""
    if node.policy is None:
        return
    problems = policy_problems(node.policy, scenario, node.site.name)
    if problems:
        raise PlanDeclined("; ".join(problems))
    if node.policy.manual_approval and not is_approved(node.state, plan.fingerprint):
        request_approval(node.state, plan.fingerprint, plan.values)
        raise PlanDeclined(f"plan {plan.short} awaits approval at the site (fedssl node approve)")


def failure(err: Exception, site: str) -> tuple[str, int, str]:
    """(audit outcome, error code, reason) of a message the site answers with an Error. Only a
    decline's fixed or plan-only reason, or the error's kind, leaves the site: details (paths,
    record ids) stay in its own log."""
    if isinstance(err, PlanDeclined):
        log(INFO, "fedssl | site %s declines the plan: %s", site, err)
        return "declined", PLAN_DECLINED_CODE, str(err)
    if isinstance(err, PrivacyBudgetExceeded):
        log(INFO, "fedssl | site %s declines the round: %s", site, err)
        return "declined", PRIVACY_BUDGET_CODE, PRIVACY_BUDGET_REASON
    log(ERROR, "fedssl | site %s: %s: %s\n%s", site, type(err).__name__, err, traceback.format_exc())
    return "failed", SITE_ERROR_CODE, f"{type(err).__name__} (details in the site's log)"


def audit_entry(heard: dict, outcome: str, reason: str | None, work: Work | None = None) -> dict:
    """The audit log's line (client/audit.py) of a message: what was heard, what came of it, what
    was done (null without `work`) and what was sent (null when no arrays left)."""
    sent = sent_summary(work.reply) if work and "arrays" in work.reply else None
    return {**heard, "outcome": outcome, "reason": reason, **{k: getattr(work, k, None) for k in AUDITED},
            "sent": sent}


def sent_summary(reply: dict) -> dict:
    """What left the site: each shared tensor's name, shape and dtype (the packed payload's
    manifest), the payload's bytes and its `payload_sha256`, which the server records as received."""
    arrays = reply["arrays"]
    return {"arrays": [[name, list(shape), dtype] for name, shape, dtype in
                       read_manifest(str(reply["config"][MANIFEST_KEY]))],
            "bytes": sum(len(a.data) for a in arrays.values()),
            "sha256": payload_sha256((name, a.data) for name, a in arrays.items())}


def train_site(scenario: Scenario, node: Node, content: RecordDict) -> Work:
    """The round's local work at the node's site: load heads + global model, train, save heads."""
    site, state_folder = node.site, node.state
    config, fed = content["config"], scenario.federation
    server_round = int(config[SERVER_ROUND_KEY])

    data = site_windows(scenario, node)
    objective = build_objective(scenario)
    # new-heads 1: the site had no heads of its own to continue (its first round, or a lost state folder)
    new_heads = fed.share == "encoder" and not load_local_state(objective, state_folder)
    received = cast_floating(received_state(content), "float32")  # float16 on the wire
    start, extra = received, {}
    if fed.local_update == "fedema":
        previous, scale = load_fedema_state(state_folder)
        start, scale, mu = fedema_start(previous, received, fed.fedema_lambda or scale, fed.fedema_tau)
        extra = {FEDEMA_MU_KEY: mu}
    objective.load_state_dict(start, strict=False)

    proximal_mu = float(config.get(PROXIMAL_MU_KEY, 0.0))  # sent by FedProx
    privacy = scenario.privacy_of(site)
    ledger = load_privacy_ledger(state_folder, privacy, data) if privacy.enabled else None
    result = train_local(objective, data, scenario.train, steps=scenario.train.local_steps,
                         seed=round_seed(scenario.seed, server_round, site.name),
                         proximal=(proximal_mu, received) if proximal_mu > 0 else None,
                         privacy=privacy if privacy.enabled else None, ledger=ledger,
                         # the whole federation's steps: the LR schedule (and DP's calibration) spans
                         # them, this round's steps continue it where round server_round - 1 ended
                         planned_steps=fed.rounds * scenario.train.local_steps,
                         first_step=(server_round - 1) * scenario.train.local_steps, round=server_round)
    # every site sends the same metric names (Flower's aggregation requires it): a site without
    # DP reports dp-sgd 0 and epsilon = delta = 0.0, which the server does not read as a guarantee
    spent = privacy_metrics(ledger)
    extra = {**extra, **spent}
    save_local_state(objective, state_folder)
    shared = shared_state(objective, fed.share)
    if fed.local_update == "fedema":
        save_fedema_state(state_folder, shared, scale)
    if KEY_CLIPPING_NORM in config:  # central DP clipped at the sites: the server sent the norm
        shared = clip_update(shared, received, float(config[KEY_CLIPPING_NORM]))

    log(INFO, "fedssl | site %s round %d: %d steps on %d windows, loss %.4f (%.1fs, %s)",
        site.name, server_round, result.steps, len(data), result.losses["loss"], result.seconds,
        "new heads" if new_heads else "its own heads")
    # FedAvg weights each site by its number of training windows (McMahan et al.'s n_k)
    # compute-seconds: the training loop alone, so the server can tell Flower's round overhead apart
    metrics = MetricRecord({WEIGHT_KEY: len(data), EXAMPLES_SEEN_KEY: int(result.examples),
                            SITE_INDEX_KEY: site_index(scenario, site), COMPUTE_SECONDS_KEY: float(result.seconds),
                            NEW_HEADS_KEY: int(new_heads),
                            **{k: float(v) for k, v in result.losses.items()}, **extra})
    return Work({**reply_records(shared, fed.transfer_dtype), "metrics": metrics},
                records=len(data.records), windows=len(data), steps=result.steps, examples=int(result.examples),
                epsilon=spent[EPSILON_KEY] if ledger else None)


def evaluate_site(scenario: Scenario, node: Node, content: RecordDict) -> Work:
    """Linear-probe macro AUROC of the received encoder on the site's labelled windows, split by
    patient (by record where no patient id is known) as the central probe is. A site whose labels cannot be probed (no class
    with positives and negatives on both sides) replies with `num-examples` 0, which the server
    leaves out of the mean, instead of failing the round."""
    encoder = build_objective(scenario).encoder
    encoder.load_state_dict(encoder_state(received_state(content)))
    evaluation = scenario.evaluation
    data = site_windows(scenario, node)
    train, test = data.split_by_patient(evaluation.test_fraction, scenario.seed)
    try:
        auroc, windows = linear_probe(encoder, train, test, evaluation.probe_l2).macro_auroc, len(test)
    except ValueError as err:  # no usable class at this site
        log(INFO, "fedssl | site %s: no federated probe: %s", node.site.name, err)
        auroc, windows = 0.0, 0
    return Work({"metrics": MetricRecord({WEIGHT_KEY: windows, PROBE_AUROC_KEY: auroc,
                                          SITE_INDEX_KEY: site_index(scenario, node.site)})},
                records=len(data.records), windows=len(data))


def site_windows(scenario: Scenario, node: Node) -> WindowSet:
    """The site's windows: built once from its records into its cache in `node.work`, then read
    from that cache, or kept in memory by a process that answers the same site again (the node's
    warm worker, client/worker.py). One entry, keyed by all the windows are built from; records
    changed on disk while a worker runs are read after its restart."""
    global last_windows
    key = (node.site, scenario.data, node.work, scenario.seed)
    if last_windows is None or last_windows[0] != key:
        last_windows = key, load_site(*key)
    return last_windows[1]


last_windows: tuple[tuple, WindowSet] | None = None  # (what they were built from, the windows) of the last call


def site_index(scenario: Scenario, site: SiteConfig) -> int:
    """The site's index in the plan's sites (`site-index`: how its replies name it)."""
    return [s.name for s in scenario.sites].index(site.name)


def privacy_metrics(ledger: PrivacyLedger | None) -> dict[str, float]:
    """`dp-sgd` (1/0) and, with DP, the site's epsilon spent so far (all rounds) and its delta."""
    if ledger is None:
        return {DP_SGD_KEY: 0, EPSILON_KEY: 0.0, DELTA_KEY: 0.0}
    return {DP_SGD_KEY: 1, EPSILON_KEY: float(ledger.epsilon()), DELTA_KEY: float(ledger.delta)}


def round_seed(seed: int, server_round: int, site: str) -> int:
    """A seed that differs per (scenario seed, round, site) and is stable across processes."""
    return zlib.crc32(f"{seed}:{server_round}:{site}".encode()) & 0x7FFFFFFF
